"""cuda_graph=True against the eager step, on a GPU (skipped elsewhere): the same parameters and
state after steps with a changing learning rate, new gradient tensors every step, and an AdamW group.
On CPUs the flag is refused with a clear error."""

import pytest
import torch
from torch import nn

import normuon


def test_cuda_graph_needs_cuda_parameters():
    with pytest.raises(ValueError, match="needs CUDA parameters"):
        normuon.NorMuon([nn.Parameter(torch.zeros(4, 4))], cuda_graph=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("settings", [dict(), dict(normalize=False), dict(
    neuron_axis="larger", cautious_weight_decay=True, ns_coefficients=normuon.POLAR_EXPRESS_COEFFICIENTS)],
    ids=["normuon", "muon", "options"])
def test_captured_step_equals_eager(settings):
    """NorMuon's kernels are the same in both: equal to fp32 rounding of the compiled stages (bound
    1e-6 relative per parameter). AdamW differs only in where its bias corrections are computed
    (torch's capturable path: fp32 on the GPU): bound 1e-5."""
    torch.manual_seed(0)
    shapes = [(96, 32), (96, 32), (32, 128), (64,)]
    def build(cuda_graph):
        params = [nn.Parameter(torch.randn(shape, device="cuda") * 0.1) for shape in shapes]
        groups = [dict(params=params[:3]), dict(params=params[3:], use_muon=False, lr=3e-3)]
        return params, normuon.NorMuon(groups, lr=0.02, weight_decay=0.1, cuda_graph=cuda_graph,
                                       **settings)
    (eager, eager_opt), (graphed, graphed_opt) = build(False), build(True)
    for step in range(8):
        for p, q in zip(eager, graphed):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()  # a new tensor every step, as autograd gives after zero_grad()
        for optimizer in (eager_opt, graphed_opt):
            optimizer.param_groups[0]["lr"] = 0.02 * (1 - step / 8)  # a schedule reaches the graph
            optimizer.step()
    assert "_captured" in graphed_opt.__dict__  # the later steps were replays
    for k, (p, q) in enumerate(zip(eager, graphed)):
        bound = 1e-5 if k == 3 else 1e-6
        assert ((p - q).norm() / p.norm()).item() < bound, k
