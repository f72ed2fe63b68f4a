"""soslora::adapted_linear, the one autograd node of an adapted layer's step: every form against
the float64 oracle (values and every gradient), its CPU loops against their ATen forms, double
backward, opcheck, torch.compile without graph breaks, and the step's ATen-op budget."""
import pathlib
import sys

import pytest
import torch
import torch.nn as nn
from torch.library import opcheck

import soslora_ext as sl
from soslora_ext import ops
from soslora_ext.layers.partition import labels_to_index
from soslora_ext.ops import reference

from conftest import rel_err

ROOT = pathlib.Path(__file__).resolve().parents[2]
F64 = torch.float64
_ops = torch.ops.soslora


def random_blocks(out_features, in_features, ranks, empty=()):
    """CPS-LoRA's partition: random rows and columns per cluster; clusters in `empty` get none."""
    live = [c for c in range(len(ranks)) if c not in empty]
    rows, cols = (torch.tensor(live)[torch.randint(len(live), (n,))]
                  for n in (out_features, in_features))
    row_index, row_offsets = labels_to_index(rows, len(ranks))
    col_index, col_offsets = labels_to_index(cols, len(ranks))
    return row_index, col_index, row_offsets, col_offsets, list(ranks)


def per_rank(scale, r):
    """A scale of groups of ranks ([G] or [G, out]) as one per rank: [r] or [out, r]."""
    s = scale.double()
    return (s if s.dim() == 1 else s.t()).repeat_interleave(r // scale.shape[0], dim=-1)


def oracle_delta(A, B, scale, blocks):
    """The dense update (B * scale) A in float64: groups of ranks, or the cluster blocks."""
    A, B = A.double(), B.double()
    if blocks is None:
        return (B * per_rank(scale, A.shape[0])) @ A
    row_index, col_index, row_offsets, col_offsets, ranks = blocks
    G = len(ranks)
    return reference.cps_delta_weight(
        B.shape[0], A.shape[1], [row_index[row_offsets[c]:row_offsets[c + 1]] for c in range(G)],
        [col_index[col_offsets[c]:col_offsets[c + 1]] for c in range(G)],
        [A[:ranks[c], col_offsets[c]:col_offsets[c + 1]] for c in range(G)],
        [B[row_offsets[c]:row_offsets[c + 1], :ranks[c]] for c in range(G)],
        scale.double().tolist())


def oracle(x, A, B, scale, weight, bias, base_out, blocks, p, on_input, seed):
    """The step in float64 by the reference formulas (post-dropout masks x A^T's plain rank
    order, as the op does for plain factors)."""
    x = x.double()
    if p > 0 and not on_input:
        hidden = reference.dropout(x @ A.double().T, seed, p)
        update = hidden @ (B.double() * per_rank(scale, A.shape[0])).T
    else:
        update = reference.dropout(x, seed, p) @ oracle_delta(A, B, scale, blocks).T
    if weight is not None:
        update = update + x @ weight.double().T + (0 if bias is None else bias.double())
    return update + (0 if base_out is None else base_out.double())


def make_inputs(n, n_in, n_out, r, scale_shape, dtype, factor_dtype, base, blocks=None):
    x = torch.randn(n, n_in, dtype=dtype, requires_grad=True)
    r_max = max(blocks[4]) if blocks else r
    A = torch.randn(r_max, n_in, dtype=factor_dtype, requires_grad=True)
    B = torch.randn(n_out, r_max, dtype=factor_dtype, requires_grad=True)
    acc = ops.accumulate_dtype(factor_dtype)
    scale = (torch.rand(scale_shape, dtype=acc) + 0.5).requires_grad_(blocks is None)
    weight = bias = base_out = None
    if base in ("weight", "weight+bias"):
        weight = torch.randn(n_out, n_in, dtype=dtype, requires_grad=True)
        if base == "weight+bias":
            bias = torch.randn(n_out, dtype=dtype, requires_grad=True)
    elif base == "base_out":
        base_out = torch.randn(n, n_out, dtype=dtype, requires_grad=True)
    return x, A, B, scale, weight, bias, base_out


def check_against_oracle(inputs, blocks, p, on_input, tol, dense_blocks=True, lam=None, K=1,
                         multiplier=1.0):
    x, A, B, scale, weight, bias, base_out = inputs
    torch.manual_seed(3)
    seed = ops.new_dropout_seed(x.device) if p > 0 else None
    torch.manual_seed(3)  # the op draws the same seed
    out = ops.adapted_linear(x, A, B, scale, weight=weight, bias=bias, base_out=base_out,
                             blocks=blocks, dense_blocks=dense_blocks, dropout_p=p,
                             dropout_on_input=on_input, ortho_lambda=lam, num_experts=K,
                             grad_A_multiplier=multiplier)
    assert out.dtype == x.dtype
    want = oracle(*(t.detach().requires_grad_(t.requires_grad) if t is not None else None
                    for t in inputs[:7]), blocks, p, on_input, seed)
    assert rel_err(out, want) < tol
    grad = torch.randn_like(out)
    diff = [t for t in inputs if t is not None and t.requires_grad]
    got = torch.autograd.grad(out, diff, grad)
    ref_inputs = [t.detach().double().requires_grad_(t.requires_grad) if t is not None else None
                  for t in inputs]
    ref_out = oracle(*ref_inputs, blocks, p, on_input, seed)
    ref_diff = [t for t in ref_inputs if t is not None and t.requires_grad]
    want_grads = torch.autograd.grad(ref_out, ref_diff, grad.double())
    extra = None
    if lam is not None and K > 1:  # grad_A + lam * d penalty / dA, then times the multiplier
        A64 = A.detach().double().requires_grad_()
        (extra,) = torch.autograd.grad(reference.ortho_penalty(list(A64.chunk(K))), A64)
    for t, g, w in zip([t for t in inputs if t is not None and t.requires_grad], got, want_grads):
        assert g.dtype == t.dtype and g.shape == t.shape
        if t is A:
            w = (w + (float(lam) * extra if extra is not None else 0)) * multiplier
        assert rel_err(g, w) < tol, (tuple(t.shape), rel_err(g, w))
    return got


# ---- every form against the oracle -----------------------------------------------------------
@pytest.mark.parametrize("base", ["weight+bias", "weight", "base_out", "none"])
@pytest.mark.parametrize("scale_shape", [(2,), (2, 11), (6,), (6, 11)],
                         ids=["per-expert", "per-channel-expert", "per-rank", "per-channel-rank"])
@pytest.mark.parametrize("p,on_input", [(0.0, False), (0.3, False), (0.3, True)],
                         ids=["no-drop", "post", "pre"])
def test_plain_factors_match_oracle(base, scale_shape, p, on_input):
    inputs = make_inputs(7, 13, 11, 6, scale_shape, F64, F64, base)
    check_against_oracle(inputs, None, p, on_input, 1e-12)


@pytest.mark.parametrize("dtype,factor_dtype,tol", [
    (torch.float32, torch.float32, 1e-5), (torch.bfloat16, torch.float32, 2e-2),
    (torch.float16, torch.float32, 2e-2), (torch.bfloat16, torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("base", ["weight+bias", "base_out"])
def test_low_precision_and_mixed_factor_dtypes(dtype, factor_dtype, tol, base):
    # Factors of another dtype than x (float32 adapters on a bf16 base): gradients in theirs.
    inputs = make_inputs(33, 40, 24, 8, (4, 24), dtype, factor_dtype, base)
    check_against_oracle(inputs, None, 0.2, False, tol)


@pytest.mark.parametrize("lam", [0.0, 0.7])
@pytest.mark.parametrize("multiplier", [1.0, 0.25])
def test_orthogonality_term_and_loraplus_in_grad_A(lam, multiplier):
    inputs = make_inputs(9, 17, 10, 8, (4,), F64, F64, "weight+bias")
    check_against_oracle(inputs, None, 0.2, True, 1e-12, lam=torch.tensor(lam, dtype=F64), K=4,
                         multiplier=multiplier)


@pytest.mark.parametrize("channel", [False, True])
@pytest.mark.parametrize("p,on_input", [(0.0, False), (0.3, False), (0.3, True)])
def test_gate_prior_and_anchor(channel, p, on_input):
    # The gated scale K softmax(l / T) * scale, with the recipe's terms in the gradients:
    # uniform_prior (p - 1/K) / T on the logits, scale_anchor (scale - anchor) on the scales.
    K, out, prior, anchor = 3, 10, 0.3, 0.2
    x, A, B, scale, weight, bias, _ = make_inputs(6, 9, out, 6, (K, out) if channel else (K,),
                                                  F64, F64, "weight+bias")
    scale.requires_grad_(channel)
    logits = torch.randn(K, dtype=F64, requires_grad=True)
    T, fixed = torch.tensor(1.7, dtype=F64), torch.rand(K, dtype=F64) + 0.5
    terms = dict(gate_logits=logits, gate_temperature=T, uniform_prior=prior)
    if channel:
        terms.update(anchor_scales=fixed, scale_anchor=anchor)
    torch.manual_seed(5)
    seed = ops.new_dropout_seed(x.device) if p else None
    torch.manual_seed(5)
    out_ = ops.adapted_linear(x, A, B, scale, weight=weight, bias=bias, dropout_p=p,
                              dropout_on_input=on_input, **terms)
    gate = reference.gate(logits, T)
    eff = scale * (gate if not channel else gate[:, None])
    want = oracle(x, A, B, eff, weight, bias, None, None, p, on_input, seed)
    assert rel_err(out_, want) < 1e-12
    diff = [x, A, B, logits] + ([scale] if channel else [])
    grad = torch.randn_like(out_)
    got = torch.autograd.grad(out_, diff, grad)
    wanted = list(torch.autograd.grad(want, diff, grad))
    probs = torch.softmax(logits.detach() / T, 0)
    wanted[3] = wanted[3] + prior * (probs - 1 / K) / T
    if channel:
        wanted[4] = wanted[4] + anchor * (scale.detach() - fixed[:, None])
    for g, w in zip(got, wanted):
        assert rel_err(g, w) < 1e-12


@pytest.mark.parametrize("dense_blocks", [True, False], ids=["dense", "cluster-op"])
@pytest.mark.parametrize("base", ["weight+bias", "base_out", "none"])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("ranks,empty", [((2, 3, 1), ()), ((3, 0, 2, 2), (1,)), ((4, 4), ())])
def test_cluster_blocks_match_oracle(dense_blocks, base, p, ranks, empty):
    torch.manual_seed(len(ranks))
    blocks = random_blocks(19, 23, ranks, empty)
    inputs = make_inputs(6, 23, 19, None, (len(ranks),), F64, F64, base, blocks)
    got = check_against_oracle(inputs, blocks, p, True, 1e-12, dense_blocks=dense_blocks)
    # Rank slots a cluster does not use get zero gradient.
    row_offsets, col_offsets = blocks[2:4]
    grad_A, grad_B = got[1:3]  # after x's
    for c, r in enumerate(ranks):
        assert not grad_A[r:, col_offsets[c]:col_offsets[c + 1]].any()
        assert not grad_B[row_offsets[c]:row_offsets[c + 1], r:].any()


@pytest.mark.parametrize("dense_blocks", [True, False])
def test_each_form_runs_its_own_ops(dense_blocks):
    from helpers import OpLog
    blocks = random_blocks(9, 8, (2, 3))
    x, A, B, scale, weight, bias, _ = make_inputs(4, 8, 9, None, (2,), F64, F64, "weight+bias",
                                                  blocks)
    with OpLog() as log:
        out = ops.adapted_linear(x, A, B, scale, weight=weight, bias=bias, blocks=blocks,
                                 dense_blocks=dense_blocks, dropout_p=0.1, dropout_on_input=True)
        out.sum().backward()
    dense_ops = {"soslora.adapted_linear_forward", "soslora.adapted_linear_backward"}
    cluster_ops = {"soslora.cluster_lowrank_forward", "soslora.cluster_lowrank_backward"}
    assert log.names >= (dense_ops if dense_blocks else cluster_ops)
    assert not log.names & (cluster_ops if dense_blocks else dense_ops)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cluster_blocks_low_precision(dtype):
    blocks = random_blocks(30, 28, (4, 3, 5))
    inputs = make_inputs(16, 28, 30, None, (3,), dtype, torch.float32, "weight+bias", blocks)
    check_against_oracle(inputs, blocks, 0.1, True, 1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("bad,match", [(lambda i: i.clone().fill_(0), "repeated"),
                                       (lambda i: i + 1, "out of range"),
                                       (lambda i: -i - 1, "out of range")])
@pytest.mark.parametrize("dense_blocks", [True, False])
def test_bad_partition_index_is_refused_by_name(bad, match, dense_blocks):
    blocks = list(random_blocks(7, 9, (2, 3)))
    x, A, B, scale, weight, bias, _ = make_inputs(4, 9, 7, None, (2,), F64, F64, "weight+bias",
                                                  blocks)
    for which, name in ((0, "row_index"), (1, "col_index")):
        broken = list(blocks)
        broken[which] = bad(blocks[which])
        with pytest.raises(RuntimeError, match=f"{name} must be a permutation.*{match}"):
            ops.adapted_linear(x, A, B, scale, weight=weight, bias=bias, blocks=broken,
                               dense_blocks=dense_blocks)


def _bad_calls():
    x, A, B = torch.randn(4, 9), torch.randn(6, 9), torch.randn(7, 6)
    W, s2, s = torch.randn(7, 9), torch.rand(2, 7), torch.rand(2)
    logits, T = torch.randn(2), torch.tensor(1.0)
    blocks = random_blocks(7, 9, (3, 3))
    return [
        (dict(x=x, A=A, B=B, scale=torch.rand(())), "scale must be"),
        (dict(x=x, A=A, B=B, scale=torch.rand(4)), "scale must be"),  # 4 does not divide 6
        (dict(x=x, A=A, B=B, scale=torch.rand(2, 5)), "scale must be"),
        (dict(x=x, A=torch.randn(6, 8), B=B, scale=s), "A must be"),
        (dict(x=x, A=A, B=torch.randn(7, 5), scale=s), "B must be"),
        (dict(x=x, A=A, B=B, scale=s, weight=torch.randn(7, 8)), "weight must be"),
        (dict(x=x, A=A, B=B, scale=s, weight=W, base_out=torch.randn(4, 7)), "not both"),
        (dict(x=x, A=A, B=B, scale=s, bias=torch.randn(7)), "bias needs weight"),
        (dict(x=x, A=A, B=B, scale=s, weight=W.double()), "same dtype"),
        (dict(x=x, A=A, B=B, scale=s, base_out=torch.randn(4, 8)), "base_out must be"),
        (dict(x=x, A=A, B=B, scale=s, gate_logits=logits), "come together"),
        (dict(x=x, A=A, B=B, scale=s, gate_logits=torch.randn(3), gate_temperature=T),
         "gate_logits must be"),
        (dict(x=x, A=A, B=B, scale=s, gate_logits=logits, gate_temperature=torch.ones(2)),
         "gate_temperature must be 0-d or have one element"),
        (dict(x=x, A=A, B=B, scale=s, anchor_scales=torch.rand(2), scale_anchor=0.1),
         "anchor_scales must be"),
        (dict(x=x, A=A, B=B, scale=s2, anchor_scales=torch.rand(3), scale_anchor=0.1),
         "anchor_scales must be"),
        (dict(x=x, A=torch.randn(3, 9), B=torch.randn(7, 3), scale=s, blocks=blocks,
              gate_logits=logits, gate_temperature=T), "not to cluster blocks"),
        (dict(x=x, A=A, B=B, scale=s, dropout_p=1.5), "dropout_p"),
    ]


@pytest.mark.parametrize("call,match", _bad_calls(), ids=lambda v: v if isinstance(v, str) else "")
def test_bad_arguments_are_named(call, match):
    call = dict(call)
    args = [call.pop(k) for k in ("x", "A", "B", "scale")]
    with pytest.raises((RuntimeError, ValueError), match=match):
        ops.adapted_linear(*args, **call)


# ---- the CPU loops are the ATen forms, bit for bit ----------------------------------------------
@pytest.fixture
def aten_forms():
    """Runs a block with the CPU taking the ATen forms that other devices take."""
    def run(fn):
        sl._C.set_cpu_takes_cuda_fallback(True)
        try:
            return fn()
        finally:
            sl._C.set_cpu_takes_cuda_fallback(False)
    return run


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_cpu_block_loops_equal_aten_forms(dtype, p, aten_forms):
    torch.manual_seed(1)
    blocks = random_blocks(21, 1031, (3, 0, 5, 2), empty=(1,))
    inputs = make_inputs(5, 1031, 21, None, (4,), dtype, torch.float32, "weight+bias", blocks)
    grad = torch.randn(5, 21, dtype=dtype)

    def step():
        torch.manual_seed(2)
        out = ops.adapted_linear(inputs[0], *inputs[1:4], weight=inputs[4], bias=inputs[5],
                                 blocks=blocks, dropout_p=p, dropout_on_input=True)
        return (out, *torch.autograd.grad(out, [inputs[0], inputs[1], inputs[2]], grad))

    for loop, aten in zip(step(), aten_forms(step)):
        assert torch.equal(loop, aten)


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale_shape", [(4,), (4, 21)])
def test_cpu_group_scaling_equals_aten_form(dtype, scale_shape, aten_forms):
    torch.manual_seed(3)
    inputs = make_inputs(5, 33, 21, 12, scale_shape, dtype, torch.float32, "weight+bias")
    grad = torch.randn(5, 21, dtype=dtype)

    def step():
        torch.manual_seed(2)
        out = ops.adapted_linear(inputs[0], *inputs[1:4], weight=inputs[4], bias=inputs[5],
                                 dropout_p=0.2)
        return (out, *torch.autograd.grad(out, list(inputs[:4]), grad))

    for loop, aten in zip(step(), aten_forms(step)):
        assert torch.equal(loop, aten)


@pytest.mark.parametrize("dtype,tol", [(F64, 1e-13), (torch.float32, 1e-5)])
@pytest.mark.parametrize("K,r,n_in", [(2, 3, 7), (4, 8, 64), (3, 5, 4)])
def test_cpu_penalty_loop_matches_aten_form(dtype, tol, K, r, n_in, aten_forms):
    A = torch.randn(K * r, n_in, dtype=dtype)
    A[1] = 0  # a zero row takes the eps branch
    lam = torch.tensor(0.37)
    start = torch.randn_like(A)
    loop, aten = start.clone(), start.clone()
    ops.add_ortho_penalty_grad_(loop, A, lam, K)
    aten_forms(lambda: ops.add_ortho_penalty_grad_(aten, A, lam, K))
    assert rel_err(loop, aten) < tol / 10  # the same sums, rounded into grad_A
    alone = torch.zeros_like(A)
    ops.add_ortho_penalty_grad_(alone, A, lam, K)
    A64 = A.double().requires_grad_()
    (want,) = torch.autograd.grad(reference.ortho_penalty(list(A64.chunk(K))), A64)
    assert rel_err(alone, float(lam) * want) < tol


# ---- autograd: double backward, opcheck, compile ------------------------------------------------
@pytest.mark.parametrize("blocks", [None, "blocks"])
@pytest.mark.parametrize("base", ["weight+bias", "base_out"])
@pytest.mark.parametrize("p,on_input", [(0.0, False), (0.3, False), (0.3, True)])
def test_double_backward(blocks, base, p, on_input):
    if blocks and not on_input and p > 0:
        pytest.skip("CPS-LoRA drops the input")
    torch.manual_seed(0)
    blocks = random_blocks(5, 6, (2, 1)) if blocks else None
    inputs = make_inputs(4, 6, 5, 4, (2,) if blocks else (2, 5), F64, F64, base, blocks)
    names = ("x", "A", "B", "scale", "weight", "bias", "base_out")
    given = {n: t for n, t in zip(names, inputs) if t is not None and t.requires_grad}
    seed = ops.new_dropout_seed(torch.device("cpu"))

    def fn(*ts):
        kw = {**{n: t for n, t in zip(names, inputs) if t is not None}, **dict(zip(given, ts))}
        with torch.random.fork_rng():
            torch.manual_seed(int(seed[0]) % 2**31)
            return ops.adapted_linear(kw.pop("x"), kw.pop("A"), kw.pop("B"), kw.pop("scale"),
                                      blocks=blocks, dropout_p=p, dropout_on_input=on_input, **kw)

    assert torch.autograd.gradgradcheck(fn, tuple(given.values()))


def test_cluster_op_refuses_double_backward():
    blocks = random_blocks(5, 6, (2, 1))
    x, A, B, scale, *_ = make_inputs(4, 6, 5, None, (2,), F64, F64, "none", blocks)
    out = ops.adapted_linear(x, A, B, scale, blocks=blocks, dense_blocks=False)
    with pytest.raises(NotImplementedError, match="double backward"):
        torch.autograd.grad(out.square().sum(), x, create_graph=True)


def test_opcheck():
    inputs = make_inputs(6, 9, 7, 4, (2,), F64, torch.float32, "weight+bias")
    x, A, B, scale, weight, bias, _ = inputs
    x = x.detach().float().requires_grad_()
    weight, bias = (t.detach().float() for t in (weight, bias))
    lam = torch.tensor(0.5)
    no_terms = (None, None, 0.0, None, 0.0)
    gate_terms = (torch.randn(2, requires_grad=True), torch.tensor(1.5), 0.1, torch.rand(2), 0.2)
    channel = torch.rand(2, 7, requires_grad=True)
    for args in [(x, weight, bias, None, A, B, scale, None, None, [], [], [], True, 0.0, False,
                  lam, 2, 0.5, *no_terms),
                 (x, None, None, torch.randn(6, 7), A, B, scale, None, None, [], [], [], True,
                  0.0, True, None, 1, 1.0, *no_terms),
                 (x, weight, None, None, A, B, channel, None, None, [], [], [], True, 0.0, False,
                  None, 2, 1.0, *gate_terms)]:
        opcheck(_ops.adapted_linear, args)
    blocks = random_blocks(7, 9, (2, 3))
    for dense in (True, False):
        opcheck(_ops.adapted_linear, (x, weight, bias, None, A, B, torch.rand(2), *blocks, dense,
                                      0.0, True, None, 1, 1.0, *no_terms))
    # The halves are not differentiable (the node above differentiates them).
    x, A, B, scale = (t.detach() for t in (x, A, B, scale))
    seed = ops.new_dropout_seed(x.device)
    forward_args = (x, weight, bias, None, A, B, scale, None, None, [], [], [], seed, 0.2, False)
    opcheck(_ops.adapted_linear_forward, forward_args)
    out, hidden, scaled_B = _ops.adapted_linear_forward(*forward_args)
    opcheck(_ops.adapted_linear_backward,
            (torch.randn_like(out), x, weight, A, B, scale, hidden, scaled_B, None, None, [], [],
             [], seed, 0.2, False, lam, 2, 0.5, [True, True, True, False]))
    opcheck(_ops.dropout_seed, (x,), test_utils=("test_schema", "test_faketensor"))


def test_seed_follows_torch_generator_and_differs_per_step():
    torch.manual_seed(7)
    a, b = ops.new_dropout_seed(torch.device("cpu")), ops.new_dropout_seed(torch.device("cpu"))
    torch.manual_seed(7)
    assert torch.equal(a, ops.new_dropout_seed(torch.device("cpu")))
    assert not torch.equal(a, b) and (a >= 0).all() and (a < 2**62).all()


@pytest.mark.parametrize("name", ["sos", "cps_dense", "cps_cluster"])
def test_compile_has_no_graph_breaks_and_matches_eager(name, monkeypatch):
    if name == "sos":
        layer = sl.SOSLinear(nn.Linear(24, 16), num_experts=4, rank=8, dropout=0.2)
        layer.ortho_lambda.fill_(0.01)
    else:
        if name == "cps_cluster":  # the cluster op instead of dense factors
            monkeypatch.setattr(sl.layers.cps, "DENSE_MAX_RANK", 0)
        layer = sl.CPSLinear(nn.Linear(24, 16), num_clusters=2, rank=3, dropout=0.2,
                             init_partition="random")
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 5, 24, requires_grad=True)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(layer)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    compiled = torch.compile(layer, fullgraph=True)
    results = []
    for fn in (layer, compiled):
        torch.manual_seed(4)
        y = fn(x)
        results.append((y, *torch.autograd.grad(y.square().sum(), [x, layer.lora_A, layer.lora_B])))
    for eager, comp in zip(*results):
        assert rel_err(comp, eager) < 1e-5


# ---- the host's work per step: an ATen-op budget ------------------------------------------------
def _count(module, x, grad):
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_layer import training_step
    from op_count import count_ops
    return sum(count_ops(training_step(module.train(), x, grad)).values())


def test_step_op_budget():
    # One forward + backward at the tiny step: SOSLinear (dropout on x A^T, penalty on) at most
    # plain PyTorch's count plus the penalty's 3; CPSLinear's dense form at most plain's plus 2.
    sys.path.insert(0, str(ROOT / "bench"))
    from baselines import PlainTorchSOS
    n, n_in, n_out, r, p = 8, 64, 64, 16, 0.1
    x, grad = torch.randn(n, n_in, requires_grad=True), torch.randn(n, n_out)

    def base():
        return nn.Linear(n_in, n_out, bias=False).requires_grad_(False)

    plain = _count(PlainTorchSOS(base(), 4, r, 2.0 * r, p), x, grad)
    plain_pre = _count(PlainTorchSOS(base(), 4, r, 2.0 * r, p, dropout_position="pre"), x, grad)
    sos = sl.SOSLinear(base(), num_experts=4, rank=r, dropout=p)
    sos.ortho_lambda.fill_(0.006)
    cps = sl.CPSLinear(base(), num_clusters=4, rank=r, dropout=p, init_partition="random")
    assert _count(sos, x, grad) <= plain + 3
    assert _count(cps, x, grad) <= plain_pre + 2
