"""Training throughput, MFU and peak memory of train_gpt.py on GPUs.

    python bench/train_throughput.py                                  # one GPU: AdamW, Muon, NorMuon
    (normuon+graph: NorMuon with --cuda_graph, its step replayed as one CUDA graph)
    python bench/train_throughput.py --gpus 1 2 --optimizers normuon  # 1 vs 2 GPUs (FSDP2), same GPU kind

Each run is `torchrun --nproc_per_node G train_gpt.py --preset gpt2-124m --compile` on the default corpus,
64 sequences of 1024 tokens per GPU per step (as modded-nanogpt; the global batch grows with G: weak
scaling), 50 steps.
Tokens/s is the median over the log intervals after the first (which holds the compilation). MFU is taken
against the bf16 matmul rate measured here first (8192³), not the data-sheet peak. Writes
bench/results/train_throughput_<gpus>.json.
"""

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from optimizer_step import bf16_matmul_tflops  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def run(gpus: int, optimizer: str, args, peak_tflops: float, out_dir: str) -> dict:
    name, graph = optimizer.removesuffix("+graph"), optimizer.endswith("+graph")
    run_name = f"{optimizer.replace('+', '-')}-{gpus}"
    command = ["torchrun", "--standalone", f"--nproc_per_node={gpus}", str(ROOT / "train_gpt.py"),
               "--preset", args.preset, "--compile", "--optimizer", name, *["--cuda_graph"] * graph,
               "--batch_size", str(args.batch_per_gpu * gpus), "--max_steps", str(args.steps),
               "--log_interval", "10", "--eval_interval", str(args.steps), "--eval_batches", "1",
               "--checkpoint_interval", str(args.steps), "--sample_tokens", "0", "--peak_tflops", str(peak_tflops),
               "--out_dir", out_dir, "--run_name", run_name, "--data_dir", str(ROOT / "data")]
    print(" ".join(command[2:]), flush=True)
    subprocess.run(command, check=True)
    records = [json.loads(line) for line in (Path(out_dir) / run_name / "metrics.jsonl").open()]
    timed = records[1:]  # the first interval includes torch.compile
    return dict(gpus=gpus, optimizer=optimizer, sequences_per_step=args.batch_per_gpu * gpus,
                tokens_per_second=statistics.median(r["tokens_per_second"] for r in timed),
                step_ms=statistics.median(r["step_ms"] for r in timed),
                mfu_of_measured_matmul=statistics.median(r["mfu"] for r in timed),
                peak_memory_gib_per_gpu=max(r["peak_memory_gib"] for r in records),
                final_train_loss=records[-1]["train_loss"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpus", type=int, nargs="+", default=[1])
    parser.add_argument("--optimizers", nargs="+", default=["adamw", "muon", "normuon", "normuon+graph"])
    parser.add_argument("--preset", default="gpt2-124m")
    parser.add_argument("--batch_per_gpu", type=int, default=64)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--out", default=None, help="default: bench/results/train_throughput_<gpus>gpu.json")
    args = parser.parse_args()

    peak_tflops = bf16_matmul_tflops()
    results = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, date=str(datetime.date.today()),
                   preset=args.preset, measured_bf16_matmul_tflops=peak_tflops, runs=[])
    with tempfile.TemporaryDirectory() as out_dir:  # checkpoints of 124M models: not kept
        for gpus in args.gpus:
            for optimizer in args.optimizers:
                results["runs"].append(run(gpus, optimizer, args, peak_tflops, out_dir))
                print(results["runs"][-1], flush=True)
    name = "_".join(map(str, args.gpus))
    Path(args.out or ROOT / "bench" / "results" / f"train_throughput_{name}gpu.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
