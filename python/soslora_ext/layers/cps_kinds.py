"""CPS-LoRA's cluster-local forward over a convolution or an embedding (kinds.py): each
cluster's update computed on its own columns and rows only, so the A-projection costs what a
rank-r LoRA's does, not the G-times-larger dense update's.

Convolution: the input is gathered once into partition channel order; cluster c convolves its
channels with A_c viewed [r_c, in_c, *kernel] (the base's stride, padding, dilation), applies
s_c B_c per position, and the clusters' outputs are added into the base output at their rows.
Embedding: each token looks up its own column of A (its position in partition order, so A is
never permuted), keeps it only in its own cluster's slots (a mask), and s_c B_c maps those
slots to the cluster's rows: T x r x out multiply-adds in all, a rank-r LoRA's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import kinds

Tensor = torch.Tensor


def _live_clusters(layer) -> list[tuple[int, int, int, int, int, int]]:
    """(c, r_c, row start, row end, column start, column end) of the clusters with rows and
    columns: one without either contributes nothing (its factors get a zero gradient)."""
    row_offsets, col_offsets = layer._offsets
    return [(c, r, row_offsets[c], row_offsets[c + 1], col_offsets[c], col_offsets[c + 1])
            for c, r in enumerate(layer.ranks)
            if row_offsets[c + 1] > row_offsets[c] and col_offsets[c + 1] > col_offsets[c]]


def _touch(out: Tensor, *factors: Tensor) -> Tensor:
    """out + 0 * (each factor's first entry): the factors get a (zero) gradient even when no
    cluster uses them, as the dense form gives."""
    for f in factors:
        out = out + 0 * f.reshape(-1)[:1].sum().to(out.dtype)
    return out


def _add_rows(result: Tensor, dim: int, layer, live, outs: list[Tensor]) -> Tensor:
    """result with each live cluster's output added at its rows (along `dim`)."""
    if not outs:
        return _touch(result, layer.lora_A, layer.lora_B)
    rows = torch.cat([layer.row_index[r0:r1] for _, _, r0, r1, _, _ in live])
    out = torch.cat(outs, dim).to(result.dtype)
    return result.index_add(dim, rows, out)


def conv_forward(layer, x: Tensor, dropout_p: float) -> Tensor:
    """base(x) + the clusters' updates for a convolution base (input dropout as PEFT's: one
    mask on the input image)."""
    base, kind = layer.base_layer, layer._kind
    result = base(x)
    unbatched = x.dim() == kind.dims + 1
    xb, rb = (x.unsqueeze(0), result.unsqueeze(0)) if unbatched else (x, result)
    A, B = layer.lora_A, layer.lora_B
    dtype = layer._compute_dtype(xb, A)
    if dropout_p:
        xb = F.dropout(xb, dropout_p, training=True)
    live = _live_clusters(layer)
    T, k = layer._taps, base.kernel_size
    # One gather into partition order, then each cluster's channels as a slice: the
    # gradient goes back as one cat and one scatter.
    col_offsets = layer._offsets[1]
    chunks = xb.to(dtype).index_select(1, layer.col_index).split(
        [b - a for a, b in zip(col_offsets, col_offsets[1:])], 1)
    scales = layer.cluster_scales
    outs = []
    for c, r, r0, r1, c0, c1 in live:
        xc = chunks[c]
        kernel = A[:r, c0 * T:c1 * T].to(dtype).reshape(r, c1 - c0, *k)
        h = kind.conv(xc, kernel, None, base.stride, base.padding, base.dilation)
        Bc = (B[r0:r1, :r] * scales[c]).to(dtype)
        outs.append(torch.matmul(Bc, h.flatten(2)).reshape(h.shape[0], r1 - r0, *h.shape[2:]))
    out = _add_rows(rb, 1, layer, live, outs)
    return out.squeeze(0) if unbatched else out


def embedding_forward(layer, x: Tensor) -> Tensor:
    """base(x) + the clusters' updates for an embedding base (no dropout: token ids)."""
    base = layer.base_layer
    result = base(x)
    A, B = layer.lora_A, layer.lora_B
    dtype = layer._compute_dtype(result, A)
    live = _live_clusters(layer)
    position = torch.empty_like(layer.col_index)  # of each token id in partition order
    position[layer.col_index] = torch.arange(len(position), device=position.device)
    ids = position[x.reshape(-1)]
    h = F.embedding(ids, A.t().to(dtype), scale_grad_by_freq=base.scale_grad_by_freq)
    # Padding tokens masked out (their column of A is zero): no gradient to that column, as
    # the base's lookup gives its row none; a mask, not padding_idx, which would need the
    # padding column's position on the host.
    pad = base.padding_idx
    real = None if pad is None else x.reshape(-1) != pad
    scales = layer.cluster_scales
    outs = []
    for c, r, r0, r1, c0, c1 in live:
        mine = (ids >= c0) & (ids < c1)
        mine = (mine if real is None else mine & real).to(dtype)[:, None]
        Bc = (B[r0:r1, :r] * scales[c]).to(dtype)
        outs.append((h[:, :r] * mine) @ Bc.t())
    out = _add_rows(result.reshape(-1, result.shape[-1]), 1, layer, live, outs)
    return out.reshape(result.shape)


def local_forward(layer, x: Tensor, dropout_p: float) -> Tensor:
    """The cluster-local forward of a CPSLinear over a convolution or an embedding."""
    if isinstance(layer._kind, kinds.EmbeddingKind):
        return embedding_forward(layer, x)
    return conv_forward(layer, x, dropout_p)
