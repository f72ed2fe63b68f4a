"""Parents that compute with an adapted layer's weight instead of calling the layer.

Such a parent reads ``child.weight`` (e.g. ``F.linear(x, self.proj.weight)``): an adapter on
the child then changes nothing and gets no gradient. Two defences:

- apply_* refuses, naming the module and the alternative, the children of the torch classes
  known to do it (KNOWN_BYPASSES): nn.MultiheadAttention's out_proj (always), the linear1 and
  linear2 of nn.TransformerEncoderLayer (on its inference fast path: eval mode without
  gradients) and nn.LinearCrossEntropyLoss's linear (always).
- every other case is found in use: apply_* (and load_adapter, import_peft) put a Watch on the
  model. On the model's forwards in training mode with grad enabled, in any training loop,
  it notes which adapted layers were called, which of their parents ran, and whose ``.weight``
  was read. A trainable adapted layer that was not called while its parent ran (or its
  ``.weight`` was read) is the bypass signature: one AdapterBypassWarning names those layers,
  once. A layer not called whose parent did not run either (an MoE expert that got no token),
  or whose adapter is frozen, is left for the next forwards. The watch takes its hooks off
  once every adapted layer was called or reported, or after MAX_FORWARDS training forwards.

What the watch does not look at: forwards in eval mode or without grad (no training there),
frozen adapters (nothing to train), forwards traced by torch.compile (its hooks do nothing
inside a compiled region; the layers' own records still count), calls of a submodule other
than the model itself. check_adapters_called (model.py) is the stricter, explicit check that
the fine-tuning loop and the Trainer callbacks run: every trainable layer must have been called.
"""
from __future__ import annotations

import os
import sys
import warnings

import torch
import torch.nn as nn

from .base import AdapterLinear

# Training forwards after which the watch takes its hooks off, whatever is still unknown.
MAX_FORWARDS = 8
_KEY = "_soslora_bypass_watch"  # where a model keeps its watch


class AdapterBypassWarning(UserWarning):
    """An adapted layer whose parent computes with its .weight instead of calling it."""


def known_bypasses() -> list[tuple[type, tuple[str, ...], str]]:
    """(parent class, children it bypasses, how) for the torch classes known to read a child
    Linear's weight directly."""
    known = [
        (nn.MultiheadAttention, ("out_proj",),
         "computes with out_proj.weight directly (F.multi_head_attention_forward) and never "
         "calls out_proj"),
        (nn.TransformerEncoderLayer, ("linear1", "linear2"),
         "computes with linear1.weight and linear2.weight directly on its inference fast path "
         "(eval mode without gradients), skipping their forward"),
    ]
    linear_ce = getattr(nn, "LinearCrossEntropyLoss", None)
    if linear_ce is not None:
        known.append((linear_ce, ("linear",), "computes with linear.weight directly "
                                              "(F.linear_cross_entropy) and never calls linear"))
    return known


def check_parent(model: nn.Module, name: str, owner: str) -> None:
    """Raise ValueError if module `name` of `model` is a child that its parent's class is known
    to bypass (reading its weight instead of calling it)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    for cls, children, how in known_bypasses():
        if isinstance(parent, cls) and child in children:
            where = f"{parent_name!r}" if parent_name else "the model"
            raise ValueError(
                f"{owner}: module {name!r} is the {child} of {where}, a "
                f"{type(parent).__name__}, which {how}: an adapter there would have no effect. "
                f"Leave {name!r} out of target_modules; to change it, adapt the parent module "
                f"(replace it with one that calls {child}(x)), or merge an update into its "
                "weight (compose.sum_into)")


class Watch:
    """The bypass check on a model's first training forwards (see the module docstring)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.handles: list = []  # the model's hooks
        self.hooked: dict[int, tuple[nn.Module, object]] = {}  # parent id: (parent, handle)
        self.layers: list = []  # [(layer, name, parents)] of this forward
        self.settled: list[AdapterLinear] = []  # layers called once, or reported
        self.ran: set[int] = set()  # ids of the parents that ran in this forward
        self.depth = 0
        self.active = False
        self.forwards = 0

    def start(self) -> None:
        """(Re)arm on the model, e.g. after adapted layers were added."""
        self.stop()
        self.forwards, self.depth, self.active = 0, 0, False
        self.handles = [self.model.register_forward_pre_hook(self.before),
                        self.model.register_forward_hook(self.after, always_call=True)]

    def stop(self) -> None:
        for handle in self.handles + [h for _, h in self.hooked.values()]:
            handle.remove()
        self.handles, self.hooked, self.layers = [], {}, []

    def _arm(self) -> None:
        """The adapted layers the model holds now, and a hook on each of their parents."""
        held = {id(m) for m in self.model.modules() if isinstance(m, AdapterLinear)}
        self.settled = [layer for layer in self.settled if id(layer) in held]
        settled = {id(layer) for layer in self.settled}
        layers: dict[int, tuple] = {}
        parents: dict[int, nn.Module] = {}
        for name, module in self.model.named_modules(remove_duplicate=False):
            if isinstance(module, AdapterLinear) and id(module) not in settled:
                parent = self.model.get_submodule(name.rpartition(".")[0])
                layers.setdefault(id(module), (module, name, []))[2].append(parent)
                if parent is not self.model:
                    parents[id(parent)] = parent
        self.layers = list(layers.values())
        for key in set(self.hooked) - set(parents):
            self.hooked.pop(key)[1].remove()
        for key in set(parents) - set(self.hooked):
            self.hooked[key] = parents[key], parents[key].register_forward_pre_hook(
                self.parent_ran)

    def before(self, module, args) -> None:
        if torch.compiler.is_compiling():
            return
        self.depth += 1
        if self.depth > 1:
            return
        self.active = module.training and torch.is_grad_enabled()
        if not self.active:
            return
        self._arm()
        self.ran = {id(module)}
        for layer, *_ in self.layers:
            layer._called = layer._weight_read = False

    def parent_ran(self, module, args) -> None:
        if self.active and not torch.compiler.is_compiling():
            self.ran.add(id(module))

    def after(self, module, args, output) -> None:
        if torch.compiler.is_compiling():
            return
        self.depth = max(0, self.depth - 1)
        if self.depth or not self.active:
            return
        self.active = False
        self.forwards += 1
        bypassed, unknown = [], False
        for layer, name, parents in self.layers:
            if not any(p.requires_grad for _, p in layer.named_adapter_parameters()):
                unknown = True  # frozen now: nothing to train, looked at again later
            elif layer._called:
                self.settled.append(layer)
            elif layer._weight_read or any(id(p) in self.ran for p in parents):
                self.settled.append(layer)
                bypassed.append(name)
            else:
                unknown = True  # its parent did not run: maybe an expert without tokens
        if bypassed:
            warnings.warn(
                f"adapted layers {bypassed[:8]}{' ...' if len(bypassed) > 8 else ''} were not "
                "called in a training forward although their parent module ran (or their "
                ".weight was read): the parent computes with their .weight (e.g. "
                "F.linear(x, layer.weight)) instead of calling them, so the adapter has no "
                "effect and gets no gradient. Leave them out of target_modules, adapt the "
                "parent module, or merge an update into the weight", AdapterBypassWarning,
                stacklevel=_caller_level())
        if not unknown or self.forwards >= MAX_FORWARDS:
            self.stop()


def _caller_level() -> int:
    """The stacklevel of the first frame outside torch and this package: the line that called
    the model."""
    inside = (os.path.dirname(torch.__file__), os.path.dirname(os.path.dirname(__file__)))
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(inside):
        frame, level = frame.f_back, level + 1
    return level


def watch(model: nn.Module) -> None:
    """Put the bypass watch on `model` (once; armed again when layers are added)."""
    current = model.__dict__.get(_KEY)
    if not isinstance(current, Watch):
        current = Watch(model)
        model.__dict__[_KEY] = current
    current.start()


def unwatch(model: nn.Module) -> None:
    """Take the watch off `model` (merge_and_unload: no adapted layer left)."""
    current = model.__dict__.pop(_KEY, None)
    if isinstance(current, Watch):
        current.stop()
        current.settled = []
