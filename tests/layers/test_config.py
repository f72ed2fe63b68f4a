"""SOSConfig and CPSConfig: every field documents itself, the layers and apply_* take a config
(from_config, config=) with keyword overrides, and the command line's help reads the fields'."""
import dataclasses

import pytest
import torch
import torch.nn as nn

import soslora_ext as sl
from soslora_ext.cli import main
from soslora_ext.layers.config import field_help

CONFIGS = [(sl.SOSConfig, sl.SOSLinear), (sl.CPSConfig, sl.CPSLinear)]


@pytest.mark.parametrize("config_class", [sl.SOSConfig, sl.CPSConfig])
def test_every_field_has_help(config_class):
    for f in dataclasses.fields(config_class):
        text = f.metadata.get("help", "")
        assert len(text) > 10 and text == field_help(config_class, f.name), f.name
    with pytest.raises(KeyError, match="no field 'nope'"):
        field_help(config_class, "nope")


def same_layer(a, b):
    """Same config, same parameters and buffers (the random init drawn from the same seed)."""
    assert a.config == b.config
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("config,fields", [
    (sl.SOSConfig.preset("official", rank=8), {}),
    (sl.SOSConfig(num_experts=2, rank=6, alpha=3.0, scale_mode="channel", gate=True,
                  dropout=0.1, dropout_position="pre"), {}),
    (sl.CPSConfig(num_clusters=3, rank_per_cluster=(1, 2, 3), alpha=4.0, use_rslora=True), {}),
])
def test_from_config_equals_the_keyword_form(config, fields):
    layer_class = sl.SOSLinear if isinstance(config, sl.SOSConfig) else sl.CPSLinear
    base = nn.Linear(13, 11, dtype=torch.float64)
    torch.manual_seed(0)
    from_config = layer_class.from_config(base, config)
    torch.manual_seed(0)
    keywords = layer_class(base, **config.to_dict())
    torch.manual_seed(0)
    positional = layer_class(base, config)
    same_layer(from_config, keywords)
    same_layer(from_config, positional)
    assert from_config.config is config  # held, not copied


@pytest.mark.parametrize("config_class,layer_class", CONFIGS)
def test_keywords_override_the_config(config_class, layer_class):
    config = config_class(rank=2, **({"num_experts": 2} if config_class is sl.SOSConfig else {}))
    layer = layer_class(nn.Linear(16, 12), config, alpha=2.0)
    assert layer.config == dataclasses.replace(config, alpha=2.0)
    assert config.alpha != 2.0  # the given config is unchanged


@pytest.mark.parametrize("config_class,layer_class", CONFIGS)
def test_a_bad_config_or_field_is_named(config_class, layer_class):
    name = layer_class.__name__
    with pytest.raises(TypeError, match=rf"{name}: config must be a {config_class.__name__} "
                                        "instance, got dict"):
        layer_class(nn.Linear(8, 8), {"rank": 2})
    with pytest.raises(TypeError, match=rf"{name}: unknown argument\(s\) \['rnk'\]"):
        layer_class(nn.Linear(8, 8), rnk=2)
    other = sl.CPSConfig() if config_class is sl.SOSConfig else sl.SOSConfig()
    with pytest.raises(TypeError, match="config must be"):
        layer_class.from_config(nn.Linear(8, 8), other)
    with pytest.raises(ValueError, match="rank must be a positive int"):
        layer_class(nn.Linear(8, 8), config_class(), rank=0)


def test_apply_takes_a_config():
    def model():
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 6))

    config = sl.SOSConfig.preset("official", rank=4)
    torch.manual_seed(2)
    by_config = sl.apply_sos_lora(model(), ["0", "2"], config=config)
    torch.manual_seed(2)
    by_preset = sl.apply_sos_lora(model(), ["0", "2"], preset="official", rank=4)
    for name in ("0", "2"):
        same_layer(by_config.get_submodule(name), by_preset.get_submodule(name))
    cps = sl.apply_cps_lora(model(), ["2"], config=sl.CPSConfig(num_clusters=2, rank=2),
                            alpha=1.0)
    assert cps[2].config == sl.CPSConfig(num_clusters=2, rank=2, alpha=1.0)

    untouched = model()
    before = {k: v.clone() for k, v in untouched.state_dict().items()}
    with pytest.raises(ValueError, match="apply_sos_lora: give a preset or a config, not both"):
        sl.apply_sos_lora(untouched, ["0"], preset="official", config=config)
    with pytest.raises(TypeError, match=r"apply_cps_lora: unknown argument\(s\) \['clusters'\]"):
        sl.apply_cps_lora(untouched, ["0"], clusters=2)
    assert isinstance(untouched[0], nn.Linear)
    assert all(torch.equal(before[k], v) for k, v in untouched.state_dict().items())


def test_the_command_line_help_reads_the_fields(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    # argparse wraps the help: compare with whitespace normalized
    out = " ".join(capsys.readouterr().out.split())
    for config_class, name in [(sl.SOSConfig, "num_experts"), (sl.SOSConfig, "scale_mode"),
                               (sl.SOSConfig, "gate"), (sl.CPSConfig, "num_clusters"),
                               (sl.CPSConfig, "repartition_every"), (sl.CPSConfig, "dropout")]:
        assert " ".join(field_help(config_class, name).split()) in out, name
