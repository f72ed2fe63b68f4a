"""AdapterLinear: a frozen linear layer (an nn.Linear, the Conv1D of GPT-2-style models, or a
bitsandbytes 4-bit/8-bit quantized Linear: quantized.py) plus an update that is a sum of
low-rank terms. What every adapted layer (SOSLinear, CPSLinear) shares: the base checks, input
checks, merge and unmerge through the merge guard, and the merged state in state dicts."""
from __future__ import annotations

import sys

import torch
import torch.nn as nn

from .. import ops
from ..ops.dtypes import SUPPORTED_DTYPES
from . import merge_guard, quantized
from .sharing import ModelRef, fingerprint, from_sums, scope_of, shared_with

Tensor = torch.Tensor


# The dtypes the ops compute in: a base weight or adapter of any other dtype cannot work.
# Keys under base_layer. that a merged layer's state_dict adds: the update its weight holds.
_MERGED_KEYS = ("merged_A", "merged_B", "merged_scale")


def is_conv1d(module) -> bool:
    """Whether `module` is transformers' Conv1D (GPT-2, GPT, ...): a linear layer whose weight is
    stored [in, out] (PEFT's fan_in_fan_out). transformers is only looked up if already
    imported: a model made of Conv1D layers has imported it."""
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")
    return pytorch_utils is not None and isinstance(module, pytorch_utils.Conv1D)


def is_linear(module) -> bool:
    """An nn.Linear (bitsandbytes' Linear4bit and Linear8bitLt are ones) or a Conv1D: the
    layers an adapter can wrap."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def base_features(base: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or a Conv1D (weight [in, out])."""
    if is_conv1d(base):
        return tuple(base.weight.shape)
    return base.in_features, base.out_features


def weight_matrix(base: nn.Module) -> Tensor:
    """The base weight as an [out, in] matrix: a transposed view for a Conv1D, so writes into
    it (merging) change the weight itself."""
    return base.weight.t() if is_conv1d(base) else base.weight


def base_dtype(base: nn.Module) -> torch.dtype:
    """The floating dtype the base computes in: its weight's, or a quantized base's compute
    dtype (its weight holds uint8/int8 codes)."""
    return quantized.compute_dtype(base) if quantized.is_quantized_linear(base) \
        else base.weight.dtype


def check_base(base, owner: str) -> None:
    """Raise a clear error if `base` cannot carry an adapter: an nn.Linear (or a transformers
    Conv1D) with a weight of a supported floating dtype and positive in/out features, or a
    quantized bitsandbytes Linear that quantized.check_quantized accepts."""
    if not is_linear(base):
        raise TypeError(f"{owner}: base must be an nn.Linear (or a transformers Conv1D), got "
                        f"{type(base).__name__}")
    if quantized.is_quantized_linear(base):
        quantized.check_quantized(base, owner)
        return
    reason = quantized.unsupported_quantization(base)
    if reason is not None:
        raise TypeError(f"{owner}: {reason}")
    weight = base.weight
    if not isinstance(weight, Tensor) or weight.dtype not in SUPPORTED_DTYPES:
        dtype = getattr(weight, "dtype", type(weight).__name__)
        raise TypeError(f"{owner}: the base weight is {dtype}; expected one of "
                        f"{[str(d) for d in SUPPORTED_DTYPES]} (a quantized or integer Linear "
                        "cannot be adapted)")
    in_features, out_features = base_features(base)
    if in_features <= 0 or out_features <= 0 or weight.dim() != 2:
        raise ValueError(f"{owner}: in_features and out_features must be positive, got "
                         f"{in_features} -> {out_features}")


# The parameter types a fused base may have: plain tensors (not DTensor, not quantized).
_PLAIN = (nn.Parameter, Tensor)
_PLAIN_OR_NONE = (nn.Parameter, Tensor, type(None))


def _autocast_on(device_type: str) -> bool:
    # torch has no autocast state for the meta device (the query raises there).
    return device_type != "meta" and torch.is_autocast_enabled(device_type)


def _default_adapter_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    # As PEFT: half-precision bases get float32 adapters; others keep the base dtype.
    return torch.float32 if weight_dtype in (torch.float16, torch.bfloat16) else weight_dtype


class AdapterLinear(nn.Module):
    """A frozen nn.Linear (or Conv1D) plus an update that is a sum of low-rank terms.

    Subclasses give the update as factors, ``_update_factors() -> (A [R, in], B [out, R],
    scale [R] or [out, R])`` with delta = (B * scale) A, which is what merging, ``delta_weight``
    and the PEFT export use.

    While merged, the base weight holds the update: a training forward is refused (its
    gradient would not reach the factors), and ``state_dict()`` carries the merged update
    (``base_layer.merged_A/_B/_scale``) so that loading it gives a merged layer again.

    A Conv1D base (weight [in, out], GPT-2) is adapted as the linear map it is: the factors
    have the same shapes as for an nn.Linear of the same features, and merging writes the
    transposed update into its weight (``fan_in_fan_out`` is True)."""

    def __init__(self, base: nn.Module, dtype: torch.dtype | None):
        name = type(self).__name__
        check_base(base, name)
        if dtype is not None and dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name}: dtype must be a floating-point torch.dtype, one of "
                             f"{[str(d) for d in SUPPORTED_DTYPES]}, got {dtype!r}")
        super().__init__()
        self.base_layer = base
        self.fan_in_fan_out = is_conv1d(base)
        self._features = base_features(base)
        for p in base.parameters():
            p.requires_grad_(False)
        # A quantized base is never merged into: merge() is refused, the forward calls it.
        self.quantized = quantized.is_quantized_linear(base)
        self.adapter_dtype = dtype or _default_adapter_dtype(base_dtype(base))
        # Exactly the factors and scale merge() added, so unmerge() subtracts the same update
        # whatever happened to the parameters since.
        for key in _MERGED_KEYS:
            self.register_buffer("_" + key, None, persistent=False)
        self._merged_fingerprint = None  # of the weight merge() wrote: unmerge() checks it
        self._models: list[ModelRef] = []  # the models it was put into (see _scope)
        # Set by every forward in training mode or with grad enabled; check_adapters_called()
        # reads it to find layers whose parent reads .weight instead of calling them.
        self.used_in_training = False
        # Set by every forward, and by every read of .weight: bypass.py's watch reads them.
        self._called = self._weight_read = False

    @classmethod
    def from_config(cls, base: nn.Module, config, *, dtype: torch.dtype | None = None):
        """The layer of this class for `config`: an SOSConfig for SOSLinear (e.g.
        ``SOSConfig.preset("official")``), a CPSConfig for CPSLinear."""
        return cls(base, config, dtype=dtype)

    def _update_factors(self) -> tuple[Tensor, Tensor, Tensor]:
        raise NotImplementedError

    @property
    def in_features(self) -> int:
        return self._features[0]

    @property
    def out_features(self) -> int:
        return self._features[1]

    @property
    def weight(self) -> Tensor:
        if not self._weight_read:  # a parent computing with it instead of calling the layer
            self._weight_read = True
        return self.base_layer.weight

    @property
    def weight_shared_with(self) -> list[str]:
        """Paths of the tensors sharing memory with the base weight now (searched in _scope)."""
        return shared_with([(self.base_layer.weight, (self.base_layer, "weight"))],
                           self._scope())[0]

    def _scope(self) -> list[nn.Module]:
        """Where merge() and unmerge() look for tensors sharing the base weight: the model it
        was put into (apply_*, load_adapter, import_peft) while it holds it, else itself."""
        return scope_of(self, getattr(self, "_models", []))

    def _set_model(self, model: nn.Module) -> None:
        self._models = ModelRef.added(getattr(self, "_models", []), model)

    @property
    def bias(self) -> Tensor | None:
        return self.base_layer.bias

    @property
    def merged(self) -> bool:
        return self._merged_scale is not None

    def named_adapter_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) of the adapter's own parameters: all but the frozen base's."""
        return [(n, p) for n, p in self.named_parameters() if not n.startswith("base_layer.")]

    def _begin_forward(self, x: Tensor) -> bool:
        """Checks shared by every forward, and the record of a training forward; returns
        whether the adapter is merged (the forward is then the base layer's)."""
        self._check_input(x)
        if not self._called:  # nn.Module's setattr costs a microsecond: only when it changes
            self._called = True
        grad = torch.is_grad_enabled()
        # A forward that can train the adapter: also one in eval mode with grad enabled
        # (e.g. a backbone kept in eval() while its adapters train).
        if not self.used_in_training and (self.training or grad):
            self.used_in_training = True
        merged = self.merged
        if merged and self.training and grad and any(
                p.requires_grad for _, p in self.named_adapter_parameters()):
            raise RuntimeError(
                f"{type(self).__name__}: training forward on a merged adapter: its factors "
                "would get no gradient. unmerge() before training; for inference use "
                "eval() or torch.no_grad()")
        return merged

    def _check_input(self, x: Tensor) -> None:
        name = type(self).__name__
        if not isinstance(x, Tensor):
            raise TypeError(f"{name}: input x must be a tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self._features[0]:
            raise ValueError(f"{name}: input x must have last dimension in_features="
                             f"{self.in_features}, got shape {tuple(x.shape)}")
        device = self.lora_A.device
        if x.device != device:
            raise ValueError(f"{name}: input x is on {x.device} but the layer is on {device}")
        if self.quantized:
            # The quantized layer casts any floating input to its compute dtype itself.
            if x.dtype not in SUPPORTED_DTYPES:
                raise TypeError(f"{name}: input x is {x.dtype}; the quantized base takes "
                                "floating-point inputs, one of "
                                f"{[str(d) for d in SUPPORTED_DTYPES]}")
            return
        weight_dtype = self.base_layer.weight.dtype
        if x.dtype != weight_dtype and not _autocast_on(device.type):
            raise TypeError(f"{name}: input x is {x.dtype} but the base weight is "
                            f"{weight_dtype} (cast x, or run under autocast)")

    def _base_fusable(self, dtype: torch.dtype) -> bool:
        """Whether the base product can be computed inside the adapter's op: a plain nn.Linear
        (no hooks, plain tensors) in the compute dtype."""
        return self._fused_base(dtype) is not None

    def _fused_base(self, dtype: torch.dtype) -> tuple[Tensor, Tensor | None] | None:
        """(weight, bias) when the base product can be computed inside the adapter's op (see
        _base_fusable), else None."""
        base = self.base_layer
        if type(base) is not nn.Linear or base._forward_hooks or base._forward_pre_hooks:
            return None
        weight, bias = base.weight, base.bias
        if weight.dtype == dtype and type(weight) in _PLAIN and type(bias) in _PLAIN_OR_NONE:
            return weight, bias
        return None

    def _compute_dtype(self, x: Tensor, A: Tensor) -> torch.dtype:
        """The autocast dtype under autocast, else the factors' (A's) dtype."""
        device_type = x.device.type
        if _autocast_on(device_type):
            return torch.get_autocast_dtype(device_type)
        return A.dtype

    def _base_output(self, x: Tensor) -> Tensor:
        """The base layer's output. A 4-bit base repacked for bitsandbytes' CPU inference
        kernel (after an eval() forward) gives its exact training-mode product whenever a
        gradient may be needed: its own forward cannot be differentiated then."""
        base = self.base_layer
        if self.quantized and torch.is_grad_enabled() and quantized.is_packed_for_cpu(base):
            return quantized.exact_forward(base, x)
        return base(x)

    def _adapted_forward(self, x: Tensor, A: Tensor, B: Tensor, scale: Tensor,
                         dropout_p: float, dropout_on_input: bool, **step) -> Tensor:
        """base(x) plus the update of factors A, B and scale (ops.adapted_linear, which takes
        the `step` options too), as one autograd node: the base product inside it when the
        base allows, else the base layer's output added inside it (or after it, when its
        dtype is not the compute dtype)."""
        dtype = self._compute_dtype(x, A)
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        if x2.dtype != dtype:
            x2 = x2.to(dtype)
        step.update(dropout_p=dropout_p, dropout_on_input=dropout_on_input)
        fused = self._fused_base(dtype)
        if fused is not None:
            out = ops.adapted_linear(x2, A, B, scale, weight=fused[0], bias=fused[1], **step)
            return out if x.dim() == 2 else out.reshape(*x.shape[:-1], out.shape[-1])
        result = self._base_output(x)
        base2 = result.reshape(-1, self.out_features)
        if base2.dtype == dtype:
            return ops.adapted_linear(x2, A, B, scale, base_out=base2, **step).reshape(
                result.shape)
        out = ops.adapted_linear(x2, A, B, scale, **step)
        return result + out.reshape(result.shape).to(result.dtype)

    @torch.no_grad()
    def delta_weight(self) -> Tensor:
        """The update in the accumulation dtype, laid out as the base weight ([out, in]; [in,
        out] for a Conv1D), so that weight + delta_weight() is the merged weight. Refused, as
        merge(), if a factor or scale is not finite or the update overflows that dtype."""
        A, B, scale = self._update_factors()
        delta = torch.zeros(self.out_features, self.in_features, device=A.device,
                            dtype=ops.accumulate_dtype(A.dtype))
        target = merge_guard.Target("", delta, [merge_guard.Term(A, B, scale)])
        merge_guard.merge_([target], f"{type(self).__name__}.delta_weight")
        return delta.t().contiguous() if self.fan_in_fan_out else delta

    def _check_mergeable(self, where: str) -> None:
        if self.quantized:
            raise RuntimeError(quantized.merge_refusal(self.base_layer, where))
        if self.merged:
            raise RuntimeError(f"{where}: the adapter is already merged; unmerge() first")

    @torch.no_grad()
    def _merge_target(self, name: str) -> merge_guard.Target:
        """What merge() adds: detached copies of the factors (small), recorded once merged."""
        A, B, scale = (t.detach().clone() for t in self._update_factors())
        term = merge_guard.Term(A, B, scale)
        base = self.base_layer
        return merge_guard.Target(name, weight_matrix(base), [term], owner=(base, "weight"))

    def _record_merged(self, target: merge_guard.Target, stats: ops.WeightStats | None) -> None:
        """Record the update `target` wrote and the fingerprint of the weight it left (`stats`,
        from the pass that wrote it; None for a weight without values, on the meta device)."""
        term = target.terms[0]
        self._set_merged(term.A, term.B, term.scale)
        self._merged_fingerprint = None if stats is None else from_sums(target.weight, stats.sums)

    def _set_merged(self, A: Tensor | None, B: Tensor | None, scale: Tensor | None) -> None:
        # Straight into the buffers' dict: nn.Module's setattr costs microseconds a name.
        self._buffers.update(_merged_A=A, _merged_B=B, _merged_scale=scale)

    @torch.no_grad()
    def merge(self) -> None:
        """Add the update into the base weight in place (float32 accumulation, one rounding).
        Refused, with the weight unchanged, if a factor is not finite, the sum would overflow
        the weight's dtype, or another tensor of the model shares the weight's memory (see
        _scope: a layer built on its own knows only itself). One pass over the weight when its
        max |W| is known (merge_guard), two otherwise."""
        name = type(self).__name__
        self._check_mergeable(f"{name}.merge")
        target = self._merge_target("")
        (stats,) = merge_guard.merge_([target], f"{name}.merge", self._scope())
        self._record_merged(target, stats)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract exactly the update merge() added (exact up to one rounding of the weight's
        dtype), even if the factors or scales changed since. Refused, with nothing changed, if
        the base weight is not the one merge() wrote (its fingerprint differs: restored,
        reloaded, replaced or cast since) or shares memory with another tensor of the model.
        Two passes over the weight: its fingerprint (and max |W|) read, then the write."""
        name = type(self).__name__
        if self.quantized:
            raise RuntimeError(quantized.merge_refusal(self.base_layer, f"{name}.unmerge"))
        if not self.merged:
            raise RuntimeError(f"{name}.unmerge: the adapter is not merged")
        base = self.base_layer
        weight = weight_matrix(base)
        recorded = getattr(self, "_merged_fingerprint", None)
        if recorded is not None and from_sums(weight, merge_guard.read(weight).sums) != recorded:
            raise RuntimeError(
                f"{name}.unmerge: the base weight is not the one merge() wrote (restored, "
                "reloaded, replaced or cast since): subtracting the update would leave it off by "
                "the whole update. Nothing was changed; if it no longer holds the update, call "
                "discard_merge()")
        term = merge_guard.Term(self._merged_A, self._merged_B, self._merged_scale, -1.0)
        target = merge_guard.Target("", weight, [term], owner=(base, "weight"))
        merge_guard.merge_([target], f"{name}.unmerge", self._scope())
        self.discard_merge()

    def discard_merge(self) -> None:
        """Forget the merged update without writing the weight: for a base weight that no
        longer holds it (restored or replaced since merge()). The layer is unmerged after."""
        self._set_merged(None, None, None)
        self._merged_fingerprint = None

    # ---- state dict: a merged layer's weight comes with the update it holds -----------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.merged:
            for key in _MERGED_KEYS:
                t = getattr(self, "_" + key)
                destination[f"{prefix}base_layer.{key}"] = t if keep_vars else t.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        keys = [f"{prefix}base_layer.{key}" for key in _MERGED_KEYS]
        update = [state_dict.pop(k) for k in keys if k in state_dict]  # not the base's keys
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if update and len(update) != len(keys):
            error_msgs.append(f"{prefix}base_layer: a merged state needs all of "
                              f"{list(_MERGED_KEYS)}")
        elif update and self.quantized:
            error_msgs.append(f"{prefix}base_layer: a merged update cannot be loaded onto the "
                              f"quantized base ({quantized.describe(self.base_layer)})")
        elif update and (problem := merge_guard.update_problem(
                merge_guard.Term(*update), self.out_features, self.in_features, self.weight.dtype)):
            error_msgs.append(f"{prefix}base_layer: {problem}")
        elif f"{prefix}base_layer.weight" in state_dict:
            # The loaded base weight decides: merged (it holds `update`) or not.
            device = self.lora_A.device
            merged = [t.detach().clone().to(device) for t in update] or [None] * len(keys)
            self._merged_A, self._merged_B, self._merged_scale = merged
            # The fingerprint of the [out, in] weight the load copies in (in the weight's dtype).
            loaded = state_dict[f"{prefix}base_layer.weight"]
            if update and isinstance(loaded, Tensor):
                loaded = loaded.detach().to(self.base_layer.weight.dtype)
                self._merged_fingerprint = fingerprint(loaded.t() if self.fan_in_fan_out
                                                       else loaded)
            else:
                self._merged_fingerprint = None
        elif update:
            error_msgs.append(f"{prefix}base_layer: merged update without base_layer.weight")

    def merge_and_unload(self, dequantize: bool = False,
                         dtype: torch.dtype | None = None) -> nn.Module:
        """Merge (if not yet merged) and return the base layer (nn.Linear or Conv1D) carrying
        the update. A quantized base is refused unless `dequantize`: then a new frozen
        nn.Linear of `dtype` (default: the base's compute dtype) holding the dequantized weight
        plus the update (quantized.merged_linear), this layer left as it was."""
        name = type(self).__name__
        if self.quantized and dequantize:
            return quantized.merged_linear(self, dtype, f"{name}.merge_and_unload")
        if dtype is not None:
            raise ValueError(f"{name}.merge_and_unload: dtype applies only to a quantized base "
                             "with dequantize=True")
        if not self.merged:
            self.merge()
        return self.base_layer
