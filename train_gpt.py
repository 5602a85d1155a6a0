"""Train a GPT with NorMuon, Muon or AdamW: one file, one process or many (FSDP2), CPU or CUDA.

    python train_gpt.py                   # a tiny GPT on Shakespeare: under a minute on a CPU
    python train_gpt.py --optimizer muon  # plain Muon (or adamw) on the hidden matrices
    python train_gpt.py --resume          # continue out/<run_name>/ from its newest good checkpoint
    torchrun --nproc_per_node 8 --max-restarts 3 train_gpt.py --preset gpt2-124m --data fineweb/

NorMuon and Muon (normuon.py) train the hidden matrices, AdamW the rest. Each run writes
out/<run_name>/: config.json, metrics.jsonl, the newest two verified checkpoints (runs.py). Ctrl-C
or SIGTERM saves at the end of the step and stops; a restarted torchrun job continues by itself.
"""

import argparse
import dataclasses
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from normuon import NorMuon, split_parameters
from prepare_data import Dataset, UserError, load_data, prepare_shakespeare
from runs import (Interrupted, append_metrics, attempt_store, interrupted, on_rank_zero,
                  save_checkpoint, start_or_resume, stop_requests, tell_torchrun)

warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # DCP on one process


# -----------------------------------------------------------------------------
# Model: a GPT in the style of nanoGPT (pre-norm blocks, learned positions, untied output head)


@dataclass
class GPTConfig:
    n_layer: int
    n_head: int
    n_embd: int
    block_size: int        # the longest sequence the model sees (learned positions)
    vocab_size: int = 256  # set from the data: 256 for bytes, 50304 for GPT-2 tokens

    def flops_per_token(self) -> float:
        """Training FLOPs per token: 6 per matmul weight plus attention (PaLM's, as nanoGPT)."""
        matmul_weights = self.n_layer * 12 * self.n_embd ** 2 + self.vocab_size * self.n_embd
        return 6 * matmul_weights + 12 * self.n_layer * self.n_embd * self.block_size


PRESETS = {
    "tiny": GPTConfig(n_layer=4, n_head=4, n_embd=64, block_size=128),  # 0.24M parameters
    "shakespeare-10m": GPTConfig(n_layer=6, n_head=6, n_embd=384, block_size=256),  # nanoGPT's
    "gpt2-124m": GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024),
    "gpt2-350m": GPTConfig(n_layer=24, n_head=16, n_embd=1024, block_size=1024),
}


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        # Q, K and V as one (3C, C) matrix: one NorMuon matrix, whose rows are still single neurons
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # each (B, T, C)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)   # up (4C, C)
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)  # down (C, 4C)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.attention_norm = nn.RMSNorm(config.n_embd)
        self.attention = CausalSelfAttention(config)
        self.mlp_norm = nn.RMSNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attention(self.attention_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.n_embd)
        self.position_embedding = nn.Embedding(config.block_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = nn.RMSNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        for name, param in self.named_parameters():
            if param.ndim == 2:  # GPT-2's: projections into the residual stream shrink with depth
                std = 0.02 / math.sqrt(2 * config.n_layer) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(param, mean=0.0, std=std)

    def forward(self, idx, targets=None):
        """idx (B, T) token ids -> (logits, loss); without targets, the last position's logits."""
        positions = torch.arange(idx.size(1), device=idx.device)
        x = self.token_embedding(idx) + self.position_embedding(positions)  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        if targets is None:  # generation needs only the next token
            return self.lm_head(x[:, [-1], :]), None  # (B, 1, V)
        logits = self.lm_head(x)  # (B, T, V)
        return logits, F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 0.8, generator=None):
        """Append max_new_tokens sampled tokens to idx (B, T). Under FSDP every rank must call this
        with the same idx and generator seed (each forward is a collective)."""
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.config.block_size:])
            probabilities = F.softmax(logits[:, -1, :].float() / temperature, dim=-1)  # (B, V)
            idx = torch.cat([idx, torch.multinomial(probabilities, 1, generator=generator)], dim=1)
        return idx


# -----------------------------------------------------------------------------
# Data: the loaders (prepare_data.py reads the default corpus, text files and .bin shards)


class Sequences:
    """The sequences of seq_len + 1 tokens that tile a list of shards, numbered across them: each
    shares its last token (a target) with the next one's first, so every token is one input."""

    def __init__(self, shards, seq_len: int):
        self.shards, self.seq_len = shards, seq_len
        counts = [max(0, len(shard) - 1) // seq_len for shard in shards]
        self.starts = np.cumsum([0] + counts)  # the first sequence number of each shard

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, numbers):
        """numbers (n,) -> x, y: (n, seq_len) int64 inputs and targets."""
        shard = np.searchsorted(self.starts, numbers, side="right") - 1
        offsets = (numbers - self.starts[shard]) * self.seq_len
        rows = np.stack([self.shards[s][o:o + self.seq_len + 1] for s, o in zip(shard, offsets)])
        rows = torch.from_numpy(rows.astype(np.int64))
        return rows[:, :-1], rows[:, 1:]


class DataLoader:
    """Batches of batch_size sequences: pass e reads a permutation, seeded by (seed, e), of all of
    them (each token at most once per pass). position = (pass, batch) fixes the stream for any
    number of processes: rank r reads rows [r, r + 1) · batch_size / world_size of each batch."""

    def __init__(self, shards, batch_size: int, seq_len: int, rank=0, world_size=1, seed=1337):
        self.sequences, self.batch_size, self.seed = Sequences(shards, seq_len), batch_size, seed
        if len(self.sequences) < batch_size:
            raise UserError(f"too little train data for one batch of {batch_size} x {seq_len} "
                            f"tokens: it holds {len(self.sequences)} sequences. Use a smaller "
                            "--batch_size or --seq_len, or more data.")
        self.rows, self.first_row = batch_size // world_size, rank * batch_size // world_size
        self.position, self.permutation = (0, 0), (None, None)  # (pass, its permutation)

    def next_batch(self):
        epoch, batch = self.position
        if batch == len(self.sequences) // self.batch_size:
            epoch, batch = epoch + 1, 0
        if self.permutation[0] != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.sequences))
            self.permutation = epoch, order
        start = batch * self.batch_size + self.first_row
        self.position = (epoch, batch + 1)
        return self.sequences[self.permutation[1][start:start + self.rows]]  # x, y: (B / ranks, T)


def evaluation_sample(val: Sequences, batches: int, batch_size: int) -> np.ndarray:
    """(batches, batch_size) numbers of validation sequences spread evenly over the held-out set:
    the same for every seed and step (all of it when batches · batch_size = len(val))."""
    wanted, most = batches * batch_size, len(val) // batch_size
    if wanted > len(val):
        fix = f"--eval_batches {most} or fewer" if most else "--eval_batches 0 (no validation loss)"
        raise UserError(f"--eval_batches {batches}: that is {wanted} sequences of {val.seq_len} "
                        f"tokens, the validation data holds {len(val)}. Use {fix}, a smaller "
                        "--batch_size or --seq_len, or more validation data.")
    return (np.arange(wanted) * len(val) // max(1, wanted)).reshape(batches, batch_size)


# -----------------------------------------------------------------------------
# Run configuration: every field is a flag


@dataclass
class TrainConfig:
    # model and data
    preset: str = "tiny"
    seq_len: int = None  # default: the preset's block_size
    data: str = None     # default: Shakespeare
    data_dir: str = "data"
    # optimization
    optimizer: str = "normuon"
    lr: float = 1e-2
    adamw_lr: float = 1e-2
    weight_decay: float = 0.1
    momentum: float = 0.95
    beta2: float = 0.95
    nesterov: bool = False
    adamw_beta1: float = 0.9
    adamw_beta2: float = 0.95
    grad_clip: float = 1.0
    warmup_steps: int = None  # default: 5% of max_steps
    max_steps: int = 600
    batch_size: int = 16
    grad_accum_steps: int = 1
    # run
    eval_interval: int = 100
    eval_batches: int = 10
    log_interval: int = 10
    checkpoint_interval: int = 500
    sample_tokens: int = 300
    run_name: str = None  # default: <preset>-<optimizer>
    out_dir: str = "out"
    resume: bool = False
    seed: int = 1337  # model init, order of the training data, text sample
    device: str = "auto"
    compile: bool = False
    cuda_graph: bool = False
    peak_tflops: float = 989.0


FLAG_HELP = dict(  # for --help, where the name does not say it all
    preset="model size: " + ", ".join(PRESETS),
    optimizer="what trains the hidden matrices: normuon, muon or adamw",
    seq_len="tokens per sequence (default: the preset's block_size)",
    data="a UTF-8 text file or a directory of .bin shards (default: Shakespeare)",
    lr="peak lr of the hidden matrices, AdamW-scale for all three (NorMuon's updates: RMS 0.2·lr)",
    adamw_lr="peak lr of embeddings, output head and norms (AdamW)",
    weight_decay="decoupled weight decay of the hidden matrices (none on the rest)",
    beta2="NorMuon's decay of the per-neuron second moment",
    grad_clip="clip the gradient norm to this, 0: off (the log shows the norm before clipping)",
    warmup_steps="linear warmup, then linear decay to 0 at max_steps (default: 5%% of max_steps)",
    batch_size="sequences per step, all processes together",
    grad_accum_steps="forward/backward passes per step (each takes a part of every process's rows)",
    eval_batches="validation batches of batch_size / grad_accum_steps sequences, 0: none",
    run_name="the run's directory under out_dir (default: <preset>-<optimizer>)",
    resume="continue out_dir/run_name from its newest good checkpoint (with these flags' lr etc.)",
    cuda_graph="replay NorMuon's step as one CUDA graph (GPU; saves its launch overhead)",
    peak_tflops="peak bf16 TFLOP/s of one GPU, for MFU (989: H100 SXM dense)",
)


class FlagParser(argparse.ArgumentParser):
    def error(self, message):  # one line (main prints it), not argparse's usage and exit code 2
        raise UserError(f"{message} (python train_gpt.py --help lists the flags).")


def parse_args(argv=None) -> TrainConfig:
    parser = FlagParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        help = FLAG_HELP.get(f.name, "") + ("" if f.default is None else " (default: %(default)s)")
        kind = dict(action=argparse.BooleanOptionalAction) if f.type is bool else dict(type=f.type)
        parser.add_argument(f"--{f.name}", default=f.default, help=help.strip(), **kind)
    return TrainConfig(**vars(parser.parse_args(argv)))


def check_config(config: TrainConfig, world_size: int) -> None:
    """A one-line UserError for a flag whose value cannot work (NorMuon checks its own)."""
    choices = dict(preset=list(PRESETS), optimizer=["normuon", "muon", "adamw"],
                   device=["auto", "cpu", "cuda"])
    minimums = dict(seq_len=1, max_steps=1, batch_size=1, grad_accum_steps=1, eval_interval=1,
                    log_interval=1, checkpoint_interval=1, warmup_steps=0, eval_batches=0,
                    sample_tokens=0, weight_decay=0, grad_clip=0)
    for name, value in vars(config).items():
        if name in choices and value not in choices[name]:
            raise UserError(f"--{name} must be one of {', '.join(choices[name])}, got {value!r}.")
        if name in minimums and value is not None and not value >= minimums[name]:
            raise UserError(f"--{name} must be >= {minimums[name]}, got {value!r}.")
        if name in ("lr", "adamw_lr", "peak_tflops") and not (math.isfinite(value) and value > 0):
            raise UserError(f"--{name} must be a positive finite number, got {value!r}.")
    if config.cuda_graph and config.optimizer == "adamw":
        raise UserError("--cuda_graph captures NorMuon's (or Muon's) step; drop it with "
                        "--optimizer adamw.")
    if config.batch_size % (world_size * config.grad_accum_steps):
        raise UserError(f"--batch_size {config.batch_size} must be divisible by the number of "
                        f"processes ({world_size}) times --grad_accum_steps.")


# -----------------------------------------------------------------------------
# Optimizer, learning-rate schedule, and the paper's row-norm probe


def build_optimizer(model: GPT, config: TrainConfig) -> torch.optim.Optimizer:
    """NorMuon (or Muon: normalize=False) on the hidden matrices and AdamW on the rest, one object;
    or torch's AdamW on everything. Each group keeps its peak lr as "initial_lr"."""
    betas = (config.adamw_beta1, config.adamw_beta2)
    groups = split_parameters(model, exclude=[model.lm_head], adamw_lr=config.adamw_lr,
                              adamw_betas=betas)
    if config.optimizer == "adamw":  # the hidden matrices with --lr and --weight_decay, too
        groups = [dict(params=g["params"], lr=config.lr) if g["use_muon"] else g for g in groups]
        optimizer = torch.optim.AdamW(groups, betas=betas, weight_decay=config.weight_decay)
    else:
        try:
            optimizer = NorMuon(groups, lr=config.lr, momentum=config.momentum, beta2=config.beta2,
                                weight_decay=config.weight_decay, nesterov=config.nesterov,
                                normalize=config.optimizer == "normuon",
                                cuda_graph=config.cuda_graph)
        except ValueError as error:  # a hyperparameter out of range (e.g. --momentum 1.5)
            raise UserError(str(error)) from None
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]
    return optimizer


def warmup_steps(config: TrainConfig) -> int:
    """--warmup_steps, by default 5% of the run, and never longer than the run."""
    steps = config.max_steps // 20 if config.warmup_steps is None else config.warmup_steps
    return min(steps, config.max_steps)


def learning_rate_factor(step: int, warmup_steps: int, max_steps: int) -> float:
    """The paper's schedule: step s (from 0) gets (s + 1) / warmup_steps while s < warmup_steps,
    then (max_steps - s) / (max_steps - warmup_steps): 1 at warmup_steps, > 0 at the last step."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return max(0, max_steps - step) / max(1, max_steps - warmup_steps)


def row_norm_stats(matrix: torch.Tensor) -> dict:
    """How unequal the row norms (one per output neuron) of a matrix (m, n) or a DTensor sharded
    by rows are: std / mean (cv) and max / min. Muon's updates have unequal rows, NorMuon's not."""
    row_norms = full(matrix.float().flatten(1).norm(dim=1))  # (m,)
    return dict(cv=(row_norms.std(correction=0) / row_norms.mean()).item(),
                max_over_min=(row_norms.max() / row_norms.min()).item())


def tracked_matrices(model: GPT) -> dict:
    """Matrices to watch: first attention, a middle MLP up (the paper's Fig. 1), last MLP down."""
    n_layer = model.config.n_layer
    return {"blocks.0.attention.qkv": model.blocks[0].attention.qkv.weight,
            f"blocks.{n_layer // 2}.mlp.fc": model.blocks[n_layer // 2].mlp.fc.weight,
            f"blocks.{n_layer - 1}.mlp.proj": model.blocks[n_layer - 1].mlp.proj.weight}


def update_row_stats(tracked: dict, before: dict, optimizer) -> dict:
    """Row-norm stats of each tracked matrix's update D, from W_after = W (1 - lr·wd) - lr·D."""
    groups = {id(param): group for group in optimizer.param_groups for param in group["params"]}
    stats = {}
    for name, param in tracked.items():
        lr, weight_decay = groups[id(param)]["lr"], groups[id(param)]["weight_decay"]
        stats[name] = row_norm_stats((before[name] * (1 - lr * weight_decay) - param.detach()) / lr)
    return stats


# -----------------------------------------------------------------------------
# Distributed: torchrun's processes, FSDP2


def setup_distributed(device_flag: str, world_size: int):
    """Rank and device from torchrun's environment; one process runs without a process group."""
    cuda = torch.cuda.is_available() if device_flag == "auto" else device_flag == "cuda"
    if cuda and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible; use --device cpu.")
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world_size > 1:
        store, rank = attempt_store()
        dist.init_process_group("nccl" if cuda else "gloo", store=store, rank=rank,
                                world_size=world_size)
    return int(os.environ.get("RANK", 0)), device


def shard_model(model: GPT, device: torch.device, world_size: int) -> None:
    """FSDP2, a unit per block (the root: embeddings, norm, head); DTensors sharded by rows."""
    mesh = init_device_mesh(device.type, (world_size,))
    # on CUDA, compute and gather parameters in bf16 but reduce gradients in fp32; on CPU all fp32
    precision = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if device.type == "cuda" else MixedPrecisionPolicy()
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=precision)
    fully_shard(model, mesh=mesh, mp_policy=precision)


def mean_across_ranks(value: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():  # SUM, not AVG: gloo has no AVG
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value


def full(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value (gathered: the same on every rank); a plain tensor as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


# -----------------------------------------------------------------------------
# Training


def train(config: TrainConfig) -> list:
    """One whole run (each torchrun process calls it): the logged metrics, a dict per log step."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    check_config(config, world_size)  # before any heavy work
    rank, device = setup_distributed(config.device, world_size)
    try:
        return train_on(config, rank, world_size, device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def train_on(config: TrainConfig, rank: int, world_size: int, device: torch.device) -> list:
    """This rank's part of the run: data, model, run directory, then the loop."""
    print0 = print if rank == 0 else (lambda *args, **kwargs: None)
    dataset, model_config, loader, val, eval_sample = load_run_data(config, rank, world_size)
    seq_len, accum, max_steps = model_config.block_size, config.grad_accum_steps, config.max_steps
    model, optimizer = build_model(model_config, config, device, world_size)
    forward = torch.compile(model) if config.compile else model
    run_dir = Path(config.out_dir) / (config.run_name or f"{config.preset}-{config.optimizer}")
    start, loader.position, seconds, kept = start_or_resume(run_dir, config, model, optimizer)
    tracked, warmup = tracked_matrices(model), warmup_steps(config)
    shown = next(name for name in tracked if ".mlp.fc" in name)  # the paper's Figure 1 matrix
    print0(describe_run(config, model, world_size, device, run_dir, warmup, start))

    metrics, last_log = [], (start, seconds)  # seconds: of training, not evaluating or saving
    with stop_requests() as stop:
        for step in range(start, max_steps):
            started, done, last = time.perf_counter(), step + 1, step + 1 == max_steps  # steps done
            eval_now = config.eval_batches and (done % config.eval_interval == 0 or last)
            log_now = done % config.log_interval == 0 or last or eval_now
            factor = learning_rate_factor(step, warmup, max_steps)
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * factor

            # --- forward/backward: this rank's rows of the batch, in grad_accum_steps parts
            x, y = loader.next_batch()  # (B / world_size, T)
            loss_sum = torch.zeros((), device=device)
            for part_x, part_y in zip(x.chunk(accum), y.chunk(accum)):
                with autocast(device):
                    _, loss = forward(part_x.to(device), part_y.to(device))
                (loss / accum).backward()  # FSDP2 averages the gradients over ranks
                loss_sum += loss.detach()
            # one all-reduce for the loss and "a rank got SIGINT/SIGTERM": all stop at one step
            both = torch.stack([loss_sum / accum, torch.tensor(float(bool(stop)), device=device)])
            train_loss, stopping = mean_across_ranks(both).tolist()
            if not math.isfinite(train_loss):  # stop before this step changes the weights
                raise UserError(f"step {done}: the training loss is {train_loss}; stopping "
                                f"(the last good checkpoint: {kept}). Try a lower --lr / "
                                "--adamw_lr, more --warmup_steps or --grad_clip.")

            # --- clip: the norm logged is the one before clipping
            grad_norm = nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip or math.inf)

            # --- step (the tracked matrices' weights kept on log steps: the row-norm probe)
            before = {name: p.detach().clone() for name, p in tracked.items()} if log_now else None
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if log_now and device.type == "cuda":
                torch.cuda.synchronize(device)  # timing: the GPU work queued so far is done
            seconds += time.perf_counter() - started

            # --- log, with the validation loss every eval_interval steps
            if log_now:
                step_seconds = (seconds - last_log[1]) / (done - last_log[0])  # since the last log
                record = dict(step=done, train_loss=train_loss, lr=config.lr * factor,
                              grad_norm=full(grad_norm).item(), step_ms=1000 * step_seconds,
                              tokens_per_second=config.batch_size * seq_len / step_seconds,
                              training_seconds=seconds,
                              row_norms=update_row_stats(tracked, before, optimizer))
                if eval_now:
                    record["val_loss"] = evaluate(forward, val, eval_sample, device)
                if device.type == "cuda":
                    record.update(gpu_stats(record, model_config, config, world_size, device))
                metrics.append(record)
                last_log = (done, seconds)
                append_metrics(run_dir, record)
                print0(format_log_line(record, max_steps, shown))

            # --- checkpoint; stop after a signal (one during the last step lets the run finish)
            if done % config.checkpoint_interval == 0 or last or stopping:
                kept = save_checkpoint(run_dir / "checkpoints", model, optimizer, kept, step=done,
                                       data_position=loader.position, training_seconds=seconds)
            if stopping and not last:
                raise interrupted(stop, done, kept)
    if config.sample_tokens > 0:
        text = sample_text(model, dataset, config.sample_tokens, config.seed, device)
        print0(f"--- sample after {max_steps} steps ---\n{text}\n---")
    return metrics


def load_run_data(config: TrainConfig, rank: int, world_size: int) -> tuple:
    """The dataset (the default one prepared by rank 0 on first use), the model's shape, this
    rank's loader, and the validation sequences with this rank's rows of the fixed sample."""
    if config.data is None:
        on_rank_zero(lambda: prepare_shakespeare(config.data_dir))
    dataset, preset = load_data(config.data, config.data_dir), PRESETS[config.preset]
    model_config = dataclasses.replace(preset, vocab_size=dataset.vocab_size,
                                       block_size=config.seq_len or preset.block_size)
    seq_len, micro_batch = model_config.block_size, config.batch_size // config.grad_accum_steps
    loader = DataLoader(dataset.train, config.batch_size, seq_len, rank, world_size, config.seed)
    val, rows = Sequences(dataset.val, seq_len), micro_batch // world_size
    sample = evaluation_sample(val, config.eval_batches, micro_batch)
    return dataset, model_config, loader, val, sample[:, rank * rows:(rank + 1) * rows]


def build_model(model_config: GPTConfig, config: TrainConfig, device, world_size: int):
    """The model, initialized alike on every rank (then each keeps its shard), and its optimizer."""
    torch.manual_seed(config.seed)
    model = GPT(model_config).to(device)
    if world_size > 1:
        shard_model(model, device, world_size)
    return model, build_optimizer(model, config)


@torch.no_grad()
def evaluate(forward, val: Sequences, sample: np.ndarray, device: torch.device) -> float:
    """Mean loss over the fixed validation sample, whose (batches, rows) are this rank's rows."""
    forward.eval()
    total = torch.zeros((), device=device)
    for numbers in sample:
        x, y = val[numbers]
        with autocast(device):
            total += forward(x.to(device), y.to(device))[1].float()
    forward.train()
    return mean_across_ranks(total / len(sample)).item()


@torch.no_grad()
def sample_text(model: GPT, dataset: Dataset, tokens: int, seed: int, device) -> str:
    """tokens sampled after a newline or GPT-2's end of text, alike on all ranks (FSDP needs it)."""
    prompt = torch.tensor([[ord("\n") if dataset.vocab_size == 256 else 50256]], device=device)
    generator = torch.Generator(device).manual_seed(seed)
    model.eval()
    with autocast(device):
        return dataset.decode(model.generate(prompt, tokens, generator=generator)[0].tolist())


def gpu_stats(record: dict, model_config: GPTConfig, config: TrainConfig, world_size, device):
    flops = model_config.flops_per_token() * record["tokens_per_second"]
    return dict(mfu=flops / (config.peak_tflops * 1e12 * world_size),
                peak_memory_gib=torch.cuda.max_memory_allocated(device) / 2 ** 30)  # this rank's


def describe_run(config, model, world_size, device, run_dir, warmup, start) -> str:
    parameters = sum(p.numel() for p in model.parameters()) / 1e6
    resumed = learning_rate_factor(start, warmup, config.max_steps)
    return (f"{parameters:.2f}M parameters, {model.config}\n{config.optimizer}, lr {config.lr:g}: "
            f"warmup {warmup} of {config.max_steps} steps, then linear decay to 0"
            + (f" (at step {start}: {resumed:.3f} x the peak)" if start else "")
            + f"\ndata: {config.data or Path(config.data_dir) / 'shakespeare'}; {world_size} "
            f"process(es) on {device.type}; writing {run_dir}/")


def format_log_line(record: dict, max_steps: int, shown: str) -> str:
    val = f"{record['val_loss']:.4f}" if "val_loss" in record else "   -  "
    line = (f"step {record['step']:{len(str(max_steps))}d}/{max_steps} | train "
            f"{record['train_loss']:.4f} | val {val} | lr {record['lr']:.2e} | grad "
            f"{record['grad_norm']:.2f} | {record['tokens_per_second']:,.0f} tok/s | "
            f"{record['step_ms']:.0f} ms")
    if "mfu" in record:
        line += f" | mfu {100 * record['mfu']:.1f}% | {record['peak_memory_gib']:.1f} GiB"
    cv, max_over_min = record["row_norms"][shown].values()
    return line + f" | {shown} update rows: cv {cv:.3f} max/min {max_over_min:.2f}"


# -----------------------------------------------------------------------------
# Command line: a problem the user can fix is one line, printed once (under torchrun too)


def main():
    code = 0
    try:
        train(parse_args())
    except KeyboardInterrupt:  # outside the training loop, which saves and stops by itself
        print("interrupted outside the training loop: nothing to save", file=sys.stderr)
        code = 130
    except UserError as error:
        message = str(error) if isinstance(error, Interrupted) else f"error: {error}"
        if int(os.environ.get("RANK", 0)) == 0:
            print(message, file=sys.stderr, flush=True)
        tell_torchrun(message)
        code = 128 + error.signal_number if isinstance(error, Interrupted) else 1
    if code == 0 and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        # Correctness: the run is saved and the process group destroyed, but at interpreter
        # finalization gloo's worker threads can still abort the process (SIGABRT, "terminate
        # called without an active exception"), which torchrun would report as a failed run.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    sys.exit(code)


if __name__ == "__main__":
    main()
