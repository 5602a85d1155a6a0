"""Newton–Schulz on one GPU: normuon.py's Triton kernels against its torch path, shape by shape.

    python bench/ns_kernels.py                     # writes bench/results/ns_kernels.json

For the hidden-matrix shapes of three GPT sizes, batched by shape as NorMuon batches them (batch =
number of layers): ``newton_schulz`` (5 steps, Muon's coefficients) on torch's matmul/baddbmm and
on the kernels, called eagerly and replayed as a CUDA graph (GPU time, no launch overhead), and
each product alone, graphed (A = X Xᵀ, b A + c A², a X + P X), against torch's. Median of 20
CUDA-event timings after warm-up (autotuning happens there); TFLOP/s from GPU time, counting the
full FLOPs (2mnk per product, also for the symmetric ones, which compute half the tiles); the
largest relative difference (Frobenius, per matrix) kernels vs torch; the autotuner's choices.
"""

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import normuon  # noqa: E402
from optimizer_step import time_cuda, with_kernels  # noqa: E402

# (layers, [(rows, columns)]) of one block's NS matrices: QKV, attention out, MLP up, MLP down.
MODELS = {
    "124M": (12, [(768, 2304), (768, 768), (768, 3072), (3072, 768)]),
    "350M": (24, [(1024, 3072), (1024, 1024), (1024, 4096), (4096, 1024)]),
    "1.1B": (16, [(2048, 6144), (2048, 2048), (2048, 8192), (8192, 2048)]),
}
STEPS = 5


def graphed(call):
    """``call`` recorded once as a CUDA graph, after an eager call (which autotunes); its replay."""
    call()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    return graph.replay


def products(x):
    """The three products of NS's first step on ``x`` (batch, rows, columns), as NS runs them."""
    x = x.mT if x.size(-2) > x.size(-1) else x  # tall: the transposed view, no copy
    x = x / x.norm(dim=(-2, -1), keepdim=True)
    a, b, c = normuon.MUON_COEFFICIENTS
    gram = normuon.symmetric_product(x)
    rows, columns = x.shape[-2:]
    return {  # name: (function, arguments, full FLOPs)
        "gram": (normuon.symmetric_product, (x,), 2 * rows * rows * columns),
        "polynomial": (normuon.symmetric_product, (gram, c, b, gram), 2 * rows ** 3),
        "product_plus": (normuon.product_plus, (gram, x, a), 2 * rows * rows * columns),
    }


def relative_difference(ours, theirs) -> float:
    ours, theirs = ours.flatten(1).double(), theirs.flatten(1).double()
    return ((ours - theirs).norm(dim=1) / theirs.norm(dim=1)).max().item()


def bench_shape(layers: int, shape, repeats: int) -> dict:
    x = torch.randn(layers, *shape, device="cuda", dtype=torch.bfloat16)
    rows, columns = min(shape), max(shape)
    row = dict(batch=layers, shape=list(shape), ns_flops=layers * STEPS * (4 * rows ** 2 * columns
                                                                            + 2 * rows ** 3))
    for mode in ("torch", "triton"):
        call = with_kernels(mode, normuon.newton_schulz, x)
        row[f"ns_{mode}_ms"] = time_cuda(call, 3, repeats)
        row[f"ns_{mode}_graphed_ms"] = time_cuda(graphed(call), 3, repeats)
        row[f"ns_{mode}_tflops"] = row["ns_flops"] / row[f"ns_{mode}_graphed_ms"] / 1e9
    outputs = {mode: with_kernels(mode, normuon.newton_schulz, x)() for mode in ("torch", "triton")}
    row["ns_max_relative_difference"] = relative_difference(outputs["triton"], outputs["torch"])
    for name, (function, args, flops) in products(x).items():
        for mode in ("torch", "triton"):
            ms = time_cuda(graphed(with_kernels(mode, function, *args)), 3, repeats)
            row[f"{name}_{mode}_ms"], row[f"{name}_{mode}_tflops"] = ms, layers * flops / ms / 1e9
        ours, theirs = (with_kernels(mode, function, *args)() for mode in ("triton", "torch"))
        row[f"{name}_max_relative_difference"] = relative_difference(ours, theirs)
    return row


def chosen_configs() -> dict:
    """What the autotuner picked for each key (sizes, stride) of each kernel."""
    return {name: {str(key): str(config) for key, config in kernel.cache.items()}
            for name, kernel in (("symmetric_product", normuon._symmetric_product_kernel),
                                 ("product_plus", normuon._product_plus_kernel))}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "ns_kernels.json"))
    args = parser.parse_args()
    if normuon.triton is None or not torch.cuda.is_available():
        sys.exit("bench/ns_kernels.py needs a CUDA GPU and triton.")

    import triton
    results = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                   triton=triton.__version__, date=str(datetime.date.today()), models={})
    print(f"{results['gpu']}, torch {results['torch']}, triton {results['triton']}")
    print("| model | shape (batch) | NS torch ms | NS triton ms | speed-up | graphed: torch ms | "
          "triton ms | speed-up | max rel. diff | gram torch / triton TFLOP/s | polynomial | "
          "product_plus |")
    print("|---" * 12 + "|")
    for model in args.models:
        layers, shapes = MODELS[model]
        rows = [bench_shape(layers, shape, args.repeats) for shape in shapes]
        total = {f"ns_{mode}{graph}_ms": sum(r[f"ns_{mode}{graph}_ms"] for r in rows)
                 for mode in ("torch", "triton") for graph in ("", "_graphed")}
        total["speedup"] = total["ns_torch_ms"] / total["ns_triton_ms"]
        total["graphed_speedup"] = total["ns_torch_graphed_ms"] / total["ns_triton_graphed_ms"]
        results["models"][model] = dict(shapes=rows, total=total)
        for r in rows:
            rates = " | ".join(f"{r[f'{name}_torch_tflops']:.0f} / {r[f'{name}_triton_tflops']:.0f}"
                               for name in ("gram", "polynomial", "product_plus"))
            print(f"| {model} | {r['shape'][0]}×{r['shape'][1]} ({layers}) | "
                  f"{r['ns_torch_ms']:.3f} | {r['ns_triton_ms']:.3f} | "
                  f"{r['ns_torch_ms'] / r['ns_triton_ms']:.2f}× | {r['ns_torch_graphed_ms']:.3f} | "
                  f"{r['ns_triton_graphed_ms']:.3f} | "
                  f"{r['ns_torch_graphed_ms'] / r['ns_triton_graphed_ms']:.2f}× | "
                  f"{r['ns_max_relative_difference']:.1e} | {rates} |", flush=True)
        print(f"| {model} | sum | {total['ns_torch_ms']:.3f} | {total['ns_triton_ms']:.3f} | "
              f"{total['speedup']:.2f}× | {total['ns_torch_graphed_ms']:.3f} | "
              f"{total['ns_triton_graphed_ms']:.3f} | {total['graphed_speedup']:.2f}× | | | | |",
              flush=True)
    results["autotuned"] = chosen_configs()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
