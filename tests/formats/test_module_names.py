"""A module registered under several names: adapted under every name, and so saved, loaded and
exported under every name (or refused where a format cannot hold it)."""
import copy
import json

import peft
import pytest
import torch
import torch.nn as nn
from transformers import LlamaConfig, LlamaForCausalLM

import soslora_ext as sl
from soslora_ext.formats.native import CONFIG_NAME

from conftest import restamp_adapter

IDS = torch.randint(0, 90, (2, 7))
Q, K = "model.layers.{}.self_attn.q_proj", "model.layers.{}.self_attn.k_proj"


def llama(tie=True, seed=0):
    """A tiny Llama whose attention uses one projection as its queries and keys: q_proj and
    k_proj are one nn.Linear under two names (tie=False: two modules with the same weights)."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=56, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)).eval()
    for layer in model.model.layers:
        attn = layer.self_attn
        attn.k_proj = attn.q_proj if tie else copy.deepcopy(attn.q_proj)
    return model


def trained(tie=True, **kwargs):
    model = sl.apply_sos_lora(llama(tie), ["q_proj", "v_proj"], num_experts=2, rank=4, **kwargs)
    torch.manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)
    return model


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def test_the_trained_model_adapts_both_names():
    model = trained()
    attn = model.model.layers[0].self_attn
    assert isinstance(attn.q_proj, sl.SOSLinear) and attn.k_proj is attn.q_proj
    # Were k_proj left plain, the outputs would differ: the adapter matters under both names.
    plain = copy.deepcopy(model)
    for layer in plain.model.layers:
        layer.self_attn.k_proj = layer.self_attn.q_proj.base_layer
    assert not torch.allclose(logits(plain), logits(model))


def test_save_records_every_name(tmp_path):
    sl.save_adapter(trained(), tmp_path)
    config = sl.formats.native.read_adapter_config(tmp_path)
    assert config["aliases"] == {Q.format(i): [K.format(i)] for i in range(2)}
    assert sorted(config["modules"]) == sorted([Q.format(i) for i in range(2)]
                                               + [f"model.layers.{i}.self_attn.v_proj"
                                                  for i in range(2)])


def test_load_into_a_model_with_the_same_tie_gives_the_trained_outputs(tmp_path):
    # Before: load_adapter replaced q_proj only; k_proj stayed the plain base layer.
    model = trained()
    sl.save_adapter(model, tmp_path)
    fresh = sl.load_adapter(llama(), tmp_path)
    assert torch.equal(logits(fresh), logits(model))
    for layer in fresh.model.layers:
        attn = layer.self_attn
        assert isinstance(attn.q_proj, sl.SOSLinear) and attn.k_proj is attn.q_proj
    assert sl.trainable_parameters(fresh) == sl.trainable_parameters(model)


def test_load_into_a_model_where_the_names_are_two_modules_adapts_both(tmp_path):
    # Decided: each module gets the saved adapter (its own copy), which is the trained function
    # when their base weights are the trained model's one weight.
    model = trained()
    sl.save_adapter(model, tmp_path)
    fresh = sl.load_adapter(llama(tie=False), tmp_path)
    assert torch.equal(logits(fresh), logits(model))
    for layer in fresh.model.layers:
        attn = layer.self_attn
        assert isinstance(attn.k_proj, sl.SOSLinear) and attn.k_proj is not attn.q_proj
        assert torch.equal(attn.k_proj.lora_B, attn.q_proj.lora_B)
        assert attn.k_proj.base_layer is not attn.q_proj.base_layer
    # Saved again, the two are two layers, each under its own name.
    sl.save_adapter(fresh, tmp_path / "again")
    config = sl.formats.native.read_adapter_config(tmp_path / "again")
    assert config["aliases"] == {} and K.format(0) in config["modules"]


@pytest.mark.parametrize("tie", [True, False])
def test_loaded_layers_under_two_names_merge_once(tmp_path, tie):
    model = trained()
    sl.save_adapter(model, tmp_path)
    merged = sl.merge_and_unload(sl.load_adapter(llama(tie), tmp_path))
    attn = merged.model.layers[0].self_attn
    assert type(attn.k_proj) is nn.Linear and (attn.k_proj is attn.q_proj) == tie
    # Merged once: within float32 rounding of the unmerged logits (a few 1e-7 here, more with
    # another reduction order), while the update itself moves them by more than 0.1, and
    # merging it twice, or not at all, by as much.
    assert (logits(model) - logits(llama(tie))).abs().max() > 0.1
    torch.testing.assert_close(logits(merged), logits(model), rtol=0, atol=1e-4)


def test_an_alias_that_does_not_fit_is_refused_and_nothing_changes(tmp_path):
    sl.save_adapter(trained(), tmp_path)
    fresh = llama(tie=False)
    fresh.model.layers[1].self_attn.k_proj = nn.Linear(32, 16)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(sl.AdapterError, match=f"layer {K.format(1)!r}: adapter is for in/out "
                                              r"features \(32, 32\)"):
        sl.load_adapter(fresh, tmp_path)
    assert not list(sl.adapter_layers(fresh))
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())
    del fresh.model.layers[1].self_attn.k_proj
    with pytest.raises(sl.AdapterError, match=f"layer {K.format(1)!r}: no such module"):
        sl.load_adapter(fresh, tmp_path)


def test_adapters_saved_before_names_were_recorded_follow_the_models_tie(tmp_path):
    # Saved by a version that recorded one name per module (no "aliases" key): a model with
    # the tie adapts the module under all its names, as apply_sos_lora does.
    model = trained()
    sl.save_adapter(model, tmp_path)
    restamp_adapter(tmp_path, lambda config: config.pop("aliases"))
    fresh = sl.load_adapter(llama(), tmp_path)
    assert torch.equal(logits(fresh), logits(model))
    assert fresh.model.layers[0].self_attn.k_proj is fresh.model.layers[0].self_attn.q_proj
    # Two separate modules: only the recorded name (nothing says the other was adapted).
    untied = sl.load_adapter(llama(tie=False), tmp_path)
    assert type(untied.model.layers[0].self_attn.k_proj) is nn.Linear


def test_a_name_the_adapter_does_not_record_is_refused(tmp_path):
    # Saved from a model where k_proj was its own module, not adapted; in this model k_proj is
    # q_proj. Put under q_proj alone, the layer would leave a plain path to its base (which a
    # merge would change); under both, k_proj would compute something else than trained.
    model = sl.apply_sos_lora(llama(tie=False), ["q_proj"], num_experts=2, rank=4)
    sl.save_adapter(model, tmp_path)
    fresh = llama()
    with pytest.raises(sl.AdapterError, match=f"layer {Q.format(0)!r}: LlamaForCausalLM also "
                                              f"registers it as {K.format(0)!r}, a name the "
                                              "adapter does not record"):
        sl.load_adapter(fresh, tmp_path)
    assert not list(sl.adapter_layers(fresh))


class SharedBlock(nn.Module):
    """`first` and `second` are one block (so `first.proj` is `second.proj`) unless untied."""

    def __init__(self, tie=True):
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Sequential()
        self.first.add_module("proj", nn.Linear(6, 6))
        self.second = self.first if tie else copy.deepcopy(self.first)
        self.head = nn.Linear(6, 2)
        self.head_again = self.head if tie else copy.deepcopy(self.head)

    def forward(self, x):
        return self.head_again(self.second.proj(self.head(self.first.proj(x)).repeat(1, 3)))


def shared_block(tie=True):
    model = sl.apply_sos_lora(SharedBlock(tie), ["proj"], modules_to_save=["head"],
                              num_experts=2, rank=2)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)
    return model


def test_modules_saved_whole_and_paths_through_a_shared_parent(tmp_path):
    model = shared_block()
    sl.save_adapter(model, tmp_path)
    assert sl.formats.native.read_adapter_config(tmp_path)["aliases"] == {
        "first.proj": ["second.proj"], "head": ["head_again"]}
    x = torch.randn(3, 6)
    for tie in (True, False):
        fresh = sl.load_adapter(SharedBlock(tie), tmp_path)
        assert torch.equal(fresh(x), model(x)), tie
        assert fresh.head_again.weight.requires_grad


@pytest.mark.parametrize("recorded", [True, False])
def test_two_saved_layers_that_are_one_module_in_the_model_are_refused(tmp_path, recorded):
    # Saved from a model where first and second were two blocks, each adapted: in a model where
    # they are one block, first.proj is second.proj and cannot hold two layers.
    sl.save_adapter(shared_block(tie=False), tmp_path)
    if not recorded:  # saved before names were recorded: the same
        restamp_adapter(tmp_path, lambda config: config.pop("aliases"))
    fresh = SharedBlock()
    with pytest.raises(sl.AdapterError, match="layers 'first.proj' and 'second.proj' are one "
                                              "module in SharedBlock"):
        sl.load_adapter(fresh, tmp_path)
    assert not list(sl.adapter_layers(fresh))


@pytest.mark.parametrize("edit,match", [
    (lambda c: c.update(aliases=[]), "aliases must map"),
    (lambda c: c.update(aliases={"nowhere": ["x"]}),
     "'nowhere', which is neither adapted nor saved"),
    (lambda c: c["aliases"].update({Q.format(0): [Q.format(1)]}), "named twice"),
    (lambda c: c["aliases"].update({Q.format(0): [Q.format(1) + ".base_layer"]}),
     "lies inside, the adapted layer"),
    (lambda c: c["aliases"].update({Q.format(0): [""]}), "is not a dotted module path"),
])
def test_edited_aliases_are_refused(tmp_path, edit, match):
    sl.save_adapter(trained(), tmp_path)
    restamp_adapter(tmp_path, edit)
    fresh = llama()
    with pytest.raises(sl.AdapterError, match=match):
        sl.load_adapter(fresh, tmp_path)
    assert not list(sl.adapter_layers(fresh))


# ---- PEFT ------------------------------------------------------------------------------------
def test_real_peft_adapts_a_module_registered_twice_under_its_first_name_only(tmp_path):
    # What export_peft must reckon with (peft 0.21): get_peft_model and from_pretrained walk
    # named_modules(), which yields a module once, so k_proj stays the plain nn.Linear.
    model = peft.get_peft_model(llama(), peft.LoraConfig(r=4, target_modules=["q_proj",
                                                                              "k_proj"]))
    attn = model.base_model.model.model.layers[0].self_attn
    assert type(attn.k_proj) is nn.Linear and attn.k_proj is attn.q_proj.base_layer
    model.save_pretrained(str(tmp_path))
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert sorted(saved["target_modules"]) == ["k_proj", "q_proj"]


def test_export_peft_refuses_a_module_under_several_names(tmp_path):
    # Before: written under q_proj only; PeftModel.from_pretrained gave other logits, silently.
    # No PEFT adapter can give the trained logits (see the test above): refused, nothing written.
    with pytest.raises(sl.AdapterError, match=rf"export_peft: layer {Q.format(0)!r} is "
                                              rf"registered under several names \(also "
                                              rf"{K.format(0)!r}\).*save_adapter"):
        sl.export_peft(trained(), tmp_path / "peft")
    assert not (tmp_path / "peft").exists()
    model = shared_block()
    model.second = copy.deepcopy(model.second)  # two blocks, two layers: the head remains
    with pytest.raises(sl.AdapterError, match="module saved whole 'head' is registered under "
                                              "several names"):
        sl.export_peft(model, tmp_path / "peft")


def test_untied_before_export_the_peft_adapter_gives_the_trained_logits(tmp_path):
    # The way out the refusal names: one module per name (the same adapter under each).
    model = trained()
    expected = logits(model)
    for layer in model.model.layers:
        layer.self_attn.k_proj = copy.deepcopy(layer.self_attn.q_proj)
    sl.export_peft(model, tmp_path)
    loaded = peft.PeftModel.from_pretrained(llama(tie=False), str(tmp_path)).eval()
    assert torch.allclose(logits(loaded), expected, rtol=1e-5, atol=1e-5)
    imported = sl.import_peft(llama(), tmp_path, num_experts=2)
    assert torch.allclose(logits(imported), expected, rtol=1e-5, atol=1e-5)


def test_compose_refuses_to_write_a_peft_adapter_of_a_module_under_several_names(tmp_path):
    from soslora_ext import compose

    sl.save_adapter(trained(), tmp_path / "a")
    adapter = compose.load(tmp_path / "a")
    assert adapter.aliases == {Q.format(i): [K.format(i)] for i in range(2)}
    with pytest.raises(sl.AdapterError, match="registered under several names"):
        adapter.save_peft(tmp_path / "peft")
    with pytest.raises(sl.AdapterError, match="registered under several names"):
        compose.from_model(trained()).save_peft(tmp_path / "peft")
    assert not (tmp_path / "peft").exists()
    assert json.loads((tmp_path / "a" / CONFIG_NAME).read_text())["aliases"]
