"""Time NorMuon's step on FSDP2-sharded matrices, and check it against the single-GPU result.

    torchrun --nproc_per_node 1 bench/fsdp_step.py   # baseline: plain tensors on one GPU
    torchrun --nproc_per_node 2 bench/fsdp_step.py   # fully_shard over 2 GPUs
    torchrun --nproc_per_node 8 bench/fsdp_step.py --device cpu --models tiny   # the same code path, gloo

Writes bench/results/fsdp_step_<device>_<N>.json. With N ≥ 2 every rank also keeps an unsharded copy
that it steps with the same gradients, and reports the largest relative difference of any
parameter after the timed steps.
"""

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import distribute_tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import normuon  # noqa: E402
from optimizer_step import MODELS  # noqa: E402


def build(shapes, device):
    torch.manual_seed(0)
    return nn.ModuleList(nn.Linear(columns, rows, bias=False, device=device) for rows, columns in shapes)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["350M", "1.1B"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    args = parser.parse_args()

    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = torch.device(args.device, int(os.environ["LOCAL_RANK"])) if args.device == "cuda" else torch.device("cpu")
    synchronize = torch.cuda.synchronize if args.device == "cuda" else lambda: None
    if args.device == "cuda":
        torch.cuda.set_device(device)
    results = dict(device=torch.cuda.get_device_name() if args.device == "cuda" else "cpu", torch=torch.__version__,
                   date=str(datetime.date.today()), world_size=world_size, models={})
    for model in args.models:
        layers, block_shapes = MODELS[model]
        shapes = block_shapes * layers
        sharded = build(shapes, device)
        if world_size > 1:
            for linear in sharded:
                fully_shard(linear)
            reference = build(shapes, device)
            reference_optimizer = normuon.NorMuon(reference.parameters(), lr=1e-3, weight_decay=0.1)
        optimizer = normuon.NorMuon(sharded.parameters(), lr=1e-3, weight_decay=0.1)
        generator = torch.Generator(device).manual_seed(1)  # the same gradients on every rank

        step_times = []
        for step in range(5 + args.steps):  # 5 warm-up steps
            for index, param in enumerate(sharded.parameters()):
                grad = torch.randn(param.shape, device=device, generator=generator)
                param.grad = distribute_tensor(grad, param.device_mesh, param.placements) if world_size > 1 else grad
                if world_size > 1:
                    reference[index].weight.grad = grad
            synchronize()
            dist.barrier()
            start = time.perf_counter()
            optimizer.step()
            synchronize()
            step_times.append((time.perf_counter() - start) * 1e3)
            if world_size > 1:
                reference_optimizer.step()
        row = dict(step_ms=statistics.median(step_times[5:]))
        if world_size > 1:
            row["max_relative_difference_vs_single_device"] = max(
                ((p.full_tensor() - q.detach()).norm() / q.detach().norm()).item()
                for p, q in zip(sharded.parameters(), reference.parameters()))
            del reference, reference_optimizer
        results["models"][model] = row
        if rank == 0:
            print(model, row, flush=True)
        del sharded, optimizer

    if rank == 0:
        out = Path(__file__).parent / "results" / f"fsdp_step_{args.device}_{world_size}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
