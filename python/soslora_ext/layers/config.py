"""Hyperparameters of the adapted layers (SOSConfig, CPSConfig), validated in one place; each
field documents itself (``field_help``), and the command line's help reads it from there."""
from __future__ import annotations

import dataclasses
import math

RANK_MODES = ("total", "expert")
SCALE_BASES = ("expert", "total")
SCALE_MODES = ("fixed", "channel")
DROPOUT_POSITIONS = ("post", "pre")
FACTOR_DTYPE_RULES = ("peft", "base")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def is_int(v) -> bool:
    """An int that is not a bool (the one integer check of the package)."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_real(v) -> bool:
    """A finite int or float that is not a bool."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _field(default, help: str):
    return dataclasses.field(default=default, metadata={"help": help})


def field_help(config_class, name: str) -> str:
    """The help text of one field of SOSConfig or CPSConfig."""
    for f in dataclasses.fields(config_class):
        if f.name == name:
            return f.metadata["help"]
    raise KeyError(f"{config_class.__name__} has no field {name!r}")


def with_fields(owner: str, config_class, config, fields: dict):
    """`config` (default: the class's defaults) with `fields` replaced, validated: what a layer
    built from a config and keyword overrides gets. Anything else is an error naming `owner`."""
    if config is None:
        config = config_class()
    elif not isinstance(config, config_class):
        raise TypeError(f"{owner}: config must be a {config_class.__name__} instance, got "
                        f"{type(config).__name__}")
    known = [f.name for f in dataclasses.fields(config_class)]
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise TypeError(f"{owner}: unknown argument(s) {unknown}; the {config_class.__name__} "
                        f"fields are {known}")
    return dataclasses.replace(config, **fields) if fields else config


@dataclasses.dataclass(frozen=True)
class SOSConfig:
    """SOS-LoRA hyperparameters (docs/methods.md; the SOSLinear docstring).

    Fields beyond the method's core:
        normalize_scales: divide the gammas by their mean; None (default) does so exactly when
            rank_mode="total", as the authors' code does; True/False force it.
        gate_temperature: the gate's softmax temperature before any GateSchedule writes one
            (1.0 by default; the authors' layer starts at 2.0). Needs gate=True unless 1.0.
        loraplus_ratio: lora_A's gradient is divided by it whenever a gradient flows (also
            in eval() mode). Any positive value applies, also one <= 1 (0.5 doubles A's
            gradient), where the authors' code ignores ratios <= 1: an explicit value does
            what it says.
        factor_dtype: dtype of lora_A / lora_B when SOSLinear gets no explicit dtype:
            "peft" (float32 on fp16/bf16 bases, as PEFT; the base dtype otherwise) or "base"
            (always the base weight's dtype, as the authors' code casts its layers).

    Named presets (PRESETS): SOSConfig.preset("default") equals SOSConfig();
    SOSConfig.preset("official") is the SOS-LoRA authors' recipe.
    """

    num_experts: int = _field(4, "K, the number of static, always-on experts")
    rank: int = _field(64, "the total rank split across the experts (rank_mode='total'), or "
                           "each expert's rank (rank_mode='expert')")
    alpha: float = _field(128.0, "scaling numerator, > 0: expert k's scale is gamma_k * alpha / "
                                 "r (r per scale_base)")
    gamma_max: float = _field(2.5, "the largest expert's multiplier: gamma = linspace(1, "
                                   "gamma_max, K), >= 1")
    rank_mode: str = _field("total", "'total': rank is split across the experts; 'expert': "
                                     "every expert has rank `rank`")
    scale_base: str = _field("expert", "the r in alpha / r: 'expert' (an expert's rank) or "
                                       "'total' (the total rank)")
    scale_mode: str = _field("fixed", "'fixed' scales, one per expert, or trainable 'channel' "
                                      "scales, one per expert and output channel")
    gate: bool = _field(False, "multiply the scales by a mean-1 gate K * softmax(logits / T)")
    scale_anchor: float = _field(0.0, "pull of the channel scales towards the fixed ones "
                                      "(needs scale_mode='channel')")
    uniform_prior: float = _field(0.0, "pull of the gate towards uniform (needs gate=True)")
    loraplus_ratio: float = _field(1.0, "LoRA+: lora_A's gradient is divided by it")
    dropout: float = _field(0.0, "adapter dropout rate, in [0, 1)")
    dropout_position: str = _field("post", "'post' drops A x (the authors' layer), 'pre' drops "
                                           "x (as PEFT)")
    init_gain: float = _field(2**0.5, "gain of the cross-expert orthogonal initialization of A")
    normalize_scales: bool | None = _field(None, "divide the gammas by their mean; None: exactly "
                                                 "when rank_mode='total'")
    gate_temperature: float = _field(1.0, "the gate's softmax temperature before a GateSchedule "
                                          "writes one (needs gate=True unless 1.0)")
    factor_dtype: str = _field("peft", "dtype of the factors without an explicit dtype: 'peft' "
                                       "(float32 on 16-bit bases) or 'base' (the base's)")

    def __post_init__(self):
        _require(is_int(self.num_experts) and self.num_experts > 0,
                 f"num_experts must be a positive int, got {self.num_experts!r}")
        _require(is_int(self.rank) and self.rank > 0,
                 f"rank must be a positive int, got {self.rank!r}")
        _require(is_real(self.alpha) and self.alpha > 0,
                 f"alpha must be a positive number, got {self.alpha!r}")
        _require(is_real(self.gamma_max) and self.gamma_max >= 1,
                 f"gamma_max must be a number >= 1, got {self.gamma_max!r}")
        for name, choices in (("rank_mode", RANK_MODES), ("scale_base", SCALE_BASES),
                              ("scale_mode", SCALE_MODES),
                              ("dropout_position", DROPOUT_POSITIONS),
                              ("factor_dtype", FACTOR_DTYPE_RULES)):
            value = getattr(self, name)
            _require(value in choices, f"{name} must be one of {choices}, got {value!r}")
        if self.rank_mode == "total":
            _require(self.rank % self.num_experts == 0,
                     f"rank={self.rank} must be divisible by num_experts={self.num_experts} "
                     "when rank_mode='total' (rank is the total rank split across experts)")
        _require(isinstance(self.gate, bool), f"gate must be a bool, got {self.gate!r}")
        _require(is_real(self.scale_anchor) and self.scale_anchor >= 0,
                 f"scale_anchor must be a number >= 0, got {self.scale_anchor!r}")
        _require(self.scale_anchor == 0 or self.scale_mode == "channel",
                 "scale_anchor > 0 needs scale_mode='channel' (it pulls the trainable channel "
                 "scales towards the fixed ones)")
        _require(is_real(self.uniform_prior) and self.uniform_prior >= 0,
                 f"uniform_prior must be a number >= 0, got {self.uniform_prior!r}")
        _require(self.uniform_prior == 0 or self.gate,
                 "uniform_prior > 0 needs gate=True (it acts on the gate logits)")
        _require(is_real(self.loraplus_ratio) and self.loraplus_ratio > 0,
                 f"loraplus_ratio must be a positive number, got {self.loraplus_ratio!r}")
        _require(is_real(self.dropout) and 0 <= self.dropout < 1,
                 f"dropout must be in [0, 1), got {self.dropout!r}")
        _require(is_real(self.init_gain) and self.init_gain > 0,
                 f"init_gain must be a positive number, got {self.init_gain!r}")
        _require(self.normalize_scales is None or isinstance(self.normalize_scales, bool),
                 f"normalize_scales must be None or a bool, got {self.normalize_scales!r}")
        _require(is_real(self.gate_temperature) and self.gate_temperature > 0,
                 f"gate_temperature must be a number > 0, got {self.gate_temperature!r}")
        _require(self.gate_temperature == 1.0 or self.gate,
                 f"gate_temperature={self.gate_temperature!r} needs gate=True (it is the "
                 "gate's softmax temperature; leave it at 1.0 without a gate)")

    @classmethod
    def preset(cls, name: str, **overrides) -> "SOSConfig":
        """The named preset's config (PRESETS[name]) with `overrides` (SOSConfig fields).

        An override that switches a feature off also drops the preset's settings that only
        act through it (gate=False: uniform_prior and gate_temperature; scale_mode="fixed":
        scale_anchor), unless they are overridden too. Everything is validated as usual."""
        check_preset("SOSConfig.preset", name, argument="name")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(overrides) - set(known))
        if unknown:
            raise ValueError(f"SOSConfig.preset: unknown field(s) {unknown}; the fields are "
                             f"{known}")
        fields = dict(PRESETS[name])
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        switched_off = {"gate": (False, ("uniform_prior", "gate_temperature")),
                        "scale_mode": ("fixed", ("scale_anchor",))}
        for feature, (off, dependent) in switched_off.items():
            if feature in overrides and overrides[feature] == off:
                fields.update({k: defaults[k] for k in dependent if k not in overrides})
        fields.update(overrides)
        return cls(**fields)

    @property
    def r_expert(self) -> int:
        return self.rank // self.num_experts if self.rank_mode == "total" else self.rank

    @property
    def r_total(self) -> int:
        return self.r_expert * self.num_experts

    def fixed_scales(self) -> list[float]:
        """Expert k's fixed scale: gamma_k * base scaling, gamma = linspace(1, gamma_max, K)
        (divided by its mean when normalize_scales, by default in total rank mode), base
        scaling alpha / r_expert or alpha / r_total."""
        K = self.num_experts
        gammas = [1.0 + (self.gamma_max - 1.0) * k / max(K - 1, 1) for k in range(K)]
        normalize = (self.rank_mode == "total" if self.normalize_scales is None
                     else self.normalize_scales)
        if normalize:
            mean = sum(gammas) / K
            gammas = [g / mean for g in gammas]
        base = self.alpha / (self.r_expert if self.scale_base == "expert" else self.r_total)
        return [g * base for g in gammas]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Layer fields of each named preset. "official": the SOS-LoRA authors' recipe
# (scripts/metamath_llama2_7b/run_sos-lora.sh with train_sos-lora.py's defaults).
PRESETS: dict[str, dict] = {
    "default": SOSConfig().to_dict(),
    "official": dict(SOSConfig().to_dict(), num_experts=4, rank=128, alpha=128.0,
                     gamma_max=2.5, rank_mode="total", normalize_scales=True,
                     scale_base="expert", scale_mode="channel", gate=True,
                     gate_temperature=2.0, scale_anchor=1e-4, uniform_prior=2e-4,
                     loraplus_ratio=2.0, dropout=0.05, dropout_position="post",
                     init_gain=2**0.5, factor_dtype="base"),
}

# The regularizer schedules of each preset (SOSLoRACallback's keyword arguments). lambda_per:
# "optimizer_step" counts lambda once per optimizer step under gradient accumulation;
# "micro_batch" adds it at every micro-batch backward, as the authors' code does (an
# effective lambda * accumulation steps against the averaged task loss).
PRESET_SCHEDULES: dict[str, dict] = {
    "default": dict(lambda_max=0.006, delay=0.15, ramp=0.20, gate_start=2.0, gate_end=1.0,
                    gate_anneal=0.30, lambda_per="optimizer_step"),
    "official": dict(lambda_max=0.006, delay=0.15, ramp=0.20, gate_start=2.0, gate_end=1.0,
                     gate_anneal=0.30, lambda_per="micro_batch"),
}

# The optimizer settings of the authors' run (transformers.TrainingArguments keywords), for
# reproducing it with Trainer: TrainingArguments(output_dir=..., **PRESET_TRAINING_ARGUMENTS[
# "official"]). Their run: 2 GPUs (a global batch of 2 * 2 * 8 = 32 sequences of up to 1024
# tokens), every q/k/v/o/gate/up/down projection adapted. Not applied by the command line,
# whose --lr/--steps/--batch-size stay as given.
PRESET_TRAINING_ARGUMENTS: dict[str, dict] = {
    # warmup_steps below 1 is a fraction of the steps (transformers >= 5; warmup_ratio before)
    "official": dict(learning_rate=2e-5, lr_scheduler_type="cosine", warmup_steps=0.03,
                     weight_decay=0.0, gradient_accumulation_steps=8,
                     per_device_train_batch_size=2, num_train_epochs=1, bf16=True,
                     activation_checkpointing=True),
}


def check_preset(owner: str, name, argument: str = "preset") -> str:
    """`name` if it is a known preset, else a ValueError naming `owner`'s `argument`."""
    if not isinstance(name, str) or name not in PRESETS:
        raise ValueError(f"{owner}: {argument} must be one of {sorted(PRESETS)}, got {name!r}")
    return name


PARTITION_INITS = ("contiguous", "random")


@dataclasses.dataclass(frozen=True)
class CPSConfig:
    """CPS-LoRA hyperparameters (docs/cps-lora.md; the CPSLinear docstring)."""

    num_clusters: int = _field(4, "G, clusters of rows and of columns, at most min(in, out)")
    rank: int = _field(8, "every cluster's rank (unless rank_per_cluster)")
    alpha: float = _field(16.0, "scaling numerator, > 0: cluster c's scale is alpha / r_c")
    rank_per_cluster: tuple[int, ...] | None = _field(None, "one rank per cluster, instead of "
                                                            "`rank` for all")
    dropout: float = _field(0.0, "input dropout rate, in [0, 1), as PEFT")
    use_rslora: bool = _field(False, "rsLoRA scaling: alpha / sqrt(r_c)")
    init_partition: str = _field("contiguous", "the first partition: 'contiguous' blocks in "
                                               "index order, or 'random'")
    repartition_every: int = _field(0, "repartition every this many optimizer steps (0: never)")
    statistics_steps: int | None = _field(None, "optimizer steps of gradient statistics before "
                                                "each repartition (None: repartition_every // 4)")
    sketch_rank: int | None = _field(None, "rank of the gradient sketch (None: min(32, max(8, 2 "
                                           "* sum of ranks)))")

    def __post_init__(self):
        _require(is_int(self.num_clusters) and self.num_clusters > 0,
                 f"num_clusters must be a positive int, got {self.num_clusters!r}")
        _require(is_int(self.rank) and self.rank > 0,
                 f"rank must be a positive int, got {self.rank!r}")
        if self.rank_per_cluster is not None:
            ranks = self.rank_per_cluster
            _require(isinstance(ranks, (list, tuple)) and len(ranks) == self.num_clusters
                     and all(is_int(r) and r > 0 for r in ranks),
                     f"rank_per_cluster must be a list of num_clusters={self.num_clusters} "
                     f"positive ints, got {ranks!r}")
            object.__setattr__(self, "rank_per_cluster", tuple(ranks))
        _require(is_real(self.alpha) and self.alpha > 0,
                 f"alpha must be a positive number, got {self.alpha!r}")
        _require(is_real(self.dropout) and 0 <= self.dropout < 1,
                 f"dropout must be in [0, 1), got {self.dropout!r}")
        _require(isinstance(self.use_rslora, bool),
                 f"use_rslora must be a bool, got {self.use_rslora!r}")
        _require(self.init_partition in PARTITION_INITS,
                 f"init_partition must be one of {PARTITION_INITS}, got {self.init_partition!r}")
        _require(is_int(self.repartition_every) and self.repartition_every >= 0,
                 f"repartition_every must be an int >= 0 (0: never), got "
                 f"{self.repartition_every!r}")
        _require(self.statistics_steps is None or (
                     is_int(self.statistics_steps)
                     and 1 <= self.statistics_steps <= max(self.repartition_every, 1)),
                 f"statistics_steps must be None or an int in [1, repartition_every="
                 f"{self.repartition_every}], got {self.statistics_steps!r}")
        _require(self.sketch_rank is None or (is_int(self.sketch_rank) and self.sketch_rank > 0),
                 f"sketch_rank must be None or a positive int, got {self.sketch_rank!r}")

    @property
    def ranks(self) -> list[int]:
        """Rank of each cluster's term."""
        return list(self.rank_per_cluster or [self.rank] * self.num_clusters)

    @property
    def r_max(self) -> int:
        return max(self.ranks)

    def cluster_scales(self) -> list[float]:
        """alpha / r_c (alpha / sqrt(r_c) with use_rslora), as PEFT scales a LoRA of rank r_c."""
        return [self.alpha / (math.sqrt(r) if self.use_rslora else r) for r in self.ranks]

    @property
    def window(self) -> int:
        """Optimizer steps of gradient statistics before each repartition."""
        if self.statistics_steps is not None:
            return self.statistics_steps
        return max(1, self.repartition_every // 4)

    def resolved_sketch_rank(self) -> int:
        return self.sketch_rank or min(32, max(8, 2 * sum(self.ranks)))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if d["rank_per_cluster"] is not None:
            d["rank_per_cluster"] = list(d["rank_per_cluster"])
        return d
