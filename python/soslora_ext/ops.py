"""Python face of the `torch.ops.soslora` operators: fake kernels, autograd, thin wrappers.

Shapes: x [N, in], A [r, in], B [out, r], scale [r] (one per rank) or [out, r] (per output
channel and rank). Experts are contiguous segments of the r axis. Dropout is described by an
int64 tensor `dropout_seed = (seed, offset)` on x's device: the mask is recomputed from it in
the backward pass, never stored.
"""
from __future__ import annotations

import torch

from . import _C  # loads the library that registers torch.ops.soslora

Tensor = torch.Tensor
_ops = torch.ops.soslora


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other dtype accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---- fake kernels (shape and dtype propagation for torch.compile / meta tensors) -------------
def _dense_rank(A, row_index, ranks) -> int:
    return sum(ranks) if row_index is not None else A.shape[0]


def _check_step_args(x, A, B, scale, row_index):
    # The ops check everything; these are the shapes the outputs are built from.
    torch._check(x.dim() == 2 and A.dim() == 2 and B.dim() == 2,
                 lambda: "x, A and B must be 2-D")
    torch._check(A.shape[1] == x.shape[1] and B.shape[1] == A.shape[0],
                 lambda: f"expected A [r, {x.shape[1]}] and B [out, r], got {tuple(A.shape)} "
                         f"and {tuple(B.shape)}")
    if row_index is None:
        torch._check(A.shape[0] % scale.shape[0] == 0,
                     lambda: f"scale {tuple(scale.shape)}: its groups must divide the rank "
                             f"{A.shape[0]}")


@torch.library.register_fake("soslora::adapted_linear")
def _(x, weight, bias, base_out, A, B, scale, row_index, col_index, row_offsets, col_offsets,
      ranks, dense_blocks, dropout_p, dropout_on_input, ortho_lambda, num_experts,
      grad_A_multiplier, gate_logits, gate_temperature, uniform_prior, anchor_scales,
      scale_anchor):
    _check_step_args(x, A, B, scale, row_index)
    return x.new_empty(x.shape[0], B.shape[0])


@torch.library.register_fake("soslora::adapted_linear_forward")
def _(x, weight, bias, base_out, A, B, scale, row_index, col_index, row_offsets, col_offsets,
      ranks, dropout_seed, dropout_p, dropout_on_input):
    _check_step_args(x, A, B, scale, row_index)
    R = _dense_rank(A, row_index, ranks)
    return (x.new_empty(x.shape[0], B.shape[0]), x.new_empty(x.shape[0], R),
            x.new_empty(B.shape[0], R))


@torch.library.register_fake("soslora::adapted_linear_backward")
def _(grad_out, x, weight, A, B, scale, hidden, scaled_B, row_index, col_index, row_offsets,
      col_offsets, ranks, dropout_seed, dropout_p, dropout_on_input, ortho_lambda, num_experts,
      grad_A_multiplier, output_mask):
    _check_step_args(x, A, B, scale, row_index)
    torch._check(grad_out.shape == (x.shape[0], B.shape[0]),
                 lambda: f"grad_out must be [N, out], got {tuple(grad_out.shape)}")
    return tuple(t.new_empty(t.shape) if need else None
                 for t, need in zip((x, A, B, scale), output_mask))


@torch.library.register_fake("soslora::dropout_seed")
def _(like):
    return like.new_empty(2, dtype=torch.int64)


@torch.library.register_fake("soslora::lowrank_forward")
def _(x, A, B, scale, base_out, dropout_seed, dropout_p, dropout_on_input):
    return x.new_empty(x.shape[0], B.shape[0]), x.new_empty(x.shape[0], A.shape[0])


@torch.library.register_fake("soslora::linear_lowrank_forward")
def _(x, weight, bias, A, B, scale, dropout_seed, dropout_p, dropout_on_input):
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], A.shape[0])


@torch.library.register_fake("soslora::linear_lowrank_grad_x")
def _(grad_out, weight, grad_hidden, A, dropout_seed, dropout_p, dropout_on_input):
    return grad_out.new_empty(grad_out.shape[0], weight.shape[1])


@torch.library.register_fake("soslora::lowrank_grad_hidden")
def _(grad_out, B, scale, hidden, dropout_seed, dropout_p, dropout_on_input):
    return hidden.new_empty(hidden.shape), B.new_empty(B.shape), scale.new_empty(scale.shape)


@torch.library.register_fake("soslora::lowrank_grad_A")
def _(grad_hidden, x, dropout_seed, dropout_p, dropout_on_input):
    return x.new_empty(grad_hidden.shape[1], x.shape[1])


@torch.library.register_fake("soslora::lowrank_grad_x")
def _(grad_hidden, A, grad_x_base, dropout_seed, dropout_p, dropout_on_input):
    return A.new_empty(grad_hidden.shape[0], A.shape[1])


@torch.library.register_fake("soslora::input_dropout_grads_")
def _(grad_x, grad_hidden, A, x, dropout_seed, dropout_p):
    return A.new_empty(A.shape)


@torch.library.register_fake("soslora::cluster_lowrank_forward")
def _(x, A, B, scale, row_index, col_index, row_offsets, col_offsets, ranks, base_out,
      dropout_seed, dropout_p):
    return x.new_empty(x.shape[0], B.shape[0]), x.new_empty(x.shape[0], sum(ranks))


@torch.library.register_fake("soslora::cluster_lowrank_backward")
def _(grad_out, x, A, B, scale, hidden, grad_hidden, row_index, col_index, row_offsets,
      col_offsets, ranks, grad_x_base, dropout_seed, dropout_p):
    return x.new_empty(x.shape), A.new_empty(A.shape), B.new_empty(B.shape)


@torch.library.register_fake("soslora::dropout_mask")
def _(dropout_seed, size, dropout_p, dtype):
    return dropout_seed.new_empty(size, dtype=dtype)


@torch.library.register_fake("soslora::ortho_penalty")
def _(A, num_experts):
    return A.new_empty((), dtype=accumulate_dtype(A.dtype))


@torch.library.register_fake("soslora::ortho_penalty_grad_")
def _(grad_A, A, weight, num_experts):
    return None


@torch.library.register_fake("soslora::merge_into_")
def _(weight, A, B, scale, alpha):
    return None


# ---- autograd ---------------------------------------------------------------------------------
def _drop(t: Tensor, seed: Tensor | None, p: float, apply: bool) -> Tensor:
    """t times the ops' dropout mask for t's shape, when `apply` and p > 0."""
    if not apply or p == 0:
        return t
    return t * _ops.dropout_mask(seed, t.shape, p, t.dtype)


def _lowrank_setup_context(ctx, inputs, output):
    x, A, B, scale, base_out, dropout_seed, dropout_p, dropout_on_input = inputs
    _, hidden = output
    # `hidden` is saved as an output so that double backward sees its dependence on x and A.
    ctx.save_for_backward(x, A, B, scale, hidden, dropout_seed)
    ctx.dropout = (dropout_p, dropout_on_input)
    ctx.has_base_out = base_out is not None
    ctx.set_materialize_grads(False)  # hidden is rarely used: its gradient is usually None


def _output_side_gradients(grad_out, grad_hidden_output, B, scale, hidden, seed, p, on_input):
    """(grad_out, grad wrt the A-side product, grad_B, grad_scale) from the gradients of the
    ops' two outputs (out, hidden); grad_out is zeros when only hidden has a gradient."""
    if grad_out is None:
        grad_out = hidden.new_zeros(hidden.shape[0], B.shape[0])
    grad_hidden, grad_B, grad_scale = _ops.lowrank_grad_hidden(
        grad_out, B, scale, hidden, seed, p, on_input)
    if grad_hidden_output is not None:  # hidden = D_post(A-side product)
        grad_hidden = grad_hidden + _drop(grad_hidden_output, seed, p, not on_input)
    return grad_out, grad_hidden, grad_B, grad_scale


def _lowrank_backward(ctx, grad_out, grad_hidden_output):
    x, A, B, scale, hidden, seed = ctx.saved_tensors
    p, on_input = ctx.dropout
    if grad_out is None and grad_hidden_output is None:
        return (None,) * 8
    grad_out, grad_hidden, grad_B, grad_scale = _output_side_gradients(
        grad_out, grad_hidden_output, B, scale, hidden, seed, p, on_input)
    grad_A = _ops.lowrank_grad_A(grad_hidden, x, seed, p, on_input)
    grad_x = None
    if ctx.needs_input_grad[0]:
        grad_x = _ops.lowrank_grad_x(grad_hidden, A, None, seed, p, on_input)
    return (grad_x, grad_A, grad_B, grad_scale if ctx.needs_input_grad[3] else None,
            grad_out if ctx.has_base_out else None, None, None, None)


torch.library.register_autograd(
    "soslora::lowrank_forward", _lowrank_backward, setup_context=_lowrank_setup_context)


def _linear_lowrank_setup_context(ctx, inputs, output):
    x, weight, bias, A, B, scale, dropout_seed, dropout_p, dropout_on_input = inputs
    ctx.save_for_backward(x, weight, A, B, scale, output[1], dropout_seed)
    ctx.dropout = (dropout_p, dropout_on_input)
    ctx.set_materialize_grads(False)


def _linear_lowrank_backward(ctx, grad_out, grad_hidden_output):
    x, weight, A, B, scale, hidden, seed = ctx.saved_tensors
    p, on_input = ctx.dropout
    if grad_out is None and grad_hidden_output is None:
        return (None,) * 9
    grad_out, grad_hidden, grad_B, grad_scale = _output_side_gradients(
        grad_out, grad_hidden_output, B, scale, hidden, seed, p, on_input)
    needs = ctx.needs_input_grad
    if on_input and p > 0 and needs[0] and needs[3] and not torch.is_grad_enabled():
        # Both input-side gradients from one mask draw (the separate ops below are the
        # differentiable form, for double backward).
        grad_x = grad_out.mm(weight)
        grad_A = _ops.input_dropout_grads_(grad_x, grad_hidden, A, x, seed, p)
    else:
        grad_x = (_ops.linear_lowrank_grad_x(grad_out, weight, grad_hidden, A, seed, p,
                                             on_input) if needs[0] else None)
        grad_A = _ops.lowrank_grad_A(grad_hidden, x, seed, p, on_input) if needs[3] else None
    grad_weight = grad_out.T @ x if needs[1] else None  # only when the base is not frozen
    grad_bias = grad_out.sum(0) if needs[2] else None
    return (grad_x, grad_weight, grad_bias, grad_A, grad_B,
            grad_scale if needs[5] else None, None, None, None)


torch.library.register_autograd("soslora::linear_lowrank_forward", _linear_lowrank_backward,
                                setup_context=_linear_lowrank_setup_context)


# Gradients of the backward pieces, so that double backward through a layer is exact.
def _grad_hidden_setup_context(ctx, inputs, output):
    grad_out, B, scale, hidden, seed, p, on_input = inputs
    ctx.save_for_backward(grad_out, B, scale, hidden, seed)
    ctx.dropout = (p, on_input)


def _grad_hidden_backward(ctx, gg_hidden, gg_B, gg_scale):
    # Outputs: grad_hidden = D_post(g (B*s)), grad_B = (g^T h) * s, grad_scale = sum((g^T h) * B).
    g, B, scale, hidden, seed = ctx.saved_tensors
    p, on_input = ctx.dropout
    s = scale.to(B.dtype)
    gg_s = gg_scale.to(B.dtype) if scale.dim() == 2 else gg_scale.to(B.dtype)[None, :]
    gd = _drop(gg_hidden, seed, p, not on_input)
    w = gg_B * s + gg_s * B
    grad_g = gd @ (B * s).T + hidden @ w.T
    grad_hidden = g @ w
    g_h, g_gd = g.T @ hidden, g.T @ gd
    grad_B = g_gd * s + g_h * gg_s
    grad_scale = g_gd * B + g_h * gg_B
    if scale.dim() == 1:
        grad_scale = grad_scale.sum(0)
    return grad_g, grad_B, grad_scale.to(scale.dtype), grad_hidden, None, None, None


def _grad_A_setup_context(ctx, inputs, output):
    grad_hidden, x, seed, p, on_input = inputs
    ctx.save_for_backward(grad_hidden, x, seed)
    ctx.dropout = (p, on_input)


def _grad_A_backward(ctx, gg):
    # Output: grad_A = grad_hidden^T D_in(x).
    grad_hidden, x, seed = ctx.saved_tensors
    p, on_input = ctx.dropout
    return (_drop(x, seed, p, on_input) @ gg.T, _drop(grad_hidden @ gg, seed, p, on_input),
            None, None, None)


def _grad_x_setup_context(ctx, inputs, output):
    grad_hidden, A, grad_x_base, seed, p, on_input = inputs
    ctx.save_for_backward(grad_hidden, A, seed)
    ctx.dropout = (p, on_input)
    ctx.has_base = grad_x_base is not None


def _grad_x_backward(ctx, gg):
    # Output: grad_x = D_in(grad_hidden A) + grad_x_base.
    grad_hidden, A, seed = ctx.saved_tensors
    p, on_input = ctx.dropout
    gd = _drop(gg, seed, p, on_input)
    return gd @ A.T, grad_hidden.T @ gd, gg if ctx.has_base else None, None, None, None


def _linear_grad_x_setup_context(ctx, inputs, output):
    grad_out, weight, grad_hidden, A, seed, p, on_input = inputs
    ctx.save_for_backward(grad_out, weight, grad_hidden, A, seed)
    ctx.dropout = (p, on_input)


def _linear_grad_x_backward(ctx, gg):
    # Output: grad_x = grad_out W + D_in(grad_hidden A).
    grad_out, weight, grad_hidden, A, seed = ctx.saved_tensors
    p, on_input = ctx.dropout
    gd = _drop(gg, seed, p, on_input)
    return gg @ weight.T, grad_out.T @ gg, gd @ A.T, grad_hidden.T @ gd, None, None, None


def _ortho_setup_context(ctx, inputs, output):
    A, num_experts = inputs
    ctx.save_for_backward(A)
    ctx.num_experts = num_experts


def _ortho_backward(ctx, grad_loss):
    (A,) = ctx.saved_tensors
    if torch.is_grad_enabled() and (A.requires_grad or grad_loss.requires_grad):
        raise NotImplementedError(
            "soslora::ortho_penalty: double backward (create_graph=True) is not supported")
    grad_A = torch.zeros_like(A)
    _ops.ortho_penalty_grad_(grad_A, A, grad_loss, ctx.num_experts)
    return grad_A, None


def _cluster_setup_context(ctx, inputs, output):
    (x, A, B, scale, row_index, col_index, row_offsets, col_offsets, ranks, base_out,
     dropout_seed, dropout_p) = inputs
    ctx.save_for_backward(x, A, B, scale, output[1], row_index, col_index, dropout_seed)
    ctx.partition = (row_offsets, col_offsets, ranks)
    ctx.dropout_p = dropout_p
    ctx.has_base_out = base_out is not None
    ctx.set_materialize_grads(False)  # the hidden output has no gradient in normal use


def _cluster_backward(ctx, grad_out, grad_hidden):
    if grad_out is None and grad_hidden is None:
        return (None,) * 12
    x, A, B, scale, hidden, row_index, col_index, seed = ctx.saved_tensors
    if grad_out is None:
        grad_out = x.new_zeros(x.shape[0], B.shape[0])
    if torch.is_grad_enabled() and any(
            g is not None and g.requires_grad for g in (grad_out, grad_hidden)):
        raise NotImplementedError("soslora::cluster_lowrank_forward: double backward "
                                  "(create_graph=True) is not supported")
    grad_x, grad_A, grad_B = _ops.cluster_lowrank_backward(
        grad_out, x, A, B, scale, hidden, grad_hidden, row_index, col_index, *ctx.partition,
        None, seed, ctx.dropout_p)
    return (grad_x, grad_A, grad_B, None, None, None, None, None, None,
            grad_out if ctx.has_base_out else None, None, None)


torch.library.register_autograd("soslora::cluster_lowrank_forward", _cluster_backward,
                                setup_context=_cluster_setup_context)


for _name, _backward, _setup in (
        ("lowrank_grad_hidden", _grad_hidden_backward, _grad_hidden_setup_context),
        ("lowrank_grad_A", _grad_A_backward, _grad_A_setup_context),
        ("lowrank_grad_x", _grad_x_backward, _grad_x_setup_context),
        ("linear_lowrank_grad_x", _linear_grad_x_backward, _linear_grad_x_setup_context),
        ("ortho_penalty", _ortho_backward, _ortho_setup_context)):
    torch.library.register_autograd(f"soslora::{_name}", _backward, setup_context=_setup)


# ---- wrappers ---------------------------------------------------------------------------------
Blocks = tuple  # (row_index, col_index, row_offsets, col_offsets, ranks): CPS-LoRA's partition


def adapted_linear(x: Tensor, A: Tensor, B: Tensor, scale: Tensor, *,
                   weight: Tensor | None = None, bias: Tensor | None = None,
                   base_out: Tensor | None = None, blocks: Blocks | None = None,
                   dense_blocks: bool = True, dropout_p: float = 0.0,
                   dropout_on_input: bool = False, ortho_lambda: Tensor | None = None,
                   num_experts: int = 1, grad_A_multiplier: float = 1.0,
                   gate_logits: Tensor | None = None, gate_temperature: Tensor | None = None,
                   uniform_prior: float = 0.0, anchor_scales: Tensor | None = None,
                   scale_anchor: float = 0.0) -> Tensor:
    """An adapted layer's training step as one autograd node (forward and backward in C++):
    base + drop-path(x) A^T (B*scale)^T for 2-D x [N, in].

    base: x weight^T + bias (a plain linear layer: one [N, out] buffer for both), or base_out
    [N, out] (a separate base's output), or none. A [r, in], B [out, r]; scale [G] or
    [G, out] with G dividing r (one scale per group of r/G ranks, per output channel in the
    2-D form: per expert, or per rank); they may be of another floating dtype than x (cast
    here, gradients in their own dtype). gate_logits [G] (with gate_temperature, 0-d) gate the
    scale by G softmax(logits / T); the backward adds uniform_prior (p - 1/G) / T to the
    logits' gradient and scale_anchor (scale - anchor_scales[:, None]) to a 2-D scale's.
    blocks: CPS-LoRA's partition (A [r_max, in], B [out, r_max] in partition order, scale
    [num_clusters]); computed as one dense update when dense_blocks, else by the cluster op.
    Dropout (seed drawn from torch's generator) on the input or on x A^T. The backward adds
    ortho_lambda (a device scalar, read on the device) times the orthogonality penalty's
    gradient to A's gradient when given, then multiplies A's gradient by grad_A_multiplier
    (LoRA+). Differentiable in x, weight, bias, base_out, A, B, scale and gate_logits (not in
    a CPS scale); double backward of the dense forms is exact (the recipe's gradient terms
    are constants there)."""
    row_index, col_index, row_offsets, col_offsets, ranks = blocks or (None, None, [], [], [])
    return _ops.adapted_linear(x, weight, bias, base_out, A, B, scale, row_index, col_index,
                               row_offsets, col_offsets, ranks, dense_blocks, float(dropout_p),
                               bool(dropout_on_input), ortho_lambda, int(num_experts),
                               float(grad_A_multiplier), gate_logits, gate_temperature,
                               float(uniform_prior), anchor_scales, float(scale_anchor))


def lowrank(x: Tensor, A: Tensor, B: Tensor, scale: Tensor, base_out: Tensor | None = None,
            dropout_seed: Tensor | None = None, dropout_p: float = 0.0,
            dropout_on_input: bool = False) -> Tensor:
    """base_out + drop-path(x) A^T (B*scale)^T for 2-D x; differentiable in x, A, B, scale."""
    out, _ = _ops.lowrank_forward(x, A, B, scale, base_out, dropout_seed, float(dropout_p),
                                  bool(dropout_on_input))
    return out


def linear_lowrank(x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor,
                   scale: Tensor, dropout_seed: Tensor | None = None, dropout_p: float = 0.0,
                   dropout_on_input: bool = False) -> Tensor:
    """x weight^T + bias + drop-path(x) A^T (B*scale)^T for 2-D x, formed in one [N, out]
    buffer (and the input gradient in one [N, in] buffer); differentiable in every tensor."""
    out, _ = _ops.linear_lowrank_forward(x, weight, bias, A, B, scale, dropout_seed,
                                         float(dropout_p), bool(dropout_on_input))
    return out


def set_cuda_path(path: str) -> str:
    """Chooses how the low-rank ops run on CUDA; returns the previous choice.

    "auto" (default): whichever was measured faster on an H100: cuBLAS through ATen for the
    low-rank products, the hand-written kernel for the orthogonality-penalty gradient;
    "kernels": the hand-written kernels wherever they exist (they never form the [N, in]
    dropped-out input); "aten": ATen everywhere but the dropout-mask kernel, which every
    choice uses. CPU is unaffected."""
    previous = _C.cuda_path()
    _C.set_cuda_path(path)
    return previous


def cluster_lowrank(x: Tensor, A: Tensor, B: Tensor, scale: Tensor, row_index: Tensor,
                    col_index: Tensor, row_offsets: list[int], col_offsets: list[int],
                    ranks: list[int], base_out: Tensor | None = None,
                    dropout_seed: Tensor | None = None, dropout_p: float = 0.0) -> Tensor:
    """base_out plus the cluster-local low-rank terms (CPS-LoRA) for 2-D x; differentiable in
    x, A, B and base_out. Cluster c: rows row_index[row_offsets[c]:row_offsets[c+1]], columns
    col_index[col_offsets[c]:...], factors A[:ranks[c], its column range] and
    B[its row range, :ranks[c]] (stored in partition order), scale[c]; dropout on the input."""
    out, _ = _ops.cluster_lowrank_forward(
        x, A, B, scale, row_index, col_index, list(row_offsets), list(col_offsets), list(ranks),
        base_out, dropout_seed, float(dropout_p))
    return out


def ortho_penalty(A: Tensor, num_experts: int) -> Tensor:
    """Cross-expert orthogonality penalty of stacked A [r_tot, in] (0-d, float32/float64)."""
    return _ops.ortho_penalty(A, int(num_experts))


def add_ortho_penalty_grad_(grad_A: Tensor, A: Tensor, weight: Tensor, num_experts: int) -> None:
    """grad_A += weight * d ortho_penalty(A) / dA, in place; weight is a one-element tensor."""
    _ops.ortho_penalty_grad_(grad_A, A, weight, int(num_experts))


def merge_into_(weight: Tensor, A: Tensor, B: Tensor, scale: Tensor, alpha: float = 1.0) -> None:
    """weight += alpha * (B*scale) @ A in place, float32 accumulation, one rounding."""
    _ops.merge_into_(weight, A, B, scale, float(alpha))


def new_dropout_seed(device: torch.device) -> Tensor:
    """(seed, offset) drawn from torch's generator for `device`, as the layers draw it:
    torch.manual_seed reproduces it."""
    return _ops.dropout_seed(torch.empty(0, device=device))
