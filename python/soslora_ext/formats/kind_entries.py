"""What our format records of a base that is not a linear layer (an nn.Embedding,
nn.Conv1d/2d/3d or nn.MultiheadAttention: layers/kinds.py): its kind and a convolution's
kernel size, checked on the way in, and a weightless base of that kind for read_adapter."""
from __future__ import annotations

import math

import torch.nn as nn

from ..layers import kinds
from ..layers.base import AdapterLinear
from ..layers.config import is_int

KIND_NAMES = ("Embedding", "Conv1d", "Conv2d", "Conv3d", "MultiheadAttention")


def kind_entry(layer: AdapterLinear) -> dict:
    """What a saved layer's entry records of a base that is not a linear layer: its kind, and
    a convolution's kernel size (the matrix view's columns are channels times taps)."""
    kind = layer._kind
    if kind is None:
        return {}
    entry = {"base_kind": kind.name}
    if isinstance(kind, kinds.ConvKind):
        entry["kernel_size"] = list(layer.base_layer.kernel_size)
    return entry


def check_kind_entry(entry: dict) -> tuple[str | None, tuple | None]:
    """(kind name or None for a linear layer, kernel size or None) of a layer entry; raises
    ValueError on a bad one."""
    kind, kernel = entry.get("base_kind"), entry.get("kernel_size")
    if kind is not None and kind not in KIND_NAMES:
        raise ValueError(f"base_kind must be one of {list(KIND_NAMES)}, got {kind!r}")
    dims = int(kind[-2]) if kind and kind.startswith("Conv") else 0
    if dims and not (isinstance(kernel, list) and len(kernel) == dims
                     and all(is_int(k) and k > 0 for k in kernel)):
        raise ValueError(f"a {kind} needs kernel_size, a list of {dims} positive ints, got "
                         f"{kernel!r}")
    if not dims and kernel is not None:
        raise ValueError(f"kernel_size is for convolutions, got {kernel!r} for a "
                         f"{kind or 'linear layer'}")
    in_features = entry.get("in_features")
    taps = math.prod(kernel) if dims else 1
    if dims and is_int(in_features) and in_features % taps:
        raise ValueError(f"in_features={in_features} is not a multiple of the kernel's "
                         f"{taps} taps")
    return kind, tuple(kernel) if dims else None


def meta_base(kind: str | None, kernel: tuple | None, in_features: int,
              out_features: int) -> nn.Module:
    """A weightless base of the kind and matrix shape of a saved layer (read_adapter)."""
    meta = dict(device="meta")
    if kind == "Embedding":
        return nn.Embedding(in_features, out_features, **meta)
    if kind == "MultiheadAttention":
        return nn.MultiheadAttention(in_features, 1, **meta)
    if kind is not None:
        cls = getattr(nn, kind)
        return cls(in_features // math.prod(kernel), out_features, kernel, **meta)
    return nn.Linear(in_features, out_features, **meta)
