"""Runs NorMuon on an FSDP2-sharded model and on an unsharded copy with the same gradients, and
writes how far apart they end up. Launched by tests/test_normuon.py as

    torchrun --nproc_per_node N tests/fsdp_worker.py RESULT.json [R S]

on the CPU with gloo: FSDP2 on N ranks, or with R S (R·S = N) HSDP on an (R, S) mesh of (replicate,
shard). The model has a weight of every layout (nn.Linear (out, in), Conv1D-style
(in, out), a conv kernel, stacked experts both ways), four matrices of one shape (one batched NS;
more than ranks, so owners wrap around), and tensors with fewer dim-0 rows than ranks (some ranks hold
none), the options (neuron_axis="larger" on wide matrices of every layout, cautious weight decay,
Polar Express) and an AdamW group (a norm's weight and bias). It also checks that a parameter FSDP2
would not make (replicated) and a 3-D mesh are refused."""

import json
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate, distribute_tensor

sys.path.insert(0, __file__.rsplit("/tests/", 1)[0])
import normuon  # noqa: E402
from gloo_exit import end_worker  # noqa: E402


class Weight(nn.Module):
    """A bare weight of any layout (FSDP2 shards it on dim 0 like any other)."""

    def __init__(self, *shape):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(shape) * 0.1)


def build_model():
    torch.manual_seed(0)
    return nn.ModuleDict(dict(
        up=nn.Linear(16, 40, bias=False),      # 40 rows: uneven over 3 ranks (14, 14, 12)
        down_a=nn.Linear(40, 2, bias=False),   # 2 rows: fewer rows than ranks
        down_b=nn.Linear(40, 2, bias=False),   # same shape as down_a: one batched NS
        down_c=nn.Linear(40, 2, bias=False),
        down_d=nn.Linear(40, 2, bias=False),
        square=nn.Linear(24, 24, bias=False),
        muon=nn.Linear(12, 20, bias=False),
        conv=nn.Conv2d(4, 6, 3, bias=False),   # (6, 4, 3, 3): the (6, 36) matrix
        in_out=Weight(10, 14),                 # (in, out): shards split every neuron (4, 4, 2 inputs on 3 ranks)
        in_out_narrow=Weight(2, 9),            # 2 inputs: a rank with no slice of any neuron
        experts=Weight(4, 6, 5),               # (E, out, in): 4 experts over 3 ranks (2, 2, 0)
        experts_t=Weight(5, 5, 7),             # (E, in, out): 5 experts (2, 2, 1)
        wide=nn.Linear(30, 6, bias=False),     # neuron_axis="larger": one statistic per column
        in_out_wide=Weight(20, 6),             # (in, out), wide: the statistic's axis is dim 0
        conv_wide=nn.Conv2d(4, 6, 3, bias=False),  # (6, 36): per column of in·kernel
        experts_wide=Weight(3, 4, 9),          # (E, out, in), wide experts
        experts_t_wide=Weight(4, 9, 3),        # (E, in, out), wide experts stored transposed
        norm=nn.LayerNorm(10),                 # AdamW: 1-D weight and bias, sharded too
    ))


def build_optimizer(model):
    """The paper's NorMuon on every layout, the released code's variant, and plain Muon."""
    return normuon.NorMuon([
        dict(params=[model[name].weight for name in ("up", "down_a", "down_b", "down_c", "down_d")], weight_decay=0.1),
        dict(params=[model.square.weight], adjust_lr_fn="original", nesterov=True, lr=0.02),
        dict(params=[model.muon.weight], normalize=False),
        dict(params=[model.conv.weight], layout="conv"),
        dict(params=[model.in_out.weight, model.in_out_narrow.weight], layout="in_out", weight_decay=0.1),
        dict(params=[model.experts.weight], layout="experts_out_in"),
        dict(params=[model.experts_t.weight], layout="experts_in_out", adjust_lr_fn="original"),
        dict(params=[model.wide.weight], neuron_axis="larger", cautious_weight_decay=True,
             weight_decay=0.1, ns_coefficients=normuon.POLAR_EXPRESS_COEFFICIENTS),
        dict(params=[model.in_out_wide.weight], layout="in_out", neuron_axis="larger"),
        dict(params=[model.conv_wide.weight], layout="conv", neuron_axis="larger"),
        dict(params=[model.experts_wide.weight], layout="experts_out_in", neuron_axis="larger"),
        dict(params=[model.experts_t_wide.weight], layout="experts_in_out", neuron_axis="larger",
             adjust_lr_fn="original"),
        dict(params=list(model.norm.parameters()), use_muon=False, lr=0.003, betas=(0.8, 0.9),
             weight_decay=0.05),
    ], lr=0.01)


def relative_error(actual, expected):
    return ((actual - expected).norm() / expected.norm().clamp(min=1e-30)).item()


def full(tensor):
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def main():
    dist.init_process_group("gloo")
    mesh = None
    if len(sys.argv) > 2:  # HSDP: replicate over the first axis, shard over the second
        shape = (int(sys.argv[2]), int(sys.argv[3]))
        mesh = init_device_mesh("cpu", shape, mesh_dim_names=("replicate", "shard"))
    reference, sharded = build_model(), build_model()
    for module in sharded.values():  # each weight its own FSDP2 unit, sharded on dim 0
        fully_shard(module, mesh=mesh)
    reference_optimizer, sharded_optimizer = build_optimizer(reference), build_optimizer(sharded)

    generator = torch.Generator().manual_seed(1)  # the same gradients on every rank
    for _ in range(6):
        for ref_param, param in zip(reference.parameters(), sharded.parameters()):
            grad = torch.randn(ref_param.shape, generator=generator)
            ref_param.grad = grad
            param.grad = distribute_tensor(grad, param.device_mesh, param.placements)
        reference_optimizer.step()
        sharded_optimizer.step()

    param_mesh = sharded["up"].weight.device_mesh
    try:
        replicated = distribute_tensor(torch.zeros(4, 4), param_mesh, [Replicate()] * param_mesh.ndim)
        normuon.NorMuon([nn.Parameter(replicated)])
        replicated_parameter_error = "no error"
    except ValueError as error:
        replicated_parameter_error = str(error)
    try:
        mesh_3d = init_device_mesh("cpu", (1, 1, dist.get_world_size()))
        normuon.NorMuon([nn.Parameter(distribute_tensor(torch.zeros(4, 4), mesh_3d, [Replicate()] * 3))])
        mesh_3d_error = "no error"
    except ValueError as error:
        mesh_3d_error = str(error)

    param_errors, state_errors = {}, {}
    for (name, ref_param), param in zip(reference.named_parameters(), sharded.parameters()):
        param_errors[name] = relative_error(param.full_tensor(), ref_param.detach())
        assert sharded_optimizer.state[param].keys() == reference_optimizer.state[ref_param].keys()
        for key, value in sharded_optimizer.state[param].items():
            expected = reference_optimizer.state[ref_param][key]
            state_errors[f"{name}.{key}"] = relative_error(full(value), expected)

    state_dict = sharded_optimizer.state_dict()["state"]
    keys = {index: sorted(state) for index, state in state_dict.items()}
    local_rows = {name: param.to_local().shape[0] for name, param in sharded.named_parameters()}
    all_keys, all_rows = [None] * dist.get_world_size(), [None] * dist.get_world_size()
    dist.all_gather_object(all_keys, keys)
    dist.all_gather_object(all_rows, local_rows)
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(dict(param_errors=param_errors, state_errors=state_errors, state_keys=all_keys,
                           local_rows=all_rows, replicated_parameter_error=replicated_parameter_error,
                           mesh_3d_error=mesh_3d_error), f, indent=1)
    end_worker()


if __name__ == "__main__":
    main()
