"""The adaptation methods of the quality benchmark, each applied to a fresh model the same way.

Matched trainable parameters: every low-rank method gets the same rank budget r per targeted
Linear (in x out): LoRA, rsLoRA and DoRA rank r, r (in + out) parameters; SOS-LoRA K experts
of rank r / K (total rank r), also r (in + out); CPS-LoRA G clusters of rank r each, whose
factors are [r, in] and [out, r], again r (in + out). DoRA adds a magnitude per output
channel (out), the official SOS-LoRA preset a trainable scale per expert and output channel
(K out) and K gate logits: reported, not compensated. Full fine-tuning of the targeted
layers (their weights and biases) is the ceiling. Modules saved whole (a classifier head)
train in every method.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import torch.nn as nn

from soslora_ext.layers.model import apply_cps_lora, apply_sos_lora

METHODS = ("LoRA", "rsLoRA", "DoRA", "SOS-LoRA", "SOS-LoRA official", "CPS-LoRA static",
           "CPS-LoRA repartitioned", "full FT")
BASELINE = "LoRA"


@dataclass(frozen=True)
class AdapterSpec:
    """Where and how large the adapters of one task are.

    targets: a regex matched against whole module names, or a list of name suffixes (as PEFT's
    target_modules). modules_to_save: modules trained whole by every method (e.g. a new
    classifier head). fan_in_fan_out: the targets are GPT-2 Conv1D (weight [in, out])."""

    targets: str | tuple[str, ...]
    rank: int
    alpha: float
    modules_to_save: tuple[str, ...] = ()
    num_experts: int = 4
    num_clusters: int = 4
    fan_in_fan_out: bool = False


def matches(name: str, targets: str | Sequence[str]) -> bool:
    """PEFT's rule: a string is a regex over the whole name; a list matches a name equal to
    an entry or ending with "." + entry."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def repartition_schedule(steps: int) -> dict:
    """CPS-LoRA repartitioned: the first repartition after the first twelfth of the steps
    (statistics while the update is small), then one every third of the run, as the main job."""
    return dict(repartition_every=max(2, steps // 3), statistics_steps=max(1, steps // 12))


def adapt(model: nn.Module, method: str, spec: AdapterSpec, steps: int) -> tuple[nn.Module, str]:
    """(the model with `method` applied, the finetune.train preset to train it with). Draws
    its initialisation from torch's global generator: seed it first."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    targets = spec.targets if isinstance(spec.targets, str) else list(spec.targets)
    save = list(spec.modules_to_save)
    if method in ("LoRA", "rsLoRA", "DoRA"):
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=targets,
                            modules_to_save=save or None, lora_dropout=0.0,
                            fan_in_fan_out=spec.fan_in_fan_out,
                            use_rslora=method == "rsLoRA", use_dora=method == "DoRA")
        return get_peft_model(model, config), "default"
    if method == "SOS-LoRA":
        apply_sos_lora(model, targets, modules_to_save=save, num_experts=spec.num_experts,
                       rank=spec.rank, alpha=spec.alpha)
        return model, "default"
    if method == "SOS-LoRA official":
        # The preset's layer settings at the matched rank; its alpha / rank ratio (1) is kept,
        # so each expert's scale is the authors' alpha / r_expert whatever the rank.
        apply_sos_lora(model, targets, modules_to_save=save, preset="official",
                       num_experts=spec.num_experts, rank=spec.rank, alpha=float(spec.rank))
        return model, "official"
    if method.startswith("CPS-LoRA"):
        schedule = (repartition_schedule(steps) if method == "CPS-LoRA repartitioned"
                    else dict(repartition_every=0))
        apply_cps_lora(model, targets, modules_to_save=save, num_clusters=spec.num_clusters,
                       rank=spec.rank, alpha=spec.alpha, **schedule)
        return model, "default"
    # full FT: the targeted layers' own parameters and the saved modules; the rest frozen
    keep = {id(p) for name, module in model.named_modules()
            if matches(name, targets) or (save and matches(name, save))
            for p in module.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    return model, "default"


def saved_parameters(model: nn.Module, spec: AdapterSpec) -> int:
    """Parameters of the modules every method trains whole (in the unadapted model)."""
    if not spec.modules_to_save:
        return 0
    params = {id(p): p for name, m in model.named_modules()
              if matches(name, list(spec.modules_to_save)) for p in m.parameters()}
    return sum(p.numel() for p in params.values())
