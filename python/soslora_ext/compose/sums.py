"""Naive summation: adapters added together, as one adapter (``concat``, exact: a sum of
low-rank terms is their concatenation) or into a model's weights in place (``sum_into``).

    sum_i delta_W_i = [B_1 | B_2 | ...] [A_1; A_2; ...]
"""
from __future__ import annotations

import itertools
import math
from typing import Sequence

import torch
import torch.nn as nn

from ..formats.files import AdapterError
from ..layers.base import AdapterLinear, is_conv1d, weight_matrix
from ..layers.merge_guard import Target, Term, merge_
from ..layers.sharing import overlap, shared_with
from .interference import check_same_base
from .kinds import module_path, target_view
from .terms import Adapter, LowRankTerm

Tensor = torch.Tensor


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
    aliases: dict[str, list[str]] = {}
    layouts = {}
    for adapter, w in zip(adapters, weights):
        layouts.update(adapter.layouts)
        for layer, terms in adapter.items():
            layers.setdefault(layer, []).extend(
                LowRankTerm(t.A, t.B, t.scale * w) for t in terms)
        whole.update(adapter.whole)
        for name, others in adapter.aliases.items():
            known = aliases.setdefault(name, [])
            known += [n for n in others if n not in known]
    return Adapter(layers, name="+".join(a.name for a in adapters),
                   fan_in_fan_out=adapters[0].fan_in_fan_out, whole=whole, aliases=aliases,
                   layouts=layouts)


def _every_name(adapter: Adapter, model: nn.Module, name: str, where: str) -> list[str]:
    """`name` and the other names the adapter recorded for its module, one per distinct
    module of `model` (the same module under two names is written once)."""
    names, seen = [], set()
    for n in [name] + list(adapter.aliases.get(name, [])):
        try:
            module = model.get_submodule(n)
        except AttributeError:
            if n == name:  # the caller reports its own name missing, as it always has
                return [name]
            raise AdapterError(f"{where} {n!r} of adapter {adapter.name!r}: no such module in "
                               f"{type(model).__name__}") from None
        if id(module) not in seen:
            seen.add(id(module))
            names.append(n)
    return names


def _whole_items(adapter: Adapter, model: nn.Module):
    """(path, tensor) of the modules the adapter saved whole, under each of their names."""
    for path, tensor in adapter.whole.items():
        module_name, _, param = path.rpartition(".")
        for name in _every_name(adapter, model, module_name, "module"):
            yield f"{name}.{param}", tensor


def sum_into(model: nn.Module, adapters: Sequence[Adapter],
             weights: Sequence[float] | None = None) -> nn.Module:
    """W += sum_i w_i delta_W_i in place, for every adapted module of `model`, through the merge
    op (float32 accumulation, one rounding per term, no [out, in] temporary). Everything is
    checked before the first weight changes, including non-finite factors, a sum beyond the
    weight dtype's range, and a weight (or a tensor saved whole) sharing memory with another
    tensor of `model` (a tie, however made): on any error every weight is bit-identical."""
    weights = _weights(adapters, weights)
    _check_compatible(adapters)
    plans = []
    for adapter, w in zip(adapters, weights):
        # A module saved under several names goes into each of them that is its own module.
        named = [(name, layer, terms) for name, terms in adapter.items()
                 for layer in _every_name(adapter, model, module_path(model, name), "layer")]
        for name, layer, terms in named:
            try:
                module = model.get_submodule(layer)
            except AttributeError:
                raise AdapterError(f"layer {layer!r} of adapter {adapter.name!r}: no such module "
                                   f"in {type(model).__name__}") from None
            weight, param = getattr(module, "weight", None), "weight"
            layout = adapter.layouts.get(name)
            if layout is not None:  # a convolution, embedding or attention: a view of a weight
                target, param = target_view(module, layout, f"layer {layer!r} of adapter "
                                                            f"{adapter.name!r}")
                weight = getattr(module.base_layer if isinstance(module, AdapterLinear)
                                 else module, param)
            elif not isinstance(weight, Tensor) or weight.dim() != 2:
                raise AdapterError(f"layer {layer!r}: {type(module).__name__} has no 2-D weight")
            else:
                # As in PEFT, the layer's type decides the layout (a Conv1D stores [in, out]),
                # not the adapter's fan_in_fan_out flag, which a model of both kinds cannot
                # honour.
                target = weight_matrix(module) if is_conv1d(module) else weight
            if tuple(target.shape) != adapter.shape(name):
                raise AdapterError(f"layer {layer!r}: adapter {adapter.name!r} is for a "
                                   f"{adapter.shape(name)} weight, the model's is "
                                   f"{tuple(target.shape)}")
            for t in terms:  # the op takes the scale in float32 (the guard refuses NaN/Inf)
                if (math.isfinite(t.scale)
                        and not abs(t.scale * w) <= torch.finfo(torch.float32).max):
                    raise AdapterError(f"layer {layer!r}: adapter {adapter.name!r}'s scale "
                                       f"{t.scale} times its weight {w} is not a finite float32 "
                                       "number; give smaller weights")
            # Where the weight lives: an adapted layer's is its base layer's.
            owner = module.base_layer if isinstance(module, AdapterLinear) else module
            plans.append(((layer, owner, param, weight, target), terms, w))
    merged_weights = [weight for (_, _, _, weight, _), _, _ in plans]
    copies = []
    for adapter in adapters:
        for path, tensor in _whole_items(adapter, model):
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
            if any(overlap(current, weight) for weight in merged_weights):
                raise AdapterError(f"{path!r} saved whole by {adapter.name!r} is a weight that "
                                   "the adapters add into: copying it would undo that sum")
            copies.append((path, adapter, current, model.get_submodule(module_name), param))
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise AdapterError(f"{path!r} saved whole by {adapter.name!r} has non-finite "
                                   "values; nothing was changed")
    # A tensor saved whole is written too: not if it shares memory with another tensor.
    tied = shared_with([(current, (owner, param)) for _, _, current, owner, param in copies],
                       [model])
    for (path, adapter, *_), names in zip(copies, tied):
        if names:
            raise AdapterError(f"{path!r} saved whole by {adapter.name!r} is shared with "
                               f"{names[:8]} (the same memory): copying it would change those "
                               "too; nothing was changed (untie them first)")
    # One merge target per weight (several adapters may add into it): the guard checks the
    # whole sum for non-finite factors and overflow before the first weight is written, and
    # refuses a weight that shares memory with another tensor of the model.
    targets: dict[int, Target] = {}
    for (layer, module, param, weight, target), terms, w in plans:
        entry = targets.setdefault(id(weight), Target(layer, target, owner=(module, param)))
        for t in terms:
            A, B = t.A.to(target.device), t.B.to(target.device)
            scale = torch.full((A.shape[0],), t.scale * w, device=target.device,
                               dtype=torch.float32)
            entry.terms.append(Term(A, B, scale))
    merge_(list(targets.values()), "sum_into", [model])
    for adapter in adapters:
        for path, tensor in _whole_items(adapter, model):
            module_name, _, param = path.rpartition(".")
            with torch.no_grad():
                getattr(model.get_submodule(module_name), param).copy_(tensor)
    return model
