"""Fake kernels of the `torch.ops.soslora` operators: output shapes and dtypes for
torch.compile and meta tensors, after the input checks of the C++ op (checks.py), so that a bad
call fails where it is traced."""
from __future__ import annotations

import torch

from .checks import (
    check,
    check_arg,
    check_base_args,
    check_dropout,
    check_factors,
    check_index_pair,
    check_lowrank_factors,
    check_matrices,
    check_matrix,
    check_ortho_args,
    check_ortho_penalty_grad_args,
    check_ortho_term,
    check_partition,
    check_same_float_dtype,
    check_scale,
    check_scale_terms,
    check_weight,
)
from .dtypes import accumulate_dtype


@torch.library.register_fake("soslora::adapted_linear")
def _(x, weight, bias, base_out, A, B, scale, row_index, col_index, row_offsets, col_offsets,
      ranks, dense_blocks, dropout_p, dropout_on_input, ortho_lambda, num_experts,
      grad_A_multiplier, gate_logits, gate_temperature, uniform_prior, anchor_scales,
      scale_anchor):
    # The C++ checks the scale terms, then calls the op of its form with a seed it draws (always
    # valid: so the fake of that op is called without dropout here).
    op = "soslora::adapted_linear"
    check_scale_terms(scale, row_index, gate_logits, gate_temperature, anchor_scales)
    check_ortho_term(A, ortho_lambda, num_experts)
    if gate_logits is not None:  # the forward gets the gated scale, whose shape may differ
        gate = torch.softmax(gate_logits / gate_temperature, 0)
        scale = scale * (gate if scale.dim() == 1 else gate.unsqueeze(1))
    check(0.0 <= dropout_p < 1.0, op, "dropout_p must be in [0, 1), got ", dropout_p)
    check_index_pair(row_index, col_index, op)
    layout = (row_index, col_index, row_offsets, col_offsets, ranks)
    if row_index is None or dense_blocks:
        return adapted_linear_forward(x, weight, bias, base_out, A, B, scale, *layout, None, 0.0,
                                      dropout_on_input)[0]
    check(dropout_on_input or dropout_p == 0, op,
           "the cluster form drops the input (dropout_on_input=True)")
    check_base_args(x, weight, bias, base_out, B.shape[0], op)
    for t, name in ((A, "A"), (B, "B")):  # before the casts
        check(t.dtype.is_floating_point, op, name, " must be floating-point, got ", t.dtype)
    # The cluster op gets the factors cast to x's dtype, and the base (x W^T + bias) as base_out.
    A, B = (t if t.dtype == x.dtype else t.to(x.dtype) for t in (A, B))
    return cluster_lowrank_forward(x, A, B, scale, *layout, base_out, None, 0.0)[0]


@torch.library.register_fake("soslora::adapted_linear_forward")
def adapted_linear_forward(x, weight, bias, base_out, A, B, scale, row_index, col_index,
                           row_offsets, col_offsets, ranks, dropout_seed, dropout_p,
                           dropout_on_input):
    op = "soslora::adapted_linear_forward"
    check_matrix(x, "x", op)
    check(x.dtype.is_floating_point, op, "x must be floating-point, got ", x.dtype)
    R = check_factors(x, A, B, scale, (row_index, col_index, row_offsets, col_offsets, ranks), op)
    check_base_args(x, weight, bias, base_out, B.shape[0], op)
    check_dropout(dropout_seed, dropout_p, x, op)
    return (x.new_empty(x.shape[0], B.shape[0]), x.new_empty(x.shape[0], R),
            x.new_empty(B.shape[0], R))


@torch.library.register_fake("soslora::adapted_linear_backward")
def _(grad_out, x, weight, A, B, scale, hidden, scaled_B, row_index, col_index, row_offsets,
      col_offsets, ranks, dropout_seed, dropout_p, dropout_on_input, ortho_lambda, num_experts,
      grad_A_multiplier, output_mask):
    op = "soslora::adapted_linear_backward"
    check_matrix(x, "x", op)
    check_factors(x, A, B, scale, (row_index, col_index, row_offsets, col_offsets, ranks), op)
    check_matrices(op, grad_out=grad_out, hidden=hidden, scaled_B=scaled_B)
    for t, name in ((grad_out, "grad_out"), (hidden, "hidden"), (scaled_B, "scaled_B")):
        check_same_float_dtype(t, name, x, "x", op)
    N, out_features = x.shape[0], B.shape[0]
    R = sum(ranks) if row_index is not None else A.shape[0]  # the dense factors' rank
    check(grad_out.shape == (N, out_features) and hidden.shape == (N, R)
           and scaled_B.shape == (out_features, R), op,
           "expected grad_out [N, out], hidden [N, R], scaled_B [out, R] with R = ", R, "; got ",
           grad_out.shape, ", ", hidden.shape, ", ", scaled_B.shape)
    check_base_args(x, weight, None, None, out_features, op)
    check_dropout(dropout_seed, dropout_p, x, op)
    need_x, need_A, need_B, need_scale = output_mask
    check(not need_scale or row_index is None, op, "the cluster scales are fixed")
    if need_A and ortho_lambda is not None and num_experts > 1:
        # grad_A's orthogonality term: its op checks its weight, ortho_lambda.
        check_ortho_penalty_grad_args(A, A, ortho_lambda, num_experts)
    return tuple(t.new_empty(t.shape) if need else None
                 for t, need in zip((x, A, B, scale), output_mask))


@torch.library.register_fake("soslora::dropout_seed")
def _(like):
    return like.new_empty(2, dtype=torch.int64)


# ---- the low-rank pieces (lowrank.cpp) --------------------------------------------------------
@torch.library.register_fake("soslora::lowrank_forward")
def _(x, A, B, scale, base_out, dropout_seed, dropout_p, dropout_on_input):
    op = "soslora::lowrank_forward"
    check_matrix(x, "x", op)
    check_lowrank_factors(x, A, B, scale, op)
    check_arg(base_out, "base_out", x, "x", "N, out", (x.shape[0], B.shape[0]), op)
    check_dropout(dropout_seed, dropout_p, x, op)
    return x.new_empty(x.shape[0], B.shape[0]), x.new_empty(x.shape[0], A.shape[0])


@torch.library.register_fake("soslora::linear_lowrank_forward")
def _(x, weight, bias, A, B, scale, dropout_seed, dropout_p, dropout_on_input):
    op = "soslora::linear_lowrank_forward"
    check_matrices(op, x=x, weight=weight)
    check_same_float_dtype(x, "x", weight, "weight", op)
    check(weight.shape[1] == x.shape[1], op, "weight must be [out, in] with in = x.size(1) = ",
           x.shape[1], ", got weight of shape ", weight.shape)
    check_arg(bias, "bias", x, "x", "out", (weight.shape[0],), op)
    check_lowrank_factors(x, A, B, scale, op)
    check(B.shape[0] == weight.shape[0], op, "B must be [out, r] with out = weight.size(0) = ",
           weight.shape[0], ", got B of shape ", B.shape)
    check_dropout(dropout_seed, dropout_p, x, op)
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], A.shape[0])


@torch.library.register_fake("soslora::linear_lowrank_grad_x")
def _(grad_out, weight, grad_hidden, A, dropout_seed, dropout_p, dropout_on_input):
    op = "soslora::linear_lowrank_grad_x"
    check_matrices(op, grad_out=grad_out, weight=weight, grad_hidden=grad_hidden, A=A)
    for t, name in ((weight, "weight"), (grad_hidden, "grad_hidden"), (A, "A")):
        check_same_float_dtype(grad_out, "grad_out", t, name, op)
    check(grad_out.shape[1] == weight.shape[0] and grad_hidden.shape[0] == grad_out.shape[0]
           and grad_hidden.shape[1] == A.shape[0] and A.shape[1] == weight.shape[1], op,
           "expected grad_out [N, out], weight [out, in], grad_hidden [N, r], A [r, in]; got ",
           grad_out.shape, ", ", weight.shape, ", ", grad_hidden.shape, ", ", A.shape)
    check_dropout(dropout_seed, dropout_p, grad_out, op)
    return grad_out.new_empty(grad_out.shape[0], weight.shape[1])


@torch.library.register_fake("soslora::lowrank_grad_hidden")
def _(grad_out, B, scale, hidden, dropout_seed, dropout_p, dropout_on_input):
    op = "soslora::lowrank_grad_hidden"
    check_matrices(op, grad_out=grad_out, B=B, hidden=hidden)
    check_same_float_dtype(grad_out, "grad_out", B, "B", op)
    check_same_float_dtype(grad_out, "grad_out", hidden, "hidden", op)
    check(grad_out.shape[1] == B.shape[0] and hidden.shape == (grad_out.shape[0], B.shape[1]),
           op, "expected grad_out [N, out], B [out, r], hidden [N, r]; got ", grad_out.shape,
           ", ", B.shape, ", ", hidden.shape)
    check_scale(scale, B, op)
    check_dropout(dropout_seed, dropout_p, grad_out, op)
    return hidden.new_empty(hidden.shape), B.new_empty(B.shape), scale.new_empty(scale.shape)


@torch.library.register_fake("soslora::lowrank_grad_A")
def _(grad_hidden, x, dropout_seed, dropout_p, dropout_on_input):
    op = "soslora::lowrank_grad_A"
    check_matrices(op, grad_hidden=grad_hidden, x=x)
    check_same_float_dtype(grad_hidden, "grad_hidden", x, "x", op)
    check(grad_hidden.shape[0] == x.shape[0], op, "grad_hidden [N, r] and x [N, in] must share "
           "N, got ", grad_hidden.shape, " and ", x.shape)
    check_dropout(dropout_seed, dropout_p, x, op)
    return x.new_empty(grad_hidden.shape[1], x.shape[1])


@torch.library.register_fake("soslora::lowrank_grad_x")
def _(grad_hidden, A, grad_x_base, dropout_seed, dropout_p, dropout_on_input):
    op = "soslora::lowrank_grad_x"
    check_matrices(op, grad_hidden=grad_hidden, A=A)
    check_same_float_dtype(grad_hidden, "grad_hidden", A, "A", op)
    check(grad_hidden.shape[1] == A.shape[0], op, "grad_hidden [N, r] and A [r, in] must share "
           "r, got ", grad_hidden.shape, " and ", A.shape)
    check_dropout(dropout_seed, dropout_p, grad_hidden, op)
    N, n_in = grad_hidden.shape[0], A.shape[1]
    check_arg(grad_x_base, "grad_x_base", grad_hidden, "grad_hidden", "N, in", (N, n_in), op)
    return A.new_empty(N, n_in)


@torch.library.register_fake("soslora::input_dropout_grads_")
def _(grad_x, grad_hidden, A, x, dropout_seed, dropout_p):
    op = "soslora::input_dropout_grads_"
    check_matrices(op, grad_x=grad_x, grad_hidden=grad_hidden, A=A, x=x)
    for t, name in ((grad_x, "grad_x"), (grad_hidden, "grad_hidden"), (A, "A")):
        check_same_float_dtype(t, name, x, "x", op)
    check(grad_x.shape == x.shape and grad_hidden.shape[0] == x.shape[0]
           and grad_hidden.shape[1] == A.shape[0] and A.shape[1] == x.shape[1], op,
           "expected grad_x [N, in], grad_hidden [N, r], A [r, in], x [N, in]; got ",
           grad_x.shape, ", ", grad_hidden.shape, ", ", A.shape, ", ", x.shape)
    check_dropout(dropout_seed, dropout_p, x, op)
    return A.new_empty(A.shape)


# ---- CPS-LoRA's cluster op (cluster.cpp) -------------------------------------------------------
@torch.library.register_fake("soslora::cluster_lowrank_forward")
def cluster_lowrank_forward(x, A, B, scale, row_index, col_index, row_offsets, col_offsets,
                            ranks, base_out, dropout_seed, dropout_p):
    op = "soslora::cluster_lowrank_forward"
    R = check_partition(x, A, B, scale, row_index, col_index, row_offsets, col_offsets, ranks, op)
    check_arg(base_out, "base_out", x, "x", "N, out", (x.shape[0], B.shape[0]), op)
    check_dropout(dropout_seed, dropout_p, x, op)
    return x.new_empty(x.shape[0], B.shape[0]), x.new_empty(x.shape[0], R)


@torch.library.register_fake("soslora::cluster_lowrank_backward")
def _(grad_out, x, A, B, scale, hidden, grad_hidden, row_index, col_index, row_offsets,
      col_offsets, ranks, grad_x_base, dropout_seed, dropout_p):
    op = "soslora::cluster_lowrank_backward"
    R = check_partition(x, A, B, scale, row_index, col_index, row_offsets, col_offsets, ranks, op)
    check_matrix(grad_out, "grad_out", op)
    N = x.shape[0]
    check_arg(grad_out, "grad_out", x, "x", "N, out", (N, B.shape[0]), op)
    check_same_float_dtype(hidden, "hidden", x, "x", op)
    check(hidden.shape == (N, R), op, "hidden must be [N, sum(ranks)] = [", N, ", ", R,
           "], got ", hidden.shape)
    if grad_hidden is not None:
        check_same_float_dtype(grad_hidden, "grad_hidden", x, "x", op)
        check(grad_hidden.shape == hidden.shape, op, "grad_hidden must have hidden's shape ",
               hidden.shape, ", got ", grad_hidden.shape)
    check_dropout(dropout_seed, dropout_p, x, op)
    # The C++ checks grad_x_base last.
    check_arg(grad_x_base, "grad_x_base", x, "x", "N, in", x.shape, op)
    return x.new_empty(x.shape), A.new_empty(A.shape), B.new_empty(B.shape)


# ---- dropout mask, orthogonality penalty, merge (dropout.cpp, ortho.cpp, merge.cpp) -----------
@torch.library.register_fake("soslora::dropout_mask")
def _(dropout_seed, size, dropout_p, dtype):
    op = "soslora::dropout_mask"
    check(dtype.is_floating_point, op, "dtype must be floating-point, got ", dtype)
    check_dropout(dropout_seed, dropout_p, dropout_seed, op)
    return dropout_seed.new_empty(size, dtype=dtype)


@torch.library.register_fake("soslora::ortho_penalty")
def _(A, num_experts):
    check_ortho_args(A, num_experts, "soslora::ortho_penalty")
    return A.new_empty((), dtype=accumulate_dtype(A.dtype))


@torch.library.register_fake("soslora::ortho_penalty_grad_")
def _(grad_A, A, weight, num_experts):
    check_ortho_penalty_grad_args(grad_A, A, weight, num_experts)


@torch.library.register_fake("soslora::merge_into_")
def _(weight, A, B, scale, alpha, max_abs=None):
    op = "soslora::merge_into_"
    check(weight.dim() == 2 and A.dim() == 2 and B.dim() == 2, op, "weight [out, in], A [r, in]"
           " and B [out, r] must be 2-D, got ", weight.shape, ", ", A.shape, ", ", B.shape)
    check(A.shape[1] == weight.shape[1] and B.shape[0] == weight.shape[0]
           and B.shape[1] == A.shape[0], op, "shapes do not chain: weight ", weight.shape,
           ", A ", A.shape, ", B ", B.shape, " (expected weight [out, in], A [r, in], B [out, r])")
    for t in (weight, A, B):
        check(t.dtype.is_floating_point, op, "weight, A and B must be floating-point, got ",
               t.dtype)
    check_weight(weight, op)
    check(A.device == weight.device and B.device == weight.device, op, "weight, A and B must "
           "be on one device, got ", weight.device, ", ", A.device, ", ", B.device)
    check_scale(scale, B, op)
    # at::has_internal_overlap's MemOverlap::Yes (1): an expanded or self-overlapping view.
    check(torch._debug_has_internal_overlap(weight) != 1, op, "weight has elements that share "
           "memory (an expanded or overlapping view, strides ", list(weight.stride()),
           "); merge into a tensor that owns its elements")
    return weight.new_empty(4, dtype=torch.int64)


@torch.library.register_fake("soslora::weight_stats")
def _(weight):
    check_weight(weight, "soslora::weight_stats")
    return weight.new_empty(4, dtype=torch.int64)
