"""Where the GPU time of one NorMuon step goes, against its two floors, on one GPU.

    python bench/profile_step.py            # writes bench/results/profile_step.json

For the hidden matrices of bench/optimizer_step.py's models (fp32 parameters, weight decay 0.1), one
step under torch.profiler after warm-up (compiled, eager, and replayed from a CUDA graph): GPU
kernel time split into GEMM (Newton–Schulz), copies, and the rest (element-wise and reductions),
next to
  - the NS floor: NS FLOPs / the bf16 matmul rate measured here (8192³), and
  - the byte floor: each fp32 gradient read once, momentum and parameter read and written once
    (20 bytes per parameter) / the copy bandwidth measured here (counting bytes read and written);
and, from one more step, the host's busiest operations (self CPU time), for launch-bound steps.
"""

import argparse
import datetime
import json
import re
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import normuon  # noqa: E402
from optimizer_step import MODELS, bf16_matmul_tflops, newton_schulz_flops, time_cuda  # noqa: E402

# cuBLAS's kernels, and normuon.py's Triton kernels for Newton–Schulz's products
GEMM = re.compile(r"gemm|xmma|cutlass|nvjet|sm90_|cublas"
                  r"|_symmetric_product_kernel|_product_plus_kernel", re.IGNORECASE)
COPY = re.compile(r"memcpy|memset|copy_kernel|CatArrayBatchedCopy", re.IGNORECASE)


def copy_bandwidth_gbs(gigabytes: float = 2.0) -> float:
    source = torch.empty(int(gigabytes * 2**30) // 4, device="cuda")
    target = torch.empty_like(source)
    milliseconds = time_cuda(lambda: target.copy_(source), warmup=3, repeats=10)
    return 2 * source.numel() * 4 / milliseconds / 1e6


VARIANTS = {"compiled": dict(compile=True), "eager": dict(compile=False),
            "graphed": dict(compile=True, cuda_graph=True)}


def normuon_on(shapes, **options) -> normuon.NorMuon:
    """NorMuon (lr 1e-3, weight decay 0.1) on new fp32 CUDA matrices of ``shapes``, each with a
    gradient."""
    params = [torch.nn.Parameter(torch.randn(shape, device="cuda") * 0.02) for shape in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    return normuon.NorMuon(params, lr=1e-3, weight_decay=0.1, **options)


def busiest_host_operations(optimizer) -> list:
    """(name, self CPU ms, calls) of one step's operators and CUDA runtime calls (launches,
    copies, syncs), busiest first: where the host's time goes."""
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
        optimizer.step()
        torch.cuda.synchronize()
    host = [(e.key, e.self_cpu_time_total / 1e3, e.count)
            for e in profiler.key_averages() if e.device_type == torch.autograd.DeviceType.CPU]
    return sorted(host, key=lambda item: -item[1])


def profile_step(shapes, options: dict) -> dict:
    optimizer = normuon_on(shapes, **options)
    for _ in range(5):  # warm-up, compilation included
        optimizer.step()
    step_ms = time_cuda(optimizer.step, warmup=2, repeats=10)
    with profile(activities=[ProfilerActivity.CUDA]) as profiler:
        optimizer.step()
        torch.cuda.synchronize()
    host = busiest_host_operations(optimizer)
    kernels = {}
    for event in profiler.key_averages():
        if event.device_time_total > 0:
            kernels[event.key] = kernels.get(event.key, 0.0) + event.device_time_total / 1e3  # ms
    split = dict(gemm_ms=0.0, copy_ms=0.0, other_ms=0.0)
    for name, milliseconds in kernels.items():
        kind = "gemm_ms" if GEMM.search(name) else "copy_ms" if COPY.search(name) else "other_ms"
        split[kind] += milliseconds
    top = sorted(kernels.items(), key=lambda item: -item[1])[:12]
    del optimizer
    torch.cuda.empty_cache()
    return dict(step_ms=step_ms, gpu_ms=sum(kernels.values()), **split, top_kernels_ms=dict(top),
                host_self_ms={name: ms for name, ms, _ in host[:15]})


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["124M", "1.1B"])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "profile_step.json"))
    args = parser.parse_args()
    matmul_tflops, bandwidth = bf16_matmul_tflops(), copy_bandwidth_gbs()
    results = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, date=str(datetime.date.today()),
                   command="python bench/profile_step.py", bf16_matmul_tflops=matmul_tflops,
                   copy_bandwidth_gbs=bandwidth, models={})
    for model in args.models:
        layers, block_shapes = MODELS[model]
        shapes = block_shapes * layers
        parameters = sum(a * b for a, b in shapes)
        row = dict(parameters=parameters, ns_floor_ms=newton_schulz_flops(shapes) / matmul_tflops / 1e9,
                   byte_floor_ms=20 * parameters / bandwidth / 1e6)
        for variant, options in VARIANTS.items():
            row[variant] = profile_step(shapes, options)
        results["models"][model] = row
        for variant in VARIANTS:
            r = row[variant]
            print(f"{model} {variant}: step {r['step_ms']:.2f} ms, GPU {r['gpu_ms']:.2f} = GEMM {r['gemm_ms']:.2f} + "
                  f"copy {r['copy_ms']:.2f} + other {r['other_ms']:.2f}; floors: NS {row['ns_floor_ms']:.2f}, "
                  f"bytes {row['byte_floor_ms']:.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
