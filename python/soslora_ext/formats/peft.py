"""PEFT's LoRA format: the whole update of a layer is one LoRA (rank r_tot for SOS, the sum of
the cluster ranks for CPS, each cluster's block placed at its rows and columns), with the
scales (and the gate) folded into B. ``export_peft`` writes it with lora_alpha = r, so PEFT's
scaling is 1; ``import_peft`` turns a PEFT LoRA into SOS layers.

Files are written and read as files.py describes (the config is PEFT's own, with nothing
added: the weights' metadata records which config they belong to), and checked by checks.py
and peft_checks.py, on the way out as on the way in."""
from __future__ import annotations

import collections
import hashlib
import json
import os
import re
from pathlib import Path

import torch
import torch.nn as nn

from ..layers import kinds
from ..layers.base import AdapterLinear, base_features, is_adaptable
from ..layers.config import SOSConfig
from ..layers.distributed import full, is_writer
from ..layers.model import adapter_layers, freeze_all_but_adapters, modules_to_save, replace_module
from ..layers.sos import SOSLinear
from . import checks as check
from . import peft_checks
from .checks import NESTED_OUT_PROJ
from .files import CONFIG_SHA256_KEY, AdapterError, read_pair, save_pair
from .kind_entries import kind_entry, meta_base
from .lock import DEFAULT_LOCK_TIMEOUT, check_lock_timeout
from .peft_checks import PEFT_PREFIX, factor_keys


def _own_state(layer: AdapterLinear) -> dict[str, torch.Tensor]:
    """The adapter's state-dict entries, without its base's."""
    if not layer.quantized:
        return {k: v for k, v in layer.state_dict().items() if not k.startswith("base_layer.")}
    # A bitsandbytes 4-bit layer's state_dict() rewrites its weight when an inference forward
    # has repacked it for the CPU (bitsandbytes 0.50): later outputs change. Read the
    # adapter's own parameters and buffers without asking the base.
    state: dict[str, torch.Tensor] = {}
    nn.Module._save_to_state_dict(layer, state, "", keep_vars=False)
    return state


def layer_state(layer: AdapterLinear) -> dict[str, torch.Tensor]:
    """The adapter's tensors (whole, also when the model is sharded)."""
    return {k: full(v) for k, v in _own_state(layer).items()}


def unsharded(layer: AdapterLinear) -> AdapterLinear:
    """`layer` itself, or for a sharded one a copy on a weightless base with gathered tensors."""
    from torch.distributed.tensor import DTensor

    if not any(isinstance(t, DTensor) for t in _own_state(layer).values()):
        return layer
    entry = kind_entry(layer)
    kernel = tuple(entry["kernel_size"]) if "kernel_size" in entry else None
    base = meta_base(entry.get("base_kind"), kernel, layer.in_features, layer.out_features)
    copy = type(layer)(base, dtype=layer.lora_A.dtype, **layer.config.to_dict())
    copy.load_state_dict(layer_state(layer), strict=False, assign=True)
    return copy


def folded_factors(layer: AdapterLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B * scales) in float32 (float64 for float64 factors): the layer's update is B A."""
    with torch.no_grad():
        A, B, scale = layer._update_factors()
        acc = torch.promote_types(A.dtype, torch.float32)
        return A.detach().to(acc), B.detach().to(acc) * scale.detach().to(acc)


# PEFT (0.21.2, pinned by tests/formats/test_peft_kinds.py) adds an nn.MultiheadAttention's
# out_proj update twice, in its forward and in merge_and_unload alike (MultiheadAttention.merge
# writes W + delta into out_proj, then calls out_proj.merge(), which adds delta again): the
# update its out_proj factors give is twice scaling * B A. Export halves B, import doubles it.
PEFT_OUT_PROJ_FACTOR = 2.0


def peft_refusal(base: nn.Module, name: str) -> str | None:
    """Why PEFT cannot compute an adapter of base `name` as ours does, or None. PEFT (0.21)
    builds a convolution's lora_A with the base's kernel, stride and padding but not its
    dilation: on a dilated kernel its forward is not the update's."""
    if isinstance(kinds.kind_of(base), kinds.ConvKind) and any(
            d != 1 for d, k in zip(base.dilation, base.kernel_size) if k > 1):
        return (f"layer {name!r} is a {type(base).__name__} with dilation "
                f"{tuple(base.dilation)}: PEFT's convolution adapter ignores the base's "
                "dilation (its lora_A has only the kernel, stride and padding), so no PEFT "
                "adapter computes this layer's update; use save_adapter for it")
    return None


def peft_factors(layer: AdapterLinear, A: torch.Tensor, B: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """A [r, in] and B [out, r] of the matrix view in PEFT's layout for the layer's base: a
    convolution's A [r, in, *k] and B [out, r, 1, ...]; other kinds' as they are."""
    base = layer.base_layer
    if isinstance(layer._kind, kinds.ConvKind):
        return (A.reshape(A.shape[0], base.in_channels, *base.kernel_size),
                B.reshape(*B.shape, *(1,) * len(base.kernel_size)))
    return A, B


def write_peft_lora(directory: str | os.PathLike,
                    factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
                    whole: dict[str, torch.Tensor] | None = None,
                    fan_in_fan_out: bool = False, *,
                    lock_timeout: float | None = DEFAULT_LOCK_TIMEOUT,
                    embeddings: frozenset = frozenset(),
                    nested: frozenset = frozenset()) -> Path:
    """Write {module: (A [r, in], B [out, r])} as a PEFT LoRA with delta = B A per module
    (a convolution's in PEFT's layout, A [r, in, *k] and B [out, r, 1, ...]: peft_factors).
    `fan_in_fan_out` marks adapters of Conv1D layers (weight [in, out], GPT-2); the factors have
    the same shapes either way, and PEFT decides per layer from its type. `embeddings` names
    the embedding layers (PEFT's lora_embedding_A/B tensors); `nested` the out_proj adapters
    of attention modules ("x.base_layer.out_proj"), which PEFT makes for the attention module
    "x" and which are not target modules themselves.

    lora_alpha = r for every module, so PEFT's scaling alpha / r is 1 and B carries all scales;
    modules of another rank get rank_pattern / alpha_pattern entries. `whole` holds tensors of
    modules saved whole ("module.param" -> tensor), PEFT's modules_to_save. What is written is
    checked as read_peft_lora checks it: nothing is written if it would be refused. Another
    save holding the directory's lock is waited for at most `lock_timeout` seconds.
    """
    from safetensors.torch import save

    where = f"write_peft_lora({str(directory)!r})"
    lock_timeout = check_lock_timeout(lock_timeout, where)
    if not factors:
        raise AdapterError(f"{where}: no layers to write")
    whole = whole or {}

    def tensors_or_fail(what, value, n):
        if not (isinstance(value, (tuple, list)) and len(value) == n
                and all(isinstance(t, torch.Tensor) for t in value)):
            expected = "an (A, B) pair of tensors" if n == 2 else "a torch.Tensor"
            raise AdapterError(f"{where}: {what} must be {expected}, got {str(value)[:100]}")

    for name, value in factors.items():
        tensors_or_fail(f"factors[{name!r}]", value, 2)
    for name, value in whole.items():
        tensors_or_fail(f"whole[{name!r}]", (value,), 1)
    tensors, ranks = {}, {}
    for name, (A, B) in factors.items():
        key_A, key_B = factor_keys(name, name in embeddings)
        tensors[key_A], tensors[key_B] = A, B
        ranks[name] = A.shape[0] if A.dim() else 0
    tensors.update({PEFT_PREFIX + k: v for k, v in whole.items()})
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    pattern = {re.escape(name): rank for name, rank in ranks.items() if rank != r}
    saved = sorted({k.rpartition(".")[0] for k in whole})
    config = dict(peft_type="LORA", task_type=None, r=r, lora_alpha=r, rank_pattern=pattern,
                  alpha_pattern=dict(pattern),
                  target_modules=sorted(set(factors) - set(nested)),
                  modules_to_save=saved or None, lora_dropout=0.0, bias="none",
                  fan_in_fan_out=fan_in_fan_out, use_rslora=False, use_dora=False,
                  init_lora_weights=True, inference_mode=True, base_model_name_or_path=None)
    peft_checks.check_peft_config(config, where)
    peft_checks.check_peft_header(config, check.header_of(tensors), where)
    check.check_finite(tensors, where)
    config_bytes = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
    metadata = {"format": "pt", CONFIG_SHA256_KEY: hashlib.sha256(config_bytes).hexdigest()}
    return save_pair(Path(directory), config_bytes, save(tensors, metadata=metadata),
                     lock_timeout, where)


def check_one_name_each(aliases: dict[str, list[str]], kinds: dict[str, str], where: str):
    """Refuse modules registered under several names ({name: other names}; `kinds` says what
    each is): PEFT adapts, and saves whole, a module only under the first of its names
    (peft.get_peft_model and PeftModel.from_pretrained walk named_modules(), which yields a
    module once), so no PEFT adapter gives the outputs of a model that adapts it under all."""
    if aliases:
        name, others = next(iter(aliases.items()))
        raise AdapterError(
            f"{where}: {kinds.get(name, 'layer')} {name!r} is registered under several names "
            f"(also {', '.join(map(repr, others))}); PEFT adapts a module only under the first "
            "of its names (peft.get_peft_model and PeftModel.from_pretrained leave the others "
            "plain), so no PEFT adapter gives this model's outputs. Save it with save_adapter, "
            "which records every name, or give each name its own module; nothing was written")


def export_peft(model: nn.Module, directory: str | os.PathLike, *,
                lock_timeout: float | None = DEFAULT_LOCK_TIMEOUT) -> Path:
    """Write the adapters as a standard PEFT LoRA (scales folded into B; a CPS layer's clusters
    placed at their rows and columns) that ``peft.PeftModel.from_pretrained(base, directory)``
    loads with the same outputs; ``fan_in_fan_out`` is set when the layers are Conv1D (GPT-2).
    A module registered under several names is refused (check_one_name_each). Another save
    holding the directory's lock is waited for at most `lock_timeout` seconds (None: no limit).
    In a distributed run every rank calls it; rank 0 writes."""
    where = f"export_peft({str(directory)!r})"
    lock_timeout = check_lock_timeout(lock_timeout, where)
    layers = dict(adapter_layers(model))
    if not layers:
        raise AdapterError("export_peft: the model has no adapted (SOSLinear/CPSLinear) layers")
    saved = modules_to_save(model)
    check_one_name_each(check.other_names(model, {**layers, **saved}),
                        {name: "module saved whole" for name in saved}, "export_peft")
    factors = {}
    for name, layer in layers.items():
        if layer.merged:
            raise AdapterError(f"export_peft: layer {name!r} is merged; unmerge() it first")
        if refusal := peft_refusal(layer.base_layer, name):
            raise AdapterError(f"export_peft: {refusal}")
        factors[name] = peft_factors(layer, *folded_factors(unsharded(layer)))
    embeddings = frozenset(name for name, layer in layers.items()
                           if isinstance(layer._kind, kinds.EmbeddingKind))
    nested = frozenset(f"{name}{NESTED_OUT_PROJ}" for name, layer in layers.items()
                       if layer.nested_adapters())
    for name in nested:
        A, B = factors[name]
        factors[name] = (A, B / PEFT_OUT_PROJ_FACTOR)
    whole = {f"{name}.{k}": full(v) for name, module in saved.items()
             for k, v in module.named_parameters(recurse=False)}
    if not is_writer():
        return Path(directory)
    # PEFT reads the flag per layer from its type (and warns where they differ): it is set
    # when the layers are Conv1D, as PEFT's own GPT-2 adapters have it.
    fan_in_fan_out = any(layer.fan_in_fan_out for layer in layers.values())
    return write_peft_lora(directory, factors, whole, fan_in_fan_out=fan_in_fan_out,
                           lock_timeout=lock_timeout, embeddings=embeddings, nested=nested)


def read_peft_checked(directory: str | os.PathLike):
    """(config, plan, tensors, where) of a PEFT LoRA directory whose config and header passed
    peft_checks and whose tensors are finite: what read_peft_lora and compose's reader share."""
    where = repr(str(directory))

    def validate(config):
        peft_checks.check_peft_config(config, where)
        return lambda header: peft_checks.check_peft_header(config, header, where)

    config, tensors = read_pair(directory, validate)
    plan = peft_checks.check_peft_header(config, check.header_of(tensors), where)
    check.check_finite(tensors, where)
    return config, plan, tensors, where


def check_scaling(where: str, name: str, B: torch.Tensor, scaling: float) -> None:
    """Refuse a layer whose lora_B times its scaling overflows: a huge lora_alpha (or
    alpha_pattern entry) overflows delta = scaling * B A."""
    acc = torch.float64 if B.dtype == torch.float64 else torch.float32
    if not torch.isfinite(B.to(acc) * scaling).all():
        check.fail(where, f"layer {name!r}: lora_B times the scaling {scaling:g} (lora_alpha "
                          f"/ r) overflows {acc}")


def read_peft_lora(directory: str | os.PathLike
                   ) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor, float]],
                              dict[str, torch.Tensor]]:
    """(config, {module: (A, B, scaling)}, {"module.param": tensor saved whole}) of a PEFT LoRA
    directory; delta = scaling * B A, scaling from lora_alpha / alpha_pattern / rsLoRA."""
    config, plan, tensors, where = read_peft_checked(directory)
    # As [r, in] and [out, r] of the matrix view (a convolution's flattened).
    factors = {name: (tensors[plan.keys(name)[0]].flatten(1),
                      tensors[plan.keys(name)[1]].flatten(1), scaling)
               for name, (_, scaling) in plan.layers.items()}
    for name, (_, B, scaling) in factors.items():
        check_scaling(where, name, B, scaling)
    return config, factors, {p: tensors[PEFT_PREFIX + p] for p in plan.whole}


def import_peft(model: nn.Module, directory: str | os.PathLike, num_experts: int = 4,
                **layer_kwargs) -> nn.Module:
    """Turn a PEFT LoRA adapter directory into SOS layers with unchanged outputs.

    Each LoRA of rank r becomes `num_experts` experts of rank r / num_experts (r must divide);
    B absorbs PEFT's scaling divided by the SOS scales, so B_sos * scales = B_peft * alpha / r.
    `layer_kwargs` are SOSLinear's (alpha, gamma_max, scale_mode, ...; rank comes from the file).
    Everything is checked before the model changes.
    """
    where = f"import_peft({str(directory)!r})"

    def fail(message):
        raise AdapterError(f"{where}: {message}")

    if "rank" in layer_kwargs or "rank_mode" in layer_kwargs:
        fail("rank and rank_mode come from the adapter; do not pass them")
    if type(num_experts) is not int or num_experts < 1:
        fail(f"num_experts must be a positive int, got {num_experts!r}")
    dtype = layer_kwargs.get("dtype")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        fail(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    try:  # validate the layer arguments
        SOSConfig(num_experts=num_experts, rank=num_experts,
                  **{k: v for k, v in layer_kwargs.items() if k != "dtype"})
    except (TypeError, ValueError) as e:
        fail(str(e))
    # fan_in_fan_out needs nothing here: the factors' shapes are the same for a Conv1D
    # (weight [in, out]) and an nn.Linear, and each layer's type decides, as in PEFT.
    config, factors, whole = read_peft_lora(directory)
    # An attention module's out_proj LoRA ("x.base_layer.out_proj" in PEFT's names) goes to
    # the out_proj adapter that the attention module's layer makes.
    nested = {name: (A, B, scaling * PEFT_OUT_PROJ_FACTOR)
              for name, (A, B, scaling) in factors.items() if name.endswith(NESTED_OUT_PROJ)
              and name[: -len(NESTED_OUT_PROJ)] in factors}
    factors = {name: f for name, f in factors.items() if name not in nested}
    for name, (A, B, _) in list(factors.items()) + list(nested.items()):
        outer = name[: -len(NESTED_OUT_PROJ)] if name in nested else None
        if outer is not None:
            base = check.model_module(model, outer, where, "layer").out_proj
        else:
            base = check.model_module(model, name, where, "layer")
        if not is_adaptable(base) or isinstance(base, AdapterLinear):
            fail(f"layer {name!r}: the model has no plain nn.Linear, Conv1D, nn.Embedding, "
                 "nn.Conv1d/2d/3d or nn.MultiheadAttention of that name")
        if refusal := peft_refusal(base, name):
            fail(refusal)
        if outer is None and isinstance(kinds.kind_of(base), kinds.AttentionKind) \
                and f"{name}{NESTED_OUT_PROJ}" not in nested:
            fail(f"layer {name!r}: an nn.MultiheadAttention's LoRA needs its out_proj factors "
                 f"({name}{NESTED_OUT_PROJ}), as PEFT saves them")
        in_features, out_features = base_features(base)
        if B.shape != (out_features, A.shape[0]) or A.shape[1] != in_features:
            fail(f"layer {name!r}: LoRA factors of shapes {tuple(A.shape)} and "
                 f"{tuple(B.shape)} do not fit the model's "
                 f"({in_features} -> {out_features}) layer")
        if A.shape[0] % num_experts:
            fail(f"layer {name!r}: LoRA rank {A.shape[0]} is not divisible by "
                 f"num_experts={num_experts}")
    for path, t in whole.items():
        module_name, _, param = path.rpartition(".")
        module = check.model_module(model, module_name, where, "module to save")
        own = dict(module.named_parameters(recurse=False))
        if param not in own or own[param].shape != t.shape:
            fail(f"module to save {module_name!r}: parameter {param!r} does not fit the model")

    layers = {}  # every layer built and checked before the model changes
    for name, (A, B, scaling) in factors.items():
        base = model.get_submodule(name)
        if nested.get(f"{name}{NESTED_OUT_PROJ}", (A,))[0].shape[0] != A.shape[0]:
            fail(f"layer {name!r}: its out_proj LoRA has another rank than its in_proj's")
        layer = SOSLinear(base, num_experts=num_experts, rank=A.shape[0],
                          rank_mode="total", **layer_kwargs)
        parts = [(name, layer, (A, B, scaling))] + [
            (f"{name}{NESTED_OUT_PROJ}", inner, nested[f"{name}{NESTED_OUT_PROJ}"])
            for inner in layer.nested_adapters()]
        for part, adapter, (A_p, B_p, scaling_p) in parts:
            with torch.no_grad():
                adapter.lora_A.copy_(A_p)
                adapter.lora_B.copy_(B_p.double() * scaling_p / adapter._rank_scale().double())
            try:
                check.check_finite({"lora_A": adapter.lora_A, "lora_B": adapter.lora_B}, "")
            except AdapterError:
                fail(f"layer {part!r}: the LoRA factors times the scaling overflow "
                     f"{adapter.lora_B.dtype}")
        layers[name] = layer
    for name, layer in layers.items():
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
