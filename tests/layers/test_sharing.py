"""Sharing is decided by memory, when a weight is written: merge, unmerge, merge_and_unload and
compose.sum_into refuse a weight whose memory another tensor of the model shares (however and
whenever the tie was made), naming it, with nothing changed; unmerge refuses a weight that is
not the one merge() wrote."""
import copy
import pickle

import pytest
import torch
import torch.nn as nn
from transformers import GPT2Config, GPT2LMHeadModel

import soslora_ext as sl
from soslora_ext import compose
from soslora_ext.compose.terms import Adapter, LowRankTerm
from soslora_ext.layers.sharing import fingerprint, overlap

from conftest import randomize_adapters


def gpt2(tied=True, seed=0):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(
        vocab_size=96, n_embd=32, n_layer=1, n_head=4, n_positions=64, bos_token_id=0,
        eos_token_id=0, tie_word_embeddings=tied)).eval()


def two_linears(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 6), nn.Linear(8, 6))


def values(model):
    """Every tensor of the model, cloned (tied ones under each name)."""
    return {n: t.detach().clone() for n, t in model.state_dict(keep_vars=True).items()}


def assert_values(model, before):
    now = values(model)
    assert now.keys() == before.keys()
    for n, t in now.items():
        assert torch.equal(t, before[n]), n


# ---- ties the old apply-time check missed ----------------------------------------------------
def test_a_second_parameter_on_the_same_storage_is_refused():
    # nn.Parameter(a.weight.data) is another Parameter object on the same memory: merging `0`
    # used to change `1` without a word.
    model = two_linears()
    model[1].weight = nn.Parameter(model[0].weight.data)
    sl.apply_sos_lora(model, ["0"], num_experts=2, rank=2)
    randomize_adapters(model)
    before = values(model)
    with pytest.raises(RuntimeError, match=r"SOSLinear.merge: the weight is shared with "
                                           r"\['1.weight'\] \(the same memory\)"):
        model[0].merge()
    assert not model[0].merged
    with pytest.raises(RuntimeError, match=r"merge_and_unload: layer '0': the weight is shared "
                                           r"with \['1.weight'\]"):
        sl.merge_and_unload(model)
    assert isinstance(model[0], sl.SOSLinear)
    assert_values(model, before)


def test_a_tie_made_after_apply_is_refused_by_merge_and_merge_and_unload():
    model = gpt2(tied=False)
    sl.apply_sos_lora(model, ["lm_head", "c_attn"], num_experts=2, rank=4)
    randomize_adapters(model)
    assert model.lm_head.weight_shared_with == []
    model.transformer.wte.weight = model.lm_head.base_layer.weight  # tied after apply
    assert model.lm_head.weight_shared_with == ["transformer.wte.weight"]
    before = values(model)
    with pytest.raises(RuntimeError, match=r"shared with \['transformer.wte.weight'\]"):
        model.lm_head.merge()
    with pytest.raises(RuntimeError, match=r"layer 'lm_head': the weight is shared with "
                                           r"\['transformer.wte.weight'\]"):
        sl.merge_and_unload(model)
    assert isinstance(model.transformer.h[0].attn.c_attn, sl.SOSLinear)  # nothing merged
    assert_values(model, before)


def test_views_and_plain_tensor_attributes_are_found_and_disjoint_parts_are_not():
    model = two_linears()
    sl.apply_sos_lora(model, ["0"], num_experts=2, rank=2)
    weight = model[0].base_layer.weight
    model[1].register_buffer("rows", weight.detach()[2:4])  # a view into two of its rows
    model[1].cache = weight.detach()[:, ::3]  # a strided view kept as a plain attribute
    assert model[0].weight_shared_with == ["1.cache", "1.rows"]
    with pytest.raises(RuntimeError, match=r"shared with \['1.cache', '1.rows'\]"):
        model[0].merge()

    # Two layers cut from one fused matrix, by rows or by columns, share no byte: both merge.
    rows, columns = torch.randn(12, 8), torch.randn(6, 16)
    for first, second in ((rows[:6], rows[6:]), (columns[:, :8], columns[:, 8:])):
        model = two_linears()
        model[0].weight, model[1].weight = nn.Parameter(first), nn.Parameter(second)
        assert not overlap(first, second)
        sl.apply_sos_lora(model, ["0", "1"], num_experts=2, rank=2)
        randomize_adapters(model)
        expected = [layer.weight + layer.delta_weight() for layer in model]
        sl.merge_and_unload(model)
        for layer, want in zip(model, expected):
            assert torch.allclose(layer.weight, want, atol=1e-6)


def test_the_same_parameter_under_two_adapted_modules_is_refused():
    model = two_linears()
    model[1].weight = model[0].weight  # one Parameter, two modules, both adapted
    sl.apply_sos_lora(model, ["0", "1"], num_experts=2, rank=2)
    randomize_adapters(model)
    before = values(model)
    with pytest.raises(RuntimeError, match=r"layer '0': the weight is shared with "
                                           r"\['1.base_layer.weight'\]"):
        sl.merge_and_unload(model)
    assert_values(model, before)


def test_layers_built_by_load_adapter_and_copies_of_the_model_know_their_model(tmp_path):
    # GPT-2's lm_head is tied to wte. Layers made by load_adapter used to know no tie at all.
    model = gpt2()
    sl.apply_sos_lora(model, ["lm_head"], num_experts=2, rank=4)
    randomize_adapters(model)
    sl.save_adapter(model, tmp_path)
    loaded = sl.load_adapter(gpt2(), tmp_path)
    before = values(loaded)
    with pytest.raises(RuntimeError, match=r"shared with \['transformer.wte.weight'\]"):
        loaded.lm_head.merge()
    assert_values(loaded, before)
    # A deep copy's layer searches the copy (not the original, not only itself).
    twin = copy.deepcopy(loaded)
    assert twin.lm_head.weight_shared_with == ["transformer.wte.weight"]
    with pytest.raises(RuntimeError, match="transformer.wte.weight"):
        twin.lm_head.merge()
    # So does a pickled one.
    thawed = pickle.loads(pickle.dumps(loaded))
    assert thawed.lm_head.weight_shared_with == ["transformer.wte.weight"]
    # A layer taken out of its model knows only itself: nothing else to find.
    alone = copy.deepcopy(loaded.lm_head)
    assert alone.weight_shared_with == []


# ---- unmerge: only from the weight merge() wrote ---------------------------------------------
def test_unmerge_refuses_a_weight_restored_replaced_or_cast_since_merge():
    model = nn.Sequential(nn.Linear(8, 6))
    sl.apply_sos_lora(model, ["0"], num_experts=2, rank=2)
    randomize_adapters(model)
    layer = model[0]
    original = layer.weight.detach().clone()
    layer.merge()
    merged = layer.weight.detach().clone()
    refused = r"SOSLinear.unmerge: the base weight is not the one merge\(\) wrote"

    with torch.no_grad():  # restored in place, e.g. from a checkpoint of the base
        layer.base_layer.weight.copy_(original)
    with pytest.raises(RuntimeError, match=refused):
        layer.unmerge()  # used to subtract the update again: off by the whole update
    assert layer.merged and torch.equal(layer.weight, original)
    layer.discard_merge()  # the way out: the weight no longer holds the update
    assert not layer.merged and torch.equal(layer.weight, original)

    layer.merge()
    layer.base_layer.weight = nn.Parameter(original.clone(), requires_grad=False)  # replaced
    with pytest.raises(RuntimeError, match=refused):
        layer.unmerge()
    assert torch.equal(layer.weight, original)
    # A replacement holding exactly the merged values is the merged weight: unmerged exactly.
    layer.base_layer.weight = nn.Parameter(merged.clone(), requires_grad=False)
    layer.unmerge()
    assert torch.allclose(layer.weight, original, atol=1e-5) and not layer.merged

    layer.merge()
    model.double()  # cast: not the weight merge() wrote, bit for bit
    with pytest.raises(RuntimeError, match=refused):
        layer.unmerge()


def test_unmerge_refuses_a_tie_made_after_merge():
    model = two_linears()
    sl.apply_sos_lora(model, ["0"], num_experts=2, rank=2)
    randomize_adapters(model)
    model[0].merge()
    model[1].weight = model[0].base_layer.weight
    before = values(model)
    with pytest.raises(RuntimeError, match=r"SOSLinear.unmerge: the weight is shared with "
                                           r"\['1.weight'\]"):
        model[0].unmerge()
    assert model[0].merged
    assert_values(model, before)


def test_a_merged_state_loaded_from_a_state_dict_is_fingerprinted():
    model = nn.Sequential(nn.Linear(8, 6))
    sl.apply_sos_lora(model, ["0"], num_experts=2, rank=2)
    randomize_adapters(model)
    original = model[0].weight.detach().clone()
    model[0].merge()
    fresh = nn.Sequential(nn.Linear(8, 6))
    sl.apply_sos_lora(fresh, ["0"], num_experts=2, rank=2)
    fresh.load_state_dict(model.state_dict())
    assert fresh[0].merged
    with torch.no_grad():
        fresh[0].base_layer.weight.copy_(original)
    with pytest.raises(RuntimeError, match="not the one merge"):
        fresh[0].unmerge()
    fresh.load_state_dict(model.state_dict())
    fresh[0].unmerge()
    assert torch.allclose(fresh[0].weight, original, atol=1e-5)


def test_fingerprint_sees_every_bit_and_not_the_layout():
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        w = torch.randn(6, 10, dtype=dtype)
        assert fingerprint(w) == fingerprint(w.t().contiguous().t()) == fingerprint(w.clone())
        for i in range(w.numel()):
            bumped = w.clone()
            bits = bumped.view(-1)[i:i + 1].view({2: torch.int16, 4: torch.int32,
                                                  8: torch.int64}[w.element_size()])
            bits ^= 1  # the last bit of one value
            assert fingerprint(bumped) != fingerprint(w), (dtype, i)
        assert fingerprint(w[:, :5]) != fingerprint(w[:, 5:])
    assert fingerprint(torch.empty(3, 4, device="meta")) is None


# ---- compose.sum_into ------------------------------------------------------------------------
def test_sum_into_refuses_a_tied_weight_and_a_tied_tensor_saved_whole():
    adapted = gpt2(tied=False)
    sl.apply_sos_lora(adapted, ["lm_head", "c_fc"], num_experts=2, rank=4)
    randomize_adapters(adapted)
    adapter = compose.from_model(adapted, "a")
    target = gpt2(tied=False)
    target.transformer.wte.weight = target.lm_head.weight  # tied after loading
    before = values(target)
    with pytest.raises(RuntimeError, match=r"sum_into: layer 'lm_head': the weight is shared "
                                           r"with \['transformer.wte.weight'\]"):
        compose.sum_into(target, [adapter])
    assert_values(target, before)

    # A tensor saved whole is written too.
    c_fc = "transformer.h.0.mlp.c_fc"
    whole = Adapter({c_fc: [LowRankTerm(t.A, t.B, t.scale) for t in adapter[c_fc]]}, name="b",
                    fan_in_fan_out=True, whole={"lm_head.weight": torch.randn(96, 32)})
    with pytest.raises(sl.AdapterError, match=r"'lm_head.weight' saved whole by 'b' is shared "
                                              r"with \['transformer.wte.weight'\]"):
        compose.sum_into(target, [whole])
    assert_values(target, before)
    # Untied, the same sum goes through, also into a layer that is adapted itself.
    untied = gpt2(tied=False)
    sl.apply_sos_lora(untied, ["lm_head"], num_experts=2, rank=4)
    (head,) = adapter["lm_head"]
    expected = untied.lm_head.weight + head.scale * (head.B @ head.A)
    compose.sum_into(untied, [Adapter({"lm_head": [head]}, name="h")])
    assert torch.allclose(untied.lm_head.weight, expected, atol=1e-5)
