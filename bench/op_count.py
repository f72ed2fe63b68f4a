"""How many ATen ops one training step dispatches: the host's share of a step, counted.

On a GPU each dispatched op costs the host about 10-20 µs whatever its size, so a layer that
dispatches 70 ops per step is bound by the host. torch.profiler on the CPU records every op
the dispatcher runs; this counts the outermost ATen ops that do work:
  * an ATen op inside another ATen op is part of it (addmm's own allocation is not counted);
  * soslora ops and autograd nodes are containers: the ATen ops they run are counted (a
    soslora op that runs none, its own loops doing the work, counts as one);
  * views and metadata (t, view, expand, slice, ...) are not work, nor is a `to`,
    `contiguous` or `reshape` that returned its input or a view (nothing inside did work).

    python bench/bench_layer.py --ops   # which ops every method dispatches at the tiny step
"""
from __future__ import annotations

import collections

from torch.profiler import ProfilerActivity, profile

# Ops that only make views or read metadata.
VIEW_OPS = frozenset(f"aten::{name}" for name in (
    "t", "transpose", "view", "_unsafe_view", "view_as", "expand", "expand_as", "as_strided",
    "slice", "select", "narrow", "unsqueeze", "squeeze", "permute", "detach", "detach_", "alias",
    "lift_fresh", "resolve_conj", "resolve_neg", "_reshape_alias", "numpy_T", "unflatten",
    "split", "split_with_sizes", "chunk", "unbind", "diagonal", "is_same_size", "size",
    "stride", "is_nonzero", "result_type", "_has_compatible_shallow_copy_type", "set_",
    "requires_grad_", "_version"))
# Ops that do work only when they have to (else they return their input or a view of it).
MAYBE_OPS = frozenset({"aten::to", "aten::contiguous", "aten::reshape", "aten::flatten",
                       "aten::type_as", "aten::_to_copy_if_needed"})


def _does_work(event) -> bool:
    if event.name in VIEW_OPS:
        return False
    if event.name in MAYBE_OPS:  # it copied if anything inside it did work
        return any(_does_work(child) for child in event.cpu_children)
    return True


def _counted(event, inside_aten: bool, out: collections.Counter) -> int:
    """Adds the ops under `event` to `out`; returns how many it added."""
    name = event.name
    is_aten = name.startswith("aten::")
    added = 0
    if is_aten and not inside_aten and _does_work(event):
        out[name] += 1
        added = 1
    for child in event.cpu_children:
        added += _counted(child, inside_aten or is_aten, out)
    if name.startswith("soslora::") and not inside_aten and added == 0:
        out[name] += 1  # its own loops did the work (no ATen op inside)
        added = 1
    return added


def count_ops(step, warmup: int = 2) -> collections.Counter:
    """{op name: count} of the ATen ops that do work in one call of step() (on the CPU)."""
    for _ in range(warmup):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    roots = [e for e in prof.events() if e.cpu_parent is None]
    counts = collections.Counter()
    for event in roots:
        _counted(event, False, counts)
    return counts
