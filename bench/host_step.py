"""Is NorMuon's eager step at 124M bound by the host, and by what? One GPU.

    python bench/host_step.py bench/results/host_step_124M.json

For bench/optimizer_step.py's 124M hidden matrices (fp32, weight decay 0.1, compiled element-wise
stages, no CUDA graph), in one process, one variant after another: NorMuon with Newton–Schulz on
the Triton kernels, on torch's matmuls, our Muon (normalize=False), and two diagnostic variants
with the kernels (no `torch.cuda.device` context around the launches; the compiled stages called
without the `torch._dynamo.config.patch` that raises their recompile limit). For each: the median
step time (CUDA events, 20 steps), the median host time to enqueue one step (from a synchronized
start), the host-device syncs of one step (`torch.cuda.set_sync_debug_mode`), and the host's
busiest operations and CUDA runtime calls of one profiled step (self CPU ms, calls).
"""

import contextlib
import datetime
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import normuon  # noqa: E402
from optimizer_step import MODELS, time_cuda  # noqa: E402
from profile_step import busiest_host_operations, normuon_on  # noqa: E402


def enqueue_ms(optimizer, steps: int = 10) -> float:
    """Median host time of step() from an idle GPU: equal to the step time when host-bound."""
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        optimizer.step()
        times.append((time.perf_counter() - start) * 1e3)
    torch.cuda.synchronize()
    return statistics.median(times)


def host_syncs(optimizer) -> list:
    torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optimizer.step()
    torch.cuda.set_sync_debug_mode("default")
    return [str(w.message)[:200] for w in caught]


def measure(patch: dict, **options) -> dict:
    """One variant, with normuon's attributes in ``patch`` replaced for its duration."""
    saved = {name: getattr(normuon, name) for name in patch}
    for name, value in patch.items():
        setattr(normuon, name, value)
    try:
        layers, block_shapes = MODELS["124M"]
        optimizer = normuon_on(block_shapes * layers, **options)
        for _ in range(5):  # warm-up: compilation and autotuning
            optimizer.step()
        result = dict(step_ms=time_cuda(optimizer.step, warmup=2, repeats=20),
                      enqueue_ms=enqueue_ms(optimizer), syncs=host_syncs(optimizer),
                      host=[(name, round(ms, 3), calls) for name, ms, calls
                            in busiest_host_operations(optimizer)[:25]])
        del optimizer
        torch.cuda.empty_cache()
        return result
    finally:
        for name, value in saved.items():
            setattr(normuon, name, value)


def main():
    compiled = {}

    def compiled_plainly(function):  # torch.compile without the recompile-limit patch per call
        if function not in compiled:
            compiled[function] = torch.compile(function, dynamic=False)
        return compiled[function]

    variants = {
        "normuon kernels": ({}, {}),
        "normuon torch NS": ({"NS_KERNELS": "torch"}, {}),
        "muon kernels": ({}, dict(normalize=False)),
        "normuon kernels, no device context": (
            {"_on_device": lambda x: contextlib.nullcontext()}, {}),
        "normuon kernels, compiled without config.patch": ({"_compiled": compiled_plainly}, {}),
    }
    results = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                   date=str(datetime.date.today()), command="python bench/host_step.py",
                   variants={})
    for name, (patch, options) in variants.items():
        r = results["variants"][name] = measure(patch, **options)
        print(f"{name}: step {r['step_ms']:.2f} ms, enqueue {r['enqueue_ms']:.2f} ms, "
              f"syncs {len(r['syncs'])}", flush=True)
        Path(sys.argv[1]).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
