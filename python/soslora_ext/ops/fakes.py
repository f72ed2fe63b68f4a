"""Fake kernels of the `torch.ops.soslora` operators: output shapes and dtypes for
torch.compile and meta tensors."""
from __future__ import annotations

import torch

from .dtypes import accumulate_dtype


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
