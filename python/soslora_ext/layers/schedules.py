"""Training schedules: SOS-LoRA's recipe (the penalty weight and the gate temperature, written
into device buffers, no host sync) and CPS-LoRA's repartitions."""
from __future__ import annotations

import torch
import torch.nn as nn

from .config import PRESET_SCHEDULES, check_preset
from .cps import CPSLinear, NoSignalError
from .model import sos_layers


def _check_fraction(owner: str, name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and 0 <= value <= 1):
        raise ValueError(f"{owner}: {name} must be a fraction in [0, 1], got {value!r}")


def _check_total_steps(owner: str, total_steps) -> None:
    if not (isinstance(total_steps, int) and not isinstance(total_steps, bool) and total_steps > 0):
        raise ValueError(f"{owner}: total_steps must be a positive int, got {total_steps!r}")


class _StepSchedule:
    """Calls `_apply(value(step))` at construction and after each step(); resumable."""

    def __init__(self, total_steps: int):
        self.total_steps = total_steps
        self.last_step = 0
        self._apply(self.value(0))

    def value(self, step: int) -> float:
        raise NotImplementedError

    def _apply(self, value: float) -> None:
        raise NotImplementedError

    def step(self) -> float:
        """Advance one optimizer step and write the new value into the layers; returns it."""
        return self.set_step(self.last_step + 1)

    def set_step(self, step: int) -> float:
        """Jump to optimizer step `step` (e.g. a trainer's global step); returns the value."""
        self.last_step = int(step)
        value = self.value(self.last_step)
        self._apply(value)
        return value

    def state_dict(self) -> dict:
        return {"last_step": self.last_step}

    def load_state_dict(self, state: dict) -> None:
        self.set_step(state["last_step"])


LAMBDA_PER = ("optimizer_step", "micro_batch")


def _check_lambda_per(owner: str, value) -> None:
    if value not in LAMBDA_PER:
        raise ValueError(f"{owner}: lambda_per must be one of {LAMBDA_PER}, got {value!r}")


class OrthoSchedule(_StepSchedule):
    """lambda = 0 for the first `delay` fraction of steps, then a linear ramp to `lambda_max`
    over the next `ramp` fraction, then constant. Written into every SOS layer's ortho_lambda.

    The layers add lambda's gradient at every micro-batch backward, while the task loss is
    averaged over the `accumulation_steps` micro-batches of an optimizer step. `lambda_per`
    says what lambda counts against:
      * "optimizer_step" (default): lambda / accumulation_steps is written, so an optimizer
        step sees lambda once, whatever the accumulation;
      * "micro_batch": lambda itself is written, as the authors' code does, so an optimizer
        step sees lambda * accumulation_steps against the averaged task loss.
    """

    def __init__(self, model: nn.Module, lambda_max: float = 0.006, delay: float = 0.15,
                 ramp: float = 0.20, total_steps: int = 1000, accumulation_steps: int = 1,
                 lambda_per: str = "optimizer_step"):
        owner = "OrthoSchedule"
        if not (isinstance(accumulation_steps, int) and accumulation_steps >= 1):
            raise ValueError(f"{owner}: accumulation_steps must be an int >= 1, got "
                             f"{accumulation_steps!r}")
        _check_lambda_per(owner, lambda_per)
        self.accumulation_steps = accumulation_steps
        self.lambda_per = lambda_per
        if not (isinstance(lambda_max, (int, float)) and lambda_max >= 0):
            raise ValueError(f"{owner}: lambda_max must be a number >= 0, got {lambda_max!r}")
        _check_fraction(owner, "delay", delay)
        _check_fraction(owner, "ramp", ramp)
        _check_total_steps(owner, total_steps)
        self.layers = [layer for _, layer in sos_layers(model)]
        if not self.layers:
            raise ValueError(f"{owner}: model has no SOSLinear layers")
        self.lambda_max = float(lambda_max)
        self.delay_steps = int(delay * total_steps)
        self.ramp_steps = int(ramp * total_steps)
        super().__init__(total_steps)

    def value(self, step: int) -> float:
        if step < self.delay_steps:
            return 0.0
        if self.ramp_steps <= 0:
            return self.lambda_max
        return self.lambda_max * min(max((step - self.delay_steps) / self.ramp_steps, 0.0), 1.0)

    def _apply(self, value: float) -> None:
        per_backward = (value / self.accumulation_steps if self.lambda_per == "optimizer_step"
                        else value)
        for layer in self.layers:
            layer.ortho_lambda.fill_(per_backward)


class GateSchedule(_StepSchedule):
    """Gate temperature annealed linearly from `start` to `end` over the first `anneal`
    fraction of steps, then held at `end`. Written into every gated SOS layer."""

    def __init__(self, model: nn.Module, start: float = 2.0, end: float = 1.0,
                 anneal: float = 0.30, total_steps: int = 1000):
        owner = "GateSchedule"
        for name, v in (("start", start), ("end", end)):
            if not (isinstance(v, (int, float)) and v > 0):
                raise ValueError(f"{owner}: {name} temperature must be a number > 0, got {v!r}")
        _check_fraction(owner, "anneal", anneal)
        _check_total_steps(owner, total_steps)
        self.layers = [layer for _, layer in sos_layers(model) if layer.config.gate]
        if not self.layers:
            raise ValueError(f"{owner}: model has no SOSLinear layer with gate=True")
        self.start, self.end = float(start), float(end)
        self.anneal_steps = int(anneal * total_steps)
        super().__init__(total_steps)

    def value(self, step: int) -> float:
        if self.anneal_steps <= 0:
            return self.end
        t = min(max(step / self.anneal_steps, 0.0), 1.0)
        return self.start + t * (self.end - self.start)

    def _apply(self, value: float) -> None:
        for layer in self.layers:
            layer.gate_temperature.fill_(value)


def preset_schedules(owner: str, preset: str = "default", **given) -> tuple[dict, dict]:
    """(OrthoSchedule keywords, GateSchedule keywords) of `preset` (PRESET_SCHEDULES), each
    of lambda_max, delay, ramp, lambda_per, gate_start, gate_end, gate_anneal in `given` that
    is not None overriding it. `owner` names the caller in errors."""
    check_preset(owner, preset)
    unknown = sorted(set(given) - set(PRESET_SCHEDULES[preset]))
    if unknown:
        raise TypeError(f"{owner}: unknown schedule setting(s) {unknown}")
    s = dict(PRESET_SCHEDULES[preset], **{k: v for k, v in given.items() if v is not None})
    _check_lambda_per(owner, s["lambda_per"])  # now, not when training starts
    ortho = dict(lambda_max=s["lambda_max"], delay=s["delay"], ramp=s["ramp"],
                 lambda_per=s["lambda_per"])
    gate = dict(start=s["gate_start"], end=s["gate_end"], anneal=s["gate_anneal"])
    return ortho, gate


# ---- CPS-LoRA's repartitions ---------------------------------------------------------------------
class RepartitionSchedule:
    """Drives every CPSLinear's statistics window and repartitions from the optimizer step.

        schedule = sl.RepartitionSchedule(model, optimizer)
        for batch in loader:
            loss.backward(); optimizer.step(); optimizer.zero_grad()
            changes = schedule.step()   # {layer: relative change of dW} when one repartitioned

    After a layer's factors are re-fitted, its parameters' optimizer state (e.g. Adam moments)
    is dropped: it described the old factors. A layer with nothing to cluster (no gradient
    reached it and its update is zero) keeps its partition."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None):
        self.layers = [(name, m) for name, m in model.named_modules()
                       if isinstance(m, CPSLinear) and m.config.repartition_every > 0]
        self.optimizer = optimizer
        self.step_count = 0
        self._arm()

    def _arm(self) -> None:
        """Collect statistics during the next step if it falls in a layer's window."""
        upcoming = self.step_count + 1
        for _, layer in self.layers:
            every, window = layer.config.repartition_every, layer.config.window
            layer.collect_statistics((upcoming - 1) % every < window)

    def due(self) -> list[tuple[str, CPSLinear]]:
        """(name, layer) of the layers the next step() repartitions: those whose statistics
        window ends at that step."""
        upcoming = self.step_count + 1
        return [(name, layer) for name, layer in self.layers
                if upcoming >= layer.config.window
                and (upcoming - layer.config.window) % layer.config.repartition_every == 0]

    def step(self) -> dict[str, float]:
        changes = {}
        due = self.due()
        self.step_count += 1
        for name, layer in due:
            try:
                changes[name] = layer.repartition()
            except NoSignalError:  # the layer keeps its partition until it has a signal
                layer.last_repartition = dict(adopted=False, no_signal=True)
                continue
            if layer.last_repartition["adopted"] and self.optimizer is not None:
                for p in (layer.lora_A, layer.lora_B):
                    self.optimizer.state.pop(p, None)
        self._arm()
        return changes

    def state_dict(self) -> dict:
        return {"step_count": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        self._arm()
