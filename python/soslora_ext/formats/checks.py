"""What an adapter's config and tensors must satisfy: the checks both formats share, and our
format's (PEFT's LoRA format: peft_checks.py).

One set of checks, run by every reader and by every writer (so nothing is written that would
be refused when read). They run in three phases, each before anything costlier happens:
the config (types, names, sizes: before the weights file is opened), the safetensors header
({name: (dtype, shape)}: before any tensor data is read or allocated), then the values
(non-finite numbers, CPS partitions). Every failure is an AdapterError naming the layer,
tensor or key."""
from __future__ import annotations

import collections
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..layers import kinds
from ..layers.base import AdapterLinear, base_features, is_adaptable
from ..layers.config import CPSConfig, SOSConfig, is_int
from ..layers.cps import CPSLinear, check_fits, check_partition
from ..layers.sos import SOSLinear
from ..ops import accumulate_dtype
from .files import CONFIG_NAME, WEIGHTS_NAME, AdapterError
from .kind_entries import check_kind_entry

METHODS = {"sos": SOSLinear, "cps": CPSLinear}
FACTOR_DTYPES = {str(d).removeprefix("torch."): d
                 for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}


def fail(where: str, message: str):
    raise AdapterError(f"{where}: {message}")


# ---- names -----------------------------------------------------------------------------------
# The name of an attention module's out_proj adapter under the attention adapter's.
NESTED_OUT_PROJ = ".base_layer.out_proj"


def nested_in(name: str, layers) -> str | None:
    """The attention layer among `layers` whose out_proj adapter `name` is, or None."""
    outer = name[: -len(NESTED_OUT_PROJ)] if name.endswith(NESTED_OUT_PROJ) else None
    return outer if outer in layers else None


def check_names(where: str, adapted, whole=()) -> None:
    """Module names are dotted paths; none is, or lies inside, an adapted layer but itself
    (e.g. "x.base_layer" beside "x"), so no tensor is claimed twice. The one exception: an
    attention module's out_proj adapter, "x.base_layer.out_proj" beside "x" (as PEFT's)."""
    adapted, whole = list(adapted), list(whole)
    for name in adapted + whole:
        if not isinstance(name, str) or not name or "" in name.split("."):
            fail(where, f"module name {name!r} is not a dotted module path")
    layers = set(adapted)
    nested = {name for name in adapted if name.endswith(NESTED_OUT_PROJ)
              and name[: -len(NESTED_OUT_PROJ)] in layers}
    for name in adapted + whole:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            outer = ".".join(parts[:i])
            if name in nested and outer == name[: -len(NESTED_OUT_PROJ)]:
                continue
            if outer in layers and (outer != name or name in whole):
                fail(where, f"module {name!r} is, or lies inside, the adapted layer {outer!r}")


def names_by_module(model: nn.Module) -> dict[int, list[str]]:
    """Every name of every module of `model` (one registered twice has two), by id()."""
    names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    return names


def other_names(model: nn.Module, named: dict[str, nn.Module]) -> dict[str, list[str]]:
    """{name: the module's other names in `model`} for the modules of `named` registered under
    several names (what a save records as ``aliases``)."""
    names = names_by_module(model)
    others = {name: [n for n in names.get(id(m), []) if n != name] for name, m in named.items()}
    return {name: o for name, o in others.items() if o}


def check_aliases(config: dict, where: str) -> dict[str, list[str]] | None:
    """The config's ``aliases`` ({recorded name: other names of that module}), checked: each
    key a layer or a module saved whole, no name given twice (None: a config saved before
    names were recorded)."""
    modules, saved = config.get("modules") or {}, config.get("modules_to_save") or {}
    aliases = config.get("aliases")
    if aliases is None:
        return None
    if not isinstance(aliases, dict) or not all(
            isinstance(v, list) and all(isinstance(n, str) for n in v) for v in aliases.values()):
        fail(where, f"{CONFIG_NAME}: aliases must map module names to lists of their other "
                    f"names, got {str(aliases)[:200]}")
    for name in aliases:
        if name not in modules and name not in saved:
            fail(where, f"{CONFIG_NAME}: aliases names {name!r}, which is neither adapted nor "
                        "saved whole")
    every = collections.Counter([*modules, *saved, *(n for v in aliases.values() for n in v)])
    twice = sorted(n for n, count in every.items() if count > 1)
    if twice:
        fail(where, f"{CONFIG_NAME}: module names {twice[:5]} are named twice (as layers, "
                    "modules saved whole or aliases)")
    check_names(where, [*modules, *(n for m in modules for n in aliases.get(m, []))],
                [*saved, *(n for m in saved for n in aliases.get(m, []))])
    return aliases


def model_module(model: nn.Module, name: str, where: str, what: str) -> nn.Module:
    """The module `name` of `model`, which must not lie inside an adapted layer."""
    module = model
    for i, part in enumerate(name.split(".")):
        if isinstance(module, AdapterLinear):
            fail(where, f"{what} {name!r} lies inside the adapted layer "
                        f"{'.'.join(name.split('.')[:i])!r}")
        module = getattr(module, "_modules", {}).get(part)
        if module is None:
            fail(where, f"{what} {name!r}: no such module in {type(model).__name__}")
    return module


def check_model_layer(model: nn.Module, name: str, shape: tuple, where: str,
                      kind: str | None = None, kernel: tuple | None = None) -> nn.Module:
    """The plain layer `name` of `model` (an attention adapter's "x.base_layer.out_proj":
    the out_proj of the attention module "x"), of (in_features, out_features) `shape` and the
    saved kind (None: an nn.Linear or Conv1D) and kernel size."""
    if name.endswith(NESTED_OUT_PROJ):
        outer = model_module(model, name[: -len(NESTED_OUT_PROJ)], where, "layer")
        base = getattr(outer, "out_proj", None)
    else:
        base = model_module(model, name, where, "layer")
    if isinstance(base, AdapterLinear):
        fail(where, f"layer {name!r} already has an adapter; load into a fresh model")
    found = kinds.kind_of(base)
    if not is_adaptable(base) or (found.name if found else None) != kind:
        fail(where, f"layer {name!r} is a {type(base).__name__}, not "
                    f"{'an nn.Linear or Conv1D' if kind is None else 'an nn.' + kind}")
    if kernel is not None and tuple(base.kernel_size) != kernel:
        fail(where, f"layer {name!r}: adapter is for kernel size {kernel}, the model's layer "
                    f"has {tuple(base.kernel_size)}")
    if tuple(shape) != base_features(base):
        fail(where, f"layer {name!r}: adapter is for in/out features {tuple(shape)}, the model's "
                    f"layer is {base_features(base)}")
    return base


def check_finite(tensors: dict[str, torch.Tensor], where: str) -> None:
    for key, t in tensors.items():
        # isfinite has no float8 kernels: widen 1-byte floats first.
        if t.is_floating_point() and not torch.isfinite(t.float() if t.element_size() == 1
                                                        else t).all():
            fail(where, f"tensor {key!r} has non-finite values")


def header_of(tensors: dict[str, torch.Tensor]) -> dict:
    """What a safetensors header would record for `tensors`: {name: (dtype, shape)}."""
    return {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()}


def _compare(where: str, what: str, got, expected) -> None:
    """`got` (dtype, shape) is `expected`; with no expectation, any floating-point tensor."""
    if got is None:
        fail(where, f"{what} is missing")
    if expected is None and not got[0].is_floating_point:
        fail(where, f"{what} is {got[0]}, expected a floating-point tensor")
    if expected is not None and tuple(got) != tuple(expected):
        fail(where, f"{what} is {got[0]} {tuple(got[1])}, expected {expected[0]} "
                    f"{tuple(expected[1])}")


# ---- our format ------------------------------------------------------------------------------
def layer_tensors(method: str, config, in_features: int, out_features: int,
                  dtype: torch.dtype, taps: int = 1) -> dict:
    """{key: (dtype, shape)} of what a layer of this configuration saves, from its
    hyperparameters alone (no layer is built: sizes are checked before anything is allocated).
    `taps`: a convolution's kernel taps (CPS-LoRA clusters its in_features / taps channels)."""
    acc = accumulate_dtype(dtype)
    if method == "sos":
        K, r = config.num_experts, config.r_total
        spec = {"lora_A": (dtype, (r, in_features)), "lora_B": (dtype, (out_features, r)),
                "fixed_scales": (acc, (K,)), "ortho_lambda": (acc, ())}
        if config.scale_mode == "channel":
            spec["expert_scales"] = (acc, (K, out_features))
        if config.gate:
            spec.update(gate_logits=(acc, (K,)), gate_temperature=(acc, ()))
        return spec
    G, r, long = config.num_clusters, config.r_max, torch.int64
    return {"lora_A": (dtype, (r, in_features)), "lora_B": (dtype, (out_features, r)),
            "row_index": (long, (out_features,)), "col_index": (long, (in_features // taps,)),
            "row_offsets": (long, (G + 1,)), "col_offsets": (long, (G + 1,)),
            "cluster_scales": (acc, (G,)), "partition_seed": (long, ()),
            "repartition_count": (long, ())}


@dataclass
class LayerPlan:
    """A checked layer entry: what to build (cls(base, dtype=dtype, **kwargs)) and its tensors."""

    cls: type
    kwargs: dict
    dtype: torch.dtype
    in_features: int
    out_features: int
    tensors: dict  # key -> (dtype, shape)
    kind: str | None = None  # the base's kind (KIND_NAMES), None for a linear layer
    kernel: tuple | None = None  # a convolution's kernel size

    @property
    def columns(self) -> int:
        """The columns CPS-LoRA clusters: a convolution's input channels."""
        return self.in_features // (math.prod(self.kernel) if self.kernel else 1)


@dataclass
class OwnPlan:
    layers: dict[str, LayerPlan] = field(default_factory=dict)
    whole: dict[str, dict] = field(default_factory=dict)  # module -> {param: spec or None}
    aliases: dict[str, list[str]] | None = None  # None: saved before names were recorded

    def aliases_of(self, name: str) -> list[str]:
        return list((self.aliases or {}).get(name, []))


def check_own_config(config: dict, where: str, model: nn.Module | None = None) -> OwnPlan:
    """The layers and modules saved whole that a config of our format describes; with `model`,
    also that each fits it. Raises AdapterError before anything is read or allocated."""
    modules, saved = config.get("modules"), config.get("modules_to_save")
    if not isinstance(modules, dict) or not modules:
        fail(where, f"{CONFIG_NAME} lists no adapted modules")
    saved = {} if saved is None else saved
    if not isinstance(saved, dict) or not all(
            isinstance(p, list) and all(isinstance(x, str) for x in p) and len(set(p)) == len(p)
            for p in saved.values()):
        fail(where, f"{CONFIG_NAME}: modules_to_save must map module names to lists of distinct "
                    f"parameter names, got {str(saved)[:200]}")
    check_names(where, modules, saved)
    plan = OwnPlan(aliases=check_aliases(config, where))
    metadata, base = config.get("metadata", {}), config.get("base_model_class")
    if not isinstance(metadata, dict):
        fail(where, f"{CONFIG_NAME}: metadata must be an object, got {str(metadata)[:100]}")
    if not (base is None or isinstance(base, str)):
        fail(where, f"{CONFIG_NAME}: base_model_class must be a string, got {str(base)[:100]}")
    for name, entry in modules.items():
        if not isinstance(entry, dict):
            fail(where, f"layer {name!r}: bad entry in {CONFIG_NAME} (expected an object)")
        shape = (entry.get("in_features"), entry.get("out_features"))
        try:
            kind, kernel = check_kind_entry(entry)
        except ValueError as e:
            fail(where, f"layer {name!r}: bad entry in {CONFIG_NAME} ({e})")
        if model is not None:
            for each in [name] + plan.aliases_of(name):
                check_model_layer(model, each, shape, where, kind, kernel)
        taps = math.prod(kernel) if kernel else 1
        try:
            method = entry.get("method", "sos")  # files written before CPS-LoRA are all SOS
            if method not in METHODS:
                raise ValueError(f"unknown method {method!r}")
            if not all(is_int(n) and n > 0 for n in shape):
                raise ValueError(f"in_features and out_features must be positive ints, got "
                                 f"{shape}")
            if not isinstance(entry.get("bias"), bool):
                raise ValueError(f"bias must be a bool, got {entry.get('bias')!r}")
            if entry.get("dtype") not in FACTOR_DTYPES:
                raise ValueError(f"dtype must be one of {sorted(FACTOR_DTYPES)}, got "
                                 f"{entry.get('dtype')!r}")
            kwargs = entry.get("config")
            if not isinstance(kwargs, dict):
                raise ValueError(f"config must be an object, got {kwargs!r}")
            hyper = (SOSConfig if method == "sos" else CPSConfig)(**kwargs)
            if method == "cps":
                check_fits(hyper, shape[1], shape[0] // taps, taps=taps)
        except (TypeError, ValueError) as e:
            fail(where, f"layer {name!r}: bad entry in {CONFIG_NAME} ({e})")
        dtype = FACTOR_DTYPES[entry["dtype"]]
        plan.layers[name] = LayerPlan(METHODS[method], dict(kwargs), dtype, *shape,
                                      layer_tensors(method, hyper, *shape, dtype, taps),
                                      kind, kernel)
    for name, params in saved.items():
        own = {}
        for each in [name] + plan.aliases_of(name) if model is not None else []:
            found = dict(model_module(model, each, where, "module to save").named_parameters(
                recurse=False))
            own = own or found  # the first name's; its other names' must be alike
            for p in params:
                if p not in found or (found[p].dtype, found[p].shape) != (own[p].dtype,
                                                                         own[p].shape):
                    fail(where, f"module to save {each!r}: parameter {p!r} is missing or has "
                                "the wrong shape")
        plan.whole[name] = {p: (own[p].dtype, tuple(own[p].shape)) if p in own else None
                            for p in params}
    return plan


def check_own_header(plan: OwnPlan, header: dict, where: str) -> None:
    """The weights hold exactly the tensors the config describes, of its dtypes and shapes."""
    expected = set()
    for name, layer in plan.layers.items():
        for key, spec in layer.tensors.items():
            expected.add(f"{name}.{key}")
            _compare(where, f"layer {name!r}: tensor {key!r}", header.get(f"{name}.{key}"), spec)
    for name, params in plan.whole.items():
        for p, spec in params.items():
            expected.add(f"{name}.{p}")
            _compare(where, f"module to save {name!r}: parameter {p!r}",
                     header.get(f"{name}.{p}"), spec)
    extra = sorted(set(header) - expected)
    if extra:
        fail(where, f"{WEIGHTS_NAME} holds tensors that no layer uses: {extra[:5]}")


def check_own_values(plan: OwnPlan, tensors: dict[str, torch.Tensor], where: str) -> None:
    check_finite(tensors, where)
    for name, layer in plan.layers.items():
        if layer.cls is CPSLinear:
            t = {k: tensors[f"{name}.{k}"] for k in ("row_index", "row_offsets", "col_index",
                                                      "col_offsets")}
            try:
                check_partition(t["row_index"], t["row_offsets"].tolist(), layer.out_features,
                                "rows")
                check_partition(t["col_index"], t["col_offsets"].tolist(), layer.columns,
                                "columns")
            except ValueError as e:
                fail(where, f"layer {name!r}: {e}")


# ---- where the layers go -----------------------------------------------------------------------
def modules_named(model: nn.Module, names: list[str]) -> list[nn.Module]:
    """The distinct modules of `model` under `names`, in order."""
    modules = {}
    for name in names:
        module = model.get_submodule(name)
        modules.setdefault(id(module), module)
    return list(modules.values())


def placements(model: nn.Module, plan: OwnPlan, where: str) -> list[tuple[str, nn.Module, list]]:
    """(saved layer, base module, the names it goes under) for every layer of a checked plan:
    one per distinct module of `model` under the layer's names; without recorded names (an
    adapter saved before they were), the names `model` gives the module. As apply_* does, a
    module takes its adapter under every name `model` gives it (one left plain would bypass the
    adapter, and a merge would change it): a module of `model` under a name the adapter does
    not record for its layer, or two saved layers that are one module of `model`, are refused
    (the model is not built as the one the adapter was saved from)."""
    recorded = {*plan.layers, *plan.whole, *(n for v in (plan.aliases or {}).values() for n in v)}
    every = names_by_module(model)
    layer_of = {n: layer for layer in plan.layers for n in [layer] + plan.aliases_of(layer)}
    placed = []
    for name in plan.layers:
        if nested_in(name, plan.layers):
            continue  # made by its attention layer (load_adapter)
        names = [name] + plan.aliases_of(name)
        if plan.aliases is None:
            names += [n for n in every[id(model.get_submodule(name))]
                      if n != name and n not in recorded]
        groups: dict[int, tuple[nn.Module, list[str]]] = {}
        for each in names:
            base = model.get_submodule(each)
            groups.setdefault(id(base), (base, []))[1].append(each)
        for base, group in groups.values():
            unnamed = [n for n in every[id(base)] if n not in group]
            if unnamed and unnamed[0] in layer_of:
                fail(where, f"layers {group[0]!r} and {unnamed[0]!r} are one module in "
                            f"{type(model).__name__}, but the adapter holds a layer for each; "
                            "load it into a model built as the one it was saved from")
            if unnamed:
                fail(where, f"layer {group[0]!r}: {type(model).__name__} also registers it as "
                            f"{unnamed[0]!r}, a name the adapter does not record for it (it was "
                            "saved from a model where that is another module); the layer would "
                            "go under every name of the module, which changes what "
                            f"{unnamed[0]!r} computes: load it into a model built as the one it "
                            "was saved from")
            placed.append((name, base, group))
    return placed
