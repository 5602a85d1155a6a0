"""Runs NorMuon on DTensor parameters with tensor-parallel placements (Shard(1), Shard(0) on either
axis, mixed with replication) on a 2-D (dp, tp) mesh of 4 ranks and a 1-D mesh, against plain tensors
with the same gradients, and writes how far apart they end up. Launched by tests/test_options.py as

    torchrun --nproc_per_node 4 tests/tp_worker.py RESULT.json

on the CPU with gloo. Shapes are uneven over 2 and 4 ranks; every layout and the options appear."""

import json
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

sys.path.insert(0, __file__.rsplit("/tests/", 1)[0])
import normuon  # noqa: E402
from gloo_exit import end_worker  # noqa: E402

# name: (shape, placements on the 2-D mesh, or on the 1-D mesh if "1d", NorMuon group settings)
CASES = {
    "rows_and_columns": ((14, 10), (Shard(0), Shard(1)), dict()),
    "columns_and_rows": ((12, 9), (Shard(1), Shard(0)), dict(adjust_lr_fn="original", nesterov=True)),
    "rows_twice": ((10, 7), (Shard(0), Shard(0)), dict(normalize=False)),
    "conv1d_colwise": ((9, 13), (Replicate(), Shard(1)), dict(layout="in_out")),
    "conv": ((6, 4, 3, 3), (Shard(0), Shard(1)), dict(layout="conv")),
    "experts": ((4, 6, 5), (Shard(0), Shard(2)), dict(layout="experts_out_in")),
    "wide_options": ((6, 30), (Shard(1), Replicate()), dict(
        neuron_axis="larger", cautious_weight_decay=True, weight_decay=0.1,
        ns_coefficients=normuon.POLAR_EXPRESS_COEFFICIENTS)),
    "tp_only": ((8, 10), "1d", dict()),
    "bias": ((11,), (Shard(0), Replicate()), dict(use_muon=False, lr=3e-3)),
}


def relative_error(actual, expected):
    return ((actual - expected).norm() / expected.norm().clamp(min=1e-30)).item()


def main():
    dist.init_process_group("gloo")
    mesh_2d = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    mesh_1d = init_device_mesh("cpu", (4,))
    torch.manual_seed(0)
    reference, sharded = {}, {}
    for name, (shape, placements, _) in CASES.items():
        full = torch.randn(shape) * 0.1
        mesh, placements = (mesh_1d, [Shard(1)]) if placements == "1d" else (mesh_2d, placements)
        reference[name] = nn.Parameter(full.clone())
        sharded[name] = nn.Parameter(distribute_tensor(full.clone(), mesh, placements))
    groups = lambda params: [dict(params=[params[name]], **settings)
                             for name, (_, _, settings) in CASES.items()]
    reference_optimizer = normuon.NorMuon(groups(reference), lr=0.01)
    sharded_optimizer = normuon.NorMuon(groups(sharded), lr=0.01)

    generator = torch.Generator().manual_seed(1)  # the same gradients on every rank
    for _ in range(5):
        for name in CASES:
            grad = torch.randn(reference[name].shape, generator=generator)
            reference[name].grad = grad
            param = sharded[name]
            param.grad = distribute_tensor(grad.clone(), param.device_mesh, param.placements)
        reference_optimizer.step()
        sharded_optimizer.step()

    full = lambda t: t.full_tensor() if isinstance(t, DTensor) else t
    param_errors = {name: relative_error(sharded[name].full_tensor(), reference[name].detach())
                    for name in CASES}
    state_errors = {f"{name}.{key}": relative_error(full(value), reference_optimizer.state[reference[name]][key])
                    for name in CASES for key, value in sharded_optimizer.state[sharded[name]].items()}
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(dict(param_errors=param_errors, state_errors=state_errors), f, indent=1)
    end_worker()


if __name__ == "__main__":
    main()
