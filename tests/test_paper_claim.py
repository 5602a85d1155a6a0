"""bench/paper_claim.py's protocol logic and statistics on synthetic results, and one tiny real run of its
training worker: seconds on a CPU."""

import dataclasses
import importlib.util
import json
import math
import random
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location("paper_claim", Path(__file__).resolve().parents[1] / "bench" / "paper_claim.py")
paper_claim = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(paper_claim)
Run = paper_claim.Run

BEST_LR = dict(adamw=paper_claim.grid_lr(1), muon=paper_claim.grid_lr(6), normuon=paper_claim.grid_lr(4))
FLOOR = dict(adamw=1.60, muon=1.43, normuon=1.41)


def synthetic_loss(run: Run) -> float:
    """A bowl in log(lr) around each optimizer's best lr, shorter schedules worse, a little seed noise;
    AdamW gains from a larger embedding lr and from clipping."""
    loss = FLOOR[run.optimizer] + 0.02 * math.log2(run.lr / BEST_LR[run.optimizer]) ** 2 + 0.3 * (1 - run.fraction)
    loss += 0.004 * random.Random(run.seed).gauss(0, 1)
    if run.optimizer == "adamw":
        loss -= 0.01 * (run.adamw_lr == 8e-3) + 0.005 * (run.grad_clip == 1.0)
    return loss


def write_result(runs_dir: Path, run: Run, loss: float) -> None:
    run_dir = runs_dir / run.name
    run_dir.mkdir(parents=True)
    every = paper_claim.PROTOCOL["eval_interval"]
    records = [dict(step=step, val_loss=loss + 0.5 * (1 - step / run.steps), training_seconds=step / 10)
               for step in range(every, run.steps + 1, every)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    status = "finished" if math.isfinite(loss) else "diverged"
    (run_dir / "result.json").write_text(json.dumps(dict(
        name=run.name, status=status, final_val_loss=loss if status == "finished" else None,
        tokens=run.steps * paper_claim.TOKENS_PER_STEP, wall_seconds=run.steps / 10)))


def complete_protocol(runs_dir: Path, phase="all", loss=synthetic_loss) -> list:
    """Run (synthetically) whatever the protocol asks for next until it asks for nothing; returns the order."""
    order = []
    while True:
        results = paper_claim.load_results(runs_dir)
        pending = [r for r in paper_claim.needed_runs(phase, results) if r.name not in results]
        if not pending:
            return order
        for run in pending:
            write_result(runs_dir, run, loss(run))
            order.append(run)


def test_t_quantiles():
    assert paper_claim.t_quantile_975(4) == 2.776
    assert paper_claim.t_quantile_975(31) == pytest.approx(2.040, abs=1e-3)
    assert paper_claim.t_quantile_975(1000) == pytest.approx(1.962, abs=1e-3)


def test_paired_difference_interval_and_verdicts():
    a = {1: 1.40, 2: 1.41, 3: 1.39, 4: 1.42, 5: 1.40}
    shifted = {s: v + 0.02 + 0.001 * s for s, v in a.items()}
    lower = paper_claim.paired_difference(a, shifted)
    differences = [-0.021, -0.022, -0.023, -0.024, -0.025]
    half = 2.776 * 0.0015811388 / math.sqrt(5)
    assert lower["mean"] == pytest.approx(-0.023)
    assert lower["ci95"] == pytest.approx([-0.023 - half, -0.023 + half])
    assert lower["per_seed"] == pytest.approx(differences) and lower["verdict"] == "first lower"
    assert paper_claim.paired_difference(shifted, a)["verdict"] == "second lower"
    noisy = {s: v + (0.01 if s % 2 else -0.01) for s, v in a.items()}
    assert paper_claim.paired_difference(a, noisy)["verdict"] == "not resolved"
    assert paper_claim.paired_difference({1: 1.0}, {1: 1.1})["ci95"] is None


def test_crossing_of_loss_vs_schedule_length():
    curve = [(0.5, 1.60), (0.8, 1.46), (0.9, 1.43), (1.0, 1.41)]
    assert paper_claim.crossing(curve, 1.42) == ("at", pytest.approx(0.95))
    assert paper_claim.crossing(curve, 1.70) == ("below_shortest", 0.5)
    assert paper_claim.crossing(curve, 1.40) == ("not_reached", None)


def test_grid_extends_outward_while_the_best_is_at_an_edge(tmp_path):
    complete_protocol(tmp_path, phase="tune")
    results = paper_claim.load_results(tmp_path)
    muon, complete = paper_claim.lr_grid("muon", results)
    assert complete and max(r.lr for r in muon) == paper_claim.grid_lr(7)  # best 6 was the initial top edge
    assert len(paper_claim.lr_grid("normuon", results)[0]) == 5  # best 4: interior, no extension
    assert min(r.lr for r in paper_claim.lr_grid("adamw", results)[0]) == paper_claim.grid_lr(0)


def test_grid_stops_at_a_diverged_edge_and_at_its_cap(tmp_path):
    def loss(run):  # NorMuon's loss keeps falling with lr until lr_8 diverges; Muon's keeps falling forever
        if run.optimizer == "normuon" and run.lr >= paper_claim.grid_lr(8):
            return math.inf
        return 2.0 - run.lr if run.optimizer != "adamw" else synthetic_loss(run)
    complete_protocol(tmp_path, phase="tune", loss=loss)
    results = paper_claim.load_results(tmp_path)
    _, best = paper_claim.tuning_plan(results)
    assert best["normuon"].lr == paper_claim.grid_lr(7)
    assert len(paper_claim.lr_grid("muon", results)[0]) == paper_claim.MAX_GRID_POINTS
    assert paper_claim.lr_at_edge(best["muon"], results)


def test_adamw_knobs_then_their_combination_are_tuned(tmp_path):
    order = complete_protocol(tmp_path, phase="tune")
    _, best = paper_claim.tuning_plan(paper_claim.load_results(tmp_path))
    assert (best["adamw"].lr, best["adamw"].adamw_lr, best["adamw"].grad_clip) == (BEST_LR["adamw"], 8e-3, 1.0)
    assert best["adamw"] in order and best["adamw"].warmup == paper_claim.DEFAULTS["warmup"]  # the combination
    assert all(run.seed == paper_claim.TUNE_SEED for run in order)
    assert best["muon"].adamw_lr == paper_claim.DEFAULTS["adamw_lr"]


def test_reporting_runs_use_each_optimizers_settings_and_other_seeds(tmp_path):
    complete_protocol(tmp_path, phase="tune")
    results = paper_claim.load_results(tmp_path)
    _, best = paper_claim.tuning_plan(results)
    report_runs = paper_claim.needed_runs("report", results)
    assert paper_claim.TUNE_SEED not in {run.seed for run in report_runs}
    assert len(report_runs) == 3 * len(paper_claim.SEEDS) + len(paper_claim.FRACTIONS) * len(paper_claim.SHORT_SEEDS)
    short = [run for run in report_runs if run.fraction < 1]
    assert all(run.optimizer == "normuon" and run.lr == best["normuon"].lr for run in short)
    assert {run.steps for run in short} == {900, 800, 500}
    assert {run.warmup_steps for run in short} == {45, 40, 25}  # the schedule is rescaled


def test_report_on_synthetic_results(tmp_path):
    complete_protocol(tmp_path)
    (tmp_path / "_invocations").mkdir()
    (tmp_path / "_invocations" / "1.json").write_text(json.dumps(dict(
        command="python bench/paper_claim.py run", device="GPU", torch="2.x", date="2026-01-01T00:00:00",
        wall_seconds=500.0, parameters=10_916_736, corpus_train_tokens=60_000_000, runs_ended=[], runs_killed=[])))
    table = paper_claim.report(tmp_path, tmp_path / "paper_claim")
    saved = json.loads((tmp_path / "paper_claim.json").read_text())
    assert (tmp_path / "paper_claim.png").stat().st_size > 0
    assert saved["seeds"] == [1, 2, 3, 4, 5] and saved["train_tokens"] == 32_768_000
    assert saved["ci95_normuon_minus_muon"] == pytest.approx(table["paired_differences"]["normuon_minus_muon"]["ci95"])
    assert saved["paired_differences"]["normuon_minus_muon"]["mean"] == pytest.approx(-0.02, abs=1e-9)
    assert saved["missing"] == []
    shortened = saved["steps_to_target"]["normuon_to_muon_final_shortened"]
    noise = {s: 0.004 * random.Random(s).gauss(0, 1) for s in paper_claim.SEEDS}  # as in synthetic_loss
    gap = 0.02 + statistics.mean(noise.values()) - statistics.mean(noise[s] for s in paper_claim.SHORT_SEEDS)
    assert shortened["result"] == "at" and shortened["length"] == pytest.approx(1 - gap / 0.3, abs=1e-9)
    assert saved["steps_to_target"]["normuon_to_adamw_final_shortened"]["result"] == "below_shortest"
    paper_metric = saved["steps_to_target"]["normuon_to_muon_final_paper_metric"]
    assert paper_metric["step"] == 1000  # the synthetic curves are 0.5 (1 - step/steps) above their final loss
    assert "NorMuon lower".lower() in saved["summary"][0].lower()


# -----------------------------------------------------------------------------
# Protocol v3: the plan, the statistics across sizes, the report, and one real (tiny) training run


def test_v3_plan_order_and_settings():
    plan = paper_claim.v3_plan("v3")
    large, small = paper_claim.LARGE, paper_claim.SMALL
    first = plan[:6]  # the larger size's Muon and NorMuon, seeds 1..3, before anything else
    assert [(r.size, r.optimizer, r.seed) for r in first] == [
        (large, o, s) for s in (1, 2, 3) for o in ("muon", "normuon")]
    assert [r.lr for r in first[:2]] == [paper_claim.grid_lr(5), paper_claim.grid_lr(4)]
    below = plan[6:8]
    assert [(r.optimizer, r.lr, r.seed) for r in below] == [
        ("muon", paper_claim.grid_lr(4), 1), ("normuon", paper_claim.grid_lr(3), 1)]
    control = plan[12]
    assert (control.size, control.optimizer, control.seed, control.rerun) == (small, "normuon", 1, True)
    assert control.name.endswith("-seed1-rerun") and control.lr == 4e-3
    assert len(plan) == len(set((r.size, r.name) for r in plan)) == 12 + 6 + 2 + 5
    assert {r.optimizer for r in plan[-5:]} == {"normuon_larger"} and plan[-1].size == large
    assert set(paper_claim.v3_plan("claim") + paper_claim.v3_plan("axis")) == set(plan)


def test_v3_run_flags():
    run = paper_claim.v3_plan("axis")[-1]  # NorMuon along the larger dimension, larger size
    flags = dict(zip(*[iter(run.flags(Path("runs")))] * 2))
    assert flags["--optimizer"] == "normuon" and run.neuron_axis() == "larger"
    assert flags["--preset"] == "code-26m" and flags["--max_steps"] == "2400" and flags["--warmup_steps"] == "120"
    assert run.tokens == 2400 * 128 * 256
    assert paper_claim.parameter_count(paper_claim.LARGE) == 25_567_744
    assert paper_claim.parameter_count(paper_claim.SMALL) == 10_916_736
    v2_run = Run("normuon", 4e-3, seed=1)  # v2's names are unchanged, so v3 finds v2's runs
    assert v2_run.name == "normuon-lr0.004-alr0.004-wu50-clip0-steps1000-seed1"


def test_welch_difference_of_two_paired_gaps():
    first = paper_claim.paired_difference({s: 1.0 - 0.01 * s for s in range(1, 6)}, {s: 1.0 for s in range(1, 6)})
    second = paper_claim.paired_difference({s: 1.0 + 0.002 * (-1) ** s for s in range(1, 6)},
                                           {s: 1.0 for s in range(1, 6)})
    change = paper_claim.welch_difference(first, second)
    v1, v2 = first["sd"] ** 2 / 5, second["sd"] ** 2 / 5
    df = (v1 + v2) ** 2 / (v1 ** 2 / 4 + v2 ** 2 / 4)
    half = paper_claim.t_quantile_975(math.floor(df)) * math.sqrt(v1 + v2)
    assert change["mean"] == pytest.approx(-0.03 + 0.0004)  # the second gap's mean is -0.0004
    assert change["df"] == pytest.approx(df) and change["ci95"] == pytest.approx(
        [change["mean"] - half, change["mean"] + half])
    assert change["verdict"] == "first lower"
    assert paper_claim.welch_difference(first, {"sd": None})["ci95"] is None


def v3_synthetic_loss(run: Run) -> float:
    """At v2's size v2's synthetic bowl (the control 0.001 above v2's run, the larger axis 0.003 below
    NorMuon); at the larger size each optimizer's own seed noise around 1.30, Muon's lr off its best."""
    if run.size == paper_claim.SMALL:
        normuon = synthetic_loss(dataclasses.replace(run, optimizer="normuon", rerun=False))
        return normuon + 0.001 if run.rerun else normuon - 0.003
    shift = {"muon": 0.0, "normuon": -0.02, "normuon_larger": -0.023}[run.optimizer]
    noise = 0.004 * random.Random(f"{run.optimizer} {run.seed}").gauss(0, 1)
    return 1.3 + shift + noise + 0.01 * abs(math.log2(run.lr / 4e-3))


def test_v3_report_on_synthetic_results(tmp_path, monkeypatch):
    monkeypatch.setattr(paper_claim, "RUNS_DIR", tmp_path / "v2")
    monkeypatch.setattr(paper_claim, "V3_DIR", tmp_path / "v3")
    complete_protocol(tmp_path / "v2")  # v2's runs at the smaller size
    for run in paper_claim.v3_plan("v3") + paper_claim.v3_plan("reruns"):
        write_result(tmp_path / "v3" / run.size, run, v3_synthetic_loss(run))
    (tmp_path / "v3" / "_invocations").mkdir()
    (tmp_path / "v3" / "_invocations" / "1.json").write_text(json.dumps(dict(
        command="python bench/paper_claim.py run --phase v3", device="GPU", torch="2.x",
        date="2026-01-01T00:00:00", wall_seconds=300.0, corpus_train_tokens=1, runs_ended=[], runs_killed=[])))
    table = paper_claim.report_v3(tmp_path / "paper_claim_v3")
    saved = json.loads((tmp_path / "paper_claim_v3.json").read_text())
    assert (tmp_path / "paper_claim_v3.png").stat().st_size > 0 and saved["missing"] == []
    large, small = (saved["sizes"][s] for s in (paper_claim.LARGE, paper_claim.SMALL))
    settings = paper_claim.v3_settings()
    per_seed = lambda o: [v3_synthetic_loss(dataclasses.replace(settings[paper_claim.LARGE, o], seed=s))
                          for s in paper_claim.SEEDS]
    gap = [n - m for n, m in zip(per_seed("normuon"), per_seed("muon"))]
    assert large["paired_differences"]["normuon_minus_muon"]["per_seed"] == pytest.approx(gap)
    assert small["paired_differences"]["normuon_larger_minus_normuon"]["mean"] == pytest.approx(-0.003)
    assert small["paired_differences"]["normuon_minus_muon"]["mean"] == pytest.approx(-0.02)  # v2's runs
    change = saved["gap_change_with_size"]["larger_minus_smaller"]
    assert change["mean"] == pytest.approx(statistics.mean(gap) + 0.02)
    assert saved["control"]["again_minus_v2"]["mean"] == pytest.approx(0.001)  # the code's shift
    assert saved["control"]["larger_minus_again"]["mean"] == pytest.approx(-0.004)  # within one code
    assert saved["control"]["larger_minus_again"]["n"] == len(paper_claim.SEEDS)
    assert saved["lr_check"]["normuon"]["check"] == "the reported lr ends lowest"
    assert saved["lr_check"]["muon"]["check"].startswith("lr 0.004 ends")  # its reported lr is 5.66e-3
    target = statistics.mean(per_seed("muon"))  # synthetic curves: 0.5 (1 - step / steps) above the final
    expected = next(step for step in range(50, 2401, 50)
                    if statistics.mean(per_seed("normuon")) + 0.5 * (1 - step / 2400) <= target)
    assert large["steps_to_target"]["normuon_to_muon_final"]["step"] == expected
    assert table["summary"][0].startswith(f"{paper_claim.SMALL} (10.9M parameters): NorMuon − Muon")


def test_tiny_training_runs_through_the_worker(tmp_path):
    """Two real 3-step runs of the tiny model through `paper_claim.py train`: NorMuon along the output axis and
    along the larger dimension (the MLP down-projection, 64 x 256, is wide): both finish, and they differ."""
    corpus = tmp_path / "corpus.txt"
    paper_claim.write_tiny_corpus(corpus)
    finals = {}
    for axis in ("output", "larger"):
        flags = ["--preset", "tiny", "--data", str(corpus), "--seq_len", "32", "--batch_size", "4", "--max_steps",
                 "3", "--warmup_steps", "1", "--eval_interval", "3", "--eval_batches", "1", "--log_interval", "1",
                 "--checkpoint_interval", "3", "--sample_tokens", "0", "--grad_clip", "0", "--lr", "0.02",
                 "--adamw_lr", "0.004", "--seed", "1", "--optimizer", "normuon", "--device", "cpu",
                 "--run_name", axis, "--out_dir", str(tmp_path)]
        command = [sys.executable, str(paper_claim.Path(paper_claim.__file__)), "train", "--neuron_axis", axis]
        subprocess.run(command + flags, check=True, capture_output=True, cwd=paper_claim.ROOT)
        records = paper_claim.read_metrics(tmp_path / axis)
        assert [r["step"] for r in records] == [1, 2, 3] and math.isfinite(records[-1]["val_loss"])
        finals[axis] = records[-1]["val_loss"]
    assert finals["output"] != finals["larger"]
