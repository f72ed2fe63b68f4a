"""Property-based tests (hypothesis): SOSLinear against the float64 oracle on random layers, and
the rounding bounds of merge and of merge followed by unmerge.

Errors are measured element by element against the size of the terms that are summed: the
oracle run on |inputs| (all terms then add up without cancellation). A rounding error is
bounded by a multiple of the unit roundoff times that size, however much the terms cancel;
a wrong term, mask or scale is not."""
import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from soslora_ext.ops import accumulate_dtype, reference

from conftest import make_layer, next_dropout_seed, oracle_expert_scales, oracle_forward

F64 = torch.float64
# derandomize: the same examples on every run (CI is deterministic); no example database.
# The autouse seeding fixture runs once per test, not per example: each example seeds itself.
PROPERTY = settings(deadline=None, derandomize=True, database=None, suppress_health_check=[
    HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# (base weight dtype, adapter dtype, autocast dtype or None)
PRECISIONS = [
    (torch.float64, torch.float64, None),
    (torch.float32, torch.float32, None),
    (torch.bfloat16, torch.bfloat16, None),
    (torch.float16, torch.float16, None),
    (torch.bfloat16, torch.float32, None),  # the default for half-precision bases, as PEFT
    (torch.float16, torch.float32, None),
    (torch.float32, torch.float32, torch.bfloat16),
]


@st.composite
def layers(draw):
    """Keyword arguments for make_layer plus the input's leading shape and the run's options."""
    K = draw(st.integers(1, 6))
    rank_mode = draw(st.sampled_from(["total", "expert"]))
    r_expert = draw(st.integers(1, 5))
    return dict(
        n_in=draw(st.integers(1, 33)), n_out=draw(st.integers(1, 33)),
        lead=tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=3))),
        bias=draw(st.booleans()), precision=draw(st.sampled_from(PRECISIONS)),
        training=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)),
        cfg=dict(num_experts=K, rank=K * r_expert if rank_mode == "total" else r_expert,
                 rank_mode=rank_mode, alpha=draw(st.floats(0.5, 32.0)),
                 gamma_max=draw(st.floats(1.0, 4.0)),
                 scale_base=draw(st.sampled_from(["expert", "total"])),
                 scale_mode=draw(st.sampled_from(["fixed", "channel"])), gate=draw(st.booleans()),
                 dropout=draw(st.one_of(st.just(0.0), st.floats(0.01, 0.9))),
                 dropout_position=draw(st.sampled_from(["post", "pre"])),
                 loraplus_ratio=draw(st.one_of(st.just(1.0), st.floats(0.25, 16.0)))))


def magnitudes(layer, x, seed, grad):
    """Per element, the sum of |terms| of the output and of each trainable gradient."""
    c = layer.config
    ranges = layer.expert_ranges
    A = layer.lora_A.detach().double().abs().requires_grad_(True)
    B = layer.lora_B.detach().double().abs().requires_grad_(True)
    S = oracle_expert_scales(layer).detach().abs().requires_grad_(True)  # [K] or [K, out]
    xa = x.detach().double().abs().requires_grad_(True)
    W, b = layer.weight.double().abs(), None if layer.bias is None else layer.bias.double().abs()
    p = c.dropout if layer.training else 0.0
    y = reference.sos_forward(xa, W, b, [A[s] for s in ranges], [B[:, s] for s in ranges],
                              list(S), p, c.dropout_position, seed)
    g_x, g_A, g_B, g_S = torch.autograd.grad(y, [xa, A, B, S], grad.double().abs())
    mags = {"x": g_x, "lora_A": g_A, "lora_B": g_B}
    # S = expert_scales * gate (channel mode), fixed_scales * gate, or expert_scales alone.
    if c.gate:
        T = float(layer.gate_temperature)
        gate = reference.gate(layer.gate_logits.detach().double(), T)
        jacobian = torch.autograd.functional.jacobian(lambda l: reference.gate(l, T),
                                                      layer.gate_logits.detach().double())
        per_expert = S.detach() / gate.reshape(-1, *[1] * (S.dim() - 1))  # the ungated scales
        g_gate = (g_S * per_expert).reshape(len(gate), -1).sum(1)
        mags["gate_logits"] = jacobian.abs().T @ g_gate
    else:
        gate = torch.ones(c.num_experts, dtype=F64)
    if c.scale_mode == "channel":
        mags["expert_scales"] = g_S * gate[:, None]
    return y, mags


def tolerance(precision, reduction: int) -> tuple[float, float]:
    """(relative, absolute) bound on rounding for sums of at most `reduction` terms.

    Sums accumulate in float32 or float64: gamma_n ~ n u of the accumulation dtype (u = eps/2,
    the unit roundoff). Half-precision values are rounded at most 8 times along a path (the
    hidden product, the dropout scale and product, the scaled B, the adapter output, the base
    output and their sum, and as many in the backward): 8 u more."""
    base, adapter, autocast = precision
    low = [d for d in (base, adapter, autocast) if d in (torch.bfloat16, torch.float16)]
    u_acc = torch.finfo(accumulate_dtype(adapter) if autocast is None else torch.float32).eps / 2
    rel = reduction * u_acc + (8 * torch.finfo(low[0]).eps / 2 if low else 0.0)
    # Values that underflow to subnormals lose their relative accuracy: a few units of the
    # smallest subnormal of the least precise dtype.
    finfo = torch.finfo(low[0] if low else adapter)
    return rel, 16 * finfo.smallest_normal * finfo.eps


@settings(PROPERTY, max_examples=1000)
@given(case=layers())
def test_forward_and_gradients_match_the_oracle(case):
    torch.manual_seed(case["seed"])
    base_dtype, adapter_dtype, autocast = case["precision"]
    layer = make_layer(case["n_in"], case["n_out"], bias=case["bias"], dtype=base_dtype,
                       adapter_dtype=adapter_dtype, **case["cfg"])
    layer.train(case["training"])
    x = torch.randn(*case["lead"], case["n_in"], dtype=base_dtype, requires_grad=True)
    trainable = {n: p for n, p in layer.named_parameters() if p.requires_grad}
    seed = next_dropout_seed(layer, x)
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        y = layer(x)
    assert y.shape == (*case["lead"], case["n_out"])
    assert y.dtype == (autocast or base_dtype)
    grad = torch.randn_like(y)
    got = dict(zip(["x", *trainable], torch.autograd.grad(y, [x, *trainable.values()], grad)))

    x64 = x.detach().double().requires_grad_(True)
    p64 = {n: p.detach().double().requires_grad_(True) for n, p in trainable.items()}
    y_ref = oracle_forward(layer, x64, seed, p64)
    want = dict(zip(["x", *trainable], torch.autograd.grad(y_ref, [x64, *p64.values()],
                                                           grad.double())))
    y_mag, mags = magnitudes(layer, x, seed, grad)
    if torch.is_grad_enabled():  # LoRA+ divides A's gradient by the ratio, in eval() mode too
        want["lora_A"] = want["lora_A"] / case["cfg"]["loraplus_ratio"]
        mags["lora_A"] = mags["lora_A"] / case["cfg"]["loraplus_ratio"]

    c = layer.config
    rel, atol = tolerance(case["precision"], c.r_total + case["n_in"] + case["n_out"] +
                          math.prod(case["lead"]) + 4)
    for name, value, expected, mag in [("y", y, y_ref, y_mag),
                                       *[(n, got[n], want[n], mags[n]) for n in got]]:
        assert value.shape == expected.shape, name
        err = (value.double() - expected).abs()
        bound = rel * mag + atol
        assert (err <= bound).all(), (name, float((err / bound).max()))


@st.composite
def merges(draw):
    K = draw(st.integers(1, 6))
    rank_mode = draw(st.sampled_from(["total", "expert"]))
    r_expert = draw(st.integers(1, 6))
    weight_dtype = draw(st.sampled_from([torch.float64, torch.float32, torch.bfloat16,
                                         torch.float16]))
    return dict(
        n_in=draw(st.integers(1, 40)), n_out=draw(st.integers(1, 40)), weight_dtype=weight_dtype,
        adapter_dtype=draw(st.sampled_from([weight_dtype, torch.float32])),
        update_size=10.0 ** draw(st.integers(-4, 1)), seed=draw(st.integers(0, 2**31 - 1)),
        cfg=dict(num_experts=K, rank=K * r_expert if rank_mode == "total" else r_expert,
                 rank_mode=rank_mode, alpha=draw(st.floats(0.5, 32.0)),
                 scale_mode=draw(st.sampled_from(["fixed", "channel"])),
                 gate=draw(st.booleans())))


@settings(PROPERTY, max_examples=1000)
@given(case=merges())
def test_merge_rounds_once_and_unmerge_restores_within_two_roundings(case):
    """merge_into_ forms S = W0 + D in the accumulation dtype (float32, or float64 for float64
    weights or adapters), D = (B * s) A, and rounds S once to the weight's dtype: W1 = fl(S).
    unmerge subtracts the same D (the same scale tensor, the same inputs, the same kernel, so
    bit for bit the same D) and rounds once more: W2 = fl(fl_acc(W1 - D)). With u = eps / 2
    the unit roundoff of the weight's dtype and u_acc that of the accumulation dtype:

        |W2 - W0| <= (u + u_acc (1 + u)) (|W1| + |W2|)          (u_acc = 0 if acc = weight dtype)

    i.e. about one unit in the last place at |W1| plus one at |W2|: the update's own rounding
    cancels. And the merged weight is one rounding from the exact W0 + (B s) A:

        |W1 - exact| <= u |W1| + gamma_(r+2) (|W0| + (|B| |s|) |A|)

    with gamma_n = n u_a / (1 - n u_a), u_a the unit roundoff of the accumulation dtype

    (one rounding of B * s, r products summed, the add to W0). Values in the subnormal range
    add at most a few units of the smallest subnormal."""
    torch.manual_seed(case["seed"])
    layer = make_layer(case["n_in"], case["n_out"], dtype=case["weight_dtype"],
                       adapter_dtype=case["adapter_dtype"], **case["cfg"])
    with torch.no_grad():
        layer.lora_B.mul_(case["update_size"])  # from far below the weight's ulp to above |W|
    W0 = layer.weight.detach().clone()
    layer.merge()
    W1 = layer.weight.detach().clone()
    scale = layer._merged_scale.double()
    layer.unmerge()
    W2 = layer.weight.detach().clone()

    w_dtype = case["weight_dtype"]
    acc = torch.promote_types(accumulate_dtype(w_dtype), case["adapter_dtype"])
    u = torch.finfo(w_dtype).eps / 2
    u_acc = 0.0 if acc == w_dtype else torch.finfo(acc).eps / 2
    subnormal = torch.finfo(w_dtype).smallest_normal * torch.finfo(w_dtype).eps
    w0, w1, w2 = W0.double(), W1.double(), W2.double()
    bound = (u + u_acc * (1 + u)) * (w1.abs() + w2.abs()) + 2 * subnormal
    assert ((w2 - w0).abs() <= bound).all(), float(((w2 - w0).abs() / bound).max())

    A, B = layer.lora_A.detach().double(), layer.lora_B.detach().double()
    n = layer.config.r_total + 2
    u_a = torch.finfo(acc).eps / 2
    gamma = n * u_a / (1 - n * u_a)
    exact = w0 + (B * scale) @ A
    bound = (u * w1.abs() + gamma * (w0.abs() + (B.abs() * scale.abs()) @ A.abs())
             + 2 * subnormal)
    assert ((w1 - exact).abs() <= bound).all(), float(((w1 - exact).abs() / bound).max())
