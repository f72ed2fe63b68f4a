"""What a PEFT LoRA adapter's config and tensors must satisfy to be imported (or written): the
fields of PEFT's LoraConfig, its initialisations, and each layer's tensors against r,
rank_pattern and alpha_pattern. The same phases as checks.py (config, then header), which
holds the checks both formats share."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ..layers.config import is_int, is_real
from .checks import check_names, fail
from .files import CONFIG_NAME

PEFT_PREFIX = "base_model.model."


def pattern_value(pattern: dict, name: str, default):
    # PEFT matches pattern keys as regexes against the end of the module name.
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


# PEFT re-applies these initialisations to the base weights whenever it loads the adapter
# (W <- W - scaling B0 A0, or a quantized W): the saved factors are an update of that changed
# base, not of the original model, so B A alone would give other outputs.
BASE_CHANGING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")
# The other initialisations only set the factors before training: B A is the whole update.
FACTOR_ONLY_INITS = ("gaussian", "eva", "orthogonal", "mica")


def check_peft_init(init, where: str) -> None:
    """Refuse an init_lora_weights that changes the base weights, or that we do not know."""
    if isinstance(init, bool):
        return
    name = init.lower() if isinstance(init, str) else None
    if name is not None and name.startswith(BASE_CHANGING_INITS):
        fail(where, f"{CONFIG_NAME}: init_lora_weights={init!r}: PEFT applies this "
                    "initialisation to the base weights when it loads the adapter, so its "
                    "factors are not an update of the original model. Convert it to a plain "
                    "LoRA with PEFT first (save_pretrained(..., path_initial_model_for_weight_"
                    "conversion=...) for PiSSA, OLoRA and CorDA), or merge it with PEFT and "
                    "adapt the merged model")
    if name not in FACTOR_ONLY_INITS:
        fail(where, f"{CONFIG_NAME}: init_lora_weights={init!r} is not an initialisation this "
                    f"package knows (expected true, false or one of {list(FACTOR_ONLY_INITS)})")


# Every field of PEFT's LoraConfig (peft 0.21), by what an import does with it.
# Read and honoured here:
PEFT_READ_FIELDS = ("peft_type", "r", "lora_alpha", "rank_pattern", "alpha_pattern",
                    "use_rslora", "fan_in_fan_out", "init_lora_weights", "target_modules",
                    "modules_to_save", "bias")
# Descriptive, training-only, or settings of an initialisation (init_lora_weights decides):
# none changes what the saved tensors compute, which name their modules themselves.
PEFT_INERT_FIELDS = ("task_type", "auto_mapping", "peft_version", "base_model_name_or_path",
                     "revision", "inference_mode", "lora_dropout", "exclude_modules",
                     "layers_to_transform", "layers_pattern", "megatron_core", "runtime_config",
                     "qalora_group_size", "eva_config", "corda_config", "loftq_config",
                     "lora_ga_config")
# Variants that change what the adapter computes, or what it adapts: refused unless off.
PEFT_UNSUPPORTED_FIELDS = {
    "use_dora": "DoRA (a learned magnitude per output channel)",
    "lora_bias": "a trained bias on lora_B",
    "megatron_config": "Megatron tensor-parallel layers",
    "trainable_token_indices": "trainable token embeddings",
    "layer_replication": "layer replication (it changes the model's layers)",
    "target_parameters": "LoRA on parameters rather than modules (e.g. MoE experts)",
    "use_qalora": "QA-LoRA (it pools the layer's input)",
    "alora_invocation_tokens": "activated LoRA (active only after its invocation tokens)",
    "arrow_config": "Arrow routing between adapters",
    "velora_config": "VeLoRA", "monteclora_config": "MonteCLoRA", "kasa_config": "KaSA",
    "use_bdlora": "block-diagonal LoRA",
    "ensure_weight_tying": "adapters tied across tied weights",
}


def _is_off(value) -> bool:
    """A PEFT field left at a value that turns its feature off."""
    return value is None or value is False or value == {} or value == []


def check_peft_fields(config: dict, where: str) -> None:
    """Every field is one this package reads, one that cannot change the imported model, or a
    feature left off: anything else is refused by name, never ignored."""
    for key, value in config.items():
        if key in PEFT_READ_FIELDS or key in PEFT_INERT_FIELDS or _is_off(value):
            continue
        if key in PEFT_UNSUPPORTED_FIELDS:
            fail(where, f"{CONFIG_NAME}: {key}={str(value)[:80]}: "
                        f"{PEFT_UNSUPPORTED_FIELDS[key]} is not supported; only plain LoRA "
                        "adapters can be imported (merge this one with PEFT's "
                        "merge_and_unload() and adapt the merged model)")
        fail(where, f"{CONFIG_NAME}: unknown field {key}={str(value)[:80]}: this package does "
                    "not know what it changes, so it will not import the adapter (it may come "
                    "from a newer PEFT)")
    bias = config.get("bias", "none")
    if bias in ("all", "lora_only"):
        fail(where, f"{CONFIG_NAME}: bias={bias!r}: the adapter trained the base layers' "
                    "biases, which this package keeps frozen and does not import. Merge it with "
                    "PEFT's merge_and_unload() and adapt the merged model, or train with "
                    "bias='none'")
    if bias != "none":
        fail(where, f"{CONFIG_NAME}: bias must be 'none', 'all' or 'lora_only', got {bias!r}")


def check_peft_config(config: dict, where: str) -> None:
    """The LoRA hyperparameters this package reads: their types and values; every other field
    known and inert, or off."""
    if config.get("peft_type") != "LORA":
        fail(where, f"not a PEFT LoRA adapter (peft_type={config.get('peft_type')!r})")
    check_peft_fields(config, where)
    check_peft_init(config.get("init_lora_weights", True), where)
    for flag in ("use_rslora", "fan_in_fan_out"):
        if not isinstance(config.get(flag, False), bool):
            fail(where, f"{CONFIG_NAME}: {flag} must be a bool, got {config.get(flag)!r}")
    r, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    if not (is_int(r) and r > 0):
        fail(where, f"{CONFIG_NAME}: r must be a positive int, got {r!r}")
    if not is_real(alpha):
        fail(where, f"{CONFIG_NAME}: lora_alpha must be a finite number, got {alpha!r}")
    for key, ok, expected in (("rank_pattern", lambda v: is_int(v) and v > 0, "positive ints"),
                              ("alpha_pattern", is_real, "finite numbers")):
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict) or not all(ok(v) for v in pattern.values()):
            fail(where, f"{CONFIG_NAME}: {key} must map module names to {expected}, got "
                        f"{str(pattern)[:200]}")
        for regex in pattern:
            try:
                re.compile(regex)
            except re.error as e:
                fail(where, f"{CONFIG_NAME}: {key} key {regex!r} is not a regex ({e})")


@dataclass
class PeftPlan:
    layers: dict[str, tuple[int, float]]  # module -> (rank, scaling): delta = scaling * B A
    whole: list[str]                     # "module.param" of the tensors saved whole
    embeddings: frozenset = frozenset()  # modules whose factors are lora_embedding_A/B

    def keys(self, name: str) -> tuple[str, str]:
        """The tensor names of layer `name`'s A and B."""
        return factor_keys(name, name in self.embeddings)


def factor_keys(name: str, embedding: bool) -> tuple[str, str]:
    """PEFT's tensor names of a layer's factors: lora_embedding_A/B for an embedding (A
    [r, num_embeddings], B [dim, r]), else lora_A/B.weight (a convolution's A [r, in, *k], B
    [out, r, 1, ...])."""
    if embedding:
        return f"{PEFT_PREFIX}{name}.lora_embedding_A", f"{PEFT_PREFIX}{name}.lora_embedding_B"
    return f"{PEFT_PREFIX}{name}.lora_A.weight", f"{PEFT_PREFIX}{name}.lora_B.weight"


def check_peft_header(config: dict, header: dict, where: str) -> PeftPlan:
    """Every tensor is a lora_A/lora_B of one layer or one saved whole; each pair's rank is
    the one r / rank_pattern gives that layer (a config and weights from different saves, or
    an edited r, are refused, not read with the wrong scaling)."""
    names, whole, embeddings = [], [], set()
    for key, (dtype, shape) in header.items():
        if not key.startswith(PEFT_PREFIX):
            fail(where, f"unexpected tensor {key!r}")
        path = key[len(PEFT_PREFIX):]
        if path.endswith(".lora_A.weight"):
            names.append(path[: -len(".lora_A.weight")])
        elif path.endswith(".lora_embedding_A"):
            names.append(path[: -len(".lora_embedding_A")])
            embeddings.add(names[-1])
        elif not path.endswith((".lora_B.weight", ".lora_embedding_B")):
            if "lora_" in path:
                fail(where, f"unsupported LoRA tensor {key!r}")
            if not dtype.is_floating_point:  # modules_to_save hold trained (float) parameters
                fail(where, f"tensor {key!r} is {dtype}, expected a floating-point tensor")
            whole.append(path)
    if not names:
        fail(where, "the adapter holds no lora_A/lora_B tensors")
    check_names(where, names, [p.rpartition(".")[0] for p in whole])
    layers = {}
    if len(set(names)) != len(names):
        fail(where, f"a layer has both lora_A and lora_embedding_A tensors: {sorted(names)[:8]}")
    for name in sorted(names):
        key_A, key_B = factor_keys(name, name in embeddings)
        A, B = header[key_A], header.get(key_B)
        # 2-D factors; a convolution's are [r, in, *k] and [out, r, 1, ...]
        dims = 2 if name in embeddings else len(A[1])
        if (B is None or len(A[1]) != dims or len(B[1]) != dims or dims not in (2, 3, 4, 5)
                or B[1][1] != A[1][0] or any(d != 1 for d in B[1][2:])
                or not (A[0].is_floating_point and B[0].is_floating_point)):
            fail(where, f"layer {name!r}: lora_A {A[0]} {A[1]} and lora_B "
                        f"{None if B is None else (B[0], B[1])} are not a LoRA pair")
        rank = pattern_value(config.get("rank_pattern"), name, config.get("r", 8))
        if A[1][0] != rank:
            fail(where, f"layer {name!r}: the factors have rank {A[1][0]}, but {CONFIG_NAME} "
                        f"gives this layer r={rank} (r, rank_pattern)")
        alpha = pattern_value(config.get("alpha_pattern"), name, config.get("lora_alpha", 8))
        layers[name] = (rank, alpha / (math.sqrt(rank) if config.get("use_rslora") else rank))
    return PeftPlan(layers, whole, frozenset(embeddings))
