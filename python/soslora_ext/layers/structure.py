"""Does a weight update have CPS-LoRA's structure? A diagnostic with a null control.

CPS-LoRA's premise: the update dW that a fine-tuning makes is made of row x column subspace
clusters, so G low-rank terms on clustered blocks beat one global term at the same parameters.
For one matrix W (an update, or the sum of a few steps' gradients, which is what CPS-LoRA's
repartitions cluster) ``layer_structure`` measures two things:

1. Block energy: the share of ||W||_F^2 on the G diagonal blocks of a spectral co-clustering of
   W (Dhillon 2001, on the energies W_ij^2, rows and columns clustered together so each row
   cluster comes paired with a column cluster). A clustering finds some energy in any matrix,
   so the same procedure runs on ``null_draws`` spectral nulls: matrices with W's singular
   values and Haar-random singular vectors, which have W's rank profile and no block
   structure. Only the excess over the null is structure; the draws give it an interval.
2. Approximation error at equal parameters: ||W - W_blocks||_F / ||W||_F with the best rank-r
   term on each of G blocks (r (m + n) parameters on an m x n matrix), under three partitions
   (contiguous, the one CPS-LoRA's find_partition picks, the co-clustering), against one
   global rank-r term (the same r (m + n) parameters).

A layer is "clustered" when both say so (block energy above every null draw by ENERGY_MARGIN,
and the best CPS error below ERROR_RATIO times the global one), "global" when the CPS blocks
do not fit better (then the global term wins at equal parameters, whatever the energy says),
and "inconclusive" when they fit better without more block energy than the null's. The
model's verdict is the layers' strict majority, "mixed" without one.

Everything runs in float64 on the CPU, on one thread: per matrix one eigendecomposition of its
smaller Gram matrix (its SVD), and per co-clustering (the matrix's and each null's) another
plus k-means on G - 1 dimensions; about 0.5 s for a 1536 x 384 matrix and 5 null draws on a
2-core Intel Xeon.
"""
from __future__ import annotations

import contextlib
import math
import statistics
import time
from typing import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn as nn

from .base import is_conv1d
from .config import CPSConfig
from .partition import find_partition, kmeans

Tensor = torch.Tensor

# Block energy must exceed the largest null draw's by this share of ||W||^2 to count as structure.
ENERGY_MARGIN = 0.05
# The best CPS partition's relative error must be below this fraction of one global term's.
ERROR_RATIO = 0.9
VERDICTS = ("clustered", "inconclusive", "global")


@contextlib.contextmanager
def one_thread():
    """Run the block on one CPU thread, then restore the thread count. For small products and
    decompositions (these, the demo's 64-wide steps), which gain nothing from more threads: on
    a busy 2-core machine two threads made a 0.5 s layer take up to 20 s, and the demo
    minutes instead of a second, each parallel region waiting for the busy core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _check_matrix(W, owner: str) -> Tensor:
    if not (isinstance(W, Tensor) and W.dim() == 2 and W.is_floating_point()):
        got = (f"{W.dtype} of shape {tuple(W.shape)}" if isinstance(W, Tensor)
               else type(W).__name__)
        raise ValueError(f"{owner}: a matrix must be a 2-D floating tensor, got {got}")
    if not bool(torch.isfinite(W).all()):
        raise ValueError(f"{owner}: the matrix holds non-finite values")
    return W.detach().to("cpu", torch.float64)


def spectral_null(singular_values: Tensor, shape: tuple[int, int],
                  generator: torch.Generator) -> Tensor:
    """An [m, n] matrix with these singular values [min(m, n)] and Haar-random singular
    vectors (QR of Gaussian matrices, signs fixed so the draw is uniform)."""
    def orthonormal(n, p):
        q, r = torch.linalg.qr(torch.randn(n, p, generator=generator, dtype=torch.float64))
        return q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, 1.0)
    m, n = shape
    p = singular_values.numel()
    return (orthonormal(m, p) * singular_values.double()) @ orthonormal(n, p).T


def cocluster(W: Tensor, num_clusters: int, generator: torch.Generator
              ) -> tuple[Tensor, Tensor]:
    """(row_labels [m], col_labels [n]): Dhillon's spectral co-clustering of the energies
    E = W * W (normalized E_n = D_r^-1/2 E D_c^-1/2, its singular vectors 2..G scaled by
    D^-1/2, rows and columns clustered together by k-means), so row cluster c is paired with
    column cluster c. Rows and columns without energy are dealt out round robin; energies of
    rank 1 (W of rank 1) have nothing to split and give one cluster."""
    W = W.double()
    m, n = W.shape
    G = num_clusters
    rows, cols = torch.arange(m) % G, torch.arange(n) % G
    E = W.square()
    d_rows, d_cols = E.sum(1), E.sum(0)
    total = float(d_rows.sum())
    if G == 1 or total == 0:
        return rows * 0 if G == 1 else rows, cols * 0 if G == 1 else cols
    live_r, live_c = d_rows > 1e-12 * total / m, d_cols > 1e-12 * total / n
    E, d_rows, d_cols = E[live_r][:, live_c], d_rows[live_r], d_cols[live_c]
    En = E / d_rows.sqrt()[:, None] / d_cols.sqrt()[None, :]
    k = min(G, *En.shape)
    tall = En.shape[0] >= En.shape[1]  # the eigendecomposition of the smaller Gram matrix
    values, vectors = torch.linalg.eigh(En.T @ En if tall else En @ En.T)  # ascending
    values, vectors = values[-k:].flip(0), vectors[:, -k:].flip(1)
    # Directions without signal (E of rank below k) are left out rather than amplified; with
    # none left besides the trivial first, there is nothing to split: one cluster.
    kept = values > values[0] * torch.finfo(values.dtype).eps * max(En.shape)
    kept[0] = False
    if not bool(kept.any()):
        return rows * 0, cols * 0
    values, vectors = values[kept], vectors[:, kept]
    other = (En if tall else En.T) @ vectors / values.sqrt()
    v, u = (vectors, other) if tall else (other, vectors)
    z = torch.cat([u / d_rows.sqrt()[:, None], v / d_cols.sqrt()[:, None]])
    labels = kmeans(z, G, generator)
    rows[live_r] = labels[:int(live_r.sum())]
    cols[live_c] = labels[int(live_r.sum()):]
    return rows, cols


def diagonal_energy(W: Tensor, row_labels: Tensor, col_labels: Tensor,
                    num_clusters: int) -> float:
    """Share of ||W||_F^2 on the blocks W[R_c, C_c]."""
    E = W.double().square()
    total = float(E.sum())
    if total == 0:
        return 0.0
    R = torch.nn.functional.one_hot(row_labels.long(), num_clusters).double()
    C = torch.nn.functional.one_hot(col_labels.long(), num_clusters).double()
    return float(torch.diagonal(R.T @ E @ C).sum()) / total


def block_error(W: Tensor, row_labels: Tensor, col_labels: Tensor, num_clusters: int,
                rank: int) -> float:
    """||W - W_blocks||_F / ||W||_F for W_blocks the best rank-`rank` term on each block
    W[R_c, C_c] (zero off the blocks)."""
    W = W.double()
    total = float(W.square().sum())
    if total == 0:
        return 0.0
    captured = 0.0
    for c in range(num_clusters):
        block = W[row_labels == c][:, col_labels == c]
        if block.numel():
            captured += float(torch.linalg.svdvals(block)[:rank].square().sum())
    return math.sqrt(max(0.0, 1.0 - captured / total))


def _svd(W: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """W = U diag(sigma) Vh (descending, thin) from the eigendecomposition of the smaller Gram
    matrix: 5-10x faster than an SVD at 384 x 1536, and exact enough for energy shares (the
    singular vectors of a sigma below ~1e-8 sigma_max are noise, and carry no energy)."""
    tall = W.shape[0] >= W.shape[1]
    values, vectors = torch.linalg.eigh(W.T @ W if tall else W @ W.T)
    values, vectors = values.flip(0).clamp_min(0), vectors.flip(1)
    sigma = values.sqrt()
    other = (W if tall else W.T) @ vectors / sigma.clamp_min(1e-300)
    return (other, sigma, vectors.T) if tall else (vectors, sigma, other.T)


def _global_error(sigma: Tensor, rank: int) -> float:
    energy = sigma.square()
    total = float(energy.sum())
    return math.sqrt(max(0.0, 1.0 - float(energy[:rank].sum()) / total)) if total else 0.0


def layer_verdict(block_energy: float, null_energies: Sequence[float], cps_error: float,
                  global_error: float) -> dict:
    """One layer's verdict from its measurements: {"verdict", "blocks_beat_null",
    "cps_fits_better", "reason"}. "clustered": both hold; "global": CPS blocks do not fit
    better than one global term (whatever the energy says: at equal parameters the global
    term wins); "inconclusive": they fit better, but the co-clustering finds no more block
    energy than in a spectral null."""
    blocks = block_energy - max(null_energies) > ENERGY_MARGIN
    fits = cps_error < ERROR_RATIO * global_error
    verdict = "clustered" if blocks and fits else "global" if not fits else "inconclusive"
    reason = (f"block energy {block_energy:.3f} {'above' if blocks else 'within'} the null's "
              f"(max {max(null_energies):.3f}{' + margin' if not blocks else ''}); CPS error "
              f"{cps_error:.3f} {'<' if fits else '>='} {ERROR_RATIO} x global {global_error:.3f}")
    return dict(verdict=verdict, blocks_beat_null=blocks, cps_fits_better=fits, reason=reason)


def layer_structure(W: Tensor, num_clusters: int = 4, rank: int = 16, null_draws: int = 5,
                    seed: int = 0, labels: bool = False) -> dict:
    """The measurements of the module docstring for one matrix W [m, n] (any floating dtype,
    any device; computed in float64 on the CPU). `labels`: also return the co-clustering's
    and the best CPS partition's labels (lists), for checking recovery."""
    owner = "layer_structure"
    for name, value, low in (("num_clusters", num_clusters, 1), ("rank", rank, 1),
                             ("null_draws", null_draws, 1)):
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= low):
            raise ValueError(f"{owner}: {name} must be an int >= {low}, got {value!r}")
    W = _check_matrix(W, owner)
    m, n = W.shape
    if num_clusters > min(m, n):
        raise ValueError(f"{owner}: num_clusters={num_clusters} is more than the matrix's rows "
                         f"({m}) or columns ({n})")
    with one_thread():
        return _measure(W, num_clusters, rank, null_draws, seed, labels)


def _measure(W: Tensor, G: int, rank: int, null_draws: int, seed: int, labels: bool) -> dict:
    m, n = W.shape
    generator = torch.Generator().manual_seed(seed)
    U, sigma, Vh = _svd(W)
    total = float(sigma.square().sum())
    if total == 0:
        raise ValueError("layer_structure: the matrix is zero: nothing to measure")
    rows, cols = cocluster(W, G, generator)
    energy = diagonal_energy(W, rows, cols, G)
    null = [diagonal_energy(N, *cocluster(N, G, generator), G)
            for N in (spectral_null(sigma, (m, n), generator) for _ in range(null_draws))]
    # CPS-LoRA's own criterion, on the leading directions it would sketch.
    k = CPSConfig(num_clusters=G, rank=rank).resolved_sketch_rank()
    partitions = dict(
        contiguous=(torch.arange(m) * G // m, torch.arange(n) * G // n),
        cps=find_partition(U[:, :k] * sigma[:k], Vh[:k], G, generator),
        cocluster=(rows, cols))
    errors = {name: block_error(W, r, c, G, rank) for name, (r, c) in partitions.items()}
    best = min(errors, key=errors.get)
    global_error = _global_error(sigma, rank)
    null_mean = sum(null) / len(null)
    result = dict(
        shape=[m, n], norm=math.sqrt(total),
        top_rank_energy=1.0 - global_error ** 2,
        block_energy=dict(value=energy, null=null, null_mean=null_mean,
                          excess=energy - null_mean,
                          excess_interval=[energy - max(null), energy - min(null)]),
        error={"global": global_error, **errors, "best": errors[best], "best_partition": best},
        **layer_verdict(energy, null, errors[best], global_error))
    if labels:
        result["labels"] = dict(
            cocluster=dict(rows=rows.tolist(), cols=cols.tolist()),
            best=dict(rows=partitions[best][0].tolist(), cols=partitions[best][1].tolist()))
    return result


def model_verdict(layers: Mapping[str, dict]) -> dict:
    """{verdict, counts, medians, text}: the strict majority of the layers' verdicts ("mixed"
    without one), the medians of their measurements and one line saying what it means."""
    counts = {v: sum(layer["verdict"] == v for layer in layers.values()) for v in VERDICTS}
    n = len(layers)
    verdict = next((v for v in VERDICTS if v != "inconclusive" and 2 * counts[v] > n), "mixed")

    def median(get):
        return statistics.median(get(layer) for layer in layers.values())

    medians = dict(
        top_rank_energy=median(lambda l: l["top_rank_energy"]),
        block_energy=median(lambda l: l["block_energy"]["value"]),
        null_energy=median(lambda l: l["block_energy"]["null_mean"]),
        excess=median(lambda l: l["block_energy"]["excess"]),
        cps_error=median(lambda l: l["error"]["best"]),
        global_error=median(lambda l: l["error"]["global"]))
    beat = sum(layer["blocks_beat_null"] for layer in layers.values())
    text = {
        "clustered": "the update is made of row x column clusters: CPS-LoRA's premise holds, "
                     "its blocks fit the update better than one LoRA term at the same "
                     "parameters",
        "global": "one global low-rank term fits the update better than CPS blocks at the "
                  f"same parameters (block energy beyond the spectral null in {beat} of {n} "
                  "layers): CPS-LoRA's premise does not hold; prefer LoRA, and expect no gain "
                  "from repartitioning (CPS-LoRA can still match LoRA through its higher total "
                  "rank, not through clusters)",
        "mixed": "some layers clustered, some not: CPS-LoRA may help on the clustered ones; "
                 "adapt those with it"}[verdict]
    return dict(verdict=verdict, counts=counts, layers=n, medians=medians,
                text=f"{verdict} ({counts['clustered']} clustered, {counts['inconclusive']} "
                     f"inconclusive, {counts['global']} global of {n} layers): {text}")


def check_structure(matrices: Mapping[str, Tensor], num_clusters: int = 4, rank: int = 16,
                    null_draws: int = 5, seed: int = 0) -> dict:
    """The structure report of every matrix (name -> W [out, in]: updates, or gradient sums
    from ``gradient_sums``): {"layers": {name: layer_structure(...)}, "model":
    model_verdict(...), the settings and the seconds it took}. Zero matrices (a layer the loss
    does not reach) are listed under "skipped"."""
    if not matrices:
        raise ValueError("check_structure: no matrices given")
    start = time.perf_counter()
    layers, skipped = {}, []
    with one_thread():
        for name, W in matrices.items():
            if isinstance(W, Tensor) and W.dim() == 2 and not bool(W.any()):
                skipped.append(name)
                continue
            try:
                layers[name] = layer_structure(W, num_clusters, rank, null_draws, seed)
            except ValueError as e:
                raise ValueError(f"check_structure: {name!r}: {e}") from None
    if not layers:
        raise ValueError(f"check_structure: every matrix is zero ({len(skipped)} given)")
    return dict(num_clusters=num_clusters, rank=rank, null_draws=null_draws, seed=seed,
                energy_margin=ENERGY_MARGIN, error_ratio=ERROR_RATIO, layers=layers,
                skipped=skipped, model=model_verdict(layers),
                seconds=time.perf_counter() - start)


# ---- the matrices of a model -----------------------------------------------------------------
def _weights(model: nn.Module, names: Sequence[str], owner: str) -> dict[str, nn.Parameter]:
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules or not isinstance(
        getattr(modules[n], "weight", None), nn.Parameter)]
    if not names or missing:
        raise ValueError(f"{owner}: names must be modules of the model with a weight, got "
                         f"{missing[:3] if missing else 'none'}")
    return {n: modules[n].weight for n in names}


def _as_out_in(model: nn.Module, name: str, W: Tensor) -> Tensor:
    return W.t() if is_conv1d(dict(model.named_modules())[name]) else W


def gradient_sums(model: nn.Module, names: Sequence[str],
                  batches: Callable[[int], Mapping[str, Tensor]], steps: int,
                  loss: Callable = lambda output: output.loss) -> dict[str, Tensor]:
    """{name: sum over `steps` batches of dL/dW [out, in]} for the weights of the modules
    `names` (Linear or Conv1D): the signal CPS-LoRA's repartitions cluster, without an
    optimizer step. `batches(step)` gives the keyword arguments of a forward; `loss(output)`
    the scalar. The model's parameters keep their values and requires_grad flags; the
    gradients need the memory of the named weights."""
    weights = _weights(model, names, "gradient_sums")
    flags = {p: p.requires_grad for p in model.parameters()}
    grads = {p: p.grad for p in model.parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
        for W in weights.values():
            W.requires_grad_(True)
        for step in range(steps):
            loss(model(**batches(step))).backward()
        return {n: _as_out_in(model, n, W.grad.detach().clone() if W.grad is not None
                              else torch.zeros_like(W)) for n, W in weights.items()}
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = grads[p]


def weight_deltas(base: nn.Module, tuned: nn.Module, names: Iterable[str]) -> dict[str, Tensor]:
    """{name: tuned weight - base weight [out, in]} for the modules `names` of two models of
    the same architecture (a fully fine-tuned model and its base)."""
    names = list(names)
    a, b = _weights(base, names, "weight_deltas"), _weights(tuned, names, "weight_deltas")
    wrong = [n for n in names if a[n].shape != b[n].shape]
    if wrong:
        raise ValueError(f"weight_deltas: {wrong[0]!r} is {tuple(a[wrong[0]].shape)} in the "
                         f"base and {tuple(b[wrong[0]].shape)} in the tuned model")
    return {n: _as_out_in(base, n, (b[n].detach().double() - a[n].detach().double()))
            for n in names}
