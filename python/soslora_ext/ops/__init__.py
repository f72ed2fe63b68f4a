"""Python face of the `torch.ops.soslora` operators (the C++ is in csrc/).

    __init__.py   thin wrappers, the public functions of this package
    fakes.py      fake kernels: output shapes for torch.compile and meta tensors
    checks.py     the C++ ops' input checks, written again for the fake kernels
    autograd.py   the autograd of the differentiable pieces
    dtypes.py     the dtypes the ops take and accumulate in
    reference.py  the pure-PyTorch float64 oracle every fast path is tested against

Shapes: x [N, in], A [r, in], B [out, r], scale [r] (one per rank) or [out, r] (per output
channel and rank). Experts are contiguous segments of the r axis. Dropout is described by an
int64 tensor `dropout_seed = (seed, offset)` on x's device: the mask is recomputed from it in
the backward pass, never stored.
"""
from __future__ import annotations

import struct
from typing import NamedTuple

import torch

from .. import _C  # noqa: F401  loads the library that registers torch.ops.soslora
from . import autograd, fakes  # noqa: F401  registered with torch.library on import
from .dtypes import SUPPORTED_DTYPES, accumulate_dtype

__all__ = ["SUPPORTED_DTYPES", "WeightStats", "accumulate_dtype", "adapted_linear",
           "add_ortho_penalty_grad_", "clear_cuda_choices", "cluster_lowrank", "cuda_choices",
           "linear_lowrank", "lowrank", "merge_into_", "new_dropout_seed", "ortho_penalty",
           "set_cuda_path", "weight_stats"]

Tensor = torch.Tensor
_ops = torch.ops.soslora


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
    """Chooses how the ops run on CUDA; returns the previous choice.

    "auto" (default): for each op and shape class (the op, device, dtype and sizes, the number
    of rows rounded up to a power of two), the faster of the hand-written kernel and ATen
    (cuBLAS), measured on its first call and kept for the process (cuda_choices()), so a kernel
    can never make a step slower than cuBLAS. Under torch.use_deterministic_algorithms(True),
    and inside a CUDA-graph capture before any measurement, ATen. "kernels": the hand-written
    kernels wherever they exist; "aten": ATen everywhere but the dropout-mask kernel, which
    every choice uses. CPU is unaffected."""
    previous = _C.cuda_path()
    _C.set_cuda_path(path)
    return previous


def cuda_choices() -> dict[str, tuple[str, float, float]]:
    """What "auto" measured so far: {shape class: (chosen path, kernel ms, ATen ms)}."""
    return dict(_C.cuda_choices())


def clear_cuda_choices() -> None:
    """Forget what "auto" measured: each shape class is measured again on its next call."""
    _C.clear_cuda_choices()


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


class WeightStats(NamedTuple):
    """A weight's stats, as merge_into_ and weight_stats read them in the pass they make over
    it (csrc/soslora.h). `max_abs`: max |w| (inf if a value is not finite); `sums`: the two sums
    of its fingerprint (layers/sharing.py), mod 2^32 (2^64 for float64); `count`: how many
    values are not finite (weight_stats); for merge_into_, 0 when it merged, else nothing was
    merged and the other fields are 0: -1 when the bound with max_abs did not hold, or how
    many sums left the dtype's finite range (the merge was taken back)."""

    max_abs: float
    sums: tuple[int, int]
    count: int

    @staticmethod
    def of(values: list[int], dtype: torch.dtype) -> WeightStats:
        """From the op's int64 [4] as host integers, for a weight of `dtype`."""
        mask = (1 << (64 if dtype.itemsize == 8 else 32)) - 1
        return WeightStats(float_of_bits(values[2]), (values[0] & mask, values[1] & mask),
                           values[3])


def float_of_bits(bits: int) -> float:
    """The float64 whose bits, as an int64, are `bits`."""
    return struct.unpack("<d", struct.pack("<q", bits))[0]


def merge_into_(weight: Tensor, A: Tensor, B: Tensor, scale: Tensor, alpha: float = 1.0,
                max_abs: float | None = None) -> WeightStats | None:
    """weight += alpha * (B*scale) @ A in place, float32 accumulation (float64 for float64),
    one rounding; returns the stats of the weight written, gathered in the same pass (one host
    sync; None on the meta device). With max_abs (max |weight|, known), the merge guard's
    bound is checked first, and nothing is written where it does not hold (count -1). A sum
    beyond the weight dtype's range is never written: count > 0 then, and the weight is as
    before (bit for bit where the merge had not written, within one rounding, as unmerging,
    where it had). The op itself, torch.ops.soslora.merge_into_, returns the stats as an
    int64 tensor [4] on the weight's device, without a sync."""
    stats = _ops.merge_into_(weight, A, B, scale, float(alpha),
                             None if max_abs is None else float(max_abs))
    return None if stats.device.type == "meta" else WeightStats.of(stats.tolist(), weight.dtype)


def weight_stats(weight: Tensor) -> WeightStats:
    """max |w|, the fingerprint's sums and the count of non-finite values of a 2-D float32,
    float64, float16 or bfloat16 weight (any strides), in one read and one host sync."""
    return WeightStats.of(_ops.weight_stats(weight).tolist(), weight.dtype)


def new_dropout_seed(device: torch.device) -> Tensor:
    """(seed, offset) drawn from torch's generator for `device`, as the layers draw it:
    torch.manual_seed reproduces it."""
    return _ops.dropout_seed(torch.empty(0, device=device))
