"""Time one optimizer step on the hidden matrices of three GPT sizes, on one GPU.

    python bench/optimizer_step.py                 # writes bench/results/optimizer_step.json

For torch.optim.AdamW(fused=True), torch.optim.Muon, our NorMuon (element-wise stages compiled, the
default on CUDA, and not; and with cuda_graph=True, also with Polar Express; and with Newton–Schulz
on torch's matmuls instead of normuon.py's Triton kernels, eager and graphed), and our Muon
(normalize=False, eager and with cuda_graph=True):
median step time over 30 steps after 5 warm-up steps (CUDA events, fp32 parameters, fresh random
gradients), the Newton–Schulz FLOPs per step, the TFLOP/s that implies, the bf16 matmul rate of
this GPU measured in the same run (8192³), each step's ratio to the NS floor (NS FLOPs at that
rate), and optimizer-state bytes per parameter byte.
"""

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import normuon  # noqa: E402

# nn.Linear weight shapes (out, in) of one transformer block: fused QKV, attention out, MLP up, MLP down.
MODELS = {
    "124M": (12, [(2304, 768), (768, 768), (3072, 768), (768, 3072)]),
    "350M": (24, [(3072, 1024), (1024, 1024), (4096, 1024), (1024, 4096)]),
    "1.1B": (16, [(3072, 2048), (2048, 2048), (8192, 2048), (2048, 8192)]),
    "tiny": (2, [(96, 32), (32, 32), (128, 32), (32, 128), (5, 32)]),  # CPU checks of the FSDP2 path; 5 rows < 8 ranks
}


def with_kernels(mode: str, function, *args):
    """``function(*args)`` with normuon's Newton–Schulz products on ``mode``: "triton" or "torch"."""
    def call():
        normuon.NS_KERNELS = mode
        try:
            return function(*args)
        finally:
            normuon.NS_KERNELS = "auto"
    return call


class TorchMatmuls(normuon.NorMuon):
    """NorMuon with Newton–Schulz on torch's matmuls instead of the Triton kernels: the step before them."""

    def step(self, closure=None):
        return with_kernels("torch", super().step, closure)()


OPTIMIZERS = {
    "AdamW (torch, fused)": lambda params: torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1, fused=True),
    "Muon (torch)": lambda params: torch.optim.Muon(params, lr=1e-3, weight_decay=0.1, adjust_lr_fn="match_rms_adamw"),
    "NorMuon (ours)": lambda params: normuon.NorMuon(params, lr=1e-3, weight_decay=0.1),
    "NorMuon (ours, compile=False)": lambda params: normuon.NorMuon(params, lr=1e-3, weight_decay=0.1, compile=False),
    "Muon (ours, normalize=False)": lambda params: normuon.NorMuon(params, lr=1e-3, weight_decay=0.1, normalize=False),
    "NorMuon (ours, cuda_graph=True)": lambda params: normuon.NorMuon(params, lr=1e-3, weight_decay=0.1,
                                                                      cuda_graph=True),
    "Muon (ours, normalize=False, cuda_graph=True)": lambda params: normuon.NorMuon(
        params, lr=1e-3, weight_decay=0.1, normalize=False, cuda_graph=True),
    "NorMuon (ours, NS on torch matmuls)": lambda params: TorchMatmuls(params, lr=1e-3, weight_decay=0.1),
    "NorMuon (ours, NS on torch matmuls, cuda_graph=True)": lambda params: TorchMatmuls(
        params, lr=1e-3, weight_decay=0.1, cuda_graph=True),
    "NorMuon (ours, Polar Express, cuda_graph=True)": lambda params: normuon.NorMuon(
        params, lr=1e-3, weight_decay=0.1, ns_coefficients=normuon.POLAR_EXPRESS_COEFFICIENTS, cuda_graph=True),
}


def newton_schulz_flops(shapes) -> float:
    """5 iterations of X Xᵀ (2a²b), A² (2a³) and (bA + cA²) X (2a²b) for an a×b matrix, a ≤ b."""
    return sum(5 * (4 * min(s) ** 2 * max(s) + 2 * min(s) ** 3) for s in shapes)


def time_cuda(function, warmup: int, repeats: int) -> float:
    """Median milliseconds of one call, each timed with its own pair of CUDA events."""
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        function()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def bf16_matmul_tflops(size: int = 8192) -> float:
    a, b = (torch.randn(size, size, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    return 2 * size ** 3 / time_cuda(lambda: a @ b, warmup=5, repeats=20) / 1e9


def time_optimizer(make_optimizer, shapes, warmup: int, repeats: int):
    params = [torch.nn.Parameter(torch.randn(shape, device="cuda") * 0.02) for shape in shapes]
    optimizer = make_optimizer(params)
    gradients = [[torch.randn_like(p) for p in params] for _ in range(2)]  # alternate: no cache reuse
    calls = [0]

    def step():
        for p, g in zip(params, gradients[calls[0] % 2]):
            p.grad = g
        for group in optimizer.param_groups:  # a schedule changes lr every step: that must not recompile
            group["lr"] = 1e-3 * (1 + calls[0] % 7) / 7
        optimizer.step()
        calls[0] += 1

    milliseconds = time_cuda(step, warmup, repeats)
    state_bytes = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                      if torch.is_tensor(t) and t.ndim > 0)
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    del optimizer, params, gradients
    torch.cuda.empty_cache()
    return milliseconds, state_bytes / param_bytes


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["124M", "350M", "1.1B"])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=list(OPTIMIZERS),
                        metavar="NAME", help="a subset of the rows (default: all)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "optimizer_step.json"))
    args = parser.parse_args()

    matmul_tflops = bf16_matmul_tflops()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}: bf16 matmul 8192³ {matmul_tflops:.0f} TFLOP/s")
    results = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, date=str(datetime.date.today()),
                   bf16_matmul_tflops=matmul_tflops, models={})
    for model in args.models:
        layers, block_shapes = MODELS[model]
        shapes = block_shapes * layers
        flops = newton_schulz_flops(shapes)
        row = dict(parameters=sum(a * b for a, b in shapes), ns_tflop_per_step=flops / 1e12,
                   ns_floor_ms=flops / matmul_tflops / 1e9, optimizers={})
        for name in args.optimizers:
            make = OPTIMIZERS[name]
            milliseconds, state_per_param = time_optimizer(make, shapes, warmup=5, repeats=args.repeats)
            row["optimizers"][name] = dict(ms=milliseconds, state_bytes_per_param_byte=state_per_param,
                                           ns_tflops=None if name.startswith("AdamW") else flops / milliseconds / 1e9,
                                           over_ns_floor=milliseconds / row["ns_floor_ms"])
            print(f"{model} {name}: {milliseconds:.2f} ms ({milliseconds / row['ns_floor_ms']:.2f}x NS floor)",
                  flush=True)
            results["models"][model] = row
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(results, indent=1))  # after each row: a cut run keeps them
        ms = {name: entry["ms"] for name, entry in row["optimizers"].items()}
        ratios = dict(normuon_over_torch_muon=("NorMuon (ours)", "Muon (torch)"),
                      normuon_over_our_muon=("NorMuon (ours)", "Muon (ours, normalize=False)"),
                      graphed_normuon_over_graphed_muon=("NorMuon (ours, cuda_graph=True)",
                                                         "Muon (ours, normalize=False, cuda_graph=True)"))
        for key, (top, bottom) in ratios.items():  # those whose rows ran
            if top in ms and bottom in ms:
                row[key] = ms[top] / ms[bottom]
    Path(args.out).write_text(json.dumps(results, indent=1))
    print("\n| model | NS floor ms | " + " | ".join(args.optimizers) + " | ours/torch Muon | NorMuon/our Muon |")
    print("|---" * (len(args.optimizers) + 4) + "|")
    for model, row in results["models"].items():
        cells = " | ".join(f"{entry['ms']:.2f}" for entry in row["optimizers"].values())
        print(f"| {model} | {row['ns_floor_ms']:.2f} | {cells} | {row.get('normuon_over_torch_muon', 0):.2f} | {row.get('normuon_over_our_muon', 0):.2f} |")
    print("\nstate bytes / param byte: " + ", ".join(
        f"{name} {entry['state_bytes_per_param_byte']:.4f}" for name, entry in results["models"][args.models[0]]["optimizers"].items()))


if __name__ == "__main__":
    main()
