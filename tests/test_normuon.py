"""normuon.py against independent references: float64 math written from Algorithm 1
(tests/reference.py), torch.optim.Muon, and the single-device optimizer vs FSDP2 on 2 and 3 ranks."""

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import normuon
from reference import ReferenceNorMuon, newton_schulz_float64

REPO = Path(__file__).resolve().parents[1]
SETTINGS = [dict(adjust_lr_fn=fn, nesterov=nesterov) for fn in normuon.ADJUST_LR_FNS for nesterov in (False, True)]


def singular_values(matrix):
    return torch.linalg.svdvals(matrix.double())


# -----------------------------------------------------------------------------
# Newton–Schulz


def with_spectrum(shape, condition_number, seed=0):
    """A random matrix (or stack) with singular values log-spaced from 10 down to 10/condition_number."""
    generator = torch.Generator().manual_seed(seed)
    *batch, rows, columns = shape
    rank = min(rows, columns)
    left = torch.linalg.qr(torch.randn(*batch, rows, rank, generator=generator)).Q
    right = torch.linalg.qr(torch.randn(*batch, columns, rank, generator=generator)).Q
    return left @ torch.diag_embed(10 * torch.logspace(0, -math.log10(condition_number), rank).expand(*batch, rank)) @ right.mT


@pytest.mark.parametrize("shape", [(64, 64), (96, 32), (32, 96), (4, 48, 24)], ids=["square", "tall", "wide", "batched"])
def test_newton_schulz_singular_values_land_in_muon_band(shape):
    matrix = with_spectrum(shape, condition_number=100)
    output = normuon.newton_schulz(matrix)
    assert output.dtype == torch.bfloat16 and output.shape == matrix.shape
    values = singular_values(output.float())
    # Muon's quintic maps every singular value in [σ_max/100, σ_max] into a band around 1, not onto 1
    # (Muon's author: roughly Uniform(0.5, 1.5)); measured (0.68, 1.16).
    assert values.min() > 0.6 and values.max() < 1.25
    assert (values.max() - values.min()) > 0.1  # not exactly orthogonal: why row norms stay unequal


def test_newton_schulz_gaussian_matrices():
    """Rectangular Gaussian matrices are well conditioned: all singular values land in the band."""
    torch.manual_seed(0)
    for shape in [(96, 32), (32, 96)]:
        values = singular_values(normuon.newton_schulz(torch.randn(shape)).float())
        assert values.min() > 0.6 and values.max() < 1.25


def test_newton_schulz_low_rank():
    """A rank-5 input: its 5 directions land in the band. The other directions are not empty: the bf16
    cast adds noise of relative size ~2^-9 in every direction and NS's slope at 0 (a = 3.4445, five
    times: ~485x) lifts it to 0.2-0.45, still clearly below the band (measured over 8 seeds ≤ 0.42)."""
    for seed in range(4):
        torch.manual_seed(seed)
        low_rank = torch.randn(64, 5) @ torch.randn(5, 48)
        values = singular_values(normuon.newton_schulz(low_rank).float())
        assert values[:5].min() > 0.6 and values[:5].max() < 1.25
        assert values[5:].max() < 0.55


def test_newton_schulz_zero_gives_zero():
    output = normuon.newton_schulz(torch.zeros(3, 8, 5))
    assert torch.isfinite(output).all() and (output == 0).all()


def test_newton_schulz_matches_float64_iteration_to_bf16_precision():
    torch.manual_seed(0)
    matrix = torch.randn(40, 24)
    error = (normuon.newton_schulz(matrix).double() - newton_schulz_float64(matrix)).norm() / newton_schulz_float64(matrix).norm()
    assert error < 2e-2  # five bf16 iterations: a few units of bf16's 2^-8 roundoff


@pytest.mark.parametrize("coefficients", [(1.5, -0.5, 0.0), (2.0, -1.5, 0.5), (3.4445, -4.7750, 2.0315), (1.0, 0.0, 0.0)],
                         ids=["cubic", "quintic", "muon", "identity"])
@pytest.mark.parametrize("shape", [(40, 24), (3, 24, 40)], ids=["tall", "stack"])
def test_newton_schulz_any_coefficients_match_float64_iteration(coefficients, shape):
    """Any polynomial, also one with c = 0 (where bf16 baddbmm with alpha=0 drops beta on some CPUs):
    the bf16 result is the float64 iteration of the same polynomial up to bf16 roundoff."""
    torch.manual_seed(0)
    matrix = torch.randn(shape)
    output = normuon.newton_schulz(matrix, steps=5, coefficients=coefficients).double()
    expected = torch.stack([newton_schulz_float64(m, coefficients) for m in matrix.reshape(-1, *shape[-2:])])
    error = (output.reshape(expected.shape) - expected).norm() / expected.norm()
    assert error < 2e-2, error


# -----------------------------------------------------------------------------
# The update against the float64 reference of Algorithm 1


def run_against_reference(shape, steps, make_grad, momentum=0.95, orthogonalize=newton_schulz_float64,
                          ns_coefficients=normuon.MUON_COEFFICIENTS, **settings):
    """Per step, the relative error of normuon's parameter change vs the reference's, and at the end
    of the second moment. ``ns_coefficients`` go to normuon; the reference uses ``orthogonalize``."""
    torch.manual_seed(0)
    weight = torch.randn(shape) * 0.1
    param = nn.Parameter(weight.clone())
    optimizer = normuon.NorMuon([param], lr=0.02, momentum=momentum, weight_decay=0.1,
                                ns_coefficients=ns_coefficients, **settings)
    reference = ReferenceNorMuon(weight, lr=0.02, momentum=momentum, weight_decay=0.1, orthogonalize=orthogonalize, **settings)
    step_errors = []
    for _ in range(steps):
        grad = make_grad(shape)
        before, reference_before = param.detach().double().clone(), reference.weight.clone()
        param.grad = grad.clone()
        optimizer.step()
        reference.step(grad)
        change, reference_change = param.detach().double() - before, reference.weight - reference_before
        step_errors.append(((change - reference_change).norm() / reference_change.norm()).item())
    second_moment = optimizer.state[param]["second_moment"].double()
    moment_error = ((second_moment - reference.second_moment).norm() / reference.second_moment.norm()).item()
    return step_errors, moment_error


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: f"{s['adjust_lr_fn']}-nesterov{s['nesterov']}")
@pytest.mark.parametrize("shape", [(48, 24), (24, 48)], ids=["tall", "wide"])
def test_update_matches_float64_algorithm(settings, shape):
    """Full float64 reference, NS included: NS5 runs in bf16 here, so each step's change may differ by
    a few bf16 roundoffs (2^-8 ≈ 4e-3); measured ≤ 1.8e-2, bound 3e-2. A wrong β, ε, scale or
    Nesterov formula is off by far more (≥ 5e-2 in every case we tried)."""
    step_errors, moment_error = run_against_reference(shape, 10, torch.randn, **settings)
    assert max(step_errors) < 3e-2
    assert moment_error < 2e-2


@pytest.mark.parametrize("settings", SETTINGS + [dict(normalize=False, adjust_lr_fn=fn) for fn in normuon.ADJUST_LR_FNS]
                         + [dict(eps=0.05)],  # an eps comparable to sqrt(v): where it enters must match line 5
                         ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
def test_update_matches_float64_algorithm_exactly_given_the_same_ns(settings):
    """The same, with the reference calling normuon's bf16 NS on its own float64 momentum. To make that
    momentum bit-identical to the optimizer's fp32 one, β1 = 0.5 and the gradients are multiples of
    2^-6: every EMA step is then exact in fp32. All else is fp32 vs fp64 arithmetic: bound 1e-5."""
    exact_grad = lambda shape: torch.randint(-64, 64, shape).float() / 64
    same_ns = lambda matrix: normuon.newton_schulz(matrix.float()).double()
    step_errors, moment_error = run_against_reference((24, 40), 10, exact_grad, momentum=0.5, orthogonalize=same_ns, **settings)
    assert max(step_errors) < 1e-5
    if settings.get("normalize", True):
        assert moment_error < 1e-5


def test_pure_function_on_a_stack_equals_one_matrix_at_a_time():
    torch.manual_seed(0)
    grad = torch.randn(3, 20, 12)
    stacked_state = (torch.randn(3, 20, 12), torch.rand(3, 20))
    single_state = copy.deepcopy(stacked_state)
    stacked = normuon.normuon_update(grad, *stacked_state)
    for k in range(3):
        single = normuon.normuon_update(grad[k], single_state[0][k], single_state[1][k])
        torch.testing.assert_close(stacked[k], single, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(stacked_state[1][k], single_state[1][k])


# -----------------------------------------------------------------------------
# Exact invariants of the algorithm


def output_neuron_updates(update, layout):
    """The update's rows per output neuron, written out per layout without normuon.as_matrices:
    (matrices, neurons, inputs)."""
    if layout == "out_in":
        return update[None]
    if layout == "in_out":
        return update.T[None]
    if layout == "conv":
        return update.reshape(update.shape[0], -1)[None]
    return update if layout == "experts_out_in" else update.transpose(1, 2)


LAYOUT_SHAPES = [("out_in", (48, 24)), ("out_in", (24, 48)), ("in_out", (24, 48)), ("conv", (6, 4, 3, 3)),
                 ("experts_out_in", (3, 20, 12)), ("experts_in_out", (3, 12, 20))]


@pytest.mark.parametrize("layout, shape", LAYOUT_SHAPES, ids=lambda x: str(x))
def test_first_update_has_equal_neuron_norms_and_rms_is_0_2_lr(layout, shape):
    """v_0 = 0, so after step 1 v = (1-β2)·mean_row(O²) and every neuron's row of Ô has norm sqrt(n/(1-β2)):
    the first update's output-neuron norms are exactly equal, in every layout (along the other axis they
    are not). With match_rms_adamw, RMS(update) = 0.2·lr at every step, per matrix (per expert)."""
    torch.manual_seed(0)
    param = nn.Parameter(torch.zeros(shape))  # zeros: the change is the update, no fp32 cancellation
    lr = 0.01
    optimizer = normuon.NorMuon([dict(params=[param], layout=layout)], lr=lr)
    spread = lambda norms: ((norms.max(-1).values - norms.min(-1).values) / norms.mean(-1)).max().item()
    for step in range(5):
        before = param.detach().clone()
        param.grad = torch.randn(shape) * torch.logspace(-1, 1, shape[-1])  # unequal columns: unequal rows of O
        optimizer.step()
        rows = output_neuron_updates(before - param.detach(), layout)  # (matrices, neurons, inputs)
        rms = rows.square().mean(dim=(1, 2)).sqrt()
        assert (rms - 0.2 * lr).abs().max() < 1e-5 * lr
        if step == 0:
            assert spread(rows.norm(dim=2)) < 1e-5
            assert spread(rows.norm(dim=1)) > 1e-2  # the other axis: not what is balanced
    assert spread(rows.norm(dim=2)) > 1e-3  # later steps: equal only on average


@pytest.mark.parametrize("layout, shape", LAYOUT_SHAPES[2:], ids=lambda x: str(x))
def test_every_layout_equals_its_out_in_matrices(layout, shape):
    """A weight of any layout is trained exactly as its (out, in) matrices are, one by one."""
    torch.manual_seed(0)
    param = nn.Parameter(torch.randn(shape))
    matrices = [nn.Parameter(m.clone()) for m in output_neuron_updates(param.detach(), layout)]
    optimizer = normuon.NorMuon([dict(params=[param], layout=layout)], lr=0.02, weight_decay=0.1)
    references = [normuon.NorMuon([m], lr=0.02, weight_decay=0.1) for m in matrices]
    for _ in range(3):
        param.grad = torch.randn(shape)
        optimizer.step()
        for matrix, grad, reference in zip(matrices, output_neuron_updates(param.grad, layout), references):
            matrix.grad = grad.contiguous()
            reference.step()
    for matrix, row_view in zip(matrices, output_neuron_updates(param.detach(), layout)):
        torch.testing.assert_close(row_view, matrix.detach(), rtol=1e-6, atol=1e-7)


def test_muon_rows_are_unequal_and_normuon_equalizes_them():
    """The paper's Figure 1(b) in one number: the spread of row norms of the update (coefficient of
    variation), Muon vs NorMuon, on a gradient whose rows have very different scales."""
    torch.manual_seed(0)
    grad = torch.randn(64, 32) * torch.logspace(-2, 1, 64)[:, None]
    spreads = {}
    for normalize in (False, True):
        param = nn.Parameter(torch.zeros(64, 32))
        optimizer = normuon.NorMuon([param], lr=1.0, normalize=normalize)
        param.grad = grad
        optimizer.step()
        row_norms = param.detach().norm(dim=1)
        spreads[normalize] = (row_norms.std() / row_norms.mean()).item()
    assert spreads[False] > 0.1 and spreads[True] < 1e-5


# -----------------------------------------------------------------------------
# Plain Muon (normalize=False) equals torch.optim.Muon


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: f"{s['adjust_lr_fn']}-nesterov{s['nesterov']}")
def test_normalize_false_matches_torch_muon(settings):
    torch.manual_seed(0)
    ours = [nn.Parameter(torch.randn(shape)) for shape in [(48, 24), (24, 48), (48, 24)]]
    theirs = [nn.Parameter(p.detach().clone()) for p in ours]
    our_optimizer = normuon.NorMuon(ours, lr=0.02, weight_decay=0.1, normalize=False, **settings)
    torch_optimizer = torch.optim.Muon(theirs, lr=0.02, weight_decay=0.1, **settings)
    for _ in range(10):
        for p, q in zip(ours, theirs):
            p.grad = torch.randn(p.shape)
            q.grad = p.grad.clone()
        our_optimizer.step()
        torch_optimizer.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(our_optimizer.state[p]["momentum_buffer"], torch_optimizer.state[q]["momentum_buffer"])


# -----------------------------------------------------------------------------
# FSDP2: sharded equals single-device


@pytest.mark.parametrize("mesh", [(2,), (3,), (2, 2), (2, 3)], ids=["fsdp2", "fsdp3", "hsdp2x2", "hsdp2x3"])
def test_fsdp2_and_hsdp_equal_single_device(mesh, tmp_path):
    """tests/fsdp_worker.py: 6 steps, the same gradients, every layout, the three variants (paper,
    released code, Muon), the options (larger axis on wide matrices of every layout, cautious weight
    decay, Polar Express) and an AdamW group; FSDP2 on 2 and 3 ranks, HSDP on (replicate, shard)
    meshes of 2x2 and 2x3. A shard axis of 3 gives uneven shards and ranks with no rows at all. fp32
    throughout; only the order of float additions differs (per-neuron sums are all-reduced): ≤ 1e-6."""
    result = tmp_path / "result.json"
    ranks = math.prod(mesh)
    hsdp = [str(size) for size in mesh] if len(mesh) == 2 else []
    subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
                    str(REPO / "tests" / "fsdp_worker.py"), str(result), *hsdp], check=True, timeout=300,
                   cwd=REPO)
    outcome = json.loads(result.read_text())
    assert max(outcome["param_errors"].values()) < 1e-6, outcome["param_errors"]
    assert max(outcome["state_errors"].values()) < 1e-6, outcome["state_errors"]
    assert len(outcome["state_errors"]) == 2 * len(outcome["param_errors"]) + 2  # AdamW: 3 states, 2 params
    assert all(keys == outcome["state_keys"][0] for keys in outcome["state_keys"])  # same state_dict on every rank
    assert "sharded on dim 0 over a 1-D mesh" in outcome["replicated_parameter_error"]
    assert "3-D mesh" in outcome["mesh_3d_error"]
    if mesh[-1] == 3:  # the cases that deadlock naive implementations: ranks holding nothing of a tensor
        empty = {name for name, rows in outcome["local_rows"][-1].items() if rows == 0}
        assert {"down_a.weight", "in_out_narrow.weight", "experts.weight"} <= empty


def test_assign_owners_balances_and_puts_each_matrix_on_one_rank():
    sizes = [100, 100, 100, 400, 50, 50, 50, 50, 900]
    owners = normuon.assign_owners(sizes, world_size=3)
    assert owners == normuon.assign_owners(list(sizes), world_size=3)  # a pure function of the sizes
    assert owners[8] == 0 and owners[3] == 1  # biggest first, round-robin
    counts = [owners.count(rank) for rank in range(3)]
    assert sum(counts) == len(sizes) and max(counts) - min(counts) <= 1
    assert normuon.assign_owners([5, 5], world_size=4) == [0, 1]  # more ranks than matrices: some own none


# -----------------------------------------------------------------------------
# Behaving like a torch.optim optimizer


def tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16, bias=False), nn.Tanh(), nn.Linear(16, 16, bias=False), nn.Tanh(), nn.Linear(16, 4, bias=False))


def train(model, optimizer, steps, seed):
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        inputs = torch.randn(32, 8, generator=generator)
        loss = model(inputs).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_state_dict_round_trip_gives_the_same_next_steps():
    model = tiny_model()
    optimizer = normuon.NorMuon(model.parameters(), lr=0.02, weight_decay=0.1)
    train(model, optimizer, 3, seed=0)
    saved_model, saved_optimizer = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    straight = train(model, optimizer, 3, seed=1)

    resumed_model = tiny_model()
    resumed_optimizer = normuon.NorMuon(resumed_model.parameters(), lr=0.5)  # hyperparameters come from the state
    resumed_model.load_state_dict(saved_model)
    resumed_optimizer.load_state_dict(saved_optimizer)
    assert resumed_optimizer.param_groups[0]["lr"] == 0.02
    assert train(resumed_model, resumed_optimizer, 3, seed=1) == straight
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)


def test_param_groups_and_lr_scheduler():
    model = tiny_model()
    first, second, third = [layer.weight for layer in model if isinstance(layer, nn.Linear)]
    optimizer = normuon.NorMuon([dict(params=[first, second]), dict(params=[third], lr=0.0)], lr=0.05)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 if step < 2 else 0.0)
    frozen = third.detach().clone()
    snapshots = []
    for _ in range(4):
        train(model, optimizer, 1, seed=0)
        scheduler.step()
        snapshots.append(first.detach().clone())
    assert torch.equal(third, frozen)                 # its group's own lr = 0
    assert not torch.equal(snapshots[0], snapshots[1])  # lr 0.05 at steps 1-2
    assert torch.equal(snapshots[2], snapshots[3])      # the schedule set lr to 0 from step 3


def test_zero_gradient_gives_a_finite_zero_update():
    for settings in SETTINGS + [dict(normalize=False)]:
        param = nn.Parameter(torch.randn(16, 8))
        before = param.detach().clone()
        optimizer = normuon.NorMuon([param], lr=0.1, **settings)
        param.grad = torch.zeros(16, 8)
        optimizer.step()
        assert torch.equal(param.detach(), before), settings
        assert all(torch.isfinite(value).all() for value in optimizer.state[param].values())


def test_parameters_without_gradient_are_skipped():
    used, unused = nn.Parameter(torch.randn(8, 8)), nn.Parameter(torch.randn(8, 8))
    before = unused.detach().clone()
    optimizer = normuon.NorMuon([used, unused], lr=0.1)
    used.grad = torch.randn(8, 8)
    optimizer.step()
    assert torch.equal(unused, before) and unused not in optimizer.state and used in optimizer.state


def test_bf16_momentum_buffer_is_not_scaled_in_place_by_ns():
    """An aliasing pitfall of other implementations: for a bf16 buffer, `.to(bfloat16)` is the buffer itself."""
    param = nn.Parameter(torch.randn(16, 8, dtype=torch.bfloat16))
    optimizer = normuon.NorMuon([param], lr=0.1, momentum=0.5)
    grad = torch.randn(16, 8, dtype=torch.bfloat16) * 100
    param.grad = grad
    optimizer.step()
    assert torch.equal(optimizer.state[param]["momentum_buffer"], torch.zeros_like(grad).lerp(grad, 0.5))
    assert torch.isfinite(param).all()


def test_conv_kernel_is_trained_as_its_flattened_matrix():
    torch.manual_seed(0)
    kernel = nn.Parameter(torch.randn(6, 4, 3, 3))
    matrix = nn.Parameter(kernel.detach().reshape(6, 36).clone())
    optimizers = [normuon.NorMuon([dict(params=[kernel], layout="conv")], lr=0.05), normuon.NorMuon([matrix], lr=0.05)]
    for _ in range(3):
        grad = torch.randn(6, 36)
        kernel.grad, matrix.grad = grad.reshape(6, 4, 3, 3).clone(), grad.clone()
        for optimizer in optimizers:
            optimizer.step()
    torch.testing.assert_close(kernel.detach().reshape(6, 36), matrix.detach())
    assert optimizers[0].state[kernel]["second_moment"].shape == (6,)


def test_channels_last_kernel_is_updated_like_a_contiguous_one():
    """A channels_last kernel cannot be viewed as (out, in·kh·kw): the optimizer works on a copy and
    must write the update back (it once silently did not)."""
    torch.manual_seed(0)
    contiguous = nn.Parameter(torch.randn(6, 4, 3, 3))
    channels_last = nn.Parameter(contiguous.detach().clone().to(memory_format=torch.channels_last))
    initial = contiguous.detach().clone()
    optimizers = [normuon.NorMuon([dict(params=[p], layout="conv")], lr=0.05) for p in (contiguous, channels_last)]
    for _ in range(3):
        grad = torch.randn(6, 4, 3, 3)
        contiguous.grad, channels_last.grad = grad.clone(), grad.clone().to(memory_format=torch.channels_last)
        for optimizer in optimizers:
            optimizer.step()
    assert (channels_last.detach() - initial).abs().min() > 0  # every element moved
    assert channels_last.is_contiguous(memory_format=torch.channels_last)  # and the layout was kept
    torch.testing.assert_close(channels_last.detach(), contiguous.detach(), rtol=0, atol=0)
    torch.testing.assert_close(optimizers[1].state[channels_last]["momentum_buffer"],
                               optimizers[0].state[contiguous]["momentum_buffer"], rtol=0, atol=0)


def test_second_moment_is_fp32_for_bf16_parameters_also_after_loading():
    param = nn.Parameter(torch.randn(16, 8, dtype=torch.bfloat16))
    optimizer = normuon.NorMuon([param], lr=0.1)
    param.grad = torch.randn(16, 8, dtype=torch.bfloat16)
    optimizer.step()
    assert optimizer.state[param]["second_moment"].dtype == torch.float32
    optimizer.load_state_dict(optimizer.state_dict())  # torch casts state to the parameter's dtype here
    assert optimizer.state[param]["second_moment"].dtype == torch.float32


@pytest.mark.parametrize("make, message", [
    (lambda: normuon.NorMuon([nn.Parameter(torch.zeros(8))]), "Use AdamW"),
    (lambda: normuon.NorMuon([nn.Parameter(torch.zeros(()))]), "Use AdamW"),
    (lambda: normuon.NorMuon([nn.Parameter(torch.zeros(4, 4))], lr=-1e-3), "lr must be >= 0"),
    (lambda: normuon.NorMuon([nn.Parameter(torch.zeros(4, 4))], momentum=1.0), r"momentum must be in \[0, 1\)"),
    (lambda: normuon.NorMuon([nn.Parameter(torch.zeros(4, 4))], beta2=-0.1), r"beta2 must be in \[0, 1\)"),
    (lambda: normuon.NorMuon([nn.Parameter(torch.zeros(4, 4))], ns_steps=0), "ns_steps must be an integer >= 1"),
    (lambda: normuon.NorMuon([nn.Parameter(torch.zeros(4, 4))], weight_decay=-0.1), "weight_decay must be >= 0"),
    (lambda: normuon.NorMuon([nn.Parameter(torch.zeros(4, 4))], eps=0.0), "eps must be > 0"),
    (lambda: normuon.NorMuon([nn.Parameter(torch.zeros(4, 4))], adjust_lr_fn="adamw"), "adjust_lr_fn must be one of"),
    (lambda: normuon.NorMuon([dict(params=[nn.Parameter(torch.zeros(4, 4))], lr=float("nan"))]), "lr must be >= 0"),
    (lambda: normuon.NorMuon([nn.Parameter(torch.zeros(0, 4))]), "empty parameter"),
    (lambda: normuon.update_scale((4, 4), "match_rms_adam", normalize=False), "adjust_lr_fn must be one of"),
    (lambda: normuon.NorMuon([nn.Parameter(torch.zeros(3, 4, 5))]), "layout='conv'"),  # a 3-D guess is refused
    (lambda: normuon.NorMuon([dict(params=[nn.Parameter(torch.zeros(4, 4))], layout="conv")]), "2-D parameter"),
    (lambda: normuon.NorMuon([dict(params=[nn.Parameter(torch.zeros(4, 4))], layout="rows")]), "layout must be one of"),
    (lambda: normuon.NorMuon([nn.Parameter(torch.zeros(4, 4))], ns_coefficients=(1.0, 2.0)), "three numbers"),
])
def test_bad_input_raises_a_clear_value_error(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_a_rejected_param_group_is_not_kept():
    optimizer = normuon.NorMuon([nn.Parameter(torch.zeros(4, 4))])
    with pytest.raises(ValueError, match="Use AdamW"):
        optimizer.add_param_group(dict(params=[nn.Parameter(torch.zeros(4))]))
    assert len(optimizer.param_groups) == 1


def test_sparse_gradient_raises_a_clear_value_error():
    param = nn.Parameter(torch.zeros(4, 4))
    optimizer = normuon.NorMuon([param])
    param.grad = torch.zeros(4, 4).to_sparse()
    with pytest.raises(ValueError, match="sparse gradients"):
        optimizer.step()


class Conv1DLike(nn.Module):
    """The layout of transformers' Conv1D (GPT-2): weight (in, out), y = x W + b; attributes nx, nf."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.02)
        self.bias = nn.Parameter(torch.zeros(nf))


class StackedExperts(nn.Module):
    """Experts as one 3-D parameter, the way transformers' MoE layers keep them (num_experts, is_transposed)."""

    def __init__(self, num_experts, is_transposed):
        super().__init__()
        self.num_experts, self.is_transposed = num_experts, is_transposed
        self.gate_up_proj = nn.Parameter(torch.randn(num_experts, 8, 16) * 0.02)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(10, 8)
        self.norm = nn.LayerNorm(8)
        self.hidden = nn.Linear(8, 8)
        self.conv = nn.Conv1d(8, 8, 3, bias=False)
        self.attention = nn.MultiheadAttention(8, 2, add_bias_kv=True)  # in_proj_weight (24, 8); bias_k (1, 1, 8)
        self.c_attn = Conv1DLike(24, 8)
        self.experts = StackedExperts(4, is_transposed=False)
        self.experts_t = StackedExperts(4, is_transposed=True)
        self.class_token = nn.Parameter(torch.zeros(1, 1, 8))
        self.head = nn.Linear(8, 10, bias=False)
        self.gain = nn.Parameter(torch.ones(()))

    def get_output_embeddings(self):
        return self.head


def test_split_parameters_finds_every_layout_and_leaves_the_rest_to_adamw():
    model = Tiny()
    all_groups = normuon.split_parameters(model)
    groups = [group for group in all_groups if group["use_muon"]]
    (adamw_group,) = [group for group in all_groups if not group["use_muon"]]
    adamw_params = adamw_group["params"]
    layouts = {id(p): group["layout"] for group in groups for p in group["params"]}
    expected = {model.hidden.weight: "out_in", model.conv.weight: "conv", model.attention.in_proj_weight: "out_in",
                model.attention.out_proj.weight: "out_in", model.c_attn.weight: "in_out",
                model.experts.gate_up_proj: "experts_out_in", model.experts_t.gate_up_proj: "experts_in_out"}
    assert layouts == {id(p): layout for p, layout in expected.items()}
    assert {id(p) for p in adamw_params} == {id(p) for p in model.parameters()} - set(layouts)
    assert id(model.head.weight) not in layouts and id(model.attention.bias_k) not in layouts  # head, vector-like
    normuon.NorMuon(all_groups)  # the split is valid input: one optimizer for the whole model


def test_split_parameters_overrides_and_warnings():
    model = Tiny()
    groups = normuon.split_parameters(model, layouts={"hidden.weight": None, "class_token": None})
    groups = [group for group in groups if group["use_muon"]]
    assert id(model.hidden.weight) not in {id(p) for group in groups for p in group["params"]}
    model.table = nn.Parameter(torch.zeros(5, 8))  # a raw matrix: not a layer split_parameters knows
    with pytest.warns(UserWarning, match=r"AdamW will train table \(5, 8\)"):
        normuon.split_parameters(model)
    with pytest.raises(ValueError, match="does not have"):
        normuon.split_parameters(model, layouts={"no.such.weight": "out_in"})
    del model.experts_t.is_transposed  # experts that do not say which way they are stored
    with pytest.raises(ValueError, match="experts_out_in"):
        normuon.split_parameters(model)


# -----------------------------------------------------------------------------
# torch.optim conventions (as torch's generic optimizer tests apply them to torch.optim.Muon)


def test_tensor_lr_and_none_params_raise_value_errors():
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        normuon.NorMuon([nn.Parameter(torch.zeros(4, 4))], lr=torch.tensor([1e-3, 1e-3]))
    with pytest.raises(ValueError, match="params=None"):
        normuon.NorMuon(None)
    param = nn.Parameter(torch.zeros(4, 4))
    optimizer = normuon.NorMuon([param], lr=torch.tensor(0.01))  # a one-element Tensor lr works
    param.grad = torch.randn(4, 4)
    optimizer.step()
    assert param.detach().abs().sum() > 0


def test_load_state_dict_with_a_hook_entry_that_is_not_a_dict():
    param = nn.Parameter(torch.randn(8, 4))
    optimizer = normuon.NorMuon([param])
    param.grad = torch.randn(8, 4)
    optimizer.step()
    state_dict = optimizer.state_dict()

    def add_entry(_, state_dict):
        state_dict["state"]["note"] = "not a tensor dict"
        return state_dict

    fresh = normuon.NorMuon([param])
    fresh.register_load_state_dict_pre_hook(add_entry)
    fresh.load_state_dict(state_dict)
    torch.testing.assert_close(fresh.state[param]["second_moment"], optimizer.state[param]["second_moment"], rtol=0, atol=0)


def test_fp16_parameters_keep_an_exact_fp32_second_moment_through_a_round_trip():
    param = nn.Parameter(torch.randn(16, 8).half())
    optimizer = normuon.NorMuon([param], lr=0.1)
    param.grad = torch.randn(16, 8).half()
    optimizer.step()
    saved = optimizer.state[param]["second_moment"].clone()
    assert saved.dtype == torch.float32
    optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # torch casts state to fp16 on the way in
    assert torch.equal(optimizer.state[param]["second_moment"], saved)  # bit for bit, not fp16-rounded


def test_ns_coefficients_are_used():
    """torch.optim.Muon's ns_coefficients: another polynomial gives another update, equal to torch's."""
    torch.manual_seed(0)
    quintic = (2.0, -1.5, 0.5)  # c != 0: torch's own NS hits the bf16 CPU baddbmm issue when c = 0
    ours = nn.Parameter(torch.randn(24, 12))
    theirs = nn.Parameter(ours.detach().clone())
    our_optimizer = normuon.NorMuon([ours], lr=0.02, normalize=False, nesterov=True, adjust_lr_fn="original",
                                    ns_coefficients=quintic, ns_steps=8)
    torch_optimizer = torch.optim.Muon([theirs], lr=0.02, weight_decay=0.0, ns_coefficients=quintic, ns_steps=8)
    default = nn.Parameter(ours.detach().clone())
    default_optimizer = normuon.NorMuon([default], lr=0.02, normalize=False, nesterov=True, adjust_lr_fn="original", ns_steps=8)
    grad = torch.randn(24, 12)
    ours.grad, theirs.grad, default.grad = grad.clone(), grad.clone(), grad.clone()
    for optimizer in (our_optimizer, torch_optimizer, default_optimizer):
        optimizer.step()
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    assert (ours - default).abs().max() > 1e-4  # the coefficients changed the update


def test_compiled_step_equals_eager_and_a_schedule_does_not_recompile():
    """The CUDA default, torch.compile of the element-wise stages, on the CPU: the same functions, so the
    same result up to fp32 rounding (fused multiply-adds), which bf16 NS can amplify to bf16 roundoff of
    single elements (bound 1e-2 on the parameter change); an lr schedule must not recompile."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    shapes = [(24, 16), (24, 16), (16, 24)]
    compiled = [nn.Parameter(torch.randn(shape)) for shape in shapes]
    eager = [nn.Parameter(p.detach().clone()) for p in compiled]
    initial = [p.detach().clone() for p in compiled]
    optimizers = [normuon.NorMuon(compiled, lr=0.02, weight_decay=0.1, compile=True),
                  normuon.NorMuon(eager, lr=0.02, weight_decay=0.1, compile=False)]
    for step in range(4):
        for p, q in zip(compiled, eager):
            p.grad = torch.randn(p.shape)
            q.grad = p.grad.clone()
        for optimizer in optimizers:
            optimizer.param_groups[0]["lr"] = 0.02 * (1 - step / 4)
            optimizer.step()
        if step == 0:
            graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs == 6  # 3 compiled stages x 2 bucket shapes
    for p, q, p0 in zip(compiled, eager, initial):
        assert ((p - q).norm() / (q - p0).norm()).item() < 1e-2
