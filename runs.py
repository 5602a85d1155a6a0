"""Run management for train_gpt.py: the run directory, verified checkpoints, resume, stop signals.

A run lives in out/<run_name>/: config.json (the flags), metrics.jsonl and checkpoints/step_N/, the
newest two whose files match their manifest.json of sha256s. A new run never replaces an old one;
--resume continues it, as does a restart of the same torchrun job (--max-restarts) after a fault.
"""

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from prepare_data import UserError

# What a resume must not change: the model (preset, seq_len), what trains it (whose state the
# checkpoint holds) and what the saved data position means (data, batch_size, seed).
FIXED_ON_RESUME = ("preset", "seq_len", "data", "optimizer", "batch_size", "seed")


def on_rank_zero(function):
    """Rank 0 runs function (set up the run directory, publish a checkpoint, ...) while the others
    wait; every rank gets its result, or its error (else the others would wait forever)."""
    result = [None, None]  # (value, error message)
    error = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            result[0] = function()
        except Exception as exception:
            result[1], error = str(exception), exception
    if dist.is_initialized():
        dist.broadcast_object_list(result, src=0)
    if error is not None:
        raise error
    if result[1] is not None:
        raise UserError(result[1])
    return result[0]


# -----------------------------------------------------------------------------
# The run directory: a new run, or continue one


def job_id() -> str:
    """torchrun's id of this job, the same for all its restarts (None outside torchrun)."""
    return os.environ.get("TORCHELASTIC_RUN_ID")


def attempt_store():
    """torchrun's store and this process's rank, with keys of this attempt only: torchrun keeps its
    store across restarts (--max-restarts), where a restarted rank could otherwise read a dead
    rank's address and wait for it forever."""
    store, rank, _ = next(dist.rendezvous("env://"))
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        store = dist.PrefixStore(f"attempt_{os.environ['TORCHELASTIC_RESTART_COUNT']}", store)
    return store, rank


def restarted() -> bool:
    """torchrun restarted this job's workers after one failed (--max-restarts)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def start_or_resume(run_dir: Path, config, model, optimizer) -> tuple:
    """A new run in run_dir, or the run there continued from its newest good checkpoint, loaded
    into model and optimizer: (the step to start at, the data position, the training seconds so
    far, the checkpoint or None)."""
    settings = dict(train=dataclasses.asdict(config), model=dataclasses.asdict(model.config),
                    job=job_id())
    checkpoint = on_rank_zero(lambda: open_run(run_dir, settings, config.resume))
    trainer = trainer_state(step=0, data_position=(0, 0), training_seconds=0.0)
    if checkpoint:
        load_checkpoint(checkpoint, model, optimizer, trainer)
    return (int(trainer["step"]), tuple(trainer["data_position"].tolist()),
            float(trainer["training_seconds"]), checkpoint)


def open_run(run_dir: Path, settings: dict, resume: bool):
    """Rank 0: set up run_dir for a new run, or continue the run in it (with --resume, or when
    torchrun restarted the job that wrote it). Returns the checkpoint to load, or None."""
    config_file = run_dir / "config.json"
    saved = json.loads(config_file.read_text()) if config_file.exists() else None
    if saved and not resume and restarted() and saved.get("job") == settings["job"]:
        print(f"torchrun restarted this job: continuing {run_dir}")
        resume = True
    if saved and not resume:
        raise UserError(f"{run_dir} holds a run already: continue it with --resume (with a larger "
                        "--max_steps to train it longer), or start another with --run_name NAME.")
    if resume and not saved:
        raise UserError(f"--resume: {run_dir} holds no run to continue (no config.json); "
                        "leave out --resume.")
    checkpoint = continue_run(run_dir, saved, settings) if resume else None
    try:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        config_file.write_text(json.dumps(settings, indent=2))  # a resume's: the flags given now
    except OSError as error:
        raise UserError(f"--out_dir: cannot write {run_dir} ({error.strerror}); "
                        "pass a writable --out_dir.") from None
    return checkpoint


def continue_run(run_dir: Path, saved: dict, settings: dict):
    """Check that the run can continue with these settings, say from where and with which changed
    flags, and drop the metrics logged after its checkpoint (those steps are redone)."""
    given, used = settings["train"], saved["train"]
    changed = [name for name in FIXED_ON_RESUME if used[name] != given[name]]
    if changed:
        raise UserError(f"--resume: {', '.join(f'--{n} {given[n]}' for n in changed)}, but the run "
                        f"used {', '.join(f'--{n} {used[n]}' for n in changed)}; pass the same "
                        "flags, or start a new --run_name.")
    if saved["model"] != settings["model"]:  # the same flags, another model: a preset edited since?
        raise UserError(f"--resume: {run_dir} holds another model: its config.json says "
                        f"{saved['model']}, these flags give {settings['model']}.")
    checkpoint = newest_good_checkpoint(run_dir / "checkpoints")
    step = checkpoint_step(checkpoint)
    if step >= given["max_steps"]:
        raise UserError(f"--resume: the run is at step {step}, --max_steps is "
                        f"{given['max_steps']}; pass a larger --max_steps to train it longer.")
    print(f"resuming {run_dir} at step {step} "
          + (f"from {checkpoint}" if checkpoint else "(no checkpoint yet)"))
    changes = [f"--{k} {v} (was {used.get(k)})" for k, v in given.items()
               if k not in ("resume", "run_name") and used.get(k) != v]
    if changes:
        print(f"changed flags: {', '.join(changes)}")
    metrics_file = run_dir / "metrics.jsonl"
    if metrics_file.exists():
        records = [json.loads(line) for line in metrics_file.read_text().splitlines()]
        metrics_file.write_text("".join(json.dumps(r) + "\n" for r in records if r["step"] <= step))
    return checkpoint


def append_metrics(run_dir: Path, record: dict) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        with open(run_dir / "metrics.jsonl", "a") as file:
            file.write(json.dumps(record) + "\n")


# -----------------------------------------------------------------------------
# Checkpoints: atomic, verified by sha256, the newest two kept


def checkpoint_step(path) -> int:
    return int(path.name.removeprefix("step_")) if path else 0


def sha256(path: Path) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def trainer_state(step: int, data_position: tuple, training_seconds: float) -> dict:
    """What a checkpoint holds besides the model and optimizer."""
    return dict(step=torch.tensor(step), data_position=torch.tensor(data_position),
                training_seconds=torch.tensor(training_seconds, dtype=torch.float64))


def save_checkpoint(directory: Path, model, optimizer, keep, **trainer) -> Path:
    """Save atomically and verifiably: DCP writes step_N.tmp/, then rank 0 records each file's
    sha256 in its manifest.json and renames it to step_N. Only then are older checkpoints removed,
    except keep (the previous good one, for when this one turns out corrupt). trainer: step,
    data_position, training_seconds."""
    trainer = trainer_state(**trainer)
    final = directory / f"step_{int(trainer['step']):06d}"
    temporary = final.with_suffix(".tmp")
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = dict(model=model_state, optimizer=optimizer_state, trainer=trainer)
    dcp.save(state, checkpoint_id=temporary)
    on_rank_zero(lambda: publish(temporary, final, keep))  # after every rank's files are written
    return final


def publish(temporary: Path, final: Path, keep) -> None:
    manifest = {path.name: sha256(path) for path in sorted(temporary.iterdir())}
    with open(temporary / "manifest.json", "w") as file:
        json.dump(manifest, file)
        file.flush()
        os.fsync(file.fileno())
    shutil.rmtree(final, ignore_errors=True)  # a corrupt one of this step (resumed before it)
    os.replace(temporary, final)
    for old in final.parent.glob("step_*"):
        if old not in (final, keep):
            shutil.rmtree(old)


def newest_good_checkpoint(directory: Path):
    """The newest checkpoint whose files all match its manifest (saying why a newer one is skipped);
    saves cut short (step_N.tmp) are removed."""
    for stale in directory.glob("step_*.tmp"):
        shutil.rmtree(stale)
    for path in sorted(directory.glob("step_*"), key=checkpoint_step, reverse=True):
        try:
            manifest = json.loads((path / "manifest.json").read_text())
            problem = next((f"{name} is missing or altered" for name, digest in manifest.items()
                            if not (path / name).is_file() or sha256(path / name) != digest), None)
        except (OSError, ValueError):
            problem = "it has no readable manifest.json"
        if problem is None:
            return path
        print(f"{path} is corrupt ({problem}): falling back to the checkpoint before it")
    return None


def load_checkpoint(path: Path, model, optimizer, trainer: dict) -> None:
    """Load path into model, optimizer and trainer, on any number of processes (DCP reshards). The
    optimizer keeps the hyperparameters of the flags given now; only its state is loaded."""
    settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = dict(model=model_state, optimizer=optimizer_state, trainer=trainer)
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"])
    for group, setting in zip(optimizer.param_groups, settings):
        group.update(setting)


# -----------------------------------------------------------------------------
# Signals: stop at a step boundary


class Interrupted(UserError):
    """SIGINT or SIGTERM: the run saved a checkpoint at a step boundary and stopped."""

    def __init__(self, message: str, signal_number: int):
        super().__init__(message)
        self.signal_number = signal_number


@contextlib.contextmanager
def stop_requests():
    """While training, SIGINT (Ctrl-C) and SIGTERM (what schedulers send) only note the signal: the
    loop then saves a checkpoint at the end of the step and stops. Yields the signals received."""
    received = []
    previous = {number: signal.signal(number, lambda number, frame: received.append(number))
                for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def interrupted(received: list, step: int, kept: Path) -> Interrupted:
    """What a stop after step raises. On a rank that got no signal itself, it was SIGTERM (torchrun
    sends it to all its workers)."""
    number = received[0] if received else signal.SIGTERM
    return Interrupted(f"stopped by {signal.Signals(number).name} after step {step}: saved "
                       f"{kept}; continue with the same command and --resume.", number)


def tell_torchrun(message: str) -> None:
    """Under torchrun, its failure report then shows message where it would show a traceback."""
    if os.environ.get("TORCHELASTIC_ERROR_FILE"):
        extra = dict(py_callstack=message, timestamp=str(int(time.time())))
        report = dict(message=dict(message=message, extraInfo=extra))
        Path(os.environ["TORCHELASTIC_ERROR_FILE"]).write_text(json.dumps(report))
