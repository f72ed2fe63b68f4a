"""Base kinds other than a linear layer: nn.Embedding, nn.Conv1d/2d/3d and
nn.MultiheadAttention. Each says how its weight looks as the [out, in] matrix an update lives
in, how the input is projected by the factor A, and how the update goes back into the
weight's own layout, so that SOS-LoRA's and CPS-LoRA's math (sos.py, cps.py) is written once.

Matrix views (PEFT's layouts):
  * Embedding [num_embeddings, dim]: the update is [dim, num_embeddings] (A [r, num_embeddings],
    B [dim, r]: PEFT's lora_embedding_A and lora_embedding_B), written into weight.t().
  * Conv weight [out, in, *k]: the update is weight.reshape(out, in * prod(k)); the input is
    projected by a convolution with A viewed [r, in, *k] (the base's stride, padding and
    dilation), then B acts per position as a 1x1 convolution.
  * MultiheadAttention: in_proj_weight [3E, E]; out_proj carries its own adapter over the
    Linear it is (made by the attention adapter). The attention is computed by the module's
    own forward with the adapted weights put in place of its parameters.

After the input is projected (h = x A^T by the kind's own op), the rest of the update runs
through ops.adapted_linear on h with A = the identity, which computes B, the scales, the gate
and their gradient terms as for a linear layer; A's own gradient terms (orthogonality, LoRA+)
are added by _ATerms. MultiheadAttention needs the dense update (its module computes with the
weight): ops.adapted_linear on the identity gives it, every gradient term included.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops

Tensor = torch.Tensor

_CONV = {nn.Conv1d: (1, F.conv1d), nn.Conv2d: (2, F.conv2d), nn.Conv3d: (3, F.conv3d)}


class _ATerms(torch.autograd.Function):
    """Identity on A; its backward adds ortho_lambda times the orthogonality penalty's
    gradient, then multiplies by grad_A_multiplier (LoRA+): what ops.adapted_linear does to A's
    gradient, for the kinds that project the input by A themselves."""

    @staticmethod
    def forward(ctx, A, ortho_lambda, num_experts, multiplier):
        ctx.save_for_backward(A, ortho_lambda)
        ctx.num_experts, ctx.multiplier = num_experts, multiplier
        return A.view_as(A)

    @staticmethod
    def backward(ctx, grad):
        A, ortho_lambda = ctx.saved_tensors
        grad = grad.contiguous().clone()
        if ortho_lambda is not None and ctx.num_experts > 1:
            ops.add_ortho_penalty_grad_(grad, A.detach(), ortho_lambda, ctx.num_experts)
        if ctx.multiplier != 1.0:
            grad = grad * ctx.multiplier
        return grad, None, None, None


def _split_step(A: Tensor, step: dict) -> tuple[Tensor, dict]:
    """A with its own gradient terms attached, and the step options left for the op."""
    step = dict(step)
    ortho = step.pop("ortho_lambda", None)
    multiplier = step.pop("grad_A_multiplier", 1.0)
    experts = step.get("num_experts", 1)
    if A.requires_grad and ((ortho is not None and experts > 1) or multiplier != 1.0):
        A = _ATerms.apply(A, ortho, experts, float(multiplier))
    return A, step


def _after_projection(h: Tensor, B: Tensor, scale: Tensor, dropout_p: float, step: dict,
                      base_out: Tensor | None = None) -> Tensor:
    """base_out + drop(h) (B*scale)^T for h [M, r] = x A^T, with the scales' gate and gradient
    terms (ops.adapted_linear with A the identity)."""
    eye = torch.eye(h.shape[1], dtype=h.dtype, device=h.device)
    return ops.adapted_linear(h, eye, B, scale, base_out=base_out, dropout_p=dropout_p,
                              dropout_on_input=False, **step)


def dense_update(in_features: int, A: Tensor, B: Tensor, scale: Tensor, dtype: torch.dtype,
                 step: dict) -> Tensor:
    """The update (B*scale) A [out, in] in `dtype`, differentiable with every gradient term of
    the step (ops.adapted_linear of the identity [in, in] gives its transpose)."""
    eye = torch.eye(in_features, dtype=dtype, device=A.device)
    return ops.adapted_linear(eye, A, B, scale, **step).t()


class Kind:
    """What a base kind looks like to an adapter. `attr`: the name of the base's parameter the
    update is merged into."""

    name = ""
    attr = "weight"

    def check(self, base: nn.Module, owner: str) -> None:
        pass

    def features(self, base: nn.Module) -> tuple[int, int]:
        """(in, out) of the matrix view."""
        raise NotImplementedError

    def weight(self, base: nn.Module) -> Tensor:
        return getattr(base, self.attr)

    def matrix(self, base: nn.Module) -> Tensor:
        """The weight as an [out, in] view: writing into it writes the weight."""
        raise NotImplementedError

    def layout(self, base: nn.Module, delta: Tensor) -> Tensor:
        """An [out, in] update laid out as the base weight."""
        return delta.reshape(self.weight(base).shape)

    def taps(self, base: nn.Module) -> int:
        """Columns of the matrix view per input channel (a convolution's kernel taps)."""
        return 1


class EmbeddingKind(Kind):
    name = "Embedding"

    def check(self, base, owner):
        if base.max_norm is not None:
            raise ValueError(f"{owner}: an nn.Embedding with max_norm={base.max_norm} cannot be "
                             "adapted: it renormalizes rows of its weight in place at every "
                             "lookup, which an update outside the weight cannot follow")
        if base.sparse:
            raise ValueError(f"{owner}: an nn.Embedding with sparse=True cannot be adapted "
                             "(its base weight is frozen; the adapter's gradients are dense)")

    def features(self, base):
        return base.num_embeddings, base.embedding_dim

    def matrix(self, base):
        return base.weight.t()

    def layout(self, base, delta):
        return delta.t().contiguous()

    def check_input(self, layer, x: Tensor, name: str) -> None:
        if not isinstance(x, Tensor) or x.dtype not in (torch.long, torch.int32):
            what = x.dtype if isinstance(x, Tensor) else type(x).__name__
            raise TypeError(f"{name}: input must be a tensor of token ids (int64 or int32), got "
                            f"{what}")

    def forward(self, layer, x, A, B, scale, dropout_p, on_input, step):
        # No dropout: the input is token ids (as PEFT's embedding adapter).
        base = layer.base_layer
        result = base(x)
        dtype = layer._compute_dtype(result, A)
        A, step = _split_step(A, step)
        # A's lookup as the base's (as PEFT's): no gradient to the padding column, and
        # gradients scaled by the inverse token frequency if the base does so.
        h = F.embedding(x.reshape(-1), A.t().to(dtype), padding_idx=base.padding_idx,
                        scale_grad_by_freq=base.scale_grad_by_freq)
        base2 = result.reshape(-1, result.shape[-1])
        if base2.dtype == dtype:
            return _after_projection(h, B, scale, 0.0, step, base2).reshape(result.shape)
        out = _after_projection(h, B, scale, 0.0, step)
        return result + out.reshape(result.shape).to(result.dtype)


class ConvKind(Kind):
    def __init__(self, cls):
        self.dims, self.conv = _CONV[cls]
        self.name = cls.__name__

    def check(self, base, owner):
        if base.groups != 1:
            raise ValueError(f"{owner}: a {self.name} with groups={base.groups} cannot be "
                             "adapted (only groups=1: the update of a grouped convolution is "
                             "block-diagonal, not one low-rank matrix)")
        if base.padding_mode != "zeros":
            raise ValueError(f"{owner}: a {self.name} with padding_mode="
                             f"{base.padding_mode!r} cannot be adapted (only 'zeros', as PEFT's "
                             "convolution adapters compute)")
        if getattr(base, "transposed", False):
            raise ValueError(f"{owner}: a transposed convolution cannot be adapted")

    def features(self, base):
        return base.in_channels * self.taps(base), base.out_channels

    def taps(self, base):
        return math.prod(base.kernel_size)

    def matrix(self, base):
        return base.weight.view(base.out_channels, -1)

    def check_input(self, layer, x: Tensor, name: str) -> None:
        base, d = layer.base_layer, self.dims
        if not isinstance(x, Tensor):
            raise TypeError(f"{name}: input x must be a tensor, got {type(x).__name__}")
        if x.dim() not in (d + 1, d + 2) or x.shape[-d - 1] != base.in_channels:
            raise ValueError(f"{name}: input x must be [batch, {base.in_channels}, "
                             f"{d} spatial dims] (or without batch) for this {self.name}, got "
                             f"shape {tuple(x.shape)}")

    def forward(self, layer, x, A, B, scale, dropout_p, on_input, step):
        base, d = layer.base_layer, self.dims
        result = base(x)
        unbatched = x.dim() == d + 1
        xb, rb = (x.unsqueeze(0), result.unsqueeze(0)) if unbatched else (x, result)
        dtype = layer._compute_dtype(xb, A)
        A, step = _split_step(A, step)
        if on_input and dropout_p:  # on the input image, as PEFT (not on the patches)
            xb = F.dropout(xb, dropout_p, training=True)
        kernel = A.to(dtype).reshape(A.shape[0], base.in_channels, *base.kernel_size)
        h = self.conv(xb.to(dtype), kernel, None, base.stride, base.padding, base.dilation)
        h2 = h.movedim(1, -1).reshape(-1, h.shape[1])
        out = _after_projection(h2, B, scale, 0.0 if on_input else dropout_p, step)
        out = out.reshape(*h.shape[:1], *h.shape[2:], -1).movedim(-1, 1)
        out = rb + out.to(rb.dtype)
        return out.squeeze(0) if unbatched else out


class AttentionKind(Kind):
    """nn.MultiheadAttention with one embedding dim for query, key and value (as PEFT): the
    adapter is on in_proj_weight [3E, E]; out_proj gets its own adapter over the Linear it is."""

    name = "MultiheadAttention"
    attr = "in_proj_weight"

    def check(self, base, owner):
        if not base._qkv_same_embed_dim:
            raise ValueError(f"{owner}: an nn.MultiheadAttention with kdim/vdim different from "
                             f"embed_dim ({base.kdim}, {base.vdim} vs {base.embed_dim}) cannot "
                             "be adapted (only the packed in_proj_weight, as PEFT)")
        if not isinstance(base.out_proj, nn.Linear) and not hasattr(base.out_proj, "lora_A"):
            raise TypeError(f"{owner}: out_proj must be an nn.Linear, got "
                            f"{type(base.out_proj).__name__}")

    def features(self, base):
        return base.embed_dim, 3 * base.embed_dim

    def matrix(self, base):
        return base.in_proj_weight

    def check_input(self, layer, x: Tensor, name: str) -> None:
        if not isinstance(x, Tensor) or x.dim() not in (2, 3) \
                or x.shape[-1] != layer.in_features:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{name}: query must be a [..., {layer.in_features}] tensor of "
                             f"2 or 3 dims, got {shape}")

    def forward(self, layer, x, args, kwargs, A, B, scale, step):
        # No dropout: the update is added to the weights the module computes with (as PEFT).
        base = layer.base_layer
        out_proj = base.out_proj
        dtype = layer._compute_dtype(x, A)
        weights = {}
        if not layer.merged:
            w_in = base.in_proj_weight
            weights["in_proj_weight"] = w_in + dense_update(
                layer.in_features, A, B, scale, dtype, step).to(w_in.dtype)
        w_out = out_proj.base_layer.weight
        if not out_proj.merged:
            o_A, o_B, o_scale, _, _, o_step = out_proj._forward_args()
            out_proj._mark_called()
            w_out = w_out + dense_update(out_proj.in_features, o_A, o_B, o_scale, dtype,
                                         o_step).to(w_out.dtype)
        weights["out_proj.base_layer.weight"] = w_out
        return torch.func.functional_call(base, weights, (x, *args), kwargs, strict=False)


_EMBEDDING, _ATTENTION = EmbeddingKind(), AttentionKind()
_CONVS = {cls: ConvKind(cls) for cls in _CONV}


def kind_of(module) -> Kind | None:
    """The Kind of an nn.Embedding, nn.Conv1d/2d/3d or nn.MultiheadAttention (exact classes or
    subclasses); None for anything else (a linear layer is handled by base.py)."""
    if isinstance(module, nn.Embedding):
        return _EMBEDDING
    if isinstance(module, nn.MultiheadAttention):
        return _ATTENTION
    for cls, kind in _CONVS.items():
        if isinstance(module, cls):
            return kind
    return None
