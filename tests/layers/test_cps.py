"""CPS-LoRA: the cluster op and CPSLinear against the dense oracle, repartition, schedule,
merge, save/load/export, bad input, and the planted-structure recovery."""
import importlib.util
import pathlib

import peft
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch.library import opcheck
from transformers import LlamaConfig, LlamaForCausalLM

import soslora_ext as sl
from soslora_ext import ops
from soslora_ext.formats.native import WEIGHTS_NAME
from soslora_ext.layers.partition import adjusted_rand_index, labels_to_index, spectral_embedding
from soslora_ext.ops import reference

from conftest import rel_err, restamp_adapter
from helpers import layer_oracle_delta, oracle_delta

ROOT = pathlib.Path(__file__).resolve().parents[2]


def random_partition(n, clusters, empty=()):
    """(index, offsets) of a random partition of n items; clusters in `empty` get nothing."""
    live = [c for c in range(clusters) if c not in empty]
    labels = torch.tensor(live)[torch.randint(len(live), (n,))]
    return labels_to_index(labels, clusters)


def in_order_partition(n, clusters, empty=()):
    """(index, offsets) of a partition in index order (index 0..n-1: the op's fast path), with
    random block sizes; clusters in `empty` get nothing."""
    live = [c for c in range(clusters) if c not in empty]
    labels = torch.tensor(live)[torch.randint(len(live), (n,))].sort().values
    return labels_to_index(labels, clusters)


def op_inputs(n=5, in_features=13, out_features=11, ranks=(2, 0, 3), dtype=torch.float64,
              empty_rows=(), empty_cols=(), in_order=(False, False)):
    G = len(ranks)
    r_max = max(max(ranks), 1)
    rows_of, cols_of = (in_order_partition if o else random_partition for o in in_order)
    row_index, row_offsets = rows_of(out_features, G, empty_rows)
    col_index, col_offsets = cols_of(in_features, G, empty_cols)
    x = torch.randn(n, in_features, dtype=dtype, requires_grad=True)
    A = torch.randn(r_max, in_features, dtype=dtype, requires_grad=True)
    B = torch.randn(out_features, r_max, dtype=dtype, requires_grad=True)
    scale = torch.rand(G, dtype=torch.float64 if dtype == torch.float64 else torch.float32) + 0.5
    return x, A, B, scale, row_index, col_index, row_offsets, col_offsets, list(ranks)


def make_cps(in_features=24, out_features=20, clusters=3, dtype=torch.float64, **kw):
    base = nn.Linear(in_features, out_features, dtype=dtype)
    if "rank_per_cluster" not in kw:
        kw.setdefault("rank", 3)
    layer = sl.CPSLinear(base, num_clusters=clusters, dtype=dtype, **kw)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.5)
    return layer


# ---- the op ----------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [dict(), dict(n=1, in_features=7, out_features=5, ranks=(1, 2)),
                                   dict(ranks=(3, 1, 2, 2), empty_rows=(1,), empty_cols=(3,)),
                                   dict(in_features=3, out_features=17, ranks=(4, 4))])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("with_base", [True, False])
# Rows and columns in index order skip the gather and scatter: each side alone and both.
@pytest.mark.parametrize("in_order", [(False, False), (True, False), (False, True), (True, True)])
def test_op_matches_oracle_values_and_gradients(shape, dropout, with_base, in_order):
    x, A, B, scale, ri, ci, ro, co, ranks = op_inputs(**shape, in_order=in_order)
    for index, ordered in zip((ri, ci), in_order):
        assert torch.equal(index, torch.arange(len(index))) or not ordered
    base = torch.randn(x.shape[0], B.shape[0], dtype=x.dtype, requires_grad=True)
    seed = ops.new_dropout_seed(x.device) if dropout else None
    out = ops.cluster_lowrank(x, A, B, scale, ri, ci, ro, co, ranks,
                              base if with_base else None, seed, dropout)
    delta = oracle_delta(A, B, scale, ri, ci, ro, co, ranks)
    expected = reference.dropout(x, seed, dropout) @ delta.T + (base if with_base else 0)
    assert rel_err(out, expected) <= 1e-12
    grad = torch.randn_like(out)
    inputs = [x, A, B] + ([base] if with_base else [])
    got = torch.autograd.grad(out, inputs, grad)
    want = torch.autograd.grad(expected, inputs, grad, allow_unused=True)
    for g, w in zip(got, want):
        assert rel_err(g, w if w is not None else torch.zeros_like(g)) <= 1e-12
    # Rank slots a cluster does not use get no gradient.
    for c, r in enumerate(ranks):
        assert not got[1][r:, co[c]:co[c + 1]].any()
        assert not got[2][ro[c]:ro[c + 1], r:].any()


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(n=st.integers(1, 9), in_features=st.integers(1, 23), out_features=st.integers(1, 23),
       ranks=st.lists(st.integers(0, 4), min_size=1, max_size=5),
       dtype=st.sampled_from([torch.float64, torch.float32]), dropout=st.sampled_from([0, 0.4]),
       seed=st.integers(0, 2**31))
def test_op_property_against_the_dense_oracle(n, in_features, out_features, ranks, dtype,
                                              dropout, seed):
    torch.manual_seed(seed)
    x, A, B, scale, ri, ci, ro, co, ranks = op_inputs(n, in_features, out_features, ranks, dtype)
    drop_seed = ops.new_dropout_seed(x.device) if dropout else None
    out = ops.cluster_lowrank(x, A, B, scale, ri, ci, ro, co, ranks, None, drop_seed, dropout)
    x64, A64, B64 = (t.detach().double().requires_grad_() for t in (x, A, B))
    expected = reference.dropout(x64, drop_seed, dropout) @ \
        oracle_delta(A64, B64, scale, ri, ci, ro, co, ranks).T
    grad = torch.randn_like(out)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert rel_err(out, expected) <= tol
    got = torch.autograd.grad(out, [x, A, B], grad)
    want = torch.autograd.grad(expected, [x64, A64, B64], grad.double())
    for g, w in zip(got, want):
        assert rel_err(g, w) <= tol


@pytest.mark.parametrize("dtype, tol, dropout", [(torch.float64, 1e-12, 0.25),
                                                 (torch.float32, 1e-5, 0.0)])
def test_cpu_op_over_many_chunks_matches_oracle_and_the_aten_form(dtype, tol, dropout):
    """The CPU op takes the batch a chunk of rows at a time (about 2^20 buffer elements per
    chunk, at least 64 rows): layers this wide give chunks of 64 rows, so 150 rows are three
    chunks, the last one short, forward and backward. Values and every gradient (with
    grad_hidden and a base gradient flowing in) against the float64 oracle, and against the
    gather/scatter ATen form."""
    torch.manual_seed(7)
    x, A, B, scale, ri, ci, ro, co, ranks = op_inputs(
        150, 12001, 4507, (5, 0, 3, 7), dtype, empty_rows=(2,))
    base = torch.randn(x.shape[0], B.shape[0], dtype=dtype)
    grad_x_base = torch.randn_like(x)
    seed = ops.new_dropout_seed(x.device) if dropout else None
    args = (ri, ci, ro, co, ranks)

    def run():
        out, hidden = torch.ops.soslora.cluster_lowrank_forward(
            x, A, B, scale, *args, base, seed, dropout)
        grad_out, grad_hidden = torch.randn_like(out), torch.randn_like(hidden)
        grads = torch.ops.soslora.cluster_lowrank_backward(
            grad_out, x, A, B, scale, hidden, grad_hidden, *args, grad_x_base, seed, dropout)
        return out, hidden, grad_out, grad_hidden, grads

    torch.manual_seed(8)
    out, hidden, grad_out, grad_hidden, grads = run()
    # The oracle cluster by cluster in float64 (the dense [out, in] update would be 1.7 GB).
    x64, A64, B64 = (t.detach().double().requires_grad_() for t in (x, A, B))
    x_drop = reference.dropout(x64, seed, dropout)
    hs, expected = [], base.double()
    for c, r in enumerate(ranks):
        h = x_drop[:, ci[co[c]:co[c + 1]]] @ A64[:r, co[c]:co[c + 1]].T
        rows = ri[ro[c]:ro[c + 1]]
        expected = expected.index_add(1, rows, h @ (B64[ro[c]:ro[c + 1], :r] * scale[c]).T)
        hs.append(h)
    h64 = torch.cat(hs, 1)
    assert rel_err(out, expected) <= tol
    assert rel_err(hidden, h64) <= tol
    want = torch.autograd.grad([expected, h64], [x64, A64, B64],
                               [grad_out.double(), grad_hidden.double()])
    want = (want[0] + grad_x_base.double(), want[1], want[2])  # grad_x_base is added in
    for g, w in zip(grads, want):
        assert rel_err(g, w) <= tol
    sl._C.set_cpu_takes_cuda_fallback(True)
    try:
        torch.manual_seed(8)
        aten = run()
    finally:
        sl._C.set_cpu_takes_cuda_fallback(False)
    for got, other in zip((out, hidden, *grads), (aten[0], aten[1], *aten[4])):
        assert rel_err(got, other) <= tol


def test_op_gradcheck_and_opcheck():
    x, A, B, scale, ri, ci, ro, co, ranks = op_inputs()
    base = torch.randn(x.shape[0], B.shape[0], dtype=x.dtype, requires_grad=True)
    seed = ops.new_dropout_seed(x.device)
    args = (scale, ri, ci, ro, co, ranks)
    assert torch.autograd.gradcheck(
        lambda x, A, B, base: ops.cluster_lowrank(x, A, B, *args, base, seed, 0.2),
        (x, A, B, base))
    opcheck(torch.ops.soslora.cluster_lowrank_forward,
            (x, A, B, scale, ri, ci, ro, co, ranks, base, seed, 0.2))
    opcheck(torch.ops.soslora.cluster_lowrank_forward,
            (x, A, B, scale, ri, ci, ro, co, ranks, None, None, 0.0))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2),
                                       (torch.float16, 2e-2)])
def test_op_low_precision_against_float64(dtype, tol):
    x, A, B, scale, ri, ci, ro, co, ranks = op_inputs(n=33, in_features=40, out_features=37,
                                                      ranks=(4, 3, 5), dtype=dtype)
    out = ops.cluster_lowrank(x, A, B, scale, ri, ci, ro, co, ranks)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, A, B], grad)
    x64, A64, B64 = (t.detach().double().requires_grad_() for t in (x, A, B))
    expected = x64 @ oracle_delta(A64, B64, scale, ri, ci, ro, co, ranks).T
    want = torch.autograd.grad(expected, [x64, A64, B64], grad.double())
    assert rel_err(out, expected) <= tol
    for g, w in zip(got, want):
        assert rel_err(g, w) <= tol


@pytest.mark.parametrize("change,match", [
    (lambda a: a.update(ro=[0, 3, 20, 11]), "row_offsets must be non-decreasing"),
    (lambda a: a.update(co=[0, 5, 13]), "col_offsets must have num_clusters"),
    (lambda a: a.update(ranks=[2, 9, 3]), "every rank must be in"),
    (lambda a: a.update(ri=a["ri"][:-1]), "row_index must be an int64 permutation"),
    (lambda a: a.update(scale=a["scale"][:2]), "scale must be a floating-point tensor"),
    (lambda a: a.update(A=a["A"].float()), "x and A must have the same dtype"),
])
def test_op_bad_arguments_name_the_argument(change, match):
    x, A, B, scale, ri, ci, ro, co, ranks = op_inputs()
    a = dict(x=x, A=A, B=B, scale=scale, ri=ri, ci=ci, ro=ro, co=co, ranks=ranks)
    change(a)
    with pytest.raises(RuntimeError, match=match):
        ops.cluster_lowrank(a["x"], a["A"], a["B"], a["scale"], a["ri"], a["ci"], a["ro"],
                            a["co"], a["ranks"])


# ---- the layer -------------------------------------------------------------------------------
@pytest.fixture(params=["dense", "cluster op"])
def forward_path(request, monkeypatch):
    """Each test runs through both forms of CPSLinear's forward: the clusters as one dense
    low-rank update (total rank up to DENSE_MAX_RANK) and the cluster op (above it); the
    other form is made to fail, so a test cannot pass through the wrong one."""
    import soslora_ext.layers.cps as cps
    dense = request.param == "dense"
    monkeypatch.setattr(cps, "DENSE_MAX_RANK", 10**9 if dense else 0)
    _expect_form(monkeypatch, dense)
    return request.param


def _expect_form(monkeypatch, dense: bool):
    """Makes the layer's op call fail unless it asks for the given form (which form the op
    then runs: test_adapted_linear.py)."""
    import soslora_ext.layers.cps as cps
    real = cps.ops.adapted_linear

    def checked(*args, **kwargs):
        if kwargs["dense_blocks"] is not dense:
            raise AssertionError("the other forward path ran")
        return real(*args, **kwargs)

    monkeypatch.setattr(cps.ops, "adapted_linear", checked)


def test_dense_forward_up_to_the_rank_limit_and_the_cluster_op_above(monkeypatch):
    import soslora_ext.layers.cps as cps
    layer, x = make_cps(rank=2), torch.randn(4, 24, dtype=torch.float64)
    assert sum(layer.ranks) <= cps.DENSE_MAX_RANK
    _expect_form(monkeypatch, True)
    expected = layer(x)
    monkeypatch.undo()
    monkeypatch.setattr(cps, "DENSE_MAX_RANK", sum(layer.ranks) - 1)
    _expect_form(monkeypatch, False)
    assert rel_err(layer(x), expected) <= 1e-12


@pytest.mark.parametrize("kw", [dict(rank=4), dict(rank_per_cluster=[1, 3, 2], use_rslora=True),
                                dict(rank=2, init_partition="random", dropout=0.25),
                                dict(rank_per_cluster=[3, 1, 2], init_partition="random",
                                     dropout=0.25, use_rslora=True)])
def test_layer_matches_oracle(kw, forward_path):
    layer = make_cps(**kw).train()
    x = torch.randn(2, 3, 24, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(7)
    y = layer(x)
    torch.manual_seed(7)
    seed = ops.new_dropout_seed(x.device) if layer.config.dropout else None
    delta = layer_oracle_delta(layer)
    expected = reference.cps_forward(x, layer.weight, layer.bias, delta, layer.config.dropout,
                                     seed)
    assert y.shape == (2, 3, 20)
    assert rel_err(y, expected) <= 1e-12
    grad = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, layer.lora_A, layer.lora_B], grad)
    want = torch.autograd.grad(expected, [x, layer.lora_A, layer.lora_B], grad)
    for g, w in zip(got, want):
        assert rel_err(g, w) <= 1e-12
    assert rel_err(layer.delta_weight(), delta) <= 1e-12
    scales = [layer.config.alpha / (r ** 0.5 if layer.config.use_rslora else r)
              for r in layer.ranks]
    assert torch.allclose(layer.cluster_scales, torch.tensor(scales, dtype=torch.float64))


def test_layer_non_contiguous_input_and_compile():
    layer = make_cps(dtype=torch.float32).eval()
    x = torch.randn(9, 48)[:, ::2]
    assert not x.is_contiguous()
    expected = x.double() @ layer_oracle_delta(layer).T + nn.functional.linear(
        x.double(), layer.weight.double(), layer.bias.double())
    assert rel_err(layer(x), expected) <= 1e-5
    compiled = torch.compile(layer, fullgraph=True)
    assert rel_err(compiled(x), expected) <= 1e-5


def test_merge_unmerge_and_unload():
    layer = make_cps(dtype=torch.float32)
    x = torch.randn(5, 24)
    y = layer(x)
    w0 = layer.weight.detach().clone()
    layer.merge()
    with torch.no_grad():  # a merged layer serves inference only
        assert torch.allclose(layer(x), y, atol=1e-5)
    assert rel_err(layer.weight - w0, layer_oracle_delta(layer)) <= 1e-6
    layer.unmerge()
    assert torch.allclose(layer.weight, w0, atol=1e-6)
    layer.merge()
    with pytest.raises(RuntimeError, match="merged; unmerge"):
        layer.repartition(signal="delta", force=True)
    layer.unmerge()
    linear = layer.merge_and_unload()
    assert type(linear) is nn.Linear and torch.allclose(linear(x), y, atol=1e-5)


# ---- repartition -----------------------------------------------------------------------------
def test_refit_to_the_same_partition_keeps_the_update():
    layer = make_cps(rank=3)
    before = layer.delta_weight()
    rows, cols = layer.partition()
    relabel = torch.tensor([2, 0, 1])  # the same blocks under other cluster numbers
    change = layer._refit(relabel[rows], relabel[cols], torch.Generator().manual_seed(0))
    # The change is computed from factors, to about sqrt(float64 eps).
    assert change <= 1e-6 and rel_err(layer.delta_weight(), before) <= 1e-12


def test_repartition_reports_the_relative_change_and_handles_empty_clusters(forward_path):
    layer = make_cps(rank=2)
    before = layer.delta_weight()
    rows, cols = layer.partition()
    rows[rows == 1] = 0  # cluster 1 loses all its rows
    change = layer._refit(rows, cols, torch.Generator().manual_seed(0))
    after = layer.delta_weight()
    assert change == pytest.approx(float((after - before).norm() / before.norm()), rel=1e-9)
    assert layer.partition()[0].bincount(minlength=3)[1] == 0
    x = torch.randn(4, 24, dtype=torch.float64)  # an empty cluster is a no-op term
    assert rel_err(after, layer_oracle_delta(layer)) <= 1e-12
    expected = nn.functional.linear(x, layer.weight, layer.bias) + x @ layer_oracle_delta(layer).T
    assert rel_err(layer(x), expected) <= 1e-12


def test_repartition_from_gradient_statistics_finds_the_planted_blocks():
    """Statistics of a known gradient sum S (inputs = identity, so g^T x = S) with 3 shuffled
    blocks: the layer moves from its initial partition to the planted one."""
    layer = make_cps(in_features=30, out_features=36, rank=2)
    g = torch.Generator().manual_seed(3)
    rows, cols = torch.randperm(36, generator=g) % 3, torch.randperm(30, generator=g) % 3
    S = torch.zeros(36, 30, dtype=torch.float64)
    for c in range(3):
        block = torch.randn(int((rows == c).sum()), 2, dtype=torch.float64, generator=g) @ \
            torch.randn(2, int((cols == c).sum()), dtype=torch.float64, generator=g)
        S[(rows == c).nonzero()[:, 0][:, None], (cols == c).nonzero()[:, 0][None, :]] = block
    before = layer.delta_weight()
    layer.collect_statistics()
    layer._sketch.add(torch.eye(30, dtype=torch.float64), S.T)
    change = layer.repartition(signal="gradient")
    found_rows, found_cols = layer.partition()
    assert adjusted_rand_index(found_rows, rows) == 1.0
    assert adjusted_rand_index(found_cols, cols) == 1.0
    assert layer.last_repartition["adopted"]
    assert layer.last_repartition["captured_after"] == pytest.approx(1.0, abs=1e-6)
    after = layer.delta_weight()
    assert change == pytest.approx(float((after - before).norm() / before.norm()), rel=1e-6)
    # The discarded share that the adoption rule weighed is the change the re-fit made.
    assert layer.last_repartition["update_discarded"] == pytest.approx(change ** 2, rel=1e-6)
    assert not layer._collecting and layer._sketch is None  # statistics are used up


@pytest.mark.parametrize("n,d,k", [(200, 32, 4), (37, 5, 3), (9, 3, 4), (6, 8, 4), (50, 1, 2)])
def test_spectral_embedding_spans_the_outer_product_svds_top_subspace(n, d, k):
    # The embedding from half the products and a small Gram matrix spans the same top-k
    # subspace as the SVD of the full outer-product feature map it replaces.
    g = torch.Generator().manual_seed(n * d + k)
    centers = torch.randn(k, d, dtype=torch.float64, generator=g)
    u = centers[torch.arange(n) % k] + 0.3 * torch.randn(n, d, dtype=torch.float64, generator=g)
    u = u / u.norm(dim=1, keepdim=True)
    phi = (u[:, :, None] * u[:, None, :]).flatten(1)
    M = phi / (phi @ phi.sum(0)).sqrt()[:, None]
    U, sigma, _ = torch.linalg.svd(M, full_matrices=False)
    rank = int((sigma > sigma[0] * 1e-12).sum())
    expected = U[:, :min(k, rank)]
    got = spectral_embedding(u, k)
    assert got.shape == expected.shape
    assert rel_err(got.T @ got, torch.eye(got.shape[1], dtype=torch.float64)) < 1e-10
    if min(k, rank) < rank and sigma[k - 1] - sigma[k] < 1e-6:
        return  # a tie at the k-th value: the top-k subspace is not unique
    assert rel_err(got @ got.T, expected @ expected.T) < 1e-8


def test_statistics_see_the_layers_input_and_output_gradient(forward_path):
    """What a training step adds to the statistics is g^T x of the layer's own input x and
    output gradient g, whatever the leading dimensions."""
    layer = make_cps(rank=2, init_partition="random", dropout=0.25).train()
    layer.collect_statistics()
    x = torch.randn(2, 3, 24, dtype=torch.float64)
    grad = torch.randn(2, 3, 20, dtype=torch.float64)
    layer(x).backward(grad)
    S = grad.reshape(-1, 20).T @ x.reshape(-1, 24)  # the full weight's gradient
    sketch = layer._sketch
    assert sketch.updates == 1
    assert rel_err(sketch.Y.double(), S @ sketch.omega.double()) <= 1e-5  # float32 sketch
    assert rel_err(sketch.Z.double(), S.T @ sketch.psi.double()) <= 1e-5


def test_repartition_refuses_without_signal_and_bad_arguments():
    layer = sl.CPSLinear(nn.Linear(12, 12), num_clusters=2, rank=2)
    with pytest.raises(RuntimeError, match="signal is zero"):
        layer.repartition()
    with pytest.raises(RuntimeError, match="no gradient statistics"):
        layer.repartition(signal="gradient")
    with pytest.raises(ValueError, match="signal must be"):
        layer.repartition(signal="weights")


def test_schedule_windows_and_repartition_steps():
    model = nn.Sequential(sl.CPSLinear(nn.Linear(16, 16), num_clusters=2, rank=2,
                                       repartition_every=6, statistics_steps=2))
    layer = model[0]
    opt = torch.optim.SGD([layer.lora_A, layer.lora_B], lr=1e-3)
    schedule = sl.RepartitionSchedule(model, opt)
    collecting, repartitioned = [], []
    for step in range(1, 15):
        collecting.append(layer._collecting)
        layer(torch.randn(8, 16)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        if schedule.step():
            repartitioned.append(step)
    # Windows: steps 1-2, 7-8, 13-14; repartitions after steps 2, 8, 14.
    assert collecting == [s % 6 in (1, 2) for s in range(1, 15)]
    assert repartitioned == [2, 8, 14]


def test_schedule_skips_a_layer_without_signal():
    """A layer that the loss never reaches keeps its partition; training goes on."""
    used = sl.CPSLinear(nn.Linear(16, 16), num_clusters=2, rank=2, repartition_every=2,
                        statistics_steps=1)
    unused = sl.CPSLinear(nn.Linear(16, 16), num_clusters=2, rank=2, repartition_every=2,
                          statistics_steps=1)
    model = nn.ModuleDict(dict(used=used, unused=unused))
    opt = torch.optim.SGD([used.lora_A, used.lora_B], lr=1e-3)
    schedule = sl.RepartitionSchedule(model, opt)
    before = unused.partition()
    for _ in range(3):
        used(torch.randn(8, 16)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        schedule.step()
    assert int(used.repartition_count) == 2 and int(unused.repartition_count) == 0
    assert unused.last_repartition == dict(adopted=False, no_signal=True)
    assert all(torch.equal(a, b) for a, b in zip(unused.partition(), before))


def test_recovers_a_planted_partition_better_than_global_lora():
    spec = importlib.util.spec_from_file_location("bench_cps", ROOT / "bench" / "bench_cps.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    r = bench.recovery(seed=1)
    assert r["cps_params"] == r["lora_params"]
    assert r["row_ari"] >= 0.9 and r["col_ari"] >= 0.9
    assert r["cps_rel_error"] <= 0.1 and r["lora_rel_error"] >= 0.5


# ---- bad input -------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,match", [
    (dict(num_clusters=13), "num_clusters=13 is more than"),
    (dict(num_clusters=4, rank=4), "rank 4 is larger than a 3 x 3 block"),
    (dict(rank_per_cluster=[1, 2]), "rank_per_cluster must be a list of num_clusters=4"),
    (dict(num_clusters=0), "num_clusters must be a positive int"),
    (dict(repartition_every=-1), "repartition_every must be an int >= 0"),
    (dict(repartition_every=4, statistics_steps=5), "statistics_steps must be"),
    (dict(init_partition="kmeans"), "init_partition must be one of"),
    (dict(dropout=1.0), "dropout must be in"),
])
def test_bad_configuration_is_refused_before_anything_changes(kw, match):
    base = nn.Linear(12, 15)
    with pytest.raises(ValueError, match=match):
        sl.CPSLinear(base, **kw)
    assert base.weight.requires_grad  # the base was not touched


def test_non_linear_base_and_bad_input():
    with pytest.raises(TypeError, match="base must be an nn.Linear"):
        sl.CPSLinear(nn.LayerNorm(4), num_clusters=2, rank=1)
    layer = sl.CPSLinear(nn.Linear(8, 8), num_clusters=2, rank=2)
    with pytest.raises(ValueError, match="last dimension in_features=8"):
        layer(torch.randn(3, 7))


# ---- model level, save / load / PEFT -----------------------------------------------------------
def llama(layers=2):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=56, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)).eval()


def cps_llama(**kw):
    model = sl.apply_cps_lora(llama(), ["q_proj", "v_proj", "down_proj"],
                              **{"num_clusters": 4, "rank": 2, "alpha": 8.0,
                                 "init_partition": "random", **kw})
    with torch.no_grad():
        for _, layer in sl.cps_layers(model):
            layer.lora_B.normal_(0, 0.3)
    return model


IDS = torch.randint(0, 90, (2, 9))


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def test_apply_cps_lora_checks_every_layer_before_changing_the_model():
    model = llama(layers=1)
    with pytest.raises(ValueError, match="'model.layers.0.self_attn.k_proj'.*rank 5"):
        sl.apply_cps_lora(model, ["q_proj", "k_proj"], num_clusters=4, rank=5)
    assert not list(sl.adapter_layers(model))
    assert all(p.requires_grad for p in model.parameters())


def test_save_load_round_trip_and_peft_export(tmp_path):
    model = cps_llama()
    for _, layer in sl.cps_layers(model):  # a learned partition, not the initial one
        layer.repartition(signal="delta", force=True)
    expected = logits(model)
    sl.save_adapter(model, tmp_path / "ours")
    loaded = sl.load_adapter(llama(), tmp_path / "ours")
    assert torch.equal(logits(loaded), expected)
    for (_, a), (_, b) in zip(sl.cps_layers(model), sl.cps_layers(loaded)):
        assert a._offsets == b._offsets and torch.equal(a.row_index, b.row_index)
    sl.export_peft(model, tmp_path / "peft")
    peft_model = peft.PeftModel.from_pretrained(llama(), str(tmp_path / "peft")).eval()
    assert rel_err(logits(peft_model), expected) <= 1e-5
    info = sl.formats.native.read_adapter_config(tmp_path / "ours")
    assert info["method"] == "cps" and all(m["method"] == "cps" for m in info["modules"].values())
    sl.merge_and_unload(model)
    assert rel_err(logits(model), expected) <= 1e-5


def test_load_refuses_a_damaged_partition(tmp_path):
    sl.save_adapter(cps_llama(), tmp_path)
    tensors = load_file(str(tmp_path / WEIGHTS_NAME))
    key = "model.layers.0.self_attn.q_proj.row_index"
    tensors[key][0] = tensors[key][1]  # no longer a permutation
    save_file(tensors, str(tmp_path / WEIGHTS_NAME))
    restamp_adapter(tmp_path)  # a consistent but wrong pair
    fresh = llama()
    with pytest.raises(sl.AdapterError, match="q_proj.*rows partition is invalid"):
        sl.load_adapter(fresh, tmp_path)
    assert not list(sl.adapter_layers(fresh))


def test_callback_repartitions_inside_a_trainer(tmp_path):
    from transformers import Trainer, TrainingArguments
    model = cps_llama(repartition_every=4, statistics_steps=2)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 90, (24, 9))]
    callback = sl.CPSLoRACallback()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4,
                             learning_rate=1e-3, report_to=[], logging_steps=1, save_strategy="no",
                             use_cpu=True)
    Trainer(model=model, args=args, train_dataset=data, callbacks=[callback]).train()
    counts = [int(layer.repartition_count) for _, layer in sl.cps_layers(model)]
    assert counts == [2] * len(counts)  # after steps 2 and 6
    assert all(layer.last_repartition is not None for _, layer in sl.cps_layers(model))
