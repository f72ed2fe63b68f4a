"""Saving and loading adapters in this package's format (and the PEFT format's entry points).

Our format: a directory with ``adapter_config.json`` (format version, library version, method,
each adapted layer's hyperparameters and shapes, the modules saved whole, the other names of
modules registered under several (``aliases``), the SHA-256 of the weights and of the config
itself) and ``adapter_model.safetensors`` (every adapter tensor under its module path). Each
layer entry records its method ("sos" for SOSLinear, "cps" for CPSLinear); a CPS layer's
partition (row/column index maps and offsets) is stored with its factors.

How the two files are written (a save killed at any moment leaves the last committed save
loadable) and read: files.py. What they must hold: checks.py, run by save_adapter before it
writes and by every reader (load_adapter, read_adapter, layers_from_directory, and through
them compose.load and `soslora_ext info`). PEFT's LoRA format: peft.py.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
import torch.nn as nn

from ..layers.base import AdapterLinear
from ..layers.distributed import full, is_writer
from ..layers.model import adapter_layers, freeze_all_but_adapters, modules_to_save, replace_module
from . import checks as check
from .checks import METHODS
from .files import (
    CONFIG_NAME,
    FORMAT,
    PREVIOUS_WEIGHTS_NAME,
    WEIGHTS_NAME,
    AdapterError,
    read_config,
    read_pair,
    save_pair,
)
from .kind_entries import kind_entry, meta_base
from .lock import DEFAULT_LOCK_TIMEOUT, check_lock_timeout
from .peft import (
    export_peft,
    folded_factors,
    import_peft,
    layer_state,
    read_peft_lora,
    unsharded,
    write_peft_lora,
)
from .peft_checks import PEFT_PREFIX

FORMAT_VERSION = 1

__all__ = ["AdapterError", "CONFIG_NAME", "DEFAULT_LOCK_TIMEOUT", "FORMAT", "FORMAT_VERSION",
           "METHODS", "PEFT_PREFIX", "PREVIOUS_WEIGHTS_NAME", "WEIGHTS_NAME", "export_peft",
           "folded_factors", "import_peft", "is_own_format", "layers_from_directory",
           "load_adapter", "read_adapter", "read_adapter_config", "read_peft_lora",
           "save_adapter", "write_peft_lora", "file_sha256", "config_sha256", "layer_state",
           "unsharded"]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def config_sha256(config: dict) -> str:
    """SHA-256 of the config without its own checksum, as canonical JSON."""
    body = {k: v for k, v in config.items() if k != "config_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
                          ).hexdigest()


def _method(layer: AdapterLinear) -> str:
    return next(name for name, cls in METHODS.items() if isinstance(layer, cls))


def _mixed_keys(value, path: str = "metadata") -> str | None:
    """Where `value` holds a dict whose keys JSON cannot sort (keys of different types)."""
    if isinstance(value, dict):
        try:
            sorted(value)
        except TypeError:
            types = " and ".join(sorted({type(k).__name__ for k in value}))
            return f"{path} has keys of different types ({types})"
        children = ((f"{path}[{k!r}]", v) for k, v in value.items())
    elif isinstance(value, (list, tuple)):
        children = ((f"{path}[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    return next((m for p, v in children if (m := _mixed_keys(v, p))), None)


def _check_metadata(metadata, where: str) -> None:
    try:  # strict JSON (no NaN), with sorted keys, as the config is written and every reader
        if not isinstance(metadata, dict):  # parses it
            raise TypeError(f"expected a dict, got {type(metadata).__name__}")
        json.dumps(metadata, allow_nan=False, sort_keys=True)
    except (TypeError, ValueError, RecursionError) as e:
        try:
            mixed = _mixed_keys(metadata) if isinstance(e, TypeError) else None
        except RecursionError:
            mixed = None
        if mixed:
            raise TypeError(f"{where}: {mixed}, which JSON cannot write: the config's keys are "
                            "sorted, and JSON keys are strings (1 and '1' would be one key); "
                            "give keys of one type, e.g. strings; nothing was written") from None
        error = TypeError if isinstance(e, TypeError) else AdapterError  # a wrong type or value
        raise error(f"{where}: metadata must be a JSON-serialisable dict without NaN or "
                    f"infinity ({e}); nothing was written") from None


def save_adapter(model: nn.Module, directory: str | os.PathLike, metadata: dict | None = None,
                 *, lock_timeout: float | None = DEFAULT_LOCK_TIMEOUT) -> Path:
    """Write the model's adapters (SOS and CPS layers, and its modules_to_save) to `directory`.

    `metadata` (JSON-serialisable) is stored as is, e.g. how to rebuild the base model.
    What would be refused when loaded (e.g. NaN after a diverged step) is refused here, and
    the previous adapter stays. A module registered under several names is saved once, with
    all its names (`aliases`). Another save holding the directory's lock is waited for at most
    `lock_timeout` seconds (None: no limit; after 5 s a warning says whose lock it is), then
    AdapterError. In a distributed run every rank calls it: sharded tensors are gathered and
    rank 0 writes."""
    from safetensors.torch import save

    from ..version import __version__

    where = f"save_adapter({str(directory)!r})"
    metadata = {} if metadata is None else metadata
    _check_metadata(metadata, where)
    lock_timeout = check_lock_timeout(lock_timeout, where)
    layers = dict(adapter_layers(model))
    if not layers:
        raise AdapterError(f"{where}: the model has no adapted (SOSLinear/CPSLinear) layers")
    tensors, modules = {}, {}
    for name, layer in layers.items():
        tensors.update({f"{name}.{k}": v for k, v in layer_state(layer).items()})
        modules[name] = dict(method=_method(layer), in_features=layer.in_features,
                             out_features=layer.out_features,
                             bias=layer.bias is not None, config=layer.config.to_dict(),
                             dtype=str(layer.lora_A.dtype).removeprefix("torch."),
                             **kind_entry(layer))
    saved, whole = {}, modules_to_save(model)
    for name, module in whole.items():
        params = dict(module.named_parameters(recurse=False))
        tensors.update({f"{name}.{k}": full(v) for k, v in params.items()})
        saved[name] = sorted(params)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    config = dict(format=FORMAT, format_version=FORMAT_VERSION, library_version=__version__,
                  method="+".join(sorted({m["method"] for m in modules.values()})),
                  base_model_class=type(model).__name__,
                  target_modules=sorted(layers), modules=modules, modules_to_save=saved,
                  aliases=check.other_names(model, {**layers, **whole}), metadata=metadata)
    plan = check.check_own_config(config, where)
    check.check_own_header(plan, check.header_of(tensors), where)
    check.check_own_values(plan, tensors, where)
    if not is_writer():
        return Path(directory)
    weights = save(tensors, metadata={"format": "pt"})
    config["weights_sha256"] = hashlib.sha256(weights).hexdigest()
    config["config_sha256"] = config_sha256(config)
    text = json.dumps(config, indent=2, sort_keys=True, allow_nan=False) + "\n"
    return save_pair(Path(directory), text.encode(), weights, lock_timeout, where)


def _check_format(config: dict, where: str) -> None:
    if config.get("format") != FORMAT:
        check.fail(where, f"{CONFIG_NAME} is not a {FORMAT} adapter (format="
                          f"{str(config.get('format'))[:100]!r}); for PEFT adapters use "
                          "import_peft")
    if config.get("config_sha256") != config_sha256(config):
        check.fail(where, f"{CONFIG_NAME}: contents do not match its checksum (the file is "
                          "corrupted or was edited)")
    if config.get("format_version") != FORMAT_VERSION:
        check.fail(where, f"unsupported format_version {config.get('format_version')!r}")


def _read_own(directory, where: str, model: nn.Module | None = None):
    """(config, plan, tensors) of one of our adapter directories, every check passed (with
    `model`: also that it fits the model)."""
    plans = {}

    def validate(config):
        _check_format(config, where)
        plans["plan"] = plan = check.check_own_config(config, where, model)
        return lambda header: check.check_own_header(plan, header, where)

    config, tensors = read_pair(directory, validate)
    check.check_own_values(plans["plan"], tensors, where)
    return config, plans["plan"], tensors


def is_own_format(directory: str | os.PathLike) -> bool:
    """Whether the directory's config says it is in this package's format (not PEFT's)."""
    return read_config(Path(directory))[1].get("format") == FORMAT


def read_adapter_config(directory: str | os.PathLike) -> dict:
    """The checked adapter_config.json of one of our adapter directories."""
    return _read_own(directory, repr(str(directory)))[0]


def read_adapter(directory: str | os.PathLike
                 ) -> tuple[dict, dict[str, AdapterLinear], dict[str, torch.Tensor]]:
    """(config, {name: layer}, {"module.param": tensor saved whole}) of a saved adapter, checked
    as load_adapter checks it; each layer on a weightless (meta) base: enough for scales,
    factors and parameter counts without the base model."""
    config, plan, tensors = _read_own(directory, repr(str(directory)))
    layers = {}
    for name, p in plan.layers.items():
        base = meta_base(p.kind, p.kernel, p.in_features, p.out_features)
        layer = p.cls(base, dtype=p.dtype, **p.kwargs)
        layer.load_state_dict({k: tensors[f"{name}.{k}"] for k in p.tensors}, strict=False,
                              assign=True)
        layers[name] = layer
    whole = {f"{m}.{p}": tensors[f"{m}.{p}"] for m, params in plan.whole.items() for p in params}
    return config, layers, whole


def layers_from_directory(directory: str | os.PathLike) -> tuple[dict, dict[str, AdapterLinear]]:
    """(config, {name: layer}) of a saved adapter (see read_adapter)."""
    config, layers, _ = read_adapter(directory)
    return config, layers


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Re-create the saved adapted layers on a fresh `model` and restore them exactly.

    Every layer's name, shape, hyperparameters and tensors are checked before the model is
    touched; a mismatch raises AdapterError naming the layer and leaves the model unchanged.
    A layer saved under several names (one module under each) is put under all of them: one
    layer where they are one module in `model`, else one copy of it per module. An adapter
    saved before the names were recorded takes the names `model` gives the module.
    """
    where = f"load_adapter({str(directory)!r})"
    _, plan, tensors = _read_own(directory, where, model)
    placed = check.placements(model, plan, where)  # (layer name, base, [names]), all checked
    built, by_name = [], {}
    for name, base, names in placed:
        p = plan.layers[name]
        layer = p.cls(base, dtype=p.dtype, **p.kwargs)
        layer.load_state_dict({k: tensors[f"{name}.{k}"] for k in p.tensors}, strict=False)
        built.append((layer, names))
        by_name[name] = layer
    for name, p in plan.layers.items():  # an attention layer's out_proj adapter, made by it
        if outer := check.nested_in(name, plan.layers):
            inner = by_name[outer].base_layer.out_proj
            inner.load_state_dict({k: tensors[f"{name}.{k}"] for k in p.tensors}, strict=False)
    for layer, names in built:
        for name in names:
            replace_module(model, name, layer)
    kept = []
    with torch.no_grad():
        for name, params in plan.whole.items():
            for module in check.modules_named(model, [name] + plan.aliases_of(name)):
                for param in params:
                    getattr(module, param).copy_(tensors[f"{name}.{param}"])
                kept.append(module)
    freeze_all_but_adapters(model, keep_trainable=kept)
    return model
