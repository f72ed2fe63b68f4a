"""transformers.Trainer integration: the SOS-LoRA recipe's schedules and the CPS-LoRA
repartitions, driven by the trainer's optimizer step."""
from __future__ import annotations

from transformers import TrainerCallback

from ..layers.model import check_adapters_called, ortho_penalty, sos_layers
from ..layers.schedules import GateSchedule, OrthoSchedule, RepartitionSchedule, preset_schedules


class SOSLoRACallback(TrainerCallback):
    """Sets each SOS layer's orthogonality weight and gate temperature from the trainer's
    optimizer step (``state.global_step`` of ``state.max_steps``) and logs the penalty.

    The schedules come from `preset` (config.PRESET_SCHEDULES: "default" or "official", the
    SOS-LoRA authors' recipe); any of lambda_max, delay, ramp (OrthoSchedule), gate_start,
    gate_end, gate_anneal (GateSchedule) and lambda_per given explicitly overrides it. Both
    presets use lambda 0.006 (delay 0.15, ramp 0.20) and a gate temperature 2 -> 1 over the
    first 30% of steps; they differ in `lambda_per`:

    * "optimizer_step" (the default preset): with gradient accumulation lambda is divided by
      the trainer's accumulation steps, so each optimizer step sees lambda once;
    * "micro_batch" (the official preset): lambda is added at every micro-batch backward, as
      the authors' code does (an effective lambda * gradient_accumulation_steps).

    After the first optimizer step it checks that every adapted layer took part in the
    training forward (check_adapters_called): a layer whose parent reads its ``.weight``
    instead of calling it would otherwise train nothing, silently. Pass
    ``check_called=False`` where a layer may legitimately sit out the first step (e.g. a
    mixture-of-experts expert that no token reached).

    Works under ``accelerate`` (the schedules only write device buffers of whatever model the
    trainer hands over, wrapped or not).
    """

    def __init__(self, lambda_max: float | None = None, delay: float | None = None,
                 ramp: float | None = None, gate_start: float | None = None,
                 gate_end: float | None = None, gate_anneal: float | None = None,
                 check_called: bool = True, preset: str = "default",
                 lambda_per: str | None = None):
        self.preset = preset
        self.ortho_kwargs, self.gate_kwargs = preset_schedules(
            "SOSLoRACallback", preset, lambda_max=lambda_max, delay=delay, ramp=ramp,
            lambda_per=lambda_per, gate_start=gate_start, gate_end=gate_end,
            gate_anneal=gate_anneal)
        self.ortho: OrthoSchedule | None = None
        self.gate: GateSchedule | None = None
        self.checked = not check_called

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        total = max(int(state.max_steps), 1)
        self.ortho = OrthoSchedule(model, total_steps=total,
                                   accumulation_steps=args.gradient_accumulation_steps,
                                   **self.ortho_kwargs)
        gated = any(layer.config.gate for _, layer in sos_layers(model))
        self.gate = GateSchedule(model, total_steps=total, **self.gate_kwargs) if gated else None
        self._set(state.global_step)

    def on_step_begin(self, args, state, control, **kwargs):
        self._set(state.global_step)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.checked = self.checked or _check_called(model, type(self).__name__)

    def _set(self, step: int) -> None:
        self.ortho.set_step(step)
        if self.gate is not None:
            self.gate.set_step(step)

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if logs is None or model is None or self.ortho is None:
            return
        logs["ortho_penalty"] = float(ortho_penalty(model).detach())  # a host read, at logging only
        logs["ortho_lambda"] = self.ortho.value(self.ortho.last_step)
        if self.gate is not None:
            logs["gate_temperature"] = self.gate.value(self.gate.last_step)


class CPSLoRACallback(TrainerCallback):
    """Runs every CPSLinear's gradient-statistics windows and repartitions from the trainer's
    optimizer steps (a RepartitionSchedule), dropping the optimizer state of re-fitted layers,
    and logs each repartition's relative change of the update as ``repartition_change``.
    Checks after the first step that every adapted layer was called, as SOSLoRACallback
    (``check_called=False`` to skip it)."""

    def __init__(self, check_called: bool = True):
        self.schedule: RepartitionSchedule | None = None
        self.changes: dict[str, float] = {}
        self.checked = not check_called

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.schedule = RepartitionSchedule(model, optimizer)
        self.schedule.load_state_dict({"step_count": state.global_step})  # resumed runs

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.checked = self.checked or _check_called(model, type(self).__name__)
        self.changes.update(self.schedule.step())

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and self.changes:
            logs["repartition_change"] = max(self.changes.values())
            self.changes = {}


def _check_called(model, where: str) -> bool:
    """check_adapters_called after a training step; True once it ran."""
    if model is None:
        return False
    check_adapters_called(model, where)
    return True
