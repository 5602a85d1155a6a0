"""Runs NorMuon on an FSDP2-sharded model and on an unsharded copy with the same gradients, and
writes how far apart they end up. Launched by tests/test_normuon.py as

    torchrun --nproc_per_node N tests/fsdp_worker.py RESULT.json

on the CPU with gloo. The model has matrices of several shapes, four of the same shape (batched
into one NS; more than ranks, so owners wrap around), a conv kernel, and matrices with fewer rows
than ranks (some ranks hold no rows). It also counts the NS calls on each rank, and checks that a
parameter FSDP2 would not make (replicated) is refused."""

import json
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Replicate, distribute_tensor

sys.path.insert(0, __file__.rsplit("/tests/", 1)[0])
import normuon  # noqa: E402


def build_model():
    torch.manual_seed(0)
    return nn.ModuleDict(dict(
        up=nn.Linear(16, 40, bias=False),      # 40 rows: uneven over 3 ranks (14, 14, 12)
        down_a=nn.Linear(40, 2, bias=False),   # 2 rows: fewer rows than ranks
        down_b=nn.Linear(40, 2, bias=False),   # same shape as down_a: one batched NS
        down_c=nn.Linear(40, 2, bias=False),
        down_d=nn.Linear(40, 2, bias=False),
        square=nn.Linear(24, 24, bias=False),
        conv=nn.Conv2d(4, 6, 3, bias=False),  # (6, 4, 3, 3): the (6, 36) matrix
    ))


def build_optimizer(model):
    """Three groups: the paper's NorMuon, the released code's NorMuon, and plain Muon."""
    return normuon.NorMuon([
        dict(params=[model.up.weight, model.down_a.weight, model.down_b.weight, model.down_c.weight,
                     model.down_d.weight], weight_decay=0.1),
        dict(params=[model.square.weight], adjust_lr_fn="original", nesterov=True, lr=0.02),
        dict(params=[model.conv.weight], normalize=False),
    ], lr=0.01)


def relative_error(actual, expected):
    return ((actual - expected).norm() / expected.norm().clamp(min=1e-30)).item()


def main():
    dist.init_process_group("gloo")
    reference, sharded = build_model(), build_model()
    for module in sharded.values():  # each matrix its own FSDP2 unit, sharded by rows
        fully_shard(module)
    reference_optimizer, sharded_optimizer = build_optimizer(reference), build_optimizer(sharded)

    orthogonalized = [0]  # matrices this rank's newton_schulz calls received (the reference runs after counting)
    original_newton_schulz = normuon.newton_schulz

    def counting_newton_schulz(matrix, *args, **kwargs):
        orthogonalized[0] += matrix.reshape(-1, *matrix.shape[-2:]).shape[0]
        return original_newton_schulz(matrix, *args, **kwargs)

    generator = torch.Generator().manual_seed(1)  # the same gradients on every rank
    for step in range(6):
        for ref_param, param in zip(reference.parameters(), sharded.parameters()):
            grad = torch.randn(ref_param.shape, generator=generator)
            ref_param.grad = grad
            param.grad = distribute_tensor(grad, param.device_mesh, param.placements)
        reference_optimizer.step()
        normuon.newton_schulz = counting_newton_schulz if step == 0 else original_newton_schulz
        sharded_optimizer.step()
    normuon.newton_schulz = original_newton_schulz

    try:
        replicated = distribute_tensor(torch.zeros(4, 4), sharded["up"].weight.device_mesh, [Replicate()])
        normuon.NorMuon([nn.Parameter(replicated)])
        replicated_parameter_error = "no error"
    except ValueError as error:
        replicated_parameter_error = str(error)

    param_errors, state_errors = {}, {}
    for (name, ref_param), param in zip(reference.named_parameters(), sharded.parameters()):
        param_errors[name] = relative_error(param.full_tensor(), ref_param.detach())
        for key, value in sharded_optimizer.state[param].items():
            state_errors[f"{name}.{key}"] = relative_error(value.full_tensor(), reference_optimizer.state[ref_param][key])

    state_dict = sharded_optimizer.state_dict()["state"]
    keys = {index: sorted(state) for index, state in state_dict.items()}
    local_rows = {name: param.to_local().shape[0] for name, param in sharded.named_parameters()}
    all_keys, all_rows, all_counts = ([None] * dist.get_world_size() for _ in range(3))
    dist.all_gather_object(all_keys, keys)
    dist.all_gather_object(all_rows, local_rows)
    dist.all_gather_object(all_counts, orthogonalized[0])
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(dict(param_errors=param_errors, state_errors=state_errors, state_keys=all_keys,
                           local_rows=all_rows, matrices_orthogonalized_per_rank_per_step=all_counts,
                           matrices=len(list(sharded.parameters())),
                           replicated_parameter_error=replicated_parameter_error), f, indent=1)
    dist.barrier()  # gloo can abort at exit if one rank tears down while others still talk
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
