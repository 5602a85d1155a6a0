"""The paper's training-efficiency claim at small scale: NorMuon vs Muon vs AdamW on one GPU.

    python bench/paper_claim.py run --phase v3 --deadline_minutes 7   # resumable, deadline-driven
    python bench/paper_claim.py pack results.tar     # the finished runs (and each `run`'s record)
    python bench/paper_claim.py unpack results.tar   # merge them back into bench/results/
    python bench/paper_claim.py report               # v2's and v3's JSON and plots, from metrics

`run` starts training processes side by side on the GPU (--parallel), only those it expects to
finish before the deadline (from the speed measured so far), skips runs already finished, stops the
lowest-priority runs when the measured speed says not all running ones can finish, and at the
deadline kills and discards unfinished ones. Phases: v2's tune, report and all (10.9M model,
bench/results/paper_claim/); v3's claim, axis and v3 (both, in that order;
bench/results/paper_claim_v3/). Each training process is `paper_claim.py train`: train_gpt.py's own
run, with two things its flags cannot say set in that process first: a model shape that is no
preset, and NorMuon's neuron_axis. PAPER_CLAIM_TINY=1 shrinks everything (tiny models, 40-60 steps,
a text file of Python's own sources, results under out/) to check the whole pipeline on a CPU in
minutes.

Protocol v3, fixed before its first run
---------------------------------------
Questions: (1) scale: is NorMuon − Muon more negative for a model 2.3x larger than v2's, at the same
tokens per parameter, data and schedule shape? (2) axis: does NorMuon with its second moment along
each matrix's larger dimension (modded-nanogpt, nanochat: `neuron_axis="larger"`) end lower or
higher than the paper's one per output neuron? In this GPT only the MLP down-projections (512 x
2048, wide) differ between the two; every other hidden matrix is square or tall, so both keep one
number per row there.

- Sizes: v2's 10.9M model (its finished runs reused: same data, flags and seeds) and 25.6M
  parameters: 8 layers, 8 heads, width 512, context 256 (the largest model whose paired runs fit the
  GPU time at hand: cost grows as the square of the size at fixed tokens per parameter). 25.6M: 2400
  steps of 128 x 256 tokens = 78.6M tokens (3.07 per parameter; v2: 3.00), single pass (133.4M
  training tokens); validation every 120 steps (20 times, as v2) on v2's 10 batches; everything else
  as v2 (warmup 5%, linear decay to 0, weight decay 0.1, AdamW at 4e-3 on embeddings, head and
  norms, bf16 autocast, no compile). NorMuon's element-wise stages run eagerly (compile=False), as
  in v2, so that new 10.9M runs pair with v2's.
- Learning rates, fixed before any 25.6M run: v2's tuned lrs scaled by sqrt(384/512) = 0.87 (holding
  the update's spectral norm fixed as the width grows: the RMS-matched update of an m x n matrix has
  spectral norm 0.2·lr·sqrt(max(m, n))) and rounded to the nearest point of v2's √2 grid, which is
  v2's own point: Muon 5.66e-3 (k = 5), NorMuon 4e-3 (k = 4); NorMuon along the larger dimension
  takes NorMuon's lr at both sizes (its update RMS is the same 0.2·lr). v2's rule (tune on seed 0,
  then 5 seeds) needs a second round of runs at 25.6M that does not fit, so instead the lr is
  checked, not chosen: at seed 1, each of Muon and NorMuon also runs one grid point below (k − 1,
  the direction the scaling predicts) and then one above (k + 1). The verdict is stated at the fixed
  lrs; if a bracket point ends lower than the reported lr at seed 1, the report says so next to it.
- Reporting: seeds 1..5 at each optimizer's lr, paired by seed (same init and data order). At 10.9M
  the new runs are NorMuon along the larger dimension at v2's NorMuon settings, seeds 1..5, and one
  control: v2's NorMuon seed 1 run again with the current code (its difference from v2's result says
  whether new runs pair with v2's).
- Reported (bench/results/paper_claim_v3.json, .png): per size, final validation loss (per seed,
  mean, range); paired NorMuon − Muon, NorMuon(larger) − NorMuon, NorMuon(larger) − Muon with 95% t
  intervals and v2's verdict rule ("not resolved" with its bound); the change of NorMuon − Muon from
  10.9M to 25.6M with a Welch 95% interval (sizes are not paired); steps to a reference's seed-mean
  final loss by the paper's metric (first evaluation of the seed-mean curve at or below it): each
  orthogonalizing optimizer to Muon's final loss at both sizes, to AdamW's at 10.9M; the lr bracket;
  the control. A plot of the gaps against size.
- Cuts, decided now for the GPU time at hand (about 13 minutes on one H200 in two calls): no AdamW,
  no lr grid and no shortened schedules at 25.6M (so no steps to AdamW's loss there, and the
  steps-to-target is the paper's metric alone); the larger-dimension variant is not tuned. Runs
  start in this priority order and whatever does not fit is missing (listed in the report): 25.6M
  Muon and NorMuon seeds 1..3; their k − 1 points; seeds 4, 5; their k + 1 points (phase claim);
  then the 10.9M control and larger-dimension seeds 1..5; then 25.6M larger-dimension seeds 1..5
  (phase axis). Amended before the second call (phase v3): the 10.9M control and larger-dimension
  runs (together 1.1 25.6M runs) go before the k + 1 points, since the time left holds about 8 25.6M
  runs and the remaining claim runs take 7; the order of everything else is unchanged. Amended
  after the third call (phase axis: the 10.9M control and larger-dimension seeds 1..5), because the
  control ended 0.0056 above v2's run of the same seed: phase reruns makes v2's NorMuon seeds 2..5
  again with the current code, and the axis is also reported within one code (larger dimension
  minus the re-runs, paired by seed), next to how far the re-runs moved from v2's (same seeds). A 25.6M run
  costs 1.33e16 FLOPs (evaluation included), 5.3x a 10.9M run; at the ~150 TFLOP/s v2's packing
  reached, 89 s of the whole GPU: about 8 fit in a 7-minute call.

Protocol v2, fixed before its first run
---------------------------------------
Question: does NorMuon reach a lower validation loss than Muon, and than AdamW, in the same number
of steps, and how many fewer steps does it need to reach their final loss?

- Data: the byte-token code corpus (`--data data/code/`, vocabulary 256, made by
  bench/prepare_corpus.py; whole packages held out for validation). Training sequences in a shuffled
  order that depends on the seed, each token at most once (a single pass: `run` checks that the
  training split holds more tokens than a run reads). The same validation batches for every run and
  every evaluation.
- Model: train_gpt.py's `shakespeare-10m` preset (6 layers, 6 heads, width 384, context 256): 10.9M
  parameters with a 256-byte vocabulary. bf16 autocast, no compile.
- Schedule: 1000 steps of 128 x 256 = 32,768 tokens: 32.8M training tokens (3.0 per parameter).
  Linear warmup over 5% of the steps, then linear decay to 0 (the paper's schedule). Validation
  every 50 steps on the same 10 batches (328k tokens) of held-out text.
- Optimizers: AdamW, Muon or NorMuon train the hidden matrices with weight decay 0.1; AdamW (betas
  0.9, 0.95) trains embeddings, output head and norms at lr 4e-3, no weight decay. Muon and NorMuon
  scale their update to RMS 0.2·lr, so one √2-spaced grid of the hidden-matrix lr serves all three:
  lr_k = 1e-3 · 2^(k/2).
- Tuning, on seed 0, which is not a reporting seed:
  * lr grid: AdamW k = 0..4 (1e-3 .. 4e-3), Muon and NorMuon k = 2..6 (2e-3 .. 8e-3), centred on
    v1's best. While the best lr is at an edge of the finished grid, the next √2 point outward is
    added (at most 8 points).
  * AdamW gets a fair chance: at its best grid lr, one knob at a time, embedding/head lr
    (--adamw_lr) 2e-3 and 8e-3, warmup 2% and 10%, gradient clipping (--grad_clip, max global norm)
    1.0 and 0.25 (default: off). If the best value of two or more knobs differs from the default,
    their combination is run too. Muon and NorMuon keep the defaults.
  * Each optimizer's reporting settings: its tuning run with the lowest final validation loss (a run
    whose training loss turns non-finite, or whose final validation loss is non-finite, counts as
    diverged: +inf).
- Reporting: seeds 1..5 for each optimizer at its settings (paired by seed: the same initialization
  and data order for the three optimizers). NorMuon also runs shortened schedules: 0.9x, 0.8x and
  0.5x the steps (same lr, warmup and decay rescaled to the shorter run) on seeds 1..3.
- Reported (bench/results/paper_claim.json): final validation loss per optimizer (per seed, mean,
  range, sd); paired differences NorMuon − Muon, NorMuon − AdamW, Muon − AdamW with 95% t intervals
  over the 5 seeds. Verdict on NorMuon vs Muon: "NorMuon lower" if the interval of NorMuon − Muon
  lies below 0, "Muon lower" if above, else "not resolved" (the interval then bounds any
  difference); the same rule for AdamW's gap. Steps to target, two ways: (a) the paper's metric: the
  first evaluated step at which the seed-mean validation curve of NorMuon (or Muon) is at or below
  the reference's (AdamW's or Muon's) seed-mean final loss; (b) from the shortened schedules: the
  schedule length at which NorMuon's seed-mean final loss (seeds 1..3, full length included) crosses
  the reference's final loss, interpolated linearly between neighbouring lengths; "not reached" if
  even the full schedule ends above it, "<= 0.5x" if the shortest run is already below it.
- Compute, sized for two `run` calls of 8 minutes on one H100 (several runs sharing the GPU): the
  10M model at 8k tokens per step ran at 0.61M tokens/s in one process, launch-bound (4% MFU); at
  32k tokens per step with 8 processes sharing the GPU we expect about 2.2M tokens/s together (~16%
  MFU: matmuls ~6 ms, unfused element-wise work ~6 ms and the optimizer's small kernels ~3 ms per
  32k-token step). Runs: tuning 15 grid + 6 AdamW knobs + 1 combination + 0-3 grid extensions =
  22-25; reporting 15 + 3 x (0.9 + 0.8 + 0.5) = 21.6 run-equivalents; total ~45 x 32.8M = 1.5B
  tokens, +7% evaluation = 1.6B tokens = ~730 s at 2.2M tokens/s, of the ~900 s two blocks give
  after start-up and the last partly filled round: 20% to spare if throughput is lower. 10 tokens
  per parameter (109M tokens per run) would need 3.3x as much GPU time, so it is not done; neither
  is a second model size. Runs start in priority order (tuning, with AdamW's longer chain of
  dependent runs first; reporting seeds; NorMuon at 0.9x, 0.8x, 0.5x), so if time runs out the last
  of these are missing, and the report lists them. Training time in the metrics is wall time while
  sharing the GPU.

History
-------
- v3: written down before its first run, after v2's results (bench/results/paper_claim.json). Ran
  on one H200 (torch 2.11.0+cu130, 2026-12-01) in six calls, 1541 s in all: `run --phase claim`
  (333 s; train_gpt.py and normuon.py of commit 692e31d): 25.6M Muon seeds 1-3 and NorMuon seeds
  1-2; `run --phase v3` (356 s; train_gpt.py of 692e31d with normuon.py of 6461d26, through
  two_lists): NorMuon seed 3, both k - 1 points, both optimizers' seed 4. Five 25.6M processes
  sharing the GPU ran at 1.8M tokens/s together (~290 TFLOP/s of model FLOPs), 187-200 TFLOP/s over
  each call with start-up and the last round, so 5 runs fitted per call, not the 8 estimated. Then
  `run --phase axis` (124 s): the 10.9M control and larger-dimension seeds 1-5; `run --phase reruns`
  (93 s): v2's NorMuon seeds 2-5 again (the amendment above); `run --phase v3 --parallel 9` (462 s):
  both optimizers' seed 5, both k + 1 points, 25.6M larger-dimension seeds 1-3 (seed 4 started and
  was stopped); `run --phase v3 --parallel 2` (174 s): 25.6M larger-dimension seeds 4 and 5. These
  four calls record no source commit. With them every run of the plan finished (none missing). A
  separate invocation ran both 25.6M seed-5 runs again (bench/results/paper_claim_v3/rerun_seed5.log,
  not merged): Muon 0.9109 and NorMuon 0.9090 against the saved 0.9097 and 0.9104, so one run
  repeats to about 0.001; the report uses the saved runs.
- v2: written down before its first run, after v1's results had been rechecked.
- v1 (this script before protocol v2): Shakespeare bytes, 4.73M training tokens read front to back
  in the same order for every seed; 1000 steps of 64 x 256 tokens (3.5 passes), then 32 x 256 (1.73
  passes, "v1.5"); lr grid in steps of 2x chosen on seed 1337, which was also one of the 3 reported
  seeds; only AdamW's hidden-matrix lr tuned. Its results were removed from the tree (they are in
  the git history); v2 replaces them.
"""

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TINY = os.environ.get("PAPER_CLAIM_TINY") == "1"
OPTIMIZERS = ("adamw", "muon", "normuon")
NAMES = dict(adamw="AdamW", muon="Muon", normuon="NorMuon", normuon_larger="NorMuon (larger dim.)")
TUNE_SEED, SEEDS, SHORT_SEEDS = 0, (1, 2, 3, 4, 5), (1, 2, 3)
FRACTIONS = (0.9, 0.8, 0.5)  # shortened NorMuon schedules, in the order they are run
MAX_GRID_POINTS = 8
DEFAULTS = dict(adamw_lr=4e-3, warmup=0.05, grad_clip=0.0)
ADAMW_KNOBS = dict(adamw_lr=(2e-3, 8e-3), warmup=(0.02, 0.10), grad_clip=(1.0, 0.25))
if TINY:  # the same pipeline in minutes on a CPU: nothing here is a result
    INITIAL_GRID = dict(adamw=(2, 1, 3), muon=(4, 3, 5), normuon=(4, 3, 5))
    PROTOCOL = dict(preset="tiny", data=str(ROOT / "out" / "paper_claim_tiny.txt"), seq_len=64, batch_size=8,
                    max_steps=40, eval_interval=10, eval_batches=2, weight_decay=0.1)
    RUNS_DIR, REPORT = ROOT / "out" / "paper_claim_tiny", ROOT / "out" / "paper_claim_tiny"
    MODELS = {"tiny-wide": dict(n_layer=4, n_head=4, n_embd=96, block_size=64)}
    SIZES = {"tiny": PROTOCOL, "tiny-wide": dict(PROTOCOL, preset="tiny-wide", max_steps=60, eval_interval=15)}
    V3_DIR = ROOT / "out" / "paper_claim_v3_tiny"
    V3_GRID = dict(muon=4, normuon=4, normuon_larger=4)
else:
    INITIAL_GRID = dict(adamw=(2, 1, 3, 0, 4), muon=(4, 3, 5, 2, 6), normuon=(4, 3, 5, 2, 6))  # centre first
    PROTOCOL = dict(preset="shakespeare-10m", data="data/code/", seq_len=256, batch_size=128, max_steps=1000,
                    eval_interval=50, eval_batches=10, weight_decay=0.1)
    RUNS_DIR, REPORT = ROOT / "bench" / "results" / "paper_claim", ROOT / "bench" / "results" / "paper_claim"
    MODELS = {"code-26m": dict(n_layer=8, n_head=8, n_embd=512, block_size=256)}  # presets train_gpt.py lacks
    SIZES = {"10.9m": PROTOCOL, "25.6m": dict(PROTOCOL, preset="code-26m", max_steps=2400, eval_interval=120)}
    V3_DIR = ROOT / "bench" / "results" / "paper_claim_v3"
    V3_GRID = dict(muon=5, normuon=4, normuon_larger=4)  # v2's tuned points, fixed for the larger size
SMALL, LARGE = SIZES  # v2's size, v3's larger one
TOKENS_PER_STEP = PROTOCOL["batch_size"] * PROTOCOL["seq_len"]
TRAIN_TOKENS = PROTOCOL["max_steps"] * TOKENS_PER_STEP
REQUIRED_FLAGS = ("preset", "data", "seq_len", "batch_size", "max_steps", "warmup_steps", "optimizer", "lr",
                  "adamw_lr", "weight_decay", "grad_clip", "seed", "eval_interval", "eval_batches", "log_interval",
                  "checkpoint_interval", "sample_tokens", "run_name", "out_dir")
DIVERGED = re.compile(r"training loss is (nan|inf|-inf)", re.IGNORECASE)
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def grid_lr(k: int) -> float:
    return float(f"{1e-3 * 2 ** (k / 2):.4g}")


def grid_index(lr: float) -> int:
    return round(2 * math.log2(lr / 1e-3))


# -----------------------------------------------------------------------------
# Runs and what the protocol needs next


@dataclass(frozen=True)
class Run:
    optimizer: str  # adamw, muon, normuon, or normuon_larger (NorMuon with neuron_axis="larger")
    lr: float
    seed: int = TUNE_SEED
    adamw_lr: float = DEFAULTS["adamw_lr"]
    warmup: float = DEFAULTS["warmup"]  # fraction of the run's steps
    grad_clip: float = DEFAULTS["grad_clip"]
    fraction: float = 1.0  # schedule length, relative to the protocol's
    size: str = SMALL  # a key of SIZES: the model and its schedule
    rerun: bool = False  # the same run again (a control), in a directory of its own

    @property
    def protocol(self) -> dict:
        return SIZES[self.size]

    @property
    def steps(self) -> int:
        return round(self.fraction * self.protocol["max_steps"])

    @property
    def warmup_steps(self) -> int:
        return max(1, round(self.warmup * self.steps))

    @property
    def name(self) -> str:
        return (f"{self.optimizer}-lr{self.lr:g}-alr{self.adamw_lr:g}-wu{self.warmup_steps}-clip{self.grad_clip:g}"
                f"-steps{self.steps}-seed{self.seed}" + ("-rerun" if self.rerun else ""))

    @property
    def tokens(self) -> int:
        return self.steps * self.protocol["batch_size"] * self.protocol["seq_len"]

    def flags(self, out_dir: Path) -> list:
        protocol = self.protocol
        values = dict(protocol, optimizer=self.optimizer.replace("_larger", ""), lr=self.lr, adamw_lr=self.adamw_lr,
                      grad_clip=self.grad_clip, max_steps=self.steps, warmup_steps=self.warmup_steps, seed=self.seed,
                      log_interval=max(1, protocol["eval_interval"] // 5), checkpoint_interval=self.steps,
                      sample_tokens=0, run_name=self.name, out_dir=out_dir)
        return [item for name, value in values.items() for item in (f"--{name}", str(value))]

    def neuron_axis(self) -> str:
        return "larger" if self.optimizer == "normuon_larger" else "output"


def final_loss(results: dict, run: Run):
    """A finished run's final validation loss, inf if it diverged, None if it has not run."""
    result = results.get(run.name)
    return None if result is None else (result["final_val_loss"] if result["status"] == "finished" else math.inf)


def lr_grid(optimizer: str, results: dict) -> tuple:
    """(the grid's runs, whether it is complete): the initial grid, extended outward while its best is at an edge."""
    ks = sorted(INITIAL_GRID[optimizer])
    while True:
        runs = [Run(optimizer, grid_lr(k)) for k in ks]
        losses = [final_loss(results, run) for run in runs]
        if None in losses:
            return runs, False
        best = ks[losses.index(min(losses))]
        if len(ks) < MAX_GRID_POINTS and best == ks[0]:
            ks.insert(0, ks[0] - 1)
        elif len(ks) < MAX_GRID_POINTS and best == ks[-1]:
            ks.append(ks[-1] + 1)
        else:
            return runs, True


def knob_runs(centre: Run) -> list:
    """AdamW's other settings, one at a time, at its best grid lr."""
    return [dataclasses.replace(centre, **{knob: value}) for knob, values in ADAMW_KNOBS.items() for value in values]


def combined_run(centre: Run, knobs: list, results: dict) -> Run:
    """The best value of each knob together (the centre itself if no knob helped)."""
    best = {}
    for knob in ADAMW_KNOBS:
        tried = [centre] + [run for run in knobs if getattr(run, knob) != getattr(centre, knob)]
        best[knob] = getattr(min(tried, key=lambda run: final_loss(results, run)), knob)
    return dataclasses.replace(centre, **best)


def tuning_plan(results: dict) -> tuple:
    """(the tuning runs needed so far, in priority order; each optimizer's settings once its tuning is complete).
    Runs that depend on earlier results (grid extensions, AdamW's knobs) come first: their chain is the longest."""
    ranked, best = [], {}
    for index, optimizer in enumerate(OPTIMIZERS):
        grid, complete = lr_grid(optimizer, results)
        initial = INITIAL_GRID[optimizer]
        for run in grid:
            k = grid_index(run.lr)
            rank = (1, optimizer != "adamw", initial.index(k), index) if k in initial else (0,)
            ranked.append((rank, run))
        if not complete:
            continue
        candidates = list(grid)
        if optimizer == "adamw":
            centre = min(grid, key=lambda run: final_loss(results, run))
            knobs = knob_runs(centre)
            ranked += [((0,), run) for run in knobs]
            candidates += knobs
            if any(final_loss(results, run) is None for run in knobs):
                continue
            combined = combined_run(centre, knobs, results)
            if combined not in candidates:
                ranked.append(((0,), combined))
                candidates.append(combined)
                if final_loss(results, combined) is None:
                    continue
        best[optimizer] = min(candidates, key=lambda run: final_loss(results, run))
    return [run for _, run in sorted(ranked, key=lambda pair: pair[0])], best


def reporting_plan(best: dict) -> list:
    """Seeds 1..5 of each tuned optimizer (by seed), then NorMuon's shortened schedules."""
    runs = [dataclasses.replace(best[o], seed=seed) for seed in SEEDS for o in OPTIMIZERS if o in best]
    if "normuon" in best:
        runs += [dataclasses.replace(best["normuon"], seed=seed, fraction=fraction)
                 for fraction in FRACTIONS for seed in SHORT_SEEDS]
    return runs


def needed_runs(phase: str, results: dict) -> list:
    tuning, best = tuning_plan(results)
    return (tuning if phase in ("tune", "all") else []) + (reporting_plan(best) if phase in ("report", "all") else [])


def v3_settings() -> dict:
    """Protocol v3's reporting settings per (size, optimizer), all fixed in advance: at v2's size, v2's tuned
    settings for NorMuon (and its larger-dimension variant); at the larger size, V3_GRID's lrs."""
    small = Run("normuon", grid_lr(V3_GRID["normuon"]))
    settings = {(SMALL, "normuon_larger"): dataclasses.replace(small, optimizer="normuon_larger")}
    settings.update({(LARGE, o): Run(o, grid_lr(k), size=LARGE) for o, k in V3_GRID.items()})
    return settings


def v3_bracket(where: int) -> list:
    """The lr check at the larger size, seed 1: one √2 grid point below (where = -1) or above (+1)."""
    return [Run(o, grid_lr(V3_GRID[o] + where), seed=SEEDS[0], size=LARGE) for o in ("muon", "normuon")]


def v3_plan(phase: str) -> list:
    """Protocol v3's runs in priority order (see the docstring): phase claim (the larger size's Muon and NorMuon
    with the lr check), axis (the larger-dimension variant at both sizes), or v3 (both, as amended)."""
    settings = v3_settings()
    seeds = lambda optimizers, size, chosen: [dataclasses.replace(settings[size, o], seed=s)
                                              for s in chosen for o in optimizers]
    claim = (seeds(("muon", "normuon"), LARGE, SEEDS[:3]) + v3_bracket(-1)
             + seeds(("muon", "normuon"), LARGE, SEEDS[3:]))
    control = dataclasses.replace(settings[SMALL, "normuon_larger"], optimizer="normuon", seed=SEEDS[0], rerun=True)
    axis_small = [control] + seeds(["normuon_larger"], SMALL, SEEDS)
    axis_large = seeds(["normuon_larger"], LARGE, SEEDS)
    # Amended after the control (seed 1 again with the current code) ended 0.0056 above v2's run: the
    # other seeds of NorMuon again with the current code, so that the axis is compared within one code.
    reruns = [dataclasses.replace(control, seed=s) for s in SEEDS[1:]]
    return dict(claim=claim + v3_bracket(+1), axis=axis_small + axis_large, reruns=reruns,
                v3=claim + axis_small + v3_bracket(+1) + axis_large)[phase]


def v3_results() -> dict:
    """{size: {run name: result}}: v3's runs, and at v2's size v2's runs as well."""
    results = {size: load_results(V3_DIR / size) for size in SIZES}
    results[SMALL] = {**load_results(RUNS_DIR), **results[SMALL]}
    return results


# -----------------------------------------------------------------------------
# Running: train_gpt.py processes sharing the GPU, against a deadline


def load_results(runs_dir: Path) -> dict:
    return {path.parent.name: json.loads(path.read_text()) for path in runs_dir.glob("*/result.json")}


def environment() -> dict:
    import torch
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.processor() or 'cpu'})"
    return dict(device=device, gpus=torch.cuda.device_count(), torch=torch.__version__,
                python=platform.python_version(), source_commit=os.environ.get("SOURCE_COMMIT"))


def model_config(size: str):
    """The GPTConfig of a size: a train_gpt.py preset, or one of MODELS."""
    import train_gpt
    preset = SIZES[size]["preset"]
    config = train_gpt.GPTConfig(**MODELS[preset]) if preset in MODELS else train_gpt.PRESETS[preset]
    return dataclasses.replace(config, vocab_size=256, block_size=SIZES[size]["seq_len"])


def parameter_count(size: str) -> int:
    import torch
    import train_gpt
    with torch.device("meta"):
        return sum(p.numel() for p in train_gpt.GPT(model_config(size)).parameters())


def run_flops(run: Run) -> float:
    """Training FLOPs of a run plus its evaluations (forward only: a third of training's per token)."""
    protocol = run.protocol
    evaluations = run.steps // protocol["eval_interval"] + 1
    eval_tokens = evaluations * protocol["eval_batches"] * protocol["batch_size"] * protocol["seq_len"]
    return model_config(run.size).flops_per_token() * (run.tokens + eval_tokens / 3)


def preflight() -> dict:
    """Fail before any run if train_gpt.py lacks a flag the protocol uses, or the data cannot give a single pass."""
    help_text = subprocess.run([sys.executable, str(ROOT / "train_gpt.py"), "--help"], capture_output=True,
                               text=True, cwd=ROOT).stdout
    missing = [name for name in REQUIRED_FLAGS if f"--{name}" not in help_text]
    if missing:
        sys.exit(f"error: train_gpt.py has no {', '.join('--' + m for m in missing)} flag; the protocol needs it.")
    if TINY and not Path(PROTOCOL["data"]).exists():
        write_tiny_corpus(Path(PROTOCOL["data"]))
    import torch
    import train_gpt
    try:
        data = train_gpt.load_data(str(ROOT / PROTOCOL["data"]))
    except train_gpt.UserError as error:
        sys.exit(f"error: {error}" + ("" if TINY else "\n(make the corpus first: python bench/prepare_corpus.py)"))
    train_tokens, val_tokens = sum(map(len, data.train)), sum(map(len, data.val))
    if data.vocab_size != 256:
        sys.exit(f"error: {PROTOCOL['data']} loads with vocabulary {data.vocab_size}; the protocol needs bytes (256).")
    # a 10% train/val split of the tiny text file is fine; the real corpus must hold a whole run
    longest = max(Run("muon", 1e-3, size=size).tokens for size in SIZES)
    if train_tokens < longest and not TINY:
        sys.exit(f"error: {PROTOCOL['data']} has {train_tokens:,} training tokens; a run reads {longest:,} "
                 "(single pass required).")
    if not TINY and not torch.cuda.is_available():
        sys.exit("error: no CUDA GPU; the full protocol is sized for one H100 (PAPER_CLAIM_TINY=1 for a CPU check).")
    return dict(environment(), parameters=parameter_count(SMALL),
                parameters_by_size={size: parameter_count(size) for size in SIZES},
                corpus_train_tokens=train_tokens, corpus_val_tokens=val_tokens)


def write_tiny_corpus(path: Path) -> None:
    """~1.5 MB of Python's standard library sources: a small code corpus that needs no network."""
    sources = sorted(Path(os.__file__).parent.glob("*.py"))
    text, size = [], 0
    for source in sources:
        text.append(source.read_bytes())
        size += len(text[-1])
        if size > 1_500_000:
            break
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\n".join(text))


@dataclass
class Active:
    run: Run
    process: subprocess.Popen
    run_dir: Path
    log: Path
    launched: float
    flops: float  # the whole run's, evaluations included


def launch(run: Run, runs_dir: Path, slot: int, parallel: int, gpus: int) -> Active:
    shutil.rmtree(runs_dir / run.name, ignore_errors=True)
    runs_dir.mkdir(parents=True, exist_ok=True)
    log = runs_dir / f"{run.name}.log"  # moved into the run directory when it ends
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // parallel)))
    if gpus > 1:
        env["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
    command = [sys.executable, str(Path(__file__).resolve()), "train", "--neuron_axis", run.neuron_axis(),
               *run.flags(runs_dir)]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                               start_new_session=True)
    print(f"{time.strftime('%H:%M:%S')} start  {run.size} {run.name}", flush=True)
    return Active(run, process, runs_dir / run.name, log, time.monotonic(), run_flops(run))


def train_worker(argv: list) -> None:
    """One training run: train_gpt.py's main() on argv, after setting in this process what its flags cannot
    say: MODELS as presets, and NorMuon's neuron_axis (--neuron_axis output|larger, first in argv), with its
    element-wise stages eager (compile=False) as in protocol v2."""
    import functools
    import inspect

    import normuon
    import train_gpt
    parser = argparse.ArgumentParser(prog="paper_claim.py train")
    parser.add_argument("--neuron_axis", choices=("output", "larger"), default="output")
    args, flags = parser.parse_known_args(argv)
    options = dict(compile=False) if args.neuron_axis == "output" else dict(compile=False, neuron_axis="larger")
    train_gpt.NorMuon = functools.partial(normuon.NorMuon, **options)
    if hasattr(train_gpt, "build_optimizers") and "adamw_lr" in inspect.signature(normuon.split_parameters).parameters:
        train_gpt.split_parameters = two_lists  # train_gpt.py of before the one-optimizer API, normuon.py after
    train_gpt.PRESETS.update({name: train_gpt.GPTConfig(**shape) for name, shape in MODELS.items()})
    check_config = train_gpt.check_config  # its preset check knows train_gpt's own presets only
    train_gpt.check_config = lambda config, world_size: check_config(
        dataclasses.replace(config, preset="tiny") if config.preset in MODELS else config, world_size)
    sys.argv = [str(ROOT / "train_gpt.py"), *flags]
    train_gpt.main()


def two_lists(model, exclude=()) -> tuple:
    """normuon.split_parameters' groups as (NorMuon's groups, AdamW's parameters): the form train_gpt.py took
    before the one-optimizer API (commit 692e31d), for runs of that train_gpt.py with a later normuon.py."""
    import normuon
    groups = normuon.split_parameters(model, exclude=exclude)
    return ([g for g in groups if g["use_muon"]],
            [p for g in groups if not g["use_muon"] for p in g["params"]])


def read_metrics(run_dir: Path) -> list:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def finish(active: Active, info: dict) -> dict:
    """Record an ended run: finished, or diverged (non-finite training or final validation loss); raise otherwise."""
    run, run_dir, text = active.run, active.run_dir, active.log.read_text(errors="replace")
    records = read_metrics(run_dir)
    if active.process.returncode != 0 and not DIVERGED.search(text):
        tail = "\n".join(text.splitlines()[-15:])
        raise RuntimeError(f"{run.name} failed (exit code {active.process.returncode}); its log ends:\n{tail}")
    if active.process.returncode == 0 and not (records and records[-1]["step"] == run.steps
                                               and "val_loss" in records[-1]):
        raise RuntimeError(f"{run.name} exited without its final validation loss in {run_dir}/metrics.jsonl")
    final = records[-1].get("val_loss", math.nan) if active.process.returncode == 0 else math.nan
    run_dir.mkdir(exist_ok=True)
    shutil.move(active.log, run_dir / "run.log")
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # ~130 MB each, not needed for the report
    result = dict(name=run.name, settings=dataclasses.asdict(run), steps=run.steps, warmup_steps=run.warmup_steps,
                  tokens=run.tokens, status="finished" if math.isfinite(final) else "diverged",
                  final_val_loss=final if math.isfinite(final) else None,
                  wall_seconds=time.monotonic() - active.launched, **info)
    (run_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{time.strftime('%H:%M:%S')} {result['status']:8s} {run.size} {run.name}: final val loss {final:.4f}, "
          f"{result['wall_seconds']:.0f} s", flush=True)
    return result


def stop(active: Active, why: str = "unfinished") -> None:
    """Kill a run (its whole process group) and discard what it wrote."""
    if active.process.poll() is None:
        os.killpg(active.process.pid, signal.SIGKILL)
    active.process.wait()
    shutil.rmtree(active.run_dir, ignore_errors=True)
    active.log.unlink(missing_ok=True)
    print(f"{time.strftime('%H:%M:%S')} killed {active.run.size} {active.run.name} ({why}: discarded)", flush=True)


def discard_unfinished(runs_dir: Path) -> None:
    """Leftovers of a `run` that was killed itself: run directories without result.json, and their logs."""
    for path in runs_dir.iterdir() if runs_dir.exists() else ():
        if path.is_dir() and not path.name.startswith("_") and not (path / "result.json").exists():
            shutil.rmtree(path)
        elif path.suffix == ".log":
            path.unlink()


def done_fraction(active: Active) -> float:
    records = read_metrics(active.run_dir)
    return records[-1]["step"] / active.run.steps if records else 0.0


class GpuRate:
    """FLOP/s of all runs together, over the last minute: the work done (finished and stopped runs' included)
    sampled at every tick. It does not depend on how many runs share the GPU, once they fill it."""

    def __init__(self, prior: float, window: float = 60.0):
        self.prior, self.window, self.banked, self.samples = prior, window, 0.0, []

    def bank(self, active: Active, fraction: float) -> None:
        self.banked += fraction * active.flops

    def sample(self, active: dict) -> float:
        now = time.monotonic()
        self.samples.append((now, self.banked + sum(done_fraction(a) * a.flops for a in active.values())))
        first_work = next((i for i, (_, done) in enumerate(self.samples) if done > 0), None)
        if first_work is None or now - self.samples[first_work][0] < self.window / 2:
            return self.prior
        then, done_then = next((t, d) for t, d in self.samples[first_work:] if t >= now - self.window)
        return (self.samples[-1][1] - done_then) / max(now - then, 1e-9) if now > then else self.prior


def remaining_flops(active: Active) -> float:
    return (1 - done_fraction(active)) * active.flops


def run_phase(phase: str, deadline_minutes: float, parallel: int, assumed_tflops: float):
    """Run what the phase still needs, in priority order, until it needs nothing or the deadline. The runs share
    the GPU, so they finish when the FLOPs left in all of them are done at the measured rate: a run starts only
    if that still ends before the deadline, and the lowest-priority run is stopped when the measured rate says
    the running ones cannot all finish."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # e.g. `timeout`: still stop the runs and record
    started, info = time.monotonic(), preflight()
    deadline, v3 = started + 60 * deadline_minutes, phase in ("claim", "axis", "v3", "reruns")
    for runs_dir in [RUNS_DIR] if not v3 else [V3_DIR / size for size in SIZES]:
        discard_unfinished(runs_dir)
    active, ended, killed, last_stop, meter = {}, [], [], 0.0, GpuRate(1e12 * assumed_tflops)
    run_info = dict(device=info["device"], torch=info["torch"], parallel=parallel,
                    date=datetime.date.today().isoformat())
    try:
        while True:
            results = v3_results() if v3 else {SMALL: load_results(RUNS_DIR)}
            for key, a in list(active.items()):
                if a.process.poll() is not None:
                    results.setdefault(a.run.size, {})[a.run.name] = finish(a, run_info)
                    meter.bank(active.pop(key), 1.0)
                    ended.append(dict(name=a.run.name, size=a.run.size, flops=a.flops))
            rate = meter.sample(active)
            order = v3_plan(phase) if v3 else needed_runs(phase, results[SMALL])
            pending = [r for r in order if r.name not in results.get(r.size, {}) and (r.size, r.name) not in active]
            left = deadline - time.monotonic() - 10
            settled = time.monotonic() - last_stop > 30 and all(done_fraction(a) > 0 for a in active.values())
            if active and settled and sum(map(remaining_flops, active.values())) > rate * left:
                priority = lambda key: order.index(active[key].run) if active[key].run in order else len(order)
                key = max(active, key=priority)
                meter.bank(active[key], done_fraction(active[key]))
                stop(active.pop(key), "it cannot finish before the deadline")
                killed.append(key[1])
                last_stop = time.monotonic()
                continue
            for run in pending[:max(0, parallel - len(active))]:
                if 1.1 * (sum(map(remaining_flops, active.values())) + run_flops(run)) / rate < left:
                    runs_dir = V3_DIR / run.size if v3 else RUNS_DIR
                    active[run.size, run.name] = launch(run, runs_dir, len(ended) + len(active), parallel,
                                                        info["gpus"])
            if not active:
                print(f"done: {len(pending)} needed run(s) left" + (" (none fits before the deadline)" if pending
                                                                      else ""), flush=True)
                break
            if time.monotonic() >= deadline:
                break
            time.sleep(2)
    finally:
        for key, a in active.items():
            stop(a)
            killed.append(key[1])
        record_invocation(V3_DIR if v3 else RUNS_DIR, phase, parallel, deadline_minutes, started, info, ended,
                          killed)


def record_invocation(runs_dir, phase, parallel, deadline_minutes, started, info, ended, killed) -> None:
    wall = time.monotonic() - started
    record = dict(command="python " + " ".join(sys.argv), phase=phase, parallel=parallel,
                  deadline_minutes=deadline_minutes, date=datetime.datetime.now().isoformat(timespec="seconds"),
                  wall_seconds=wall, **info, runs_ended=[e["name"] for e in ended], runs_killed=killed,
                  tflops_finished_runs=sum(e["flops"] for e in ended) / wall / 1e12)
    (runs_dir / "_invocations").mkdir(parents=True, exist_ok=True)
    (runs_dir / "_invocations" / f"{record['date'].replace(':', '')}.json").write_text(json.dumps(record, indent=2))
    print(f"{len(ended)} run(s) ended, {len(killed)} stopped, {wall:.0f} s, "
          f"{record['tflops_finished_runs']:.0f} TFLOP/s of finished runs together", flush=True)


# -----------------------------------------------------------------------------
# Moving results between machines


def pack(archive: Path, runs_dirs=None) -> None:
    """The finished runs (result.json, metrics.jsonl, config.json, run.log) and invocation records of v2's and
    v3's folders, one file, with paths relative to bench/results/ (or out/ for TINY)."""
    runs_dirs = runs_dirs or [RUNS_DIR, V3_DIR]
    base = RUNS_DIR.parent
    with tarfile.open(archive, "w:gz") as tar:
        for runs_dir in runs_dirs:
            for path in sorted(runs_dir.rglob("*")) if runs_dir.exists() else ():
                if path.is_dir() and ((path / "result.json").exists() or path.name == "_invocations"):
                    tar.add(path, arcname=str(path.relative_to(base)))
    print(f"{archive}: {archive.stat().st_size / 1e6:.2f} MB")


def unpack(archive: Path) -> None:
    with tarfile.open(archive) as tar:
        tar.extractall(RUNS_DIR.parent, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    print(", ".join(f"{size}: {len(runs)} finished runs" for size, runs in v3_results().items()))


# -----------------------------------------------------------------------------
# Statistics


def t_quantile_975(df: int) -> float:
    """Student's t 97.5% quantile: a table to df 30, then the Cornish-Fisher expansion (error < 1e-3)."""
    if df <= len(T_975):
        return T_975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def paired_difference(a: dict, b: dict) -> dict:
    """a − b over the seeds both have (dicts seed -> loss): mean, sd, 95% t interval, and a verdict."""
    seeds = sorted(set(a) & set(b))
    differences = [a[s] - b[s] for s in seeds]
    row = dict(seeds=seeds, per_seed=differences, n=len(seeds))
    if len(seeds) < 2 or not all(map(math.isfinite, differences)):
        return dict(row, mean=None, ci95=None, verdict="too few finite paired seeds")
    mean, sd = statistics.mean(differences), statistics.stdev(differences)
    half = t_quantile_975(len(seeds) - 1) * sd / math.sqrt(len(seeds))
    verdict = "first lower" if mean + half < 0 else "second lower" if mean - half > 0 else "not resolved"
    return dict(row, mean=mean, sd=sd, t=mean / (sd / math.sqrt(len(seeds))) if sd > 0 else None,
                df=len(seeds) - 1, ci95=[mean - half, mean + half], verdict=verdict)


def crossing(points: list, target: float):
    """The smallest x at which the piecewise-linear curve through (x, loss) points (sorted by x) reaches target:
    ("at", x), ("below_shortest", x0) if it starts at or below, ("not_reached", None) if it never does."""
    if points[0][1] <= target:
        return "below_shortest", points[0][0]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if y1 <= target:
            return "at", x0 + (x1 - x0) * (y0 - target) / (y0 - y1)
    return "not_reached", None


def mean_curve(runs: list) -> list:
    """(step, validation loss averaged over runs) at each step every run evaluated."""
    curves = [{r["step"]: r["val_loss"] for r in records if "val_loss" in r} for records in runs]
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    return [(step, statistics.mean(c[step] for c in curves)) for step in steps]


def first_step_at_or_below(curve: list, target: float):
    return next((step for step, loss in curve if loss <= target), None)


# -----------------------------------------------------------------------------
# Report


def seed_losses(results: dict, settings: Run, seeds, fraction=1.0) -> dict:
    runs = {s: dataclasses.replace(settings, seed=s, fraction=fraction) for s in seeds}
    return {s: final_loss(results, run) for s, run in runs.items() if final_loss(results, run) is not None}


def summarize(losses: dict) -> dict:
    values = list(losses.values())
    return dict(per_seed=losses, n=len(values), mean=statistics.mean(values) if values else None,
                range=[min(values), max(values)] if values else None,
                sd=statistics.stdev(values) if len(values) > 1 else None)


def steps_to_target(results: dict, runs_dir: Path, best: dict, finals: dict) -> dict:
    """Both measures of how many steps NorMuon (and, for the paper's metric, Muon) needs to reach a reference's
    seed-mean final loss."""
    table = {}
    for reference in ("adamw", "muon"):
        if finals.get(reference, {}).get("mean") is None:
            continue
        target = finals[reference]["mean"]
        for optimizer in ("muon", "normuon"):
            runs = [read_metrics(runs_dir / dataclasses.replace(best[optimizer], seed=s).name)
                    for s in finals[optimizer]["per_seed"]] if optimizer in best and optimizer != reference else []
            if runs:
                step = first_step_at_or_below(mean_curve(runs), target)
                table[f"{optimizer}_to_{reference}_final_paper_metric"] = dict(
                    target=target, step=step, fewer_steps=None if step is None else 1 - step / PROTOCOL["max_steps"],
                    per_seed=[first_step_at_or_below(mean_curve([r]), target) for r in runs])
        if "normuon" in best and reference != "normuon":
            table[f"normuon_to_{reference}_final_shortened"] = shortened_crossing(results, best["normuon"], target)
    return table


def shortened_crossing(results: dict, settings: Run, target: float) -> dict:
    """Final loss vs schedule length (seeds that ran every length), and where it crosses target."""
    lengths = sorted((*FRACTIONS, 1.0))
    by_length = {f: seed_losses(results, settings, SHORT_SEEDS, f) for f in lengths}
    seeds = [s for s in SHORT_SEEDS if all(s in by_length[f] for f in lengths)]
    if not seeds:
        return dict(target=target, seeds=[], missing="shortened runs")
    curve = [(f, statistics.mean(by_length[f][s] for s in seeds)) for f in lengths]
    where, fraction = crossing(curve, target)
    per_seed = {s: crossing([(f, by_length[f][s]) for f in lengths], target) for s in seeds}
    return dict(target=target, seeds=seeds, mean_final_by_length=dict(curve), result=where, length=fraction,
                steps=None if fraction is None else fraction * PROTOCOL["max_steps"],
                fewer_steps=None if fraction is None else 1 - fraction, per_seed=per_seed)


def verdict_line(a: str, b: str, difference: dict) -> str:
    name_a, name_b = NAMES[a], NAMES[b]
    if difference["ci95"] is None:
        return f"{name_a} − {name_b}: {difference['verdict']}"
    low, high = difference["ci95"]
    meaning = {"first lower": f"{name_a} lower", "second lower": f"{name_b} lower",
               "not resolved": f"not resolved: any difference lies within [{low:+.4f}, {high:+.4f}]"}
    return (f"{name_a} − {name_b} final val loss: {difference['mean']:+.4f}, 95% CI [{low:+.4f}, {high:+.4f}] "
            f"(n = {difference['n']} paired seeds): {meaning[difference['verdict']]}")


def report(runs_dir: Path, out: Path) -> dict:
    results = load_results(runs_dir)
    tuning, best = tuning_plan(results)
    invocations = [json.loads(p.read_text()) for p in sorted((runs_dir / "_invocations").glob("*.json"))]
    finals = {o: summarize(seed_losses(results, best[o], SEEDS)) for o in best}
    pairs = [("normuon", "muon"), ("normuon", "adamw"), ("muon", "adamw")]
    differences = {f"{a}_minus_{b}": paired_difference(finals[a]["per_seed"], finals[b]["per_seed"])
                   for a, b in pairs if a in finals and b in finals}
    summary = [verdict_line(a, b, differences[f"{a}_minus_{b}"]) for a, b in pairs if f"{a}_minus_{b}" in differences]
    parameters = invocations[-1]["parameters"] if invocations else None
    table = dict(
        summary=summary, seeds=list(SEEDS), train_tokens=TRAIN_TOKENS,
        ci95_normuon_minus_muon=differences.get("normuon_minus_muon", {}).get("ci95"),
        gpu=", ".join(sorted({i["device"] for i in invocations})),
        torch=", ".join(sorted({i["torch"] for i in invocations})),
        date=", ".join(sorted({i["date"][:10] for i in invocations})),
        commands=[dict(command=i["command"], date=i["date"], wall_seconds=round(i["wall_seconds"]),
                       runs_ended=len(i["runs_ended"]), runs_killed=len(i["runs_killed"])) for i in invocations],
        device_seconds=round(sum(i["wall_seconds"] for i in invocations)),
        protocol=dict(PROTOCOL, tokens_per_step=TOKENS_PER_STEP, train_tokens=TRAIN_TOKENS, parameters=parameters,
                      tokens_per_parameter=parameters and TRAIN_TOKENS / parameters,
                      corpus_train_tokens=invocations[-1]["corpus_train_tokens"] if invocations else None,
                      tune_seed=TUNE_SEED, seeds=list(SEEDS), shortened_seeds=list(SHORT_SEEDS),
                      shortened_lengths=list(FRACTIONS), lr_grid_initial={o: [grid_lr(k) for k in sorted(ks)]
                                                                          for o, ks in INITIAL_GRID.items()},
                      defaults=DEFAULTS, adamw_knobs=ADAMW_KNOBS),
        tuning={o: {r.name: final_loss(results, r) for r in tuning if r.optimizer == o} for o in OPTIMIZERS},
        best_settings={o: dict(dataclasses.asdict(run), warmup_steps=run.warmup_steps, grid_edge=lr_at_edge(run, results))
                       for o, run in best.items()},
        final_val_loss=finals, paired_differences=differences,
        steps_to_target=steps_to_target(results, runs_dir, best, finals),
        missing=[r.name for r in needed_runs("all", results) if r.name not in results])
    text = json.dumps(table, indent=2, default=str, ensure_ascii=False).replace("Infinity", '"diverged"')
    out.with_suffix(".json").write_text(text + "\n")
    plot(results, runs_dir, best, table, out.with_suffix(".png"))
    return table


def lr_at_edge(run: Run, results: dict) -> bool:
    """Whether the chosen lr is still the lowest or highest of its finished grid (the grid cap was reached)."""
    grid, _ = lr_grid(run.optimizer, results)
    return run.lr in (min(r.lr for r in grid), max(r.lr for r in grid))


def plot(results: dict, runs_dir: Path, best: dict, table: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(14, 9.5))
    plot_curves(axes[0], runs_dir, best, table["final_val_loss"])
    plot_lengths(axes[1, 0], results, best, table["final_val_loss"])
    plot_tuning(axes[1, 1], results)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_curves(axes, runs_dir: Path, best: dict, finals: dict) -> None:
    """Validation loss vs step and vs training time of every reporting seed at each optimizer's settings."""
    for optimizer, settings in best.items():
        for index, seed in enumerate(finals[optimizer]["per_seed"]):
            evaluated = [r for r in read_metrics(runs_dir / dataclasses.replace(settings, seed=seed).name)
                         if "val_loss" in r]
            label = f"{NAMES[optimizer]} (lr {settings.lr:g})" if index == 0 else None
            for axis, x in zip(axes, ("step", "training_seconds")):
                axis.plot([r[x] for r in evaluated], [r["val_loss"] for r in evaluated], color=COLORS[optimizer],
                          lw=1, alpha=0.7, label=label)
    means = [f["mean"] for f in finals.values() if f["mean"] is not None]
    for axis in axes:
        for optimizer, final in finals.items():
            if final["mean"] is not None:
                axis.axhline(final["mean"], color=COLORS[optimizer], ls=":", lw=1)
        if means:
            axis.set_ylim(min(means) - 0.05, max(means) + 0.35)  # the end of training, where they differ
        axis.set_ylabel("validation loss (nats per byte)")
        axis.legend()
    axes[0].set(title=f"Tuned settings, seeds {SEEDS[0]}..{SEEDS[-1]} (dotted: mean final)", xlabel="step")
    axes[1].set(title="The same runs against training time (processes sharing one GPU)", xlabel="seconds")


def plot_lengths(axis, results: dict, best: dict, finals: dict) -> None:
    """NorMuon's final loss vs its schedule length, one line per seed, and the references' mean final losses."""
    lengths = sorted((*FRACTIONS, 1.0))
    for seed in SHORT_SEEDS if "normuon" in best else ():
        points = [(f, seed_losses(results, best["normuon"], [seed], f).get(seed)) for f in lengths]
        points = [(f, loss) for f, loss in points if loss is not None and math.isfinite(loss)]
        axis.plot([f for f, _ in points], [loss for _, loss in points], "o-", color=COLORS["normuon"], alpha=0.6,
                  lw=1, label="NorMuon" if seed == SHORT_SEEDS[0] else None)
    for reference in ("adamw", "muon"):
        if finals.get(reference, {}).get("mean") is not None:
            axis.axhline(finals[reference]["mean"], color=COLORS[reference], ls="--", lw=1,
                         label=f"{NAMES[reference]}: mean final, full schedule")
    axis.set(title=f"NorMuon: final loss vs schedule length, seeds {SHORT_SEEDS[0]}..{SHORT_SEEDS[-1]}",
             xlabel="steps, relative to the full schedule", ylabel="final validation loss")
    axis.legend()


def plot_tuning(axis, results: dict) -> None:
    """Final loss vs lr of each optimizer's grid at the tuning seed; AdamW's other knobs as crosses."""
    for optimizer in OPTIMIZERS:
        points = sorted((run.lr, final_loss(results, run)) for run in lr_grid(optimizer, results)[0])
        points = [(lr, loss) for lr, loss in points if loss is not None and math.isfinite(loss)]
        axis.plot([lr for lr, _ in points], [loss for _, loss in points], "o-", color=COLORS[optimizer],
                  label=NAMES[optimizer])
    knobs = [(run.lr, final_loss(results, run)) for run in tuning_plan(results)[0] if run.optimizer == "adamw"
             and (run.adamw_lr, run.warmup, run.grad_clip) != tuple(DEFAULTS.values())]
    knobs = [(lr, loss) for lr, loss in knobs if loss is not None and math.isfinite(loss)]
    axis.plot([lr for lr, _ in knobs], [loss for _, loss in knobs], "x", color=COLORS["adamw"],
              label="AdamW, other knobs at its best lr")
    axis.set(title=f"Tuning (seed {TUNE_SEED}; diverged runs left out)", xlabel="lr of the hidden matrices",
             ylabel="final validation loss", xscale="log")
    axis.legend()


# -----------------------------------------------------------------------------
# Report of protocol v3: both sizes, the change of the gap with size, the lr check, the control

V3_PAIRS = (("normuon", "muon"), ("normuon_larger", "normuon"), ("normuon_larger", "muon"), ("muon", "adamw"),
            ("normuon", "adamw"), ("normuon_larger", "adamw"))
COLORS = dict(adamw="tab:blue", muon="tab:orange", normuon="tab:green", normuon_larger="tab:purple")


def run_dir_of(run: Run) -> Path:
    """Where a run's files are: v3's folder for its size, or v2's for the v2 runs v3 reuses."""
    path = V3_DIR / run.size / run.name
    return path if path.exists() or run.size != SMALL else RUNS_DIR / run.name


def welch_difference(first: dict, second: dict) -> dict:
    """The mean of one paired difference (first) minus another's (second), at different sizes (unpaired):
    Welch's 95% interval (degrees of freedom rounded down) and v2's verdict rule."""
    if first.get("sd") is None or second.get("sd") is None:
        return dict(mean=None, ci95=None, verdict="too few finite paired seeds")
    variances = [d["sd"] ** 2 / d["n"] for d in (first, second)]
    se = math.sqrt(sum(variances))
    df = se ** 4 / sum(v ** 2 / (d["n"] - 1) for v, d in zip(variances, (first, second))) if se else None
    mean = first["mean"] - second["mean"]
    half = t_quantile_975(max(1, math.floor(df))) * se if se else 0.0
    verdict = "first lower" if mean + half < 0 else "second lower" if mean - half > 0 else "not resolved"
    return dict(mean=mean, se=se, df=df, ci95=[mean - half, mean + half], verdict=verdict)


def v3_steps_to_target(size: str, settings: dict, finals: dict) -> dict:
    """The paper's metric: the first evaluation at which an optimizer's seed-mean curve is at or below a
    reference's seed-mean final loss, and the fraction of the steps saved."""
    table = {}
    for reference in ("adamw", "muon"):
        if finals.get(reference, {}).get("mean") is None:
            continue
        target = finals[reference]["mean"]
        for optimizer in ("muon", "normuon", "normuon_larger"):
            if optimizer == reference or not finals.get(optimizer, {}).get("n"):
                continue
            runs = [read_metrics(run_dir_of(dataclasses.replace(settings[optimizer], seed=s)))
                    for s in finals[optimizer]["per_seed"]]
            step = first_step_at_or_below(mean_curve(runs), target)
            table[f"{optimizer}_to_{reference}_final"] = dict(
                target=target, step=step, steps=SIZES[size]["max_steps"],
                fewer_steps=None if step is None else 1 - step / SIZES[size]["max_steps"],
                per_seed=[first_step_at_or_below(mean_curve([r]), target) for r in runs])
    return table


def v3_size_table(size: str, results: dict, settings: dict) -> dict:
    finals = {o: summarize(seed_losses(results, run, SEEDS)) for o, run in settings.items()}
    finals = {o: f for o, f in finals.items() if f["n"]}
    differences = {f"{a}_minus_{b}": paired_difference(finals[a]["per_seed"], finals[b]["per_seed"])
                   for a, b in V3_PAIRS if a in finals and b in finals}
    return dict(parameters=parameter_count(size), model=dataclasses.asdict(model_config(size)),
                steps=SIZES[size]["max_steps"], train_tokens=Run("muon", 1e-3, size=size).tokens,
                settings={o: dict(dataclasses.asdict(run), name=run.name) for o, run in settings.items()},
                summary=[verdict_line(a, b, differences[f"{a}_minus_{b}"]) for a, b in V3_PAIRS
                         if f"{a}_minus_{b}" in differences],
                final_val_loss=finals, paired_differences=differences,
                steps_to_target=v3_steps_to_target(size, settings, finals))


def v3_lr_check(results: dict) -> dict:
    """At the larger size, seed 1: final loss at the reported lr and at the √2 grid points on either side."""
    table = {}
    for optimizer in ("muon", "normuon"):
        k = V3_GRID[optimizer]
        losses = {grid_lr(j): final_loss(results, Run(optimizer, grid_lr(j), seed=SEEDS[0], size=LARGE))
                  for j in (k - 1, k, k + 1)}
        done = {lr: loss for lr, loss in losses.items() if loss is not None}
        best = min(done, key=done.get) if grid_lr(k) in done else None
        table[optimizer] = dict(
            reported_lr=grid_lr(k), seed=SEEDS[0], final_val_loss={f"{lr:g}": loss for lr, loss in losses.items()},
            check="incomplete" if best is None or len(done) == 1 else "the reported lr ends lowest" if best == grid_lr(k)
            else f"lr {best:g} ends {done[grid_lr(k)] - done[best]:.4f} lower than the reported lr")
    return table


def v3_control(results: dict, v2_normuon: Run, larger: Run) -> dict:
    """v2's NorMuon runs made again with the current code: how far the code moved them (paired by seed),
    and the larger-dimension variant against the re-runs, within one code (the amended axis comparison)."""
    original = seed_losses(results, v2_normuon, SEEDS)
    again = seed_losses(results, dataclasses.replace(v2_normuon, rerun=True), SEEDS)
    variant = seed_losses(results, larger, SEEDS)
    return dict(run=v2_normuon.name, v2=original, again=again,
                again_minus_v2=paired_difference(again, original),
                larger_minus_again=paired_difference(variant, again))


def report_v3(out: Path) -> dict:
    results = v3_results()
    _, v2_best = tuning_plan(results[SMALL])
    settings = {size: {} for size in SIZES}
    for (size, optimizer), run in {**{(SMALL, o): r for o, r in v2_best.items()}, **v3_settings()}.items():
        settings[size][optimizer] = run
    sizes = {size: v3_size_table(size, results[size], settings[size]) for size in SIZES}
    gap = [sizes[size]["paired_differences"].get("normuon_minus_muon", {}) for size in (LARGE, SMALL)]
    axis = [sizes[size]["paired_differences"].get("normuon_larger_minus_normuon", {}) for size in (LARGE, SMALL)]
    invocations = [json.loads(p.read_text()) for p in sorted((V3_DIR / "_invocations").glob("*.json"))]
    table = dict(
        summary=[f"{size} ({sizes[size]['parameters'] / 1e6:.1f}M parameters): {line}"
                 for size in SIZES for line in sizes[size]["summary"][:3]],
        gap_change_with_size=dict(of="NorMuon − Muon", larger_minus_smaller=welch_difference(*gap)),
        axis_change_with_size=dict(of="NorMuon(larger) − NorMuon", larger_minus_smaller=welch_difference(*axis)),
        sizes=sizes, lr_check=v3_lr_check(results[LARGE]),
        control=v3_control(results[SMALL], v2_best["normuon"], settings[SMALL]["normuon_larger"])
        if "normuon" in v2_best else None,
        gpu=", ".join(sorted({i["device"] for i in invocations})),
        torch=", ".join(sorted({i["torch"] for i in invocations})),
        date=", ".join(sorted({i["date"][:10] for i in invocations})),
        commands=[dict(command=i["command"], date=i["date"], wall_seconds=round(i["wall_seconds"]),
                       source=i.get("source_commit"), runs_ended=len(i["runs_ended"]),
                       runs_stopped=len(i["runs_killed"])) for i in invocations],
        device_seconds=round(sum(i["wall_seconds"] for i in invocations)),
        protocol=dict(sizes=SIZES, models=MODELS, seeds=list(SEEDS), larger_size_grid_points=V3_GRID,
                      corpus_train_tokens=invocations[-1]["corpus_train_tokens"] if invocations else None),
        missing=[f"{r.size} {r.name}" for r in v3_plan("v3") if r.name not in results[r.size]])
    text = json.dumps(table, indent=2, default=str, ensure_ascii=False).replace("Infinity", '"diverged"')
    out.with_suffix(".json").write_text(text + "\n")
    plot_v3(table, settings, out.with_suffix(".png"))
    return table


def plot_v3(table: dict, settings: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(18, 5.2))
    plot_gaps(axes[0], table["sizes"])
    plot_larger_curves(axes[1], table["sizes"][LARGE], settings[LARGE])
    plot_lr_check(axes[2], table["lr_check"])
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_gaps(axis, sizes: dict) -> None:
    """Each paired difference's mean and 95% interval against the model's size."""
    for offset, (a, b) in zip((0.98, 1.02), V3_PAIRS[:2]):
        points = [(t["parameters"] * offset, t["paired_differences"][f"{a}_minus_{b}"]) for t in sizes.values()
                  if t["paired_differences"].get(f"{a}_minus_{b}", {}).get("ci95")]
        if points:
            x = [p for p, _ in points]
            y = [d["mean"] for _, d in points]
            errors = [[d["mean"] - d["ci95"][0] for _, d in points], [d["ci95"][1] - d["mean"] for _, d in points]]
            labels = ", ".join(f"n = {d['n']}" for _, d in points)
            axis.errorbar(x, y, yerr=errors, fmt="o-", capsize=4, color=COLORS[a],
                          label=f"{NAMES[a]} − {NAMES[b]} ({labels})")
    axis.axhline(0, color="gray", lw=1)
    axis.set(xscale="log", xlabel="parameters", ylabel="final validation loss difference (nats per byte)",
             title="Paired differences over seeds: mean and 95% t interval")
    axis.set_xticks([t["parameters"] for t in sizes.values()], [f"{t['parameters'] / 1e6:.1f}M" for t in sizes.values()])
    axis.minorticks_off()
    axis.legend()


def plot_larger_curves(axis, size_table: dict, settings: dict) -> None:
    """The larger size's validation curves, every reported seed, near the end of training."""
    finals = size_table["final_val_loss"]
    for optimizer, final in finals.items():
        for index, seed in enumerate(final["per_seed"]):
            evaluated = [r for r in read_metrics(run_dir_of(dataclasses.replace(settings[optimizer], seed=seed)))
                         if "val_loss" in r]
            axis.plot([r["step"] for r in evaluated], [r["val_loss"] for r in evaluated], color=COLORS[optimizer],
                      lw=1, alpha=0.7, label=f"{NAMES[optimizer]} (lr {settings[optimizer].lr:g})" if not index else None)
        axis.axhline(final["mean"], color=COLORS[optimizer], ls=":", lw=1)
    means = [f["mean"] for f in finals.values()]
    if means:
        axis.set_ylim(min(means) - 0.03, max(means) + 0.2)
        axis.legend()
    axis.set(xlabel="step", ylabel="validation loss", title=f"{size_table['parameters'] / 1e6:.1f}M parameters "
             "(dotted: mean final)")


def plot_lr_check(axis, lr_check: dict) -> None:
    for optimizer, row in lr_check.items():
        points = sorted((float(lr), loss) for lr, loss in row["final_val_loss"].items()
                        if loss is not None and math.isfinite(loss))
        axis.plot([lr for lr, _ in points], [loss for _, loss in points], "o-", color=COLORS[optimizer],
                  label=f"{NAMES[optimizer]} (reported lr {row['reported_lr']:g})")
    axis.set(xscale="log", xlabel="lr of the hidden matrices", ylabel="final validation loss",
             title=f"lr check at the larger size, seed {SEEDS[0]}")
    axis.legend()


def main():
    if sys.argv[1:2] == ["train"]:  # one training process, started by `run`
        return train_worker(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("command", choices=["run", "pack", "unpack", "report"])
    parser.add_argument("archive", nargs="?", type=Path, help="pack/unpack: the .tar file")
    parser.add_argument("--phase", choices=["tune", "report", "all", "claim", "axis", "v3", "reruns"], default="v3",
                        help="run: v2's tune, report, all; v3's claim, axis, v3 (both)")
    parser.add_argument("--deadline_minutes", type=float, default=8.0, help="run: stop starting and kill runs then")
    parser.add_argument("--parallel", type=int, default=6, help="run: training processes at a time")
    parser.add_argument("--assumed_tflops", type=float, default=150.0 if not TINY else 0.005,
                        help="run: all processes together, until measured (for the deadline)")
    args = parser.parse_args()
    if args.command in ("pack", "unpack") and args.archive is None:
        parser.error(f"{args.command} needs the archive's path")
    if args.command == "run":
        run_phase(args.phase, args.deadline_minutes, args.parallel, args.assumed_tflops)
    elif args.command == "pack":
        pack(args.archive)
    elif args.command == "unpack":
        unpack(args.archive)
    else:
        report(RUNS_DIR, REPORT)
        table = report_v3(V3_DIR)
        print(json.dumps(dict(summary=table["summary"], missing=table["missing"]), indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
