"""NorMuon: neuron-wise normalized Muon (Li et al., arXiv:2510.05491), one file, torch only.

Muon orthogonalizes the momentum of each hidden weight matrix, so every update is well conditioned
(its singular values are all close to 1). But the *rows* of that update, one per output neuron,
come out with very unequal norms, so a few neurons take most of each step. NorMuon keeps an
Adam-style second moment with one scalar per neuron, divides each neuron's row of the orthogonalized
update by its root, and rescales the whole matrix to a fixed RMS. Algorithm 1, for an m×n matrix
whose m rows are the output neurons:

    line 2   M_t = β1 M_{t-1} + (1 - β1) G_t                  momentum_update
    line 3   O_t = NS5(M_t)                                   newton_schulz
    line 4   v_t = β2 v_{t-1} + (1 - β2) mean_cols(O_t ⊙ O_t)  update_second_moment (v_t ∈ R^m)
    line 5   Ô_t = O_t / (sqrt(v_t) + ε)                       neuron_divisors
    line 6   η̂_t = 0.2 η sqrt(m n) / ||Ô_t||_F                  update_scale
    line 7   W_t = W_{t-1} - η λ W_{t-1} - η̂_t Ô_t            apply_update

Each line is one pure function below, written for a stack of same-shape matrices (B, m, n);
``neuron_factors`` chains lines 4-6. The ``NorMuon`` optimizer calls exactly these, in this order,
for each bucket of same-shape parameters, and ``normuon_update`` chains them for one matrix. Param
groups with ``use_muon=False`` (embeddings, head, norms, biases) are trained by AdamW
(``adamw_update``), so one optimizer object trains the whole model.

Which axis holds the neurons depends on how a model stores its weights (``LAYOUTS``): nn.Linear
keeps (out, in), GPT-2's Conv1D (in, out), conv kernels (out, in, *kernel), MoE layers stack experts
(E, out, in). ``as_matrices`` turns any of them into (B, neurons, inputs) views, and
``split_parameters`` finds the layout of each weight of a model. On CUDA, Newton–Schulz's products
run as two small Triton kernels (symmetric X Xᵀ and A², half the tiles; P X + a X without a copy)
where Triton imports, and as torch's matmuls elsewhere (``NS_KERNELS``).

Under FSDP2 every parameter is a DTensor sharded by dim 0 (under HSDP: sharded over the mesh's
last axis, replicated over the first), and ``NorMuon.step`` runs this plan in each shard group:
    1. momentum, locally on each rank's shard                                          (line 2)
    2. ``assign_owners``: each matrix gets one owner rank, biggest matrices first, round-robin
    3. all_to_all: every rank sends its bf16 shard of each matrix to the matrix's owner
    4. each owner runs one batched Newton–Schulz on its full matrices                     (line 3)
    5. all_to_all: owners send each rank its shard of the result, bf16
    6. each rank sums O_ij² over the row (or row slice) of each neuron it holds; one all-reduce of
       these m numbers per matrix; every rank then updates the same replicated v and computes the
       same scale, and keeps the factors of its own rows                                 (lines 4-6)
    7. the update, locally                                                                (line 7)
So every matrix is orthogonalized once per shard group (once in the job under FSDP2, once per
replica under HSDP, whose replicas hold the same gradients), and the result equals the
single-device one. Other placements on a 1-D or 2-D mesh (tensor parallel: Shard(1), or Shard on
both axes) take a simpler, slower path with the same result: every rank gathers the whole matrices,
runs lines 3-6 on them, and keeps its own part of the update. AdamW is element-wise: it runs on
each rank's shard as it is.
"""

import contextlib
import math
import os
import warnings
from collections import defaultdict

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.optim.adamw import adamw as torch_adamw

try:  # optional: Newton–Schulz's products as Triton kernels on CUDA (``symmetric_product``)
    import triton
    import triton.language as tl
except ImportError:
    triton = None

MUON_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Keller Jordan's quintic, as in torch.optim.Muon
# Polar Express (Amsel et al., arXiv:2505.16932): one quintic per step, computed for five steps on
# matrices normalized by 1.02 ||X||_F (POLAR_EXPRESS_SAFETY). The list dion, nanochat and
# modded-nanogpt use.
POLAR_EXPRESS_COEFFICIENTS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
POLAR_EXPRESS_SAFETY = 1.02
ADJUST_LR_FNS = ("match_rms_adamw", "original")
NEURON_AXES = ("output", "larger")

# -----------------------------------------------------------------------------
# Layouts: which axis of a parameter holds the output neurons

LAYOUTS = {
    "out_in": "(out, in): nn.Linear; the default for 2-D parameters",
    "in_out": "(in, out): transformers' Conv1D (GPT-2 family); the neurons are columns",
    "conv": "(out, in, *kernel): nn.Conv1d/2d/3d kernels, trained as the (out, in·kernel) matrix",
    "experts_out_in": "(E, out, in): E stacked expert matrices, each trained on its own",
    "experts_in_out": "(E, in, out): E stacked expert matrices stored transposed",
}
TRANSPOSED = ("in_out", "experts_in_out")  # neurons on the last axis
EXPERTS = ("experts_out_in", "experts_in_out")  # dim 0 counts matrices, not rows


def as_matrices(stack: Tensor, layout: str) -> Tensor:
    """A (B, neurons, inputs) view of a stack (K, *parameter shape) of parameters, or of their
    dim-0 shards: row i of each matrix is output neuron i. B = K, or K·E for stacked experts."""
    if layout in EXPERTS:
        stack = stack.flatten(0, 1)                          # (K·E, a, b)
    elif layout == "conv":
        stack = stack.flatten(2)                             # (K, out, in·kernel)
    return stack.mT if layout in TRANSPOSED else stack


def from_matrices(matrices: Tensor, layout: str, stack_shape) -> Tensor:
    """The inverse of ``as_matrices``: back to a stack of shape (K, *parameter shape)."""
    return (matrices.mT if layout in TRANSPOSED else matrices).reshape(stack_shape)


# -----------------------------------------------------------------------------
# Algorithm 1, one pure function per line, on stacks of matrices


def momentum_update(grads: list, momentum_buffers: list, momentum, nesterov: bool) -> Tensor:
    """Line 2 for K same-shape tensors: M_t = β1 M_{t-1} + (1 - β1) G_t on each buffer, in place.
    Returns the bf16 stack (K, *shape) that NS orthogonalizes: M_t (the paper's box) or, with
    Nesterov (the released code), G_t + β1 (M_t - G_t)."""
    updates = []
    for grad, buffer in zip(grads, momentum_buffers):
        buffer.lerp_(grad, 1 - momentum)
        updates.append((grad.lerp(buffer, momentum) if nesterov else buffer).to(torch.bfloat16))
    # Correctness: stack always copies, so nothing downstream can write into a bf16 buffer.
    return torch.stack(updates)


def newton_schulz(matrix: Tensor, steps: int = 5, coefficients=MUON_COEFFICIENTS,
                  eps: float = 1e-7) -> Tensor:
    """Approximately orthogonalize each matrix of ``matrix`` (..., m, n); returns bf16, same shape.

    The iteration X <- a X + (b A + c A²) X with A = X Xᵀ maps every singular value s of X through
    p(s) = a s + b s³ + c s⁵. Muon's coefficients make p very steep near 0, so five steps lift even
    tiny singular values into a band around 1 (roughly 0.7 to 1.2), not onto 1: the result is
    U S' Vᵀ, well conditioned but not exactly U Vᵀ. ``coefficients`` is one (a, b, c) for every
    step, or one triple per step (Polar Express: X is then normalized by 1.02 ||X||_F).
    On CUDA the products are Triton kernels (``symmetric_product``, ``product_plus``) that skip
    half of each symmetric product; elsewhere torch's matmuls, with the same rounding.
    """
    per_step = isinstance(coefficients[0], (tuple, list))
    schedule = list(coefficients) if per_step else [coefficients] * steps
    # Speed: bf16 matmuls; NS is stable in bf16 because the iteration is self-correcting.
    x = matrix.to(torch.bfloat16).reshape(-1, *matrix.shape[-2:])  # (batch, m, n): one bmm for all
    transposed = x.size(-2) > x.size(-1)
    if transposed:  # speed: make A = X Xᵀ the small (min(m, n))² Gram matrix
        x = x.mT
    # The iteration converges only for singular values <= 1; the Frobenius norm bounds the
    # spectral norm. The clamp keeps an all-zero matrix at zero instead of 0/0 = NaN. Correctness:
    # not in place, since `.to(bfloat16)` of a bf16 input is the input itself.
    norm = x.norm(dim=(-2, -1), keepdim=True) * (POLAR_EXPRESS_SAFETY if per_step else 1.0)
    x = x / norm.clamp(min=eps)
    for a, b, c in schedule[:steps]:
        gram = symmetric_product(x)                                            # A = X Xᵀ
        # b A + c A² = c A Aᵀ + b A, one fused product. Correctness: with c = 0, bf16 baddbmm on
        # CPUs with native bf16 returns A without the factor b, so that case is a plain product.
        polynomial = symmetric_product(gram, c, b, addend=gram) if c != 0 else gram * b
        x = product_plus(polynomial, x, a)                               # a X + (b A + c A²) X
    if transposed:
        x = x.mT
    return x.reshape(matrix.shape)


def neuron_square_sums(orthogonal: Tensor) -> Tensor:
    """Σ_j O_ij², one number per row (neuron) of each matrix (B, m, n): (B, m), fp32. Speed: one
    read of the bf16 O_t, accumulated in fp32, no fp32 copy of it."""
    return torch.linalg.vector_norm(orthogonal, dim=-1, dtype=torch.float32).square()


def update_second_moment(second_moment: Tensor, mean_squares: Tensor, beta2) -> None:
    """Line 4: v_t = β2 v_{t-1} + (1 - β2) mean_cols(O_t ⊙ O_t), in place; both (B, m), fp32."""
    second_moment.lerp_(mean_squares, 1 - beta2)


def neuron_divisors(second_moment: Tensor, eps) -> Tensor:
    """Line 5: Ô_t = O_t / (sqrt(v_t) + ε), row by row; returns the divisors (B, m)."""
    return second_moment.sqrt() + eps


def update_scale(shape, adjust_lr_fn: str, normalize: bool, square_norms: Tensor = None):
    """Line 6: the factor η̂_t / η that multiplies the learning rate for an (m, n) matrix whose m
    rows are its output neurons.

    With ``normalize=True`` (NorMuon), from ``square_norms`` (..., 2) = (||O_t||²_F, ||Ô_t||²_F):
      - "match_rms_adamw" (the paper's box): 0.2 sqrt(m n) / ||Ô_t||_F, so the update's RMS is
        exactly 0.2 and AdamW's learning rate and schedule carry over;
      - "original" (the released code): ||O_t||_F / ||Ô_t||_F, which gives Ô_t back the norm O_t
        had before row normalization, times Muon's sqrt(max(1, m / n)); Muon-scale learning rate.
    With ``normalize=False`` (plain Muon) the scale of ``torch.optim.Muon``: 0.2 sqrt(max(m, n))
    or sqrt(max(1, m / n)); no norms are needed.
    """
    if adjust_lr_fn not in ADJUST_LR_FNS:  # correctness: a typo must not pick the other rule
        raise ValueError(f"adjust_lr_fn must be one of {ADJUST_LR_FNS}, got {adjust_lr_fn!r}.")
    rows, columns = shape[-2], shape[-1]
    if not normalize:
        if adjust_lr_fn == "match_rms_adamw":
            return 0.2 * math.sqrt(max(rows, columns))
        return math.sqrt(max(1.0, rows / columns))
    orthogonal_norm, normalized_norm = square_norms.sqrt().unbind(-1)
    # Correctness: an all-zero gradient gives Ô_t = 0 and 0/0 here; the clamp makes that a finite
    # factor times zero. Otherwise ||Ô_t||_F is of order sqrt(m n) (at t = 1 every row of Ô_t has
    # RMS 1/sqrt(1 - β2); later, as v_t tracks the rows' mean squares, about 1): far above 1e-12.
    normalized_norm = normalized_norm.clamp(min=1e-12)
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(rows * columns) / normalized_norm
    return orthogonal_norm / normalized_norm * math.sqrt(max(1.0, rows / columns))


def neuron_factors(square_sums: Tensor, second_moments: list, shape, beta2, eps,
                   adjust_lr_fn: str) -> Tensor:
    """Lines 4-6 for whole (m, n) matrices (rows: output neurons) from per-slice sums of O_ij²
    (B, k): over each row (k = m, the paper) or each column (k = n, ``neuron_axis="larger"`` on a
    wide matrix). Updates ``second_moments`` (K tensors, B·k numbers together) in place and returns
    each slice's factor (η̂_t / η) / (sqrt(v) + ε) (B, k), which multiplies its slice of O_t."""
    rows, columns = shape
    second_moment = torch.stack(second_moments).view_as(square_sums)
    mean_squares = square_sums / (rows * columns // square_sums.size(-1))  # over the other axis
    update_second_moment(second_moment, mean_squares, beta2)                            # line 4
    divisors = neuron_divisors(second_moment, eps)                                      # line 5
    # ||O_t||² and ||Ô_t||² from per-slice numbers alone (slice i of Ô_t is O_t,i / divisor_i).
    square_norms = torch.stack([square_sums.sum(-1), (square_sums / divisors.square()).sum(-1)], -1)
    scale = update_scale((rows, columns), adjust_lr_fn, True, square_norms)             # line 6
    for moment, new in zip(second_moments, second_moment.view(len(second_moments), -1)):
        moment.copy_(new.view_as(moment))
    return scale[:, None] / divisors


def scaled_direction(orthogonal: Tensor, factors: Tensor, layout: str,
                     along_columns: bool = False) -> Tensor:
    """D = (η̂_t / η) Ô_t: the stack O_t (K, *shape) with each row (or, ``along_columns``, each
    column) of each matrix times ``factors`` (B, m) (or (B, n)) from ``neuron_factors``, or (B, 1)
    = η̂_t / η for Muon; fp32, shaped like ``orthogonal``."""
    matrices = as_matrices(orthogonal, layout)
    scaled = matrices * (factors[..., None, :] if along_columns else factors[..., None])
    return from_matrices(scaled, layout, orthogonal.shape)


def apply_update(weights: list, orthogonal: Tensor, factors: Tensor, layout: str, lr,
                 weight_decay, cautious: bool = False, along_columns: bool = False) -> None:
    """Line 7, in place on K same-shape weights: W_t = W_{t-1} - η λ W_{t-1} - η D, with D from
    ``scaled_direction`` (O_t bf16, D fp32). ``cautious`` (Chen et al., arXiv:2510.12402) decays
    only where D and W have the same sign: W_t = W_{t-1} - η λ 1[D ⊙ W >= 0] ⊙ W_{t-1} - η D."""
    direction = scaled_direction(orthogonal, factors, layout, along_columns)
    for weight, update in zip(weights, direction.unbind(0)):
        update = update.to(weight.dtype)
        if cautious:
            decay = weight * (update * weight >= 0)
            weight.sub_(lr * weight_decay * decay).sub_(lr * update)
        else:
            weight.mul_(1 - lr * weight_decay).sub_(lr * update)


def normuon_update(grad: Tensor, momentum_buffer: Tensor, second_moment: Tensor, *,
                   momentum: float = 0.95, beta2: float = 0.95, nesterov: bool = False,
                   ns_steps: int = 5, ns_coefficients=MUON_COEFFICIENTS, eps: float = 1e-10,
                   adjust_lr_fn: str = "match_rms_adamw", normalize: bool = True,
                   neuron_axis: str = "output") -> Tensor:
    """Lines 2-6 for one (m, n) matrix or a stack (..., m, n) whose rows are neurons, on one
    device: updates ``momentum_buffer`` (contiguous, shape of ``grad``) and ``second_moment``
    (..., m), or (..., n) for ``neuron_axis="larger"`` when n > m, in place; returns
    D = (η̂_t / η) Ô_t in fp32, so that W_t = W_{t-1} - η λ W_{t-1} - η D.
    ``NorMuon.step`` calls the same functions, with FSDP2's communication between them."""
    shape = grad.shape[-2:]
    grads = grad.reshape(-1, *shape).unbind(0)
    buffers = momentum_buffer.view(-1, *shape).unbind(0)
    orthogonal = newton_schulz(momentum_update(grads, buffers, momentum, nesterov), ns_steps,
                               ns_coefficients)
    along_columns = normalize and statistic_along_columns(shape, neuron_axis)
    if not normalize:
        scale = update_scale(shape, adjust_lr_fn, normalize=False)
        factors = torch.full((orthogonal.size(0), 1), scale, device=orthogonal.device)
    else:
        slices = orthogonal.mT if along_columns else orthogonal
        factors = neuron_factors(neuron_square_sums(slices),
                                 list(second_moment.view(-1, slices.size(-2))), shape,
                                 beta2, eps, adjust_lr_fn)
    direction = scaled_direction(orthogonal, factors.to(orthogonal.device), "out_in", along_columns)
    return direction.reshape(grad.shape)


def statistic_along_columns(shape, neuron_axis: str) -> bool:
    """Whether the second moment of an (m, n) matrix (rows: output neurons) is kept per column.
    "output" (the paper, Algorithm 1): never, one number per output neuron. "larger" (nanochat;
    modded-nanogpt since its "NorMuon axis fix"): along the larger dimension, so per column when
    n > m; an orthogonalized wide matrix has orthonormal rows already, so its columns are where
    the norms differ."""
    return neuron_axis == "larger" and shape[-1] > shape[-2]


def adamw_update(params: list, grads: list, exp_avgs: list, exp_avg_sqs: list, steps: list,
                 lr, betas, eps, weight_decay, capturable: bool = False) -> None:
    """AdamW for the parameters NorMuon does not train, in place: torch's own functional AdamW
    (torch.optim.AdamW's arithmetic, bit for bit), on several tensors at once where it can."""
    torch_adamw(params, grads, exp_avgs, exp_avg_sqs, [], steps, capturable=capturable,
                amsgrad=False, beta1=betas[0], beta2=betas[1], lr=lr, weight_decay=weight_decay,
                eps=eps, maximize=False)


def assign_owners(sizes: list, world_size: int) -> list:
    """Which rank orthogonalizes each matrix under FSDP2: ``sizes`` are the matrices' element
    counts (in the same order on every rank); biggest first, round-robin, so the NS work is
    balanced."""
    order = sorted(range(len(sizes)), key=lambda k: -sizes[k])  # stable: equal sizes keep order
    owners = [0] * len(sizes)
    for position, k in enumerate(order):
        owners[k] = position % world_size
    return owners


# -----------------------------------------------------------------------------
# Newton–Schulz's products: Triton kernels on CUDA, torch's matmuls elsewhere
#
# Speed: A = X Xᵀ and b A + c A² = c A Aᵀ + b A are symmetric, so the kernel computes only the
# tiles (i, j), i <= j, of the upper block triangle and stores each also at (j, i): half the
# tiles. baddbmm copies its addend into the output before the product (one more read and write
# of X per step); here the addend is read in the epilogue. Numerics as cuBLAS's baddbmm: fp32
# accumulation, the epilogue in fp32, one rounding to bf16. Autotuning runs on a shape's first
# call (with cuda_graph=True: the eager step before the capture); later launches never sync the
# host, so they can be captured.

# Which products NS runs: "auto" (the kernels for CUDA tensors where triton imports), "torch"
# (always torch's matmuls), "triton" (always the kernels; on CPU under TRITON_INTERPRET=1).
NS_KERNELS = "auto"


def _ns_kernels(x: Tensor) -> bool:
    """Whether ``x``'s products run as Triton kernels (empty batches: torch's)."""
    if NS_KERNELS not in ("auto", "torch", "triton"):
        raise ValueError(f"normuon.NS_KERNELS must be 'auto', 'torch' or 'triton', got "
                         f"{NS_KERNELS!r}.")
    if NS_KERNELS == "auto":
        return triton is not None and x.is_cuda and x.numel() > 0
    return NS_KERNELS == "triton" and x.numel() > 0


def _on_device(x: Tensor):
    """Correctness: Triton launches on the current CUDA device, torch on the tensor's."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _configs(blocks: list) -> list:
    """The autotuner's candidates: each tile size in ``blocks`` (dicts) × 4 or 8 warps × 3 or 4
    stages, BLOCK_K 64. On an H200, 128-row tiles won at every NS shape of bench/ns_kernels.py
    (124M to 1.1B); 64 rows are there for smaller matrices."""
    if os.environ.get("TRITON_INTERPRET") == "1":  # the CPU interpreter: one config, no timing
        return [triton.Config({**{name: 32 for name in blocks[0]}, "BLOCK_K": 32})]
    return [triton.Config({**block, "BLOCK_K": 64}, num_warps=warps, num_stages=stages)
            for block in blocks for warps in (4, 8) for stages in (3, 4)]


if triton is not None:
    @triton.jit
    def _tile_product(left, right, left_step, right_step, k, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """One fp32 tile of L R: pointers to L's (BLOCK_M, BLOCK_K) and R's (BLOCK_K, BLOCK_N)
        first blocks, stepped along k by ``left_step`` / ``right_step`` elements per k index."""
        ks = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for start in range(0, k, BLOCK_K):
            acc = tl.dot(tl.load(left, mask=ks[None, :] < k - start, other=0.0),
                         tl.load(right, mask=ks[:, None] < k - start, other=0.0), acc)
            left += BLOCK_K * left_step
            right += BLOCK_K * right_step
        return acc

    @triton.autotune(_configs([dict(BLOCK=64), dict(BLOCK=128)]), key=["m", "k", "stride_xk"])
    @triton.jit
    def _symmetric_product_kernel(x, c, out, m, k, alpha, beta, stride_xb, stride_xm, stride_xk,
                                  stride_cb, stride_cm, stride_cn, HAS_C: tl.constexpr,
                                  BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
        # Program t is the square tile (i, j), i <= j: t = j (j + 1) / 2 + i counts the triangle
        # column by column. The float root is corrected by one step either way.
        t = tl.program_id(0)
        j = ((tl.sqrt(8.0 * t + 1.0) - 1.0) / 2.0).to(tl.int32)
        j = tl.where(j * (j + 1) // 2 > t, j - 1, j)
        j = tl.where((j + 1) * (j + 2) // 2 <= t, j + 1, j)
        i = t - j * (j + 1) // 2
        batch = tl.program_id(1).to(tl.int64)
        rows, cols = i * BLOCK + tl.arange(0, BLOCK), j * BLOCK + tl.arange(0, BLOCK)
        ks = tl.arange(0, BLOCK_K)
        x += batch * stride_xb
        left = x + (rows % m)[:, None] * stride_xm + ks[None, :] * stride_xk   # X[rows, ks]
        right = x + ks[:, None] * stride_xk + (cols % m)[None, :] * stride_xm  # Xᵀ[ks, cols]
        acc = _tile_product(left, right, stride_xk, stride_xk, k, BLOCK, BLOCK, BLOCK_K)
        inside = (rows[:, None] < m) & (cols[None, :] < m)
        acc *= alpha
        if HAS_C:  # C symmetric: only its upper block triangle is read
            c += batch * stride_cb + rows[:, None] * stride_cm + cols[None, :] * stride_cn
            acc += beta * tl.load(c, mask=inside).to(tl.float32)
        result = acc.to(out.dtype.element_ty)
        out += batch * m * m
        tl.store(out + rows[:, None] * m + cols[None, :], result, mask=inside)
        if i != j:  # the mirror tile (j, i)
            tl.store(out + cols[:, None] * m + rows[None, :], tl.trans(result),
                     mask=tl.trans(inside))

    _TILES = [(64, 128), (128, 128), (128, 256)]  # (BLOCK_M, BLOCK_N)

    @triton.autotune(_configs([dict(BLOCK_M=m, BLOCK_N=n) for m, n in _TILES]),
                     key=["m", "n", "stride_xn"])
    @triton.jit
    def _product_plus_kernel(p, x, out, m, n, a, stride_pb, stride_pm, stride_pk, stride_xb,
                             stride_xm, stride_xn, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_K: tl.constexpr):
        # Tile (i, j) of P X, i fastest: neighbouring programs share X's column block in L2.
        tiles_m = tl.cdiv(m, BLOCK_M)
        i, j = tl.program_id(0) % tiles_m, tl.program_id(0) // tiles_m
        batch = tl.program_id(1).to(tl.int64)
        rows, cols = i * BLOCK_M + tl.arange(0, BLOCK_M), j * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        p += batch * stride_pb
        x += batch * stride_xb
        left = p + (rows % m)[:, None] * stride_pm + ks[None, :] * stride_pk   # P[rows, ks]
        right = x + ks[:, None] * stride_xm + (cols % n)[None, :] * stride_xn  # X[ks, cols]
        acc = _tile_product(left, right, stride_pk, stride_xm, m, BLOCK_M, BLOCK_N, BLOCK_K)
        inside = (rows[:, None] < m) & (cols[None, :] < n)
        x += rows[:, None] * stride_xm + cols[None, :] * stride_xn
        acc += a * tl.load(x, mask=inside).to(tl.float32)
        tl.store(out + batch * m * n + rows[:, None] * n + cols[None, :],
                 acc.to(out.dtype.element_ty), mask=inside)


def symmetric_product(x: Tensor, alpha: float = 1.0, beta: float = 0.0,
                      addend: Tensor = None) -> Tensor:
    """alpha X Xᵀ + beta C for X (B, m, k), any strides, and C (B, m, m) symmetric or None;
    bf16 (B, m, m), exactly symmetric from the kernel."""
    if not _ns_kernels(x):
        if addend is None:
            return x @ x.mT if alpha == 1 else alpha * (x @ x.mT)
        return torch.baddbmm(addend, x, x.mT, beta=beta, alpha=alpha)
    m, k = x.shape[-2:]
    out = x.new_empty(x.size(0), m, m)
    with_c = addend is not None and beta != 0
    c = addend if with_c else out  # not read without C
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK"]) * (triton.cdiv(m, meta["BLOCK"]) + 1) // 2,
                         x.size(0))
    with _on_device(x):
        _symmetric_product_kernel[grid](x, c, out, m, k, alpha, beta, *x.stride(), *c.stride(),
                                        HAS_C=with_c)
    return out


def product_plus(p: Tensor, x: Tensor, a: float) -> Tensor:
    """P X + a X for P (B, m, m) and X (B, m, n), any strides; bf16 (B, m, n)."""
    if not _ns_kernels(x):
        return torch.baddbmm(x, p, x, beta=a)
    m, n = x.shape[-2:]
    out = x.new_empty(x.size(0), m, n)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),
                         x.size(0))
    with _on_device(x):
        _product_plus_kernel[grid](p, x, out, m, n, a, *p.stride(), *x.stride())
    return out


# -----------------------------------------------------------------------------
# The optimizer: one device, FSDP2 or HSDP (DTensor parameters sharded on dim 0)

MUON_KEYS = ("lr", "momentum", "beta2", "weight_decay", "nesterov", "ns_steps", "ns_coefficients",
             "eps", "adjust_lr_fn", "normalize", "cautious_weight_decay", "neuron_axis", "layout")
ADAMW_KEYS = ("lr", "betas", "eps", "weight_decay")
ADAMW_DEFAULTS = dict(betas=(0.9, 0.95), eps=1e-8)  # lr and weight_decay: the optimizer's
TORCH_KEYS = ("params", "param_names", "use_muon", "initial_lr")  # torch's own and schedulers'
SCHEDULED = ("lr", "weight_decay", "momentum", "beta2", "eps")  # read from tensors at each step


class NorMuon(torch.optim.Optimizer):
    """NorMuon for the hidden weight matrices of a network, and AdamW for the rest, in one object.

    Param groups with ``use_muon=False`` are trained by AdamW with the group's own ``lr`` (default:
    this optimizer's), ``betas`` (default (0.9, 0.95)), ``eps`` (default 1e-8) and
    ``weight_decay`` (default: this optimizer's), exactly as ``torch.optim.AdamW`` would.
    ``split_parameters(model, adamw_lr=...)`` makes all the groups:
    ``NorMuon(split_parameters(model, adamw_lr=3e-3), lr=3e-3, weight_decay=0.1)``.

    Which setting of the NorMuon groups reproduces what:
      - the paper's Algorithm 1 (the defaults): ``adjust_lr_fn="match_rms_adamw", nesterov=False``,
        an AdamW-scale learning rate (the update's RMS is 0.2·lr: AdamW's lr and schedule carry);
      - the authors' released code: ``adjust_lr_fn="original", nesterov=True, lr=0.02``;
      - plain Muon, identical to ``torch.optim.Muon`` given the same settings: ``normalize=False``;
      - what nanochat and modded-nanogpt run: ``ns_coefficients=POLAR_EXPRESS_COEFFICIENTS``,
        ``cautious_weight_decay=True``, ``neuron_axis="larger"`` (see ``statistic_along_columns``).

    ``momentum`` is β1, ``beta2`` the decay of the per-neuron second moment, ``eps`` is added to
    its square root, ``weight_decay`` is decoupled (W <- W - lr·weight_decay·W; with
    ``cautious_weight_decay`` only where the update has W's sign). ``ns_steps``,
    ``ns_coefficients`` (one (a, b, c), or one triple per step) and ``lr`` mean what they mean in
    ``torch.optim.Muon``; what differs from it: ``eps`` is NorMuon's ε (torch's guards NS's
    normalization, fixed at 1e-7 here); the defaults follow the paper: ``nesterov=False`` (torch:
    True), ``weight_decay=0`` (torch: 0.1), ``adjust_lr_fn="match_rms_adamw"`` (torch: "original").

    Each NorMuon group may set ``layout`` (see ``LAYOUTS``): which axis of its parameters holds the
    output neurons. 2-D parameters default to "out_in" (nn.Linear); a ≥3-D parameter must say
    whether it is a conv kernel or stacked experts. State per parameter: ``momentum_buffer`` (like
    the parameter) and ``second_moment`` (fp32, one number per output neuron: (out,), or (E, out)
    for experts; per column of wide matrices with ``neuron_axis="larger"``); AdamW's are torch's.

    Distributed: DTensor parameters sharded on dim 0 over a 1-D mesh (FSDP2's ``fully_shard``) or
    over the last axis of a 2-D (replicate, shard) mesh (HSDP) need no extra argument: see the
    module docstring for the plan; other Shard/Replicate placements (tensor parallel) work too,
    gathered whole on every rank. ``compile`` (default: on CUDA) runs the element-wise stages
    under ``torch.compile``. ``cuda_graph=True`` (CUDA only) records the whole step once as a CUDA
    graph and replays it (see ``_graphed_step``): no per-kernel launch cost on small models.
    """

    def __init__(self, params, lr=1e-3, momentum: float = 0.95, beta2: float = 0.95,
                 weight_decay: float = 0.0, nesterov: bool = False, ns_steps: int = 5,
                 ns_coefficients=MUON_COEFFICIENTS, eps: float = 1e-10,
                 adjust_lr_fn: str = "match_rms_adamw", normalize: bool = True,
                 cautious_weight_decay: bool = False, neuron_axis: str = "output",
                 compile: bool = None, cuda_graph: bool = False):
        defaults = dict(lr=lr, momentum=momentum, beta2=beta2, weight_decay=weight_decay,
                        nesterov=nesterov, ns_steps=ns_steps, ns_coefficients=ns_coefficients,
                        eps=eps, adjust_lr_fn=adjust_lr_fn, normalize=normalize,
                        cautious_weight_decay=cautious_weight_decay, neuron_axis=neuron_axis,
                        layout="out_in", use_muon=True)
        _check_muon_group(defaults)  # as torch does: the settings first, then the parameters
        defaults["ns_coefficients"] = _as_tuples(ns_coefficients)
        if params is None:
            raise ValueError("NorMuon got params=None; pass model parameters or param groups "
                             "(normuon.split_parameters(model) makes them).")
        self.compile, self.cuda_graph = compile, cuda_graph
        super().__init__(params, defaults)

    def __getstate__(self):  # correctness: deepcopy and pickle keep every public attribute
        return {**super().__getstate__(), "compile": self.compile, "cuda_graph": self.cuda_graph}

    def add_param_group(self, param_group: dict) -> None:
        use_muon = param_group.get("use_muon", True)
        keys = MUON_KEYS if use_muon else ADAMW_KEYS
        unknown = sorted(set(param_group) - set(keys) - set(TORCH_KEYS))
        if unknown:
            kind = "a NorMuon" if use_muon else "an AdamW (use_muon=False)"
            raise ValueError(f"NorMuon: {kind} param group does not take {unknown}; its keys are "
                             f"{keys}" + (" (AdamW groups: use_muon=False)" if use_muon else "."))
        if not use_muon:  # AdamW: its own defaults, and none of NorMuon's keys
            inherited = {key: self.defaults[key] for key in ("lr", "weight_decay")}
            param_group = {**ADAMW_DEFAULTS, **inherited, **param_group}
        not_adamw = [key for key in self.defaults if key not in param_group]  # before super fills
        super().add_param_group(param_group)  # fills in the defaults; then check what will run
        group = self.param_groups[-1]
        try:
            if self.cuda_graph and not all(_local(p).is_cuda for p in group["params"]):
                raise ValueError("NorMuon: cuda_graph=True records the step as a CUDA graph and "
                                 "needs CUDA parameters; leave it off on other devices.")
            if use_muon:
                group["ns_coefficients"] = _as_tuples(group["ns_coefficients"])
                _check_muon_group(group)
                for param in group["params"]:
                    _check_parameter(param, group["layout"])
            else:
                for key in not_adamw:  # NorMuon's defaults mean nothing to AdamW
                    del group[key]
                _check_adamw_group(group)
                for param in group["params"]:
                    _check_adamw_parameter(param)
        except ValueError:
            self.param_groups.pop()  # a rejected group must not stay behind
            raise

    def load_state_dict(self, state_dict: dict) -> None:
        # Correctness: torch casts loaded state to each parameter's dtype; v stays fp32 (only m
        # numbers, and v ~ 1/max(m, n) loses precision in fp16). Keep the saved values.
        saved_ids = [index for group in state_dict["param_groups"] for index in group["params"]]
        params = [param for group in self.param_groups for param in group["params"]]
        saved = {param: state_dict["state"].get(index) for index, param in zip(saved_ids, params)}
        second_moments = {param: entry["second_moment"] for param, entry in saved.items()
                          if isinstance(entry, dict) and "second_moment" in entry}
        super().load_state_dict(state_dict)
        for key in ("_captured", "_warm"):  # correctness: a captured graph holds the old state
            self.__dict__.pop(key, None)
        for param, second_moment in second_moments.items():
            device = self.state[param]["second_moment"].device
            self.state[param]["second_moment"] = second_moment.to(device, torch.float32)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.cuda_graph:
            self._graphed_step()
        else:
            self._load_scheduled()
            self._step(capturable=False)
        return loss

    def _step(self, capturable: bool) -> None:
        """One step of every group: AdamW's, then NorMuon's bucket by bucket (the plan above)."""
        for index, group in enumerate(self.param_groups):
            if not group["use_muon"] and group["params"]:
                self._adamw_step(group, self._scheduled(index), capturable)
        buckets = [(index, group, params) for index, group in enumerate(self.param_groups)
                   if group["use_muon"] for params in _same_shape_buckets(group)]
        owners = _owners([param for _, _, params in buckets for param in params])
        for index, group, params in buckets:
            self._step_bucket(group, params, [owners.get(id(p)) for p in params],
                              self._scheduled(index))

    def _scheduled(self, index: int) -> dict:
        """Group ``index``'s SCHEDULED hyperparameters as 0-D tensors on its device, which
        ``_load_scheduled`` refills before each step. Speed: a schedule changes their values, not
        the compiled kernels or a captured graph."""
        cache = self.__dict__.setdefault("_scheduled_tensors", {})
        if index not in cache:
            device = _local(self.param_groups[index]["params"][0]).device
            cache[index] = {name: torch.zeros((), dtype=torch.float64, device=device)
                            for name in SCHEDULED}
        return cache[index]

    def _load_scheduled(self) -> None:
        for index, group in enumerate(self.param_groups):
            for name in (SCHEDULED if group["use_muon"] else ("lr",)) if group["params"] else ():
                value, tensor = group[name], self._scheduled(index)[name]
                if isinstance(value, Tensor):  # a Tensor lr: copied on the device, no host sync
                    tensor.copy_(value.reshape(()))
                else:
                    tensor.fill_(value)

    def _graphed_step(self) -> None:
        """The step as one CUDA graph. The first step of a new set of parameters or settings runs
        eagerly on a side stream (it creates the state and compiles); the next one is captured,
        then replayed, and every later one only replayed. Gradients are copied into the captured
        ones where autograd made new tensors (zero_grad(set_to_none=False) avoids the copy)."""
        signature = _graph_signature(self.param_groups)
        self._load_scheduled()  # correctness: outside the graph, so the schedule reaches it
        captured = self.__dict__.get("_captured")
        if captured is not None and captured[0] == signature:
            _, graph, grads = captured
            for param, static in grads:
                if param.grad is not static:
                    static.copy_(param.grad)
                    param.grad = static
            graph.replay()
            return
        if self.__dict__.get("_warm") != signature:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self._step(capturable=True)
            torch.cuda.current_stream().wait_stream(stream)
            self.__dict__["_warm"] = signature
            return
        grads = [(p, p.grad) for group in self.param_groups for p in group["params"]
                 if p.grad is not None]
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step(capturable=True)
        graph.replay()  # the capture only recorded this step
        self.__dict__["_captured"] = (signature, graph, grads)

    def _adamw_step(self, group: dict, scheduled: dict, capturable: bool) -> None:
        """AdamW on the group's parameters that have a gradient; on each rank's shard if sharded.
        In a CUDA graph, torch's capturable AdamW reads lr and the step count on the GPU."""
        params = [p for p in group["params"] if p.grad is not None]
        for param in params:
            state = self.state[param]
            if not state:  # torch.optim.AdamW's state, so its checkpoints carry over
                state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(param),
                             exp_avg_sq=torch.zeros_like(param))
            if capturable:
                state["step"] = state["step"].to(_local(param).device)
        state = [self.state[p] for p in params]
        exp_avgs = [_local(s["exp_avg"]) for s in state]
        exp_avg_sqs = [_local(s["exp_avg_sq"]) for s in state]
        lr = scheduled["lr"].float() if capturable else group["lr"]
        adamw_update([_local(p) for p in params], [_local(p.grad) for p in params], exp_avgs,
                     exp_avg_sqs, [s["step"] for s in state], lr, group["betas"], group["eps"],
                     group["weight_decay"], capturable)

    def _step_bucket(self, group: dict, params: list, owners: list, scheduled: dict) -> None:
        """Algorithm 1 for K parameters of one shape, all at once (speed: one batched NS and a few
        fused kernels per bucket, not a Python loop per matrix)."""
        layout, sharded = group["layout"], isinstance(params[0], DTensor)
        # Any other placement (tensor parallel): every rank gathers the whole matrices, runs lines
        # 3-6 on them as one device would, and keeps its own part of the update (exact, not fast).
        gathered = sharded and not _row_sharded(params[0])
        sharded = sharded and not gathered
        # (rows, columns): the full matrix, rows its output neurons; the statistic's slices
        meta = torch.empty((1, *params[0].shape), device="meta")
        rows, columns = as_matrices(meta, layout).shape[-2:]  # the full matrix; rows: neurons
        along_columns = group["normalize"] and statistic_along_columns((rows, columns),
                                                                       group["neuron_axis"])
        for param in params:
            if param.grad.is_sparse:
                raise ValueError("NorMuon does not support sparse gradients; use "
                                 "torch.optim.SparseAdam or a dense gradient for this parameter.")
            state = self.state[param]
            if not state:  # the same keys on every rank, even one holding no rows (checkpoints)
                state["momentum_buffer"] = torch.zeros_like(param)
                state["second_moment"] = _zeros_per_neuron(param, layout, along_columns)
        weights = [_local(p) for p in params]
        on = self.compile if self.compile is not None else weights[0].is_cuda
        compiled = _compiled if on else (lambda function: function)
        lr, weight_decay, momentum, beta2, eps = (scheduled[name] for name in SCHEDULED)

        # 1. Momentum, locally (line 2).
        buffers = [_local(self.state[p]["momentum_buffer"]) for p in params]
        update = compiled(momentum_update)([_local(p.grad) for p in params], buffers, momentum,
                                           group["nesterov"])          # (K, rows here, ...) bf16
        # 2-5. Newton–Schulz (line 3): here, or sharded: once per shard group, by each owner.
        ns_arguments = (group["ns_steps"], group["ns_coefficients"])
        if gathered:
            update = _gather_whole(update, params)                      # (K, *shape) on every rank
        if sharded:
            orthogonal = _orthogonalize_on_owners(update, params[0].shape, layout, owners,
                                                  _shard_group(params[0].device_mesh), ns_arguments)
        else:
            orthogonal = from_matrices(newton_schulz(as_matrices(update, layout), *ns_arguments),
                                       layout, update.shape)

        # 6. Per-neuron statistics and the matrix scale (lines 4-6). Sharded: each rank puts the
        #    sums of the slices (rows, row pieces or columns) it holds into the full (B, k), one
        #    all-reduce over the shard group completes them, every rank computes the same factors
        #    from the same (replicated) second moment, then keeps those of its own slices.
        if not group["normalize"]:  # plain Muon: one scale per matrix
            scale = update_scale((rows, columns), group["adjust_lr_fn"], normalize=False)
            factors = torch.full((as_matrices(orthogonal, layout).size(0), 1), scale,
                                 device=orthogonal.device)
        else:
            slices = as_matrices(orthogonal, layout)
            square_sums = neuron_square_sums(slices.mT if along_columns else slices)  # (B, k here)
            statistic = _statistic_layout(layout, along_columns)
            local_shape, mine = square_sums.shape, slice(None)
            if sharded:
                mine = _local_neurons(params[0], statistic)
                neurons = _neuron_shape(params[0].shape, statistic)
                full = square_sums.new_zeros((len(params), *neurons))
                full[:, mine] = square_sums.view_as(full[:, mine])
                dist.all_reduce(full, group=_shard_group(params[0].device_mesh))
                square_sums = full.view(-1, columns if along_columns else rows)
            moments = [_local(self.state[p]["second_moment"]) for p in params]
            factors = compiled(neuron_factors)(square_sums, moments, (rows, columns), beta2, eps,
                                               group["adjust_lr_fn"])
            factors = factors.view(len(params), *_neuron_shape(params[0].shape, statistic))
            factors = factors[:, mine].reshape(local_shape)

        if gathered:  # each rank keeps its own part of the scaled update D
            direction = scaled_direction(orthogonal, factors, layout, along_columns)
            orthogonal = _local_parts(direction, params)
            factors = orthogonal.new_ones(as_matrices(orthogonal, layout).size(0), 1)
            along_columns = False

        # 7. The update, locally (line 7).
        compiled(apply_update)(weights, orthogonal, factors, layout, lr, weight_decay,
                               group["cautious_weight_decay"], along_columns)


def _orthogonalize_on_owners(update: Tensor, shape, layout: str, owners: list, process_group,
                             ns_arguments) -> Tensor:
    """Steps 3-5 of the FSDP2 plan for K dim-0-sharded tensors of full ``shape``.

    ``update`` (K, local rows, ...) is this rank's shard of each; ``owners[k]`` orthogonalizes
    tensor k. FSDP2 gives rank r rows [r·chunk, (r+1)·chunk) of dim 0, chunk = ceil(rows / world
    size), fewer (even none) at the end; shards are padded to ``chunk`` rows so all pieces have one
    size. Returns this rank's shard of the K orthogonalized tensors, bf16, shaped like ``update``.
    """
    world_size, rank = dist.get_world_size(process_group), dist.get_rank(process_group)
    count, local_rows = update.shape[:2]
    update = update.flatten(2) if update.ndim > 2 else update[..., None]  # (K, local rows, cols)
    rows, columns, chunk = shape[0], update.size(2), -(-shape[0] // world_size)
    by_owner = sorted(range(count), key=lambda k: owners[k])  # send order: grouped by owner
    per_rank = [owners.count(r) for r in range(world_size)]
    mine = per_rank[rank]

    # 3. Gather: every rank sends its shard of tensor k to owners[k], in bf16 (2 bytes/element).
    #    Correctness: stack and pad, not update[by_owner]: a list index is a host-to-device copy,
    #    which a CUDA graph capture refuses.
    send = torch.stack([update[k] for k in by_owner])                     # (K, local rows, cols)
    if local_rows < chunk:
        send = torch.nn.functional.pad(send, (0, 0, 0, chunk - local_rows))  # (K, chunk, cols)
    received = send.new_empty(world_size * mine, chunk, columns)  # (source rank · my tensor, ...)
    dist.all_to_all_single(received, send, [mine] * world_size, per_rank, group=process_group)

    # 4. The owner puts the shards of each of its tensors together in rank order and
    #    orthogonalizes them all in one batched NS (mine may be 0: it only sends and receives).
    full = received.view(world_size, mine, chunk, columns).transpose(0, 1)
    full = full.reshape(mine, world_size * chunk, columns)[:, :rows].reshape(mine, *shape)
    orthogonal = send.new_zeros(mine, world_size * chunk, columns)
    matrices = newton_schulz(as_matrices(full, layout), *ns_arguments)
    orthogonal[:, :rows] = from_matrices(matrices, layout, full.shape).reshape(mine, rows, columns)

    # 5. Scatter: the owner sends each rank its shard of the result, bf16; undo the owner order.
    send_back = orthogonal.view(mine, world_size, chunk, columns).transpose(0, 1)
    send_back = send_back.reshape(world_size * mine, chunk, columns)
    returned = send.new_empty(count, chunk, columns)
    dist.all_to_all_single(returned, send_back, per_rank, [mine] * world_size, group=process_group)
    position = {k: i for i, k in enumerate(by_owner)}
    result = torch.stack([returned[position[k], :local_rows] for k in range(count)])
    return result.reshape(count, local_rows, *shape[1:])


# -----------------------------------------------------------------------------
# Helpers: checks, buckets, sharding, state, compilation


_COMPILED = {}


def _compiled(function):
    """Speed: ``function`` under torch.compile: its element-wise work fused into a few kernels
    that read and write each tensor once. Static shapes (the fastest kernels): one compilation
    per bucket shape, so the recompilation limit is raised for these calls only. The same
    function runs eagerly where compilation is off."""
    if function not in _COMPILED:
        compiled = torch.compile(function, dynamic=False)

        def call(*args):
            with torch._dynamo.config.patch(recompile_limit=64):
                return compiled(*args)
        _COMPILED[function] = call
    return _COMPILED[function]


def _graph_signature(param_groups: list) -> tuple:
    """What a captured step depends on besides the scheduled values: which parameters have a
    gradient, and every other setting the step reads."""
    signature = []
    for group in param_groups:
        keys = [k for k in (MUON_KEYS if group["use_muon"] else ADAMW_KEYS) if k not in SCHEDULED]
        with_grad = tuple(id(p) for p in group["params"] if p.grad is not None)
        signature.append((with_grad, tuple(group[key] for key in keys)))
    return tuple(signature)


def _as_tuples(coefficients):
    """ns_coefficients as hashable tuples: one (a, b, c), or a tuple of per-step triples."""
    if len(coefficients) and isinstance(coefficients[0], (tuple, list)):
        return tuple(tuple(triple) for triple in coefficients)
    return tuple(coefficients)


def _check_lr(lr, name: str = "lr") -> None:
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError(f"NorMuon: Tensor {name} must be 1-element, got shape {tuple(lr.shape)}.")
    if not lr >= 0:
        raise ValueError(f"NorMuon: {name} must be >= 0, got {lr}.")


def _check_muon_group(group: dict) -> None:
    _check_lr(group["lr"])
    for name in ("momentum", "beta2"):
        if not 0 <= group[name] < 1:
            raise ValueError(f"NorMuon: {name} must be in [0, 1), got {group[name]}.")
    if not group["weight_decay"] >= 0:
        raise ValueError(f"NorMuon: weight_decay must be >= 0, got {group['weight_decay']}.")
    if not group["eps"] > 0:
        raise ValueError(f"NorMuon: eps must be > 0 (it keeps an all-zero row at zero), "
                         f"got {group['eps']}.")
    steps, coefficients = group["ns_steps"], group["ns_coefficients"]
    if not (isinstance(steps, int) and steps >= 1):
        raise ValueError(f"NorMuon: ns_steps must be an integer >= 1, got {steps}.")
    per_step = len(coefficients) > 0 and isinstance(coefficients[0], (tuple, list))
    if per_step and (len(coefficients) != steps or any(len(c) != 3 for c in coefficients)):
        raise ValueError(f"NorMuon: ns_coefficients has {len(coefficients)} per-step entries for "
                         f"ns_steps={steps}; give one (a, b, c) triple per step, or "
                         f"ns_steps={len(coefficients)}.")
    if not per_step and len(coefficients) != 3:
        raise ValueError(f"NorMuon: ns_coefficients must be three numbers (a, b, c) or one triple "
                         f"per step, got {coefficients}.")
    choices = dict(adjust_lr_fn=ADJUST_LR_FNS, neuron_axis=NEURON_AXES, layout=tuple(LAYOUTS))
    for name, allowed in choices.items():
        if group[name] not in allowed:
            raise ValueError(f"NorMuon: {name} must be one of {allowed}, got {group[name]!r}.")


def _check_adamw_group(group: dict) -> None:
    _check_lr(group["lr"])
    betas = group["betas"]
    if len(betas) != 2 or not all(0 <= beta < 1 for beta in betas):
        raise ValueError(f"NorMuon: an AdamW group's betas must be two numbers in [0, 1), "
                         f"got {betas}.")
    if not group["eps"] >= 0:
        raise ValueError(f"NorMuon: an AdamW group's eps must be >= 0, got {group['eps']}.")
    if not group["weight_decay"] >= 0:
        raise ValueError(f"NorMuon: an AdamW group's weight_decay must be >= 0, "
                         f"got {group['weight_decay']}.")


def _check_adamw_parameter(param: Tensor) -> None:
    if param.is_complex():
        raise ValueError("NorMuon does not support complex parameters; pass real tensors only.")
    if isinstance(param, DTensor):
        _check_mesh(param)


def _check_parameter(param: Tensor, layout: str) -> None:
    shape = tuple(param.shape)
    if param.ndim < 2:
        raise ValueError(f"NorMuon got a parameter of shape {shape} in a NorMuon group: it trains "
                         "weight matrices (>= 2-D). Use AdamW for embeddings, the output head, "
                         "norms, biases and scalars: a group with use_muon=False "
                         "(normuon.split_parameters(model) makes the groups).")
    dimensions = {"out_in": (2,), "in_out": (2,), "conv": (3, 4, 5), "experts_out_in": (3,),
                  "experts_in_out": (3,)}
    if param.ndim not in dimensions[layout]:
        hint = (" Say what it is: layout='conv' for a conv kernel (out, in, *kernel), "
                "'experts_out_in' or 'experts_in_out' for stacked experts (E, out, in) or "
                "(E, in, out);" if param.ndim >= 3 else "")
        raise ValueError(f"NorMuon got a {param.ndim}-D parameter of shape {shape} in a group with "
                         f"layout {layout!r} ({LAYOUTS[layout]}).{hint} "
                         "normuon.split_parameters(model) sets the layout.")
    if param.numel() == 0:
        raise ValueError(f"NorMuon got an empty parameter of shape {shape}; leave it out.")
    if param.is_complex():
        raise ValueError("NorMuon does not support complex parameters; pass real matrices only.")
    if isinstance(param, DTensor):
        _check_mesh(param)
        if _row_sharded(param) and param.to_local().shape[0] != len(_shard_rows(param)):
            raise ValueError("NorMuon expects FSDP2's row sharding (torch.chunk along dim 0); this "
                             f"DTensor's local shard has {param.to_local().shape[0]} of "
                             f"{param.shape[0]} rows.")


def _check_mesh(param: DTensor) -> None:
    """A 1-D or 2-D mesh, each axis Shard(dim) or Replicate(): FSDP2 and HSDP take the fast path
    (``_row_sharded``), any other such placement (tensor parallel) the gathered one."""
    mesh, placements = param.device_mesh, tuple(param.placements)
    if mesh.ndim > 2:
        raise ValueError(f"NorMuon supports 1-D (FSDP2) and 2-D (HSDP, or FSDP + tensor parallel) "
                         f"device meshes; got a {mesh.ndim}-D mesh: flatten it to two axes.")
    kinds_known = all(type(placement) in (Shard, Replicate) for placement in placements)
    if not kinds_known or all(placement == Replicate() for placement in placements):
        raise ValueError("NorMuon supports DTensor parameters sharded on dim 0 over a 1-D mesh "
                         "(FSDP2), on (replicate, shard) meshes (HSDP), or Shard/Replicate on each "
                         f"axis (tensor parallel); got {placements} on a {mesh.ndim}-D mesh.")


def _row_sharded(param: DTensor) -> bool:
    """FSDP2 (Shard(0) on a 1-D mesh) or HSDP ((Replicate(), Shard(0)) on a 2-D mesh): the layouts
    the once-per-shard-group plan of the module docstring handles."""
    expected = (Shard(0),) if param.device_mesh.ndim == 1 else (Replicate(), Shard(0))
    return tuple(param.placements) == expected


def _gather_whole(stack: Tensor, params: list) -> Tensor:
    """The whole tensors (K, *shape) on every rank, from this rank's parts (K, *local shape)."""
    whole = [DTensor.from_local(part, p.device_mesh, p.placements, shape=p.shape,
                                stride=p.stride()).full_tensor() for part, p in zip(stack, params)]
    return torch.stack(whole)


def _local_parts(stack: Tensor, params: list) -> Tensor:
    """This rank's parts (K, *local shape) of whole tensors (K, *shape) that every rank holds."""
    parts = [distribute_tensor(whole, p.device_mesh, p.placements, src_data_rank=None).to_local()
             for whole, p in zip(stack, params)]
    return torch.stack(parts)


def _local(tensor: Tensor) -> Tensor:
    """This rank's shard of a DTensor, or the tensor itself. Speed: the step runs no DTensor ops."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _shard_group(mesh):
    """The process group of the mesh axis that shards (the last: FSDP2's only, HSDP's second)."""
    return mesh.get_group(mesh.ndim - 1)


def _shard_rows(param: DTensor) -> range:
    """The dim-0 rows FSDP2 gives this rank: [r·chunk, (r+1)·chunk), chunk = ceil(rows / shard
    ranks), fewer (even none) at the end; r is the rank on the mesh's shard axis."""
    mesh = param.device_mesh
    chunk = -(-param.shape[0] // mesh.size(mesh.ndim - 1))
    start = min(param.shape[0], chunk * mesh.get_local_rank(mesh.ndim - 1))
    return range(start, min(param.shape[0], start + chunk))


def _owners(params: list) -> dict:
    """Who orthogonalizes each sharded matrix ({id: rank on its shard axis}), the same on every
    rank; matrices on one mesh share the work out among its shard ranks."""
    by_mesh, owners = defaultdict(list), {}
    for param in params:
        if isinstance(param, DTensor) and _row_sharded(param):  # the gathered path has no owner
            by_mesh[param.device_mesh].append(param)
    for mesh, matrices in by_mesh.items():
        ranks = assign_owners([p.numel() for p in matrices], mesh.size(mesh.ndim - 1))
        owners.update(zip(map(id, matrices), ranks))
    return owners


def _same_shape_buckets(group: dict) -> list:
    """A group's parameters with a gradient, grouped by (shape, dtype, device, mesh, placements),
    biggest first. Every rank computes the same buckets in the same order: the collectives depend
    on it."""
    buckets = defaultdict(list)
    for param in group["params"]:
        if param.grad is not None:
            mesh = param.device_mesh if isinstance(param, DTensor) else None
            placements = tuple(param.placements) if mesh is not None else None
            buckets[(param.shape, param.dtype, param.device, mesh, placements)].append(param)
    return sorted(buckets.values(), key=lambda bucket: -bucket[0].numel())


def _statistic_layout(layout: str, along_columns: bool) -> str:
    """The layout whose rows are the second moment's slices: the parameter's own, or its
    transpose when the statistic is kept per column (``neuron_axis="larger"``, wide matrices)."""
    if not along_columns:
        return layout
    return {"out_in": "in_out", "in_out": "out_in", "conv": "conv_columns",
            "experts_out_in": "experts_in_out", "experts_in_out": "experts_out_in"}[layout]


def _neuron_shape(shape, layout: str) -> tuple:
    """The shape of a parameter's output neurons (the rows of its matrices): (out,), or (E, out)
    for experts; "conv_columns": the in·kernel columns of a conv kernel's matrix."""
    if layout == "conv_columns":
        return (math.prod(shape[1:]),)
    return {"out_in": shape[:1], "conv": shape[:1], "in_out": shape[1:],
            "experts_out_in": shape[:2], "experts_in_out": shape[::2]}[layout]


def _local_neurons(param: DTensor, layout: str) -> slice:
    """Which of the neurons' first axis this rank's dim-0 shard holds: all of it where dim 0 is
    not that axis (every shard holds a slice of every neuron), else the shard's rows/experts."""
    if layout in ("in_out", "conv_columns"):
        return slice(None)
    rows = _shard_rows(param)
    return slice(rows.start, rows.stop)


def _zeros_per_neuron(param: Tensor, layout: str, along_columns: bool) -> Tensor:
    """The second moment's zeros, fp32 whatever the parameter's dtype (v ~ 1/max(m, n) underflows
    fp16). Sharded, every rank keeps all of it (replicated: m numbers per matrix), updated alike."""
    shape = _neuron_shape(param.shape, _statistic_layout(layout, along_columns))
    zeros = torch.zeros(shape, dtype=torch.float32, device=_local(param).device)
    if not isinstance(param, DTensor):
        return zeros
    mesh = param.device_mesh
    return DTensor.from_local(zeros, mesh, [Replicate()] * mesh.ndim, run_check=False)


# -----------------------------------------------------------------------------
# Which parameters NorMuon trains, and their layouts


def parameter_layout(module: torch.nn.Module, name: str, param: Tensor):
    """The layout of ``module``'s parameter ``name`` if it is a hidden weight of a kind this file
    knows, else None. Recognized without importing their libraries: nn.Linear, nn.ConvNd,
    nn.MultiheadAttention's input projections, transformers' Conv1D (attributes nx, nf) and stacked
    experts (a module with ``num_experts`` and ``is_transposed``)."""
    if isinstance(module, torch.nn.Linear) and name == "weight":
        return "out_in"
    conv = torch.nn.modules.conv._ConvNd
    if isinstance(module, conv) and name == "weight" and not module.transposed:
        return "conv"
    if isinstance(module, torch.nn.MultiheadAttention) and name.endswith("proj_weight"):
        return "out_in"
    conv1d_shape = (getattr(module, "nx", None), getattr(module, "nf", None))
    if name == "weight" and None not in conv1d_shape and tuple(param.shape) == conv1d_shape:
        return "in_out"
    if param.ndim == 3 and param.shape[0] == getattr(module, "num_experts", None):
        if not hasattr(module, "is_transposed"):
            raise ValueError(f"split_parameters: {type(module).__name__}.{name} "
                             f"{tuple(param.shape)} looks like stacked experts but its module does "
                             "not say whether they are (E, out, in) or (E, in, out); pass "
                             "layouts={'<parameter name>': 'experts_out_in'} "
                             "(or 'experts_in_out').")
        return "experts_in_out" if module.is_transposed else "experts_out_in"
    return None


def split_parameters(model: torch.nn.Module, exclude=(), layouts: dict = None, adamw_lr=None,
                     adamw_betas=(0.9, 0.95), adamw_eps=1e-8, adamw_weight_decay=0.0) -> list:
    """``model``'s trainable parameters as param groups for ``NorMuon``: one NorMuon group per
    layout ({"params", "layout", "use_muon": True}), then one AdamW group ({"params",
    "use_muon": False, "betas", "eps", "weight_decay", and "lr" unless ``adamw_lr`` is None:
    then the optimizer's lr}).

    NorMuon gets the hidden weights of the kinds ``parameter_layout`` recognizes. AdamW gets the
    rest: embeddings, the output head (``model.get_output_embeddings()`` where the model has it,
    and the modules in ``exclude``: its rows are vocabulary entries, not neurons), norms, biases,
    vector-like parameters (such as a class token (1, 1, C)), and other ≥2-D parameters, with a
    warning naming them. ``layouts={"parameter.name": layout or None}`` overrides the choice
    (None: AdamW). For two optimizers, give the groups with ``use_muon=False`` to torch's AdamW.
    """
    layouts = dict(layouts or {})
    unknown = set(layouts) - {name for name, _ in model.named_parameters()}
    if unknown:
        raise ValueError(f"split_parameters: layouts names parameters the model does not have: "
                         f"{sorted(unknown)}.")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embeddings = (torch.nn.Embedding, torch.nn.EmbeddingBag)
    to_adamw = [module for module in model.modules() if isinstance(module, embeddings)]
    to_adamw += [*exclude, *([head] if head is not None else [])]
    excluded = {id(p) for module in to_adamw for p in module.parameters()}
    owner = {id(p): (module, name) for module in model.modules()
             for name, p in module.named_parameters(recurse=False)}
    groups, adamw_params, unrecognized = defaultdict(list), [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name in layouts:
            layout = layouts[name]
        elif id(param) in excluded or sum(size > 1 for size in param.shape) <= 1:
            layout = None
        else:
            layout = parameter_layout(*owner[id(param)], param)
            if layout is None:
                unrecognized.append(f"{name} {tuple(param.shape)}")
        (groups[layout] if layout is not None else adamw_params).append(param)
    if unrecognized:
        warnings.warn(f"split_parameters: AdamW will train {', '.join(unrecognized)}: not weights "
                      "of a layer it recognizes. To train one with NorMuon, pass "
                      "layouts={name: layout}.", stacklevel=2)
    param_groups = [dict(params=params, layout=layout, use_muon=True)
                    for layout, params in groups.items()]
    if adamw_params:
        adamw = dict(params=adamw_params, use_muon=False, betas=tuple(adamw_betas), eps=adamw_eps,
                     weight_decay=adamw_weight_decay)
        param_groups.append(adamw if adamw_lr is None else dict(adamw, lr=adamw_lr))
    return param_groups
