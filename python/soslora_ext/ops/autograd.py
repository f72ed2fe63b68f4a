"""Autograd of the differentiable `torch.ops.soslora` operators that are not their own
autograd node (``adapted_linear`` is one, in C++): the low-rank pieces that the layers'
double backward composes, the cluster op and the orthogonality penalty."""
from __future__ import annotations

import torch

Tensor = torch.Tensor
_ops = torch.ops.soslora


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
