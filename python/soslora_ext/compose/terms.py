"""An adapter as low-rank terms: ``Adapter`` maps module names to sums of terms,
delta_W = sum_t scale_t B_t A_t (a PEFT LoRA is one term per module; an SOS or CPS adapter is one
term with its scales folded into B), read from a saved directory or a model. Convolution and
embedding adapters are terms of a matrix view of their weight (kinds.py).
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn

from ..formats.checks import other_names
from ..formats.lock import DEFAULT_LOCK_TIMEOUT
from ..formats.native import (
    AdapterError,
    folded_factors,
    is_own_format,
    read_adapter,
)
from ..formats.peft import check_one_name_each
from .kinds import Layout, layout_of, matrix_factors, read_peft, write_peft

Tensor = torch.Tensor


@dataclass(frozen=True)
class LowRankTerm:
    """scale * B @ A, with A [r, in] and B [out, r]."""

    A: Tensor
    B: Tensor
    scale: float = 1.0

    @property
    def shape(self) -> tuple[int, int]:
        return self.B.shape[0], self.A.shape[1]


@dataclass
class Adapter(Mapping):
    """Module name -> list of LowRankTerm. `fan_in_fan_out` marks adapters of layers whose
    weight is stored [in, out] (GPT-2's Conv1D); `whole` holds modules saved whole; `aliases`
    the other names of modules registered under several ({name: [other names]}); `layouts`
    the convolution and embedding layers, whose terms are of a view of their weight."""

    layers: dict[str, list[LowRankTerm]]
    name: str = ""
    fan_in_fan_out: bool = False
    whole: dict[str, Tensor] = field(default_factory=dict)
    aliases: dict[str, list[str]] = field(default_factory=dict)
    layouts: dict[str, Layout] = field(default_factory=dict)

    def __getitem__(self, key: str) -> list[LowRankTerm]:
        return self.layers[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def shape(self, layer: str) -> tuple[int, int]:
        """(out, in) of the layer's delta (of its matrix view for a convolution or embedding:
        out x in * prod(kernel), dim x num)."""
        return self.layers[layer][0].shape

    def rank(self, layer: str) -> int:
        return sum(t.A.shape[0] for t in self.layers[layer])

    def factors(self, layer: str, dtype=torch.float32) -> tuple[Tensor, Tensor]:
        """(A_cat, B_cat) with delta = B_cat A_cat: the terms concatenated, scales in B."""
        terms = self.layers[layer]
        A = torch.cat([t.A.to(dtype) for t in terms], dim=0)
        B = torch.cat([t.B.to(dtype) * t.scale for t in terms], dim=1)
        return A, B

    def delta(self, layer: str, dtype=torch.float64) -> Tensor:
        """The dense [out, in] delta (for inspection and tests; the rest never builds it)."""
        A, B = self.factors(layer, dtype)
        return B @ A

    def overflowing(self, dtype=torch.float32) -> list[str]:
        """The layers whose terms are finite but whose factors (scales in B) are not in
        `dtype`: their scales are too large."""
        def finite(t):
            return bool(torch.isfinite(t.float() if t.element_size() == 1 else t).all())

        return [n for n, terms in self.layers.items()
                if all(finite(t.A) and finite(t.B) for t in terms)
                and not all(finite(f) for f in self.factors(n, dtype))]

    def check_writable(self, where: str) -> None:
        """What PEFT's format cannot hold is refused: a module under several names, factors
        that overflow float32 (terms scaled by too large a weight)."""
        check_one_name_each(self.aliases, {}, where)
        bad = self.overflowing()
        if bad:
            scales = sorted({t.scale for t in self.layers[bad[0]]})
            raise AdapterError(f"{where}: layer {bad[0]!r}: its terms' scales {scales} times "
                               "their factors overflow float32: the scales (the weights of a "
                               "sum) are too large; give smaller weights; nothing was written")

    def save_peft(self, directory: str | os.PathLike, *,
                  lock_timeout: float | None = DEFAULT_LOCK_TIMEOUT) -> Path:
        """Write as one PEFT LoRA (rank = sum of the terms' ranks per layer)."""
        self.check_writable(f"save_peft({str(directory)!r})")
        return write_peft(directory, {n: self.factors(n) for n in self.layers}, self.whole,
                          self.layouts, self.fan_in_fan_out, lock_timeout)


def _layouts(layers: dict) -> dict[str, Layout]:
    """The layouts of the adapted convolutions and embeddings among `layers`."""
    return {n: layout for n, layer in layers.items()
            if (layout := layout_of(layer.base_layer)) is not None}


def load(directory: str | os.PathLike, name: str | None = None) -> Adapter:
    """An adapter directory: PEFT LoRA (lora_alpha, rank_pattern/alpha_pattern, rsLoRA) or
    soslora_ext's own format (its modules saved whole included), checked as load_adapter and
    import_peft check them."""
    directory = Path(directory)
    name = name or directory.name
    if is_own_format(directory):
        config, layers, whole = read_adapter(directory)
        terms = {n: [LowRankTerm(*matrix_factors(*folded_factors(layer)))]
                 for n, layer in layers.items()}
        return Adapter(terms, name=name, whole=whole, aliases=config.get("aliases") or {},
                       layouts=_layouts(layers))
    config, factors, whole, layouts = read_peft(directory)
    terms = {n: [LowRankTerm(A, B, scaling)] for n, (A, B, scaling) in factors.items()}
    return Adapter(terms, name=name, fan_in_fan_out=bool(config.get("fan_in_fan_out")),
                   whole=whole, layouts=layouts)


def from_model(model: nn.Module, name: str = "model") -> Adapter:
    """The adapters (SOS and CPS layers) of a model, as an Adapter."""
    from ..layers.model import adapter_layers

    layers = dict(adapter_layers(model))
    terms = {n: [LowRankTerm(*matrix_factors(*folded_factors(layer)))]
             for n, layer in layers.items()}
    if not terms:
        raise AdapterError("from_model: the model has no adapted (SOSLinear/CPSLinear) layers")
    return Adapter(terms, name=name,
                   fan_in_fan_out=any(layer.fan_in_fan_out for layer in layers.values()),
                   aliases=other_names(model, layers), layouts=_layouts(layers))
