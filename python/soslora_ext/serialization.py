"""Saving, loading and converting adapters.

Our format: a directory with ``adapter_config.json`` (format version, library version, method,
each adapted layer's hyperparameters and shapes, the modules saved whole, the SHA-256 of the
weights and of the config itself) and ``adapter_model.safetensors`` (every adapter tensor under
its module path). Both files are first written to temporary files and then renamed into place,
weights first. An interrupted save therefore leaves the previous files whole. Between the two
renames the old weights stay reachable under PREVIOUS_WEIGHTS_NAME, so a save stopped there
still loads as the old pair; any other mismatch fails the checksums and is refused.

Each layer entry records its method ("sos" for SOSLinear, "cps" for CPSLinear); a CPS layer's
partition (row/column index maps and offsets) is stored with its factors.

PEFT format: the whole update of a layer is one LoRA (rank r_tot for SOS, the sum of the
cluster ranks for CPS, each cluster's block placed at its rows and columns), with the scales
(and the gate) folded into B. ``export_peft`` writes it with lora_alpha = r, so PEFT's scaling
is 1. ``import_peft`` turns a PEFT LoRA into SOS layers.
"""
from __future__ import annotations

import collections
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from .config import SOSConfig
from .cps import CPSLinear, check_partition
from .distributed import full, is_writer
from .layer import AdapterLinear, SOSLinear
from .model import adapter_layers, freeze_all_but_adapters, modules_to_save, replace_module

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREVIOUS_WEIGHTS_NAME = ".adapter_model.safetensors.previous"  # only while a save renames
FORMAT = "soslora_ext"
FORMAT_VERSION = 1
PEFT_PREFIX = "base_model.model."
METHODS = {"sos": SOSLinear, "cps": CPSLinear}


class AdapterError(ValueError):
    """An adapter directory that cannot be saved, read or applied to this model."""


# ---- files -----------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _config_sha256(config: dict) -> str:
    """SHA-256 of the config without its own checksum, as canonical JSON."""
    body = {k: v for k, v in config.items() if k != "config_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
                          ).hexdigest()


def _write_atomically(path: Path, write: Callable[[Path], None]) -> Path:
    """write(tmp) into a temporary file beside `path`, fsync it; returns the temporary path."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _save_pair(directory: Path, config: dict, tensors: dict[str, torch.Tensor],
               checksum: bool) -> Path:
    """Writes adapter_config.json + adapter_model.safetensors, the JSON renamed into place last
    (carrying the weights' SHA-256 and its own when `checksum`)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    weights_tmp = _write_atomically(directory / WEIGHTS_NAME,
                                    lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    try:
        if checksum:
            config = {**config, "weights_sha256": _sha256(weights_tmp)}
            config["config_sha256"] = _config_sha256(config)
        config_tmp = _write_atomically(
            directory / CONFIG_NAME,
            lambda p: p.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n"))
    except BaseException:
        weights_tmp.unlink(missing_ok=True)
        raise
    weights, previous = directory / WEIGHTS_NAME, directory / PREVIOUS_WEIGHTS_NAME
    if checksum and weights.is_file():
        # The old config names the old weights until the new config is renamed in: keep them
        # reachable, so that a save stopped between the two renames leaves the old pair whole.
        previous.unlink(missing_ok=True)
        try:
            os.link(weights, previous)
        except OSError:  # no hard links on this file system
            shutil.copyfile(weights, previous)
    os.replace(weights_tmp, weights)
    os.replace(config_tmp, directory / CONFIG_NAME)
    previous.unlink(missing_ok=True)
    return directory


def _read_pair(directory: Path, check_sha: bool) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise AdapterError(f"{path}: file not found (not an adapter directory?)")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{config_path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{config_path}: expected a JSON object")
    data = weights_path.read_bytes()  # checked and parsed from the same bytes
    # Only our own format carries checksums; callers check the format itself.
    if check_sha and config.get("format") == FORMAT:
        if config.get("config_sha256") != _config_sha256(config):
            raise AdapterError(f"{config_path}: contents do not match its checksum (the file is "
                               "corrupted or was edited)")
        expected, digest = config.get("weights_sha256"), hashlib.sha256(data).hexdigest()
        previous = directory / PREVIOUS_WEIGHTS_NAME
        if digest != expected and previous.is_file():
            data = previous.read_bytes()  # a save stopped between its renames: the old pair
            digest = hashlib.sha256(data).hexdigest()
        if digest != expected:
            raise AdapterError(f"{weights_path}: contents do not match the checksum in "
                               f"{CONFIG_NAME} (the file is corrupted or was edited)")
    try:
        tensors = load(data)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise AdapterError(f"{weights_path}: unreadable safetensors file ({e})") from None
    return config, tensors


# ---- our format ------------------------------------------------------------------------------
def _method(layer: AdapterLinear) -> str:
    return next(name for name, cls in METHODS.items() if isinstance(layer, cls))


def _layer_state(layer: AdapterLinear) -> dict[str, torch.Tensor]:
    """The adapter's tensors (whole, also when the model is sharded)."""
    return {k: full(v) for k, v in layer.state_dict().items() if not k.startswith("base_layer.")}


def _unsharded(layer: AdapterLinear) -> AdapterLinear:
    """`layer` itself, or for a sharded one a copy on a weightless base with gathered tensors."""
    from torch.distributed.tensor import DTensor

    if not any(isinstance(t, DTensor) for t in layer.state_dict().values()):
        return layer
    copy = type(layer)(nn.Linear(layer.in_features, layer.out_features, device="meta"),
                       dtype=layer.lora_A.dtype, **layer.config.to_dict())
    copy.load_state_dict(_layer_state(layer), strict=False, assign=True)
    return copy


def save_adapter(model: nn.Module, directory: str | os.PathLike,
                 metadata: dict | None = None) -> Path:
    """Write the model's adapters (SOS and CPS layers, and its modules_to_save) to `directory`.

    `metadata` (JSON-serialisable) is stored as is, e.g. how to rebuild the base model.
    In a distributed run every rank calls it: sharded tensors are gathered and rank 0 writes."""
    from . import __version__

    layers = dict(adapter_layers(model))
    if not layers:
        raise AdapterError("save_adapter: the model has no adapted (SOSLinear/CPSLinear) layers")
    tensors, modules = {}, {}
    for name, layer in layers.items():
        tensors.update({f"{name}.{k}": v for k, v in _layer_state(layer).items()})
        modules[name] = dict(method=_method(layer), in_features=layer.in_features,
                             out_features=layer.out_features,
                             bias=layer.bias is not None, config=layer.config.to_dict(),
                             dtype=str(layer.lora_A.dtype).removeprefix("torch."))
    saved = {}
    for name, module in modules_to_save(model).items():
        params = dict(module.named_parameters(recurse=False))
        tensors.update({f"{name}.{k}": full(v) for k, v in params.items()})
        saved[name] = sorted(params)
    for key, t in tensors.items():  # e.g. a diverged step must not replace the last good save
        if not torch.isfinite(t).all():
            raise AdapterError(f"save_adapter: {key!r} has non-finite values; nothing was written")
    config = dict(format=FORMAT, format_version=FORMAT_VERSION, library_version=__version__,
                  method="+".join(sorted({m["method"] for m in modules.values()})),
                  base_model_class=type(model).__name__,
                  target_modules=sorted(layers), modules=modules, modules_to_save=saved,
                  metadata=metadata or {})
    if not is_writer():
        return Path(directory)
    return _save_pair(Path(directory), config, tensors, checksum=True)


def _fail(directory, message: str):
    raise AdapterError(f"load_adapter({str(directory)!r}): {message}")


def _module(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def read_adapter_config(directory: str | os.PathLike) -> dict:
    """The checked adapter_config.json of one of our adapter directories."""
    config, _ = _read_pair(Path(directory), check_sha=True)
    if config.get("format") != FORMAT:
        _fail(directory, f"{CONFIG_NAME} is not a {FORMAT} adapter")
    return config


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Re-create the saved adapted layers on a fresh `model` and restore them exactly.

    Every layer's name, shape, hyperparameters and tensors are checked before the model is
    touched; a mismatch raises AdapterError naming the layer and leaves the model unchanged.
    """
    config, tensors = _read_pair(Path(directory), check_sha=True)
    if config.get("format") != FORMAT:
        _fail(directory, f"{CONFIG_NAME} is not a {FORMAT} adapter (format="
                         f"{config.get('format')!r}); for PEFT adapters use import_peft")
    if config.get("format_version") != FORMAT_VERSION:
        _fail(directory, f"unsupported format_version {config.get('format_version')!r}")
    if not isinstance(config.get("modules"), dict) or not config["modules"]:
        _fail(directory, f"{CONFIG_NAME} lists no adapted modules")

    plans, expected_keys = [], set()
    for name, entry in config["modules"].items():
        base = _module(model, name)
        if base is None:
            _fail(directory, f"layer {name!r}: no such module in {type(model).__name__}")
        if isinstance(base, AdapterLinear):
            _fail(directory, f"layer {name!r} already has an adapter; load into a fresh model")
        if not isinstance(base, nn.Linear):
            _fail(directory, f"layer {name!r} is a {type(base).__name__}, not an nn.Linear")
        try:
            method = entry.get("method", "sos")  # files written before CPS-LoRA are all SOS
            if method not in METHODS:
                _fail(directory, f"layer {name!r}: unknown method {method!r}")
            cls = METHODS[method]
            layer_config = dict(entry["config"])
            dtype = getattr(torch, entry["dtype"])
            shape = (entry["in_features"], entry["out_features"])
            if shape != (base.in_features, base.out_features):
                _fail(directory, f"layer {name!r}: adapter is for in/out features {shape}, the "
                                 f"model's layer is ({base.in_features}, {base.out_features})")
            # The tensors a fresh layer of this configuration holds, built on the meta device.
            probe = cls(nn.Linear(*shape, device="meta", dtype=dtype), dtype=dtype,
                        **layer_config)
        except AdapterError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            _fail(directory, f"layer {name!r}: bad entry in {CONFIG_NAME} ({e})")
        state = {}
        for key, like in _layer_state(probe).items():
            full = f"{name}.{key}"
            if full not in tensors:
                _fail(directory, f"layer {name!r}: tensor {key!r} is missing")
            t = tensors[full]
            if t.shape != like.shape or t.dtype != like.dtype:
                _fail(directory, f"layer {name!r}: tensor {key!r} is {t.dtype} "
                                 f"{tuple(t.shape)}, expected {like.dtype} {tuple(like.shape)}")
            if not torch.isfinite(t).all():
                _fail(directory, f"layer {name!r}: tensor {key!r} has non-finite values")
            state[key] = t
            expected_keys.add(full)
        if cls is CPSLinear:
            try:
                check_partition(state["row_index"], state["row_offsets"].tolist(),
                                base.out_features, "rows")
                check_partition(state["col_index"], state["col_offsets"].tolist(),
                                base.in_features, "columns")
            except ValueError as e:
                _fail(directory, f"layer {name!r}: {e}")
        plans.append((name, base, cls, layer_config, dtype, state))

    whole = []
    for name, params in (config.get("modules_to_save") or {}).items():
        module = _module(model, name)
        if module is None:
            _fail(directory, f"module to save {name!r}: no such module in {type(model).__name__}")
        own = dict(module.named_parameters(recurse=False))
        for p in params:
            full = f"{name}.{p}"
            if p not in own or full not in tensors or tensors[full].shape != own[p].shape:
                _fail(directory, f"module to save {name!r}: parameter {p!r} is missing or has "
                                 "the wrong shape")
            if tensors[full].dtype != own[p].dtype or not torch.isfinite(tensors[full]).all():
                _fail(directory, f"module to save {name!r}: parameter {p!r} is not "
                                 f"{own[p].dtype} or has non-finite values")
            expected_keys.add(full)
            whole.append((own[p], tensors[full]))
    extra = sorted(set(tensors) - expected_keys)
    if extra:
        _fail(directory, f"{WEIGHTS_NAME} holds tensors that no layer uses: {extra[:5]}")

    for name, base, cls, layer_config, dtype, state in plans:
        layer = cls(base, dtype=dtype, **layer_config)
        layer.load_state_dict(state, strict=False)  # every non-base key was checked above
        replace_module(model, name, layer)
    with torch.no_grad():
        for param, t in whole:
            param.copy_(t)
    freeze_all_but_adapters(model, keep_trainable=[_module(model, n) for n in
                                                   (config.get("modules_to_save") or {})])
    return model


# ---- PEFT's LoRA format ----------------------------------------------------------------------
def write_peft_lora(directory: str | os.PathLike, factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
                    whole: dict[str, torch.Tensor] | None = None,
                    fan_in_fan_out: bool = False) -> Path:
    """Write {module: (A [r, in], B [out, r])} as a PEFT LoRA with delta = B A per module.

    lora_alpha = r for every module, so PEFT's scaling alpha / r is 1 and B carries all scales;
    modules of another rank get rank_pattern / alpha_pattern entries. `whole` holds tensors of
    modules saved whole ("module.param" -> tensor), PEFT's modules_to_save.
    """
    if not factors:
        raise AdapterError("write_peft_lora: no layers to write")
    whole = whole or {}
    tensors, ranks = {}, {}
    for name, (A, B) in factors.items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = A
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = B
        ranks[name] = A.shape[0]
    tensors.update({PEFT_PREFIX + k: v for k, v in whole.items()})
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    pattern = {re.escape(name): rank for name, rank in ranks.items() if rank != r}
    saved = sorted({k.rpartition(".")[0] for k in whole})
    config = dict(peft_type="LORA", task_type=None, r=r, lora_alpha=r, rank_pattern=pattern,
                  alpha_pattern=dict(pattern), target_modules=sorted(factors),
                  modules_to_save=saved or None, lora_dropout=0.0, bias="none",
                  fan_in_fan_out=fan_in_fan_out, use_rslora=False, use_dora=False,
                  init_lora_weights=True, inference_mode=True, base_model_name_or_path=None)
    return _save_pair(Path(directory), config, tensors, checksum=False)


def export_peft(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write the adapters as a standard PEFT LoRA (scales folded into B; a CPS layer's clusters
    placed at their rows and columns) that ``peft.PeftModel.from_pretrained(base, directory)``
    loads with the same outputs. In a distributed run every rank calls it; rank 0 writes."""
    layers = dict(adapter_layers(model))
    if not layers:
        raise AdapterError("export_peft: the model has no adapted (SOSLinear/CPSLinear) layers")
    factors = {}
    for name, layer in layers.items():
        if layer.merged:
            raise AdapterError(f"export_peft: layer {name!r} is merged; unmerge() it first")
        factors[name] = folded_factors(_unsharded(layer))
    whole = {f"{name}.{k}": full(v) for name, module in modules_to_save(model).items()
             for k, v in module.named_parameters(recurse=False)}
    if not is_writer():
        return Path(directory)
    return write_peft_lora(directory, factors, whole)


def folded_factors(layer: AdapterLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B * scales) in float32 (float64 for float64 factors): the layer's update is B A."""
    with torch.no_grad():
        A, B, scale = layer._update_factors()
        acc = torch.promote_types(A.dtype, torch.float32)
        return A.detach().to(acc), B.detach().to(acc) * scale.detach().to(acc)


def layers_from_directory(directory: str | os.PathLike) -> tuple[dict, dict[str, AdapterLinear]]:
    """(config, {name: layer}) of a saved adapter, each layer on a weightless (meta) base:
    enough for scales, factors and parameter counts without the base model."""
    config = read_adapter_config(directory)
    _, tensors = _read_pair(Path(directory), check_sha=False)
    layers = {}
    for name, entry in config["modules"].items():
        cls = METHODS[entry.get("method", "sos")]
        layer = cls(nn.Linear(entry["in_features"], entry["out_features"], device="meta"),
                    dtype=getattr(torch, entry["dtype"]), **entry["config"])
        state = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
        layer.load_state_dict(state, strict=False, assign=True)
        layers[name] = layer
    return config, layers


def _pattern_value(pattern: dict, name: str, default):
    # PEFT matches pattern keys as regexes against the end of the module name.
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def read_peft_lora(directory: str | os.PathLike
                   ) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor, float]],
                              dict[str, torch.Tensor]]:
    """(config, {module: (A, B, scaling)}, {"module.param": tensor saved whole}) of a PEFT LoRA
    directory; delta = scaling * B A, scaling from lora_alpha / alpha_pattern / rsLoRA."""
    config, tensors = _read_pair(Path(directory), check_sha=False)

    def fail(message):
        raise AdapterError(f"{str(directory)!r}: {message}")

    if config.get("peft_type") != "LORA":
        fail(f"not a PEFT LoRA adapter (peft_type={config.get('peft_type')!r})")
    for flag in ("use_dora", "lora_bias"):
        if config.get(flag):
            fail(f"{flag}=True adapters are not supported")
    names, whole = [], {}
    for key in tensors:
        if not key.startswith(PEFT_PREFIX):
            fail(f"unexpected tensor {key!r}")
        path = key[len(PEFT_PREFIX):]
        if path.endswith(".lora_A.weight"):
            names.append(path[: -len(".lora_A.weight")])
        elif not path.endswith(".lora_B.weight"):
            if "lora_" in path:
                fail(f"unsupported LoRA tensor {key!r}")
            whole[path] = tensors[key]
    if not names:
        fail("the adapter holds no lora_A/lora_B tensors")
    factors = {}
    for name in sorted(names):
        A = tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"]
        B = tensors.get(f"{PEFT_PREFIX}{name}.lora_B.weight")
        if B is None or A.dim() != 2 or B.dim() != 2 or B.shape[1] != A.shape[0]:
            fail(f"layer {name!r}: lora_A {tuple(A.shape)} and lora_B "
                 f"{None if B is None else tuple(B.shape)} are not a LoRA pair")
        r = A.shape[0]
        alpha = _pattern_value(config.get("alpha_pattern"), name, config.get("lora_alpha", 8))
        factors[name] = (A, B, alpha / (math.sqrt(r) if config.get("use_rslora") else r))
    return config, factors, whole


def import_peft(model: nn.Module, directory: str | os.PathLike, num_experts: int = 4,
                **layer_kwargs) -> nn.Module:
    """Turn a PEFT LoRA adapter directory into SOS layers with unchanged outputs.

    Each LoRA of rank r becomes `num_experts` experts of rank r / num_experts (r must divide);
    B absorbs PEFT's scaling divided by the SOS scales, so B_sos * scales = B_peft * alpha / r.
    `layer_kwargs` are SOSLinear's (alpha, gamma_max, scale_mode, ...; rank comes from the file).
    """
    def fail(message):
        raise AdapterError(f"import_peft({str(directory)!r}): {message}")

    if "rank" in layer_kwargs or "rank_mode" in layer_kwargs:
        fail("rank and rank_mode come from the adapter; do not pass them")
    config, factors, whole = read_peft_lora(directory)
    if config.get("fan_in_fan_out"):
        fail("fan_in_fan_out=True adapters (GPT-2 Conv1D layers) are not supported")
    for name, (A, B, _) in factors.items():
        base = _module(model, name)
        if base is None or not isinstance(base, nn.Linear) or isinstance(base, AdapterLinear):
            fail(f"layer {name!r}: the model has no plain nn.Linear of that name")
        if B.shape != (base.out_features, A.shape[0]) or A.shape[1] != base.in_features:
            fail(f"layer {name!r}: LoRA factors of shapes {tuple(A.shape)} and "
                 f"{tuple(B.shape)} do not fit the model's "
                 f"({base.in_features} -> {base.out_features}) layer")
        if A.shape[0] % num_experts:
            fail(f"layer {name!r}: LoRA rank {A.shape[0]} is not divisible by "
                 f"num_experts={num_experts}")
    for path, t in whole.items():
        module_name, _, param = path.rpartition(".")
        module = _module(model, module_name)
        own = dict(module.named_parameters(recurse=False)) if module is not None else {}
        if param not in own or own[param].shape != t.shape:
            fail(f"module to save {module_name!r}: parameter {param!r} does not fit the model")
    SOSConfig(num_experts=num_experts, rank=num_experts, **{k: v for k, v in layer_kwargs.items()
                                                           if k != "dtype"})  # validate kwargs

    for name, (A, B, scaling) in factors.items():
        layer = SOSLinear(model.get_submodule(name), num_experts=num_experts, rank=A.shape[0],
                          rank_mode="total", **layer_kwargs)
        with torch.no_grad():
            layer.lora_A.copy_(A)
            layer.lora_B.copy_(B.double() * scaling / layer._rank_scale().double())
        replace_module(model, name, layer)
    kept = []
    with torch.no_grad():
        for path, t in whole.items():
            module_name, _, param = path.rpartition(".")
            module = model.get_submodule(module_name)
            getattr(module, param).copy_(t)
            kept.append(module)
    freeze_all_but_adapters(model, keep_trainable=kept)
    return model
