"""What a base layer is to an adapter: the linear layers (nn.Linear, transformers' Conv1D,
bitsandbytes' quantized Linears) and the other kinds (kinds.py), their [out, in] matrix view,
features, dtype and the checks that a base can be adapted."""
from __future__ import annotations

import sys

import torch
import torch.nn as nn

from ..ops.dtypes import SUPPORTED_DTYPES
from . import kinds, quantized

Tensor = torch.Tensor


def is_conv1d(module) -> bool:
    """Whether `module` is transformers' Conv1D (GPT-2, GPT, ...): a linear layer whose weight is
    stored [in, out] (PEFT's fan_in_fan_out). transformers is only looked up if already
    imported: a model made of Conv1D layers has imported it."""
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")
    return pytorch_utils is not None and isinstance(module, pytorch_utils.Conv1D)


def is_linear(module) -> bool:
    """An nn.Linear (bitsandbytes' Linear4bit and Linear8bitLt are ones) or a Conv1D: the
    layers an adapter can wrap."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def is_adaptable(module) -> bool:
    """A linear layer (is_linear) or one of the other kinds an adapter can wrap (kinds.py)."""
    return is_linear(module) or kinds.kind_of(module) is not None


def base_features(base: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of the update's [out, in] matrix: an nn.Linear's, a
    Conv1D's (weight [in, out]), or another kind's matrix view (kinds.py)."""
    kind = kinds.kind_of(base)
    if kind is not None:
        return kind.features(base)
    if is_conv1d(base):
        return tuple(base.weight.shape)
    return base.in_features, base.out_features


def partition_shape(base: nn.Module) -> tuple[int, int, int]:
    """(rows, columns, taps) CPS-LoRA clusters: a convolution's columns are its input
    channels, each with its `taps` kernel taps kept whole (taps = 1 for other kinds)."""
    in_features, out_features = base_features(base)
    kind = kinds.kind_of(base)
    taps = kind.taps(base) if kind else 1
    return out_features, in_features // taps, taps


def weight_matrix(base: nn.Module) -> Tensor:
    """The base weight as an [out, in] matrix: a transposed view for a Conv1D (another kind's
    matrix view: kinds.py), so writes into it (merging) change the weight itself."""
    kind = kinds.kind_of(base)
    if kind is not None:
        return kind.matrix(base)
    return base.weight.t() if is_conv1d(base) else base.weight


def base_weight(base: nn.Module) -> Tensor:
    """The base parameter an update is merged into (in_proj_weight for an attention module)."""
    kind = kinds.kind_of(base)
    return base.weight if kind is None else kind.weight(base)


def base_dtype(base: nn.Module) -> torch.dtype:
    """The floating dtype the base computes in: its weight's, or a quantized base's compute
    dtype (its weight holds uint8/int8 codes)."""
    return quantized.compute_dtype(base) if quantized.is_quantized_linear(base) \
        else base_weight(base).dtype


def check_base(base, owner: str) -> None:
    """Raise a clear error if `base` cannot carry an adapter: an nn.Linear (or a transformers
    Conv1D), nn.Embedding, nn.Conv1d/2d/3d or nn.MultiheadAttention that kinds.py accepts,
    with a weight of a supported floating dtype and positive in/out features, or a quantized
    bitsandbytes Linear that quantized.check_quantized accepts."""
    kind = kinds.kind_of(base)
    if not is_linear(base) and kind is None:
        raise TypeError(f"{owner}: base must be an nn.Linear (or a transformers Conv1D), "
                        "nn.Embedding, nn.Conv1d/2d/3d or nn.MultiheadAttention, got "
                        f"{type(base).__name__}")
    if kind is not None:
        kind.check(base, owner)
    if quantized.is_quantized_linear(base):
        quantized.check_quantized(base, owner)
        return
    reason = quantized.unsupported_quantization(base)
    if reason is not None:
        raise TypeError(f"{owner}: {reason}")
    weight = base_weight(base)
    if not isinstance(weight, Tensor) or weight.dtype not in SUPPORTED_DTYPES:
        dtype = getattr(weight, "dtype", type(weight).__name__)
        raise TypeError(f"{owner}: the base weight is {dtype}; expected one of "
                        f"{[str(d) for d in SUPPORTED_DTYPES]} (a quantized or integer Linear "
                        "cannot be adapted)")
    in_features, out_features = base_features(base)
    if in_features <= 0 or out_features <= 0 or (kind is None and weight.dim() != 2):
        raise ValueError(f"{owner}: in_features and out_features must be positive, got "
                         f"{in_features} -> {out_features}")
