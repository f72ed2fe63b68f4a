"""CPS-LoRA's cluster op on CUDA against a float64 oracle, values and gradients, on every CUDA
path: the grouped kernels that read and write through the partition's index maps ("kernels"),
and cuBLAS with ATen's gathers and scatters ("auto", "aten"). Skipped without a CUDA device;
the kernels' logic is also checked without one on the host emulator (cuda_host/cluster.cpp)."""
import pytest
import torch
from test_cuda import (
    TOL,
    assert_step_has_no_host_sync,
    cuda_path,  # noqa: F401 (the fixture: each CUDA path)
    poison_cuda_cache,
)
from torch.library import opcheck

import soslora_ext as sl
from soslora_ext.layers.partition import labels_to_index
from soslora_ext.ops import reference

from conftest import rel_err

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
_ops = torch.ops.soslora


def partition(size, clusters, empty=(), single=None):
    """(index, offsets) of a random, uneven partition of `size` items; the clusters in `empty` get
    nothing, `single` gets exactly one item."""
    live = [c for c in range(clusters) if c not in empty and c != single]
    labels = torch.tensor(live)[torch.randint(len(live), (size,))]
    if single is not None:
        labels[torch.randint(size, ())] = single
    return labels_to_index(labels, clusters)


# N, in, out, ranks, empty clusters, the cluster with one output row
CASES = [(1, 13, 11, [2, 0, 3], (), None),
         (37, 45, 53, [3, 0, 2, 5], (2,), 3),
         (300, 70, 90, [16, 4, 40], (), 1),                       # ranks above blocks' widths
         (130, 200, 160, [c % 5 for c in range(40)], (7,), 3),    # more than one launch holds
         (2049, 128, 96, [16, 16, 16, 16], (), None)]             # aligned: byte copies


def cluster_inputs(case, dtype):
    n, n_in, n_out, ranks, empty, single = case
    G, r_max = len(ranks), max(ranks) + 1  # a rank slot no cluster uses
    row_index, row_offsets = partition(n_out, G, empty, single)
    col_index, col_offsets = partition(n_in, G, empty)
    g = dict(device="cuda", dtype=dtype)
    x = torch.randn(n, n_in, **g)
    A = torch.randn(r_max, n_in, **g) * (G / n_in) ** 0.5
    B = torch.randn(n_out, r_max, **g)
    scale = torch.rand(G, device="cuda") + 0.5
    return (x, A, B, scale, row_index.cuda(), col_index.cuda(), row_offsets, col_offsets,
            list(ranks))


def oracle(x, A, B, scale, row_index, col_index, row_offsets, col_offsets, ranks, seed, p):
    """(the adapter's output without the base, hidden) in float64 on the CPU, cluster by
    cluster with index ops; differentiable."""
    x, A, B = (t.double().cpu() for t in (x, A, B))
    ri, ci, scale = row_index.cpu(), col_index.cpu(), scale.double().cpu()
    xd = reference.dropout(x, None if seed is None else seed.cpu(), p)
    out = torch.zeros(x.shape[0], B.shape[0], dtype=torch.float64)
    hidden = []
    for c, r in enumerate(ranks):
        c0, c1, r0, r1 = col_offsets[c], col_offsets[c + 1], row_offsets[c], row_offsets[c + 1]
        h = xd[:, ci[c0:c1]] @ A[:r, c0:c1].T
        out = out.index_add(1, ri[r0:r1], h @ (scale[c] * B[r0:r1, :r]).T)
        hidden.append(h)
    return out, torch.cat(hidden, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"N{c[0]}-{c[1]}-{c[2]}-G{len(c[3])}")
@pytest.mark.usefixtures("cuda_path")
def test_cluster_op_matches_float64_oracle(case, dtype, dropout, with_base):
    torch.manual_seed(len(case[3]) * 1000 + case[0])
    x, A, B, scale, ri, ci, ro, co, ranks = cluster_inputs(case, dtype)
    base = torch.randn(x.shape[0], B.shape[0], device="cuda", dtype=dtype)
    seed = torch.tensor([24680, 13], device="cuda") if dropout else None
    diff = [x, A, B] + ([base] if with_base else [])
    for t in diff:
        t.requires_grad_(True)
    poison_cuda_cache()
    out = sl.ops.cluster_lowrank(x, A, B, scale, ri, ci, ro, co, ranks,
                                 base if with_base else None, seed, dropout)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, diff, grad)

    ref = [t.detach().double().cpu().requires_grad_(True) for t in diff]
    delta, _ = oracle(*ref[:3], scale, ri, ci, ro, co, ranks, seed, dropout)
    expected = delta + (ref[3] if with_base else 0)
    want = torch.autograd.grad(expected, ref, grad.double().cpu())
    assert rel_err(out, expected) < TOL[dtype]
    for name, g, w in zip(["x", "A", "B", "base"], got, want):
        assert rel_err(g, w) < TOL[dtype], name
    for c, r in enumerate(ranks):  # rank slots a cluster does not use get no gradient
        assert not got[1][r:, co[c]:co[c + 1]].any()
        assert not got[2][ro[c]:ro[c + 1], r:].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES[1:4], ids=lambda c: f"N{c[0]}-G{len(c[3])}")
@pytest.mark.usefixtures("cuda_path")
def test_cluster_backward_with_incoming_gradients(case, dtype):
    """The backward op's optional terms, which the op's own autograd never passes: a gradient
    reaching hidden, and the base layer's input gradient to add into."""
    torch.manual_seed(7)
    x, A, B, scale, ri, ci, ro, co, ranks = cluster_inputs(case, dtype)
    seed, p = torch.tensor([97531, 2], device="cuda"), 0.3
    out, hidden = _ops.cluster_lowrank_forward(x, A, B, scale, ri, ci, ro, co, ranks, None,
                                               seed, p)
    grad_out, grad_hidden = torch.randn_like(out), torch.randn_like(hidden)
    grad_x_base = torch.randn_like(x)
    poison_cuda_cache()
    got = _ops.cluster_lowrank_backward(grad_out, x, A, B, scale, hidden, grad_hidden, ri, ci,
                                        ro, co, ranks, grad_x_base, seed, p)

    ref = [t.double().cpu().requires_grad_(True) for t in (x, A, B)]
    out64, hidden64 = oracle(*ref, scale, ri, ci, ro, co, ranks, seed, p)
    assert rel_err(out, out64) < TOL[dtype] and rel_err(hidden, hidden64) < TOL[dtype]
    want = torch.autograd.grad([out64, hidden64], ref,
                               [grad_out.double().cpu(), grad_hidden.double().cpu()])
    want = (want[0] + grad_x_base.double().cpu(), *want[1:])
    for name, g, w in zip(["x", "A", "B"], got, want):
        assert g.dtype == dtype and rel_err(g, w) < TOL[dtype], name


@pytest.mark.usefixtures("cuda_path")
def test_cluster_ops_opcheck_on_cuda():
    x, A, B, scale, ri, ci, ro, co, ranks = cluster_inputs(CASES[1], torch.float32)
    base, seed = torch.randn(x.shape[0], B.shape[0], device="cuda"), torch.tensor([5, 6]).cuda()
    for t in (x, A, B, base):
        t.requires_grad_(True)
    opcheck(_ops.cluster_lowrank_forward, (x, A, B, scale, ri, ci, ro, co, ranks, base, seed, 0.2))
    opcheck(_ops.cluster_lowrank_forward, (x, A, B, scale, ri, ci, ro, co, ranks, None, None, 0.0))
    xd, Ad, Bd = (t.detach() for t in (x, A, B))
    _, hidden = _ops.cluster_lowrank_forward(xd, Ad, Bd, scale, ri, ci, ro, co, ranks, None,
                                             seed, 0.2)
    g = torch.randn(x.shape[0], B.shape[0], device="cuda")
    opcheck(_ops.cluster_lowrank_backward, (g, xd, Ad, Bd, scale, hidden, torch.randn_like(hidden),
                                            ri, ci, ro, co, ranks, torch.randn_like(xd), seed, 0.2))


@pytest.mark.usefixtures("cuda_path")
def test_cluster_training_step_has_no_host_sync():
    """A CPSLinear whose total rank takes the cluster op (not the dense blocks)."""
    from soslora_ext.layers.cps import DENSE_MAX_RANK

    layer = sl.CPSLinear(torch.nn.Linear(256, 192, device="cuda", dtype=torch.bfloat16),
                         num_clusters=4, rank=DENSE_MAX_RANK // 4 + 8, dropout=0.05,
                         init_partition="random", dtype=torch.bfloat16)
    assert sum(layer.ranks) > DENSE_MAX_RANK
    assert_step_has_no_host_sync(layer)


def test_cluster_kernels_bitwise_repeatable_when_deterministic():
    """No split of the sums over N under torch.use_deterministic_algorithms(True): the factor
    gradients repeat bit for bit."""
    previous = sl.ops.set_cuda_path("kernels")
    torch.use_deterministic_algorithms(True)
    try:
        x, A, B, scale, ri, ci, ro, co, ranks = cluster_inputs(CASES[4], torch.float32)
        seed = torch.tensor([3, 4], device="cuda")
        _, hidden = _ops.cluster_lowrank_forward(x, A, B, scale, ri, ci, ro, co, ranks, None,
                                                 seed, 0.1)
        g = torch.randn(x.shape[0], B.shape[0], device="cuda")
        runs = [_ops.cluster_lowrank_backward(g, x, A, B, scale, hidden, None, ri, ci, ro, co,
                                              ranks, None, seed, 0.1) for _ in range(3)]
    finally:
        torch.use_deterministic_algorithms(False)
        sl.ops.set_cuda_path(previous)
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], run))


def test_cluster_kernels_form_no_gathered_copies():
    """The kernels' step peaks at least one [N, in] buffer under the ATen path's (which gathers
    x's columns and scatters grad_x's)."""
    x, A, B, scale, ri, ci, ro, co, ranks = cluster_inputs(
        (4096, 1024, 768, [16, 16, 16, 16], (), None), torch.bfloat16)
    base = torch.randn(x.shape[0], B.shape[0], device="cuda", dtype=torch.bfloat16)
    seed = torch.tensor([8, 9], device="cuda")
    for t in (x, A, B):
        t.requires_grad_(True)

    def peak(path):
        previous = sl.ops.set_cuda_path(path)
        try:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start = torch.cuda.memory_allocated()
            out = sl.ops.cluster_lowrank(x, A, B, scale, ri, ci, ro, co, ranks, base, seed, 0.1)
            torch.autograd.grad(out, [x, A, B], torch.ones_like(out))
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - start
        finally:
            sl.ops.set_cuda_path(previous)

    assert peak("kernels") <= peak("aten") - x.numel() * x.element_size()
