"""Model-level helpers: inject SOS-LoRA and CPS-LoRA layers, sum penalties, merge, count
parameters."""
from __future__ import annotations

import re
from typing import Iterator, Sequence

import torch
import torch.nn as nn

from . import bypass, merge_guard, quantized
from .base import AdapterLinear, check_base, is_adaptable, is_linear, partition_shape
from .config import CPSConfig, SOSConfig, check_preset, with_fields
from .cps import CPSLinear, check_fits
from .sos import SOSLinear


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLinear]]:
    """(name, layer) for every adapted layer (SOSLinear or CPSLinear) in `model`."""
    for name, module in model.named_modules():
        if isinstance(module, AdapterLinear):
            yield name, module


def sos_layers(model: nn.Module) -> Iterator[tuple[str, SOSLinear]]:
    """(name, layer) for every SOSLinear in `model`."""
    return ((n, m) for n, m in adapter_layers(model) if isinstance(m, SOSLinear))


def cps_layers(model: nn.Module) -> Iterator[tuple[str, CPSLinear]]:
    """(name, layer) for every CPSLinear in `model`."""
    return ((n, m) for n, m in adapter_layers(model) if isinstance(m, CPSLinear))


def _matches(name: str, target_modules: str | Sequence[str]) -> bool:
    # As PEFT: a string is a regex that must match the whole module name; a list matches a
    # module whose name equals an entry or ends with "." + entry.
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def _check_names(owner: str, arg: str, value, allow_empty: bool = False) -> None:
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as e:
            raise ValueError(f"{owner}: {arg}={value!r} is not a valid regular expression "
                             f"({e})") from None
        return
    if (not isinstance(value, Sequence) or (not value and not allow_empty)
            or not all(isinstance(t, str) for t in value)):
        raise ValueError(f"{owner}: {arg} must be a regex string or a non-empty list of module "
                         f"names, got {value!r}")


def apply_sos_lora(model: nn.Module, target_modules: str | Sequence[str],
                   modules_to_save: str | Sequence[str] = (), preset: str | None = None,
                   config: SOSConfig | None = None, **layer_kwargs) -> nn.Module:
    """Replace the nn.Linear (or transformers Conv1D, as in GPT-2), nn.Embedding,
    nn.Conv1d/2d/3d and nn.MultiheadAttention modules named by `target_modules` with SOSLinear,
    in place (as PEFT's LoRA: an attention module's adapter covers in_proj_weight and
    out_proj; layers/kinds.py).

    The layers' hyperparameters: `config` (an SOSConfig, default SOSConfig()) or a named
    `preset` ("default" or "official", the SOS-LoRA authors' recipe: config.PRESETS), with
    `layer_kwargs` (SOSConfig fields, and `dtype`) overriding its fields
    (SOSConfig.preset(preset, **layer_kwargs) for a preset). The official preset keeps the
    factors in the base weight's dtype unless `dtype` is given.

    `target_modules` is a list of names (a module matches if its name equals one or ends with
    "." + one, e.g. ["q_proj", "v_proj"]) or a regex matched against the full module name.
    `modules_to_save` (same rules, e.g. ["classifier"]; None for none) stay fully trainable and
    are saved and exported with the adapter, as PEFT's option of that name; those of an
    earlier apply_* call stay trainable. A saved module may not be or hold an adapted layer.
    Every other parameter of the model is frozen. A module registered under several names is
    adapted under all of them. Returns `model`. Every target is checked first: on any error
    nothing in the model is changed. A target whose parent is known to compute with its weight
    instead of calling it (nn.MultiheadAttention's out_proj: bypass.py) is refused; other such
    parents are reported by a warning on the model's first training forward.
    """
    layer_kwargs = dict(layer_kwargs)
    dtype = layer_kwargs.pop("dtype", None)
    if preset is not None:
        check_preset("apply_sos_lora", preset)
        if config is not None:
            raise ValueError("apply_sos_lora: give a preset or a config, not both")
        config = SOSConfig.preset(preset, **layer_kwargs)
    else:  # validated before the model is touched
        config = with_fields("apply_sos_lora", SOSConfig, config, layer_kwargs)
    return _apply_adapters(model, target_modules, modules_to_save, "apply_sos_lora",
                           lambda linear: SOSLinear(linear, config, dtype=dtype))


def apply_cps_lora(model: nn.Module, target_modules: str | Sequence[str],
                   modules_to_save: str | Sequence[str] = (), config: CPSConfig | None = None,
                   **layer_kwargs) -> nn.Module:
    """Replace the nn.Linear (or Conv1D), nn.Embedding, nn.Conv1d/2d/3d and
    nn.MultiheadAttention modules named by `target_modules` with CPSLinear, in place. Same
    rules as apply_sos_lora: `config` (a CPSConfig, default CPSConfig()) with `layer_kwargs`
    (CPSConfig fields, and `dtype`) overriding its fields. Every layer's shape is checked
    against the clusters and ranks before the model is changed."""
    layer_kwargs = dict(layer_kwargs)
    dtype = layer_kwargs.pop("dtype", None)
    config = with_fields("apply_cps_lora", CPSConfig, config, layer_kwargs)

    return _apply_adapters(
        model, target_modules, modules_to_save, "apply_cps_lora",
        lambda linear: CPSLinear(linear, config, dtype=dtype),
        check=lambda name, base: _check_cps_fits(config, name, base))


def _check_cps_fits(config: CPSConfig, name: str, base: nn.Module) -> None:
    rows, columns, taps = partition_shape(base)
    check_fits(config, rows, columns, name, taps=taps)
    if config.repartition_every and is_adaptable(base) and not is_linear(base):
        raise ValueError(f"apply_cps_lora: module {name!r} (type {type(base).__name__}): "
                         f"repartition_every={config.repartition_every} is supported on linear "
                         "layers only; adapt it in another apply_cps_lora call with "
                         "repartition_every=0")


def _apply_adapters(model, target_modules, save_names, owner, build,
                    check=lambda name, linear: None) -> nn.Module:
    """Replace the targets by build(linear), after `check(name, linear)` passed for each and
    every argument was validated: on any error the model is unchanged."""
    save_names = () if save_names is None else save_names  # PEFT's default
    _check_names(owner, "target_modules", target_modules)
    _check_names(owner, "modules_to_save", save_names, allow_empty=True)
    inside_adapters = {id(m) for _, layer in adapter_layers(model) for m in layer.modules()
                       if m is not layer}
    # Every name of every module: one registered under two names is matched by either, and
    # replaced under both (else one path would bypass its adapter).
    candidates = [(name, module) for name, module in model.named_modules(remove_duplicate=False)
                  if name and id(module) not in inside_adapters]
    names = _names_by_module(candidates)
    matched = {id(m): m for name, m in candidates if _matches(name, target_modules)}
    targets = [(names[i][0], module) for i, module in matched.items()]
    if not targets:
        linear_names = [n for n, m in candidates if is_adaptable(m)]
        raise ValueError(f"{owner}: target_modules={target_modules!r} matches no module; "
                         f"adaptable modules include {linear_names[:8]}")
    for name, module in targets:
        if isinstance(module, AdapterLinear):
            raise ValueError(f"{owner}: module {name!r} already has an adapter "
                             f"({type(module).__name__})")
        if not is_adaptable(module):
            raise TypeError(f"{owner}: module {name!r} matched target_modules but is a "
                            f"{type(module).__name__}, not an nn.Linear or Conv1D, "
                            "nn.Embedding, nn.Conv1d/2d/3d or nn.MultiheadAttention")
        check_base(module, f"{owner}: module {name!r}")
        for alias in names[id(module)]:
            bypass.check_parent(model, alias, owner)
        check(name, module)

    saved = list({id(m): m for name, m in candidates
                  if save_names and _matches(name, save_names)}.values())
    if save_names and not saved:
        raise ValueError(f"{owner}: modules_to_save={save_names!r} matches no module")
    # A saved module that is or holds an adapted layer would make its frozen base trainable.
    adapted = {id(m) for _, m in targets} | {id(m) for _, m in adapter_layers(model)}
    for module in saved:
        clash = [name for name, m in module.named_modules() if id(m) in adapted]
        if clash:
            where = names[id(module)][0] + (f".{clash[0]}" if clash[0] else "")
            raise ValueError(f"{owner}: modules_to_save={save_names!r} names module "
                             f"{names[id(module)][0]!r}, which is or holds the adapted layer "
                             f"{where!r}; a module is either adapted or saved whole, not both")

    # Modules saved by an earlier apply_* (or load_adapter) call stay trainable.
    target_ids = {id(m) for _, m in targets}
    earlier = ([m for m in modules_to_save(model).values() if id(m) not in target_ids]
               if inside_adapters else [])

    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:  # building freezes each base: undone if a later one fails
        replacements = [build(module) for _, module in targets]
    except BaseException:
        for p, flag in flags:
            p.requires_grad_(flag)
        raise
    for (_, module), layer in zip(targets, replacements):
        for name in names[id(module)]:
            replace_module(model, name, layer)
    freeze_all_but_adapters(model, keep_trainable=saved + earlier)
    return model


def _names_by_module(named: list[tuple[str, nn.Module]]) -> dict[int, list[str]]:
    names: dict[int, list[str]] = {}
    for name, module in named:
        names.setdefault(id(module), []).append(name)
    return names


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` in place of module `name`. An adapted layer learns the model it is in (where
    merging looks for tensors sharing its weight), and the model gets the bypass watch."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)
    if isinstance(new, AdapterLinear):
        new._set_model(model)
        bypass.watch(model)


def freeze_all_but_adapters(model: nn.Module, keep_trainable: Sequence[nn.Module] = ()) -> None:
    """Only adapter parameters (and those of `keep_trainable` modules) require grad."""
    trainable = {id(p) for _, layer in adapter_layers(model)
                 for _, p in layer.named_adapter_parameters()}
    trainable |= {id(p) for m in keep_trainable for p in m.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)


def modules_to_save(model: nn.Module) -> dict[str, nn.Module]:
    """Modules outside the adapted layers that own trainable parameters (e.g. a new classifier
    head): what save_adapter and export_peft store besides the adapters."""
    inside = {id(m) for _, layer in adapter_layers(model) for m in layer.modules()}
    return {name: m for name, m in model.named_modules() if id(m) not in inside
            and any(p.requires_grad for p in m.parameters(recurse=False))}


def ortho_penalty(model: nn.Module) -> torch.Tensor:
    """Sum of every SOS layer's orthogonality penalty (differentiable). Adding
    lambda * ortho_penalty(model) to the loss gives lora_A the same gradient as setting the
    layers' ortho_lambda to lambda (the in-backward form of the reference code)."""
    penalties = [layer.ortho_penalty() for _, layer in sos_layers(model)]
    if not penalties:
        raise ValueError("ortho_penalty: the model has no SOSLinear layers")
    return torch.stack([p.to(penalties[0].device) for p in penalties]).sum()


def check_finite(model: nn.Module) -> None:
    """Raise FloatingPointError naming the first adapted layer whose adapter parameters or
    their gradients hold NaN or Inf (one host sync per call: call it where you can afford one)."""
    for name, layer in adapter_layers(model):
        for pname, p in layer.named_adapter_parameters():
            if not torch.isfinite(p).all():
                raise FloatingPointError(f"layer {name!r}: {pname} has non-finite values")
            if p.grad is not None and not torch.isfinite(p.grad).all():
                raise FloatingPointError(f"layer {name!r}: the gradient of {pname} has "
                                         "non-finite values")


def merge_and_unload(model: nn.Module, dequantize: bool = False,
                     dtype: torch.dtype | None = None) -> nn.Module:
    """Merge every adapted layer into its base weight and put the base layer back.
    Every layer is checked (a weight sharing memory with any other tensor of `model`,
    non-finite factors, overflow of the weight's dtype) before the first weight changes: on any
    error the model is unchanged.

    A quantized (bitsandbytes) base cannot hold the merged weight: refused, unless
    `dequantize`, which puts a new nn.Linear of `dtype` (default: the base's compute dtype)
    holding the dequantized weight plus the update in its place (quantized.merged_linear)."""
    if dtype is not None and not dequantize:
        raise ValueError("merge_and_unload: dtype is the dtype of dequantized layers; it needs "
                         "dequantize=True")
    layers = list(adapter_layers(model))
    on_quantized = [(name, layer) for name, layer in layers if layer.quantized]
    if on_quantized and not dequantize:
        (name, layer), more = on_quantized[0], len(on_quantized) - 1
        raise RuntimeError(quantized.merge_refusal(
            layer.base_layer, f"merge_and_unload: layer {name!r}"
            + (f" (and {more} more layers)" if more else "")))
    # Built before any weight is written: all or nothing.
    dequantized = {id(layer): quantized.merged_linear(layer, dtype,
                                                      f"merge_and_unload: layer {name!r}")
                   for name, layer in on_quantized}
    pending = [(name, layer) for name, layer in layers
               if not layer.merged and not layer.quantized]
    targets = [layer._merge_target(name) for name, layer in pending]
    written = merge_guard.merge_(targets, "merge_and_unload", [model])
    for (_, layer), target, stats in zip(pending, targets, written):
        layer._record_merged(target, stats)
    names = _names_by_module(list(model.named_modules(remove_duplicate=False)))
    # Deepest first: an attention module's out_proj adapter before the attention adapter.
    layers.sort(key=lambda item: -max(n.count(".") for n in names[id(item[1])]))
    for _, layer in layers:
        merged = dequantized[id(layer)] if layer.quantized else layer.merge_and_unload()
        for name in names[id(layer)]:  # every name, where one layer is registered under several
            replace_module(model, name, merged)
    bypass.unwatch(model)
    return model


def uncalled_adapters(model: nn.Module) -> list[str]:
    """Names of the adapted layers with trainable factors that no forward in training mode
    (or with grad enabled) has called (see check_adapters_called)."""
    return [name for name, layer in adapter_layers(model) if not layer.used_in_training
            and any(p.requires_grad for _, p in layer.named_adapter_parameters())]


def check_adapters_called(model: nn.Module, where: str = "check_adapters_called") -> None:
    """Raise RuntimeError naming the adapted layers that no training forward called.

    Such a layer's parent reads its ``.weight`` (e.g. ``F.linear(x, self.proj.weight)``)
    instead of calling it: the adapter then has no effect and gets no gradient. Run it after
    the first training step (finetune.train and the Trainer callbacks do)."""
    names = uncalled_adapters(model)
    if names:
        raise RuntimeError(
            f"{where}: adapted layers {names[:8]}{' ...' if len(names) > 8 else ''} were not "
            "called in the training forward: their parent must call the module (layer(x)), "
            "not read its .weight (e.g. F.linear(x, layer.weight)), or the adapter has no "
            "effect. Adapt other modules (target_modules), or leave these out")


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, shared parameters counted once."""
    params = {id(p): p for p in model.parameters()}.values()
    return (sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))
