"""Interference between adapters: the cosine similarity of their deltas per layer, its root
mean square over the layers both adapt, and each delta's norm and effective rank. All from
r x r products of the factors, never an [out, in] matrix:

    <B1 A1, B2 A2>_F = sum((B1^T B2) * (A1 A2^T))
"""
from __future__ import annotations

import itertools
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch

from ..formats.files import AdapterError

if TYPE_CHECKING:
    from .terms import Adapter, LowRankTerm

Tensor = torch.Tensor


def _inner(a: Sequence[LowRankTerm], b: Sequence[LowRankTerm]) -> float:
    """<sum_i s_i B_i A_i, sum_j s_j B_j A_j>_F from r x r products only (float64)."""
    total = 0.0
    for s, t in itertools.product(a, b):
        BtB = s.B.double().T @ t.B.double()      # [r_s, r_t]
        AAt = s.A.double() @ t.A.double().T      # [r_s, r_t]
        total += s.scale * t.scale * float((BtB * AAt).sum())
    return total


def check_same_base(a: Adapter, b: Adapter, layer: str) -> None:
    def weight(x):
        layout = x.layouts.get(layer)
        return layout.describe() if layout else f"{x.shape(layer)} weight"

    if (a.shape(layer) != b.shape(layer) or a.fan_in_fan_out != b.fan_in_fan_out
            or a.layouts.get(layer) != b.layouts.get(layer)):
        raise AdapterError(f"layer {layer!r}: adapter {a.name!r} is for a {weight(a)} and "
                           f"{b.name!r} for a {weight(b)}: not the same base model")


def cosine(a: Adapter, b: Adapter) -> dict[str, float]:
    """Per layer both adapt: <dW_a, dW_b>_F / (|dW_a|_F |dW_b|_F) (0 where a delta is zero)."""
    result = {}
    for layer in sorted(a.keys() & b.keys()):
        check_same_base(a, b, layer)
        norm = math.sqrt(max(_inner(a[layer], a[layer]), 0.0)
                         * max(_inner(b[layer], b[layer]), 0.0))
        result[layer] = _inner(a[layer], b[layer]) / norm if norm > 0 else 0.0
    return result


def rms_cosine(a: Adapter, b: Adapter) -> float:
    """Root mean square of the per-layer cosines over the layers both adapters touch."""
    values = list(cosine(a, b).values())
    if not values:
        raise AdapterError(f"adapters {a.name!r} and {b.name!r} adapt no layer in common")
    return math.sqrt(sum(v * v for v in values) / len(values))


def singular_values(adapter: Adapter, layer: str) -> Tensor:
    """Singular values of the layer's delta from QR of its factors: B = Q1 R1, A^T = Q2 R2,
    delta = Q1 (R1 R2^T) Q2^T, so they are those of the small matrix R1 R2^T."""
    A, B = adapter.factors(layer, torch.float64)
    _, R1 = torch.linalg.qr(B)
    _, R2 = torch.linalg.qr(A.T)
    return torch.linalg.svdvals(R1 @ R2.T)


def effective_rank(sv: Tensor) -> float:
    """exp(entropy of sigma / sum sigma) (Roy & Vetterli, 2007); 0 for a zero delta."""
    total = float(sv.sum())
    if total <= 0:
        return 0.0
    p = sv[sv > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def report(adapters: Sequence[Adapter]) -> dict:
    """Pairwise per-layer cosines and RMS cosine, each adapter's per-layer delta norm and
    effective rank: what `compose report --json` writes."""
    if len(adapters) < 1:
        raise AdapterError("report: give at least one adapter")
    names = [a.name for a in adapters]
    if len(set(names)) != len(names):
        raise AdapterError(f"report: adapter names must be distinct, got {names}")
    per_adapter = {}
    for a in adapters:
        layers = {}
        for layer in sorted(a):
            sv = singular_values(a, layer)
            layers[layer] = dict(norm=float(sv.norm()), effective_rank=effective_rank(sv),
                                 rank=a.rank(layer))
        per_adapter[a.name] = layers
    pairs, matrix = [], [[1.0 if i == j else None for j in names] for i in names]
    for (i, a), (j, b) in itertools.combinations(enumerate(adapters), 2):
        cos = cosine(a, b)
        rms = math.sqrt(sum(v * v for v in cos.values()) / len(cos)) if cos else None
        pairs.append(dict(a=a.name, b=b.name, rms_cosine=rms, layers_in_common=len(cos),
                          cosine=cos))
        matrix[i][j] = matrix[j][i] = rms
    return dict(adapters=names, rms_cosine_matrix=matrix, pairs=pairs, layers=per_adapter)


def format_report(rep: dict) -> str:
    """The report as a readable table."""
    lines = ["pairwise RMS cosine of the deltas (layers both adapt):"]
    width = max(max(len(n) for n in rep["adapters"]), 6) + 2  # a cell holds "0.1234"
    lines.append(" " * width + "".join(f"{n:>{width}}" for n in rep["adapters"]))
    for name, row in zip(rep["adapters"], rep["rms_cosine_matrix"]):
        cells = "".join(f"{'-' if v is None else f'{v:.4f}':>{width}}" for v in row)
        lines.append(f"{name:<{width}}{cells}")
    lines.append("")
    lines.append(f"{'adapter':<{width}} {'layers':>6} {'mean |dW|':>10} {'mean eff. rank':>15}")
    for name, layers in rep["layers"].items():
        n = len(layers)
        mean_norm = sum(v["norm"] for v in layers.values()) / max(n, 1)
        mean_rank = sum(v["effective_rank"] for v in layers.values()) / max(n, 1)
        lines.append(f"{name:<{width}} {n:>6} {mean_norm:>10.4g} {mean_rank:>15.2f}")
    return "\n".join(lines)


def require_matplotlib() -> None:
    """matplotlib is optional (only plot_report needs it): say how to get it."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError("plotting needs matplotlib, which is not installed: pip install "
                          "matplotlib (the package's 'plot' extra, soslora_ext[plot], "
                          "includes it)") from None


def plot_report(rep: dict, path: str | os.PathLike) -> Path:
    """A PNG heatmap of the pairwise RMS cosine."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = rep["adapters"]
    values = [[float("nan") if v is None else v for v in row] for row in rep["rms_cosine_matrix"]]
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2.5, 1.0 * len(names) + 2))
    image = ax.imshow(values, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            if not math.isnan(v):
                ax.text(j, i, f"{v:.3f}", ha="center", va="center",
                        color="white" if v < 0.5 else "black")
    fig.colorbar(image, ax=ax, label="RMS cosine of deltas")
    ax.set_title("Interference between adapters")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
