"""SOSLinear: an nn.Linear wrapped with an SOS-LoRA adapter (K static, always-on experts)."""
from __future__ import annotations

import torch
import torch.nn as nn

from .. import ops
from ..ops import reference
from .base import AdapterLinear, base_dtype, base_weight
from .config import SOSConfig, with_fields
from .distributed import full

Tensor = torch.Tensor


class SOSLinear(AdapterLinear):
    """y = base(x) + sum_k s_k * (B_k A_k drop(x)): K static low-rank experts on a frozen Linear.

    The experts are stored concatenated: ``lora_A`` [r_tot, in] and ``lora_B`` [out, r_tot];
    ``expert_ranges[k]`` is expert k's slice of rows of A / columns of B. Scales are fixed
    (``scale_mode="fixed"``, one per expert) or trainable per expert and output channel
    (``"channel"``, [K, out]), optionally times a mean-1 gate K*softmax(logits / T).

    Args:
        base: the nn.Linear (or transformers Conv1D, weight [in, out], or bitsandbytes 4-bit or
            8-bit Linear: quantized.py) to adapt; wrapped, not copied; its parameters are
            frozen. A quantized base's "dtype" below is its compute dtype.
        config: an SOSConfig (default ``SOSConfig()``); a preset is
            ``SOSLinear.from_config(base, SOSConfig.preset("official"))``.
        **fields: SOSConfig fields that replace the config's (``SOSLinear(base, rank=16)``);
            each is documented on SOSConfig and in docs/methods.md.
        dtype: dtype of the adapter factors; by default (factor_dtype="peft") float32 for
            fp16/bf16 bases (as PEFT), else the base weight's dtype; factor_dtype="base"
            (the official preset): always the base weight's dtype. Scales and gate are float32
            (float64 with float64 factors), also on a bf16 base where the authors' code casts
            them to bf16: a deliberate difference (a bf16 scale near 16 moves in steps of
            1/8, far coarser than an optimizer update at lr 2e-5 without float32 master
            weights).

    Inputs ``x: [..., in]`` of float32/bf16/fp16 (float64 on CPU). The adapter computes in the
    autocast dtype when autocast is on, else in the adapter dtype; the output has the base
    layer's output dtype.

    Gradient terms without a loss of their own, as in the authors' recipe:
      * orthogonality: in training mode the backward adds ``ortho_lambda`` times the gradient
        of ``ortho_penalty()`` to lora_A's gradient (``ortho_lambda`` is a device buffer, 0
        until an OrthoSchedule sets it); not in eval() mode.
      * LoRA+: lora_A's gradient (orthogonality term included) is divided by
        ``loraplus_ratio`` whenever grad is enabled, in training and in eval() mode (a
        backbone kept in eval() while its adapters train). Any positive ratio applies, also
        one <= 1, which the authors' code ignores.
      * uniform prior: ``uniform_prior * (p - 1/K) / T`` is added to the gate logits'
        gradient at every call of the layer, as the authors' gate function does.
      * scale anchor: ``scale_anchor * (s - s_fixed)`` is added to the channel scales'
        gradient by the layer's backward (inside its op), also once per call: for a layer
        called once per forward (every transformers model) that equals the authors'
        once-per-backward parameter hook; a layer called twice in one forward gets the pull
        twice. The in-graph form is kept because it survives FSDP2's parameter replacement,
        torch.compile and activation checkpointing, where a parameter hook is lost or breaks
        the graph.
    """

    def __init__(self, base: nn.Module, config: SOSConfig | None = None, *,
                 dtype: torch.dtype | None = None, **fields):
        config = with_fields("SOSLinear", SOSConfig, config, fields)
        super().__init__(base, dtype)
        if dtype is None and config.factor_dtype == "base":
            self.adapter_dtype = base_dtype(base)  # as the authors' layer.bfloat16()
        self.config = config
        weight, dtype = base_weight(base), self.adapter_dtype

        K, r = config.num_experts, config.r_expert
        factory = dict(device=weight.device, dtype=dtype)
        scale_factory = dict(device=weight.device, dtype=ops.accumulate_dtype(dtype))
        A = torch.cat(reference.orthogonal_init(K, r, self.in_features, config.init_gain), dim=0)
        self.lora_A = nn.Parameter(A.to(**factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, config.r_total, **factory))
        self.register_buffer("fixed_scales", torch.tensor(config.fixed_scales(), **scale_factory))
        self.register_buffer("ortho_lambda", torch.zeros((), **scale_factory))
        if config.scale_mode == "channel":
            self.expert_scales = nn.Parameter(
                self.fixed_scales[:, None].repeat(1, self.out_features))
        if config.gate:
            logits = torch.randn(K, dtype=torch.float32) * 0.05
            self.gate_logits = nn.Parameter((logits - logits.mean()).to(**scale_factory))
            self.register_buffer("gate_temperature",
                                 torch.full((), config.gate_temperature, **scale_factory))
        self._init_kind(config, dtype)

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
    def _expert_scale_tensor(self) -> Tensor:
        """[K] (fixed) or [K, out] (channel) effective scales, gate folded in (the forward
        computes the same inside its op, with the recipe's gradient terms)."""
        scales = self.expert_scales if self.config.scale_mode == "channel" else self.fixed_scales
        if self.config.gate:
            g = reference.gate(self.gate_logits, self.gate_temperature)
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
    def _scale_args(self) -> dict:
        """The scales as the op takes them, with the gate and the recipe's gradient terms: the
        op gates them and adds the anchor and prior terms in its backward."""
        c = self.config
        channel = c.scale_mode == "channel"
        args = dict(scale=self.expert_scales if channel else self.fixed_scales)
        if c.gate:
            args.update(gate_logits=self.gate_logits, gate_temperature=self.gate_temperature,
                        uniform_prior=c.uniform_prior)
        if channel and c.scale_anchor > 0:
            args.update(anchor_scales=self.fixed_scales, scale_anchor=c.scale_anchor)
        return args

    def _forward_args(self) -> tuple[Tensor, Tensor, Tensor, float, bool, dict]:
        """(A, B, scale, dropout_p, dropout_on_input, step options) of the op."""
        c, training = self.config, self.training
        # The orthogonality term in training mode; LoRA+ whenever a gradient flows.
        ortho = training and c.num_experts > 1
        step = self._scale_args()
        scale = step.pop("scale")
        step.update(ortho_lambda=self.ortho_lambda if ortho else None,
                    num_experts=c.num_experts, grad_A_multiplier=1.0 / c.loraplus_ratio)
        return (self.lora_A, self.lora_B, scale, c.dropout if training else 0.0,
                c.dropout_position == "pre", step)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        """x [..., in] for a linear base; token ids for an embedding; [batch, in, *spatial]
        for a convolution; (query, key, value, ...) as the module takes them for an attention
        module (kinds.py)."""
        if self._begin_forward(x, args, kwargs):
            return self.base_layer(x, *args, **kwargs)
        A, B, scale, dropout_p, on_input, step = self._forward_args()
        if self._kind is not None:
            return self._kind_forward(x, args, kwargs, A, B, scale, dropout_p, on_input, step)
        return self._adapted_forward(x, A, B, scale, dropout_p, on_input, **step)

    # ---- penalty, delta, merge ---------------------------------------------------------------
    def ortho_penalty(self) -> Tensor:
        """Cross-expert orthogonality penalty of lora_A (0-d, float32); differentiable.
        Under FSDP2 every rank must call it (the sharded lora_A is gathered)."""
        return ops.ortho_penalty(full(self.lora_A), self.num_experts)

    def _update_factors(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.lora_A, self.lora_B, self._rank_scale()
