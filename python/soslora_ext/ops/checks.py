"""The input checks of the `torch.ops.soslora` operators, written again in Python for their
fake kernels (fakes.py): the same conditions, in the same order, with the same messages as the
C++ (csrc/), whose helpers of the same names they mirror."""
from __future__ import annotations

import torch

# c10's names of the dtypes, which the C++ messages print.
_DTYPE_NAMES = {torch.float16: "Half", torch.bfloat16: "BFloat16", torch.float32: "Float",
                torch.float64: "Double", torch.uint8: "Byte", torch.int8: "Char",
                torch.int16: "Short", torch.int32: "Int", torch.int64: "Long", torch.bool: "Bool",
                torch.complex64: "ComplexFloat", torch.complex128: "ComplexDouble",
                torch.float8_e4m3fn: "Float8_e4m3fn", torch.float8_e5m2: "Float8_e5m2"}


def _str(v) -> str:
    """v as C++'s operator<< prints it: sizes as [3, 4], dtypes by c10 name, doubles as %g."""
    if isinstance(v, torch.dtype):
        return _DTYPE_NAMES.get(v, str(v).removeprefix("torch."))
    if isinstance(v, (torch.Size, tuple)):
        return str(list(v))
    return f"{v:g}" if isinstance(v, float) else str(v)


def check(cond, op: str, *parts) -> None:
    """TORCH_CHECK(cond, op, ": ", parts...); the message is formatted only on failure."""
    torch._check(cond, lambda: f"{op}: " + "".join(map(_str, parts)))


# ---- helpers (lowrank.cpp, dropout.cpp, adapted_linear.cpp, cluster.cpp, ortho.cpp, merge.cpp) -
def check_matrix(t, name, op):
    check(t.dim() == 2, op, name, " must be 2-D, got shape ", t.shape)


def check_matrices(op, **tensors):
    for name, t in tensors.items():
        check_matrix(t, name, op)


def check_same_float_dtype(a, a_name, b, b_name, op):
    check(a.dtype.is_floating_point, op, a_name, " must be a floating-point tensor, got ",
           a.dtype)
    check(a.dtype == b.dtype, op, a_name, " and ", b_name, " must have the same dtype, got ",
           a.dtype, " and ", b.dtype)
    check(a.device == b.device, op, a_name, " and ", b_name, " must be on the same device, got ",
           a.device, " and ", b.device)


def check_chain(x, A, B, op, r="r"):
    """A [r, in] with x's in, B [out, r] (r is "r_max" for the cluster blocks)."""
    check(A.shape[1] == x.shape[1], op, "A must be [", r, ", in] with in = x.size(1) = ",
           x.shape[1], ", got A of shape ", A.shape)
    check(B.shape[1] == A.shape[0], op, "B must be [out, ", r, "] with ", r, " = A.size(0) = ",
           A.shape[0], ", got B of shape ", B.shape)


def check_scale(scale, B, op):
    out_features, rank = B.shape
    check(scale.dtype.is_floating_point, op, "scale must be a floating-point tensor, got ",
           scale.dtype)
    check(scale.device == B.device, op, "scale must be on B's device ", B.device, ", got ",
           scale.device)
    check(scale.shape in ((rank,), (out_features, rank)), op, "scale must be [r] = [", rank,
           "] or [out, r] = [", out_features, ", ", rank, "], got ", scale.shape)


def check_weight(weight, op):
    """The merge's weight (merge.cpp): a matrix of a dtype its stats are defined for."""
    check(weight.dim() == 2, op, "weight must be a 2-D [out, in] matrix, got shape ",
           weight.shape)
    check(weight.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16), op,
           "weight must be float32, float64, float16 or bfloat16, got ", weight.dtype)


def check_lowrank_factors(x, A, B, scale, op):
    check_matrices(op, A=A, B=B)
    check_same_float_dtype(x, "x", A, "A", op)
    check_same_float_dtype(x, "x", B, "B", op)
    check_chain(x, A, B, op)
    check_scale(scale, B, op)


def check_dropout(dropout_seed, dropout_p, like, op):
    check(0.0 <= dropout_p < 1.0, op, "dropout_p must be in [0, 1), got ", dropout_p)
    if dropout_p == 0.0:
        return
    check(dropout_seed is not None, op, "dropout_seed is required when dropout_p > 0")
    seed = dropout_seed
    check(seed.dtype == torch.int64 and seed.shape == (2,), op, "dropout_seed must be an int64 "
           "tensor of shape [2] (seed, offset), got ", seed.dtype, " of shape ", seed.shape)
    check(seed.device == like.device, op, "dropout_seed must be on ", like.device, ", got ",
           seed.device)


def check_arg(t, name, like, like_name, dims, shape, op):
    """t (when given) of like's dtype and device, of shape `shape` named [dims]."""
    if t is not None:
        check_same_float_dtype(t, name, like, like_name, op)
        check(t.shape == shape, op, name, " must be [", dims, "] = ", list(shape), ", got ",
               t.shape)


def check_base_args(x, weight, bias, base_out, out_features, op):
    check(weight is None or base_out is None, op,
           "give the base as weight (and bias) or as base_out, not both")
    check(bias is None or weight is not None, op, "bias needs weight")
    if weight is not None:
        check_matrix(weight, "weight", op)
    check_arg(weight, "weight", x, "x", "out, in", (out_features, x.shape[1]), op)
    check_arg(bias, "bias", x, "x", "out", (out_features,), op)
    check_arg(base_out, "base_out", x, "x", "N, out", (x.shape[0], out_features), op)


def check_index(index, name, size, like, op):
    check(index.dtype == torch.int64 and index.shape == (size,), op, name,
           " must be an int64 permutation of shape [", size, "], got ", index.dtype,
           " of shape ", index.shape)
    check(index.device == like.device, op, name, " must be on ", like.device, ", got ",
           index.device)


def check_offsets(offsets, name, clusters, total, op):
    offsets = list(offsets)
    check(len(offsets) == clusters + 1, op, name, " must have num_clusters + 1 = ", clusters + 1,
           " entries, got ", len(offsets))
    check(offsets[0] == 0 and offsets[-1] == total, op, name, " must start at 0 and end at ",
           total, ", got ", offsets)
    check(all(a <= b for a, b in zip(offsets, offsets[1:])), op, name,
           " must be non-decreasing, got ", offsets)


def check_cluster_layout(x, A, B, scale, row_index, col_index, row_offsets, col_offsets, ranks,
                         op):
    """Returns sum(ranks), the width of hidden."""
    clusters = len(ranks)
    check(clusters >= 1, op, "ranks must name at least one cluster")
    check(scale.dtype.is_floating_point and scale.shape == (clusters,)
           and scale.device == A.device, op, "scale must be a floating-point tensor "
           "[num_clusters] = [", clusters, "] on ", A.device, ", got ", scale.dtype, " ",
           scale.shape, " on ", scale.device)
    check_index(row_index, "row_index", B.shape[0], x, op)
    check_index(col_index, "col_index", x.shape[1], x, op)
    # The C++ then checks that the indices are permutations: their values, which a fake lacks.
    check_offsets(row_offsets, "row_offsets", clusters, B.shape[0], op)
    check_offsets(col_offsets, "col_offsets", clusters, x.shape[1], op)
    check(all(0 <= r <= A.shape[0] for r in ranks), op, "every rank must be in [0, r_max = ",
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
    check(A.dim() == 2, op, "A must be 2-D [r_tot, in], got shape ", A.shape)
    check(A.dtype.is_floating_point, op, "A must be floating-point, got ", A.dtype)
    check(num_experts >= 1, op, "num_experts must be >= 1, got ", num_experts)
    check(A.shape[0] % num_experts == 0, op, "A.size(0) = ", A.shape[0],
           " must be divisible by num_experts = ", num_experts)


def check_ortho_penalty_grad_args(grad_A, A, weight, num_experts):
    op = "soslora::ortho_penalty_grad_"
    check_ortho_args(A, num_experts, op)
    check(grad_A.shape == A.shape, op, "grad_A must have A's shape ", A.shape, ", got ",
           grad_A.shape)
    check(grad_A.device == A.device and weight.device == A.device, op, "grad_A, A and weight "
           "must be on one device, got ", grad_A.device, ", ", A.device, ", ", weight.device)
    check(grad_A.dtype.is_floating_point, op, "grad_A must be floating-point, got ", grad_A.dtype)
    check(weight.numel() == 1 and weight.dtype.is_floating_point, op, "weight must be a "
           "floating-point tensor with one element, got ", weight.dtype, " of shape ",
           weight.shape)


# ---- soslora::adapted_linear and its halves (autograd.cpp, adapted_linear.cpp) ------------------
def check_index_pair(row_index, col_index, op):
    """A block layout has both index maps or neither."""
    check(row_index is None or col_index is not None, op, "row_index needs col_index")
    check(col_index is None or row_index is not None, op, "col_index needs row_index")


def check_factors(x, A, B, scale, layout, op):
    """adapted_linear.cpp's check_factors; returns the rank R of the dense factors."""
    check_matrices(op, A=A, B=B)
    for t, name in ((A, "A"), (B, "B"), (scale, "scale")):
        check(t.dtype.is_floating_point, op, name, " must be floating-point, got ", t.dtype)
        check(t.device == x.device, op, name, " must be on x's device ", x.device, ", got ",
               t.device)
    check_chain(x, A, B, op)
    check_index_pair(layout[0], layout[1], op)
    if layout[0] is not None:
        return check_cluster_layout(x, A, B, scale, *layout, op)
    r, G = A.shape[0], scale.shape[0] if scale.dim() else 0
    check((scale.dim() == 1 or scale.dim() == 2 and scale.shape[1] == B.shape[0]) and G >= 1
           and r % G == 0, op, "scale must be [G] or [G, out] = [G, ", B.shape[0],
           "] with G dividing r = ", r, " (one scale per group of r/G ranks), got ", scale.shape)
    return r


def check_scale_terms(scale, row_index, gate_logits, gate_temperature, anchor_scales):
    op = "soslora::adapted_linear"
    check(scale.dim() in (1, 2), op, "scale must be [G] or [G, out], got ", scale.shape)
    check(row_index is None or (gate_logits is None and anchor_scales is None), op,
           "gate_logits and anchor_scales apply to plain factors, not to cluster blocks")
    check((gate_logits is None) == (gate_temperature is None), op,
           "gate_logits and gate_temperature come together")
    for t, name in ((gate_logits, "gate_logits"), (gate_temperature, "gate_temperature"),
                    (anchor_scales, "anchor_scales")):
        if t is not None:
            check(t.dtype.is_floating_point and t.device == scale.device, op, name,
                   " must be a floating-point tensor on scale's device ", scale.device,
                   ", got ", t.dtype, " on ", t.device)
    G = scale.shape[0]
    if gate_logits is not None:
        check(gate_logits.shape == (G,), op, "gate_logits must be [G] = [", G,
               "] (one per group of the scale), got ", gate_logits.shape)
        check(gate_temperature.numel() == 1 and gate_temperature.dim() <= 1, op,
               "gate_temperature must be 0-d or have one element, got shape ",
               gate_temperature.shape)
    if anchor_scales is not None:
        check(scale.dim() == 2 and anchor_scales.shape == (G,), op, "anchor_scales must be [G] "
               "= [", G, "] with a [G, out] scale, got ", anchor_scales.shape, " with scale ",
               scale.shape)


def check_ortho_term(A, ortho_lambda, num_experts):
    """autograd.cpp's check_ortho_term: the orthogonality term's arguments, in the forward."""
    op = "soslora::adapted_linear"
    check(num_experts >= 1, op, "num_experts must be >= 1, got ", num_experts)
    if ortho_lambda is None or num_experts == 1:
        return
    check(ortho_lambda.numel() == 1 and ortho_lambda.dtype.is_floating_point
          and ortho_lambda.device == A.device, op, "ortho_lambda must be a floating-point tensor "
          "with one element on A's device ", A.device, ", got ", ortho_lambda.dtype, " of shape ",
          ortho_lambda.shape, " on ", ortho_lambda.device)
    check(A.dim() != 2 or A.shape[0] % num_experts == 0, op, "A.size(0) = ",
          A.shape[0] if A.dim() == 2 else 0, " must be divisible by num_experts = ", num_experts)
