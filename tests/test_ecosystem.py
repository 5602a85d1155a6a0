"""NorMuon where users put an optimizer: transformers.Trainer, torch.optim.lr_scheduler,
state_dict() and distributed checkpoints (DCP, resharded from 2 ranks to 1 and 3), copy.deepcopy
and pickle. One NorMuon object trains the whole model: NorMuon groups for the hidden matrices and
an AdamW group (use_muon=False) for the rest, as split_parameters makes them."""

import copy
import io
import math
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normuon

REPO = Path(__file__).resolve().parents[1]
VOCAB = 32


# -----------------------------------------------------------------------------
# A small language model with every kind of parameter: embedding, matrices, norm, biases, head


def tiny_lm():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Embedding(VOCAB, 16),
        nn.Linear(16, 40),  # NorMuon (out, in); its bias: AdamW
        nn.GELU(),
        nn.LayerNorm(40),  # AdamW
        nn.Linear(40, 16, bias=False),  # NorMuon
        nn.Linear(16, VOCAB),  # the head: AdamW (its rows are vocabulary entries)
    )


def one_optimizer(model, lr=0.02, adamw_lr=0.005, **kwargs):
    groups = normuon.split_parameters(model, exclude=[model[-1]], adamw_lr=adamw_lr)
    return normuon.NorMuon(groups, lr=lr, **kwargs)


def lm_loss(model, tokens):
    logits = model(tokens[:, :-1])  # (B, T, vocab)
    return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())


def batch(step, size=8, length=12):
    """The same tokens for a step wherever it runs (resumed, deep-copied or on any rank)."""
    return torch.randint(
        VOCAB, (size, length), generator=torch.Generator().manual_seed(1000 + step)
    )


def train(model, optimizer, steps, first_step=0):
    losses = []
    for step in range(first_step, first_step + steps):
        loss = lm_loss(model, batch(step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def groups_by_kind(optimizer):
    muon = [group for group in optimizer.param_groups if group.get("use_muon", True)]
    adamw = [group for group in optimizer.param_groups if not group.get("use_muon", True)]
    return muon, adamw


def test_split_parameters_makes_one_list_for_one_optimizer():
    model = tiny_lm()
    optimizer = one_optimizer(model)
    muon, adamw = groups_by_kind(optimizer)
    assert [p for group in muon for p in group["params"]] == [model[1].weight, model[4].weight]
    matrices = {id(model[1].weight), id(model[4].weight)}
    expected_adamw = {id(p) for p in model.parameters()} - matrices
    assert {id(p) for group in adamw for p in group["params"]} == expected_adamw
    assert [group["lr"] for group in adamw] == [0.005]
    assert all(group["lr"] == 0.02 for group in muon)


# -----------------------------------------------------------------------------
# transformers.Trainer


class RepeatedSequences(torch.utils.data.Dataset):
    """Cyclic walks through one fixed permutation of the vocabulary: the next token is a function of
    the current one, so a model that learns anything lowers the loss within a few steps."""

    def __init__(self, vocab, length=16, count=64):
        successor = torch.randperm(vocab, generator=torch.Generator().manual_seed(0))
        self.sequences = []
        for start in range(count):
            token, sequence = start % vocab, []
            for _ in range(length):
                sequence.append(token)
                token = successor[token].item()
            self.sequences.append(torch.tensor(sequence))

    def __len__(self):
        return len(self.sequences)

    def __getitem__(self, index):
        return dict(input_ids=self.sequences[index], labels=self.sequences[index])


def warnings_from_normuon(caught):
    return [
        w
        for w in caught
        if Path(w.filename).name == "normuon.py" or "normuon" in str(w.message).lower()
    ]


def test_transformers_trainer_with_one_normuon_trains_gpt2(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    config = transformers.GPT2Config(
        vocab_size=64,
        n_positions=32,
        n_embd=32,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    steps = 20
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optimizer = normuon.NorMuon(normuon.split_parameters(model, adamw_lr=1e-2), lr=2e-2)
        scheduler = transformers.get_cosine_schedule_with_warmup(
            optimizer, num_warmup_steps=2, num_training_steps=steps
        )
        arguments = transformers.TrainingArguments(
            output_dir=str(tmp_path),
            max_steps=steps,
            per_device_train_batch_size=8,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            disable_tqdm=True,
            seed=0,
            dataloader_num_workers=0,
        )
        trainer = transformers.Trainer(
            model=model,
            args=arguments,
            train_dataset=RepeatedSequences(64),
            optimizers=(optimizer, scheduler),
        )
        trainer.train()
    ours = warnings_from_normuon(caught)
    assert ours == [], [str(w.message) for w in ours]

    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == steps
    assert losses[0] > 0.9 * math.log(64)  # starts near chance
    assert sum(losses[-3:]) / 3 < 0.7 * losses[0], losses  # measured: 3.86 -> 2.05 (0.53)
    muon, adamw = groups_by_kind(optimizer)
    conv1d = model.transformer.h[0].attn.c_attn.weight  # GPT-2's Conv1D: (in, out)
    assert any(p is conv1d for group in muon for p in group["params"])
    assert muon[0]["layout"] == "in_out"
    assert set(optimizer.state[conv1d]) == {"momentum_buffer", "second_moment"}
    embedding = model.transformer.wte.weight  # tied to the head
    assert set(optimizer.state[embedding]) == {"step", "exp_avg", "exp_avg_sq"}
    assert optimizer.state[embedding]["step"] == steps  # Trainer stepped our object every time
    assert adamw[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # the cosine schedule ended at zero


# -----------------------------------------------------------------------------
# torch.optim.lr_scheduler drives every group, NorMuon and AdamW alike


def rms(tensor):
    return tensor.double().square().mean().sqrt().item()


def cosine_between(start, end, fraction):
    return end + (start - end) / 2 * (1 + math.cos(math.pi * fraction))


def one_cycle(step, start, peak, end, total_steps, pct_start=0.3):
    """OneCycleLR's two cosine phases (anneal_strategy='cos'), from its documentation."""
    peak_step = pct_start * total_steps - 1
    if step <= peak_step:
        return cosine_between(start, peak, step / peak_step)
    return cosine_between(peak, end, (step - peak_step) / (total_steps - 1 - peak_step))


STEPS = 8
SCHEDULES = {
    "lambda": (
        lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 / (1 + step)),
        lambda step, base: base / (1 + step),
    ),
    "cosine": (
        lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS, eta_min=1e-4),
        lambda step, base: cosine_between(base, 1e-4, step / STEPS),
    ),
    # cycle_momentum=False here: torch.optim.AdamW, the reference, would cycle its beta1, while
    # NorMuon's AdamW group keeps its betas (see test_one_cycle_cycles_normuon_momentum).
    "one_cycle": (
        lambda opt: torch.optim.lr_scheduler.OneCycleLR(
            opt,
            max_lr=[group["lr"] for group in opt.param_groups],
            total_steps=STEPS,
            cycle_momentum=False,
        ),
        lambda step, base: one_cycle(step, base / 25, base, base / 25 / 1e4, STEPS),
    ),
}


@pytest.mark.parametrize("name", SCHEDULES)
def test_lr_schedulers_drive_normuon_and_adamw_groups(name):
    """Each step, every group's lr is the schedule's value, and the update used it: NorMuon's update
    has RMS exactly 0.2·lr (match_rms_adamw, no weight decay), and the AdamW group moves exactly as
    torch.optim.AdamW under the same schedule."""
    make_scheduler, closed_form = SCHEDULES[name]
    model = tiny_lm()
    optimizer = one_optimizer(model, lr=0.02, adamw_lr=0.005)
    scheduler = make_scheduler(optimizer)
    muon, adamw = groups_by_kind(optimizer)

    reference_params = [p.detach().clone().requires_grad_() for p in adamw[0]["params"]]
    reference = torch.optim.AdamW(
        reference_params, lr=0.005, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0
    )
    reference_scheduler = make_scheduler(reference)

    for step in range(STEPS):
        for group, base in zip(optimizer.param_groups, [0.02] * len(muon) + [0.005]):
            expected = closed_form(step, base)
            assert group["lr"] == pytest.approx(expected, rel=1e-9, abs=1e-15), step
        assert optimizer.param_groups[-1]["lr"] == reference.param_groups[0]["lr"]

        before = [p.detach().clone() for group in muon for p in group["params"]]
        loss = lm_loss(model, batch(step))
        optimizer.zero_grad()
        loss.backward()
        for p, q in zip(adamw[0]["params"], reference_params):
            q.grad = p.grad.clone()
        optimizer.step()
        reference.step()

        matrices = [p for group in muon for p in group["params"]]
        for p, p0, group in zip(matrices, before, [g for g in muon for _ in g["params"]]):
            resolution = 2**-22 * p0.abs().max().item()  # fp32 rounding of W_t - W_{t-1}
            assert rms(p.detach() - p0) == pytest.approx(
                0.2 * group["lr"], rel=1e-4, abs=resolution
            )
        for p, q in zip(adamw[0]["params"], reference_params):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)
        scheduler.step()
        reference_scheduler.step()


def test_one_cycle_cycles_normuon_momentum():
    """OneCycleLR(cycle_momentum=True) cycles the group key 'momentum' when the optimizer's defaults
    have no 'betas'. NorMuon's defaults have 'momentum' (β1), so each NorMuon group's β1 follows
    the cycle (0.95 -> 0.85 -> 0.95, opposite to lr) and its momentum buffer uses it:
    M_t = β1_t M_{t-1} + (1 - β1_t) G_t.
    The AdamW group's beta1 stays as set: it reads 'betas', not 'momentum'."""
    model = tiny_lm()
    optimizer = one_optimizer(model)
    assert "betas" not in optimizer.defaults
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.02, total_steps=STEPS)
    muon, adamw = groups_by_kind(optimizer)
    weight = muon[0]["params"][0]
    momenta = []
    for step in range(STEPS - 1):
        momentum = muon[0]["momentum"]
        momenta.append(momentum)
        previous = (
            optimizer.state[weight]["momentum_buffer"].clone() if step else torch.zeros_like(weight)
        )
        train(model, optimizer, 1, first_step=step)
        expected = previous * momentum + weight.grad * (1 - momentum)
        torch.testing.assert_close(
            optimizer.state[weight]["momentum_buffer"], expected, rtol=1e-6, atol=1e-8
        )
        assert adamw[0]["betas"] == (0.9, 0.95)
        scheduler.step()
    assert momenta == pytest.approx(
        [one_cycle(step, 0.95, 0.85, 0.95, STEPS) for step in range(STEPS - 1)]
    )
    assert all(group["momentum"] == muon[0]["momentum"] for group in muon)


# -----------------------------------------------------------------------------
# state_dict() / load_state_dict()


def test_state_dict_round_trip_continues_bit_identically():
    """Save after 3 steps (through torch.save, as a checkpoint file would), load into a fresh
    model and a fresh optimizer built with other hyperparameters, continue 3 steps: the same as
    never stopping.
    """
    model = tiny_lm()
    optimizer = one_optimizer(model, weight_decay=0.1)
    train(model, optimizer, 3)
    buffer = io.BytesIO()
    torch.save(dict(model=model.state_dict(), optimizer=optimizer.state_dict()), buffer)
    straight = train(model, optimizer, 3, first_step=3)

    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed_model = tiny_lm()
    resumed = one_optimizer(resumed_model, lr=0.5, adamw_lr=0.5)  # lrs come from the checkpoint
    resumed_model.load_state_dict(checkpoint["model"])
    resumed.load_state_dict(checkpoint["optimizer"])
    lrs = [group["lr"] for group in optimizer.param_groups]
    assert [group["lr"] for group in resumed.param_groups] == lrs
    assert train(resumed_model, resumed, 3, first_step=3) == straight
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)
        assert optimizer.state[p].keys() == resumed.state[q].keys()
        for key, value in optimizer.state[p].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(resumed.state[q][key])), key
    assert resumed.state[resumed_model[0].weight]["step"] == 6


# -----------------------------------------------------------------------------
# DCP: save on 2 FSDP2 ranks, load on 1 and on 3 (uneven shards), continue


def run_dcp_worker(world_size, *arguments):
    """--standalone: a free port, so that concurrent runs do not collide."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={world_size}", str(REPO / "tests" / "dcp_worker.py")]
    subprocess.run([*command, *map(str, arguments)], check=True, timeout=300, cwd=REPO)


@pytest.fixture(scope="module")
def dcp_checkpoint(tmp_path_factory):
    """2 ranks: 3 steps, dcp.save, then 3 more (the unbroken run) and their final parameters."""
    directory = tmp_path_factory.mktemp("dcp")
    run_dcp_worker(2, "save", directory / "checkpoint", directory / "unbroken.pt")
    return directory


@pytest.mark.parametrize("world_size", [1, 3])
def test_dcp_checkpoint_reshards_and_continues_like_the_unbroken_run(
    dcp_checkpoint, world_size, tmp_path
):
    """Loaded on 1 or 3 ranks, the optimizer state equals the saved one exactly (resharding moves
    numbers, it does not compute), and 3 more steps land where the unbroken 2-rank run did. Those
    steps differ from it only as sharded NorMuon differs from single-device (fsdp_worker.py: the
    order of float additions in the all-reduced norms and sums, ~1e-7 relative each step) and as
    FSDP2's gradient average of 3 equal numbers rounds; bound 1e-5 on each parameter's change since
    the checkpoint (measured 1.6e-7 on 1 rank, 4.1e-7 on 3)."""
    result = tmp_path / "resumed.pt"
    run_dcp_worker(world_size, "load", dcp_checkpoint / "checkpoint", result)
    unbroken = torch.load(dcp_checkpoint / "unbroken.pt", weights_only=True)
    resumed = torch.load(result, weights_only=True)
    assert resumed["loaded_state"].keys() == unbroken["saved_state"].keys()
    for key, value in unbroken["saved_state"].items():
        assert torch.equal(resumed["loaded_state"][key], value), key
    expected_rows = {1: [40], 3: [14, 14, 12]}[world_size]  # the shards changed (2 ranks: 20, 20)
    assert [rows["1.weight"] for rows in resumed["local_rows"]] == expected_rows
    for name, final in unbroken["params"].items():
        change = final - unbroken["params_at_checkpoint"][name]
        error = (resumed["params"][name] - final).norm() / change.norm()
        assert error < 1e-5, (name, error.item())
    assert resumed["losses"] == pytest.approx(unbroken["losses"], rel=1e-5)


# -----------------------------------------------------------------------------
# copy.deepcopy and pickle


def public_attributes(optimizer):
    return {key: value for key, value in vars(optimizer).items() if not key.startswith("_")}


@pytest.mark.parametrize("compile", [None, False, True])
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_deepcopy_and_pickle_keep_every_public_attribute(compile, how):
    model = tiny_lm()
    optimizer = one_optimizer(model, compile=compile)
    if compile is not True:  # compiling on the CPU takes long; compiled steps: test_normuon.py
        train(model, optimizer, 2)
    if how == "deepcopy":
        copied = copy.deepcopy(optimizer)
    else:
        copied = pickle.loads(pickle.dumps(optimizer))
    assert public_attributes(copied).keys() == public_attributes(optimizer).keys()
    assert copied.compile is compile
    for key, value in public_attributes(optimizer).items():  # compile, cuda_graph, ...
        if key not in ("defaults", "state", "param_groups"):
            assert public_attributes(copied)[key] == value, key
    # torch's Optimizer.__setstate__ adds differentiable=False to the defaults of any optimizer
    without_torch_default = {k: v for k, v in copied.defaults.items() if k != "differentiable"}
    assert without_torch_default == optimizer.defaults
    for group, copied_group in zip(optimizer.param_groups, copied.param_groups, strict=True):
        assert {**copied_group, "params": None} == {**group, "params": None}
        assert len(copied_group["params"]) == len(group["params"])


def test_deep_copy_steps_identically():
    model = tiny_lm()
    optimizer = one_optimizer(model, weight_decay=0.1)
    train(model, optimizer, 2)
    # One deepcopy of both: the copy's param groups and state refer to the copy's parameters.
    copied_model, copied = copy.deepcopy((model, optimizer))
    assert copied.param_groups[0]["params"][0] is copied_model[1].weight
    assert train(copied_model, copied, 3, first_step=2) == train(model, optimizer, 3, first_step=2)
    for p, q in zip(model.parameters(), copied_model.parameters()):
        assert torch.equal(p, q)
