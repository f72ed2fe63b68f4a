"""What a user would run instead of SOSLinear, for bench/ comparisons in the same process."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def _reference_ortho_loss(A: torch.Tensor) -> torch.Tensor:
    """Mean squared cross-expert cosine of A [K, r, in], as the reference code computes it."""
    K, r, _ = A.shape
    flat = F.normalize(A.reshape(K * r, -1), dim=1, eps=1e-6)
    G = flat @ flat.T
    expert = torch.arange(K * r, device=A.device) // r
    G = G.masked_fill(expert[None] == expert[:, None], 0.0)
    return (G**2).sum() / max(1, K * (K - 1) * r * r)


class _ReferenceDualOrtho(torch.autograd.Function):
    """h = einsum(x, A); backward adds lam * d ortho_loss / dA to A's gradient (reference op)."""

    @staticmethod
    def forward(ctx, x, A, lam: float):
        ctx.save_for_backward(x, A)
        ctx.lam = lam
        return torch.einsum("ni,kri->nkr", x, A)

    @staticmethod
    def backward(ctx, grad_h):
        x, A = ctx.saved_tensors
        grad_A = torch.einsum("nkr,ni->kri", grad_h, x)
        grad_x = torch.einsum("nkr,kri->ni", grad_h, A)
        with torch.enable_grad():
            a = A.detach().requires_grad_(True)
            (ortho,) = torch.autograd.grad(_reference_ortho_loss(a), a)
        return grad_x, grad_A + ctx.lam * ortho, None


class ReferenceSOS(nn.Module):
    """The reference SOS-LoRA layer's math: experts as [K, r, in] / [K, out, r] tensors,
    per-expert einsums with an [N, K, out] intermediate, trainable [K, out] channel scales,
    mean-1 gate, the orthogonality gradient in the backward, and `.item()` reads of its
    schedule buffers in every forward."""

    def __init__(self, base: nn.Linear, num_experts: int, r_tot: int, alpha: float,
                 dropout: float, gamma_max: float = 2.5, ortho_lambda: float = 0.006):
        super().__init__()
        self.base = base
        K, r = num_experts, r_tot // num_experts
        self.K = K
        w = base.weight
        gamma = torch.linspace(1.0, gamma_max, K)
        gamma = gamma / gamma.mean()
        self.expert_scales = nn.Parameter(
            (gamma * alpha / r)[:, None].repeat(1, base.out_features).to(w.device, w.dtype))
        self.gate = nn.Parameter(torch.zeros(K, device=w.device, dtype=w.dtype))
        self.register_buffer("current_lambda", torch.tensor(ortho_lambda, device=w.device))
        self.register_buffer("temperature", torch.tensor(1.0, device=w.device))
        q, _ = torch.linalg.qr(torch.randn(base.in_features, K * r, device=w.device))
        self.A = nn.Parameter((q.T.reshape(K, r, -1) * math.sqrt(2)).to(w.dtype))
        self.B = nn.Parameter(
            torch.randn(K, base.out_features, r, device=w.device, dtype=w.dtype) * 0.01)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        y = self.base(x)
        lam = float(self.current_lambda.item())
        T = float(self.temperature.item())
        h = self.drop(_ReferenceDualOrtho.apply(x, self.A, lam))
        d = torch.einsum("nkr,kor->nko", h, self.B)
        g = (torch.softmax(self.gate.float() / T, 0) * self.K).to(d.dtype)
        return y + (d * (self.expert_scales * g[:, None])[None]).sum(1)


class PlainTorchSOS(nn.Module):
    """The same function in its best plain-PyTorch form: experts concatenated, fixed scales
    folded into a per-rank vector, F.linear + dropout on h (on x with dropout_position="pre",
    as PEFT places it) + addmm into the base output."""

    def __init__(self, base: nn.Linear, num_experts: int, r_tot: int, alpha: float,
                 dropout: float, gamma_max: float = 2.5, dropout_position: str = "post"):
        super().__init__()
        self.base = base
        r = r_tot // num_experts
        w = base.weight
        gamma = torch.linspace(1.0, gamma_max, num_experts)
        gamma = gamma / gamma.mean()
        scale = (gamma * alpha / r).repeat_interleave(r)
        self.register_buffer("scale", scale.to(w.device, w.dtype))
        q, _ = torch.linalg.qr(torch.randn(base.in_features, r_tot, device=w.device))
        self.A = nn.Parameter(q.T.contiguous().to(w.dtype))
        self.B = nn.Parameter(torch.randn(base.out_features, r_tot, device=w.device,
                                          dtype=w.dtype) * 0.01)
        self.p = dropout
        self.pre = dropout_position == "pre"

    def forward(self, x):
        y = self.base(x)
        drop = self.p > 0 and self.training
        h = F.linear(F.dropout(x, self.p, True) if drop and self.pre else x, self.A)
        if drop and not self.pre:
            h = F.dropout(h, self.p, True)
        return torch.addmm(y, h * self.scale, self.B.T)


def peft_lora(base: nn.Linear, r_tot: int, alpha: float, dropout: float) -> nn.Module | None:
    """PEFT's LoRA at the same total rank on a copy-free wrapper of `base`; None without peft."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        return None

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = base

        def forward(self, x):
            return self.proj(x)

    model = get_peft_model(Holder(), LoraConfig(r=r_tot, lora_alpha=alpha, lora_dropout=dropout,
                                                target_modules=["proj"]))
    return model.to(base.weight.dtype)
