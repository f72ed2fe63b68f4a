"""GPT-2's Conv1D (weight [in, out], PEFT's fan_in_fan_out): SOS and CPS layers over it against
the oracle, merge/unmerge, our format, and PEFT export/import through the real peft package."""
import warnings

import peft
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

import soslora_ext as sl
from soslora_ext.apps import finetune
from soslora_ext.ops import reference

from conftest import oracle_forward, randomize_adapters, rel_err

TARGETS = ["c_attn", "c_proj", "c_fc"]  # every Conv1D of GPT-2 (c_proj: attention and MLP)


def gpt2(seed=0):
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                        bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0)
    return GPT2LMHeadModel(config).eval()


def conv1d(in_features, out_features, dtype=torch.float64):
    conv = Conv1D(out_features, in_features).to(dtype)
    with torch.no_grad():
        conv.bias.normal_()
    return conv


def linear_oracle(layer, x):
    """base(x) + x dW^T with dW = (B * scale) A from the layer's factors (float64)."""
    A, B, scale = (t.double() for t in layer._update_factors())
    delta = (B * scale) @ A
    return layer.base_layer(x).double() + x.double() @ delta.t()


SOS_KWARGS = [dict(num_experts=3, rank=6, scale_mode="channel", gate=True, dropout=0.0),
              dict(num_experts=2, rank=4, dropout_position="pre")]


@pytest.mark.parametrize("kwargs", SOS_KWARGS)
def test_sos_over_conv1d_matches_the_oracle_values_and_gradients(kwargs):
    conv = conv1d(13, 7)
    layer = sl.SOSLinear(conv, **kwargs)
    assert (layer.in_features, layer.out_features, layer.fan_in_fan_out) == (13, 7, True)
    randomize_adapters(layer)
    x = torch.randn(2, 5, 13, dtype=torch.float64, requires_grad=True)
    # The same layer over the equivalent nn.Linear, checked by the reference oracle.
    linear = torch.nn.Linear(13, 7, dtype=torch.float64)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.t())
        linear.bias.copy_(conv.bias)
    twin = sl.SOSLinear(linear, **kwargs)
    twin.load_state_dict({k: v for k, v in layer.state_dict().items()
                          if not k.startswith("base_layer.")}, strict=False)
    y = layer(x)
    assert rel_err(y, oracle_forward(twin, x)) < 1e-12
    assert rel_err(y, linear_oracle(layer, x)) < 1e-12
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x] + [p for _, p in layer.named_adapter_parameters()], g)
    x2 = x.detach().clone().requires_grad_()
    expected = torch.autograd.grad(twin(x2), [x2] + [p for _, p in twin.named_adapter_parameters()],
                                   g)
    for got, want in zip(grads, expected):
        assert rel_err(got, want) < 1e-12


def test_cps_over_conv1d_matches_the_oracle_values_and_gradients():
    conv = conv1d(17, 12)
    layer = sl.CPSLinear(conv, num_clusters=3, rank=2, init_partition="random")
    randomize_adapters(layer)
    x = torch.randn(9, 17, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    delta = layer.delta_weight()  # laid out as the Conv1D weight: [in, out]
    assert delta.shape == (17, 12)
    expected = reference.cps_forward(x, conv.weight.t(), conv.bias, delta.t(), 0.0, None)
    assert rel_err(y, expected) < 1e-12
    # The oracle's gradients: the dense update built from the factors by plain indexing.
    g = torch.randn_like(y)
    params = [x, layer.lora_A, layer.lora_B]
    got = torch.autograd.grad(y, params, g)
    want = torch.autograd.grad(linear_oracle(layer, x), params, g)
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-12


@pytest.mark.parametrize("method", ["sos", "cps"])
def test_merge_unmerge_and_delta_weight_on_conv1d(method):
    conv = conv1d(16, 24, dtype=torch.float32)
    w0 = conv.weight.detach().clone()
    layer = (sl.SOSLinear(conv, num_experts=2, rank=4) if method == "sos"
             else sl.CPSLinear(conv, num_clusters=2, rank=3))
    randomize_adapters(layer)
    layer.eval()
    x = torch.randn(6, 16)
    unmerged = layer(x)
    delta = layer.delta_weight()
    assert delta.shape == w0.shape  # the weight's own layout
    layer.merge()
    assert rel_err(conv.weight, w0.double() + delta.double()) < 1e-6
    assert rel_err(layer(x), unmerged) < 1e-5
    layer.unmerge()
    # Exact up to the two roundings of the merged weight.
    bound = 2 * torch.finfo(torch.float32).eps * (w0.abs() + delta.abs()).max()
    assert (conv.weight - w0).abs().max() <= bound
    base = layer.merge_and_unload()
    assert base is conv and rel_err(base(x), unmerged) < 1e-5


def test_merged_state_dict_of_a_conv1d_layer_loads_as_merged():
    layer = sl.SOSLinear(conv1d(8, 10), num_experts=2, rank=4)
    randomize_adapters(layer)
    layer.eval()
    x = torch.randn(3, 8, dtype=torch.float64)
    expected = layer(x)
    layer.merge()
    state = layer.state_dict()
    fresh = sl.SOSLinear(conv1d(8, 10), num_experts=2, rank=4).eval()
    fresh.load_state_dict(state)
    assert fresh.merged and rel_err(fresh(x), expected) < 1e-12
    fresh.unmerge()
    assert rel_err(fresh(x), expected) < 1e-12


def _peft_logits(directory, ids):
    with warnings.catch_warnings():
        # A clean adapter loads without PEFT's warnings (e.g. on fan_in_fan_out).
        warnings.filterwarnings("error", category=UserWarning)
        model = peft.PeftModel.from_pretrained(gpt2(), str(directory)).eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("method", ["sos", "cps"])
def test_gpt2_trains_saves_exports_and_reimports_through_peft(tmp_path, method):
    model = gpt2()
    if method == "sos":
        sl.apply_sos_lora(model, TARGETS, num_experts=2, rank=8, alpha=16.0, dropout=0.1)
    else:
        sl.apply_cps_lora(model, TARGETS, num_clusters=2, rank=4, alpha=8.0, dropout=0.1,
                          repartition_every=4)
    assert all(layer.fan_in_fan_out for _, layer in sl.adapter_layers(model))
    ids = torch.randint(0, 96, (8, 16), generator=torch.Generator().manual_seed(1))
    data = dict(input_ids=ids, labels=ids)
    with torch.no_grad():
        before = model(ids).logits
    fit = finetune.train(model, finetune.sample_batches(data, 4), 8, lr=1e-2, progress=False)
    assert fit.losses[-1] < fit.losses[0]
    model.eval()
    with torch.no_grad():
        trained = model(ids).logits
    assert (trained - before).abs().max() > 1e-3  # the adapters changed the model

    sl.save_adapter(model, tmp_path / "own")
    reloaded = sl.load_adapter(gpt2(), tmp_path / "own").eval()
    with torch.no_grad():
        assert rel_err(reloaded(ids).logits, trained) < 1e-12

    sl.export_peft(model, tmp_path / "peft")
    assert rel_err(_peft_logits(tmp_path / "peft", ids), trained) < 1e-5
    imported = sl.import_peft(gpt2(), tmp_path / "peft", num_experts=2).eval()
    with torch.no_grad():
        assert rel_err(imported(ids).logits, trained) < 1e-5
        sl.merge_and_unload(model)
        assert rel_err(model(ids).logits, trained) < 1e-5


def test_import_of_peft_own_gpt2_adapter(tmp_path):
    peft_model = peft.get_peft_model(gpt2(), peft.LoraConfig(
        r=8, lora_alpha=32, target_modules=TARGETS, fan_in_fan_out=True))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)
    peft_model.save_pretrained(str(tmp_path))
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = peft_model.eval()(ids).logits
        model = sl.import_peft(gpt2(), tmp_path, num_experts=4).eval()
        assert len(list(sl.sos_layers(model))) == 8  # 2 blocks x (c_attn, c_fc, two c_proj)
        assert rel_err(model(ids).logits, expected) < 1e-5


def test_tied_lm_head_of_gpt2_is_adapted_but_merge_is_refused_by_name():
    model = gpt2()
    sl.apply_sos_lora(model, ["lm_head"], num_experts=2, rank=4)
    randomize_adapters(model)
    weight = model.transformer.wte.weight.detach().clone()
    with pytest.raises(RuntimeError, match="transformer.wte"):
        sl.merge_and_unload(model)
    assert torch.equal(model.transformer.wte.weight, weight)


def test_conv1d_target_with_too_large_a_cps_rank_names_the_layer():
    with pytest.raises(ValueError, match="c_attn"):
        sl.apply_cps_lora(gpt2(), ["c_attn"], num_clusters=4, rank=16)
