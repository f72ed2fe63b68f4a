"""PEFT interop for every base kind (nn.Embedding, nn.Conv1d/2d/3d, nn.MultiheadAttention
beside nn.Linear), through the real peft package: export_peft loads in
PeftModel.from_pretrained with our outputs, import_peft takes PEFT's own adapters with PEFT's
outputs."""
import copy
import json

import peft
import pytest
import torch
from safetensors.torch import load_file

import soslora_ext as sl
from soslora_ext.formats.files import AdapterError

from conftest import rel_err
from kinds_toy import TARGETS, toy, toy_ids


def randomized(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in sl.adapter_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.3)
            if getattr(layer, "gate_logits", None) is not None:
                layer.gate_logits.copy_(torch.randn(layer.gate_logits.shape, generator=g))
    return model


@pytest.mark.parametrize("apply,kwargs", [
    (sl.apply_sos_lora, dict(num_experts=2, rank=4, gate=True, scale_mode="channel")),
    (sl.apply_cps_lora, dict(num_clusters=1, rank=3)),
    (sl.apply_cps_lora, dict(num_clusters=2, rank=2)),
])
def test_export_loads_in_peft_with_our_outputs(tmp_path, apply, kwargs):
    targets = TARGETS if kwargs.get("num_clusters", 1) == 1 else \
        ["embed", "conv1", "conv3", "attn", "head"]  # conv2 has one input channel
    model = randomized(apply(toy(dtype=torch.float32), targets, **kwargs)).eval()
    ids = toy_ids()
    with torch.no_grad():
        ours = model(ids)
    sl.export_peft(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(targets)  # not the nested out_proj
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert tensors["base_model.model.embed.lora_embedding_A"].shape[1] == 30
    assert tensors["base_model.model.conv3.lora_A.weight"].dim() == 5
    assert tensors["base_model.model.conv3.lora_B.weight"].shape[2:] == (1, 1, 1)
    assert "base_model.model.attn.base_layer.out_proj.lora_A.weight" in tensors
    loaded = peft.PeftModel.from_pretrained(toy(dtype=torch.float32), tmp_path).eval()
    with torch.no_grad():
        theirs = loaded(ids)
    assert rel_err(theirs, ours) < 1e-5
    assert rel_err(ours, toy(dtype=torch.float32).eval()(ids)) > 1e-3  # the adapters matter


def peft_model(tmp_path, seed=5):
    """PEFT's own LoRA on every kind, its factors randomized (PEFT starts B, or an embedding's
    A, at zero), saved to tmp_path."""
    config = peft.LoraConfig(r=4, lora_alpha=6, target_modules=TARGETS,
                             rank_pattern={"conv2": 2}, alpha_pattern={"conv2": 3})
    model = peft.get_peft_model(toy(dtype=torch.float32), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.save_pretrained(tmp_path)
    return model.eval()


def test_import_takes_peft_adapters_of_every_kind_with_peft_outputs(tmp_path):
    theirs_model = peft_model(tmp_path)
    ids = toy_ids()
    with torch.no_grad():
        theirs = theirs_model(ids)
    model = sl.import_peft(toy(dtype=torch.float32), tmp_path, num_experts=2).eval()
    layers = dict(sl.adapter_layers(model))
    assert set(layers) == set(TARGETS) | {"attn.base_layer.out_proj"}
    assert all(isinstance(layer, sl.SOSLinear) for layer in layers.values())
    with torch.no_grad():
        ours = model(ids)
    assert rel_err(ours, theirs) < 1e-5
    # and back: our export of the imported adapters loads in PEFT with the same outputs
    sl.export_peft(model, tmp_path / "again")
    again = peft.PeftModel.from_pretrained(toy(dtype=torch.float32), tmp_path / "again").eval()
    with torch.no_grad():
        assert rel_err(again(ids), theirs) < 1e-5


def test_import_refuses_an_attention_lora_without_its_out_proj(tmp_path):
    peft_model(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    from safetensors.torch import save_file
    save_file({k: v for k, v in tensors.items() if "out_proj" not in k}, path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    from soslora_ext.formats.files import CONFIG_SHA256_KEY  # noqa: F401  (checked on read)
    with pytest.raises(AdapterError) as info:
        sl.import_peft(toy(dtype=torch.float32), tmp_path, num_experts=2)
    assert config["target_modules"] and "\n" not in str(info.value)


def test_import_refuses_factors_that_do_not_fit_the_kind(tmp_path):
    peft_model(tmp_path)
    model = toy(dtype=torch.float32)
    model.conv3 = torch.nn.Conv3d(4, 4, (1, 2, 2))  # another kernel: another matrix width
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterError, match="layer 'conv3': LoRA factors of shapes"):
        sl.import_peft(model, tmp_path, num_experts=2)
    assert not list(sl.adapter_layers(model))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_peft_adds_an_attention_out_proj_update_twice():
    """What PEFT_OUT_PROJ_FACTOR stands for: PEFT's nn.MultiheadAttention adapter (forward and
    merge_and_unload alike) adds twice scaling * B A to out_proj's weight. If a PEFT release
    changes this, the factor must follow it."""
    from soslora_ext.formats.peft import PEFT_OUT_PROJ_FACTOR

    model = peft.get_peft_model(toy(), peft.LoraConfig(r=2, lora_alpha=2,
                                                       target_modules=["attn"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    out_proj = model.base_model.model.attn.base_layer.out_proj
    before, delta = out_proj.base_layer.weight.clone(), out_proj.get_delta_weight("default")
    merged = model.merge_and_unload()
    assert rel_err(merged.attn.out_proj.weight - before, PEFT_OUT_PROJ_FACTOR * delta) < 1e-12


@pytest.mark.parametrize("make", [
    lambda: torch.nn.Embedding(30, 12, padding_idx=3, scale_grad_by_freq=True),
    lambda: torch.nn.Conv2d(3, 5, 3, stride=2, padding=1),
    lambda: torch.nn.Conv1d(3, 5, 4, padding="same"),
])
def test_factor_gradients_equal_peft_layers(make):
    """One expert with PEFT's factors computes PEFT's LoRA: outputs and the factors'
    gradients are PEFT's (padding_idx, scale_grad_by_freq, stride, padding as PEFT's)."""
    torch.manual_seed(0)
    base = make().double()
    holder = torch.nn.Sequential(base)
    theirs = peft.get_peft_model(holder, peft.LoraConfig(r=4, lora_alpha=4,
                                                         target_modules=["0"]))
    layer_p = theirs.base_model.model[0]
    with torch.no_grad():
        for name, p in layer_p.named_parameters():
            if "lora_" in name:
                p.normal_()
    embedding = isinstance(base, torch.nn.Embedding)
    A_p = layer_p.lora_embedding_A["default"] if embedding else layer_p.lora_A["default"].weight
    B_p = layer_p.lora_embedding_B["default"] if embedding else layer_p.lora_B["default"].weight
    ours = sl.SOSLinear(copy.deepcopy(base), num_experts=1, rank=4, alpha=4.0)
    with torch.no_grad():
        ours.lora_A.copy_(A_p.reshape(4, -1))
        ours.lora_B.copy_(B_p.reshape(B_p.shape[0], 4) / ours._rank_scale())
    spatial = (9, 8) if isinstance(base, torch.nn.Conv2d) else (9,)
    x = torch.tensor([[3, 1, 1, 7], [3, 2, 1, 1]]) if embedding else \
        torch.randn(2, 3, *spatial, dtype=torch.float64)
    w = torch.randn(layer_p(x).shape, dtype=torch.float64)
    (layer_p(x) * w).sum().backward()
    (ours(x) * w).sum().backward()
    assert rel_err(ours(x), layer_p(x)) < 1e-12
    assert rel_err(ours.lora_A.grad, A_p.grad.reshape(4, -1)) < 1e-12
    assert rel_err(ours.lora_B.grad * ours._rank_scale().detach(),
                   B_p.grad.reshape(B_p.shape[0], 4)) < 1e-12


def test_dilated_convolutions_are_refused_both_ways(tmp_path):
    """PEFT's convolution adapter ignores dilation: neither direction can give its outputs."""
    model = sl.apply_sos_lora(toy(), ["conv1"], num_experts=1, rank=2)
    model.conv1.base_layer.dilation = (2,)  # as if built dilated
    with pytest.raises(AdapterError, match="layer 'conv1' is a Conv1d with dilation \\(2,\\): "
                                           "PEFT's convolution adapter ignores"):
        sl.export_peft(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    peft_model(tmp_path)
    dilated = toy(dtype=torch.float32)
    dilated.conv1.dilation = (2,)
    with pytest.raises(AdapterError, match="ignores the base's dilation"):
        sl.import_peft(dilated, tmp_path, num_experts=2)
    assert not list(sl.adapter_layers(dilated))
