"""Adapter composition by naive summation (the interference measures are in interference.py
and importable from here).

An ``Adapter`` maps module names to sums of low-rank terms, delta_W = sum_t scale_t B_t A_t
(a PEFT LoRA is one term per module; an SOS adapter is one term with its scales folded into B).
Everything here works on the factors and never builds an [out, in] matrix:

    <B1 A1, B2 A2>_F = sum((B1^T B2) * (A1 A2^T))        inner products, norms, cosines
    sum_i delta_W_i  = [B_1 | B_2 | ...] [A_1; A_2; ...]   an exact sum is a concatenation
"""
from __future__ import annotations

import itertools
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn as nn

from .interference import (check_same_base, cosine, effective_rank, format_report,  # noqa: F401
                           plot_report, report, require_matplotlib, rms_cosine,
                           singular_values)
from .adapter import is_conv1d, weight_matrix
from .merging import Target, Term, merge_
from .serialization import (AdapterError, folded_factors, is_own_format, read_adapter,
                            read_peft_lora, write_peft_lora)

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
    weight is stored [in, out] (GPT-2's Conv1D); `whole` holds modules saved whole."""

    layers: dict[str, list[LowRankTerm]]
    name: str = ""
    fan_in_fan_out: bool = False
    whole: dict[str, Tensor] = field(default_factory=dict)

    def __getitem__(self, key: str) -> list[LowRankTerm]:
        return self.layers[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def shape(self, layer: str) -> tuple[int, int]:
        """(out, in) of the layer's delta."""
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

    def save_peft(self, directory: str | os.PathLike) -> Path:
        """Write as one PEFT LoRA (rank = sum of the terms' ranks per layer)."""
        return write_peft_lora(directory, {n: self.factors(n) for n in self.layers}, self.whole,
                               fan_in_fan_out=self.fan_in_fan_out)


# ---- loading ---------------------------------------------------------------------------------
def load(directory: str | os.PathLike, name: str | None = None) -> Adapter:
    """An adapter directory: PEFT LoRA (lora_alpha, rank_pattern/alpha_pattern, rsLoRA) or
    soslora_ext's own format (its modules saved whole included), checked as load_adapter and
    import_peft check them."""
    directory = Path(directory)
    name = name or directory.name
    if is_own_format(directory):
        config, layers, whole = read_adapter(directory)
        terms = {n: [LowRankTerm(*folded_factors(layer))] for n, layer in layers.items()}
        return Adapter(terms, name=name, whole=whole)
    config, factors, whole = read_peft_lora(directory)
    terms = {n: [LowRankTerm(A, B, scaling)] for n, (A, B, scaling) in factors.items()}
    return Adapter(terms, name=name, fan_in_fan_out=bool(config.get("fan_in_fan_out")),
                   whole=whole)


def from_model(model: nn.Module, name: str = "model") -> Adapter:
    """The adapters (SOS and CPS layers) of a model, as an Adapter."""
    from .model import adapter_layers

    layers = dict(adapter_layers(model))
    terms = {n: [LowRankTerm(*folded_factors(layer))] for n, layer in layers.items()}
    if not terms:
        raise AdapterError("from_model: the model has no adapted (SOSLinear/CPSLinear) layers")
    return Adapter(terms, name=name,
                   fan_in_fan_out=any(layer.fan_in_fan_out for layer in layers.values()))


# ---- sums ------------------------------------------------------------------------------------
def _weights(adapters: Sequence[Adapter], weights) -> list[float]:
    if weights is None:
        return [1.0] * len(adapters)
    weights = [float(w) for w in weights]
    if len(weights) != len(adapters) or not all(math.isfinite(w) for w in weights):
        raise AdapterError(f"weights must be {len(adapters)} finite numbers, got {weights}")
    return weights


def _check_compatible(adapters: Sequence[Adapter]) -> None:
    for a, b in itertools.combinations(adapters, 2):
        for layer in sorted(a.keys() & b.keys()):
            check_same_base(a, b, layer)


def concat(adapters: Sequence[Adapter], weights: Sequence[float] | None = None) -> Adapter:
    """The exact (weighted) sum as one adapter: per layer the terms of all adapters, rank
    sum r_i. Modules saved whole are taken from the last adapter that has them."""
    if not adapters:
        raise AdapterError("concat: give at least one adapter")
    weights = _weights(adapters, weights)
    _check_compatible(adapters)
    layers: dict[str, list[LowRankTerm]] = {}
    whole: dict[str, Tensor] = {}
    for adapter, w in zip(adapters, weights):
        for layer, terms in adapter.items():
            layers.setdefault(layer, []).extend(
                LowRankTerm(t.A, t.B, t.scale * w) for t in terms)
        whole.update(adapter.whole)
    return Adapter(layers, name="+".join(a.name for a in adapters),
                   fan_in_fan_out=adapters[0].fan_in_fan_out, whole=whole)


def sum_into(model: nn.Module, adapters: Sequence[Adapter],
             weights: Sequence[float] | None = None) -> nn.Module:
    """W += sum_i w_i delta_W_i in place, for every adapted module of `model`, through the merge
    op (float32 accumulation, one rounding per term, no [out, in] temporary). Everything is
    checked before the first weight changes, including non-finite factors and a sum beyond the
    weight dtype's range: on any error every weight is bit-identical."""
    weights = _weights(adapters, weights)
    _check_compatible(adapters)
    plans = []
    for adapter, w in zip(adapters, weights):
        for layer, terms in adapter.items():
            try:
                module = model.get_submodule(layer)
            except AttributeError:
                raise AdapterError(f"layer {layer!r} of adapter {adapter.name!r}: no such module "
                                   f"in {type(model).__name__}") from None
            weight = getattr(module, "weight", None)
            if not isinstance(weight, Tensor) or weight.dim() != 2:
                raise AdapterError(f"layer {layer!r}: {type(module).__name__} has no 2-D weight")
            # As in PEFT, the layer's type decides the layout (a Conv1D stores [in, out]), not
            # the adapter's fan_in_fan_out flag, which a model of both kinds cannot honour.
            target = weight_matrix(module) if is_conv1d(module) else weight
            if tuple(target.shape) != adapter.shape(layer):
                raise AdapterError(f"layer {layer!r}: adapter {adapter.name!r} is for a "
                                   f"{adapter.shape(layer)} weight, the model's is "
                                   f"{tuple(target.shape)}")
            for t in terms:  # the op takes the scale in float32 (the guard refuses NaN/Inf)
                if (math.isfinite(t.scale)
                        and not abs(t.scale * w) <= torch.finfo(torch.float32).max):
                    raise AdapterError(f"layer {layer!r}: adapter {adapter.name!r}'s scale "
                                       f"{t.scale} times its weight {w} is not a finite float32 "
                                       "number; give smaller weights")
            plans.append(((layer, weight, target), terms, w))
    merged_weights = {id(weight) for (_, weight, _), _, _ in plans}
    for adapter in adapters:
        for path, tensor in adapter.whole.items():
            module_name, _, param = path.rpartition(".")
            try:
                current = getattr(model.get_submodule(module_name), param)
            except AttributeError:
                current = None
            if (not isinstance(current, Tensor) or not isinstance(tensor, Tensor)
                    or current.shape != tensor.shape
                    or not torch.can_cast(tensor.dtype, current.dtype)):
                expected = (f"{current.dtype} {tuple(current.shape)}"
                            if isinstance(current, Tensor) else "no such tensor")
                got = (f"{tensor.dtype} {tuple(tensor.shape)}" if isinstance(tensor, Tensor)
                       else type(tensor).__name__)
                raise AdapterError(f"{path!r} saved whole by {adapter.name!r} does not fit the "
                                   f"model: expected {expected}, got {got}")
            if id(current) in merged_weights:
                raise AdapterError(f"{path!r} saved whole by {adapter.name!r} is a weight that "
                                   "the adapters add into: copying it would undo that sum")
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise AdapterError(f"{path!r} saved whole by {adapter.name!r} has non-finite "
                                   "values; nothing was changed")
    # One merge target per weight (several adapters may add into it): the guard checks the
    # whole sum for non-finite factors and overflow before the first weight is written.
    targets: dict[int, Target] = {}
    for (layer, weight, target), terms, w in plans:
        entry = targets.setdefault(id(weight), Target(layer, target))
        for t in terms:
            A, B = t.A.to(target.device), t.B.to(target.device)
            scale = torch.full((A.shape[0],), t.scale * w, device=target.device,
                               dtype=torch.float32)
            entry.terms.append(Term(A, B, scale))
    merge_(list(targets.values()), "sum_into")
    for adapter in adapters:
        for path, tensor in adapter.whole.items():
            module_name, _, param = path.rpartition(".")
            with torch.no_grad():
                getattr(model.get_submodule(module_name), param).copy_(tensor)
    return model


# ---- evaluation ------------------------------------------------------------------------------
def read_texts(path: str | os.PathLike) -> str:
    """A text file, or every .txt file below a folder (sorted), joined by blank lines."""
    path = Path(path)
    if not path.exists():
        raise AdapterError(f"{path}: no such file or directory")
    files = sorted(path.rglob("*.txt")) if path.is_dir() else [path]
    text = "\n\n".join(f.read_text(errors="replace") for f in files)
    if not text.strip():
        raise AdapterError(f"{path}: no text found")
    return text


def _check_counts(max_chunks: int | None = None, **values) -> None:
    """Chunk lengths and counts are positive ints (a negative count would silently slice);
    max_chunks may also be None (all chunks)."""
    if max_chunks is not None:
        values["max_chunks"] = max_chunks
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _chunks(tokenizer, text: str, max_length: int, max_chunks: int | None, desc: str) -> Tensor:
    """The text's tokens as [n, max_length] consecutive chunks (at most max_chunks)."""
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
    n = ids.numel() // max_length
    if n < 1:
        raise AdapterError(f"{desc}: the text has {ids.numel()} tokens, fewer than "
                           f"max_length={max_length}: give more text or a smaller max_length "
                           "(--max-length on the command line)")
    return ids[: n * max_length].view(n, max_length)[:max_chunks]


def perplexity(model: nn.Module, tokenizer, text: str, max_length: int = 128,
               batch_size: int = 8, max_chunks: int | None = None, desc: str = "eval",
               progress: bool = True) -> float:
    """exp(mean next-token negative log-likelihood) over consecutive `max_length` chunks."""
    _check_counts(max_length=max_length, batch_size=batch_size, max_chunks=max_chunks)
    return _chunks_perplexity(model, _chunks(tokenizer, text, max_length, max_chunks, desc),
                              batch_size, desc, progress)


@torch.no_grad()
def _chunks_perplexity(model: nn.Module, chunks: Tensor, batch_size: int, desc: str,
                       progress: bool) -> float:
    import sys

    from tqdm.auto import tqdm

    model.eval()
    total, count = 0.0, 0
    for i in tqdm(range(0, len(chunks), batch_size), desc=desc, disable=not progress,
                  file=sys.stderr, leave=False):
        batch = chunks[i:i + batch_size]
        logits = model(input_ids=batch).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                batch[:, 1:].reshape(-1), reduction="sum")
        total += float(nll)
        count += batch[:, 1:].numel()
    return math.exp(total / count)


def evaluate(model_dir: str | os.PathLike, adapters: Sequence[Adapter], text: str,
             max_length: int = 128, max_chunks: int | None = None, progress: bool = True
             ) -> dict:
    """Perplexity of the causal LM at `model_dir` on `text`: the base, each adapter summed into
    it alone, every pair summed, and all of them summed (when more than two). Everything is
    checked before the first model is loaded: the arguments, that `model_dir` is a causal LM
    (any other model would get an untrained LM head) and that the text is long enough."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .base_models import causal_lm_architectures

    _check_counts(max_length=max_length, max_chunks=max_chunks)
    names = [a.name for a in adapters]
    if len(set(names) | {"base"}) != len(names) + 1:
        raise AdapterError(f"evaluate: adapter names must be distinct and not 'base', got {names}")
    causal_lm_architectures(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    chunks = _chunks(tokenizer, text, max_length, max_chunks, "evaluate")
    variants = [("base", [])] + [(a.name, [a]) for a in adapters]
    variants += [("+".join(x.name for x in pair), list(pair))
                 for pair in itertools.combinations(adapters, 2)]
    if len(adapters) > 2:
        variants.append(("+".join(a.name for a in adapters), list(adapters)))
    results = {}
    for name, members in variants:
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        sum_into(model, members)
        results[name] = _chunks_perplexity(model, chunks, 8, name, progress)
    return dict(model=str(model_dir), max_length=max_length, perplexity=results)
