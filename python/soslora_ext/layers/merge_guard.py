"""The merge guard: every in-place write of a low-rank update into a weight goes through here.

A merge writes W <- fl(W + alpha (B*s) A) in place (ops.merge_into_). A non-finite factor or
scale, or a sum beyond the weight dtype's range (float16: 65504), would turn weight entries
into Inf/NaN for good: subtracting the update again cannot bring them back. So every weight
and every term is checked before anything is written, and on any refusal every weight is
left bit-identical.

The check costs one host sync per weight and no [out, in] temporary: a bound
|W + sum_t alpha_t D_t| <= max|W| + sum_t max_i |(B s)_i| max_j |A_:,j| (Cauchy-Schwarz on
each entry of D = (B s) A) settles the common case. Only where the bound cannot exclude an
overflow is the merge replayed band by band in the accumulation dtype, as the op computes it
(small temporaries), before anything is written.

max|W| costs no read of W where it is known: the merge op returns the max of the weight it
wrote (and its fingerprint) from the pass that wrote it, weight_stats reads both in one pass,
and the guard keeps the last max of each weight it saw, valid while the weight is the same
tensor with the same memory, layout and dtype and torch's count of its in-place writes
(`_version`) is unchanged (copy_, load_state_dict, in-place ops and the merge op count).
Writes torch does not count (through .data, numpy or DLPack) leave that max stale; the op
still checks every sum it writes against the dtype's range, writes none beyond it, and then
takes back what it wrote (within one rounding, as unmerging): the guard forgets the max and
raises FloatingPointError, after taking back the other weights of the same merge. So a merge
reads the weight once (twice the first time), and an unmerge twice (its fingerprint check).

Terms of a dtype or shape the op cannot take are refused here too, and the terms of all
targets that write one weight are checked as their sum.

A weight that already holds NaN or Inf is refused as well: the merge could not be checked,
the merged model would be as broken as the base, and nothing is gained by writing into it.

A weight that shares memory with another tensor of the model (a tied module, a Parameter on
the same storage, a view into it, however and whenever the tie was made) is refused too,
naming those tensors: writing into it would change them as well (sharing.py). The caller gives
the modules to search (`scope`) and where each weight lives (`Target.owner`).
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn as nn

from .. import ops
from .sharing import overlap, shared_with

Tensor = torch.Tensor

# Rows per band of the exact check: about 2^20 elements per temporary.
_BAND_ELEMENTS = 1 << 20
# Slack on the bound for the rounding of the float32 (float64) accumulation (the op's, in
# merge_cpu.h, is the same).
_BOUND_SLACK = 1.0 + 2.0 ** -10


@dataclass
class Term:
    """alpha * (B * scale) @ A: A [r, in], B [out, r], scale [r] or [out, r]."""

    A: Tensor
    B: Tensor
    scale: Tensor
    alpha: float = 1.0


@dataclass
class Target:
    """The terms to add, in order, into one [out, in] weight (a transposed view of a weight
    stored [in, out] is written through); `name` is used in error messages. `owner` is the
    module and attribute name that hold the weight: that place is not a tensor sharing it."""

    name: str
    weight: Tensor
    terms: list[Term] = field(default_factory=list)
    owner: tuple[nn.Module, str] | None = None


def _label(where: str, target: Target) -> str:
    return f"{where}: layer {target.name!r}" if target.name else where


def _acc_dtype(weight: Tensor, term: Term) -> torch.dtype:
    # The op's rule: float32 accumulation (float64 for float64 weights or factors).
    return torch.promote_types(ops.accumulate_dtype(weight.dtype),
                               torch.promote_types(term.A.dtype, term.B.dtype))


def _folded_B(term: Term, dtype: torch.dtype) -> Tensor:
    return term.B.to(dtype) * term.scale.to(dtype)


def _check_term(target: Target, term: Term, where: str) -> None:
    """Dtypes and shapes the op accepts: found here, before any weight is written, rather than
    by the op halfway through a multi-weight merge."""
    A, B, scale = term.A, term.B, term.scale
    for what, t in (("lora_A", A), ("lora_B", B), ("scale", scale)):
        if not isinstance(t, Tensor) or not t.dtype.is_floating_point:
            raise TypeError(f"{_label(where, target)}: the update's {what} must be a real "
                            f"floating-point tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    out, in_ = target.weight.shape
    if (A.dim() != 2 or B.dim() != 2 or A.shape[1] != in_ or B.shape[0] != out
            or A.shape[0] != B.shape[1] or scale.shape not in ((A.shape[0],), tuple(B.shape))):
        raise ValueError(f"{_label(where, target)}: the update's shapes do not fit the "
                         f"[{out}, {in_}] weight: lora_A {list(A.shape)} (expected [r, {in_}]), "
                         f"lora_B {list(B.shape)} (expected [{out}, r]), scale "
                         f"{list(scale.shape)} (expected [r] or [{out}, r])")


def _by_weight(targets: list[Target]) -> list[Target]:
    """One target per distinct weight: the terms of targets that write the same weight are
    checked as the one sum they add up to."""
    combined: dict[tuple, Target] = {}
    for t in targets:
        combined.setdefault(_weight_key(t.weight),
                            Target(t.name, t.weight, owner=t.owner)).terms.extend(t.terms)
    return list(combined.values())


def _weight_key(weight: Tensor) -> tuple:
    # A Conv1D weight is written through a fresh transposed view each time: views of one
    # tensor with one layout are the same target.
    base = weight._base if weight._base is not None else weight
    return id(base), weight.storage_offset(), tuple(weight.shape), tuple(weight.stride())


# ---- the last known max |W| of each weight ------------------------------------------------------
# id(base tensor) -> (weak reference to it, the weight's _key, max |W|).
_known: dict[int, tuple] = {}


def _key(weight: Tensor) -> tuple | None:
    """What must not change for a recorded max |W| to hold: the memory, layout, dtype and
    torch's count of in-place writes of `weight`. None where no max is kept (meta, subclasses,
    inference tensors, which count no writes)."""
    if weight.device.type == "meta" or type(weight) not in (Tensor, nn.Parameter):
        return None
    try:
        version = weight._version
    except RuntimeError:
        return None
    return (weight.data_ptr(), weight.device, tuple(weight.shape), tuple(weight.stride()),
            weight.dtype, version)


def _base(weight: Tensor) -> Tensor:
    return weight._base if weight._base is not None else weight


def known_max(weight: Tensor) -> float | None:
    """The max |W| recorded for `weight` if it still holds, else None."""
    entry = _known.get(id(_base(weight)))
    if entry is None or entry[0]() is not _base(weight):
        return None
    key = _key(weight)
    return entry[2] if key is not None and entry[1] == key else None


def _remember(weight: Tensor, stats: ops.WeightStats) -> None:
    """Keep max |W| from `stats`, just read or written (finite values only)."""
    key = _key(weight)
    if key is None or stats.count or not math.isfinite(stats.max_abs):
        return _forget(weight)
    base = _base(weight)
    i = id(base)

    def gone(ref):  # the tensor was freed: its id may be reused
        if _known.get(i, (None,))[0] is ref:
            del _known[i]

    _known[i] = (weakref.ref(base, gone), key, stats.max_abs)


def _forget(weight: Tensor) -> None:
    _known.pop(id(_base(weight)), None)


def read(weight: Tensor) -> ops.WeightStats:
    """The weight's stats (max |W|, fingerprint sums) in one read, the max kept for the next
    check."""
    stats = ops.weight_stats(weight.detach())
    _remember(weight, stats)
    return stats


def _validate(target: Target, where: str) -> bool:
    """TypeError/ValueError if the weight or a term's dtype or shape cannot be merged; returns
    whether there are values to check (terms, and a weight with values)."""
    weight = target.weight
    if not target.terms:
        return False
    if not weight.dtype.is_floating_point or weight.dim() != 2:
        raise TypeError(f"{_label(where, target)}: the weight is {weight.dtype} "
                        f"{list(weight.shape)}, not a floating-point matrix")
    for t in target.terms:
        _check_term(target, t, where)
    return weight.device.type != "meta" and weight.numel() > 0


@torch.no_grad()
def check(targets: list[Target], where: str) -> None:
    """Raise FloatingPointError naming the weight (and `where`) if adding any target's terms
    would write a non-finite value, or if a factor, scale or the weight itself is not finite;
    TypeError/ValueError if a term's dtype or shape cannot be merged. Writes nothing. Reads a
    weight only where its max |W| is not known (or the bound needs the exact check)."""
    for target in _by_weight(targets):
        if not _validate(target, where):
            continue
        weight = target.weight
        # One host sync: each term's bound, and the weight's stats unless max |W| is known. A
        # non-finite factor or scale makes its bound NaN or Inf; only then are its tensors
        # inspected, to name the culprit.
        weight_max = known_max(weight)
        parts = [] if weight_max is not None else [torch.ops.soslora.weight_stats(weight.detach())]
        parts += [_term_bound(t).to(weight.device).reshape(1).view(torch.int64)
                  for t in target.terms]
        values = torch.cat(parts).tolist()
        if weight_max is None:
            stats = ops.WeightStats.of(values[:4], weight.dtype)
            _remember(weight, stats)
            weight_max, values = stats.max_abs, values[4:]
        bounds = [ops.float_of_bits(v) for v in values]
        for t, term_bound in zip(target.terms, bounds):
            if not math.isfinite(term_bound):
                _refuse_non_finite(target, t, where)
        if not math.isfinite(weight_max):
            raise FloatingPointError(
                f"{_label(where, target)}: the base weight already holds non-finite "
                "values; nothing was merged")
        limit = torch.finfo(weight.dtype).max
        bound = weight_max + sum(bounds)
        if bound * _BOUND_SLACK < limit:
            continue
        _exact_check(target, where, limit)


def _term_bound(term: Term) -> Tensor:
    """|alpha| max_i |(B s)_i| max_j |A_:,j| (0-d float64, on the factors' device): bounds
    every entry of the term's update (Cauchy-Schwarz). Computed in the factors' dtype (float32
    at least): its rounding is far inside the bound's slack, and a square beyond the dtype's
    range only makes the bound Inf (then the exact check decides). NaN or Inf if a factor or
    the scale is not finite."""
    if term.A.numel() == 0 or term.B.numel() == 0:
        return torch.zeros((), dtype=torch.float64, device=term.A.device)
    dtype = torch.promote_types(torch.promote_types(term.A.dtype, term.B.dtype),
                                torch.promote_types(term.scale.dtype, torch.float32))
    rows = _folded_B(term, dtype).square_().sum(dim=1).amax()
    cols = term.A.to(dtype).square().sum(dim=0).amax()
    return (rows.double() * cols.double()).sqrt_().mul_(abs(float(term.alpha)))


def _refuse_non_finite(target: Target, term: Term, where: str) -> None:
    """Raise FloatingPointError naming the term's non-finite tensor, if it has one."""
    for what, t in (("lora_A", term.A), ("lora_B", term.B), ("scale", term.scale)):
        if not bool(torch.isfinite(t).all()):
            raise FloatingPointError(
                f"{_label(where, target)}: the update's {what} has non-finite values; nothing "
                "was merged (fix or reload the adapter)")


def _exact_check(target: Target, where: str, limit: float) -> None:
    """Replay the merge band by band as the op computes it (accumulate, round into the weight's
    dtype, term after term) and refuse if any value would leave the dtype's finite range.
    A sum just above the dtype's max is refused even where rounding would bring it back: the
    CUDA kernel may round the last bit differently from this replay."""
    weight = target.weight
    rows, cols = weight.shape
    band = max(1, _BAND_ELEMENTS // max(cols, 1))
    folded = [(_acc_dtype(weight, t), t) for t in target.terms]
    folded = [(acc, t.A.to(acc), _folded_B(t, acc), float(t.alpha)) for acc, t in folded]
    for start in range(0, rows, band):
        w = weight.detach()[start:start + band]
        for acc, A, Bs, alpha in folded:
            # A copy even where w is already `acc`: the check must never write the weight.
            s = w.to(acc, copy=True).add_(Bs[start:start + band] @ A, alpha=alpha)
            if not bool((s.abs() <= limit).all()):
                raise FloatingPointError(
                    f"{_label(where, target)}: the merged weight would exceed the "
                    f"range of {weight.dtype} (|value| > {limit:.6g}); nothing was merged "
                    "(merge into a wider dtype, e.g. model.float(), or scale the adapter down)")
            w = s.to(weight.dtype)


def update_problem(term: Term, out: int, in_: int, dtype: torch.dtype) -> str | None:
    """What keeps `term` from being merged into (or unmerged from) an [out, in] weight of
    `dtype` (wrong dtype or shape, non-finite values), or None. For a merged update loaded
    from a state dict, before the layer records it."""
    shape_only = Target("", torch.empty(out, in_, device="meta", dtype=dtype), [term])
    try:
        check([shape_only], "merged update")
    except (TypeError, ValueError) as e:
        return str(e)
    if not all(t.device.type == "meta" or bool(torch.isfinite(t).all())
               for t in (term.A, term.B, term.scale)):
        return "merged update: has non-finite values"
    return None


@torch.no_grad()
def write(targets: list[Target], where: str = "merge") -> list[ops.WeightStats | None]:
    """Add every target's terms into its weight (after check()); returns the stats of each
    target's weight as the last write into it left it (None where nothing wrote it, or on the
    meta device). Should a sum leave the dtype's range all the same (a weight changed where
    torch does not count writes, since its max was kept), the op writes none of it and takes
    its term back; the terms written before are taken back here too (within one rounding, as
    unmerging), and FloatingPointError is raised."""
    done: list[tuple[Target, Term]] = []
    last: dict[tuple, ops.WeightStats | None] = {}
    for target in targets:
        for t in target.terms:
            last[_weight_key(target.weight)] = _write_term(target, t, where, done)
    return [last.get(_weight_key(target.weight)) for target in targets]


def _write_term(target: Target, term: Term, where: str, done: list[tuple[Target, Term]],
                max_abs: float | None = None) -> ops.WeightStats | None:
    """One term into its weight (with max_abs: only if the bound holds, else count -1 and
    nothing written); appended to `done`. A sum beyond the range: everything in `done` taken
    back, FloatingPointError (see write)."""
    stats = ops.merge_into_(target.weight, term.A, term.B, term.scale, term.alpha, max_abs)
    if stats is None or stats.count == -1:
        return stats
    if stats.count:
        _forget(target.weight)
        for earlier, t in reversed(done):
            ops.merge_into_(earlier.weight, t.A, t.B, t.scale, -t.alpha)
            _forget(earlier.weight)
        raise FloatingPointError(
            f"{_label(where, target)}: {stats.count} sums of the merge would exceed the range "
            f"of {target.weight.dtype}, although the weight's recorded maximum excluded it: "
            "the weight was changed where torch does not count writes (through .data, numpy "
            "or DLPack) since it was last read. Nothing was merged: what had been written was "
            "taken back (within one rounding, as unmerging). Merge into a wider dtype, or "
            "scale the adapter down")
    done.append((target, term))
    _remember(target.weight, stats)
    return stats


def check_unshared(targets: list[Target], scope: Sequence[nn.Module], where: str) -> None:
    """Raise RuntimeError, naming them, if a tensor of a module in `scope` shares memory with a
    target's weight: writing into it would change those too. Without a scope, only the
    targets' weights are compared with one another."""
    if scope:
        shared = shared_with([(t.weight, t.owner) for t in targets], scope)
    else:
        shared = [[f"the weight of layer {other.name!r}" for other in targets[i + 1:]
                   if overlap(target.weight, other.weight)] for i, target in enumerate(targets)]
    for target, names in zip(targets, shared):
        if names:
            raise RuntimeError(
                f"{_label(where, target)}: the weight is shared with {names[:8]}"
                f"{' ...' if len(names) > 8 else ''} (the same memory): writing the update into "
                "it would change those too; nothing was changed. Untie them first (give each "
                "its own copy, e.g. m.weight = nn.Parameter(m.weight.detach().clone())), or "
                "keep the update unmerged")


def merge_(targets: list[Target], where: str, scope: Sequence[nn.Module] = ()
           ) -> list[ops.WeightStats | None]:
    """check_unshared() and check() every target, then write() them all: all or nothing.
    `scope`: the modules whose tensors must not share memory with a weight written (the
    model); none for a weight made for the purpose. Returns write()'s stats."""
    check_unshared(_by_weight(targets), scope, where)
    if len(targets) == 1 and len(targets[0].terms) == 1 and _validate(targets[0], where):
        # One term into one weight whose max |W| is known (a layer's merge and unmerge): the
        # op checks the bound itself, from the factors it reads anyway, and writes nothing
        # where it does not hold; then the full check below says why, or replays the merge.
        target = targets[0]
        weight_max = known_max(target.weight)
        if weight_max is not None:
            stats = _write_term(target, target.terms[0], where, [], weight_max)
            if stats is not None and stats.count != -1:
                return [stats]
    check(targets, where)
    return write(targets, where)
