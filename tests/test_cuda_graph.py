"""cuda_graph=True against the eager step, on a GPU (skipped elsewhere): the same parameters and
state after steps with a changing learning rate, new gradient tensors every step, and an AdamW group.
The FSDP2 path is captured too, at world size 1 under NCCL (tests/graph_worker.py). On CPUs the
flag is refused with a clear error."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import normuon

REPO = Path(__file__).resolve().parents[1]


def test_cuda_graph_needs_cuda_parameters():
    with pytest.raises(ValueError, match="needs CUDA parameters"):
        normuon.NorMuon([nn.Parameter(torch.zeros(4, 4))], cuda_graph=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("settings", [dict(), dict(normalize=False), dict(
    neuron_axis="larger", cautious_weight_decay=True, ns_coefficients=normuon.POLAR_EXPRESS_COEFFICIENTS)],
    ids=["normuon", "muon", "options"])
def test_captured_step_equals_eager(settings):
    """The same functions and kernels in both: NorMuon's parameters end bit-identical (measured on
    an H200, torch 2.11: 0.0; bound 1e-6 relative to the change, in case cuBLAS picks another GEMM
    algorithm inside a capture). AdamW differs only where its bias corrections are computed (torch's
    capturable path, on the GPU in fp32): measured 2.7e-7, bound 1e-5. A schedule that did not reach
    the graph (lr falls 8x here) would be off by far more."""
    torch.manual_seed(0)
    shapes = [(96, 32), (96, 32), (32, 128), (64,)]
    def build(cuda_graph):
        torch.manual_seed(0)
        params = [nn.Parameter(torch.randn(shape, device="cuda") * 0.1) for shape in shapes]
        groups = [dict(params=params[:3]), dict(params=params[3:], use_muon=False, lr=3e-3)]
        return params, normuon.NorMuon(groups, lr=0.02, weight_decay=0.1, cuda_graph=cuda_graph,
                                       **settings)
    (eager, eager_opt), (graphed, graphed_opt) = build(False), build(True)
    initial = [p.detach().clone() for p in eager]
    for step in range(8):
        for p, q in zip(eager, graphed):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()  # a new tensor every step, as autograd gives after zero_grad()
        for optimizer in (eager_opt, graphed_opt):
            optimizer.param_groups[0]["lr"] = 0.02 * (1 - step / 8)  # a schedule reaches the graph
            optimizer.step()
    assert "_captured" in graphed_opt.__dict__  # the later steps were replays
    errors = [((p - q).norm() / (p - p0).norm()).item() for p, q, p0 in zip(eager, graphed, initial)]
    print("relative difference of the parameter change, per parameter:", errors)
    assert max(errors[:3]) < 1e-6 and errors[3] < 1e-5, errors


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_captured_fsdp2_step_equals_eager(tmp_path):
    """tests/graph_worker.py: the FSDP2 path (DTensor parameters, the owner plan's all_to_all and
    all-reduce under NCCL) captured at world size 1, against its eager step: the bounds above."""
    result = tmp_path / "result.json"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1",
                    str(REPO / "tests" / "graph_worker.py"), str(result)], check=True, timeout=300,
                   cwd=REPO)
    outcome = json.loads(result.read_text())
    print("relative difference of the parameter change, per parameter:", outcome["errors"])
    assert outcome["replayed"]
    assert max(outcome["errors"][:3]) < 1e-6 and outcome["errors"][3] < 1e-5, outcome
