"""Adapted linear layers: what every adapter shares (AdapterLinear), and SOSLinear, an
nn.Linear wrapped with an SOS-LoRA adapter (K static, always-on experts)."""
from __future__ import annotations

import torch
import torch.nn as nn

from . import merging, ops, reference
from .config import SOSConfig
from .distributed import full

Tensor = torch.Tensor


class _AddToGrad(torch.autograd.Function):
    """Identity in the forward pass; adds a fixed tensor to the gradient in the backward pass.

    Carries the reference recipe's gradient-only terms (scale anchor, gate uniform prior),
    which have no loss of their own."""

    @staticmethod
    def forward(ctx, t, extra):
        ctx.save_for_backward(extra)
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        (extra,) = ctx.saved_tensors
        return grad + extra, None


class _AFactorGradient(torch.autograd.Function):
    """Identity on lora_A; backward returns (grad + lam * d ortho_penalty / dA) / loraplus_ratio.

    lam is a device tensor, so a schedule can change it without a host sync; the ratio divides
    the sum, as in the reference code."""

    @staticmethod
    def forward(ctx, A, lam, num_experts, grad_multiplier):
        ctx.save_for_backward(A, lam)
        ctx.num_experts, ctx.grad_multiplier = num_experts, grad_multiplier
        return A.view_as(A)

    @staticmethod
    def backward(ctx, grad):
        A, lam = ctx.saved_tensors
        grad = grad.clone()
        if ctx.num_experts > 1:
            ops.add_ortho_penalty_grad_(grad, A, lam, ctx.num_experts)
        if ctx.grad_multiplier != 1.0:
            grad = grad * ctx.grad_multiplier
        return grad, None, None, None


# The dtypes the ops compute in: a base weight or adapter of any other dtype cannot work.
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Keys under base_layer. that a merged layer's state_dict adds: the update its weight holds.
_MERGED_KEYS = ("merged_A", "merged_B", "merged_scale")


def check_base(base, owner: str) -> None:
    """Raise a clear error if `base` cannot carry an adapter: an nn.Linear with a weight of a
    supported floating dtype and positive in/out features."""
    if not isinstance(base, nn.Linear):
        raise TypeError(f"{owner}: base must be an nn.Linear, got {type(base).__name__}")
    weight = base.weight
    if not isinstance(weight, Tensor) or weight.dtype not in SUPPORTED_DTYPES:
        dtype = getattr(weight, "dtype", type(weight).__name__)
        raise TypeError(f"{owner}: the base weight is {dtype}; expected one of "
                        f"{[str(d) for d in SUPPORTED_DTYPES]} (a quantized or integer Linear "
                        "cannot be adapted)")
    if base.in_features <= 0 or base.out_features <= 0 or weight.dim() != 2:
        raise ValueError(f"{owner}: in_features and out_features must be positive, got "
                         f"{base.in_features} -> {base.out_features}")


def _autocast_on(device_type: str) -> bool:
    # torch has no autocast state for the meta device (the query raises there).
    return device_type != "meta" and torch.is_autocast_enabled(device_type)


def _default_adapter_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    # As PEFT: half-precision bases get float32 adapters; others keep the base dtype.
    return torch.float32 if weight_dtype in (torch.float16, torch.bfloat16) else weight_dtype


class AdapterLinear(nn.Module):
    """A frozen nn.Linear plus an update that is a sum of low-rank terms.

    Subclasses give the update as factors, ``_update_factors() -> (A [R, in], B [out, R],
    scale [R] or [out, R])`` with delta = (B * scale) A, which is what merging, ``delta_weight``
    and the PEFT export use.

    While merged, the base weight holds the update: a training forward is refused (its
    gradient would not reach the factors), and ``state_dict()`` carries the merged update
    (``base_layer.merged_A/_B/_scale``) so that loading it gives a merged layer again."""

    def __init__(self, base: nn.Linear, dtype: torch.dtype | None):
        name = type(self).__name__
        check_base(base, name)
        if dtype is not None and dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name}: dtype must be a floating-point torch.dtype, one of "
                             f"{[str(d) for d in SUPPORTED_DTYPES]}, got {dtype!r}")
        super().__init__()
        self.base_layer = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.adapter_dtype = dtype or _default_adapter_dtype(base.weight.dtype)
        # Exactly the factors and scale merge() added, so unmerge() subtracts the same update
        # whatever happened to the parameters since.
        for key in _MERGED_KEYS:
            self.register_buffer("_" + key, None, persistent=False)
        # Modules that share the base weight (set by apply_*); merging would change them.
        self.weight_shared_with: list[str] = []
        # Set by every forward in training mode or with grad enabled; check_adapters_called()
        # reads it to find layers whose parent reads .weight instead of calling them.
        self.used_in_training = False

    def _update_factors(self) -> tuple[Tensor, Tensor, Tensor]:
        raise NotImplementedError

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base_layer.bias

    @property
    def merged(self) -> bool:
        return self._merged_scale is not None

    def _adapter_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if not n.startswith("base_layer.")]

    def _begin_forward(self, x: Tensor) -> None:
        """Checks shared by every forward, and the record of a training forward."""
        self._check_input(x)
        # A forward that can train the adapter: also one in eval mode with grad enabled
        # (e.g. a backbone kept in eval() while its adapters train).
        if (self.training or torch.is_grad_enabled()) and not self.used_in_training:
            self.used_in_training = True
        if self.training:
            if self.merged and torch.is_grad_enabled() and any(
                    p.requires_grad for p in self._adapter_parameters()):
                raise RuntimeError(
                    f"{type(self).__name__}: training forward on a merged adapter: its factors "
                    "would get no gradient. unmerge() before training; for inference use "
                    "eval() or torch.no_grad()")

    def _check_input(self, x: Tensor) -> None:
        name = type(self).__name__
        if not isinstance(x, Tensor):
            raise TypeError(f"{name}: input x must be a tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"{name}: input x must have last dimension in_features="
                             f"{self.in_features}, got shape {tuple(x.shape)}")
        if x.device != self.lora_A.device:
            raise ValueError(f"{name}: input x is on {x.device} but the layer is on "
                             f"{self.lora_A.device}")
        if x.dtype != self.weight.dtype and not _autocast_on(x.device.type):
            raise TypeError(f"{name}: input x is {x.dtype} but the base weight is "
                            f"{self.weight.dtype} (cast x, or run under autocast)")

    def _base_fusable(self, dtype: torch.dtype) -> bool:
        """Whether the base product can be computed inside the adapter's op: a plain nn.Linear
        (no hooks, plain tensors) in the compute dtype."""
        base = self.base_layer
        return (type(base) is nn.Linear and not base._forward_hooks
                and not base._forward_pre_hooks and base.weight.dtype == dtype
                and all(type(t.data) is Tensor for t in base.parameters()))

    def _compute_dtype(self, x: Tensor) -> torch.dtype:
        if _autocast_on(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        return self.lora_A.dtype

    @torch.no_grad()
    def delta_weight(self) -> Tensor:
        """The update as an [out, in] tensor in the accumulation dtype. Refused, as merge(),
        if a factor or scale is not finite or the update overflows that dtype."""
        A, B, scale = self._update_factors()
        delta = torch.zeros(self.out_features, self.in_features, device=A.device,
                            dtype=ops.accumulate_dtype(A.dtype))
        target = merging.Target("", delta, [merging.Term(A, B, scale)])
        merging.merge_([target], f"{type(self).__name__}.delta_weight")
        return delta

    def _check_mergeable(self, where: str) -> None:
        if self.merged:
            raise RuntimeError(f"{where}: the adapter is already merged; unmerge() first")
        if self.weight_shared_with:
            raise RuntimeError(f"{where}: the base weight is shared with "
                               f"{self.weight_shared_with}; merging would change those modules "
                               "too. Keep the adapter unmerged (or untie the weights first)")

    @torch.no_grad()
    def _merge_target(self, name: str) -> merging.Target:
        """What merge() adds: detached copies of the factors (small), recorded once merged."""
        A, B, scale = (t.detach().clone() for t in self._update_factors())
        return merging.Target(name, self.base_layer.weight, [merging.Term(A, B, scale)])

    def _record_merged(self, target: merging.Target) -> None:
        term = target.terms[0]
        self._merged_A, self._merged_B, self._merged_scale = term.A, term.B, term.scale

    @torch.no_grad()
    def merge(self) -> None:
        """Add the update into the base weight in place (float32 accumulation, one rounding).
        Refused, with the weight unchanged, if a factor is not finite or the sum would overflow
        the weight's dtype."""
        name = type(self).__name__
        self._check_mergeable(f"{name}.merge")
        target = self._merge_target("")
        merging.merge_([target], f"{name}.merge")
        self._record_merged(target)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract exactly the update merge() added (exact up to one rounding of the weight's
        dtype), even if the factors or scales changed since."""
        name = type(self).__name__
        if not self.merged:
            raise RuntimeError(f"{name}.unmerge: the adapter is not merged")
        term = merging.Term(self._merged_A, self._merged_B, self._merged_scale, -1.0)
        merging.merge_([merging.Target("", self.base_layer.weight, [term])], f"{name}.unmerge")
        self._merged_A = self._merged_B = self._merged_scale = None

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
        elif update and (problem := merging.update_problem(
                merging.Term(*update), self.out_features, self.in_features, self.weight.dtype)):
            error_msgs.append(f"{prefix}base_layer: {problem}")
        elif f"{prefix}base_layer.weight" in state_dict:
            # The loaded base weight decides: merged (it holds `update`) or not.
            device = self.lora_A.device
            merged = [t.detach().clone().to(device) for t in update] or [None] * len(keys)
            self._merged_A, self._merged_B, self._merged_scale = merged
        elif update:
            error_msgs.append(f"{prefix}base_layer: merged update without base_layer.weight")

    def merge_and_unload(self) -> nn.Linear:
        """Merge (if not yet merged) and return the base nn.Linear carrying the update."""
        if not self.merged:
            self.merge()
        return self.base_layer


class SOSLinear(AdapterLinear):
    """y = base(x) + sum_k s_k * (B_k A_k drop(x)): K static low-rank experts on a frozen Linear.

    The experts are stored concatenated: ``lora_A`` [r_tot, in] and ``lora_B`` [out, r_tot];
    ``expert_ranges[k]`` is expert k's slice of rows of A / columns of B. Scales are fixed
    (``scale_mode="fixed"``, one per expert) or trainable per expert and output channel
    (``"channel"``, [K, out]), optionally times a mean-1 gate K*softmax(logits / T).

    Args:
        base: the nn.Linear to adapt; wrapped, not copied; its parameters are frozen.
        num_experts, rank, alpha, gamma_max, rank_mode, scale_base, scale_mode, gate,
        scale_anchor, uniform_prior, loraplus_ratio, dropout, dropout_position, init_gain:
            see SOSConfig and METHODS.md. ``dropout_position="post"`` drops A x (the reference
            default), ``"pre"`` drops x (as PEFT).
        dtype: dtype of the adapter factors; default float32 for fp16/bf16 bases (as PEFT),
            else the base weight's dtype. Scales and gate are float32 (float64 with float64
            factors).

    Inputs ``x: [..., in]`` of float32/bf16/fp16 (float64 on CPU). The adapter computes in the
    autocast dtype when autocast is on, else in the adapter dtype; the output has the base
    layer's output dtype. In training mode the backward adds ``ortho_lambda`` times the
    gradient of ``ortho_penalty()`` to lora_A's gradient (``ortho_lambda`` is a device buffer,
    0 until an OrthoSchedule sets it).
    """

    def __init__(self, base: nn.Linear, num_experts: int = 4, rank: int = 64,
                 alpha: float = 128.0, gamma_max: float = 2.5, rank_mode: str = "total",
                 scale_base: str = "expert", scale_mode: str = "fixed", gate: bool = False,
                 scale_anchor: float = 0.0, uniform_prior: float = 0.0,
                 loraplus_ratio: float = 1.0, dropout: float = 0.0,
                 dropout_position: str = "post", init_gain: float = 2**0.5,
                 dtype: torch.dtype | None = None):
        config = SOSConfig(num_experts=num_experts, rank=rank, alpha=alpha, gamma_max=gamma_max,
                           rank_mode=rank_mode, scale_base=scale_base, scale_mode=scale_mode,
                           gate=gate, scale_anchor=scale_anchor, uniform_prior=uniform_prior,
                           loraplus_ratio=loraplus_ratio, dropout=dropout,
                           dropout_position=dropout_position, init_gain=init_gain)
        super().__init__(base, dtype)
        self.config = config
        weight, dtype = base.weight, self.adapter_dtype

        K, r = config.num_experts, config.r_expert
        factory = dict(device=weight.device, dtype=dtype)
        scale_factory = dict(device=weight.device, dtype=ops.accumulate_dtype(dtype))
        A = torch.cat(reference.orthogonal_init(K, r, base.in_features, config.init_gain), dim=0)
        self.lora_A = nn.Parameter(A.to(**factory))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, config.r_total, **factory))
        self.register_buffer("fixed_scales", torch.tensor(config.fixed_scales(), **scale_factory))
        self.register_buffer("ortho_lambda", torch.zeros((), **scale_factory))
        if config.scale_mode == "channel":
            self.expert_scales = nn.Parameter(
                self.fixed_scales[:, None].repeat(1, base.out_features))
        if config.gate:
            logits = torch.randn(K, dtype=torch.float32) * 0.05
            self.gate_logits = nn.Parameter((logits - logits.mean()).to(**scale_factory))
            self.register_buffer("gate_temperature", torch.ones((), **scale_factory))

    # ---- structure ---------------------------------------------------------------------------
    @property
    def num_experts(self) -> int:
        return self.config.num_experts

    @property
    def expert_ranges(self) -> list[slice]:
        """Expert k's rows of lora_A and columns of lora_B."""
        r = self.config.r_expert
        return [slice(k * r, (k + 1) * r) for k in range(self.num_experts)]

    def describe(self) -> str:
        """One line: experts, ranks, scale mode, gate and effective scales."""
        c, scales = self.config, self.scales()
        shown = scales if scales.dim() == 1 else scales.mean(dim=1)
        note = "" if scales.dim() == 1 else " (mean over channels)"
        return (f"SOS K={c.num_experts} r_tot={c.r_total} scale_mode={c.scale_mode} "
                f"gate={c.gate} scales={[round(v, 3) for v in shown.tolist()]}{note}")

    def extra_repr(self) -> str:
        c = self.config
        return (f"in={self.in_features}, out={self.out_features}, experts={c.num_experts}, "
                f"r_tot={c.r_total}, scale_mode={c.scale_mode}, gate={c.gate}, "
                f"dropout={c.dropout} ({c.dropout_position}), merged={self.merged}")

    # ---- scales ------------------------------------------------------------------------------
    def _gate(self) -> Tensor:
        logits, T = self.gate_logits, self.gate_temperature
        if self.config.uniform_prior > 0:
            p = torch.softmax(logits.detach() / T, dim=0)
            logits = _AddToGrad.apply(logits, self.config.uniform_prior * (p - 1 / p.numel()) / T)
        return logits.numel() * torch.softmax(logits / T, dim=0)

    def _expert_scale_tensor(self) -> Tensor:
        """[K] (fixed) or [K, out] (channel) effective scales, gate folded in; differentiable."""
        if self.config.scale_mode == "channel":
            scales = self.expert_scales
            if self.config.scale_anchor > 0:
                pull = self.config.scale_anchor * (scales.detach() - self.fixed_scales[:, None])
                scales = _AddToGrad.apply(scales, pull)
        else:
            scales = self.fixed_scales
        if self.config.gate:
            g = self._gate()
            scales = scales * (g if scales.dim() == 1 else g[:, None])
        return scales

    def _rank_scale(self) -> Tensor:
        """The scales as the ops take them: [r_tot] (per rank) or [out, r_tot]."""
        scales, r = self._expert_scale_tensor(), self.config.r_expert
        if scales.dim() == 1:
            return scales.repeat_interleave(r, dim=0)
        return scales.t().repeat_interleave(r, dim=1)

    def scales(self) -> Tensor:
        """Effective per-expert scales [K] (or [K, out] in channel mode), gate included."""
        with torch.no_grad():
            return self._expert_scale_tensor().clone()

    # ---- forward -----------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        self._begin_forward(x)
        if self.merged:
            return self.base_layer(x)
        c = self.config
        A = self.lora_A
        if self.training and (c.num_experts > 1 or c.loraplus_ratio != 1.0):
            A = _AFactorGradient.apply(A, self.ortho_lambda, c.num_experts, 1.0 / c.loraplus_ratio)
        dtype = self._compute_dtype(x)
        p = c.dropout if self.training else 0.0
        seed = ops.new_dropout_seed(x.device) if p > 0 else None
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(dtype)
        factors = (A.to(dtype), self.lora_B.to(dtype), self._rank_scale(), seed, p,
                   c.dropout_position == "pre")
        if self._base_fusable(dtype):
            # Base and adapter in one op: one output buffer, one input-gradient buffer.
            out = ops.linear_lowrank(x2, self.weight, self.bias, *factors)
            return out.reshape(*lead, self.out_features)
        result = self.base_layer(x)
        base2 = result.reshape(-1, self.out_features)
        fused = base2.dtype == dtype  # add into the base output inside the op when dtypes agree
        out = ops.lowrank(x2, *factors[:3], base2 if fused else None, *factors[3:])
        out = out.reshape(result.shape)
        return out if fused else result + out.to(result.dtype)

    # ---- penalty, delta, merge ---------------------------------------------------------------
    def ortho_penalty(self) -> Tensor:
        """Cross-expert orthogonality penalty of lora_A (0-d, float32); differentiable.
        Under FSDP2 every rank must call it (the sharded lora_A is gathered)."""
        return ops.ortho_penalty(full(self.lora_A), self.num_experts)

    def _update_factors(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.lora_A, self.lora_B, self._rank_scale()
