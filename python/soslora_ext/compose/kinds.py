"""PEFT's LoRA on convolutions, embeddings and attention modules, read as matrices.

PEFT stores a convolution's adapter as lora_A [r, in, *k] (a convolution with the base's
kernel) and lora_B [out, r, 1, ...] (a 1x1 convolution), an embedding's as lora_embedding_A
[r, num] and lora_embedding_B [dim, r]. Each is a low-rank matrix in a view of the base weight:

    conv       delta.reshape(out, in * prod(k)) = B.reshape(out, r) @ A.reshape(r, -1)
    embedding  delta.T (the [dim, num] view)     = B @ A

An nn.MultiheadAttention's adapter is two: its in_proj_weight's [3E, E] (the module "x") and
its out_proj's, which PEFT names "x.base_layer.out_proj" and applies twice (formats/peft.py,
PEFT_OUT_PROJ_FACTOR): read, that term counts twice, as PEFT applies it; written, it is halved.

So every factored measure and sum works on them unchanged. A ``Layout`` records the base
weight's kind and shape, which a matrix shape alone does not tell apart (a 3x3 convolution of
2 input channels and one of 18 channels with a 1x1 kernel have the same [out, 18] view).

``read_peft`` is read_peft_lora (formats/peft.py) that also returns each layer's layout;
``write_peft`` puts the matrix-view factors back in PEFT's layout for write_peft_lora.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ..formats import peft
from ..formats.checks import NESTED_OUT_PROJ
from ..formats.files import AdapterError
from ..formats.peft import PEFT_OUT_PROJ_FACTOR, write_peft_lora
from ..formats.peft_checks import PEFT_PREFIX
from ..layers.base import AdapterLinear

Tensor = torch.Tensor

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class Layout:
    """The base weight an adapter's matrix is a view of: "conv" ([out, in, *k]), "embedding"
    ([num, dim]) or "attention" (an nn.MultiheadAttention's in_proj_weight, [3E, E])."""

    kind: str
    weight_shape: tuple[int, ...]

    def describe(self) -> str:
        return f"{self.kind} weight {self.weight_shape}"


def read_peft(directory: str | os.PathLike
              ) -> tuple[dict, dict[str, tuple[Tensor, Tensor, float]], dict[str, Tensor],
                         dict[str, Layout]]:
    """(config, {module: (A, B, scaling)}, {"module.param": tensor saved whole}, {module:
    Layout}) of a PEFT LoRA directory: read_peft_lora's checks and factors (delta = scaling *
    B A in each layer's matrix view), with the layout of every convolution and embedding, which
    the flattened factors no longer tell."""
    config, plan, tensors, where = peft.read_peft_checked(directory)
    factors, layouts = {}, {}
    for name, (_, scaling) in plan.layers.items():
        A, B = (tensors[k] for k in plan.keys(name))
        if name in plan.embeddings:
            layouts[name] = Layout("embedding", (A.shape[1], B.shape[0]))
        elif A.dim() > 2:
            layouts[name] = Layout("conv", (B.shape[0], *A.shape[1:]))
        elif f"{name}{NESTED_OUT_PROJ}" in plan.layers:
            layouts[name] = Layout("attention", (B.shape[0], A.shape[1]))
        elif _nested_in(name, plan.layers):
            scaling = scaling * PEFT_OUT_PROJ_FACTOR
        A, B = matrix_factors(A, B)
        peft.check_scaling(where, name, B, scaling)
        factors[name] = (A, B, scaling)
    return config, factors, {p: tensors[PEFT_PREFIX + p] for p in plan.whole}, layouts


def write_peft(directory: str | os.PathLike, factors: dict[str, tuple[Tensor, Tensor]],
               whole: dict[str, Tensor], layouts: dict[str, Layout], fan_in_fan_out: bool,
               lock_timeout: float | None) -> Path:
    """Write matrix-view factors as a PEFT LoRA (write_peft_lora), a convolution's in PEFT's
    layout (A [r, in, *k], B [out, r, 1, ...]) and an embedding's as lora_embedding_A/B."""
    shaped = dict(factors)
    nested = frozenset(n for n in factors if _nested_in(n, layouts)
                       and layouts[n[:-len(NESTED_OUT_PROJ)]].kind == "attention")
    for name in nested:
        A, B = factors[name]
        shaped[name] = (A, B / PEFT_OUT_PROJ_FACTOR)
    for name, layout in layouts.items():
        if layout.kind == "conv":
            A, B = factors[name]
            out, inp, *k = layout.weight_shape
            shaped[name] = (A.reshape(A.shape[0], inp, *k),
                            B.reshape(out, B.shape[1], *[1] * len(k)))
    embeddings = frozenset(n for n, layout in layouts.items() if layout.kind == "embedding")
    return write_peft_lora(directory, shaped, whole, fan_in_fan_out=fan_in_fan_out,
                           lock_timeout=lock_timeout, embeddings=embeddings, nested=nested)


def _nested_in(name: str, layers) -> bool:
    """`name` is the out_proj adapter ("x.base_layer.out_proj") of an attention module "x"
    among `layers`."""
    return name.endswith(NESTED_OUT_PROJ) and name[:-len(NESTED_OUT_PROJ)] in layers


def module_path(model: nn.Module, name: str) -> str:
    """Where layer `name` is in `model`: an attention module's out_proj adapter
    ("x.base_layer.out_proj", PEFT's and an adapted model's name) is "x.out_proj" in a plain
    model."""
    if name.endswith(NESTED_OUT_PROJ):
        outer = name[:-len(NESTED_OUT_PROJ)]
        try:
            model.get_submodule(name)
        except AttributeError:
            return f"{outer}.out_proj"
    return name


def layout_of(base: nn.Module) -> Layout | None:
    """The layout of an adapter of `base`: None for a linear layer (nn.Linear, Conv1D)."""
    if isinstance(base, _CONVS):
        return Layout("conv", tuple(base.weight.shape))
    if isinstance(base, nn.Embedding):
        return Layout("embedding", tuple(base.weight.shape))
    if isinstance(base, nn.MultiheadAttention) and base.in_proj_weight is not None:
        return Layout("attention", tuple(base.in_proj_weight.shape))
    return None


def matrix_factors(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    """PEFT-shaped factors (a convolution's lora_A [r, in, *k], lora_B [out, r, 1, ...]) as
    those of the matrix view: A [r, in * prod(k)], B [out, r]."""
    return A.reshape(A.shape[0], -1), B.reshape(B.shape[0], B.shape[1])


def target_view(module: nn.Module, layout: Layout, where: str) -> tuple[Tensor, str]:
    """(the [out, in] view of the module's weight that a layer's matrix adds into, the name of
    that weight's parameter): a conv weight's [out, in * prod(k)] view, an embedding's
    transpose, an attention module's in_proj_weight. An adapted module's base is written. A
    module of another kind than the adapter's is refused, naming both."""
    base = module.base_layer if isinstance(module, AdapterLinear) else module
    kind = ("conv" if isinstance(base, _CONVS) else
            "embedding" if isinstance(base, nn.Embedding) else
            "attention" if isinstance(base, nn.MultiheadAttention) else None)
    if kind != layout.kind:
        raise AdapterError(f"{where}: the adapter is for a {layout.kind} layer, the model's is "
                           f"{type(base).__name__}")
    param = "in_proj_weight" if kind == "attention" else "weight"
    weight = getattr(base, param)
    if not isinstance(weight, Tensor) or tuple(weight.shape) != layout.weight_shape:
        got = tuple(weight.shape) if isinstance(weight, Tensor) else None
        raise AdapterError(f"{where}: the adapter is for a {layout.describe()}, the model's is "
                           f"{got}")
    if kind == "embedding":
        return weight.T, param
    if kind == "attention":
        return weight, param
    if base.groups != 1:
        raise AdapterError(f"{where}: {type(base).__name__} has groups={base.groups}; "
                           "PEFT's convolution LoRA (and this sum) needs groups=1")
    if not weight.is_contiguous():
        raise AdapterError(f"{where}: the {type(base).__name__} weight is not contiguous, so "
                           "it has no [out, in * prod(k)] view to add into")
    return weight.view(weight.shape[0], -1), param
