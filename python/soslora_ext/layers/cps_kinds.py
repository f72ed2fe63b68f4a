"""CPS-LoRA's cluster-local forward over a convolution or an embedding (kinds.py): each
cluster's update computed on its own columns and rows only, so the A-projection costs what a
rank-r LoRA's does, not the G-times-larger dense update's.

Convolution: the input is gathered once into partition channel order; cluster c convolves its
channels with A_c viewed [r_c, in_c, *kernel] (the base's stride, padding, dilation), and
s_c B_c, placed at the cluster's output channels, maps the result into the base output.
Embedding: each token looks up its own column of A (its position in partition order, so A is
never permuted) and places it in its cluster's block of slots; B's rows, in the original
order, are placed likewise, so one product fused with the base output's add gives each token
its cluster's rows only.

There is no size rule for the previous dense form (all clusters as one rank-G r update in the
original order): on the CPU it was slower at every shape measured, down to bench_kinds.py's
--tiny layers.
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
    """out plus an empty sum of each factor: the factors get a (zero) gradient even when no
    cluster uses them, as the dense form gives."""
    for f in factors:
        out = out + f.reshape(-1)[:0].sum().to(out.dtype)
    return out


def _even(layer) -> bool:
    """Whether every cluster has rows, the same rank and the same (non-zero) number of
    columns: the grouped convolution's condition (the balanced initial partition when G
    divides the input channels)."""
    row_offsets, col_offsets = layer._offsets
    columns = {b - a for a, b in zip(col_offsets, col_offsets[1:])}
    return (len(set(layer.ranks)) == 1 and len(columns) == 1 and 0 not in columns
            and all(b > a for a, b in zip(row_offsets, row_offsets[1:])))


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
    if not live:
        out = _touch(rb, A, B)
        return out.squeeze(0) if unbatched else out
    T, k, G = layer._taps, base.kernel_size, layer.num_clusters
    # One gather into partition channel order (contiguous planes): each cluster's channels
    # are then a slice.
    xp = xb.to(dtype).index_select(1, layer.col_index)
    conv = dict(stride=base.stride, padding=base.padding, dilation=base.dilation)
    if _even(layer):  # all clusters as one grouped convolution, A's blocks as the groups
        r = layer.ranks[0]
        kernel = A[:r].to(dtype).reshape(r, G, -1).transpose(0, 1).reshape(
            G * r, xp.shape[1] // G, *k)
        h = kind.conv(xp, kernel, None, groups=G, **conv)
    else:
        col_offsets = layer._offsets[1]
        chunks = xp.split([b - a for a, b in zip(col_offsets, col_offsets[1:])], 1)
        h = torch.cat([kind.conv(chunks[c], A[:r, c0 * T:c1 * T].to(dtype).reshape(
            r, c1 - c0, *k), None, **conv) for c, r, _, _, c0, c1 in live], 1)
    # h [N, live ranks, *spatial] times B's blocks placed at their rows in the original order:
    # one product fused with the add into the base output, no scatter of the output. Its
    # inner size is the live ranks' sum (G r, not r), small next to A's convolution; measured
    # faster than G products of r and a scatter of their outputs into the base's channels.
    row_offsets = layer._offsets[0]
    alive = {c for c, *_ in live}
    blocks = [B[row_offsets[c]:row_offsets[c + 1], :r if c in alive else 0]
              * layer.cluster_scales[c] for c, r in enumerate(layer.ranks)]
    Bb = torch.block_diag(*blocks).index_select(0, torch.argsort(layer.row_index)).to(dtype)
    Bb, h2 = Bb.expand(h.shape[0], -1, -1), h.flatten(2)
    if rb.dtype == dtype:
        out = torch.baddbmm(rb.flatten(2), Bb, h2).view(rb.shape)
    else:
        out = rb + torch.bmm(Bb, h2).view(rb.shape).to(rb.dtype)
    return out.squeeze(0) if unbatched else out


def _labels(index: Tensor, offsets: Tensor) -> Tensor:
    """Each item's cluster, in the original order, from a partition's index and offsets."""
    where = torch.arange(len(index), device=index.device)  # positions in partition order
    labels = torch.empty_like(index)
    labels[index] = torch.searchsorted(offsets[1:], where, right=True)
    return labels


def embedding_forward(layer, x: Tensor) -> Tensor:
    """base(x) + the clusters' updates for an embedding base (no dropout: token ids).

    Token t's update is nonzero only on its cluster's rows: one product of the tokens' A
    columns and B's rows, each placed in its cluster's block of slots, gives exactly that.
    Its inner size is G r (G times a rank-r LoRA's multiply-adds), but it writes the [T, out]
    output once, fused with the base's (faster on the CPU, measured, than a rank-r product
    masked to each token's rows, whose mask costs passes over [T, out]); and no gather of
    each cluster's tokens, whose counts would need the host (and break a compiled graph)."""
    base = layer.base_layer
    result = base(x)
    A, B = layer.lora_A, layer.lora_B
    dtype = layer._compute_dtype(result, A)
    position = torch.empty_like(layer.col_index)  # of each token id in partition order
    position[layer.col_index] = torch.arange(len(position), device=position.device)
    flat = x.reshape(-1)
    ids = position[flat]
    token_cluster = torch.searchsorted(layer.col_offsets[1:], ids, right=True)
    if base.padding_idx is not None:
        # Padding tokens get no update and give the padding column (zero) no gradient, as
        # the base's lookup; a mask, not padding_idx, which would need its position on the host.
        token_cluster = token_cluster.masked_fill(flat == base.padding_idx, -1)
    h = F.embedding(ids, A.t().to(dtype), scale_grad_by_freq=base.scale_grad_by_freq)
    ranks = layer.ranks
    if len(set(ranks)) > 1:  # a token uses only its cluster's first r_c slots
        r_of = torch.tensor(ranks, device=h.device)[token_cluster.clamp(min=0)]
        h = h * (torch.arange(h.shape[1], device=h.device) < r_of[:, None]).to(dtype)
    row_cluster = _labels(layer.row_index, layer.row_offsets)
    B_rows = B.index_select(0, torch.argsort(layer.row_index))  # original row order
    Bs = (B_rows * layer.cluster_scales[row_cluster][:, None]).to(dtype)
    # Each token's h in its cluster's slot block of [G, r_max], each row's B likewise: their
    # product is the update, fused with the add into the base output.
    clusters = torch.arange(layer.num_clusters, device=h.device)
    H = _in_block(h, token_cluster == clusters[:, None])
    Bb = _in_block(Bs, row_cluster == clusters[:, None])
    base2 = result.reshape(-1, result.shape[-1])
    if base2.dtype == dtype:
        return torch.addmm(base2, H, Bb.t()).reshape(result.shape)
    return result + (H @ Bb.t()).reshape(result.shape).to(result.dtype)


def _in_block(rows: Tensor, member: Tensor) -> Tensor:
    """[n, G * k]: each row of `rows` [n, k] in the block of its cluster (member [G, n]: row i
    is in cluster c), zeros elsewhere."""
    return (member.t().to(rows.dtype)[:, :, None] * rows[:, None, :]).flatten(1)


def local_forward(layer, x: Tensor, dropout_p: float) -> Tensor:
    """The cluster-local forward of a CPSLinear over a convolution or an embedding."""
    if isinstance(layer._kind, kinds.EmbeddingKind):
        return embedding_forward(layer, x)
    return conv_forward(layer, x, dropout_p)
