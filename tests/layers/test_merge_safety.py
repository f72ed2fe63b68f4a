"""Merging never destroys a base weight: non-finite updates and overflows are refused with every
weight bit-identical; unmerge subtracts exactly what merge added; a merged layer refuses a
training forward; a merged state_dict loads as a merged layer."""
import copy

import pytest
import torch
import torch.nn as nn
from transformers import LlamaConfig, LlamaForCausalLM

import soslora_ext as sl
from soslora_ext import compose
from soslora_ext.layers import merge_guard as merging

from conftest import rel_err


def repro_layer(dtype=torch.float32):
    torch.manual_seed(0)
    layer = sl.SOSLinear(nn.Linear(16, 12, dtype=dtype), num_experts=4, rank=8)
    layer.lora_B.data.normal_()
    return layer


def llama(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=56, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)).eval()


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bit_identical(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k


# ---- non-finite factors ----------------------------------------------------------------------
def test_non_finite_factor_is_refused_and_weight_untouched():
    layer = repro_layer()
    w0 = layer.weight.detach().clone()
    layer.lora_B.data[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="SOSLinear.merge: the update's lora_B has "
                                                 "non-finite values; nothing was merged"):
        layer.merge()
    assert not layer.merged and torch.equal(layer.weight, w0)
    layer.lora_B.data[0, 0] = 0
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()
    assert torch.isfinite(layer.weight).all() and torch.equal(layer.weight, w0)


@pytest.mark.parametrize("where", ["lora_A", "expert_scales", "gate_logits"])
def test_nan_in_any_factor_or_scale_is_refused(where):
    layer = sl.SOSLinear(nn.Linear(16, 12), num_experts=4, rank=8, scale_mode="channel",
                         gate=True)
    layer.lora_B.data.normal_()
    w0 = layer.weight.detach().clone()
    getattr(layer, where).data.view(-1)[1] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite"):
        layer.merge()
    assert not layer.merged and torch.equal(layer.weight, w0)


def test_base_weight_already_non_finite_is_refused():
    layer = repro_layer()
    layer.base_layer.weight.data[3, 4] = float("nan")
    w0 = layer.weight.detach().clone()
    with pytest.raises(FloatingPointError, match="base weight already holds non-finite"):
        layer.merge()
    assert not layer.merged and torch.equal(layer.weight.isnan(), w0.isnan())
    assert torch.equal(layer.weight.nan_to_num(), w0.nan_to_num())


# ---- overflow of the weight's dtype ---------------------------------------------------------
def test_float16_overflow_is_refused_bit_identical():
    layer = repro_layer(torch.float16)
    layer.base_layer.weight.data[2, 5] = 65000.0
    with torch.no_grad():
        layer.lora_B.mul_(200.0)  # |dW| of several hundred: 65000 + dW passes 65504 somewhere
    dense = layer.weight.double() + layer.delta_weight().double()
    assert dense.abs().max() > 65520  # the unguarded merge would write Inf
    w0 = layer.weight.detach().clone()
    with pytest.raises(FloatingPointError, match=r"exceed the range of torch.float16"):
        layer.merge()
    assert not layer.merged and torch.equal(layer.weight, w0)


def test_near_the_limit_the_exact_check_lets_a_safe_merge_through():
    layer = repro_layer(torch.float16)
    layer.base_layer.weight.data[2, 5] = 65000.0  # the bound alone cannot clear it
    with torch.no_grad():
        layer.lora_B.mul_(1e-3)
    expected = (layer.weight.float() + layer.delta_weight()).half()
    layer.merge()
    assert layer.merged and torch.isfinite(layer.weight).all()
    assert torch.equal(layer.weight, expected)


def test_common_path_skips_the_exact_check(monkeypatch):
    def fail(*args):
        raise AssertionError("the bound should have settled this merge")
    monkeypatch.setattr(merging, "_exact_check", fail)
    layer = repro_layer(torch.float16)
    layer.merge()
    layer.unmerge()


def test_merge_and_unload_model_is_all_or_nothing():
    model = llama()
    sl.apply_sos_lora(model, ["q_proj", "v_proj"], num_experts=2, rank=4)
    for _, layer in sl.sos_layers(model):
        layer.lora_B.data.normal_()
    last = model.model.layers[1].self_attn.v_proj
    last.lora_A.data[0, 0] = float("inf")
    before = weights(model)
    with pytest.raises(FloatingPointError, match="merge_and_unload: layer "
                                                 "'model.layers.1.self_attn.v_proj'"):
        sl.merge_and_unload(model)
    assert_bit_identical(model, before)
    assert all(not layer.merged for _, layer in sl.sos_layers(model))
    assert len(list(sl.sos_layers(model))) == 4


def test_sum_into_checks_every_weight_before_the_first_write():
    model = llama().half()
    q0 = "model.layers.0.self_attn.q_proj"
    q1 = "model.layers.1.self_attn.q_proj"
    model.get_submodule(q1).weight.data[0, 0] = 65000.0
    torch.manual_seed(1)

    def term(scale):
        return [compose.LowRankTerm(torch.randn(4, 32), torch.randn(32, 4), scale)]
    # Each adapter alone stays in range on q1; their sum does not (300 + 300 on top of 65000).
    a = compose.Adapter({q0: term(1.0), q1: [compose.LowRankTerm(
        torch.ones(1, 32), torch.ones(32, 1), 300.0)]}, name="a")
    b = compose.Adapter({q0: term(1.0), q1: [compose.LowRankTerm(
        torch.ones(1, 32), torch.ones(32, 1), 300.0)]}, name="b")
    before = weights(model)
    compose.sum_into(llama().half(), [a])  # alone: fine
    with pytest.raises(FloatingPointError, match=rf"sum_into: layer '{q1}'.*float16"):
        compose.sum_into(model, [a, b])
    assert_bit_identical(model, before)
    bad = compose.Adapter({q0: term(float("inf"))}, name="bad")
    with pytest.raises(FloatingPointError, match=rf"sum_into: layer '{q0}'.*scale"):
        compose.sum_into(model, [a, bad])
    assert_bit_identical(model, before)


# ---- unmerge subtracts what merge added ------------------------------------------------------
def test_unmerge_after_changing_the_factors_is_exact():
    layer = repro_layer(torch.float64)
    w0 = layer.weight.detach().clone()
    layer.merge()
    with torch.no_grad():
        layer.lora_B.add_(3.0)  # off by 21.7 when unmerge used the current factors
        layer.lora_A.mul_(2.0)
    layer.unmerge()
    assert (layer.weight - w0).abs().max() < 1e-12


# ---- training while merged -------------------------------------------------------------------
def test_training_forward_on_a_merged_layer_is_an_error():
    layer = repro_layer()
    x = torch.randn(3, 16)
    with torch.no_grad():
        y = layer(x)
    layer.merge()
    with pytest.raises(RuntimeError, match=r"training forward on a merged adapter.*unmerge\(\)"):
        layer(x)
    with torch.no_grad():
        assert rel_err(layer(x), y) < 1e-5
    layer.eval()
    assert rel_err(layer(x), y) < 1e-5
    layer.train()
    for p in (layer.lora_A, layer.lora_B):
        p.requires_grad_(False)  # nothing to train: a merged frozen adapter may run in train mode
    assert rel_err(layer(x), y) < 1e-5


def test_training_forward_on_a_merged_cps_layer_is_an_error():
    layer = sl.CPSLinear(nn.Linear(16, 12), num_clusters=2, rank=2)
    layer.merge()
    with pytest.raises(RuntimeError, match="CPSLinear: training forward on a merged adapter"):
        layer(torch.randn(3, 16))


# ---- state_dict while merged -----------------------------------------------------------------
def test_merged_state_dict_loads_as_a_merged_layer():
    layer = repro_layer()
    w0 = layer.weight.detach().clone()
    x = torch.randn(5, 16)
    with torch.no_grad():
        y = layer(x)
    layer.merge()
    state = layer.state_dict()
    fresh = sl.SOSLinear(nn.Linear(16, 12), num_experts=4, rank=8)
    fresh.load_state_dict(state)  # strict: the merged update's keys are consumed
    assert fresh.merged
    with torch.no_grad():
        assert rel_err(fresh(x), y) < 1e-5  # the update counted once, not twice
    twin = copy.deepcopy(layer)
    twin.unmerge()
    fresh.unmerge()
    assert torch.equal(fresh.weight, twin.weight)  # the same recorded update subtracted
    assert (fresh.weight - w0).abs().max() < 1e-4  # one float32 rounding at |W + dW|
    with torch.no_grad():
        assert rel_err(fresh(x), y) < 1e-5
    # An unmerged state loaded over a merged layer leaves it unmerged.
    layer.load_state_dict(fresh.state_dict())
    assert not layer.merged and torch.equal(layer.weight, fresh.weight)


def test_merged_model_state_dict_round_trip_and_adapter_save(tmp_path):
    model = llama()
    sl.apply_sos_lora(model, ["q_proj"], num_experts=2, rank=4)
    for _, layer in sl.sos_layers(model):
        layer.lora_B.data.normal_()
    ids = torch.randint(0, 96, (1, 7))
    with torch.no_grad():
        y = model(ids).logits
    for _, layer in sl.sos_layers(model):
        layer.merge()
    sl.save_adapter(model, tmp_path / "adapter")  # the factors only, as when unmerged
    other = sl.apply_sos_lora(llama(seed=1), ["q_proj"], num_experts=2, rank=4)
    other.load_state_dict(model.state_dict())
    assert all(layer.merged for _, layer in sl.sos_layers(other))
    with torch.no_grad():
        assert rel_err(other(ids).logits, y) < 1e-5
    loaded = sl.load_adapter(llama(), tmp_path / "adapter")
    assert not any(layer.merged for _, layer in sl.sos_layers(loaded))
    with torch.no_grad():
        assert rel_err(loaded(ids).logits, y) < 1e-5


# ---- meta device -----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("make", [
    lambda base: sl.SOSLinear(base, num_experts=4, rank=8, dropout=0.1),
    lambda base: sl.CPSLinear(base, num_clusters=2, rank=2, dropout=0.1)])
def test_forward_on_meta_gives_shape_and_dtype(make, dtype):
    base = nn.Linear(16, 12, device="meta", dtype=dtype)
    x = torch.empty(3, 5, 16, device="meta", dtype=dtype)
    expected = base(x)
    layer = make(base)
    for mode in (True, False):
        out = layer.train(mode)(x)
        assert out.device.type == "meta"
        assert out.shape == expected.shape and out.dtype == expected.dtype


# ---- the guard writes nothing, and checks everything it is given -----------------------------
def test_exact_check_never_writes_a_float32_weight():
    # Near float32's limit the bound cannot settle the merge, so it is replayed band by band;
    # in float32 that replay once added the update into the weight itself.
    layer = repro_layer()
    with torch.no_grad():
        layer.lora_B.zero_()
        layer.lora_B[1] = 1.0  # the update lives on row 1 only
        layer.weight[0, 0] = 3.4e38
    w0, delta = layer.weight.detach().clone(), layer.delta_weight()
    layer.merge()
    assert torch.equal(layer.weight[1], w0[1] + delta[1])  # added once (was twice)
    assert torch.equal(layer.weight[0], w0[0])
    layer = repro_layer()
    with torch.no_grad():
        layer.weight[0, 0] = 3e38
        layer.lora_B[0] *= 1e37
    w0 = layer.weight.detach().clone()
    with pytest.raises(FloatingPointError, match="range of torch.float32"):
        layer.merge()
    assert torch.equal(layer.weight, w0) and not layer.merged  # was NaN in row 0


def two_layer_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))


@pytest.mark.parametrize("A, error, match", [
    (torch.ones(2, 8, dtype=torch.int64), TypeError, "lora_A must be a real floating-point"),
    (torch.ones(2, 8, dtype=torch.complex64), TypeError, "lora_A must be a real floating-point"),
    (torch.ones(3, 8), ValueError, r"lora_A \[3, 8\] \(expected \[r, 8\]\)")])
def test_a_term_the_op_cannot_take_is_refused_before_any_write(A, error, match):
    # The good layer '2' comes first: the op used to write it, then fail on layer '0'.
    model = two_layer_model()
    adapter = compose.Adapter({"2": [compose.LowRankTerm(torch.randn(2, 6), torch.randn(4, 2))],
                               "0": [compose.LowRankTerm(A, torch.ones(6, 2))]}, name="bad")
    before = weights(model)
    with pytest.raises(error, match=rf"sum_into: layer '0'.*{match}"):
        compose.sum_into(model, [adapter])
    assert_bit_identical(model, before)


def adapter(**whole):
    torch.manual_seed(1)
    return compose.Adapter({"0": [compose.LowRankTerm(torch.randn(2, 8), torch.randn(6, 2))],
                            "2": [compose.LowRankTerm(torch.randn(2, 6), torch.randn(4, 2))]},
                           name="a", whole=whole)


@pytest.mark.parametrize("ws, error, match", [
    ([1e300], compose.AdapterError, "times its weight 1e\\+300 is not a finite float32"),
    ([-1e300], compose.AdapterError, "times its weight -1e\\+300"),
    ([1e38], FloatingPointError, "range of torch.float32")])
def test_sum_into_weights_beyond_range_change_nothing(ws, error, match):
    model = two_layer_model()
    before = weights(model)
    with pytest.raises(error, match=match):
        compose.sum_into(model, [adapter()], ws)
    assert_bit_identical(model, before)


@pytest.mark.parametrize("whole, match", [
    ({"2.bias": torch.full((4,), float("nan"))}, "'2.bias' saved whole by 'a' has non-finite"),
    ({"2.bias": torch.zeros(4, dtype=torch.complex64)}, "expected torch.float32 \\(4,\\), got "
                                                        "torch.complex64"),
    ({"2.weight": torch.zeros(4, 6)}, "'2.weight' .* is a weight that the adapters add into")])
def test_sum_into_checks_tensors_saved_whole_before_the_first_write(whole, match):
    model = two_layer_model()
    before = weights(model)
    with pytest.raises(compose.AdapterError, match=match):
        compose.sum_into(model, [adapter(**whole)])
    assert_bit_identical(model, before)


def test_delta_weight_refuses_a_non_finite_update():
    layer = repro_layer()
    layer.lora_B.data[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="SOSLinear.delta_weight: .*lora_B"):
        layer.delta_weight()


def test_two_adapters_on_one_weight_are_checked_as_their_sum():
    base = nn.Linear(16, 12, dtype=torch.float16)
    with torch.no_grad():
        base.weight[0, 0] = 65000.0
    torch.manual_seed(0)
    pair = nn.ModuleDict({k: sl.SOSLinear(base, num_experts=4, rank=8) for k in "ab"})
    for layer in pair.values():
        with torch.no_grad():
            layer.lora_B.zero_()
            layer.lora_B[0] = 1.0
            layer.lora_B[0] *= 300.0 / float(layer.delta_weight()[0, 0])  # +300 at [0, 0]
    before = weights(pair)
    with pytest.raises(FloatingPointError, match="merge_and_unload: layer 'a'.*float16"):
        sl.merge_and_unload(pair)  # each alone fits; 65000 + 600 does not
    assert_bit_identical(pair, before)


@pytest.mark.parametrize("key, value, match", [
    ("merged_A", torch.randn(5, 16), r"lora_A \[5, 16\] \(expected \[r, 16\]\)"),
    ("merged_B", torch.full((12, 8), float("nan")), "has non-finite values")])
def test_a_malformed_merged_update_is_refused_at_load(key, value, match):
    layer = repro_layer()
    layer.merge()
    state = layer.state_dict()
    state[f"base_layer.{key}"] = value  # unmerge() could never subtract it
    with pytest.raises(RuntimeError, match=f"base_layer: merged update: .*{match}"):
        repro_layer().load_state_dict(state)
