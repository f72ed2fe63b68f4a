"""A plain PyTorch fine-tuning loop for SOS-LoRA (or any adapter) on CPU or GPU.

Used by the command line (``train``) and the main job; also the plain-loop example of how to
drive the schedules without transformers.Trainer.
"""
from __future__ import annotations

import math
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..layers.model import check_adapters_called, sos_layers
from ..layers.schedules import GateSchedule, OrthoSchedule, RepartitionSchedule, preset_schedules


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    # (step, {layer: relative change of dW}) for every CPS-LoRA repartition
    repartitions: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    # one record per repartition step: step, seconds, {layer: adopted, relative_change,
    # no_signal, and the proposal's gain and loss (_repartition_record)}
    repartition_log: list[dict] = field(default_factory=list)


def _repartition_record(step: int, layers: list, seconds: float) -> dict:
    """What each layer's repartition proposed and decided: the share of the gradient signal
    its current and its proposed blocks capture (captured_before, captured_after: the gain),
    the share of its update a re-fit would discard (update_discarded: the loss), adopted, and
    the relative change of dW (0 when kept); a layer without signal has no proposal."""
    result = {}
    for name, layer in layers:
        info = layer.last_repartition or {}
        result[name] = dict(adopted=bool(info.get("adopted")),
                            relative_change=float(info.get("delta_change", 0.0)),
                            no_signal=bool(info.get("no_signal")))
        if not info.get("no_signal"):
            result[name].update({k: float(info[k]) for k in (
                "captured_before", "captured_after", "update_discarded") if k in info})
    return dict(step=step, seconds=seconds, layers=result)


def describe_repartition(record: dict) -> str:
    """One line: how many layers adopted a new partition, how much their updates changed."""
    layers = record["layers"].values()
    adopted = [v["relative_change"] for v in layers if v["adopted"]]
    no_signal = sum(v["no_signal"] for v in layers)
    kept = len(layers) - len(adopted) - no_signal
    text = (f"repartition took {record['seconds']:.1f} s: {len(adopted)} of {len(layers)} "
            "layers adopted a new partition")
    if adopted:
        text += (f" (relative change of dW: mean {sum(adopted) / len(adopted):.3g}, "
                 f"max {max(adopted):.3g})")
    text += f", {kept} kept theirs"
    proposals = [v for v in layers if "captured_after" in v]
    if proposals:  # the rule's two sides, as medians over the proposals
        def median(key):
            return statistics.median(v[key] for v in proposals)
        text += (f"; proposals captured {median('captured_before'):.2f} -> "
                 f"{median('captured_after'):.2f} of the gradient and would discard "
                 f"{median('update_discarded'):.2f} of the update (medians)")
    if no_signal:
        text += f", {no_signal} had no signal yet (kept)"
    return text


def encode(tokenizer, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    return dict(tokenizer(texts, padding="max_length", truncation=True, max_length=max_length,
                          return_tensors="pt"))


def train(model: nn.Module, batches, steps: int, lr: float = 1e-3, seed: int = 0,
          lambda_max: float | None = None, max_grad_norm: float = 1.0, log_every: int = 20,
          desc: str = "train", progress: bool = True, preset: str = "default") -> TrainResult:
    """AdamW over the trainable parameters for `steps` steps of ``model(**batch).loss``, with
    linear warm-up over the first tenth of the steps and gradient clipping (as Trainer does).

    `batches(step, generator)` returns the batch for a step. When the model has SOS layers
    the orthogonality and gate-temperature schedules of `preset` (config.PRESET_SCHEDULES,
    as SOSLoRACallback) run alongside, `lambda_max` overriding the preset's (0.006); one
    backward per optimizer step, so the preset's lambda_per makes no difference here. CPS
    layers with ``repartition_every`` are repartitioned on their schedule.
    """
    from tqdm.auto import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("train: the model has no trainable parameters")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    ortho_kwargs, gate_kwargs = preset_schedules("train", preset, lambda_max=lambda_max)
    has_sos = any(True for _ in sos_layers(model))
    ortho = OrthoSchedule(model, total_steps=steps, **ortho_kwargs) if has_sos else None
    gate = (GateSchedule(model, total_steps=steps, **gate_kwargs)
            if any(l.config.gate for _, l in sos_layers(model)) else None)
    repartition = RepartitionSchedule(model, opt)
    generator = torch.Generator().manual_seed(seed)
    result = TrainResult()
    model.train()
    start = time.perf_counter()
    bar = tqdm(range(steps), desc=desc, disable=not progress, file=sys.stderr, leave=False)
    running = []
    for step in bar:
        loss = model(**batches(step, generator)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        sched.step()
        if step == 0:  # an adapter its parent never calls (reads .weight) would do nothing
            check_adapters_called(model, desc)
        for schedule in (ortho, gate):
            if schedule is not None:
                schedule.step()
        due = repartition.due()
        if due:  # it can take minutes on a large model: say so before the bar stops
            tqdm.write(f"{desc} step {step + 1}: repartitioning {len(due)} CPS-LoRA layers...",
                       file=sys.stderr)
            began = time.perf_counter()
        changes = repartition.step()
        if changes:
            result.repartitions.append((step + 1, changes))
        if due:
            record = _repartition_record(step + 1, due, time.perf_counter() - began)
            result.repartition_log.append(record)
            tqdm.write(f"{desc} step {step + 1}: {describe_repartition(record)}", file=sys.stderr)
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(f"{desc}: loss became {value} at step {step}")
        result.losses.append(value)
        running.append(value)
        bar.set_postfix(loss=f"{value:.4f}")
        if log_every and ((step + 1) % log_every == 0 or step + 1 == steps):
            tqdm.write(f"{desc} step {step + 1:>5}/{steps}: loss {sum(running) / len(running):.4f}",
                       file=sys.stderr)
            running = []
    result.seconds = time.perf_counter() - start
    model.eval()
    return result


def sample_batches(data: dict[str, torch.Tensor], batch_size: int):
    """batches(step, generator) drawing `batch_size` random rows of the tensors in `data`."""
    n = next(iter(data.values())).shape[0]

    def batches(step, generator):
        idx = torch.randint(0, n, (batch_size,), generator=generator)
        return {k: v[idx] for k, v in data.items()}

    return batches


@torch.no_grad()
def predict_logits(model: nn.Module, data: dict[str, torch.Tensor], batch_size: int = 64
                   ) -> torch.Tensor:
    model.eval()
    inputs = {k: v for k, v in data.items() if k != "labels"}
    n = next(iter(inputs.values())).shape[0]
    return torch.cat([model(**{k: v[i:i + batch_size] for k, v in inputs.items()}).logits
                      for i in range(0, n, batch_size)])


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(-1) == labels).double().mean().item()
