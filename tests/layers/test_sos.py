"""SOSLinear against the reference oracle: values, gradients, init, scales, penalty, merge."""

import pytest
import torch
import torch.nn as nn

import soslora_ext as sl
from soslora_ext.ops import reference

from conftest import make_layer, next_dropout_seed, oracle_expert_scales, oracle_forward, rel_err
from helpers import OpLog

F64 = torch.float64

CONFIGS = [
    dict(num_experts=K, rank=rank, rank_mode=mode, scale_base=base, scale_mode=smode,
         dropout=p, dropout_position=pos, gate=gate)
    for K, rank, mode, base, smode, p, pos, gate in [
        (1, 3, "total", "expert", "fixed", 0.0, "post", False),
        (2, 4, "total", "total", "channel", 0.2, "pre", True),
        (3, 2, "expert", "expert", "channel", 0.3, "post", False),
        (4, 8, "total", "expert", "fixed", 0.1, "pre", True),
        (8, 16, "total", "total", "channel", 0.0, "post", True),
        (4, 3, "expert", "total", "fixed", 0.5, "post", False),  # r_tot = 12 > in = 9 below
    ]
]
SHAPES = [((1, 13), 13, 7), ((5, 3, 9), 9, 11), ((4, 17), 17, 1)]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{v}" for v in c.values()))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_and_gradients_match_oracle(cfg, shape):
    x_shape, n_in, n_out = shape
    layer = make_layer(n_in, n_out, **cfg)
    x = torch.randn(*x_shape, n_in, dtype=F64, requires_grad=True)
    seed = next_dropout_seed(layer, x)
    y = layer(x)
    assert y.shape == (*x_shape, n_out)
    params = {n: p for n, p in layer.named_parameters() if p.requires_grad}
    y_ref = oracle_forward(layer, x, seed, params)
    assert rel_err(y, y_ref) < 1e-12

    grad = torch.randn_like(y)
    names = list(params)
    got = torch.autograd.grad(y, [x, *params.values()], grad)
    want = torch.autograd.grad(y_ref, [x, *params.values()], grad)
    for name, g, w in zip(["x", *names], got, want):
        assert rel_err(g, w) < 1e-10, name


@pytest.mark.parametrize("cfg", CONFIGS[1:4], ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_base_fused_path_equals_the_separate_base_path(cfg):
    # A plain frozen nn.Linear is computed inside the adapter's op; a base with a forward hook
    # runs on its own. Both must give the same values and gradients.
    layer = make_layer(9, 11, **cfg)
    x = torch.randn(2, 3, 9, dtype=F64, requires_grad=True)
    assert layer._base_fusable(F64)
    outputs = []
    for hooked in (False, True):
        handle = layer.base_layer.register_forward_hook(lambda m, i, o: o) if hooked else None
        assert layer._base_fusable(F64) is not hooked
        torch.manual_seed(5)  # the same dropout seed for both runs
        y = layer(x)
        outputs.append((y, *torch.autograd.grad(y.square().sum(), [x, layer.lora_A, layer.lora_B])))
        if handle:
            handle.remove()
    for fused, separate in zip(*outputs):
        assert rel_err(fused, separate) < 1e-13


def _as_function(layer):
    """(x, *trainable parameters) -> layer(x), with the same dropout mask at every call."""
    names = [n for n, p in layer.named_parameters() if p.requires_grad]

    def fn(x, *params):
        with torch.nn.utils.stateless._reparametrize_module(layer, dict(zip(names, params))):
            state = torch.get_rng_state()
            torch.manual_seed(0)
            out = layer(x)
            torch.set_rng_state(state)
            return out

    return fn, [p for p in layer.parameters() if p.requires_grad]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_layer_gradcheck(cfg):
    layer = make_layer(7, 5, **cfg)
    fn, params = _as_function(layer)
    x = torch.randn(2, 3, 7, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(fn, (x, *params))


@pytest.mark.parametrize("cfg", [CONFIGS[1], CONFIGS[2]], ids=["pre-channel-gate", "post-channel"])
def test_layer_double_backward(cfg):
    layer = make_layer(6, 5, **cfg)
    fn, params = _as_function(layer)
    x = torch.randn(4, 6, dtype=F64, requires_grad=True)
    assert torch.autograd.gradgradcheck(fn, (x, *params))


def test_base_without_bias():
    layer = make_layer(10, 6, bias=False, num_experts=2, rank=4, dropout=0.1)
    x = torch.randn(3, 10, dtype=F64, requires_grad=True)
    seed = next_dropout_seed(layer, x)
    assert rel_err(layer(x), oracle_forward(layer, x, seed)) < 1e-12


def test_non_contiguous_input():
    layer = make_layer(13, 7, num_experts=2, rank=4)
    x = torch.randn(13, 6, dtype=F64).t()  # [6, 13] non-contiguous
    assert not x.is_contiguous()
    assert rel_err(layer(x), oracle_forward(layer, x)) < 1e-12


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2),
                                       (torch.float16, 2e-2)])
def test_low_precision_against_float64_oracle(dtype, tol):
    layer = make_layer(24, 20, dtype=dtype, num_experts=4, rank=8, scale_mode="channel",
                       gate=True, adapter_dtype=dtype)
    x = torch.randn(16, 24, dtype=dtype, requires_grad=True)
    y = layer(x)
    assert y.dtype == dtype
    y_ref = oracle_forward(layer, x)
    assert rel_err(y, y_ref) < tol
    grad = torch.randn_like(y)
    trainable = [p for p in layer.parameters() if p.requires_grad]
    got = torch.autograd.grad(y, [x, *trainable], grad)
    x64 = x.detach().double().requires_grad_(True)
    p64 = {n: p.detach().double().requires_grad_(True)
           for n, p in layer.named_parameters() if p.requires_grad}
    want = torch.autograd.grad(oracle_forward(layer, x64, params=p64), [x64, *p64.values()],
                               grad.double())
    for g, w in zip(got, want):
        assert rel_err(g, w) < tol


def test_float32_adapters_on_bf16_base():
    base = nn.Linear(16, 12, dtype=torch.bfloat16)
    layer = sl.SOSLinear(base, num_experts=2, rank=4)
    assert layer.lora_A.dtype == torch.float32  # PEFT's default for half-precision bases
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, 16, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    assert rel_err(y, oracle_forward(layer, x)) < 2e-2
    y.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16


def test_autocast_bf16_on_cpu():
    layer = make_layer(16, 12, dtype=torch.float32, num_experts=4, rank=8)
    x = torch.randn(5, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16  # as the base nn.Linear under autocast
    assert rel_err(y, oracle_forward(layer, x)) < 2e-2
    y.float().sum().backward()
    assert layer.lora_B.grad.dtype == torch.float32 and torch.isfinite(layer.lora_B.grad).all()


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16])
def test_input_dropout_backward_equals_its_differentiable_form(dtype):
    # A plain backward is one op that draws the input mask once for grad_x and grad_A; with
    # create_graph the separate differentiable ops run: both must give the same bits.
    layer = make_layer(1031, 6, dtype=dtype, num_experts=2, rank=4, dropout=0.3,
                       dropout_position="pre")
    x = torch.randn(3, 7, 1031, dtype=dtype, requires_grad=True)
    grads, ops_run = [], []
    for create_graph in (False, True):
        torch.manual_seed(11)
        y = layer(x)
        with OpLog() as log:
            grads.append(torch.autograd.grad(y, [x, layer.lora_A, layer.lora_B],
                                             torch.ones_like(y), create_graph=create_graph))
        ops_run.append(log.names)
    assert "soslora.adapted_linear_backward" in ops_run[0]
    assert "soslora.adapted_linear_backward" not in ops_run[1]
    assert "soslora.lowrank_grad_A" in ops_run[1]
    for plain, differentiable in zip(*grads):
        assert torch.equal(plain, differentiable.detach())


@pytest.mark.parametrize("dropout,position", [(0.0, "post"), (0.2, "post"), (0.2, "pre")])
def test_torch_compile_fullgraph_matches_eager(dropout, position):
    layer = make_layer(12, 10, dtype=torch.float32, num_experts=2, rank=4, gate=True,
                       scale_mode="channel", dropout=dropout, dropout_position=position)
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(2, 3, 12, requires_grad=True)
    params = [x, layer.lora_A, layer.lora_B, layer.expert_scales, layer.gate_logits]
    torch.manual_seed(5)
    y_eager = layer(x)
    g_eager = torch.autograd.grad(y_eager.square().sum(), params)
    # fallback_random: compiled code draws the dropout seed from the same generator as eager.
    with torch._inductor.config.patch(fallback_random=True):
        torch.manual_seed(5)
        y_comp = compiled(x)
        g_comp = torch.autograd.grad(y_comp.square().sum(), params)
    assert rel_err(y_comp, y_eager) < 1e-6
    for a, b in zip(g_comp, g_eager):
        assert rel_err(a, b) < 1e-5


# ---- init and scales ------------------------------------------------------------------------
@pytest.mark.parametrize("K,rank,n_in,gain", [(4, 64, 96, 2**0.5), (3, 9, 9, 1.0), (1, 5, 8, 0.7)])
def test_cross_expert_orthogonal_init(K, rank, n_in, gain):
    layer = sl.SOSLinear(nn.Linear(n_in, 4), num_experts=K, rank=rank, init_gain=gain)
    A = layer.lora_A.detach().double()
    assert rel_err(A @ A.T, gain**2 * torch.eye(rank, dtype=F64)) < 1e-5
    assert torch.equal(layer.lora_B, torch.zeros_like(layer.lora_B))


def test_orthogonal_init_per_expert_when_r_tot_exceeds_in():
    layer = sl.SOSLinear(nn.Linear(6, 4), num_experts=3, rank=4, rank_mode="expert")
    A = layer.lora_A.detach().double()
    for s in layer.expert_ranges:
        a = A[s]
        assert rel_err(a @ a.T, 2 * torch.eye(4, dtype=F64)) < 1e-5


def test_zero_update_at_init():
    layer = make_layer(9, 5, random_b=False, num_experts=3, rank=6)
    x = torch.randn(4, 9, dtype=F64)
    assert torch.equal(layer(x), layer.base_layer(x))


def test_fixed_scales_match_reference_recipe_numbers():
    # Reference defaults K=4, r=16 total, alpha=32, gamma_max=2.5: [4.571, 6.857, 9.143, 11.429].
    c = sl.SOSConfig(num_experts=4, rank=16, alpha=32.0, gamma_max=2.5)
    assert c.fixed_scales() == pytest.approx([32 / 7, 48 / 7, 64 / 7, 80 / 7])
    e = sl.SOSConfig(num_experts=2, rank=8, alpha=16.0, gamma_max=3.0, rank_mode="expert",
                     scale_base="total")
    assert e.r_total == 16 and e.fixed_scales() == pytest.approx([1.0, 3.0])
    assert sl.SOSConfig(num_experts=1, rank=4, alpha=8.0).fixed_scales() == pytest.approx([2.0])


def test_scales_gate_mean_one_and_shapes():
    layer = make_layer(8, 6, num_experts=4, rank=8, gate=True)
    assert rel_err(layer.scales(), oracle_expert_scales(layer)) < 1e-12
    g = reference.gate(layer.gate_logits.detach(), float(layer.gate_temperature))
    assert abs(g.mean().item() - 1) < 1e-12
    ch = make_layer(8, 6, num_experts=2, rank=4, scale_mode="channel")
    assert ch.scales().shape == (2, 6)
    assert not layer.scales().requires_grad


# ---- penalty and gradient terms --------------------------------------------------------------
def test_ortho_penalty_layer_matches_oracle_and_is_differentiable():
    layer = make_layer(10, 4, num_experts=3, rank=6)
    with torch.no_grad():
        layer.lora_A.normal_()
    pen = layer.ortho_penalty()
    A = layer.lora_A.detach().clone().requires_grad_(True)
    want = reference.ortho_penalty([A[s] for s in layer.expert_ranges])
    assert abs(pen.item() - want.item()) < 1e-12
    (g,) = torch.autograd.grad(pen, layer.lora_A)
    (w,) = torch.autograd.grad(want, A)
    assert rel_err(g, w) < 1e-12


@pytest.mark.parametrize("loraplus_ratio", [1.0, 4.0])
def test_in_backward_ortho_gradient_and_loraplus(loraplus_ratio):
    layer = make_layer(10, 6, num_experts=2, rank=4, loraplus_ratio=loraplus_ratio)
    with torch.no_grad():
        layer.lora_A.normal_()  # off the orthogonal init, where the penalty's gradient is zero
    lam = 0.37
    layer.ortho_lambda.fill_(lam)
    x = torch.randn(5, 10, dtype=F64)
    grad = torch.randn(5, 6, dtype=F64)
    layer(x).backward(grad)
    A = layer.lora_A.detach().clone().requires_grad_(True)
    params = dict(layer.named_parameters())
    params["lora_A"] = A
    task = oracle_forward(layer, x, params=params)
    loss = (task * grad).sum() + lam * reference.ortho_penalty([A[s] for s in layer.expert_ranges])
    (w,) = torch.autograd.grad(loss, A)
    assert rel_err(layer.lora_A.grad, w / loraplus_ratio) < 1e-12


def test_scale_anchor_and_uniform_prior_gradient_terms():
    anchor, prior = 0.3, 0.7
    layer = make_layer(9, 5, num_experts=3, rank=6, scale_mode="channel", gate=True,
                       scale_anchor=anchor, uniform_prior=prior)
    x = torch.randn(4, 9, dtype=F64)
    grad = torch.randn(4, 5, dtype=F64)
    layer(x).backward(grad)
    params = {n: p.detach().clone().requires_grad_(True) for n, p in layer.named_parameters()
              if p.requires_grad}
    out = oracle_forward(layer, x, params=params)
    g_scales, g_logits = torch.autograd.grad((out * grad).sum(),
                                             [params["expert_scales"], params["gate_logits"]])
    T = float(layer.gate_temperature)
    p = torch.softmax(params["gate_logits"].detach() / T, 0)
    fixed = torch.tensor(layer.config.fixed_scales(), dtype=F64)[:, None]
    assert rel_err(layer.expert_scales.grad,
                   g_scales + anchor * (params["expert_scales"].detach() - fixed)) < 1e-12
    assert rel_err(layer.gate_logits.grad, g_logits + prior * (p - 1 / 3) / T) < 1e-12


# ---- merge -----------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [dict(num_experts=4, rank=8, scale_mode="channel", gate=True),
                                 dict(num_experts=2, rank=6)])
def test_delta_merge_unmerge_round_trip(cfg):
    layer = make_layer(11, 7, **cfg)
    x = torch.randn(3, 11, dtype=F64)
    y = layer(x)
    scales = oracle_expert_scales(layer)
    A, B = layer.lora_A.detach(), layer.lora_B.detach()
    delta_ref = reference.delta_weight([A[s] for s in layer.expert_ranges],
                                       [B[:, s] for s in layer.expert_ranges], list(scales))
    assert rel_err(layer.delta_weight(), delta_ref) < 1e-12
    w0 = layer.base_layer.weight.detach().clone()
    layer.merge()
    assert layer.merged
    assert rel_err(layer.base_layer.weight, w0 + delta_ref) < 1e-12
    with torch.no_grad():  # a merged layer serves inference only
        assert rel_err(layer(x), y) < 1e-12
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.unmerge()
    assert not layer.merged
    assert rel_err(layer.base_layer.weight, w0) < 1e-12
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()
    assert rel_err(layer(x), y) < 1e-12


def test_merge_bf16_weight_single_rounding_and_merge_and_unload():
    base = nn.Linear(32, 24, dtype=torch.bfloat16)
    layer = sl.SOSLinear(base, num_experts=4, rank=8)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
    w0 = base.weight.detach().clone()
    expected = reference.merge(w0, [layer.lora_A.detach()[s] for s in layer.expert_ranges],
                               [layer.lora_B.detach()[:, s] for s in layer.expert_ranges],
                               list(layer.scales()))
    x = torch.randn(6, 32, dtype=torch.bfloat16)
    y = layer(x)
    merged = layer.merge_and_unload()
    assert merged is base and isinstance(merged, nn.Linear)
    ulp = expected.double().abs() * torch.finfo(torch.bfloat16).eps
    assert ((merged.weight.double() - expected.double()).abs() <= ulp).all()
    assert rel_err(merged(x), y) < 2e-2


def test_merge_survives_temperature_change():
    # unmerge subtracts exactly what merge added, even if the gate temperature moved since.
    layer = make_layer(8, 6, num_experts=2, rank=4, gate=True)
    w0 = layer.base_layer.weight.detach().clone()
    layer.merge()
    layer.gate_temperature.fill_(0.5)
    layer.unmerge()
    assert rel_err(layer.base_layer.weight, w0) < 1e-12
