"""Muon vs NorMuon on transformers' GPT-2 124M, whose Conv1D weights keep output neurons in columns.

    python bench/hf_gpt2.py            # one GPU, 6 minutes at most: bench/results/hf_gpt2.json
    python bench/hf_gpt2.py --resume   # keep that file's finished runs, run what the sweep needs
    python bench/hf_gpt2.py --tiny     # a tiny model for a few steps on CPU: checks that it runs

The default Shakespeare corpus must be prepared first (it is downloaded once, so on a machine with
network): ``python -c "import prepare_data; prepare_data.load_shakespeare('data')"``.

Protocol (every number is a flag):
- Model: ``transformers.GPT2LMHeadModel`` with GPT-2 124M's shape (12 layers, 12 heads, width 768,
  context 1024) but a byte vocabulary (256: 86M parameters), no dropout, sdpa attention, tied
  embeddings; bf16 autocast, no compile.
- Data: the Shakespeare bytes (prepare_data.load_shakespeare); 300 steps of 8 random crops of 1024 + 1
  tokens (8,192 tokens a step, 2.5M in all: about half a pass over the 4.73M training tokens), drawn
  from the run's seed, so Muon and NorMuon see the same batches at the same seed; validation loss on
  the whole held-out text (3 plays, 330k tokens, in consecutive windows) every 50 steps and at the
  end.
- Optimizers: one ``NorMuon`` on ``split_parameters``' groups: the hidden matrices (every Conv1D
  weight, layout "in_out") get Muon (``normalize=False``), NorMuon (one second moment per output
  neuron, the paper) or NorMuon with ``neuron_axis="larger"`` (along each matrix's larger dimension,
  as modded-nanogpt and nanochat), match_rms_adamw scaling, weight decay 0.1; embeddings, norms and
  biases get AdamW (lr 3e-3, betas (0.9, 0.95), no weight decay). Linear warmup of 30 steps, then
  linear decay to 0, for both.
- Learning rates: an equal lr is not an equal step (NorMuon's update RMS is exactly 0.2·lr, Muon's
  is 0.2·lr times the RMS of Newton–Schulz's singular values), so each optimizer gets its own sweep
  at seed 0: 1.5e-3, 3e-3, 6e-3, then, while its best lr is the lowest (highest) of its sweep, half
  (twice) that lr, up to --max_lrs points; then seeds 1 and 2 at its best lr. A seed sets the
  initialization and the batches.
- Reported: final validation loss per run; per optimizer, mean and range over the 3 seeds at its
  best lr. For one matrix (block 6's MLP up-projection, 3072 neurons of 768 inputs) the spread
  (coefficient of variation) of the latest update's per-neuron norms along the output-neuron axis
  (columns) and along the other axis, and the update's RMS / lr, at step 1 and at each evaluation:
  with the axis right, NorMuon's spread over neurons is ~0 at step 1 (v_0 = 0 makes it exact) and
  its RMS / lr is 0.2.

Runs go ``--jobs`` at a time in subprocesses, so that runs this small can share one GPU. The script
never starts a run it does not expect to finish by ``--deadline_minutes`` and stops any run still
going then; results are written to ``--out`` after every run, so a run cut short keeps what
finished.
"""

import argparse
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformers

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import normuon  # noqa: E402
import train_gpt  # noqa: E402
import prepare_data  # noqa: E402

OPTIMIZERS = ("muon", "normuon", "normuon_larger")
NOT_PROTOCOL = ("worker", "out", "resume")  # flags that do not change a run
SWEEP_SETTINGS = ("lrs", "max_lrs", "seeds", "jobs", "deadline_minutes", "data_dir", "tiny")  # may differ on resume
transformers.logging.set_verbosity_error()
TRACKED = "transformer.h.{}.mlp.c_fc.weight"  # (768, 3072) Conv1D: 3072 output neurons, in columns


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lrs", type=float, nargs="+", default=[1.5e-3, 3e-3, 6e-3], help="sweep of the hidden matrices' lr")
    parser.add_argument("--max_lrs", type=int, default=6, help="most lrs in one optimizer's sweep")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="the first is the sweep's")
    parser.add_argument("--resume", action="store_true", help="keep the finished runs of --out (same protocol)")
    parser.add_argument("--adamw_lr", type=float, default=3e-3)
    parser.add_argument("--weight_decay", type=float, default=0.1, help="of the hidden matrices (decoupled)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup_steps", type=int, default=30)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=1024)
    parser.add_argument("--eval_every", type=int, default=50)
    parser.add_argument("--val_batches", type=int, default=None, help="default: the whole held-out text")
    parser.add_argument("--n_layer", type=int, default=12)
    parser.add_argument("--n_head", type=int, default=12)
    parser.add_argument("--n_embd", type=int, default=768)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time")
    parser.add_argument("--deadline_minutes", type=float, default=6.0)
    parser.add_argument("--data_dir", default=str(REPO / "data"))
    parser.add_argument("--out", default=None, help="default: bench/results/hf_gpt2.json (--tiny: a temporary file)")
    parser.add_argument("--tiny", action="store_true", help="2 layers, width 64, 12 steps: a quick check on CPU")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one run, as JSON {optimizer, lr, seed, stop_at}
    args = parser.parse_args(argv)
    if args.tiny:
        args.__dict__.update(n_layer=2, n_head=2, n_embd=64, seq_len=64, batch_size=4, steps=12, warmup_steps=3,
                             eval_every=6, val_batches=4)
    if args.out is None:
        args.out = str(Path(tempfile.gettempdir()) / "hf_gpt2_tiny.json") if args.tiny else \
            str(REPO / "bench" / "results" / "hf_gpt2.json")
    return args


# -----------------------------------------------------------------------------
# One run (in its own process)


def build_model(args, seed: int, device: torch.device):
    """GPT-2 as transformers defines it (Conv1D weights of shape (in, out)), on a byte vocabulary."""
    config = transformers.GPT2Config(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                                     n_positions=args.seq_len, vocab_size=256, bos_token_id=0, eos_token_id=0,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="sdpa")
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(config).to(device)


def build_optimizer(model, optimizer: str, lr: float, args):
    """Muon, NorMuon or NorMuon along the larger dimension on split_parameters' groups (each with its
    layout), AdamW on the rest: one optimizer. Each group keeps its peak lr for the schedule."""
    groups = normuon.split_parameters(model, adamw_lr=args.adamw_lr, adamw_betas=(0.9, 0.95))
    axis = "larger" if optimizer == "normuon_larger" else "output"
    hidden = normuon.NorMuon(groups, lr=lr, weight_decay=args.weight_decay, normalize=optimizer != "muon",
                             neuron_axis=axis)
    for group in hidden.param_groups:
        group["peak_lr"] = group["lr"]
    return hidden


def update_stats(before: torch.Tensor, after: torch.Tensor, lr: float, weight_decay: float, layout: str) -> dict:
    """The latest update direction D = (W_before (1 - lr·wd) - W_after) / lr of one matrix: the coefficient
    of variation of its per-neuron norms along the output-neuron axis and along the other one, and RMS(D)."""
    direction = (before * (1 - lr * weight_decay) - after).double() / lr
    neuron_axis = 0 if layout == "in_out" else 1  # the norm of neuron j runs over the other axis
    cv = lambda norms: (norms.std(correction=0) / norms.mean()).item()
    return dict(cv_neurons=cv(direction.norm(dim=neuron_axis)), cv_other_axis=cv(direction.norm(dim=1 - neuron_axis)),
                rms_over_lr=direction.square().mean().sqrt().item())


def random_batches(tokens, batch_size: int, seq_len: int, seed: int, device):
    """Endless (x, y) batches of random crops of ``tokens``; the seed fixes the sequence of batches."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, len(tokens) - seq_len, (batch_size,), generator=generator).tolist()
        chunk = torch.from_numpy(np.stack([tokens[s:s + seq_len + 1] for s in starts]).astype(np.int64)).to(device)
        yield chunk[:, :-1], chunk[:, 1:]


def validation_batches(tokens, batch_size: int, seq_len: int, limit, device) -> list:
    """The held-out text cut into consecutive windows, all of it unless ``limit`` batches: the same every run."""
    windows = (len(tokens) - 1) // seq_len
    chunk = torch.from_numpy(tokens[:windows * seq_len + 1].astype(np.int64)).to(device)
    x, y = chunk[:-1].view(windows, seq_len), chunk[1:].view(windows, seq_len)
    return list(zip(x.split(batch_size), y.split(batch_size)))[:limit]


def train_one(args, optimizer_name: str, lr: float, seed: int, stop_at: float) -> dict:
    """One training run; returns its record (status "done", "diverged" or "timeout")."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    model = build_model(args, seed, device)
    optimizer = build_optimizer(model, optimizer_name, lr, args)
    forward = torch.compile(model) if args.compile else model
    train, val = prepare_data.load_shakespeare(args.data_dir)
    batches = random_batches(train, args.batch_size, args.seq_len, seed, device)
    val_batches = validation_batches(val, args.batch_size, args.seq_len, args.val_batches, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    tracked_name = TRACKED.format(args.n_layer // 2)
    tracked = model.get_parameter(tracked_name)
    layout = next(g["layout"] for g in optimizer.param_groups if any(p is tracked for p in g["params"]))

    def loss_of(x, y, reduction="mean"):
        with autocast:
            logits = forward(input_ids=x).logits
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1), reduction=reduction)

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    eval_seconds = 0.0

    @torch.no_grad()
    def evaluate() -> float:
        nonlocal eval_seconds
        synchronize()
        started = time.perf_counter()
        model.eval()
        total = (sum(loss_of(x, y, "sum") for x, y in val_batches) / sum(y.numel() for _, y in val_batches)).item()
        model.train()
        eval_seconds += time.perf_counter() - started
        return total

    record = dict(optimizer=optimizer_name, lr=lr, seed=seed, layout_tracked=layout, tracked=tracked_name,
                  device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                  torch=torch.__version__, val_curve=[], update_stats=[], status="done")
    synchronize()
    started = time.perf_counter()
    for step in range(args.steps):
        if time.time() > stop_at:
            record["status"] = "timeout"
            break
        factor = train_gpt.learning_rate_factor(step, args.warmup_steps, args.steps)
        for group in optimizer.param_groups:
            group["lr"] = group["peak_lr"] * factor
        x, y = next(batches)
        loss = loss_of(x, y)
        loss.backward()
        done = step + 1
        log_now = done == 1 or done % args.eval_every == 0 or done == args.steps
        before = tracked.detach().clone() if log_now else None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        train_loss = loss.item() if log_now else None  # speed: no host sync on other steps
        if log_now:
            if not math.isfinite(train_loss):
                record["status"] = "diverged"
                break
            hidden_lr = optimizer.param_groups[0]["lr"]  # split_parameters puts the matrices' groups first
            stats = update_stats(before, tracked.detach(), hidden_lr, args.weight_decay, layout)
            record["update_stats"].append(dict(step=done, **stats))
            if done != 1:
                record["val_curve"].append(dict(step=done, val_loss=evaluate(), train_loss=train_loss))
    record["steps_done"] = step + 1 if record["status"] == "done" else step
    record["final_val_loss"] = record["val_curve"][-1]["val_loss"] if record["status"] == "done" else None
    if record["final_val_loss"] is not None and not math.isfinite(record["final_val_loss"]):
        record["status"], record["final_val_loss"] = "diverged", None
    synchronize()
    record["ms_per_step"] = 1000 * (time.perf_counter() - started - eval_seconds) / max(1, record["steps_done"])
    return record


# -----------------------------------------------------------------------------
# The protocol: sweep, then seeds at each optimizer's best lr; runs in subprocesses


class Results:
    """The JSON file, rewritten (atomically) after every run."""

    def __init__(self, args):
        self.path, self.lock, self.runs = Path(args.out), threading.Lock(), []
        self.header = dict(
            script="bench/hf_gpt2.py", argv=sys.argv[1:], date=datetime.date.today().isoformat(),
            device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            torch=torch.__version__, transformers=transformers.__version__,
            protocol={k: v for k, v in vars(args).items() if k not in NOT_PROTOCOL})
        if args.resume and self.path.exists():
            self.resume(json.loads(self.path.read_text()))

    def resume(self, saved: dict) -> None:
        """Keep the saved runs that ended (done or diverged) if they ran under the same protocol."""
        mine, theirs = self.header["protocol"], saved["protocol"]
        differ = [k for k in mine if k not in SWEEP_SETTINGS and k in theirs and mine[k] != theirs[k]]
        if differ:
            sys.exit(f"error: --resume: {self.path} was made with other {', '.join(differ)}; "
                     "use the same flags or another --out.")
        for run in saved["runs"]:
            run.setdefault("device", saved["device"])
            run.setdefault("torch", saved["torch"])
        self.runs = [r for r in saved["runs"] if r["status"] in ("done", "diverged")]
        self.header["date"] = ", ".join(sorted({*saved["date"].split(", "), self.header["date"]}))
        self.header["device"] = ", ".join(sorted({r["device"] for r in self.runs} | {self.header["device"]}))

    def add(self, record: dict) -> None:
        with self.lock:
            self.runs.append(record)
            self.write()

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(json.dumps(dict(**self.header, summary=summarize(self.runs, self.header["protocol"]),
                                             runs=self.runs), indent=1))
        os.replace(temporary, self.path)


def final_loss(record) -> float:
    """inf for a run that diverged, was stopped, or failed: it cannot be a best lr."""
    return record["final_val_loss"] if record and record.get("status") == "done" else float("inf")


def find(runs, optimizer, lr, seed):
    return next((r for r in runs if (r["optimizer"], r["lr"], r["seed"]) == (optimizer, lr, seed)), None)


def sweep_lrs(runs, optimizer: str, protocol: dict) -> tuple:
    """(the optimizer's sweep so far, whether it is complete): --lrs, then half the lowest (twice the highest)
    lr while the best finished lr is the lowest (highest), up to --max_lrs points."""
    lrs, seed = sorted(protocol["lrs"]), protocol["seeds"][0]
    while True:
        if any(find(runs, optimizer, lr, seed) is None for lr in lrs):
            return lrs, False
        finals = [final_loss(find(runs, optimizer, lr, seed)) for lr in lrs]
        best = finals.index(min(finals))
        if len(lrs) < protocol["max_lrs"] and best == 0:
            lrs = [lrs[0] / 2] + lrs
        elif len(lrs) < protocol["max_lrs"] and best == len(lrs) - 1 and math.isfinite(finals[best]):
            lrs = lrs + [lrs[-1] * 2]
        else:
            return lrs, True


def best_lr(runs, optimizer, lrs, seed):
    """The sweep's lowest final val loss, or None if no sweep run of this optimizer finished."""
    finals = {lr: final_loss(find(runs, optimizer, lr, seed)) for lr in lrs}
    lr = min(finals, key=finals.get)
    return lr if math.isfinite(finals[lr]) else None


def _finite_or_none(value: float):
    return value if math.isfinite(value) else None


def summarize(runs, protocol) -> dict:
    """Per optimizer: the sweep's final val losses (None: not finished), its best lr, and the seeds there."""
    seeds, summary = protocol["seeds"], {}
    for optimizer in OPTIMIZERS:
        lrs, complete = sweep_lrs(runs, optimizer, protocol)
        lr = best_lr(runs, optimizer, lrs, seeds[0])
        finals = [final_loss(find(runs, optimizer, lr, seed)) for seed in seeds] if lr is not None else []
        finals = [f for f in finals if math.isfinite(f)]
        last = find(runs, optimizer, lr, seeds[0]) if lr is not None else None
        summary[optimizer] = dict(
            sweep={f"{x:g}": _finite_or_none(final_loss(find(runs, optimizer, x, seeds[0]))) for x in lrs},
            sweep_complete=complete,
            best_lr=lr, best_lr_at_grid_edge=lr in (min(lrs), max(lrs)) if lr is not None else None,
            seeds_done=len(finals), final_val_losses=finals,
            mean=statistics.mean(finals) if finals else None,
            range=[min(finals), max(finals)] if finals else None,
            update_stats_at_best=last["update_stats"] if last else None)
    return summary


def launch(args, optimizer: str, lr: float, seed: int, deadline: float) -> dict:
    """One run in a subprocess (a fresh CUDA context each, so runs can overlap on one GPU)."""
    spec = json.dumps(dict(optimizer=optimizer, lr=lr, seed=seed, stop_at=deadline))
    command = [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:], "--worker", spec]
    started = time.time()
    try:  # the run stops itself at the deadline; this only catches a run stuck inside one step
        result = subprocess.run(command, capture_output=True, text=True, timeout=max(1, deadline - started) + 60)
    except subprocess.TimeoutExpired:
        result = subprocess.CompletedProcess(command, -1, "", "killed: still running a minute past the deadline")
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        record = dict(optimizer=optimizer, lr=lr, seed=seed, status="error", final_val_loss=None,
                      error=(result.stderr or result.stdout)[-2000:])
    else:
        record = json.loads(lines[-1])
    record["wall_seconds"] = time.time() - started
    print(f"  {optimizer:8s} lr {lr:<8g} seed {seed}: {record['status']:8s} "
          f"val {record.get('final_val_loss') or float('nan'):.4f}  {record['wall_seconds']:.0f} s", flush=True)
    return record


def run_all(args, specs, results: Results, deadline: float) -> None:
    """Run ``specs`` [(optimizer, lr, seed)], --jobs at a time; skip those that would end past the deadline."""
    def run(spec):
        durations = [r["wall_seconds"] for r in results.runs if r["status"] == "done"]
        if durations and time.time() + max(durations) > deadline:
            results.add(dict(optimizer=spec[0], lr=spec[1], seed=spec[2], status="skipped", final_val_loss=None))
            print(f"  {spec[0]:8s} lr {spec[1]:<8g} seed {spec[2]}: skipped (it would end past the deadline)", flush=True)
            return
        results.add(launch(args, *spec, deadline))
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(run, specs))


def print_table(results: Results) -> None:
    protocol, summary = results.header["protocol"], summarize(results.runs, results.header["protocol"])
    print(f"\n{results.header['device']}, torch {results.header['torch']}, transformers {results.header['transformers']}")
    print(f"final val loss, sweep at seed {protocol['seeds'][0]}:")
    for optimizer, row in summary.items():
        print(f"  {optimizer:14s} " + "  ".join(f"lr {lr}: " + ("-" if loss is None else f"{loss:.4f}")
                                                for lr, loss in row["sweep"].items()))
    print("at each one's best lr, over seeds:")
    for optimizer, row in summary.items():
        if row["mean"] is None:
            print(f"  {optimizer:8s} no finished run")
            continue
        first, last = row["update_stats_at_best"][0], row["update_stats_at_best"][-1]
        print(f"  {optimizer:8s} lr {row['best_lr']:g}{' (grid edge)' if row['best_lr_at_grid_edge'] else ''}: "
              f"mean {row['mean']:.4f}, range {row['range'][0]:.4f}-{row['range'][1]:.4f} ({row['seeds_done']} seeds)")
        print(f"  {'':8s} update of the tracked matrix at steps {first['step']} / "
              f"{last['step']}: cv over neurons {first['cv_neurons']:.2g} / {last['cv_neurons']:.3f}, over the other "
              f"axis {first['cv_other_axis']:.3f} / {last['cv_other_axis']:.3f}, RMS/lr {first['rms_over_lr']:.3f} / "
              f"{last['rms_over_lr']:.3f}")
    print(f"results: {results.path}")


def main() -> None:
    args = parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(train_one(args, spec["optimizer"], spec["lr"], spec["seed"], spec["stop_at"])))
        return
    prepare_data.load_shakespeare(args.data_dir)  # fail here, once, if the data is missing
    deadline = time.time() + 60 * args.deadline_minutes
    results = Results(args)
    results.write()
    centre = statistics.mean(map(math.log, args.lrs))
    print(f"sweep: {args.lrs} per optimizer ({', '.join(OPTIMIZERS)}), seed {args.seeds[0]}, extended while "
          f"the best is at an edge", flush=True)
    while time.time() < deadline:  # each round: what every optimizer's sweep needs next, middle lrs first
        needed = [(o, lr, args.seeds[0]) for o in OPTIMIZERS for lr in sweep_lrs(results.runs, o, results.header["protocol"])[0]
                  if find(results.runs, o, lr, args.seeds[0]) is None]
        if not needed:
            break
        run_all(args, sorted(needed, key=lambda spec: abs(math.log(spec[1]) - centre)), results, deadline)
    sweeps = {o: sweep_lrs(results.runs, o, results.header["protocol"])[0] for o in OPTIMIZERS}
    best = {o: best_lr(results.runs, o, sweeps[o], args.seeds[0]) for o in OPTIMIZERS}
    print(f"seeds {args.seeds[1:]} at the best lrs {best}", flush=True)
    run_all(args, [(o, best[o], seed) for seed in args.seeds[1:] for o in OPTIMIZERS
                   if best[o] is not None and find(results.runs, o, best[o], seed) is None], results, deadline)
    print_table(results)


if __name__ == "__main__":
    main()
