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
    # (PAPER.md: roughly (0.5, 1.5)); measured (0.68, 1.16).
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


# -----------------------------------------------------------------------------
# The update against the float64 reference of Algorithm 1


def run_against_reference(shape, steps, make_grad, momentum=0.95, orthogonalize=newton_schulz_float64, **settings):
    """Per step, the relative error of normuon's parameter change vs the reference's, and at the end
    of the second moment."""
    torch.manual_seed(0)
    weight = torch.randn(shape) * 0.1
    param = nn.Parameter(weight.clone())
    optimizer = normuon.NorMuon([param], lr=0.02, momentum=momentum, weight_decay=0.1, **settings)
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
    second_moment = optimizer.state[param]["second_moment"].double().squeeze(1)
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
    stacked_state = (torch.randn(3, 20, 12), torch.rand(3, 20, 1))
    single_state = copy.deepcopy(stacked_state)
    stacked = normuon.normuon_update(grad, *stacked_state)
    for k in range(3):
        single = normuon.normuon_update(grad[k], single_state[0][k], single_state[1][k])
        torch.testing.assert_close(stacked[k], single, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(stacked_state[1][k], single_state[1][k])


# -----------------------------------------------------------------------------
# Exact invariants of the algorithm


@pytest.mark.parametrize("shape", [(48, 24), (24, 48), (6, 4, 3, 3)], ids=["tall", "wide", "conv"])
def test_first_update_has_equal_row_norms_and_rms_is_0_2_lr(shape):
    """v_0 = 0, so after step 1 v = (1-β2)·mean_row(O²) and every row of Ô has norm sqrt(n/(1-β2)):
    the first update's rows are exactly equal. With match_rms_adamw, RMS(update) = 0.2·lr at every step."""
    torch.manual_seed(0)
    param = nn.Parameter(torch.zeros(shape))  # zeros: the change is the update, no fp32 cancellation
    lr = 0.01
    optimizer = normuon.NorMuon([param], lr=lr)
    for step in range(5):
        before = param.detach().clone()
        param.grad = torch.randn(shape)
        optimizer.step()
        update = (before - param.detach()).flatten(1)
        rms = update.square().mean().sqrt()
        assert abs(rms.item() - 0.2 * lr) < 1e-5 * lr
        row_norms = update.norm(dim=1)
        if step == 0:
            assert (row_norms.max() - row_norms.min()) / row_norms.mean() < 1e-5
    assert (row_norms.max() - row_norms.min()) / row_norms.mean() > 1e-3  # later steps: equal only on average


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


@pytest.mark.parametrize("world_size", [2, 3])
def test_fsdp2_equals_single_device(world_size, tmp_path):
    """tests/fsdp_worker.py: 6 steps, the same gradients, three param groups (paper, released code,
    Muon); 3 ranks give uneven shards and ranks with no rows of a 2-row matrix. fp32 throughout; only
    the order of float additions differs (the Frobenius norms are all-reduced), so we ask ≤ 1e-6."""
    result = tmp_path / "result.json"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world_size}",
                    str(REPO / "tests" / "fsdp_worker.py"), str(result)], check=True, timeout=300, cwd=REPO)
    outcome = json.loads(result.read_text())
    assert max(outcome["param_errors"].values()) < 1e-6, outcome["param_errors"]
    assert max(outcome["state_errors"].values()) < 1e-6, outcome["state_errors"]
    assert all(keys == outcome["state_keys"][0] for keys in outcome["state_keys"])  # same state_dict on every rank
    # Each matrix orthogonalized once in the job, the work spread round-robin (at most one matrix apart per step).
    per_rank = outcome["matrices_orthogonalized_per_rank_per_step"]
    assert sum(per_rank) == outcome["matrices"] and max(per_rank) - min(per_rank) <= 1, per_rank
    assert "sharded on dim 0 over a 1-D mesh" in outcome["replicated_parameter_error"]
    if world_size == 3:
        assert outcome["local_rows"][2]["down_a.weight"] == 0  # the case that deadlocks naive implementations


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
    """PAPER.md's aliasing pitfall: for a bf16 buffer, `.to(bfloat16)` is the buffer itself."""
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
    optimizers = [normuon.NorMuon([p], lr=0.05) for p in (kernel, matrix)]
    for _ in range(3):
        grad = torch.randn(6, 36)
        kernel.grad, matrix.grad = grad.reshape(6, 4, 3, 3).clone(), grad.clone()
        for optimizer in optimizers:
            optimizer.step()
    torch.testing.assert_close(kernel.detach().reshape(6, 36), matrix.detach())
    assert optimizers[0].state[kernel]["second_moment"].shape == (6, 1)


def test_channels_last_kernel_is_updated_like_a_contiguous_one():
    """A channels_last kernel cannot be viewed as (out, in·kh·kw): the optimizer works on a copy and
    must write the update back (it once silently did not)."""
    torch.manual_seed(0)
    contiguous = nn.Parameter(torch.randn(6, 4, 3, 3))
    channels_last = nn.Parameter(contiguous.detach().clone().to(memory_format=torch.channels_last))
    optimizers = [normuon.NorMuon([p], lr=0.05) for p in (contiguous, channels_last)]
    for _ in range(3):
        grad = torch.randn(6, 4, 3, 3)
        contiguous.grad, channels_last.grad = grad.clone(), grad.clone().to(memory_format=torch.channels_last)
        for optimizer in optimizers:
            optimizer.step()
    assert not torch.equal(contiguous.detach(), channels_last.detach().new_zeros(6, 4, 3, 3))
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


def test_split_parameters():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = nn.Embedding(10, 8)
            self.norm = nn.LayerNorm(8)
            self.hidden = nn.Linear(8, 8)
            self.conv = nn.Conv1d(8, 8, 3, bias=False)
            self.head = nn.Linear(8, 10, bias=False)
            self.gain = nn.Parameter(torch.ones(()))
    model = Tiny()
    normuon_params, adamw_params = normuon.split_parameters(model, exclude=[model.head])
    assert {id(p) for p in normuon_params} == {id(model.hidden.weight), id(model.conv.weight)}
    assert {id(p) for p in adamw_params} == {id(p) for p in model.parameters()} - {id(p) for p in normuon_params}
    normuon.NorMuon(normuon_params)  # the split is valid input
