"""Fake kernels of the `torch.ops.soslora` operators: output shapes and dtypes for
torch.compile and meta tensors, after the input checks of the C++ op (csrc/), in its order and
with its messages, so that a bad call fails where it is traced. The helpers mirror the C++ ones
of the same names."""
from __future__ import annotations

import torch

from .dtypes import accumulate_dtype

# c10's names of the dtypes, which the C++ messages print.
_DTYPE_NAMES = {torch.float16: "Half", torch.bfloat16: "BFloat16", torch.float32: "Float",
                torch.float64: "Double", torch.uint8: "Byte", torch.int8: "Char",
                torch.int16: "Short", torch.int32: "Int", torch.int64: "Long", torch.bool: "Bool",
                torch.complex64: "ComplexFloat", torch.complex128: "ComplexDouble"}


def _str(v) -> str:
    """v as C++'s operator<< prints it: sizes as [3, 4], dtypes by c10 name, doubles as %g."""
    if isinstance(v, torch.dtype):
        return _DTYPE_NAMES.get(v, str(v).removeprefix("torch."))
    if isinstance(v, (torch.Size, tuple)):
        return str(list(v))
    return f"{v:g}" if isinstance(v, float) else str(v)


def _check(cond, op: str, *parts) -> None:
    """TORCH_CHECK(cond, op, ": ", parts...); the message is formatted only on failure."""
    torch._check(cond, lambda: f"{op}: " + "".join(map(_str, parts)))


# ---- helpers (lowrank.cpp, dropout.cpp, adapted_linear.cpp, cluster.cpp, ortho.cpp) -------------
def check_matrix(t, name, op):
    _check(t.dim() == 2, op, name, " must be 2-D, got shape ", t.shape)


def check_matrices(op, **tensors):
    for name, t in tensors.items():
        check_matrix(t, name, op)


def check_same_float_dtype(a, a_name, b, b_name, op):
    _check(a.dtype.is_floating_point, op, a_name, " must be a floating-point tensor, got ",
           a.dtype)
    _check(a.dtype == b.dtype, op, a_name, " and ", b_name, " must have the same dtype, got ",
           a.dtype, " and ", b.dtype)
    _check(a.device == b.device, op, a_name, " and ", b_name, " must be on the same device, got ",
           a.device, " and ", b.device)


def check_chain(x, A, B, op, r="r"):
    """A [r, in] with x's in, B [out, r] (r is "r_max" for the cluster blocks)."""
    _check(A.shape[1] == x.shape[1], op, "A must be [", r, ", in] with in = x.size(1) = ",
           x.shape[1], ", got A of shape ", A.shape)
    _check(B.shape[1] == A.shape[0], op, "B must be [out, ", r, "] with ", r, " = A.size(0) = ",
           A.shape[0], ", got B of shape ", B.shape)


def check_scale(scale, B, op):
    out_features, rank = B.shape
    _check(scale.dtype.is_floating_point, op, "scale must be a floating-point tensor, got ",
           scale.dtype)
    _check(scale.device == B.device, op, "scale must be on B's device ", B.device, ", got ",
           scale.device)
    _check(scale.shape in ((rank,), (out_features, rank)), op, "scale must be [r] = [", rank,
           "] or [out, r] = [", out_features, ", ", rank, "], got ", scale.shape)


def check_lowrank_factors(x, A, B, scale, op):
    check_matrices(op, A=A, B=B)
    check_same_float_dtype(x, "x", A, "A", op)
    check_same_float_dtype(x, "x", B, "B", op)
    check_chain(x, A, B, op)
    check_scale(scale, B, op)


def check_dropout(dropout_seed, dropout_p, like, op):
    _check(0.0 <= dropout_p < 1.0, op, "dropout_p must be in [0, 1), got ", dropout_p)
    if dropout_p == 0.0:
        return
    _check(dropout_seed is not None, op, "dropout_seed is required when dropout_p > 0")
    seed = dropout_seed
    _check(seed.dtype == torch.int64 and seed.shape == (2,), op, "dropout_seed must be an int64 "
           "tensor of shape [2] (seed, offset), got ", seed.dtype, " of shape ", seed.shape)
    _check(seed.device == like.device, op, "dropout_seed must be on ", like.device, ", got ",
           seed.device)


def check_arg(t, name, like, like_name, dims, shape, op):
    """t (when given) of like's dtype and device, of shape `shape` named [dims]."""
    if t is not None:
        check_same_float_dtype(t, name, like, like_name, op)
        _check(t.shape == shape, op, name, " must be [", dims, "] = ", list(shape), ", got ",
               t.shape)


def check_base_args(x, weight, bias, base_out, out_features, op):
    _check(weight is None or base_out is None, op,
           "give the base as weight (and bias) or as base_out, not both")
    _check(bias is None or weight is not None, op, "bias needs weight")
    if weight is not None:
        check_matrix(weight, "weight", op)
    check_arg(weight, "weight", x, "x", "out, in", (out_features, x.shape[1]), op)
    check_arg(bias, "bias", x, "x", "out", (out_features,), op)
    check_arg(base_out, "base_out", x, "x", "N, out", (x.shape[0], out_features), op)


def check_index(index, name, size, like, op):
    _check(index.dtype == torch.int64 and index.shape == (size,), op, name,
           " must be an int64 permutation of shape [", size, "], got ", index.dtype,
           " of shape ", index.shape)
    _check(index.device == like.device, op, name, " must be on ", like.device, ", got ",
           index.device)


def check_offsets(offsets, name, clusters, total, op):
    offsets = list(offsets)
    _check(len(offsets) == clusters + 1, op, name, " must have num_clusters + 1 = ", clusters + 1,
           " entries, got ", len(offsets))
    _check(offsets[0] == 0 and offsets[-1] == total, op, name, " must start at 0 and end at ",
           total, ", got ", offsets)
    _check(all(a <= b for a, b in zip(offsets, offsets[1:])), op, name,
           " must be non-decreasing, got ", offsets)


def check_cluster_layout(x, A, B, scale, row_index, col_index, row_offsets, col_offsets, ranks,
                         op):
    """Returns sum(ranks), the width of hidden."""
    clusters = len(ranks)
    _check(clusters >= 1, op, "ranks must name at least one cluster")
    _check(scale.dtype.is_floating_point and scale.shape == (clusters,)
           and scale.device == A.device, op, "scale must be a floating-point tensor "
           "[num_clusters] = [", clusters, "] on ", A.device, ", got ", scale.dtype, " ",
           scale.shape, " on ", scale.device)
    check_index(row_index, "row_index", B.shape[0], x, op)
    check_index(col_index, "col_index", x.shape[1], x, op)
    # The C++ then checks that the indices are permutations: their values, which a fake lacks.
    check_offsets(row_offsets, "row_offsets", clusters, B.shape[0], op)
    check_offsets(col_offsets, "col_offsets", clusters, x.shape[1], op)
    _check(all(0 <= r <= A.shape[0] for r in ranks), op, "every rank must be in [0, r_max = ",
           A.shape[0], "], got ", list(ranks))
    return sum(ranks)


def check_partition(x, A, B, scale, row_index, col_index, row_offsets, col_offsets, ranks, op):
    check_matrices(op, x=x, A=A, B=B)
    check_same_float_dtype(x, "x", A, "A", op)
    check_same_float_dtype(x, "x", B, "B", op)
    check_chain(x, A, B, op, r="r_max")
    return check_cluster_layout(x, A, B, scale, row_index, col_index, row_offsets, col_offsets,
                                ranks, op)


def check_ortho_args(A, num_experts, op):
    _check(A.dim() == 2, op, "A must be 2-D [r_tot, in], got shape ", A.shape)
    _check(A.dtype.is_floating_point, op, "A must be floating-point, got ", A.dtype)
    _check(num_experts >= 1, op, "num_experts must be >= 1, got ", num_experts)
    _check(A.shape[0] % num_experts == 0, op, "A.size(0) = ", A.shape[0],
           " must be divisible by num_experts = ", num_experts)


def check_ortho_penalty_grad_args(grad_A, A, weight, num_experts):
    op = "soslora::ortho_penalty_grad_"
    check_ortho_args(A, num_experts, op)
    _check(grad_A.shape == A.shape, op, "grad_A must have A's shape ", A.shape, ", got ",
           grad_A.shape)
    _check(grad_A.device == A.device and weight.device == A.device, op, "grad_A, A and weight "
           "must be on one device, got ", grad_A.device, ", ", A.device, ", ", weight.device)
    _check(grad_A.dtype.is_floating_point, op, "grad_A must be floating-point, got ", grad_A.dtype)
    _check(weight.numel() == 1 and weight.dtype.is_floating_point, op, "weight must be a "
           "floating-point tensor with one element, got ", weight.dtype, " of shape ",
           weight.shape)


# ---- soslora::adapted_linear and its halves (autograd.cpp, adapted_linear.cpp) ------------------
def check_factors(x, A, B, scale, layout, op):
    """adapted_linear.cpp's check_factors; returns the rank R of the dense factors."""
    check_matrices(op, A=A, B=B)
    for t, name in ((A, "A"), (B, "B"), (scale, "scale")):
        _check(t.dtype.is_floating_point, op, name, " must be floating-point, got ", t.dtype)
        _check(t.device == x.device, op, name, " must be on x's device ", x.device, ", got ",
               t.device)
    check_chain(x, A, B, op)
    if layout[0] is not None:
        # The C++ reads col_index unchecked when row_index is given (and crashes without it).
        _check(layout[1] is not None, op, "row_index needs col_index")
        return check_cluster_layout(x, A, B, scale, *layout, op)
    r, G = A.shape[0], scale.shape[0] if scale.dim() else 0
    _check((scale.dim() == 1 or scale.dim() == 2 and scale.shape[1] == B.shape[0]) and G >= 1
           and r % G == 0, op, "scale must be [G] or [G, out] = [G, ", B.shape[0],
           "] with G dividing r = ", r, " (one scale per group of r/G ranks), got ", scale.shape)
    return r


def check_scale_terms(scale, row_index, gate_logits, gate_temperature, anchor_scales):
    op = "soslora::adapted_linear"
    _check(scale.dim() in (1, 2), op, "scale must be [G] or [G, out], got ", scale.shape)
    _check(row_index is None or (gate_logits is None and anchor_scales is None), op,
           "gate_logits and anchor_scales apply to plain factors, not to cluster blocks")
    _check((gate_logits is None) == (gate_temperature is None), op,
           "gate_logits and gate_temperature come together")
    for t, name in ((gate_logits, "gate_logits"), (gate_temperature, "gate_temperature"),
                    (anchor_scales, "anchor_scales")):
        if t is not None:
            _check(t.dtype.is_floating_point and t.device == scale.device, op, name,
                   " must be a floating-point tensor on scale's device ", scale.device,
                   ", got ", t.dtype, " on ", t.device)
    G = scale.shape[0]
    if gate_logits is not None:
        _check(gate_logits.shape == (G,), op, "gate_logits must be [G] = [", G,
               "] (one per group of the scale), got ", gate_logits.shape)
        _check(gate_temperature.numel() == 1, op,
               "gate_temperature must have one element, got shape ", gate_temperature.shape)
    if anchor_scales is not None:
        _check(scale.dim() == 2 and anchor_scales.shape == (G,), op, "anchor_scales must be [G] "
               "= [", G, "] with a [G, out] scale, got ", anchor_scales.shape, " with scale ",
               scale.shape)


@torch.library.register_fake("soslora::adapted_linear")
def _(x, weight, bias, base_out, A, B, scale, row_index, col_index, row_offsets, col_offsets,
      ranks, dense_blocks, dropout_p, dropout_on_input, ortho_lambda, num_experts,
      grad_A_multiplier, gate_logits, gate_temperature, uniform_prior, anchor_scales,
      scale_anchor):
    # The C++ checks the scale terms, then calls the op of its form with a seed it draws (always
    # valid: so the fake of that op is called without dropout here).
    op = "soslora::adapted_linear"
    check_scale_terms(scale, row_index, gate_logits, gate_temperature, anchor_scales)
    if gate_logits is not None:  # the forward gets the gated scale, whose shape may differ
        gate = torch.softmax(gate_logits / gate_temperature, 0)
        scale = scale * (gate if scale.dim() == 1 else gate.unsqueeze(1))
    _check(0.0 <= dropout_p < 1.0, op, "dropout_p must be in [0, 1), got ", dropout_p)
    layout = (row_index, col_index, row_offsets, col_offsets, ranks)
    if row_index is None or dense_blocks:
        return adapted_linear_forward(x, weight, bias, base_out, A, B, scale, *layout, None, 0.0,
                                      dropout_on_input)[0]
    _check(dropout_on_input or dropout_p == 0, op,
           "the cluster form drops the input (dropout_on_input=True)")
    check_base_args(x, weight, bias, base_out, B.shape[0], op)
    # The cluster op gets the factors cast to x's dtype, and the base (x W^T + bias) as base_out.
    A, B = (t if t.dtype == x.dtype else t.to(x.dtype) for t in (A, B))
    return cluster_lowrank_forward(x, A, B, scale, *layout, base_out, None, 0.0)[0]


@torch.library.register_fake("soslora::adapted_linear_forward")
def adapted_linear_forward(x, weight, bias, base_out, A, B, scale, row_index, col_index,
                           row_offsets, col_offsets, ranks, dropout_seed, dropout_p,
                           dropout_on_input):
    op = "soslora::adapted_linear_forward"
    check_matrix(x, "x", op)
    _check(x.dtype.is_floating_point, op, "x must be floating-point, got ", x.dtype)
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
    check_matrix(grad_out, "grad_out", op)
    for t, name in ((grad_out, "grad_out"), (hidden, "hidden"), (scaled_B, "scaled_B")):
        check_same_float_dtype(t, name, x, "x", op)
    N, out_features = x.shape[0], B.shape[0]
    R = scaled_B.size(1)  # read before scaled_B's rank is checked, as the C++ does
    _check(grad_out.shape == (N, out_features) and hidden.shape == (N, R)
           and scaled_B.dim() == 2 and scaled_B.shape[0] == out_features, op,
           "expected grad_out [N, out], hidden [N, R], scaled_B [out, R]; got ", grad_out.shape,
           ", ", hidden.shape, ", ", scaled_B.shape)
    check_base_args(x, weight, None, None, out_features, op)
    check_dropout(dropout_seed, dropout_p, x, op)
    need_x, need_A, need_B, need_scale = output_mask
    _check(not need_scale or row_index is None, op, "the cluster scales are fixed")
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
    _check(weight.shape[1] == x.shape[1], op, "weight must be [out, in] with in = x.size(1) = ",
           x.shape[1], ", got weight of shape ", weight.shape)
    check_arg(bias, "bias", x, "x", "out", (weight.shape[0],), op)
    check_lowrank_factors(x, A, B, scale, op)
    _check(B.shape[0] == weight.shape[0], op, "B must be [out, r] with out = weight.size(0) = ",
           weight.shape[0], ", got B of shape ", B.shape)
    check_dropout(dropout_seed, dropout_p, x, op)
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], A.shape[0])


@torch.library.register_fake("soslora::linear_lowrank_grad_x")
def _(grad_out, weight, grad_hidden, A, dropout_seed, dropout_p, dropout_on_input):
    op = "soslora::linear_lowrank_grad_x"
    check_matrices(op, grad_out=grad_out, weight=weight, grad_hidden=grad_hidden, A=A)
    for t, name in ((weight, "weight"), (grad_hidden, "grad_hidden"), (A, "A")):
        check_same_float_dtype(grad_out, "grad_out", t, name, op)
    _check(grad_out.shape[1] == weight.shape[0] and grad_hidden.shape[0] == grad_out.shape[0]
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
    _check(grad_out.shape[1] == B.shape[0] and hidden.shape == (grad_out.shape[0], B.shape[1]),
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
    _check(grad_hidden.shape[0] == x.shape[0], op, "grad_hidden [N, r] and x [N, in] must share "
           "N, got ", grad_hidden.shape, " and ", x.shape)
    check_dropout(dropout_seed, dropout_p, x, op)
    return x.new_empty(grad_hidden.shape[1], x.shape[1])


@torch.library.register_fake("soslora::lowrank_grad_x")
def _(grad_hidden, A, grad_x_base, dropout_seed, dropout_p, dropout_on_input):
    op = "soslora::lowrank_grad_x"
    check_matrices(op, grad_hidden=grad_hidden, A=A)
    check_same_float_dtype(grad_hidden, "grad_hidden", A, "A", op)
    _check(grad_hidden.shape[1] == A.shape[0], op, "grad_hidden [N, r] and A [r, in] must share "
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
    _check(grad_x.shape == x.shape and grad_hidden.shape[0] == x.shape[0]
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
    _check(hidden.shape == (N, R), op, "hidden must be [N, sum(ranks)] = [", N, ", ", R,
           "], got ", hidden.shape)
    if grad_hidden is not None:
        check_same_float_dtype(grad_hidden, "grad_hidden", x, "x", op)
        _check(grad_hidden.shape == hidden.shape, op, "grad_hidden must have hidden's shape ",
               hidden.shape, ", got ", grad_hidden.shape)
    check_dropout(dropout_seed, dropout_p, x, op)
    # The C++ checks grad_x_base after its products, so last.
    check_arg(grad_x_base, "grad_x_base", x, "x", "N, in", x.shape, op)
    return x.new_empty(x.shape), A.new_empty(A.shape), B.new_empty(B.shape)


# ---- dropout mask, orthogonality penalty, merge (dropout.cpp, ortho.cpp, merge.cpp) -----------
@torch.library.register_fake("soslora::dropout_mask")
def _(dropout_seed, size, dropout_p, dtype):
    op = "soslora::dropout_mask"
    _check(dtype.is_floating_point, op, "dtype must be floating-point, got ", dtype)
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
def _(weight, A, B, scale, alpha):
    op = "soslora::merge_into_"
    _check(weight.dim() == 2 and A.dim() == 2 and B.dim() == 2, op, "weight [out, in], A [r, in]"
           " and B [out, r] must be 2-D, got ", weight.shape, ", ", A.shape, ", ", B.shape)
    _check(A.shape[1] == weight.shape[1] and B.shape[0] == weight.shape[0]
           and B.shape[1] == A.shape[0], op, "shapes do not chain: weight ", weight.shape,
           ", A ", A.shape, ", B ", B.shape, " (expected weight [out, in], A [r, in], B [out, r])")
    for t in (weight, A, B):
        _check(t.dtype.is_floating_point, op, "weight, A and B must be floating-point, got ",
               t.dtype)
    _check(A.device == weight.device and B.device == weight.device, op, "weight, A and B must "
           "be on one device, got ", weight.device, ", ", A.device, ", ", B.device)
    check_scale(scale, B, op)
    # at::has_internal_overlap's MemOverlap::Yes (1): an expanded or self-overlapping view.
    _check(torch._debug_has_internal_overlap(weight) != 1, op, "weight has elements that share "
           "memory (an expanded or overlapping view, strides ", list(weight.stride()),
           "); merge into a tensor that owns its elements")
