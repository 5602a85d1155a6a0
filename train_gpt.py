"""Train a GPT with NorMuon, Muon or AdamW: one file, one process or many (FSDP2), CPU or CUDA.

    python train_gpt.py                    # a tiny GPT on Shakespeare: about 40 s on a CPU
    python train_gpt.py --optimizer muon   # the same run with plain Muon (or --optimizer adamw)
    python train_gpt.py --resume           # continue out/<run_name>/ from its newest good checkpoint
    torchrun --nproc_per_node 8 train_gpt.py --preset gpt2-124m --data fineweb10B/ --batch_size 512
    torchrun --max-restarts 3 ...          # a worker fails: the job restarts and continues by itself

NorMuon and Muon (normuon.py) train the hidden matrices, AdamW the rest (embeddings, head, norms);
--optimizer adamw trains all of it with AdamW. NorMuon and Muon scale each update to RMS 0.2·lr, so
one AdamW-scale --lr suits all three.

Each run writes out/<run_name>/: config.json, metrics.jsonl and the newest two verified checkpoints
(runs.py). Ctrl-C or SIGTERM saves a checkpoint at the end of the step and stops.
"""

import argparse
import dataclasses
import json
import math
import os
import signal
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
from prepare_data import load_shakespeare, read_shard, write_shard  # noqa: F401 (bench/ uses them)
from runs import Interrupted, on_rank_zero, save_checkpoint, start_or_resume, stop_requests

# DCP warns when it runs without a process group; for one process that is what we mean.
warnings.filterwarnings("ignore", message="torch.distributed is disabled")


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
        """Training FLOPs per token (forward + backward): 6 per matmul weight, plus attention
        (PaLM's estimate, which nanoGPT uses for MFU). Embedding lookups are not matmuls."""
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
            if param.ndim == 2:  # GPT-2's init: projections into the residual stream shrink with depth
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
        """Append max_new_tokens sampled tokens to idx (B, T). Under FSDP every rank must call this
        with the same idx and an identically seeded generator: each forward is a collective."""
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.config.block_size:])
            probabilities = F.softmax(logits[:, -1, :].float() / temperature, dim=-1)  # (B, V)
            idx = torch.cat([idx, torch.multinomial(probabilities, 1, generator=generator)], dim=1)
        return idx


# -----------------------------------------------------------------------------
# Data: the loaders (prepare_data.py reads the default corpus, text files and .bin shards)

class Sequences:
    """The sequences of seq_len + 1 tokens that tile a list of shards (each shares its last token,
    a target, with the next one's first), numbered across shards: every token is an input of
    exactly one sequence."""

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
    """Batches of batch_size sequences in a random order fixed by seed: pass e reads a permutation,
    seeded by (seed, e), of all the sequences, so each token is seen at most once per pass (the
    last len % batch_size are left out). position = (pass, batch) fixes the stream exactly, for
    any number of processes: rank r reads rows [r, r + 1) · batch_size / world_size of each batch."""

    def __init__(self, shards, batch_size: int, seq_len: int, rank=0, world_size=1, seed=1337):
        self.sequences, self.batch_size, self.seed = Sequences(shards, seq_len), batch_size, seed
        if len(self.sequences) < batch_size:
            raise UserError(f"too little train data for one batch of {batch_size} x {seq_len} "
                            f"tokens: it holds {len(self.sequences)} sequences. Use a smaller "
                            "--batch_size or --seq_len, or more data.")
        self.rows = batch_size // world_size
        self.first_row = rank * self.rows
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
    seed: int = 1337
    device: str = "auto"
    compile: bool = False
    peak_tflops: float = 989.0


FLAG_HELP = dict(  # for --help, where the name does not say it all
    preset="model size: " + ", ".join(PRESETS),
    seq_len="tokens per sequence (default: the preset's block_size)",
    data="a UTF-8 text file or a directory of .bin shards (default: Shakespeare)",
    data_dir="where the default corpus is prepared and kept",
    optimizer="what trains the hidden matrices: normuon, muon or adamw",
    lr="peak lr of the hidden matrices: NorMuon's and Muon's updates have RMS 0.2·lr, so it is an "
       "AdamW-scale lr for all three optimizers (1e-2 suits the tiny preset; wider models want less)",
    adamw_lr="peak lr of embeddings, output head and norms (AdamW)",
    weight_decay="decoupled weight decay of the hidden matrices (none on the rest)",
    momentum="NorMuon/Muon momentum (beta1)",
    beta2="NorMuon's decay of the per-neuron second moment",
    grad_clip="clip the gradient norm to this, 0: off (the log shows the norm before clipping)",
    warmup_steps="linear warmup, then linear decay to 0 at max_steps (default: 5%% of max_steps)",
    batch_size="sequences per step, all processes together",
    grad_accum_steps="forward/backward passes per step (each takes a part of every process's rows)",
    eval_batches="validation batches of batch_size / grad_accum_steps sequences, 0: none",
    checkpoint_interval="steps between checkpoints (and one at the end)",
    run_name="the run's directory under out_dir (default: <preset>-<optimizer>)",
    resume="continue out_dir/run_name from its newest good checkpoint (the flags given now set the "
           "hyperparameters; a larger --max_steps extends the run)",
    seed="random seed: model init, order of the training data, text sample",
    device="auto (cuda if there is one), cpu or cuda",
    peak_tflops="peak bf16 TFLOP/s of one GPU, for MFU (989: H100 SXM dense)",
)


class FlagParser(argparse.ArgumentParser):
    def error(self, message):  # one line (main prints it), not argparse's usage and exit code 2
        raise UserError(f"{message} (python train_gpt.py --help lists the flags).")


def parse_args(argv=None) -> TrainConfig:
    parser = FlagParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for field in dataclasses.fields(TrainConfig):
        help = FLAG_HELP.get(field.name, "") + (" (default: %(default)s)" if field.default is not None else "")
        kind = dict(action=argparse.BooleanOptionalAction) if field.type is bool else \
            dict(type=field.type)
        parser.add_argument(f"--{field.name}", default=field.default, help=help.strip(), **kind)
    return TrainConfig(**vars(parser.parse_args(argv)))


def check_config(config: TrainConfig, world_size: int) -> None:
    """A one-line UserError for a flag whose value cannot work (NorMuon checks its own)."""
    for name, allowed in (("preset", tuple(PRESETS)), ("optimizer", ("normuon", "muon", "adamw")),
                          ("device", ("auto", "cpu", "cuda"))):
        if getattr(config, name) not in allowed:
            raise UserError(f"--{name} must be one of {', '.join(allowed)}, "
                            f"got {getattr(config, name)!r}.")
    for minimum, names in ((1, "seq_len max_steps batch_size grad_accum_steps eval_interval "
                               "log_interval checkpoint_interval"),
                           (0, "warmup_steps eval_batches sample_tokens weight_decay grad_clip")):
        for name in names.split():
            if getattr(config, name) is not None and not getattr(config, name) >= minimum:
                raise UserError(f"--{name} must be >= {minimum}, got {getattr(config, name)!r}.")
    for name in ("lr", "adamw_lr", "peak_tflops"):
        if not (math.isfinite(getattr(config, name)) and getattr(config, name) > 0):
            raise UserError(f"--{name} must be a positive finite number, got {getattr(config, name)}.")
    if config.batch_size % (world_size * config.grad_accum_steps):
        raise UserError(f"--batch_size {config.batch_size} must be divisible by the number of "
                        f"processes ({world_size}) times --grad_accum_steps "
                        f"({config.grad_accum_steps}).")


# -----------------------------------------------------------------------------
# Optimizer, learning-rate schedule, and the paper's row-norm probe


def build_optimizer(model: GPT, config: TrainConfig) -> torch.optim.Optimizer:
    """NorMuon (or Muon: normalize=False) on the hidden matrices and AdamW on the rest, one object;
    or torch's AdamW on everything. Each group keeps its peak lr as "initial_lr" for the schedule."""
    betas = (config.adamw_beta1, config.adamw_beta2)
    groups = split_parameters(model, exclude=[model.lm_head], adamw_lr=config.adamw_lr,
                              adamw_betas=betas)
    if config.optimizer == "adamw":
        hidden = [param for group in groups if group["use_muon"] for param in group["params"]]
        rest = [group for group in groups if not group["use_muon"]]
        optimizer = torch.optim.AdamW([dict(params=hidden, lr=config.lr), *rest], betas=betas,
                                      weight_decay=config.weight_decay)
    else:
        try:
            optimizer = NorMuon(groups, lr=config.lr, momentum=config.momentum, beta2=config.beta2,
                                weight_decay=config.weight_decay, nesterov=config.nesterov,
                                normalize=config.optimizer == "normuon")
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
    """The paper's schedule: linear warmup, then linear decay to 0 at max_steps. Step s (from 0)
    gets (s + 1) / warmup_steps while s < warmup_steps, so 1 at warmup_steps - 1, then
    (max_steps - s) / (max_steps - warmup_steps): 1 at warmup_steps, > 0 at the last step."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return max(0, max_steps - step) / max(1, max_steps - warmup_steps)


def row_norm_stats(matrix: torch.Tensor) -> dict:
    """How unequal the row norms (one per output neuron) of a matrix (m, n) are: coefficient of
    variation (std / mean) and max / min. Muon's updates have unequal rows, NorMuon's equal ones.
    A DTensor sharded by rows (FSDP2) works too: full_tensor() gathers the rows' norms."""
    row_norms = matrix.float().flatten(1).norm(dim=1)  # (m,)
    if isinstance(row_norms, DTensor):
        row_norms = row_norms.full_tensor()
    return dict(cv=(row_norms.std(correction=0) / row_norms.mean()).item(),
                max_over_min=(row_norms.max() / row_norms.min()).item())


def tracked_matrices(model: GPT) -> dict:
    """A few hidden matrices to watch: the first attention, a middle MLP up-projection (the
    paper's Figure 1 looks at one), the last MLP down-projection."""
    n_layer = model.config.n_layer
    return {"blocks.0.attention.qkv": model.blocks[0].attention.qkv.weight,
            f"blocks.{n_layer // 2}.mlp.fc": model.blocks[n_layer // 2].mlp.fc.weight,
            f"blocks.{n_layer - 1}.mlp.proj": model.blocks[n_layer - 1].mlp.proj.weight}


def update_row_stats(tracked: dict, before: dict, optimizer) -> dict:
    """Row-norm stats of each tracked matrix's latest update direction D, from W_after =
    W_before (1 - lr·wd) - lr·D (decoupled weight decay, as in all three optimizers)."""
    groups = {id(param): group for group in optimizer.param_groups for param in group["params"]}
    stats = {}
    for name, param in tracked.items():
        lr, weight_decay = groups[id(param)]["lr"], groups[id(param)]["weight_decay"]
        stats[name] = row_norm_stats((before[name] * (1 - lr * weight_decay) - param.detach()) / lr)
    return stats


# -----------------------------------------------------------------------------
# Distributed: torchrun's processes, FSDP2


def setup_distributed(device_flag: str, world_size: int):
    """Rank and device from torchrun's environment; one process runs without a process group.
    torchrun keeps its store across restarts (--max-restarts), so each attempt uses its own keys:
    else a restarted rank could read a dead one's address and wait forever."""
    cuda = torch.cuda.is_available() if device_flag == "auto" else device_flag == "cuda"
    if cuda and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible; use --device cpu.")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world_size > 1:
        store, rank, _ = next(dist.rendezvous("env://"))
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            store = dist.PrefixStore(f"attempt_{os.environ['TORCHELASTIC_RESTART_COUNT']}", store)
        dist.init_process_group("nccl" if cuda else "gloo", store=store, rank=rank,
                                world_size=world_size)
    return int(os.environ.get("RANK", 0)), device


def shard_model(model: GPT, device: torch.device, world_size: int) -> None:
    """FSDP2: each block is one unit (its parameters gathered for its forward, freed after), the
    root holds the embeddings, final norm and head. Parameters become DTensors sharded by rows."""
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
    print0 = print if rank == 0 else (lambda *args, **kwargs: None)
    dataset, model_config = load_run_data(config)
    seq_len, accum, max_steps = model_config.block_size, config.grad_accum_steps, config.max_steps
    loader = DataLoader(dataset.train, config.batch_size, seq_len, rank, world_size, config.seed)
    val, eval_sample = validation_rows(dataset, config, seq_len, rank, world_size)
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
            started, done = time.perf_counter(), step + 1  # done: what logs and checkpoints count
            evaluate_now = config.eval_batches and (done % config.eval_interval == 0
                                                    or done == max_steps)
            log_now = done % config.log_interval == 0 or done == max_steps or evaluate_now
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
            signalled = torch.tensor(float(bool(stop)), device=device)
            both = torch.stack([loss_sum / accum, signalled])
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
                if evaluate_now:
                    record["val_loss"] = evaluate(forward, val, eval_sample, device)
                if device.type == "cuda":
                    record.update(gpu_stats(record, model_config, config, world_size, device))
                metrics.append(record)
                last_log = (done, seconds)
                if rank == 0:
                    with open(run_dir / "metrics.jsonl", "a") as file:
                        file.write(json.dumps(record) + "\n")
                print0(format_log_line(record, max_steps, shown))

            # --- checkpoint; stop after a signal (one during the last step lets the run finish)
            if done % config.checkpoint_interval == 0 or done == max_steps or stopping:
                kept = save_checkpoint(run_dir / "checkpoints", model, optimizer, kept, step=done,
                                       data_position=loader.position, training_seconds=seconds)
            if stopping and done < max_steps:
                number = stop[0] if stop else signal.SIGTERM  # torchrun signals all its workers
                raise Interrupted(f"stopped by {signal.Signals(number).name} after step {done}: "
                                  f"saved {kept}; continue with the same command and --resume.",
                                  number)
    if config.sample_tokens > 0:
        text = sample_text(model, dataset, config.sample_tokens, config.seed, device)
        print0(f"--- sample after {max_steps} steps ---\n{text}\n---")
    return metrics


def load_run_data(config: TrainConfig) -> tuple:
    """The dataset (the default one prepared on first use, by rank 0), and the model's shape."""
    if config.data is None:
        on_rank_zero(lambda: prepare_shakespeare(config.data_dir))
    dataset = load_data(config.data, config.data_dir)
    preset = PRESETS[config.preset]
    return dataset, dataclasses.replace(preset, vocab_size=dataset.vocab_size,
                                        block_size=config.seq_len or preset.block_size)


def validation_rows(dataset: Dataset, config: TrainConfig, seq_len: int, rank, world_size):
    """The validation sequences, and this rank's rows of each batch of the fixed sample."""
    val, micro_batch = Sequences(dataset.val, seq_len), config.batch_size // config.grad_accum_steps
    rows = micro_batch // world_size
    sample = evaluation_sample(val, config.eval_batches, micro_batch)
    return val, sample[:, rank * rows:(rank + 1) * rows]  # (eval_batches, rows)


def build_model(model_config: GPTConfig, config: TrainConfig, device, world_size: int):
    """The model, initialized alike on every rank (then each keeps its shard), and its optimizer."""
    torch.manual_seed(config.seed)
    model = GPT(model_config).to(device)
    if world_size > 1:
        shard_model(model, device, world_size)
    return model, build_optimizer(model, config)


def full(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value (the same on every rank); a plain tensor as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


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
    """tokens sampled after a newline (bytes) or GPT-2's end of text. Every rank generates the
    same ones (under FSDP each forward is a collective)."""
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
    c, data = model.config, config.data or Path(config.data_dir) / "shakespeare"
    parameters = sum(p.numel() for p in model.parameters()) / 1e6
    lr_now = learning_rate_factor(start, warmup, config.max_steps)
    return (f"{config.preset}: {parameters:.2f}M parameters, {c.n_layer} layers, width {c.n_embd}, "
            f"context {c.block_size}, vocabulary {c.vocab_size}; {world_size} process(es) on "
            f"{device.type}\n{config.optimizer}: lr {config.lr:g}, warmup {warmup} steps, linear "
            f"decay to 0 at step {config.max_steps}"
            + (f" (at step {start}: {lr_now:.3f} x the peak)" if start else "")
            + f"\ndata {data}; writing {run_dir}/")


def format_log_line(record: dict, max_steps: int, shown: str) -> str:
    width = len(str(max_steps))
    line = f"step {record['step']:{width}d}/{max_steps} | train {record['train_loss']:.4f}"
    line += f" | val {record['val_loss']:.4f}" if "val_loss" in record else " | val    -  "
    line += f" | lr {record['lr']:.2e} | grad {record['grad_norm']:.2f}"
    line += f" | {record['tokens_per_second']:,.0f} tok/s | {record['step_ms']:.0f} ms"
    if "mfu" in record:
        line += f" | mfu {100 * record['mfu']:.1f}% | {record['peak_memory_gib']:.1f} GiB"
    stats = record["row_norms"][shown]
    line += f" | {shown} update rows: cv {stats['cv']:.3f}"
    return line + f" max/min {stats['max_over_min']:.2f}"


# -----------------------------------------------------------------------------
# Command line: a problem the user can fix is one line, printed once (under torchrun too)


def main():
    try:
        train(parse_args())
    except KeyboardInterrupt:  # outside the training loop, which saves and stops by itself
        print("interrupted outside the training loop: nothing to save", file=sys.stderr)
        sys.exit(130)
    except UserError as error:
        message = str(error) if isinstance(error, Interrupted) else f"error: {error}"
        if int(os.environ.get("RANK", 0)) == 0:
            print(message, file=sys.stderr, flush=True)
        if os.environ.get("TORCHELASTIC_ERROR_FILE"):  # torchrun's failure report shows it
            extra = dict(py_callstack=message, timestamp=str(int(time.time())))
            report = dict(message=dict(message=message, extraInfo=extra))
            Path(os.environ["TORCHELASTIC_ERROR_FILE"]).write_text(json.dumps(report))
        sys.exit(128 + error.signal_number if isinstance(error, Interrupted) else 1)


if __name__ == "__main__":
    main()
