"""NorMuon's FSDP2 path with cuda_graph=True against the eager step, on one GPU under NCCL
(world size 1: the owner plan's all_to_all and all-reduce run inside the captured graph).
Launched by tests/test_cuda_graph.py as

    torchrun --nproc_per_node 1 tests/graph_worker.py RESULT.json

Two copies of the same DTensor parameters (Shard(0) on a one-GPU mesh, as fully_shard makes them),
the same gradients each step (new tensors, as after zero_grad()), an lr that falls every step and
an AdamW group; writes the relative difference of each parameter's change."""

import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

sys.path.insert(0, __file__.rsplit("/tests/", 1)[0])
import normuon  # noqa: E402

SHAPES = [(96, 32), (96, 32), (32, 128), (64,)]  # two of one shape (one batched NS), wide, AdamW


def build(mesh, cuda_graph: bool):
    torch.manual_seed(0)
    params = [nn.Parameter(distribute_tensor(torch.randn(shape, device="cuda") * 0.1, mesh,
                                             [Shard(0)])) for shape in SHAPES]
    groups = [dict(params=params[:3]), dict(params=params[3:], use_muon=False, lr=3e-3)]
    return params, normuon.NorMuon(groups, lr=0.02, weight_decay=0.1, cuda_graph=cuda_graph)


def main():
    torch.cuda.set_device(0)
    dist.init_process_group("nccl")
    mesh = init_device_mesh("cuda", (1,))
    (eager, eager_optimizer), (graphed, graphed_optimizer) = build(mesh, False), build(mesh, True)
    initial = [p.full_tensor().detach().clone() for p in eager]
    for step in range(8):
        for p, q in zip(eager, graphed):
            p.grad = distribute_tensor(torch.randn(p.shape, device="cuda"), mesh, [Shard(0)])
            q.grad = p.grad.clone()
        for optimizer in (eager_optimizer, graphed_optimizer):
            optimizer.param_groups[0]["lr"] = 0.02 * (1 - step / 8)
            optimizer.step()
    torch.cuda.synchronize()
    errors = [((p.full_tensor() - q.full_tensor()).norm() / (p.full_tensor() - p0).norm()).item()
              for p, q, p0 in zip(eager, graphed, initial)]
    with open(sys.argv[1], "w") as file:
        json.dump(dict(errors=errors, replayed="_captured" in graphed_optimizer.__dict__), file)
    # One rank: nothing to wait for. Leave without tearing NCCL down (a barrier there after the
    # captured collectives did not return within a minute on an H200).
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
