"""CPS-LoRA: low-rank updates local to clusters of rows and columns, with a learned partition.

A CPSLinear splits the output rows into G clusters R_c and the input columns into G clusters
C_c; cluster c's update is a low-rank term on its block only, dW[R_c, C_c] = s_c B_c A_c. The
factors are stored in partition order (``lora_A`` [r_max, in]: cluster c owns the columns
``col_offsets[c]:col_offsets[c+1]``; ``lora_B`` [out, r_max] likewise for rows), so every
cluster is a contiguous block and a repartition keeps the parameter shapes. With one rank r
for all clusters a CPS adapter has exactly the parameters of a LoRA of rank r, r (in + out),
while its update can have rank G r: that is the method's parameter efficiency when the update
really is block-structured.

The partition criterion (what the rows and columns are clustered on) is in partition.py.

Re-fit. Each new block gets the best rank-r_c approximation of the current update restricted
to it (a truncated SVD computed from the factors), split evenly between A and B; rank slots
the update does not fill get fresh random A rows and zero B columns, so they keep learning.
``repartition()`` returns ||dW_new - dW_old||_F / ||dW_old||_F.

Schedule. The first repartition comes after the first ``statistics_steps`` optimizer steps
(default a quarter of ``repartition_every``), while the update is still small, so the gradients
show the structure the task wants rather than the initial partition's; then one every
``repartition_every`` steps, each after a window of ``statistics_steps`` steps of statistics.
The default ``repartition_every=0`` never repartitions: the partition stays at its
initialization. ``RepartitionSchedule``
(plain loops) and ``CPSLoRACallback`` (transformers.Trainer) drive it and reset the optimizer
state of the layers whose factors were re-fitted.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from .. import ops
from . import cps_kinds, kinds
from .base import AdapterLinear, base_weight, check_base, partition_shape
from .config import CPSConfig, with_fields
from .partition import (
    GradientSketch,
    block_factors,
    captured_energy,
    factored_norm,
    find_partition,
    index_to_labels,
    initial_labels,
    labels_to_index,
)

Tensor = torch.Tensor

# Up to this total rank the forward computes the clusters as one dense low-rank update (the
# blocks placed in [R, in] and [out, R] factors, zeros elsewhere) through SOSLinear's products:
# G times the FLOPs of the cluster op's products, but no gather or scatter of the
# [N, in] and [N, out] activations. On a 2-core AVX-512 CPU (fp32, N=2048, G=4) that is
# faster at R=64 for every shape measured and about even at R=256 (bench/bench_layer.py).
DENSE_MAX_RANK = 128

# A new partition must capture this many times the current one's share of the signal: late in
# training the statistics are mostly minibatch noise, which any partition captures about as
# well, and a reshuffle then costs the update more than it gains.
ADOPTION_MARGIN = 1.25


class _RecordGradient(torch.autograd.Function):
    """Identity on the layer output; its backward adds (x [N, in], grad_out [N, out]) to a
    GradientSketch."""

    @staticmethod
    def forward(ctx, out, x, sketch):
        ctx.save_for_backward(x)
        ctx.sketch = sketch
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        ctx.sketch.add(x, grad.reshape(-1, grad.shape[-1]))
        return grad, None, None


class NoSignalError(RuntimeError):
    """A repartition found nothing to cluster: no gradient reached the layer and its update is
    zero (e.g. a layer that the loss does not use)."""


# ---- the layer -------------------------------------------------------------------------------
class CPSLinear(AdapterLinear):
    """y = base(x) + drop(x) dW^T with dW[R_c, C_c] = s_c B_c A_c on G clusters of rows and
    columns (the module docstring gives the schedule, partition.py the partition criterion).

    Args:
        base: the nn.Linear (or Conv1D, or bitsandbytes 4-bit or 8-bit Linear) to adapt;
            wrapped, not copied; its parameters are frozen.
        config: a CPSConfig (default ``CPSConfig()``), also as
            ``CPSLinear.from_config(base, config)``.
        **fields: CPSConfig fields that replace the config's (``CPSLinear(base, rank=4)``):
            num_clusters (G, at most min(in_features, out_features)), rank or
            rank_per_cluster, alpha and use_rslora (cluster c's scale is alpha / r_c, or
            alpha / sqrt(r_c)), dropout (on the input, as PEFT), init_partition
            ("contiguous": balanced blocks in index order, e.g. attention heads; or "random"),
            repartition_every, statistics_steps and sketch_rank (the schedule, 0: never, and
            its gradient statistics); each is documented on CPSConfig.
        dtype: the factors' dtype; default float32 for fp16/bf16 bases, else the base's (a
            quantized base's compute dtype).

    A cluster whose block is smaller than its rank (possible after a repartition) uses only
    the rank the block allows; a cluster left without rows or columns contributes nothing
    until a later repartition gives it some.

    The forward is one autograd node (ops.adapted_linear): the clusters as one dense low-rank
    update, as SOSLinear's, while the total rank is at most DENSE_MAX_RANK, and as blocks of
    the activations (the cluster op) above it; both give the same function. Over a
    convolution or an embedding each cluster is computed on its own channels (tokens) and rows
    (cps_kinds.py); over an attention module, as one dense update of its weight.
    """

    def __init__(self, base: nn.Module, config: CPSConfig | None = None, *,
                 dtype: torch.dtype | None = None, **fields):
        config = with_fields("CPSLinear", CPSConfig, config, fields)
        check_base(base, "CPSLinear")  # before the shape checks, which read its features
        rows, columns, taps = partition_shape(base)
        check_fits(config, rows, columns, taps=taps)
        kind = kinds.kind_of(base)
        if kind is not None and config.repartition_every:
            # The schedule's statistics are of a linear layer's input and output gradient.
            raise ValueError(f"CPSLinear: repartition_every={config.repartition_every} is "
                             f"supported on linear layers only, not on a {kind.name}; keep "
                             "repartition_every=0 there (the partition stays as initialized)")
        super().__init__(base, dtype)
        self.config = config
        # A convolution's columns are clustered by input channel, its kernel taps kept whole:
        # column j of the matrix view is channel j // taps, tap j % taps.
        self._columns, self._taps = columns, taps
        device = base_weight(base).device
        seed = int(torch.randint(0, 2**62, ()))
        g = torch.Generator().manual_seed(seed)
        rows = initial_labels(self.out_features, config.num_clusters, config.init_partition, g)
        cols = initial_labels(self._columns, config.num_clusters, config.init_partition, g)
        row_index, row_offsets = labels_to_index(rows, config.num_clusters)
        col_index, col_offsets = labels_to_index(cols, config.num_clusters)
        self.register_buffer("row_index", row_index.to(device))
        self.register_buffer("col_index", col_index.to(device))
        self.register_buffer("row_offsets", torch.tensor(row_offsets, device=device))
        self.register_buffer("col_offsets", torch.tensor(col_offsets, device=device))
        self.register_buffer("cluster_scales", torch.tensor(
            config.cluster_scales(), dtype=ops.accumulate_dtype(self.adapter_dtype),
            device=device))
        # Seeds the statistics' test matrices and re-fit initializations: the same on all ranks.
        self.register_buffer("partition_seed", torch.tensor(seed, device=device))
        self.register_buffer("repartition_count", torch.zeros((), dtype=torch.long,
                                                              device=device))
        factory = dict(device=device, dtype=self.adapter_dtype)
        self.lora_A = nn.Parameter(torch.zeros(config.r_max, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, config.r_max, **factory))
        self._offsets = (row_offsets, col_offsets)  # host copies: the op takes them as ints
        if device.type != "meta":
            with torch.no_grad():
                self.lora_A.copy_(self._random_A(g))
        self._init_kind(config, dtype)
        self._sketch: GradientSketch | None = None
        self._collecting = False
        self.last_repartition: dict | None = None
        self.register_load_state_dict_post_hook(lambda module, _: module._sync_offsets())

    # ---- structure ---------------------------------------------------------------------------
    @property
    def num_clusters(self) -> int:
        return self.config.num_clusters

    @property
    def ranks(self) -> list[int]:
        return self.config.ranks

    def _random_A(self, generator: torch.Generator) -> Tensor:
        """PEFT's LoRA init per cluster block (uniform, bound 1/sqrt(fan_in)); unused slots 0."""
        A = torch.zeros(self.config.r_max, self.in_features, dtype=torch.float64)
        _, col_offsets = self._offsets
        T = self._taps
        for c, r in enumerate(self.ranks):
            width = (col_offsets[c + 1] - col_offsets[c]) * T
            if width:
                bound = 1 / math.sqrt(width)
                A[:r, col_offsets[c] * T:col_offsets[c + 1] * T] = (
                    torch.rand(r, width, generator=generator, dtype=torch.float64) * 2 - 1) * bound
        return A

    def _sync_offsets(self) -> None:
        """Refresh the host copies of the offsets (after load_state_dict) and check them."""
        if self.row_offsets.device.type == "meta":
            return
        row_offsets, col_offsets = self.row_offsets.tolist(), self.col_offsets.tolist()
        check_partition(self.row_index, row_offsets, self.out_features, "rows")
        check_partition(self.col_index, col_offsets, self._columns, "columns")
        self._offsets = (row_offsets, col_offsets)

    def partition(self) -> tuple[Tensor, Tensor]:
        """(row_labels [out], col_labels [in]): each output row's and input column's cluster."""
        row_offsets, col_offsets = self._offsets
        return (index_to_labels(self.row_index.cpu(), row_offsets),
                index_to_labels(self.col_index.cpu(), col_offsets))

    def describe(self) -> str:
        """One line: clusters, their ranks and block sizes."""
        row_offsets, col_offsets = self._offsets
        blocks = [f"{row_offsets[c + 1] - row_offsets[c]}x{col_offsets[c + 1] - col_offsets[c]}"
                  for c in range(self.num_clusters)]
        return f"CPS G={self.num_clusters} ranks={self.ranks} blocks={blocks}"

    def extra_repr(self) -> str:
        c = self.config
        return (f"in={self.in_features}, out={self.out_features}, clusters={c.num_clusters}, "
                f"ranks={c.ranks}, repartition_every={c.repartition_every}, "
                f"dropout={c.dropout}, merged={self.merged}")

    # ---- forward -----------------------------------------------------------------------------
    def _forward_args(self) -> tuple[Tensor, Tensor, Tensor, float, bool, dict]:
        """(A, B, scale, dropout_p, dropout_on_input, step options) of the op."""
        row_offsets, col_offsets = self._offsets
        step = dict(blocks=(self.row_index, self.col_index, row_offsets, col_offsets,
                            self.ranks), dense_blocks=sum(self.ranks) <= DENSE_MAX_RANK)
        return (self.lora_A, self.lora_B, self.cluster_scales,
                self.config.dropout if self.training else 0.0, True, step)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        """x as for SOSLinear.forward (a linear base, or another kind: kinds.py)."""
        if self._begin_forward(x, args, kwargs):
            return self.base_layer(x, *args, **kwargs)
        if self._kind is not None:
            dropout_p = self.config.dropout if self.training else 0.0
            if isinstance(self._kind, kinds.AttentionKind):
                # Its module computes with the weight: the clusters as one dense update.
                A, B, scale = self._update_factors()
                return self._kind_forward(x, args, kwargs, A, B, scale, dropout_p, True, {})
            return cps_kinds.local_forward(self, x, dropout_p)
        out = self._adapted_forward(x, *self._forward_args()[:5], **self._forward_args()[5])
        if self._collecting and self.training and torch.is_grad_enabled():
            x2 = x.reshape(-1, self.in_features)
            out = _RecordGradient.apply(out, x2, self._sketch)
        return out

    # ---- the update as factors ---------------------------------------------------------------
    def _update_factors(self) -> tuple[Tensor, Tensor, Tensor]:
        """The clusters' blocks as one low-rank update in the layer's original row and column
        order, differentiable in the factors: A [R, in] (cluster c's ranks[c] rows nonzero only
        on its columns), B [out, R] and the per-rank scale [R], R = sum of ranks."""
        row_offsets, col_offsets = self._offsets
        ranks = self.ranks
        # Block-diagonal in partition order, then each column (row) written at its index:
        # index_copy, whose backward is a gather (index_select's is a slow scatter on the CPU).
        T = self._taps
        A = torch.block_diag(*(self.lora_A[:r, col_offsets[c] * T:col_offsets[c + 1] * T]
                               for c, r in enumerate(ranks)))
        B = torch.block_diag(*(self.lora_B[row_offsets[c]:row_offsets[c + 1], :r]
                               for c, r in enumerate(ranks)))
        columns = self.col_index  # the layer's column (channel) at each partition position
        if T > 1:
            columns = (columns[:, None] * T + torch.arange(T, device=columns.device)).reshape(-1)
        A = torch.zeros_like(A).index_copy(1, columns, A)
        B = torch.zeros_like(B).index_copy(0, self.row_index, B)
        scale = torch.cat([s.expand(r) for s, r in zip(self.cluster_scales, ranks)])
        return A, B, scale

    def _signal_factors(self) -> tuple[Tensor, Tensor]:
        """(P, Q) with the current update dW = P Q, float64 on the CPU (where the partition
        math runs)."""
        A, B, scale = (t.detach().double().cpu() for t in self._update_factors())
        return B * scale, A

    # ---- repartition -------------------------------------------------------------------------
    def collect_statistics(self, on: bool = True) -> None:
        """Start (or pause) adding the full weight's gradients to the statistics that the next
        repartition() clusters; they are kept until that repartition. Linear bases only (the
        statistics are of a linear layer's input and output gradient)."""
        if on and self._kind is not None:
            raise RuntimeError(f"CPSLinear.collect_statistics: gradient statistics are kept for "
                               f"linear bases only, not a {self._kind.name}; repartition() on "
                               "the current update (signal='delta') instead")
        if on and self._sketch is None:
            seed = int(self.partition_seed) + int(self.repartition_count)
            self._sketch = GradientSketch(self.out_features, self.in_features,
                                          self.config.resolved_sketch_rank(), seed,
                                          self.lora_A.device)
        self._collecting = on

    @torch.no_grad()
    def repartition(self, signal: str = "auto", force: bool = False) -> float:
        """Regroup rows and columns (criterion in the module docstring), re-fit the factors and
        return the relative change of the update ||dW_new - dW_old|| / ||dW_old|| (0.0 when
        the partition is kept or the update was zero).

        signal: "gradient" (the collected statistics), "delta" (the current update) or "auto"
        (statistics if any were collected, else the update). force: adopt the new partition
        even if it captures less of the signal. In a distributed run every rank calls it at
        the same step (the statistics are summed over ranks)."""
        if self.merged:
            raise RuntimeError("CPSLinear.repartition: the adapter is merged; unmerge() first")
        from torch.distributed.tensor import DTensor
        if isinstance(self.lora_A, DTensor):
            raise RuntimeError("CPSLinear.repartition: the factors are sharded (FSDP2); "
                               "repartitioning sharded layers is not supported: use DDP, or "
                               "keep repartition_every=0 under FSDP2")
        if self._taps > 1:
            raise RuntimeError(f"CPSLinear.repartition: not supported on a {self._kind.name} "
                               "(its columns are input channels with their kernel taps); keep "
                               "repartition_every=0 there")
        if signal not in ("auto", "gradient", "delta"):
            raise ValueError(f"CPSLinear.repartition: signal must be 'auto', 'gradient' or "
                             f"'delta', got {signal!r}")
        has_statistics = self._sketch is not None and self._sketch.updates > 0
        if signal == "gradient" and not has_statistics:
            raise RuntimeError("CPSLinear.repartition: no gradient statistics were collected; "
                               "call collect_statistics() before some training steps")
        update = self._signal_factors()
        if signal == "gradient" or (signal == "auto" and has_statistics):
            P, Q = (t.cpu() for t in self._sketch.factors())
        else:
            P, Q = update
        if factored_norm(P, Q) == 0:
            self._sketch, self._collecting = None, False
            raise NoSignalError("CPSLinear.repartition: the signal is zero (no statistics and "
                                "a zero update): nothing to cluster yet")
        g = torch.Generator().manual_seed(int(self.partition_seed) + int(self.repartition_count))
        rows, cols = find_partition(P, Q, self.num_clusters, g)
        old_rows, old_cols = self.partition()
        before = captured_energy(P, Q, old_rows, old_cols, self.ranks)
        after = captured_energy(P, Q, rows, cols, self.ranks)
        # The share of ||dW||^2 a re-fit would discard: what the new blocks cannot hold.
        discarded = (0.0 if factored_norm(*update) == 0 else
                     max(0.0, 1.0 - captured_energy(*update, rows, cols, self.ranks)))
        adopt = force or (after > before * ADOPTION_MARGIN and after - before > discarded)
        change = self._refit(rows, cols, g, update) if adopt else 0.0
        self.repartition_count += 1
        self._sketch, self._collecting = None, False
        self.last_repartition = dict(adopted=adopt, captured_before=before,
                                     captured_after=after, update_discarded=discarded,
                                     delta_change=change)
        return change

    @torch.no_grad()
    def _refit(self, row_labels: Tensor, col_labels: Tensor, generator: torch.Generator,
               update: tuple[Tensor, Tensor] | None = None) -> float:
        """Move to the given partition, re-fitting each block to the current update (its
        factors `update`, when the caller has them already)."""
        P_old, Q_old = update or self._signal_factors()
        G, ranks = self.num_clusters, self.ranks
        row_index, row_offsets = labels_to_index(row_labels.cpu(), G)
        col_index, col_offsets = labels_to_index(col_labels.cpu(), G)
        scales = self.cluster_scales.double().cpu()
        self._offsets = (row_offsets, col_offsets)
        A = self._random_A(generator)
        B = torch.zeros(self.out_features, self.config.r_max, dtype=torch.float64)
        for c, r in enumerate(ranks):
            rows = row_index[row_offsets[c]:row_offsets[c + 1]]
            cols = col_index[col_offsets[c]:col_offsets[c + 1]]
            if not (len(rows) and len(cols)):
                continue
            U, sigma, Vh = block_factors(P_old[rows], Q_old[:, cols])
            keep = int((sigma[:r] > 1e-12 * max(float(sigma[0]), 1e-300)).sum())
            root = (sigma[:keep] / scales[c]).sqrt()  # s_c B A = U sigma Vh, A and B balanced
            A[:keep, col_offsets[c]:col_offsets[c + 1]] = root[:, None] * Vh[:keep]
            B[row_offsets[c]:row_offsets[c + 1], :keep] = U[:, :keep] * root
        device = self.lora_A.device
        self.lora_A.copy_(A)
        self.lora_B.copy_(B)
        self.row_index.copy_(row_index.to(device))
        self.col_index.copy_(col_index.to(device))
        self.row_offsets.copy_(torch.tensor(row_offsets))
        self.col_offsets.copy_(torch.tensor(col_offsets))
        self._zero_padding()
        P_new, Q_new = self._signal_factors()
        old_norm = factored_norm(P_old, Q_old)
        if old_norm == 0:
            return 0.0
        return factored_norm(torch.cat([P_new, -P_old], 1), torch.cat([Q_new, Q_old])) / old_norm


def check_partition(index: Tensor, offsets: list[int], size: int, what: str) -> None:
    """A partition of `size` items: `index` a permutation, `offsets` non-decreasing 0..size."""
    if (index.shape != (size,) or offsets[0] != 0 or offsets[-1] != size
            or any(a > b for a, b in zip(offsets, offsets[1:]))
            or not torch.equal(torch.sort(index.cpu()).values, torch.arange(size))):
        raise ValueError(f"CPSLinear: the {what} partition is invalid: index must be a "
                         f"permutation of {size} items and offsets non-decreasing from 0 to "
                         f"{size}, got offsets {offsets}")


def check_fits(config: CPSConfig, out_features: int, in_features: int,
                name: str = "", taps: int = 1) -> None:
    """Whether G clusters of rank r fit a layer of `out_features` rows and `in_features`
    columns (a convolution's input channels, each with `taps` columns of the matrix view)."""
    where = f"CPSLinear{f' {name!r}' if name else ''}"
    G = config.num_clusters
    if G > min(out_features, in_features):
        raise ValueError(f"{where}: num_clusters={G} is more than the layer's rows "
                         f"({out_features}) or columns ({in_features})")
    # the initial blocks' smallest side
    smallest = min(out_features // G, in_features // G * taps)
    if config.r_max > smallest:
        raise ValueError(f"{where}: rank {config.r_max} is larger than a "
                         f"{out_features // G} x {in_features // G * taps} block allows "
                         f"(num_clusters={G} on a {in_features} -> {out_features} layer); "
                         f"use a rank <= {smallest} or fewer clusters")
