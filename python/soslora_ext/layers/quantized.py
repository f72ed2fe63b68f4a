"""Quantized frozen bases (QLoRA-style): bitsandbytes' 4-bit ``Linear4bit`` (nf4 or fp4, with
or without double quantization; ``LinearNF4``/``LinearFP4`` included) and 8-bit
``Linear8bitLt`` layers under an adapter. The one place that knows their storage: which layers
are quantized, their exact dequantization, their compute dtype, what one must satisfy to carry
an adapter, the dequantized merge that replaces an in-place merge, and the bytes a model's
weights take.

bitsandbytes is looked up in sys.modules only: a model holding its layers has imported it, and
importing this package never does.

What the layers compute (bitsandbytes 0.50 on the CPU): in training mode, or whenever a
gradient is needed, ``x @ dequantized_weight(base).T + bias``, exactly. Their inference paths
(eval() mode without grad) are approximations of that: a 4-bit layer on a CPU with AVX512-BF16
repacks its weight in place on the first such call (per-block scales rounded to bfloat16) and
computes in bfloat16; an 8-bit layer quantizes its input to int8 (LLM.int8()).
"""
from __future__ import annotations

import contextlib
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.dtypes import SUPPORTED_DTYPES
from . import merge_guard

Tensor = torch.Tensor

# The CPU inference layout's row tile (bitsandbytes' _convert_weight_packed_for_cpu): rows of
# each 32-row tile are interleaved, two 4-bit codes per byte.
_CPU_TILE_ROWS = 32


def _bnb_class(name: str):
    module = sys.modules.get("bitsandbytes.nn")
    return getattr(module, name, None) if module is not None else None


def is_4bit(module) -> bool:
    """A bitsandbytes Linear4bit (or LinearNF4 / LinearFP4)."""
    cls = _bnb_class("Linear4bit")
    return cls is not None and isinstance(module, cls)


def is_8bit(module) -> bool:
    """A bitsandbytes Linear8bitLt."""
    cls = _bnb_class("Linear8bitLt")
    return cls is not None and isinstance(module, cls)


def is_quantized_linear(module) -> bool:
    """A bitsandbytes Linear4bit or Linear8bitLt: the quantized layers an adapter can wrap."""
    return is_4bit(module) or is_8bit(module)


def unsupported_quantization(module) -> str | None:
    """Why `module`, a linear layer with quantized storage this package does not know, cannot
    carry an adapter (its weight could not be read or merged correctly); None otherwise."""
    cls = type(module)
    if cls.__module__.split(".")[0] == "bitsandbytes" and not is_quantized_linear(module):
        return (f"bitsandbytes {cls.__name__} is not a supported quantized base (supported: "
                "Linear4bit with nf4 or fp4, and Linear8bitLt)")
    weight_cls = type(getattr(module, "weight", None))
    if weight_cls.__module__.split(".")[0] == "torchao":
        return (f"the weight is a torchao {weight_cls.__name__} (a quantized tensor), which is "
                "not a supported quantized base; quantize with bitsandbytes (Linear4bit or "
                "Linear8bitLt, e.g. transformers' BitsAndBytesConfig)")
    return None


# ---- storage ---------------------------------------------------------------------------------
def _quant_state(base):
    """A 4-bit layer's QuantState (kept on the module too, where a wrapper lost the weight's)."""
    state = getattr(base.weight, "quant_state", None)
    return state if state is not None else getattr(base, "quant_state", None)


def _row_scales(base) -> Tensor | None:
    """An 8-bit layer's per-row absmax scales SCB [out] (on the weight before the first
    forward, on the layer's matmul state after)."""
    scales = getattr(base.weight, "SCB", None)
    return scales if scales is not None else getattr(base.state, "SCB", None)


def _packed_for_cpu(state) -> bool:
    return bool(getattr(state, "packing_format_for_cpu", False))


def is_packed_for_cpu(base) -> bool:
    """Whether a 4-bit layer's weight was repacked for bitsandbytes' CPU inference kernel (in
    place, by its first eval() forward without grad on an AVX512-BF16 CPU)."""
    return is_4bit(base) and _packed_for_cpu(_quant_state(base))


def exact_forward(base, x: Tensor) -> Tensor:
    """x @ dequantized_weight(base).T + bias in the compute dtype, returned in x's dtype (as
    bitsandbytes returns it): the layer's training-mode product, for a layer whose own forward
    cannot give it with a gradient (a repacked 4-bit weight: bitsandbytes then fails in the
    backward's setup). The layer's own forward hooks do not run."""
    dtype = compute_dtype(base)
    bias = None if base.bias is None else base.bias.to(dtype)
    return F.linear(x.to(dtype), dequantized_weight(base, dtype), bias).to(x.dtype)


def compute_dtype(base) -> torch.dtype:
    """The floating dtype the quantized layer computes in: a 4-bit layer's compute_dtype (else
    the dtype its weight had before quantization); for an 8-bit layer, which computes in its
    input's dtype, its bias's dtype, else float32 (that of its scales)."""
    if is_4bit(base):
        if base.compute_dtype is not None:
            return base.compute_dtype
        state = _quant_state(base)
        return getattr(state, "original_dtype", state.dtype) if _packed_for_cpu(state) \
            else state.dtype
    return base.bias.dtype if base.bias is not None else torch.float32


def describe(base) -> str:
    """One line for errors and metadata, e.g. "bitsandbytes Linear4bit (nf4, double-quantized,
    blocksize 64, compute torch.float32)"."""
    name = f"bitsandbytes {type(base).__name__}"
    if is_8bit(base):
        return (f"{name} (int8 with per-row scales, outlier threshold "
                f"{base.state.threshold:g})")
    state = _quant_state(base)
    if state is None:
        return f"{name} (not quantized yet)"
    packed = _packed_for_cpu(state)
    nested = getattr(state, "original_nested", state.nested) if packed else state.nested
    return (f"{name} ({state.quant_type}{', double-quantized' if nested else ''}, blocksize "
            f"{state.blocksize}, compute {compute_dtype(base)}"
            f"{', packed for CPU inference' if packed else ''})")


def check_quantized(base, owner: str) -> None:
    """Raise a clear error if the bitsandbytes layer `base` cannot carry an adapter: its weight
    not quantized yet (bitsandbytes quantizes when the layer is moved to its device), an 8-bit
    layer that keeps float weights, or quantization state off the weight's device."""
    name, weight = type(base).__name__, base.weight
    where = f"{owner}: the {name} base"
    not_yet = (f"{where} is not quantized yet (its weight is {weight.dtype} "
               f"{list(weight.shape)}); bitsandbytes quantizes it when the layer is moved to its "
               "device: call .to(device) (e.g. .to('cpu') or .cuda()) before adapting it")
    if is_8bit(base):
        if base.state.has_fp16_weights:
            raise TypeError(f"{where} has has_fp16_weights=True: it keeps float weights and "
                            "re-quantizes them at every forward, so it is not a frozen "
                            "quantized base; build it with has_fp16_weights=False (as "
                            "transformers' load_in_8bit does)")
        scales = _row_scales(base)
        if weight.dtype != torch.int8 or scales is None:
            raise ValueError(not_yet)
        expected, state_tensors = (base.out_features, base.in_features), {"SCB": scales}
    else:
        state = _quant_state(base)
        if state is None or not getattr(weight, "bnb_quantized", True):
            raise ValueError(not_yet)
        expected, state_tensors = tuple(state.shape), {"absmax": state.absmax,
                                                       "code": state.code}
        if state.nested:
            state_tensors["nested absmax"] = state.state2.absmax
    if expected != (base.out_features, base.in_features):
        raise ValueError(f"{where}: its quantized weight has shape {list(expected)}, but the "
                         f"layer is {base.in_features} -> {base.out_features}")
    if weight.device.type == "meta":
        raise ValueError(f"{where}: the quantized weight is on the meta device (no data); "
                         "load the model's weights first")
    for what, t in state_tensors.items():
        if t.device != weight.device:
            raise ValueError(f"{where}: the quantization state ({what}) is on {t.device} but "
                             f"the weight is on {weight.device}; move the whole layer with "
                             ".to(device)")


@contextlib.contextmanager
def exact_path(model: nn.Module):
    """Within the block, the bitsandbytes layers in `model` compute on their exact path (their
    training-mode forward: x @ dequantized_weight.T + bias, what training computed) even when
    the model is in eval() mode, as for evaluation: their inference paths approximate it, and
    on AVX512-BF16 CPUs a 4-bit layer repacks its weight for good on the first call (which
    also needs in_features a multiple of the blocksize and out_features one of 32); a layer
    repacked already stays on that path. The rest of the model keeps its mode (no dropout in
    eval())."""
    def exact(module, args):
        module.training = True

    bases = [m for m in model.modules() if is_quantized_linear(m)]
    handles = [m.register_forward_pre_hook(exact) for m in bases]
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()
        for m in bases:
            m.training = model.training


# ---- dequantization --------------------------------------------------------------------------
def _dequantize_cpu_packed(packed: Tensor, state) -> Tensor:
    """A 4-bit weight in bitsandbytes' CPU inference layout -> [out, in] float32: its codes'
    values times the per-block scales (bfloat16 in that layout)."""
    out_features, in_features = state.shape
    byte = packed.reshape(-1, _CPU_TILE_ROWS)
    # Each row of 32 bytes holds 64 codes: the 32 low nibbles first, then the 32 high ones.
    codes = torch.cat([byte & 0xF, byte >> 4], dim=1)
    codes = codes.reshape(out_features // _CPU_TILE_ROWS, in_features // 2, _CPU_TILE_ROWS, 2)
    codes = codes.transpose(1, 2).reshape(out_features, in_features).long()
    scales = state.absmax.t().float().repeat_interleave(state.blocksize, dim=1)  # [out, in]
    return state.code.float()[codes] * scales


@torch.no_grad()
def dequantized_weight(base, dtype: torch.dtype | None = None) -> Tensor:
    """The quantized layer's weight as an [out, in] tensor of `dtype` (default: its compute
    dtype): exactly the matrix the layer multiplies by in training mode (x W^T + bias)."""
    dtype = dtype or compute_dtype(base)
    if is_8bit(base):
        # As bitsandbytes' training matmul: int8 codes times the row scale / 127, in `dtype`.
        return base.weight.data.to(dtype).mul_(_row_scales(base).unsqueeze(1).mul(1.0 / 127.0))
    state = _quant_state(base)
    if _packed_for_cpu(state):
        return _dequantize_cpu_packed(base.weight.data.view(torch.uint8), state).to(dtype)
    from bitsandbytes.functional import dequantize_4bit  # imported: the layer is its own

    return dequantize_4bit(base.weight.data, state).to(dtype)


def merge_refusal(base, where: str) -> str:
    """The error for an in-place merge into a quantized base."""
    return (f"{where}: the base is a quantized {describe(base)}; it cannot hold W + delta "
            "exactly (re-quantizing would round the update away), so nothing is merged into "
            "it. Keep the adapter unmerged (it runs on the quantized base), or call "
            "merge_and_unload(dequantize=True) for a plain nn.Linear holding the dequantized "
            "W + delta")


@torch.no_grad()
def dequantized_linear(base, dtype: torch.dtype | None = None,
                       where: str = "dequantized_linear") -> nn.Linear:
    """A new frozen nn.Linear of `dtype` (default: the base's compute dtype) holding the
    quantized layer's dequantized [out, in] weight and its bias: what `base` computes in
    training mode. `base` is left unchanged."""
    dtype = dtype or compute_dtype(base)
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{where}: dtype must be one of {[str(d) for d in SUPPORTED_DTYPES]}, "
                         f"got {dtype!r}")
    weight = dequantized_weight(base, dtype)
    linear = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                       device=weight.device, dtype=dtype)
    linear.weight.copy_(weight)
    if base.bias is not None:
        linear.bias.copy_(base.bias)
    return linear.requires_grad_(False)


@torch.no_grad()
def merged_linear(layer, dtype: torch.dtype | None, where: str) -> nn.Linear:
    """A new frozen nn.Linear of `dtype` (default: the base's compute dtype) holding the
    dequantized base weight plus the adapter's update (float32 accumulation, one rounding),
    and the base's bias. `layer` (an adapted layer over a quantized base) is left unchanged.
    Refused, as merge(), if the update is not finite or the sum overflows `dtype`."""
    linear = dequantized_linear(layer.base_layer, dtype, where)
    A, B, scale = (t.detach() for t in layer._update_factors())
    target = merge_guard.Target("", linear.weight, [merge_guard.Term(A, B, scale)])
    merge_guard.merge_([target], where)
    return linear.requires_grad_(False)


# ---- memory ----------------------------------------------------------------------------------
def storage_bytes(module: nn.Module) -> int:
    """Bytes holding `module`'s weights: every parameter and buffer, plus the quantization
    state bitsandbytes keeps beside them (a 4-bit layer's per-block scales and code book, and
    their own scales when double-quantized; an 8-bit layer's row scales). Storage shared by
    several tensors (tied weights) is counted once."""
    tensors = [*module.parameters(), *module.buffers()]
    for m in module.modules():
        if is_4bit(m) and _quant_state(m) is not None:
            state = _quant_state(m)
            tensors += [state.absmax, state.code]
            if state.nested:
                tensors += [state.state2.absmax, state.state2.code, state.offset]
        elif is_8bit(m) and _row_scales(m) is not None:
            tensors.append(_row_scales(m))
    storages = {}
    for t in tensors:
        if isinstance(t, Tensor):
            storage = t.untyped_storage()
            storages[(t.device, storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())
