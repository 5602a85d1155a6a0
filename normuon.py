"""NorMuon: neuron-wise normalized Muon (Li et al., arXiv:2510.05491), in one file that needs torch only.

Muon orthogonalizes the momentum of each hidden weight matrix, so every update is well conditioned
(its singular values are all close to 1). But the *rows* of that update, one per output neuron of an
``nn.Linear`` weight of shape (out, in), come out with very unequal norms, so a few neurons take most
of each step. NorMuon keeps an Adam-style second moment with one scalar per row, divides each row of
the orthogonalized update by its root, and rescales the whole matrix to a fixed RMS (Algorithm 1):

    M_t = β1 M_{t-1} + (1 - β1) G_t                  momentum
    O_t = NS5(M_t)                                   Newton–Schulz orthogonalization
    v_t = β2 v_{t-1} + (1 - β2) mean_cols(O_t ⊙ O_t)  per-neuron second moment, v_t ∈ R^m
    Ô_t = O_t / (sqrt(v_t) + ε)                       row normalization
    W_t = W_{t-1} - η λ W_{t-1} - η̂_t Ô_t,   η̂_t = 0.2 η sqrt(m n) / ||Ô_t||_F

Layout of this file: pure functions first (``newton_schulz``, the stages of the update, and
``normuon_update`` that chains them exactly as Algorithm 1 does), then the ``NorMuon`` optimizer,
which runs the same stages on one device or on FSDP2-sharded (DTensor) parameters, and last
``split_parameters``, which picks the matrices NorMuon should train and leaves the rest to AdamW.
"""

import math
from collections import defaultdict

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, Shard

MUON_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Keller Jordan's quintic, as in torch.optim.Muon
ADJUST_LR_FNS = ("match_rms_adamw", "original")


# -----------------------------------------------------------------------------
# Pure functions: the math of Algorithm 1, on full matrices or stacks of them (..., m, n)


def newton_schulz(matrix: Tensor, steps: int = 5, coefficients=MUON_COEFFICIENTS, eps: float = 1e-7) -> Tensor:
    """Approximately orthogonalize each matrix of ``matrix`` (..., m, n); returns bf16, same shape.

    The quintic iteration X <- a X + (b A + c A²) X with A = X Xᵀ maps every singular value s of X
    through p(s) = a s + b s³ + c s⁵. Muon's coefficients make p very steep near 0, so five steps
    lift even tiny singular values into a band around 1 (roughly 0.7 to 1.2), not to exactly 1:
    the result is U S' Vᵀ, well conditioned but not exactly U Vᵀ.
    """
    a, b, c = coefficients
    # Speed: bf16 matmuls; NS is stable in bf16 because the iteration is self-correcting.
    # Correctness: `.to(bfloat16)` returns the input itself when it is already bf16 (a bf16
    # momentum buffer), so nothing below may write into x in place.
    x = matrix.to(torch.bfloat16).reshape(-1, *matrix.shape[-2:])  # (batch, m, n): one bmm for all
    transposed = x.size(-2) > x.size(-1)
    if transposed:  # speed: make A = X Xᵀ the small (min(m, n))² Gram matrix
        x = x.mT
    # The iteration converges only for singular values <= 1; the Frobenius norm bounds the
    # spectral norm. The clamp keeps an all-zero matrix at zero instead of 0/0 = NaN.
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT                                               # A = X Xᵀ
        polynomial = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b A + c A², one fused matmul
        x = torch.baddbmm(x, polynomial, x, beta=a)                   # a X + (b A + c A²) X
    if transposed:
        x = x.mT
    return x.reshape(matrix.shape)


def momentum_update(grad: Tensor, momentum_buffer: Tensor, momentum: float, nesterov: bool) -> Tensor:
    """Line 2: M_t = β1 M_{t-1} + (1 - β1) G_t, in place. Returns what NS will orthogonalize:
    M_t itself (the paper's box) or, with Nesterov (the released code), G_t + β1 (M_t - G_t)."""
    momentum_buffer.lerp_(grad, 1 - momentum)
    return grad.lerp(momentum_buffer, momentum) if nesterov else momentum_buffer


def update_second_moment(orthogonal: Tensor, second_moment: Tensor, beta2: float) -> Tensor:
    """Line 4: v_t = β2 v_{t-1} + (1 - β2) mean_cols(O_t ⊙ O_t), in place: one scalar per row
    (neuron), ``second_moment`` has shape (..., m, 1). Returns mean_cols(O_t ⊙ O_t) too.
    Everything here is per row, which is why a rank holding whole rows needs no communication."""
    # Speed: one read of the bf16 O_t, accumulated in fp32, no fp32 copy of O_t.
    mean_square = torch.linalg.vector_norm(orthogonal, dim=-1, keepdim=True, dtype=torch.float32).square() / orthogonal.size(-1)
    second_moment.lerp_(mean_square.to(second_moment.dtype), 1 - beta2)
    return mean_square


def update_scale(shape, adjust_lr_fn: str, normalize: bool, square_norms: Tensor = None):
    """The factor that multiplies the learning rate for this matrix (line 6).

    With ``normalize=True`` (NorMuon), from ``square_norms`` (..., 2) = (||O_t||²_F, ||Ô_t||²_F):
      - "match_rms_adamw" (the paper's box): 0.2 sqrt(m n) / ||Ô_t||_F, so the update's RMS is
        exactly 0.2 and AdamW's learning rate and schedule carry over;
      - "original" (the released code): ||O_t||_F / ||Ô_t||_F, which gives Ô_t back the norm O_t had
        before row normalization, times Muon's sqrt(max(1, m / n)); Muon-scale learning rate.
    With ``normalize=False`` (plain Muon) the scale of ``torch.optim.Muon``: 0.2 sqrt(max(m, n))
    or sqrt(max(1, m / n)); no norms are needed.
    """
    if adjust_lr_fn not in ADJUST_LR_FNS:  # correctness: a typo must not silently pick the other rule
        raise ValueError(f"adjust_lr_fn must be one of {ADJUST_LR_FNS}, got {adjust_lr_fn!r}.")
    rows, columns = shape[-2], shape[-1]
    if not normalize:
        return 0.2 * math.sqrt(max(rows, columns)) if adjust_lr_fn == "match_rms_adamw" else \
            math.sqrt(max(1.0, rows / columns))
    orthogonal_norm, normalized_norm = square_norms.sqrt().unbind(-1)
    # Correctness: an all-zero gradient gives Ô_t = 0 and 0/0 here; the clamp makes that a finite
    # factor times zero. Otherwise ||Ô_t||_F ~ sqrt(m n) (rows of RMS ~1/sqrt(1-β2)), far above 1e-12.
    normalized_norm = normalized_norm.clamp(min=1e-12)
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(rows * columns) / normalized_norm
    return orthogonal_norm / normalized_norm * math.sqrt(max(1.0, rows / columns))


def normuon_update(grad: Tensor, momentum_buffer: Tensor, second_moment: Tensor, *, momentum: float = 0.95,
                   beta2: float = 0.95, nesterov: bool = False, ns_steps: int = 5, eps: float = 1e-10,
                   adjust_lr_fn: str = "match_rms_adamw", normalize: bool = True) -> Tensor:
    """Algorithm 1 on matrices ``grad`` (..., m, n): updates ``momentum_buffer`` (same shape) and
    ``second_moment`` (..., m, 1) in place and returns the step direction D = (η̂_t / η) Ô_t (fp32),
    so that W_t = W_{t-1} - η λ W_{t-1} - η D. With "match_rms_adamw", RMS(D) = 0.2 exactly."""
    update = momentum_update(grad, momentum_buffer, momentum, nesterov)  # line 2: M_t
    return normuon_direction(update, second_moment, beta2=beta2, ns_steps=ns_steps, eps=eps,  # lines 3-6
                             adjust_lr_fn=adjust_lr_fn, normalize=normalize)


def normuon_direction(update: Tensor, second_moment: Tensor, *, beta2: float, ns_steps: int, eps: float,
                      adjust_lr_fn: str, normalize: bool, orthogonalize=newton_schulz, add_across_ranks=None,
                      shape=None) -> Tensor:
    """Lines 3-6 of Algorithm 1, from the momentum M_t (``update``) to the direction D.

    Only two lines need more than the rows at hand, and they are the two hooks a row-sharded caller
    (the optimizer under FSDP2) replaces: ``orthogonalize`` (NS needs the whole matrix) and
    ``add_across_ranks`` (the Frobenius norms need every row; it sums a tensor across ranks in
    place). ``shape`` is then the full (m, n). On one device, leave all three at their defaults.
    """
    shape = update.shape[-2:] if shape is None else shape
    orthogonal = orthogonalize(update, ns_steps)                           # line 3: O_t = NS5(M_t)
    if not normalize:                                                      # plain Muon: D = scale · O_t
        return orthogonal.float().mul_(update_scale(shape, adjust_lr_fn, normalize=False))  # fp32, as torch.optim.Muon
    mean_square = update_second_moment(orthogonal, second_moment, beta2)  # line 4: v_t
    row_divisor = second_moment.float().sqrt() + eps                       # line 5: Ô_t = O_t / row_divisor
    # ||O_t||² and ||Ô_t||² from per-row numbers alone (row i of Ô_t is O_t,i / row_divisor_i), so
    # they cost no pass over the matrix and, sharded, an all-reduce of 2 numbers per matrix.
    row_square_norms = torch.cat([mean_square, mean_square / row_divisor.square()], dim=-1) * shape[-1]
    square_norms = row_square_norms.sum(dim=-2)                            # (..., 2)
    if add_across_ranks is not None:
        add_across_ranks(square_norms)
    scale = update_scale(shape, adjust_lr_fn, normalize=True, square_norms=square_norms)  # line 6: η̂_t / η
    return orthogonal * (scale[..., None, None] / row_divisor)             # (η̂_t / η) Ô_t, one pass over O_t


# -----------------------------------------------------------------------------
# The optimizer: one device, or FSDP2 (DTensor parameters sharded by rows)


class NorMuon(torch.optim.Optimizer):
    """NorMuon for the hidden weight matrices of a network; train everything else with AdamW.

    Which setting reproduces what:
      - the paper's Algorithm 1 (the defaults): ``adjust_lr_fn="match_rms_adamw", nesterov=False``,
        an AdamW-scale learning rate (the update's RMS is 0.2·lr, so AdamW's lr and schedule carry over);
      - the authors' released code: ``adjust_lr_fn="original", nesterov=True, lr=0.02`` (Muon-scale);
      - plain Muon, identical to ``torch.optim.Muon`` with the same settings: ``normalize=False``.

    Arguments follow ``torch.optim.Muon``: ``momentum`` is β1, ``beta2`` the decay of the
    per-neuron second moment, ``eps`` is added to its square root, ``weight_decay`` is decoupled
    (W <- W - lr·weight_decay·W). Parameters must be ≥2-D; a conv kernel (out, in, kh, kw) is
    treated as the (out, in·kh·kw) matrix. Each parameter's state is ``momentum_buffer`` (shape and
    dtype of the parameter, as in torch) and ``second_moment`` (one fp32 number per row: shape (out, 1)).

    Distributed: parameters that are DTensors sharded on dim 0 over a 1-D mesh (what FSDP2's
    ``fully_shard`` makes) are handled without any extra argument. Every matrix is orthogonalized
    once in the whole job, by one owner rank, and the result equals the single-device one.
    """

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.95, beta2: float = 0.95,
                 weight_decay: float = 0.0, nesterov: bool = False, ns_steps: int = 5, eps: float = 1e-10,
                 adjust_lr_fn: str = "match_rms_adamw", normalize: bool = True):
        defaults = dict(lr=lr, momentum=momentum, beta2=beta2, weight_decay=weight_decay, nesterov=nesterov,
                        ns_steps=ns_steps, eps=eps, adjust_lr_fn=adjust_lr_fn, normalize=normalize)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)  # fills in the defaults; then check the group as it will run
        try:
            _check_hyperparameters(self.param_groups[-1])
            for param in self.param_groups[-1]["params"]:
                _check_parameter(param)
        except ValueError:
            self.param_groups.pop()  # a rejected group must not stay behind
            raise

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        for state in self.state.values():  # torch casts state to the parameter's dtype; v stays fp32
            state["second_moment"] = state["second_moment"].float()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        next_owner = 0  # NS work of sharded matrices goes round-robin over ranks, biggest matrices first
        for group in self.param_groups:
            for params in _same_shape_buckets(group["params"]):
                next_owner = self._step_bucket(group, params, next_owner)
        return loss

    def _step_bucket(self, group: dict, params: list, next_owner: int) -> int:
        """One step for matrices of one shape. Speed: all of them go through each stage together
        (one batched NS, a handful of kernels) instead of one Python loop iteration each."""
        for param in params:
            if param.grad.is_sparse:
                raise ValueError("NorMuon does not support sparse gradients; use torch.optim.SparseAdam "
                                 "or a dense gradient for this parameter.")
            state = self.state[param]
            if not state:  # same keys on every rank, even one holding no rows (distributed checkpoints)
                # contiguous even for a channels_last parameter, so the row view below is a view
                state["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.contiguous_format)
                state["second_moment"] = _zeros_per_row(param)
        # Work on plain local tensors, rows flattened: (rows here, n). Speed: DTensor ops are slow.
        # A view, except for a non-contiguous (e.g. channels_last) tensor: then a copy (see the end).
        as_rows = lambda tensor: _local(tensor).flatten(1)
        grads = [as_rows(p.grad) for p in params]
        momentum_buffers = [as_rows(self.state[p]["momentum_buffer"]) for p in params]
        second_moments = [as_rows(self.state[p]["second_moment"]) for p in params]

        # Line 2, momentum_update() on each parameter's own buffer. Speed: one fused kernel, no stacked
        # copy of the momentum; then a single copy stacks the matrices as NS's bf16 input.
        torch._foreach_lerp_(momentum_buffers, grads, 1 - group["momentum"])
        updates = torch._foreach_lerp(grads, momentum_buffers, group["momentum"]) if group["nesterov"] else momentum_buffers
        update = grads[0].new_empty((len(params), *grads[0].shape), dtype=torch.bfloat16)  # (K, rows, n)
        torch._foreach_copy_(list(update.unbind(0)), updates)
        second_moment = torch.stack(second_moments)  # (K, rows, 1)

        shape = (params[0].shape[0], math.prod(params[0].shape[1:]))  # the full matrix (m, n)
        hooks = {}
        if isinstance(params[0], DTensor):
            process_group = params[0].device_mesh.get_group()
            world_size = dist.get_world_size(process_group)
            owners = [(next_owner + k) % world_size for k in range(len(params))]
            next_owner = (next_owner + len(params)) % world_size
            hooks = dict(orthogonalize=lambda update, steps: _orthogonalize_sharded(
                update, shape[0], owners, process_group, steps),
                add_across_ranks=lambda sums: dist.all_reduce(sums, group=process_group))
        direction = normuon_direction(  # lines 3-6
            update, second_moment, beta2=group["beta2"], ns_steps=group["ns_steps"], eps=group["eps"],
            adjust_lr_fn=group["adjust_lr_fn"], normalize=group["normalize"], shape=shape, **hooks)

        torch._foreach_copy_(second_moments, list(second_moment.unbind(0)))
        weights = [as_rows(p) for p in params]
        lr, weight_decay = float(group["lr"]), group["weight_decay"]
        if weight_decay != 0:
            torch._foreach_mul_(weights, 1 - lr * weight_decay)
        torch._foreach_add_(weights, list(direction.to(weights[0].dtype).unbind(0)), alpha=-lr)
        for param, weight in zip(params, weights):  # correctness: a copied (non-contiguous) parameter gets its update
            if weight.data_ptr() != _local(param).data_ptr():
                _local(param).copy_(weight.view(_local(param).shape))
        return next_owner


def _orthogonalize_sharded(update: Tensor, rows: int, owners: list, process_group, steps: int) -> Tensor:
    """NS of K row-sharded matrices, each run once in the job, by its owner rank.

    ``update`` (K, local_rows, n) is this rank's rows of K matrices of full shape (rows, n), and
    ``owners[k]`` the rank that orthogonalizes matrix k. FSDP2 gives rank r the rows
    [r·chunk, (r+1)·chunk) with chunk = ceil(rows / world_size), fewer (even none) at the end; every
    shard is padded to ``chunk`` rows so that all pieces have one size. Returns this rank's rows of
    the K orthogonalized matrices, bf16 (K, local_rows, n).
    """
    world_size, rank = dist.get_world_size(process_group), dist.get_rank(process_group)
    count, local_rows, columns = update.shape
    chunk = -(-rows // world_size)
    by_owner = sorted(range(count), key=lambda k: owners[k])  # send order: matrices grouped by owner
    matrices_per_rank = [owners.count(r) for r in range(world_size)]
    mine = matrices_per_rank[rank]

    # 1. Gather: every rank sends its rows of matrix k to owners[k], in bf16 (2 bytes per element).
    send = update.new_zeros(count, chunk, columns, dtype=torch.bfloat16)
    send[:, :local_rows] = update[by_owner]
    received = send.new_empty(world_size * mine, chunk, columns)  # (source rank, my matrix, chunk, n)
    dist.all_to_all_single(received, send, [mine] * world_size, matrices_per_rank, group=process_group)

    # 2. The owner stacks the shards of each of its matrices in rank order and orthogonalizes them all
    #    in one batched NS. (mine may be 0: this rank then only sends and receives.)
    full = received.view(world_size, mine, chunk, columns).transpose(0, 1).reshape(mine, world_size * chunk, columns)
    orthogonal = torch.zeros_like(full)
    orthogonal[:, :rows] = newton_schulz(full[:, :rows], steps)

    # 3. Scatter: the owner sends each rank its rows of the result, in bf16; undo the owner order.
    send_back = orthogonal.view(mine, world_size, chunk, columns).transpose(0, 1).reshape(world_size * mine, chunk, columns)
    returned = send.new_empty(count, chunk, columns)
    dist.all_to_all_single(returned, send_back, matrices_per_rank, [mine] * world_size, group=process_group)
    result = torch.empty_like(returned)
    result[by_owner] = returned
    return result[:, :local_rows]


# -----------------------------------------------------------------------------
# Helpers: checks, buckets, DTensor plumbing, and the NorMuon / AdamW parameter split


def _check_hyperparameters(group: dict) -> None:
    if not group["lr"] >= 0:
        raise ValueError(f"NorMuon: lr must be >= 0, got {group['lr']}.")
    for name in ("momentum", "beta2"):
        if not 0 <= group[name] < 1:
            raise ValueError(f"NorMuon: {name} must be in [0, 1), got {group[name]}.")
    if not group["weight_decay"] >= 0:
        raise ValueError(f"NorMuon: weight_decay must be >= 0, got {group['weight_decay']}.")
    if not group["eps"] > 0:
        raise ValueError(f"NorMuon: eps must be > 0 (it keeps an all-zero row at zero), got {group['eps']}.")
    if not (isinstance(group["ns_steps"], int) and group["ns_steps"] >= 1):
        raise ValueError(f"NorMuon: ns_steps must be an integer >= 1, got {group['ns_steps']}.")
    if group["adjust_lr_fn"] not in ADJUST_LR_FNS:
        raise ValueError(f"NorMuon: adjust_lr_fn must be one of {ADJUST_LR_FNS}, got {group['adjust_lr_fn']!r}.")


def _check_parameter(param: Tensor) -> None:
    if param.ndim < 2:
        raise ValueError(f"NorMuon got a parameter of shape {tuple(param.shape)}: it trains weight matrices "
                         "(>= 2-D) only. Use AdamW for embeddings, the output head, norms, biases and scalars "
                         "(normuon.split_parameters(model) makes the two lists).")
    if param.numel() == 0:
        raise ValueError(f"NorMuon got an empty parameter of shape {tuple(param.shape)}; leave it out.")
    if param.is_complex():
        raise ValueError("NorMuon does not support complex parameters; pass real matrices only.")
    if isinstance(param, DTensor):
        if param.device_mesh.ndim != 1 or tuple(param.placements) != (Shard(0),):
            raise ValueError(f"NorMuon supports DTensor parameters sharded on dim 0 over a 1-D mesh (FSDP2's "
                             f"fully_shard); got placements {param.placements} on a {param.device_mesh.ndim}-D mesh.")
        world_size, rank = param.device_mesh.size(), param.device_mesh.get_local_rank()
        chunk = -(-param.shape[0] // world_size)
        if param.to_local().shape[0] != max(0, min(chunk, param.shape[0] - rank * chunk)):
            raise ValueError("NorMuon expects FSDP2's row sharding (torch.chunk along dim 0); this DTensor's "
                             f"local shard has {param.to_local().shape[0]} of {param.shape[0]} rows on rank {rank}.")


def _same_shape_buckets(params: list) -> list:
    """Parameters with a gradient, grouped by (shape, dtype, device, sharding), biggest first.
    Every rank computes the same buckets in the same order: the collectives depend on it."""
    buckets = defaultdict(list)
    for param in params:
        if param.grad is not None:
            mesh = param.device_mesh if isinstance(param, DTensor) else None
            buckets[(param.shape, param.dtype, param.device, mesh)].append(param)
    return sorted(buckets.values(), key=lambda bucket: -bucket[0].numel())


def _local(tensor: Tensor) -> Tensor:
    """This rank's rows of a DTensor (a view: in-place changes reach the parameter), or the tensor."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _zeros_per_row(param: Tensor) -> Tensor:
    """A (rows, 1) fp32 zero tensor laid out like ``param``'s rows: a DTensor sharded the same way."""
    # fp32 whatever the parameter's dtype: only m numbers, and v ~ 1 / max(m, n) underflows fp16.
    local = torch.zeros(_local(param).shape[0], 1, dtype=torch.float32, device=_local(param).device)
    if isinstance(param, DTensor):
        return DTensor.from_local(local, param.device_mesh, param.placements, run_check=False,
                                  shape=torch.Size((param.shape[0], 1)), stride=(1, 1))
    return local


def split_parameters(model: torch.nn.Module, exclude=()) -> tuple:
    """Split ``model``'s trainable parameters into (NorMuon parameters, AdamW parameters).

    NorMuon gets the hidden weight matrices: every ≥2-D parameter, except those of ``nn.Embedding``
    modules and of the modules in ``exclude`` (pass the output head, e.g. ``exclude=[model.lm_head]``:
    its rows are vocabulary entries, not neurons of a hidden layer). AdamW gets all the rest:
    embeddings, the output head, norms, biases and scalars.
    """
    excluded = {id(p) for module in model.modules() if isinstance(module, torch.nn.Embedding)
                for p in module.parameters()}
    excluded |= {id(p) for module in exclude for p in module.parameters()}
    normuon_params, adamw_params = [], []
    for param in model.parameters():
        if param.requires_grad:
            use_normuon = param.ndim >= 2 and id(param) not in excluded
            (normuon_params if use_normuon else adamw_params).append(param)
    return normuon_params, adamw_params
