"""AdapterLinear: a frozen layer (an nn.Linear, the Conv1D of GPT-2-style models, a
bitsandbytes 4-bit/8-bit quantized Linear: quantized.py; or an nn.Embedding, nn.Conv1d/2d/3d or
nn.MultiheadAttention: kinds.py) plus an update that is a sum of low-rank terms. What every
adapted layer (SOSLinear, CPSLinear) shares: the base checks, input checks, merge and unmerge
through the merge guard, and the merged state in state dicts."""
from __future__ import annotations

import torch
import torch.nn as nn

from .. import ops
from ..ops.dtypes import SUPPORTED_DTYPES
from . import kinds, merge_guard, quantized
from .bases import (  # noqa: F401  re-exported: the names other modules import from here
    base_dtype,
    base_features,
    base_weight,
    check_base,
    is_adaptable,
    is_conv1d,
    is_linear,
    partition_shape,
    weight_matrix,
)
from .merged_state import MERGED_KEYS, MergedState, fingerprint_loaded
from .sharing import ModelRef, from_sums, scope_of, shared_with

Tensor = torch.Tensor




# The parameter types a fused base may have: plain tensors (not DTensor, not quantized).
_PLAIN = (nn.Parameter, Tensor)
_PLAIN_OR_NONE = (nn.Parameter, Tensor, type(None))


def _autocast_on(device_type: str) -> bool:
    # torch has no autocast state for the meta device (the query raises there).
    return device_type != "meta" and torch.is_autocast_enabled(device_type)


def _default_adapter_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    # As PEFT: half-precision bases get float32 adapters; others keep the base dtype.
    return torch.float32 if weight_dtype in (torch.float16, torch.bfloat16) else weight_dtype


class AdapterLinear(MergedState, nn.Module):
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
        self._kind = kinds.kind_of(base)  # None for a linear layer
        self._features = base_features(base)
        for p in base.parameters():
            p.requires_grad_(False)
        # A quantized base is never merged into: merge() is refused, the forward calls it.
        self.quantized = quantized.is_quantized_linear(base)
        self.adapter_dtype = dtype or _default_adapter_dtype(base_dtype(base))
        # Exactly the factors and scale merge() added, so unmerge() subtracts the same update
        # whatever happened to the parameters since.
        for key in MERGED_KEYS:
            self.register_buffer("_" + key, None, persistent=False)
        self._merged_fingerprint = None  # of the weight merge() wrote: unmerge() checks it
        self.register_load_state_dict_post_hook(fingerprint_loaded)
        self._models: list[ModelRef] = []  # the models it was put into (see _scope)
        # Set by every forward in training mode or with grad enabled; check_adapters_called()
        # reads it to find layers whose parent reads .weight instead of calling them.
        self.used_in_training = False
        # Set by every forward, and by every read of .weight: bypass.py's watch reads them.
        self._called = self._weight_read = False

    def _init_kind(self, config, dtype: torch.dtype | None) -> None:
        """Per-kind setup, called by the subclasses once their factors exist: an attention
        base's out_proj gets an adapter of this class and config (as PEFT's); an embedding's
        padding entry a zero column of A (_zero_padding)."""
        if isinstance(self._kind, kinds.AttentionKind) and not isinstance(
                self.base_layer.out_proj, AdapterLinear):
            self.base_layer.out_proj = type(self)(self.base_layer.out_proj, config, dtype=dtype)
        self._zero_padding()

    @torch.no_grad()
    def _zero_padding(self) -> None:
        """An embedding's padding_idx column of A is zero: its row of the update is zero, as
        the base's row, and stays so (F.embedding gives that column no gradient, and with
        h = 0 there B gets none from padding tokens either)."""
        pad = getattr(self.base_layer, "padding_idx", None) \
            if isinstance(self._kind, kinds.EmbeddingKind) else None
        if pad is None or self.lora_A.device.type == "meta":
            return
        index = getattr(self, "col_index", None)  # CPS-LoRA keeps A in partition order
        column = pad if index is None else int((index == pad).nonzero()[0, 0])
        self.lora_A[:, column] = 0

    def nested_adapters(self) -> list[AdapterLinear]:
        """Adapters inside this one's base: an attention module's out_proj adapter."""
        out_proj = getattr(self.base_layer, "out_proj", None) if self._kind else None
        return [out_proj] if isinstance(out_proj, AdapterLinear) else []

    def _mark_called(self) -> None:
        """Record a call (for a nested adapter its parent computes with: check_adapters_called
        and the bypass watch read these)."""
        self._called = True
        if self.training or torch.is_grad_enabled():
            self.used_in_training = True

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
        return base_weight(self.base_layer)

    def _weight_attr(self) -> str:
        return "weight" if self._kind is None else self._kind.attr

    @property
    def weight_shared_with(self) -> list[str]:
        """Paths of the tensors sharing memory with the base weight now (searched in _scope)."""
        base = self.base_layer
        return shared_with([(base_weight(base), (base, self._weight_attr()))],
                           self._scope())[0]

    def _scope(self) -> list[nn.Module]:
        """Where merge() and unmerge() look for tensors sharing the base weight: the model it
        was put into (apply_*, load_adapter, import_peft) while it holds it, else itself."""
        return scope_of(self, getattr(self, "_models", []))

    def _set_model(self, model: nn.Module) -> None:
        self._models = ModelRef.added(getattr(self, "_models", []), model)

    @property
    def bias(self) -> Tensor | None:
        return getattr(self.base_layer, "bias", None)

    @property
    def merged(self) -> bool:
        return self._merged_scale is not None

    def named_adapter_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) of the adapter's own parameters: all but the frozen base's."""
        return [(n, p) for n, p in self.named_parameters() if not n.startswith("base_layer.")]

    def _begin_forward(self, x: Tensor, args: tuple = (), kwargs: dict | None = None) -> bool:
        """Checks shared by every forward, and the record of a training forward; returns
        whether the adapter is merged (the forward is then the base layer's). Only an
        attention module takes more arguments than its input (key, value, masks)."""
        if (args or kwargs) and not isinstance(self._kind, kinds.AttentionKind):
            raise TypeError(f"{type(self).__name__}.forward takes one input x, got "
                            f"{len(args)} more positional and {sorted(kwargs or {})} keyword "
                            "arguments")
        self._check_input(x)
        if not self._called:  # nn.Module's setattr costs a microsecond: only when it changes
            self._called = True
        grad = torch.is_grad_enabled()
        # A forward that can train the adapter: also one in eval mode with grad enabled
        # (e.g. a backbone kept in eval() while its adapters train).
        if not self.used_in_training and (self.training or grad):
            self.used_in_training = True
        merged = self.merged and all(n.merged for n in self.nested_adapters())
        if merged and self.training and grad and any(
                p.requires_grad for _, p in self.named_adapter_parameters()):
            raise RuntimeError(
                f"{type(self).__name__}: training forward on a merged adapter: its factors "
                "would get no gradient. unmerge() before training; for inference use "
                "eval() or torch.no_grad()")
        return merged

    def _check_input(self, x: Tensor) -> None:
        name = type(self).__name__
        if self._kind is not None:
            self._kind.check_input(self, x, name)
        elif not isinstance(x, Tensor):
            raise TypeError(f"{name}: input x must be a tensor, got {type(x).__name__}")
        elif x.dim() == 0 or x.shape[-1] != self._features[0]:
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
        if isinstance(self._kind, kinds.EmbeddingKind):
            return  # token ids
        weight_dtype = base_weight(self.base_layer).dtype
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

    def _kind_forward(self, x: Tensor, args: tuple, kwargs: dict, A: Tensor, B: Tensor,
                      scale: Tensor, dropout_p: float, dropout_on_input: bool,
                      step: dict) -> Tensor:
        """The forward over a base of another kind than a linear layer (kinds.py)."""
        if isinstance(self._kind, kinds.AttentionKind):
            return self._kind.forward(self, x, args, kwargs, A, B, scale, step)
        return self._kind.forward(self, x, A, B, scale, dropout_p, dropout_on_input, step)

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
        out] for a Conv1D; [num_embeddings, dim] for an embedding; [out, in, *kernel] for a
        convolution; [3E, E] for an attention module's in_proj_weight, its out_proj's update
        is that adapter's), so that weight + delta_weight() is the merged weight. Refused, as
        merge(), if a factor or scale is not finite or the update overflows that dtype."""
        A, B, scale = self._update_factors()
        delta = torch.zeros(self.out_features, self.in_features, device=A.device,
                            dtype=ops.accumulate_dtype(A.dtype))
        target = merge_guard.Target("", delta, [merge_guard.Term(A, B, scale)])
        merge_guard.merge_([target], f"{type(self).__name__}.delta_weight")
        if self._kind is not None:
            return self._kind.layout(self.base_layer, delta)
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
        return merge_guard.Target(name, weight_matrix(base), [term],
                                  owner=(base, self._weight_attr()))

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
        _scope: a layer built on its own knows only itself). An attention module's out_proj
        adapter is merged with it (all or nothing). One pass over each weight when its max |W|
        is known (merge_guard), two otherwise."""
        name = type(self).__name__
        self._check_mergeable(f"{name}.merge")
        layers = [self] + [n for n in self.nested_adapters() if not n.merged]
        targets = [layer._merge_target("out_proj" if layer is not self else "")
                   for layer in layers]
        stats = merge_guard.merge_(targets, f"{name}.merge", self._scope())
        for layer, target, written in zip(layers, targets, stats):
            layer._record_merged(target, written)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract exactly the update merge() added (exact up to one rounding of the weight's
        dtype), even if the factors or scales changed since. Refused, with nothing changed, if
        the base weight is not the one merge() wrote (its fingerprint differs: restored,
        reloaded, replaced or cast since) or shares memory with another tensor of the model.
        An attention module's out_proj adapter is unmerged with it. Two passes over the weight:
        its fingerprint (and max |W|) read, then the write."""
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
        target = merge_guard.Target("", weight, [term], owner=(base, self._weight_attr()))
        merge_guard.merge_([target], f"{name}.unmerge", self._scope())
        self.discard_merge()
        for nested in self.nested_adapters():
            if nested.merged:
                nested.unmerge()

    def discard_merge(self) -> None:
        """Forget the merged update without writing the weight: for a base weight that no
        longer holds it (restored or replaced since merge()). The layer is unmerged after."""
        self._set_merged(None, None, None)
        self._merged_fingerprint = None

    def merge_and_unload(self, dequantize: bool = False,
                         dtype: torch.dtype | None = None) -> nn.Module:
        """Merge (if not yet merged) and return the base layer (nn.Linear, Conv1D or another
        kind; an attention module with its out_proj Linear put back) carrying the update. A
        quantized base is refused unless `dequantize`: then a new frozen
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
        for nested in self.nested_adapters():
            self.base_layer.out_proj = nested.merge_and_unload()
        return self.base_layer
