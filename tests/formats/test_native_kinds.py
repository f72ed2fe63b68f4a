"""Our format (save_adapter / load_adapter / read_adapter) for every base kind: bit-exact
round trips, the kind and kernel recorded and checked against the model."""
import json

import pytest
import torch

import soslora_ext as sl
from soslora_ext.formats.files import AdapterError
from soslora_ext.formats.native import read_adapter

from kinds_toy import TARGETS, toy, toy_ids

METHODS = [(sl.apply_sos_lora, dict(num_experts=2, rank=4, gate=True, scale_mode="channel")),
           (sl.apply_cps_lora, dict(num_clusters=1, rank=3))]


def trained(apply, kwargs, targets=TARGETS):
    model = apply(toy(), targets, **kwargs)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, layer in sl.adapter_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g, dtype=torch.float64))
    return model.eval()


@pytest.mark.parametrize("apply,kwargs", METHODS)
def test_save_load_is_bit_exact_for_every_kind(tmp_path, apply, kwargs):
    model = trained(apply, kwargs)
    ids = toy_ids()
    with torch.no_grad():
        expected = model(ids)
    sl.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    entries = config["modules"]
    assert entries["conv3"]["base_kind"] == "Conv3d"
    assert entries["conv3"]["kernel_size"] == [1, 3, 3]
    assert entries["embed"]["base_kind"] == "Embedding" and "base_kind" not in entries["head"]
    assert entries["attn"]["base_kind"] == "MultiheadAttention"
    assert "base_kind" not in entries["attn.base_layer.out_proj"]
    loaded = sl.load_adapter(toy(), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids), expected)
    _, layers, _ = read_adapter(tmp_path)
    mine = dict(sl.adapter_layers(model))
    for name, layer in layers.items():
        assert torch.equal(layer.delta_weight(), mine[name].delta_weight()), name


def test_cps_partition_of_a_convolution_round_trips(tmp_path):
    model = trained(sl.apply_cps_lora, dict(num_clusters=2, rank=2), ["conv1", "conv3"])
    sl.save_adapter(model, tmp_path)
    loaded = sl.load_adapter(toy(), tmp_path)
    for name in ("conv1", "conv3"):
        assert all(torch.equal(a, b) for a, b in zip(getattr(model, name).partition(),
                                                   getattr(loaded, name).partition()))


def test_load_refuses_another_kind_or_kernel(tmp_path):
    sl.save_adapter(trained(*METHODS[0]), tmp_path)
    other = toy()
    other.conv3 = torch.nn.Conv3d(4, 4, (3, 3, 1), padding=(1, 1, 0)).double()
    with pytest.raises(AdapterError,
                       match=r"layer 'conv3': adapter is for kernel size \(1, 3, 3\)"):
        sl.load_adapter(other, tmp_path)
    other = toy()
    other.embed = torch.nn.Linear(30, 12).double()
    with pytest.raises(AdapterError, match="layer 'embed' is a Linear, not an nn.Embedding"):
        sl.load_adapter(other, tmp_path)
    assert not list(sl.adapter_layers(other))
