"""PEFT's LoRA on convolutions and embeddings, read as matrices.

PEFT stores a convolution's adapter as lora_A [r, in, *k] (a convolution with the base's
kernel) and lora_B [out, r, 1, ...] (a 1x1 convolution), an embedding's as lora_embedding_A
[r, num] and lora_embedding_B [dim, r]. Each is a low-rank matrix in a view of the base weight:

    conv       delta.reshape(out, in * prod(k)) = B.reshape(out, r) @ A.reshape(r, -1)
    embedding  delta.T (the [dim, num] view)     = B @ A

so every factored measure and sum works on them unchanged. A ``Layout`` records the base
weight's kind and shape, which a matrix shape alone does not tell apart (a 3x3 convolution of
2 input channels and one of 18 channels with a 1x1 kernel have the same [out, 18] view).

``read_peft`` is read_peft_lora (formats/peft.py) with these kinds mapped to and from the
linear form, so PEFT's own checks (ranks, patterns, scaling) apply to them unchanged.
"""
from __future__ import annotations

import hashlib
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ..formats import checks as check
from ..formats import peft_checks
from ..formats.files import CONFIG_NAME, CONFIG_SHA256_KEY, AdapterError, read_pair, save_pair
from ..formats.peft import write_peft_lora
from ..formats.peft_checks import PEFT_PREFIX

Tensor = torch.Tensor

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class Layout:
    """The base weight an adapter's matrix is a view of: "conv" ([out, in, *k]) or
    "embedding" ([num, dim])."""

    kind: str
    weight_shape: tuple[int, ...]

    def describe(self) -> str:
        return f"{self.kind} weight {self.weight_shape}"


def _linear_keys(name: str) -> tuple[str, str]:
    return f"{PEFT_PREFIX}{name}.lora_A.weight", f"{PEFT_PREFIX}{name}.lora_B.weight"


def _embedding_keys(name: str) -> tuple[str, str]:
    return f"{PEFT_PREFIX}{name}.lora_embedding_A", f"{PEFT_PREFIX}{name}.lora_embedding_B"


def _as_linear(header: dict, where: str) -> tuple[dict, dict[str, Layout]]:
    """PEFT's header ({key: (dtype, shape)}) with conv and embedding pairs renamed and reshaped
    to the linear form, and the layout of each such layer. Anything else is left as it is,
    for check_peft_header to judge."""
    out, layouts = {}, {}
    for key, (dtype, shape) in header.items():
        shape = tuple(shape)
        if key.endswith(".lora_embedding_A") or key.endswith(".lora_embedding_B"):
            name = key[len(PEFT_PREFIX):].rpartition(".")[0]
            A_key, B_key = _embedding_keys(name)
            A, B = header.get(A_key), header.get(B_key)
            if A is None or B is None or len(A[1]) != 2 or len(B[1]) != 2:
                check.fail(where, f"layer {name!r}: lora_embedding_A {A} and lora_embedding_B "
                                  f"{B} are not an embedding LoRA pair ([r, num], [dim, r])")
            new = _linear_keys(name)[0 if key == A_key else 1]
            layouts[name] = Layout("embedding", (A[1][1], B[1][0]))
            out[new] = (dtype, shape)
        elif key.endswith(".lora_A.weight") and len(shape) > 2:
            name = key[len(PEFT_PREFIX):-len(".lora_A.weight")]
            B = header.get(_linear_keys(name)[1])
            if (B is None or len(B[1]) != len(shape) or any(n != 1 for n in B[1][2:])
                    or len(shape) > 5):
                check.fail(where, f"layer {name!r}: lora_A {dtype} {shape} and lora_B "
                                  f"{None if B is None else (B[0], tuple(B[1]))} are not a "
                                  "convolution LoRA pair ([r, in, *k], [out, r, 1, ...], "
                                  "1 to 3 kernel dimensions)")
            layouts[name] = Layout("conv", (B[1][0], shape[1], *shape[2:]))
            out[key] = (dtype, (shape[0], math.prod(shape[1:])))
        elif (key.endswith(".lora_B.weight") and len(shape) > 2
              and len(header.get(key[:-len(".lora_B.weight")] + ".lora_A.weight",
                                 (None, ()))[1]) == len(shape)):
            out[key] = (dtype, shape[:2])  # its pair's lora_A checks the trailing ones
        else:
            out[key] = (dtype, shape)
    return out, layouts


def read_peft(directory: str | os.PathLike
              ) -> tuple[dict, dict[str, tuple[Tensor, Tensor, float]], dict[str, Tensor],
                         dict[str, Layout]]:
    """(config, {module: (A, B, scaling)}, {"module.param": tensor saved whole}, {module:
    Layout}) of a PEFT LoRA directory whose layers may be linear, convolutions or embeddings:
    delta = scaling * B A in each layer's matrix view (module docstring)."""
    where = repr(str(directory))

    def validate(config):
        peft_checks.check_peft_config(config, where)
        return lambda header: peft_checks.check_peft_header(
            config, _as_linear(header, where)[0], where)

    config, tensors = read_pair(directory, validate)
    header, layouts = _as_linear(check.header_of(tensors), where)
    plan = peft_checks.check_peft_header(config, header, where)
    check.check_finite(tensors, where)
    factors = {}
    for name, (_, scaling) in plan.layers.items():
        keys = _embedding_keys(name) if name in layouts and layouts[name].kind == "embedding" \
            else _linear_keys(name)
        A, B = matrix_factors(*(tensors[k] for k in keys))
        # A huge lora_alpha (or alpha_pattern entry) overflows delta = scaling * B A.
        acc = torch.float64 if B.dtype == torch.float64 else torch.float32
        if not torch.isfinite(B.to(acc) * scaling).all():
            check.fail(where, f"layer {name!r}: lora_B times the scaling {scaling:g} (lora_alpha "
                              f"/ r) overflows {acc}")
        factors[name] = (A, B, scaling)
    return config, factors, {p: tensors[PEFT_PREFIX + p] for p in plan.whole}, layouts


def write_peft(directory: str | os.PathLike, factors: dict[str, tuple[Tensor, Tensor]],
               whole: dict[str, Tensor], layouts: dict[str, Layout], fan_in_fan_out: bool,
               lock_timeout: float | None) -> Path:
    """Write matrix-view factors as a PEFT LoRA, conv and embedding layers in PEFT's own
    layout. write_peft_lora builds and checks the config from the linear form (in a scratch
    directory); the same config is then saved with the tensors in their kinds' layout."""
    if not layouts:
        return write_peft_lora(directory, factors, whole, fan_in_fan_out=fan_in_fan_out,
                               lock_timeout=lock_timeout)
    from safetensors.torch import load_file, save

    with tempfile.TemporaryDirectory() as scratch:
        write_peft_lora(scratch, factors, whole, fan_in_fan_out=fan_in_fan_out,
                        lock_timeout=lock_timeout)
        config_bytes = (Path(scratch) / CONFIG_NAME).read_bytes()
        tensors = load_file(str(next(Path(scratch).glob("*.safetensors"))))
    for name, layout in layouts.items():
        A_key, B_key = _linear_keys(name)
        A, B = tensors.pop(A_key), tensors.pop(B_key)
        if layout.kind == "embedding":
            A_key, B_key = _embedding_keys(name)
        else:
            out, inp, *k = layout.weight_shape
            A = A.reshape(A.shape[0], inp, *k)
            B = B.reshape(out, B.shape[1], *[1] * len(k))
        tensors[A_key], tensors[B_key] = A.contiguous(), B.contiguous()
    metadata = {"format": "pt", CONFIG_SHA256_KEY: hashlib.sha256(config_bytes).hexdigest()}
    return save_pair(Path(directory), config_bytes, save(tensors, metadata=metadata),
                     lock_timeout, f"write_peft({str(directory)!r})")


def layout_of(base: nn.Module) -> Layout | None:
    """The layout of an adapter of `base`: None for a linear layer (nn.Linear, Conv1D)."""
    if isinstance(base, _CONVS):
        return Layout("conv", tuple(base.weight.shape))
    if isinstance(base, nn.Embedding):
        return Layout("embedding", tuple(base.weight.shape))
    return None


def matrix_factors(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    """PEFT-shaped factors (a convolution's lora_A [r, in, *k], lora_B [out, r, 1, ...]) as
    those of the matrix view: A [r, in * prod(k)], B [out, r]."""
    return A.reshape(A.shape[0], -1), B.reshape(B.shape[0], B.shape[1])


def target_view(module: nn.Module, layout: Layout, where: str) -> Tensor:
    """The [out, in] view of the module's weight that a layer's matrix adds into: a conv
    weight's [out, in * prod(k)] view, an embedding's transpose. A module of another kind
    than the adapter's is refused, naming both."""
    weight = getattr(module, "weight", None)
    kind = ("conv" if isinstance(module, _CONVS) else
            "embedding" if isinstance(module, nn.Embedding) else None)
    if kind != layout.kind or not isinstance(weight, Tensor):
        raise AdapterError(f"{where}: the adapter is for a {layout.kind} layer, the model's is "
                           f"{type(module).__name__}")
    if tuple(weight.shape) != layout.weight_shape:
        raise AdapterError(f"{where}: the adapter is for a {layout.describe()}, the model's is "
                           f"{tuple(weight.shape)}")
    if kind == "embedding":
        return weight.T
    if module.groups != 1:
        raise AdapterError(f"{where}: {type(module).__name__} has groups={module.groups}; "
                           "PEFT's convolution LoRA (and this sum) needs groups=1")
    if not weight.is_contiguous():
        raise AdapterError(f"{where}: the {type(module).__name__} weight is not contiguous, so "
                           "it has no [out, in * prod(k)] view to add into")
    return weight.view(weight.shape[0], -1)
