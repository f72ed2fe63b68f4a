"""Which tensors share memory with a weight about to be written, and whether a merged weight
is still the one merge() wrote.

Sharing is decided by memory, when the write happens: a module tied by the same Parameter,
a second Parameter made on the same storage (``nn.Parameter(a.weight.data)``), a view into a
part of the weight, a tie made after apply_*: all of them alias the bytes the write changes.
Two tensors share memory when their byte ranges on one device overlap (same storage or not:
storages made from one buffer twice are found too); for two strided tensors whose ranges
interleave (columns of one matrix) the bytes themselves are compared. A tensor without
storage (e.g. a DTensor) is compared by identity.

What is searched: every parameter, buffer and tensor attribute of every module of the
`scope` (a model), under every name.

A merged weight's fingerprint (fingerprint()) is a checksum of all its bits: unmerge()
compares it with the one taken at merge time, so a weight restored, reloaded, replaced or cast
since is not subtracted from.
"""
from __future__ import annotations

import bisect
import weakref
from typing import Iterable, Iterator, Sequence

import torch
import torch.nn as nn

Tensor = torch.Tensor

# Bytes beyond which two interleaved strided tensors are taken to share memory without
# comparing their bytes (the comparison allocates one byte per byte of their joint range).
_EXACT_LIMIT = 1 << 28


def _span(t: Tensor) -> tuple[tuple, int, int] | None:
    """(address space, first byte, end byte) of the memory `t` reads, or None if it has no
    elements; ("object", id) for a tensor without storage."""
    if t.numel() == 0:
        return None
    try:
        storage = t.untyped_storage()
        size = t.element_size()
        lo = sum((n - 1) * s for n, s in zip(t.shape, t.stride()) if s < 0)
        hi = sum((n - 1) * s for n, s in zip(t.shape, t.stride()) if s > 0)
        if t.device.type == "meta" or storage.data_ptr() == 0:
            # No memory to compare: the storage itself is the address space.
            space, start = ("storage", storage._cdata), t.storage_offset() * size
        else:
            space, start = ("device", t.device.type, t.device.index), t.data_ptr()
    except (RuntimeError, NotImplementedError, AttributeError, TypeError):
        return ("object", id(t)), 0, 1
    return space, start + lo * size, start + (hi + 1) * size


def _dense(t: Tensor) -> bool:
    """Whether `t` covers every byte of its range once (contiguous in some order of dims)."""
    expected = 1
    for stride, n in sorted((abs(s), n) for n, s in zip(t.shape, t.stride()) if n > 1):
        if stride != expected:
            return False
        expected *= n
    return True


def _bytes(t: Tensor, canvas: Tensor, origin: int) -> Tensor:
    """The bytes of `canvas` (one per byte of memory from `origin`) that `t` covers."""
    size = t.element_size()
    start = _span(t)[1]
    lo = sum((n - 1) * s for n, s in zip(t.shape, t.stride()) if s < 0)
    first = start - lo * size  # the byte of element [0, 0, ...]
    return canvas.as_strided(tuple(t.shape) + (size,),
                             tuple(s * size for s in t.stride()) + (1,), first - origin)


def overlap(a: Tensor, b: Tensor) -> bool:
    """Whether `a` and `b` share at least one byte of memory."""
    sa, sb = _span(a), _span(b)
    if sa is None or sb is None or sa[0] != sb[0]:
        return False
    if sa[2] <= sb[1] or sb[2] <= sa[1]:
        return False
    if sa[0][0] == "object" or (_dense(a) and _dense(b)):
        return True
    origin, end = min(sa[1], sb[1]), max(sa[2], sb[2])
    if end - origin > _EXACT_LIMIT:
        return True  # too large to compare byte by byte: taken as shared
    canvas = torch.zeros(end - origin, dtype=torch.bool)
    _bytes(a, canvas, origin).fill_(True)
    return bool(_bytes(b, canvas, origin).any())


def tensors(scope: Iterable[nn.Module]) -> Iterator[tuple[str, nn.Module, str, Tensor]]:
    """(path, module, attribute, tensor) for every parameter, buffer and tensor attribute of
    every module in `scope`, each (module, attribute) once, under its first name."""
    seen: set[tuple[int, str]] = set()
    for root in scope:
        for name, module in root.named_modules(remove_duplicate=False):
            found = [(k, v) for k, v in module._parameters.items() if v is not None]
            found += [(k, v) for k, v in module._buffers.items() if v is not None]
            found += [(k, v) for k, v in vars(module).items() if isinstance(v, Tensor)]
            for attr, t in found:
                if (id(module), attr) not in seen:
                    seen.add((id(module), attr))
                    yield (f"{name}.{attr}" if name else attr), module, attr, t


def shared_with(weights: Sequence[tuple[Tensor, tuple[nn.Module, str] | None]],
                scope: Sequence[nn.Module]) -> list[list[str]]:
    """For each (weight, owner): the paths of the tensors in `scope` that share memory with
    `weight`, but for the weight's own place (`owner`: its module and attribute name)."""
    by_space: dict[tuple, list[tuple[int, int, str, nn.Module, str, Tensor]]] = {}
    for path, module, attr, t in tensors(scope):
        span = _span(t)
        if span is not None:
            by_space.setdefault(span[0], []).append((span[1], span[2], path, module, attr, t))
    index = {}
    for space, entries in by_space.items():
        entries.sort(key=lambda e: e[0])
        index[space] = ([e[0] for e in entries], max(e[1] - e[0] for e in entries), entries)
    found = []
    for weight, owner in weights:
        names = []
        span = _span(weight)
        if span is not None and span[0] in index:
            starts, longest, entries = index[span[0]]
            # Entries that start before the weight ends and can reach past its start.
            for k in range(bisect.bisect_left(starts, span[2]) - 1, -1, -1):
                start, end, path, module, attr, t = entries[k]
                if start <= span[1] - longest:
                    break
                if owner is not None and module is owner[0] and attr == owner[1]:
                    continue
                if end > span[1] and overlap(weight, t):
                    names.append(path)
        found.append(sorted(names))
    return found


@torch.no_grad()
def fingerprint(weight: Tensor) -> tuple | None:
    """A checksum of `weight`'s dtype, shape and every bit of its values: its rows' and its
    columns' sums of bits, each weighted by an odd number per position, in wrapping integer
    arithmetic (mod 2^32; 2^64 for float64), which no summation order changes. Equal for equal
    tensors on any device; a change to any value changes it but for a chance of about 2^-32
    (changes that cancel in both sums). Two integer reductions and one host sync. None for a
    tensor with no values to read (meta) or that is not a plain tensor.

    The merge op gathers the same sums in the pass that writes the weight, and weight_stats
    in one read (ops.WeightStats.sums, csrc/soslora.h): from_sums() makes this tuple of them.
    This is their definition in torch ops."""
    if weight.device.type == "meta" or type(weight) not in (Tensor, nn.Parameter):
        return None
    w = weight.detach()
    if w.numel() == 0:
        return str(w.dtype), tuple(w.shape)
    w = w.reshape(1, -1) if w.dim() < 2 else w.reshape(w.shape[0], -1)
    acc = torch.int64 if w.element_size() == 8 else torch.int32
    if w.element_size() == 2 and w.shape[1] % 2 == 0:
        # 16-bit values in pairs along a row, as 32-bit words (fast sums; the pairs depend on
        # the shape only, not on the layout).
        bits = (w if w.stride(1) == 1 and w.storage_offset() % 2 == 0 and w.stride(0) % 2 == 0
                else w.contiguous()).view(acc)
    else:
        bits = w.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[
            w.element_size()])
    sums = []
    for dim in (1, 0):
        lines = bits.sum(dim, dtype=acc)
        odd = torch.arange(1, 2 * lines.numel(), 2, device=lines.device, dtype=acc)
        sums.append((lines * odd).sum(dtype=acc))
    mask = (1 << (8 * acc.itemsize)) - 1
    return (str(w.dtype), tuple(w.shape), *(v & mask for v in torch.stack(sums).tolist()))


def from_sums(weight: Tensor, sums: tuple[int, int]) -> tuple:
    """fingerprint(weight) from the sums the merge op or weight_stats read (WeightStats.sums)."""
    if weight.numel() == 0:
        return str(weight.dtype), tuple(weight.shape)
    return (str(weight.dtype), tuple(weight.shape), *sums)


class ModelRef:
    """A weak reference to the model a layer was put into (by apply_*, load_adapter or
    import_peft): what layer.merge() and unmerge() search for tensors sharing the weight. A
    deep copy of the model refers to the copy, a deep copy of the layer alone to nothing (it
    then knows only itself); a pickle keeps the model (one of the layer alone carries it)."""

    def __init__(self, model: nn.Module | None = None):
        self._ref = None if model is None else weakref.ref(model)

    def __call__(self) -> nn.Module | None:
        return None if self._ref is None else self._ref()

    def __deepcopy__(self, memo):
        model = self()
        return ModelRef(memo.get(id(model)) if model is not None else None)

    def __reduce__(self):
        return ModelRef, (self(),)

    @staticmethod
    def added(refs: Sequence[ModelRef], model: nn.Module) -> list[ModelRef]:
        """`refs` with `model` last, without dead references."""
        return [r for r in refs if r() is not None and r() is not model] + [ModelRef(model)]


def scope_of(layer: nn.Module, refs: Sequence[ModelRef]) -> list[nn.Module]:
    """The models among `refs` that still hold `layer`, or [layer] if none does."""
    models = [m for m in (r() for r in refs) if m is not None]
    models = [m for m in models if any(sub is layer for sub in m.modules())]
    return models or [layer]
