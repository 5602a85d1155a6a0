"""Saves and loads one NorMuon optimizer (NorMuon and AdamW groups) with
torch.distributed.checkpoint under FSDP2, on any number of gloo ranks. Launched by
tests/test_ecosystem.py as

    torchrun --standalone --nproc_per_node 2 tests/dcp_worker.py save CHECKPOINT_DIR RESULT.pt
    torchrun --standalone --nproc_per_node N tests/dcp_worker.py load CHECKPOINT_DIR RESULT.pt

"save" trains 3 steps, saves model and optimizer with dcp.save, then trains 3 more (the unbroken
run); "load" builds a fresh model and optimizer on N ranks (other shards), loads the checkpoint and
trains the same 3 steps. Every rank sees the same batch, so the data-parallel gradient is the same
at any N. Rank 0 writes the full (unsharded) parameters, losses and optimizer state to RESULT.pt."""

import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

sys.path.insert(0, __file__.rsplit("/tests/", 1)[0])
import normuon  # noqa: E402
from gloo_exit import end_worker  # noqa: E402

VOCAB, CHECKPOINT_STEP, MORE_STEPS = 32, 3, 3


def build_model():
    """Rows chosen for uneven shards on 3 ranks: 32 (11, 11, 10), 40 (14, 14, 12), 16 (6, 6, 4)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(VOCAB, 16), nn.Linear(16, 40), nn.GELU(), nn.LayerNorm(40),
                          nn.Linear(40, 16, bias=False), nn.Linear(16, VOCAB))  # NorMuon: 1, 4
    for module in model:
        if any(True for _ in module.parameters()):
            fully_shard(module)  # each layer its own FSDP2 unit: every parameter a Shard(0) DTensor
    fully_shard(model)
    return model


def build_optimizer(model):
    groups = normuon.split_parameters(model, exclude=[model[-1]], adamw_lr=0.005,
                                      adamw_weight_decay=0.01)
    return normuon.NorMuon(groups, lr=0.02, weight_decay=0.1)


def train(model, optimizer, first_step, steps):
    losses = []
    for step in range(first_step, first_step + steps):
        tokens = torch.randint(VOCAB, (8, 12), generator=torch.Generator().manual_seed(1000 + step))
        logits = model(tokens[:, :-1])  # (B, T, vocab)
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def full(tensor):
    """A copy of the whole tensor (on one rank, full_tensor() can be the live shard itself)."""
    whole = tensor.full_tensor() if isinstance(tensor, DTensor) else torch.as_tensor(tensor)
    return whole.clone()


def full_optimizer_state(model, optimizer):
    """The optimizer state as DCP sees it (keyed by parameter name), gathered to full tensors."""
    _, optimizer_state = get_state_dict(model, optimizer)
    return {f"{name}.{key}": full(value) for name, state in sorted(optimizer_state["state"].items())
            for key, value in sorted(state.items())}


def full_params(model):
    return {name: full(param.detach()) for name, param in model.named_parameters()}


def save(model, optimizer, checkpoint) -> dict:
    train(model, optimizer, 0, CHECKPOINT_STEP)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=checkpoint)
    return dict(saved_state=full_optimizer_state(model, optimizer),
                params_at_checkpoint=full_params(model))


def load(model, optimizer, checkpoint) -> dict:
    # get_state_dict of a fresh optimizer creates its state (a step with zero gradients and lr 0),
    # in this run's shards; dcp.load fills it in place, resharding; set_state_dict installs it.
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=checkpoint)
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"])
    return dict(loaded_state=full_optimizer_state(model, optimizer))


def main():
    mode, checkpoint, result_path = sys.argv[1:4]
    dist.init_process_group("gloo")
    model = build_model()
    optimizer = build_optimizer(model)
    result = (save if mode == "save" else load)(model, optimizer, checkpoint)
    result.update(losses=train(model, optimizer, CHECKPOINT_STEP, MORE_STEPS),
                  params=full_params(model))

    local_rows = {name: param.to_local().shape[0] for name, param in model.named_parameters()}
    all_rows = [None] * dist.get_world_size()
    dist.all_gather_object(all_rows, local_rows)
    if dist.get_rank() == 0:
        torch.save(dict(result, local_rows=all_rows), result_path)
    end_worker()


if __name__ == "__main__":
    main()
