"""apply_sos_lora / apply_cps_lora over a model with every base kind (nn.Embedding,
nn.Conv1d/2d/3d, nn.MultiheadAttention, nn.Linear): PEFT's targeting, training, the recorded
calls, merge_and_unload, and one-line refusals naming the module and its type."""
import warnings

import pytest
import torch
import torch.nn as nn

import soslora_ext as sl

from kinds_toy import TARGETS, toy


@pytest.mark.parametrize("apply,kwargs", [
    (sl.apply_sos_lora, dict(num_experts=2, rank=4)),
    (sl.apply_cps_lora, dict(num_clusters=1, rank=2)),
])
def test_every_kind_trains_merges_and_unloads(apply, kwargs):
    model = apply(toy(), TARGETS, **kwargs)
    names = dict(sl.adapter_layers(model))
    assert set(names) == set(TARGETS) | {"attn.base_layer.out_proj"}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "expert_scales" in n or "gate" in n
                             for n in trainable)
    assert any(n.startswith("attn.base_layer.out_proj.lora_") for n in trainable)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 30, (4, 6), generator=g)
    target = torch.randn(4, 5, generator=g, dtype=torch.float64)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no bypass warning: every adapter is called
        for _ in range(15):
            loss = (model(ids) - target).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    sl.check_adapters_called(model)
    for name, layer in sl.adapter_layers(model):
        assert layer.lora_B.abs().max() > 0, name  # every adapter got a gradient
    model.eval()
    with torch.no_grad():
        expected = model(ids)
        sl.merge_and_unload(model)
        assert not list(sl.adapter_layers(model))
        assert type(model.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
        assert isinstance(model.embed, nn.Embedding) and isinstance(model.conv2, nn.Conv2d)
        assert (model(ids) - expected).abs().max() < 1e-10


@pytest.mark.parametrize("target,match", [
    ("norm", "module 'norm' matched target_modules but is a LayerNorm"),
    ("grouped", "module 'grouped'.*Conv1d with groups=2"),
    ("out_proj", "module 'attn.out_proj' is the out_proj of 'attn'"),
])
def test_unsupported_targets_are_refused_by_module_and_type(target, match):
    model = toy()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises((TypeError, ValueError), match=match) as info:
        sl.apply_sos_lora(model, ["embed", target], num_experts=1, rank=2)
    assert "\n" not in str(info.value)
    assert not list(sl.adapter_layers(model))  # nothing changed
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


def test_regex_targets_and_cps_fit_on_channels():
    model = sl.apply_cps_lora(toy(), r"conv[13]", num_clusters=2, rank=2)
    assert {n for n, _ in sl.adapter_layers(model)} == {"conv1", "conv3"}
    with pytest.raises(ValueError, match="num_clusters=2 is more than the layer's rows"):
        sl.apply_cps_lora(toy(), ["conv2"], num_clusters=2, rank=1)  # 1 input channel
    # rank up to the block's matrix columns: 1 channel x 9 taps
    model = sl.apply_cps_lora(toy(), ["conv2"], num_clusters=1, rank=4)
    assert model.conv2.lora_A.shape == (4, 9)


def test_cps_repartitions_are_refused_on_other_kinds():
    with pytest.raises(ValueError, match="module 'conv1' \\(type Conv1d\\): repartition_every=4 is "
                                         "supported on linear layers only"):
        sl.apply_cps_lora(toy(), ["head", "conv1"], num_clusters=1, rank=2,
                          repartition_every=4)
    model = sl.apply_cps_lora(toy(), ["head"], num_clusters=1, rank=2, repartition_every=4)
    sl.apply_cps_lora(model, ["conv1"], num_clusters=1, rank=2)  # a second call, no schedule
    assert {n for n, _ in sl.adapter_layers(model)} == {"head", "conv1"}
