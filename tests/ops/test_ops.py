"""The torch.ops.soslora operators: opcheck, values and gradients against the oracle, errors."""
import pytest
import torch
from torch.library import opcheck

import soslora_ext as sl
from soslora_ext.ops import reference

from conftest import rel_err

_ops = torch.ops.soslora
F64 = torch.float64


def lowrank_inputs(N, n_in, n_out, r, *, per_channel, dtype=F64, device="cpu", base=True,
                   p=0.0, requires_grad=False):
    g = dict(dtype=dtype, device=device)
    x = torch.randn(N, n_in, **g)
    A = torch.randn(r, n_in, **g)
    B = torch.randn(n_out, r, **g)
    scale = (torch.rand(n_out, r, **g) if per_channel else torch.rand(r, **g)) + 0.5
    base_out = torch.randn(N, n_out, **g) if base else None
    seed = torch.tensor([123456789, 42], device=device) if p > 0 else None
    tensors = [x, A, B, scale, base_out]
    if requires_grad:
        for t in tensors:
            if t is not None:
                t.requires_grad_(True)
    return x, A, B, scale, base_out, seed


def oracle_lowrank(x, A, B, scale, base_out, seed, p, on_input):
    """Dense formula: base_out + drop-path(x) A^T (B * scale)^T."""
    if on_input:
        h = reference.dropout(x, seed, p) @ A.T
    else:
        h = reference.dropout(x @ A.T, seed, p)
    out = h @ (B * scale).T
    return out if base_out is None else base_out + out


LOWRANK_CASES = [
    # N, in, out, r, per_channel, base_out, p, on_input
    (1, 5, 3, 2, False, False, 0.0, False),
    (7, 13, 9, 6, True, True, 0.0, False),
    (11, 6, 10, 9, False, True, 0.3, False),  # r > in
    (8, 17, 5, 4, True, False, 0.25, True),
    (3, 4, 4, 1, True, True, 0.5, True),
]


@pytest.mark.parametrize("case", LOWRANK_CASES)
def test_lowrank_value_and_gradcheck(case):
    N, n_in, n_out, r, per_channel, base, p, on_input = case
    inputs = lowrank_inputs(N, n_in, n_out, r, per_channel=per_channel, base=base, p=p,
                            requires_grad=True)
    x, A, B, scale, base_out, seed = inputs
    out = sl.ops.lowrank(x, A, B, scale, base_out, seed, p, on_input)
    assert rel_err(out, oracle_lowrank(*inputs, p, on_input)) < 1e-12
    diff = [t for t in (x, A, B, scale, base_out) if t is not None]

    def fn(*ts):
        it = iter(ts)
        args = [next(it) if t is not None else None for t in (x, A, B, scale, base_out)]
        return sl.ops.lowrank(*args, seed, p, on_input)

    assert torch.autograd.gradcheck(fn, diff)


@pytest.mark.parametrize("case", LOWRANK_CASES)
def test_lowrank_double_backward_gradgradcheck(case):
    N, n_in, n_out, r, per_channel, base, p, on_input = case
    x, A, B, scale, base_out, seed = lowrank_inputs(N, n_in, n_out, r, per_channel=per_channel,
                                                    base=base, p=p, requires_grad=True)
    fn = lambda x, A, B, scale: sl.ops.lowrank(x, A, B, scale, base_out, seed, p, on_input)  # noqa: E731
    assert torch.autograd.gradgradcheck(fn, (x, A, B, scale))


@pytest.mark.parametrize("case", LOWRANK_CASES)
def test_lowrank_gradients_match_oracle(case):
    N, n_in, n_out, r, per_channel, base, p, on_input = case
    inputs = lowrank_inputs(N, n_in, n_out, r, per_channel=per_channel, base=base, p=p,
                            requires_grad=True)
    grad = torch.randn(N, n_out, dtype=F64)
    diff = [t for t in inputs[:5] if t is not None]
    got = torch.autograd.grad(sl.ops.lowrank(*inputs, p, on_input), diff, grad)
    want = torch.autograd.grad(oracle_lowrank(*inputs, p, on_input), diff, grad)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-12


@pytest.mark.parametrize("case", LOWRANK_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, F64])
def test_opcheck_lowrank_ops(case, dtype):
    N, n_in, n_out, r, per_channel, base, p, on_input = case
    x, A, B, scale, base_out, seed = lowrank_inputs(
        N, n_in, n_out, r, per_channel=per_channel, dtype=dtype, base=base, p=p,
        requires_grad=dtype != torch.bfloat16)
    opcheck(_ops.lowrank_forward, (x, A, B, scale, base_out, seed, p, on_input))
    # The backward pieces are differentiable too (double backward).
    need_grad = dtype != torch.bfloat16
    grad_out = torch.randn(N, n_out, dtype=dtype, requires_grad=need_grad)
    with torch.no_grad():
        _, hidden = _ops.lowrank_forward(x, A, B, scale, base_out, seed, p, on_input)
    hidden.requires_grad_(need_grad)
    grad_hidden = torch.randn(N, r, dtype=dtype, requires_grad=need_grad)
    grad_x_base = torch.randn(N, n_in, dtype=dtype, requires_grad=need_grad)
    opcheck(_ops.lowrank_grad_hidden, (grad_out, B, scale, hidden, seed, p, on_input))
    opcheck(_ops.lowrank_grad_A, (grad_hidden, x, seed, p, on_input))
    opcheck(_ops.lowrank_grad_x, (grad_hidden, A, grad_x_base, seed, p, on_input))
    opcheck(_ops.lowrank_grad_x, (grad_hidden, A, None, seed, p, on_input))
    if seed is not None:
        opcheck(_ops.dropout_mask, (seed, [N, n_in], p, dtype))


def linear_inputs(case, *, dtype=F64, requires_grad=True, bias=True):
    """(x, weight, bias, A, B, scale, seed) for a linear_lowrank case; weight and bias too
    require grad, so that their gradients are checked as well."""
    N, n_in, n_out, r, per_channel, _, p, _ = case
    x, A, B, scale, _, seed = lowrank_inputs(N, n_in, n_out, r, per_channel=per_channel,
                                             dtype=dtype, base=False, p=p,
                                             requires_grad=requires_grad)
    weight = torch.randn(n_out, n_in, dtype=dtype, requires_grad=requires_grad)
    b = torch.randn(n_out, dtype=dtype, requires_grad=requires_grad) if bias else None
    return x, weight, b, A, B, scale, seed


def oracle_linear_lowrank(x, weight, bias, A, B, scale, seed, p, on_input):
    return torch.nn.functional.linear(x, weight, bias) + oracle_lowrank(
        x, A, B, scale, None, seed, p, on_input)


@pytest.mark.parametrize("case", LOWRANK_CASES)
@pytest.mark.parametrize("bias", [True, False])
def test_linear_lowrank_matches_oracle_values_and_gradients(case, bias):
    p, on_input = case[6], case[7]
    inputs = linear_inputs(case, bias=bias)
    diff = [t for t in inputs[:6] if t is not None]
    out = sl.ops.linear_lowrank(*inputs, p, on_input)
    want = oracle_linear_lowrank(*inputs, p, on_input)
    assert rel_err(out, want) < 1e-12
    grad = torch.randn_like(want)
    got_grads = torch.autograd.grad(out, diff, grad)
    want_grads = torch.autograd.grad(want, diff, grad)
    for g, w in zip(got_grads, want_grads):
        assert rel_err(g, w) < 1e-12


@pytest.mark.parametrize("case", LOWRANK_CASES[1::2])
def test_linear_lowrank_gradcheck_and_double_backward(case):
    p, on_input = case[6], case[7]
    x, weight, bias, A, B, scale, seed = linear_inputs(case)
    fn = lambda *ts: sl.ops.linear_lowrank(*ts, seed, p, on_input)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, weight, bias, A, B, scale))
    assert torch.autograd.gradgradcheck(fn, (x, weight, bias, A, B, scale))


@pytest.mark.parametrize("case", LOWRANK_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_linear_lowrank_ops(case, dtype):
    N, n_in, n_out, r, _, _, p, on_input = case
    need_grad = dtype != torch.bfloat16
    x, weight, bias, A, B, scale, seed = linear_inputs(case, dtype=dtype,
                                                       requires_grad=need_grad)
    opcheck(_ops.linear_lowrank_forward, (x, weight, bias, A, B, scale, seed, p, on_input))
    opcheck(_ops.linear_lowrank_forward, (x, weight, None, A, B, scale, seed, p, on_input))
    grad_out = torch.randn(N, n_out, dtype=dtype, requires_grad=need_grad)
    grad_hidden = torch.randn(N, r, dtype=dtype, requires_grad=need_grad)
    opcheck(_ops.linear_lowrank_grad_x, (grad_out, weight, grad_hidden, A, seed, p, on_input))


@pytest.mark.parametrize("call,message", [
    (lambda: _ops.linear_lowrank_forward(torch.randn(3, 4), torch.randn(6, 5), None,
                                         torch.randn(2, 4), torch.randn(6, 2), torch.ones(2),
                                         None, 0.0, False), "weight must be"),
    (lambda: _ops.linear_lowrank_forward(torch.randn(3, 4), torch.randn(6, 4), torch.randn(5),
                                         torch.randn(2, 4), torch.randn(6, 2), torch.ones(2),
                                         None, 0.0, False), "bias must be"),
    (lambda: _ops.linear_lowrank_forward(torch.randn(3, 4), torch.randn(7, 4), None,
                                         torch.randn(2, 4), torch.randn(6, 2), torch.ones(2),
                                         None, 0.0, False), "B must be .* out = weight"),
    (lambda: _ops.linear_lowrank_forward(torch.randn(3, 4), torch.randn(6, 4, dtype=F64), None,
                                         torch.randn(2, 4), torch.randn(6, 2), torch.ones(2),
                                         None, 0.0, False), "x and weight must have the same"),
    (lambda: _ops.linear_lowrank_grad_x(torch.randn(3, 6), torch.randn(6, 4),
                                        torch.randn(3, 2), torch.randn(2, 5), None, 0.0, False),
     "expected grad_out"),
])
def test_linear_lowrank_rejects_bad_input(call, message):
    with pytest.raises(RuntimeError, match=message):
        call()


def test_grad_x_accumulates_into_base_gradient():
    grad_hidden, A = torch.randn(5, 3, dtype=F64), torch.randn(3, 8, dtype=F64)
    base = torch.randn(5, 8, dtype=F64)
    got = _ops.lowrank_grad_x(grad_hidden, A, base, None, 0.0, False)
    assert rel_err(got, base + grad_hidden @ A) < 1e-14


@pytest.mark.parametrize("dtype", [torch.float32, F64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_base", [True, False])
def test_input_dropout_grad_x_adds_the_dropped_product_in_one_pass(dtype, with_base):
    # The CPU adds D_in(grad_hidden A) into the base gradient in one pass: bit-identical to
    # adding the separately dropped product (the form every other device uses), -0 included.
    N, n_in, r, p = 37, 1029, 5, 0.3  # several threads' and Philox runs' worth of elements
    seed = torch.tensor([987654321, 7])
    grad_hidden, A = torch.randn(N, r, dtype=dtype), torch.randn(r, n_in, dtype=dtype)
    base = torch.randn(N, n_in, dtype=dtype)
    base[0] = -0.0
    product = grad_hidden @ A
    mask = _ops.dropout_mask(seed, product.shape, p, dtype)
    dropped = torch.where(mask != 0, product * mask, product.new_zeros(()))  # dropped: +0
    if with_base:
        got = _ops.lowrank_grad_x(grad_hidden, A, base, seed, p, True)
        expected = base.clone().add_(dropped)
    else:
        got = _ops.lowrank_grad_x(grad_hidden, A, None, seed, p, True)
        expected = dropped
    assert torch.equal(got, expected)
    assert torch.equal(torch.signbit(got), torch.signbit(expected))
    weight = torch.randn(11, n_in, dtype=dtype)
    grad_out = torch.randn(N, 11, dtype=dtype)
    got = _ops.linear_lowrank_grad_x(grad_out, weight, grad_hidden, A, seed, p, True)
    assert torch.equal(got, (grad_out @ weight).add_(dropped))


@pytest.mark.parametrize("dtype", [torch.float32, F64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_input_dropout_grads_equal_the_separate_ops_bitwise(dtype, p):
    # One mask draw for both input-side gradients: the same bits as the two ops that each
    # draw it (the form double backward uses); odd sizes cross Philox blocks and thread runs.
    N, n_in, r = 29, 1031, 3
    seed = torch.tensor([-0x1234_5678_9ABC_DEF0, 0x1_0000_0003])
    x, A = torch.randn(N, n_in, dtype=dtype), torch.randn(r, n_in, dtype=dtype)
    grad_hidden, base = torch.randn(N, r, dtype=dtype), torch.randn(N, n_in, dtype=dtype)
    base[1] = -0.0
    grad_x = base.clone()
    grad_A = _ops.input_dropout_grads_(grad_x, grad_hidden, A, x, seed, p)
    assert torch.equal(grad_A, _ops.lowrank_grad_A(grad_hidden, x, seed, p, True))
    expected = _ops.lowrank_grad_x(grad_hidden, A, base, seed, p, True)
    assert torch.equal(grad_x, expected)
    assert torch.equal(torch.signbit(grad_x), torch.signbit(expected))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_input_dropout_grads(dtype):
    seed = torch.tensor([5, 6])
    args = (torch.randn(7, 13, dtype=dtype), torch.randn(7, 3, dtype=dtype),
            torch.randn(3, 13, dtype=dtype), torch.randn(7, 13, dtype=dtype), seed, 0.25)
    opcheck(_ops.input_dropout_grads_, args)


@pytest.mark.parametrize("args,message", [
    ((torch.randn(3, 5), torch.randn(3, 2), torch.randn(2, 5), torch.randn(3, 4)),
     "expected grad_x"),
    ((torch.randn(3, 5), torch.randn(3, 2), torch.randn(3, 5), torch.randn(3, 5)),
     "expected grad_x"),
    ((torch.randn(3, 5, dtype=F64), torch.randn(3, 2), torch.randn(2, 5), torch.randn(3, 5)),
     "grad_x and x must have the same dtype"),
])
def test_input_dropout_grads_rejects_bad_input_without_writing(args, message):
    grad_x = args[0]
    before = grad_x.clone()
    with pytest.raises(RuntimeError, match=message):
        _ops.input_dropout_grads_(*args, torch.tensor([1, 2]), 0.5)
    assert torch.equal(grad_x, before)


@pytest.mark.parametrize("K,r,n_in", [(1, 4, 9), (2, 3, 10), (3, 5, 7), (4, 2, 16), (8, 3, 13)])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_ortho_penalty_value_grad_opcheck(K, r, n_in, dtype):
    A = torch.randn(K * r, n_in, dtype=dtype, requires_grad=True)
    got = sl.ops.ortho_penalty(A, K)
    A64 = A.detach().double().requires_grad_(True)
    want = reference.ortho_penalty(list(A64.split(r)))
    assert got.dtype == (F64 if dtype == F64 else torch.float32)
    assert abs(got.item() - want.item()) <= 1e-5 * max(abs(want.item()), 1e-8)
    (g,) = torch.autograd.grad(got, A)
    (w,) = torch.autograd.grad(want, A64) if K > 1 else (torch.zeros_like(A64),)
    assert rel_err(g, w) < (1e-10 if dtype == F64 else 1e-5)
    opcheck(_ops.ortho_penalty, (A, K))
    weight = torch.rand((), dtype=torch.float32)
    opcheck(_ops.ortho_penalty_grad_, (torch.randn_like(A.detach()), A.detach(), weight, K))


def test_ortho_penalty_grad_adds_in_place_with_device_weight():
    K, r = 3, 4
    A = torch.randn(K * r, 11, dtype=F64)
    grad = torch.randn_like(A)
    before = grad.clone()
    lam = torch.tensor(0.37, dtype=F64)
    sl.ops.add_ortho_penalty_grad_(grad, A, lam, K)
    A64 = A.clone().requires_grad_(True)
    (w,) = torch.autograd.grad(reference.ortho_penalty(list(A64.split(r))), A64)
    assert rel_err(grad, before + 0.37 * w) < 1e-12


def test_ortho_penalty_grad_with_zero_weight_leaves_grad_untouched():
    """λ = 0 (a schedule's warm-up) skips the work: even a non-finite A cannot reach grad."""
    A = torch.randn(8, 5, dtype=F64)
    A[2, 3] = float("inf")
    grad = torch.randn_like(A)
    before = grad.clone()
    sl.ops.add_ortho_penalty_grad_(grad, A, torch.tensor(0.0), 4)
    assert torch.equal(grad, before)


def test_in_place_ops_record_no_graph_and_penalty_refuses_double_backward():
    A = torch.randn(4, 6, dtype=F64, requires_grad=True)
    W = torch.randn(5, 6, dtype=F64)
    sl.ops.merge_into_(W, A, torch.randn(5, 4, dtype=F64), torch.ones(4, dtype=F64))
    assert W.grad_fn is None and not W.requires_grad
    g = torch.zeros(4, 6, dtype=F64)
    sl.ops.add_ortho_penalty_grad_(g, A, torch.tensor(1.0), 2)
    assert g.grad_fn is None
    (grad,) = torch.autograd.grad(sl.ops.ortho_penalty(A, 2), A, create_graph=False)
    with pytest.raises(NotImplementedError, match="double backward"):
        torch.autograd.grad(sl.ops.ortho_penalty(A, 2), A, create_graph=True)


def test_ortho_penalty_gradcheck_and_zero_rows():
    A = torch.randn(6, 5, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: sl.ops.ortho_penalty(a, 3), (A,))
    Z = torch.zeros(6, 5, dtype=F64, requires_grad=True)  # F.normalize's eps branch
    (g,) = torch.autograd.grad(sl.ops.ortho_penalty(Z, 2), Z)
    assert torch.isfinite(g).all()


@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16, torch.float16, F64])
@pytest.mark.parametrize("per_channel", [False, True])
def test_merge_into_matches_oracle_and_rounds_once(w_dtype, per_channel):
    n_out, n_in, r = 37, 29, 6
    W = torch.randn(n_out, n_in).to(w_dtype)
    A, B = torch.randn(r, n_in), torch.randn(n_out, r)
    scale = torch.rand(n_out, r) + 0.5 if per_channel else torch.rand(r) + 0.5
    expected = (W.double() + (B.double() * scale.double()) @ A.double()).to(w_dtype)
    got = W.clone()
    sl.ops.merge_into_(got, A, B, scale, 1.0)
    if w_dtype in (torch.bfloat16, torch.float16):
        # float32 accumulation then one rounding: within one unit in the last place of float64's.
        ulp = (expected.double().abs() * torch.finfo(w_dtype).eps).clamp_min(1e-30)
        assert ((got.double() - expected.double()).abs() <= ulp).all()
    else:
        assert rel_err(got, expected) < (1e-6 if w_dtype == torch.float32 else 1e-14)
    sl.ops.merge_into_(got, A, B, scale, -1.0)
    assert rel_err(got, W) < (1e-2 if w_dtype in (torch.bfloat16, torch.float16) else 1e-5)
    opcheck(_ops.merge_into_, (W.clone(), A, B, scale, 0.5))


def test_merge_into_large_weight_in_bands():
    # More rows than one accumulation band (2**20 elements) so the band loop runs several times.
    W = torch.randn(700, 3000).to(torch.bfloat16)
    A, B, scale = torch.randn(4, 3000), torch.randn(700, 4), torch.rand(4)
    got = W.clone()
    sl.ops.merge_into_(got, A, B, scale, 1.0)
    expected = (W.double() + (B.double() * scale.double()) @ A.double()).to(torch.bfloat16)
    assert rel_err(got, expected) < 4e-3


@pytest.mark.parametrize("call,message", [
    (lambda: _ops.lowrank_forward(torch.randn(3, 4), torch.randn(2, 5), torch.randn(6, 2),
                                  torch.ones(2), None, None, 0.0, False), "A must be"),
    (lambda: _ops.lowrank_forward(torch.randn(3, 4), torch.randn(2, 4), torch.randn(6, 3),
                                  torch.ones(2), None, None, 0.0, False), "B must be"),
    (lambda: _ops.lowrank_forward(torch.randn(3, 4), torch.randn(2, 4), torch.randn(6, 2),
                                  torch.ones(3), None, None, 0.0, False), "scale must be"),
    (lambda: _ops.lowrank_forward(torch.randn(3, 4), torch.randn(2, 4, dtype=F64),
                                  torch.randn(6, 2), torch.ones(2), None, None, 0.0, False),
     "same dtype"),
    (lambda: _ops.lowrank_forward(torch.randn(3, 4), torch.randn(2, 4), torch.randn(6, 2),
                                  torch.ones(2), torch.randn(3, 5), None, 0.0, False),
     "base_out must be"),
    (lambda: _ops.lowrank_forward(torch.randn(3, 4), torch.randn(2, 4), torch.randn(6, 2),
                                  torch.ones(2), None, None, 0.5, False),
     "dropout_seed is required"),
    (lambda: _ops.lowrank_forward(torch.randn(3, 4), torch.randn(2, 4), torch.randn(6, 2),
                                  torch.ones(2), None, torch.tensor([1.0, 2.0]), 0.5, False),
     "dropout_seed must be an int64"),
    (lambda: _ops.lowrank_forward(torch.randn(3, 4), torch.randn(2, 4), torch.randn(6, 2),
                                  torch.ones(2), None, None, 1.0, False), "dropout_p must be"),
    (lambda: _ops.ortho_penalty(torch.randn(5, 4), 2), "divisible by num_experts"),
    (lambda: _ops.ortho_penalty(torch.randn(4, 4), 0), "num_experts must be"),
    (lambda: _ops.merge_into_(torch.randn(6, 4), torch.randn(2, 5), torch.randn(6, 2),
                              torch.ones(2), 1.0), "shapes do not chain"),
    (lambda: _ops.merge_into_(torch.randn(6, 4), torch.randn(2, 4), torch.randn(6, 2),
                              torch.ones(6, 3), 1.0), "scale must be"),
    (lambda: _ops.merge_into_(torch.randn(1, 4).expand(6, 4), torch.randn(2, 4),
                              torch.randn(6, 2), torch.ones(2), 1.0), "share memory"),
])
def test_ops_reject_bad_input(call, message):
    with pytest.raises(RuntimeError, match=message):
        call()


def test_merge_rejects_bad_input_without_writing():
    W = torch.randn(6, 4)
    before = W.clone()
    with pytest.raises(RuntimeError):
        _ops.merge_into_(W, torch.randn(2, 4), torch.randn(6, 2), torch.ones(5), 1.0)
    assert torch.equal(W, before)
