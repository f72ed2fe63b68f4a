"""save_adapter / load_adapter, and exact conversion to and from the real PEFT package."""
import json
import os

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

import soslora_ext as sl
from soslora_ext.formats.native import CONFIG_NAME, WEIGHTS_NAME

from conftest import rel_err, restamp_adapter


def llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=56, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def bert(seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=64, hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=40, max_position_embeddings=32, num_labels=3)
    return BertForSequenceClassification(cfg).eval()


def randomize(model):
    """Give every trainable tensor (and the gate temperature) values far from init."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)
        for _, layer in sl.sos_layers(model):
            if layer.config.gate:
                layer.gate_temperature.fill_(1.37)
    return model


def adapted_llama(**kw):
    model = llama()
    sl.apply_sos_lora(model, ["q_proj", "v_proj", "down_proj"],
                      **{"num_experts": 4, "rank": 8, "alpha": 16.0, "scale_mode": "channel",
                         "gate": True, **kw})
    return randomize(model)


def adapted_bert():
    model = bert()
    sl.apply_sos_lora(model, r".*attention\.self\.(query|value)", modules_to_save=["classifier"],
                      num_experts=2, rank=4, alpha=8.0)
    return randomize(model)


IDS = torch.randint(0, 60, (2, 7))


def outputs(model):
    with torch.no_grad():
        out = model(IDS)
    return out.logits


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in after)


@pytest.mark.parametrize("make,fresh", [(adapted_llama, llama), (adapted_bert, bert)])
def test_save_load_round_trip_bit_exact(tmp_path, make, fresh):
    model = make()
    expected = outputs(model)
    sl.save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / CONFIG_NAME).read_text())
    assert config["library_version"] == sl.__version__ and config["method"] == "sos"
    assert all("config" in m for m in config["modules"].values())
    loaded = sl.load_adapter(fresh(seed=0), tmp_path / "adapter")
    assert torch.equal(outputs(loaded), expected)
    for (n1, a), (n2, b) in zip(sl.sos_layers(model), sl.sos_layers(loaded)):
        assert n1 == n2 and a.config == b.config
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                       b.state_dict().values()))
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == \
        {n for n, p in model.named_parameters() if p.requires_grad}


def test_save_is_atomic_when_interrupted(tmp_path, monkeypatch):
    model = adapted_llama()
    target = tmp_path / "adapter"
    sl.save_adapter(model, target)
    good = {p.name: p.read_bytes() for p in target.iterdir()}
    randomize(model)

    real_write = os.write

    def interrupted(fd, data):  # part of the weights reaches the file, then Ctrl-C
        real_write(fd, bytes(data[:100]))
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sl.save_adapter(model, target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == good  # no temporaries left


def _rewrite_weights(directory, edit):
    """Edit the tensors and re-stamp the checksums, as a buggy writer would."""
    tensors = load_file(str(directory / WEIGHTS_NAME))
    edit(tensors)
    save_file(tensors, str(directory / WEIGHTS_NAME))
    restamp_adapter(directory)


_edit_config = restamp_adapter  # (directory, edit): edit the config, re-stamp the checksums


Q0 = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("damage,match", [
    (lambda d: (d / WEIGHTS_NAME).write_bytes((d / WEIGHTS_NAME).read_bytes()[:-100]),
     r"header declares \d+ \(the file is truncated"),
    (lambda d: (d / WEIGHTS_NAME).write_bytes(  # a byte of tensor data (past the header)
        bytes(b ^ 0xFF if i == 5000 else b for i, b in enumerate((d / WEIGHTS_NAME).read_bytes()))),
     "checksum"),
    (lambda d: (d / WEIGHTS_NAME).write_bytes(  # a byte of the header
        bytes(b ^ 0xFF if i == 500 else b for i, b in enumerate((d / WEIGHTS_NAME).read_bytes()))),
     "unreadable safetensors file"),
    (lambda d: (d / CONFIG_NAME).write_text("{not json"), "not valid JSON"),
    (lambda d: (d / WEIGHTS_NAME).unlink(), "file not found"),
    (lambda d: _edit_config(d, lambda c: c.update(format="peft")), "is not a soslora_ext"),
    (lambda d: _edit_config(d, lambda c: c["modules"][Q0].update(in_features=31)),
     f"layer '{Q0}': adapter is for in/out features"),
    (lambda d: _edit_config(d, lambda c: c["modules"][Q0]["config"].update(rank=16)),
     f"layer '{Q0}': tensor 'lora_A'"),
    (lambda d: _edit_config(d, lambda c: c["modules"][Q0]["config"].update(rank_mode="bad")),
     f"layer '{Q0}': bad entry"),
    (lambda d: _edit_config(d, lambda c: c["modules"][Q0].update(dtype="Tensor")),
     f"layer '{Q0}': bad entry"),
    (lambda d: _edit_config(d, lambda c: c["modules"][Q0].update(in_features="32")),
     f"layer '{Q0}': adapter is for"),
    (lambda d: _edit_config(d, lambda c: c["modules"].update(
        {"model.layers.9.mlp": c["modules"][Q0]})), "layer 'model.layers.9.mlp': no such module"),
    (lambda d: _rewrite_weights(d, lambda t: t.pop(f"{Q0}.lora_B")),
     f"layer '{Q0}': tensor 'lora_B' is missing"),
    (lambda d: _rewrite_weights(d, lambda t: t.update(stray=torch.ones(2))), "no layer uses"),
    (lambda d: _rewrite_weights(d, lambda t: t[f"{Q0}.lora_A"].fill_(float("nan"))),
     "non-finite"),
    (lambda d: _rewrite_weights(d, lambda t: t.update(
        {f"{Q0}.lora_A": t[f"{Q0}.lora_A"].double()})), "expected torch.float32"),
])
def test_load_refuses_bad_adapters_and_changes_nothing(tmp_path, damage, match):
    sl.save_adapter(adapted_llama(), tmp_path)
    damage(tmp_path)
    fresh = llama()
    before = snapshot(fresh)
    with pytest.raises(sl.AdapterError, match=match):
        sl.load_adapter(fresh, tmp_path)
    assert not list(sl.sos_layers(fresh))
    assert_unchanged(fresh, before)


def test_load_adapter_points_peft_directories_to_import_peft(tmp_path):
    peft.get_peft_model(llama(), peft.LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(
        str(tmp_path))
    with pytest.raises(sl.AdapterError, match="for PEFT adapters use import_peft"):
        sl.load_adapter(llama(), tmp_path)


def test_load_refuses_other_architecture_and_adapted_model(tmp_path):
    sl.save_adapter(adapted_llama(), tmp_path)
    with pytest.raises(sl.AdapterError, match="no such module in BertForSequenceClassification"):
        sl.load_adapter(bert(), tmp_path)
    with pytest.raises(sl.AdapterError, match="already has an adapter"):
        sl.load_adapter(adapted_llama(), tmp_path)


# ---- PEFT -----------------------------------------------------------------------------------
@pytest.mark.parametrize("make,fresh", [(adapted_llama, llama), (adapted_bert, bert)])
def test_export_peft_loaded_by_real_peft_matches(tmp_path, make, fresh):
    model = make()
    expected = outputs(model)
    sl.export_peft(model, tmp_path)
    peft_model = peft.PeftModel.from_pretrained(fresh(seed=0), str(tmp_path)).eval()
    assert rel_err(outputs(peft_model), expected) <= 1e-5
    # PEFT's own merge agrees too.
    assert rel_err(outputs(peft_model.merge_and_unload()), expected) <= 1e-5


def test_export_peft_with_mixed_ranks_uses_patterns(tmp_path):
    model = llama()
    sl.apply_sos_lora(model, ["q_proj"], num_experts=2, rank=4)
    sl.apply_sos_lora(model, ["v_proj"], num_experts=3, rank=2, rank_mode="expert")
    randomize(model)
    expected = outputs(model)
    sl.export_peft(model, tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["rank_pattern"] and config["alpha_pattern"] == config["rank_pattern"]
    peft_model = peft.PeftModel.from_pretrained(llama(), str(tmp_path)).eval()
    assert rel_err(outputs(peft_model), expected) <= 1e-5


def test_export_refuses_merged_layer(tmp_path):
    model = adapted_llama()
    dict(sl.sos_layers(model))[Q0].merge()
    with pytest.raises(sl.AdapterError, match="is merged"):
        sl.export_peft(model, tmp_path)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_import_adapter_made_by_peft(tmp_path, use_rslora):
    torch.manual_seed(3)
    base = llama()
    cfg = peft.LoraConfig(r=8, lora_alpha=12, target_modules=["q_proj", "v_proj", "up_proj"],
                          rank_pattern={"up_proj": 4}, alpha_pattern={"v_proj": 20},
                          use_rslora=use_rslora)
    peft_model = peft.get_peft_model(base, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)
    peft_model.eval()
    expected = outputs(peft_model)
    peft_model.save_pretrained(str(tmp_path))

    model = sl.import_peft(llama(), tmp_path, num_experts=4, alpha=16.0, scale_mode="channel")
    layers = dict(sl.sos_layers(model))
    assert len(layers) == 6 and layers["model.layers.0.mlp.up_proj"].config.r_total == 4
    assert rel_err(outputs(model), expected) <= 1e-5
    # And back: our export of the imported adapter gives PEFT the same outputs again.
    sl.export_peft(model, tmp_path / "again")
    again = peft.PeftModel.from_pretrained(llama(), str(tmp_path / "again")).eval()
    assert rel_err(outputs(again), expected) <= 1e-5


def test_import_refuses_rank_not_divisible(tmp_path):
    peft_model = peft.get_peft_model(llama(), peft.LoraConfig(r=6, target_modules=["q_proj"]))
    peft_model.save_pretrained(str(tmp_path))
    fresh = llama()
    before = snapshot(fresh)
    with pytest.raises(sl.AdapterError, match="rank 6 is not divisible by num_experts=4"):
        sl.import_peft(fresh, tmp_path, num_experts=4)
    assert_unchanged(fresh, before)
