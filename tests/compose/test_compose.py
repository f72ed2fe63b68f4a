"""Naive summation: factored interference == dense, exact sums, the CLI on real PEFT adapters."""
import json
import math

import peft
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import soslora_ext as sl
from soslora_ext import compose
from soslora_ext.cli import main

from conftest import rel_err
from helpers import peft_adapter


def llama(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=56, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)).eval()


def gpt2(seed=0):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4,
                                      n_positions=64)).eval()


@pytest.fixture
def three_llama_adapters(tmp_path):
    a = peft_adapter(tmp_path / "a", llama, 1, r=4, lora_alpha=64,
                     target_modules=["q_proj", "v_proj"])
    b = peft_adapter(tmp_path / "b", llama, 2, r=8, lora_alpha=16, use_rslora=True,
                     target_modules=["q_proj", "v_proj", "up_proj"], rank_pattern={"up_proj": 2},
                     alpha_pattern={"v_proj": 5})
    model = llama()
    sl.apply_sos_lora(model, ["q_proj", "up_proj"], num_experts=2, rank=4, scale_mode="channel",
                      gate=True)
    with torch.no_grad():
        for _, layer in sl.sos_layers(model):
            layer.lora_B.normal_(0, 0.3)
            layer.expert_scales.mul_(torch.rand_like(layer.expert_scales) + 0.5)
    sl.save_adapter(model, tmp_path / "c")
    return [compose.load(p) for p in (a, b, tmp_path / "c")], model


def dense_cosine(a, b, layer):
    x, y = a.delta(layer), b.delta(layer)
    return float((x * y).sum() / (x.norm() * y.norm()))


def test_factored_cosine_norm_rank_equal_dense(three_llama_adapters):
    (a, b, c), sos_model = three_llama_adapters
    for x, y in [(a, b), (a, c), (b, c)]:
        cos = compose.cosine(x, y)
        assert set(cos) == x.keys() & y.keys() and cos
        for layer, value in cos.items():
            assert value == pytest.approx(dense_cosine(x, y, layer), abs=1e-12)
        assert compose.rms_cosine(x, y) == pytest.approx(
            math.sqrt(sum(v * v for v in cos.values()) / len(cos)))
    # The SOS adapter's delta (scales folded) is the layer's own delta_weight.
    for name, layer in sl.sos_layers(sos_model):
        assert rel_err(c.delta(name), layer.delta_weight()) < 1e-6
    # PEFT scaling: alpha / r, alpha_pattern, rsLoRA alpha / sqrt(r).
    assert b["model.layers.0.self_attn.v_proj"][0].scale == pytest.approx(5 / math.sqrt(8))
    assert b["model.layers.0.mlp.up_proj"][0].scale == pytest.approx(16 / math.sqrt(2))
    rep = compose.report([a, b, c])
    for name, adapter in zip(rep["adapters"], (a, b, c)):
        for layer, stats in rep["layers"][name].items():
            sv = torch.linalg.svdvals(adapter.delta(layer))
            assert stats["norm"] == pytest.approx(float(sv.norm()), rel=1e-9)
            assert stats["effective_rank"] == pytest.approx(compose.effective_rank(sv), rel=1e-6)
            assert 1 <= stats["effective_rank"] <= adapter.rank(layer) + 1e-9
    assert rep["rms_cosine_matrix"][0][1] == pytest.approx(compose.rms_cosine(a, b))
    assert "pairwise RMS cosine" in compose.format_report(rep)


def test_cosine_of_identical_and_opposite():
    A, B = torch.randn(3, 10, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
    x = compose.Adapter({"l": [compose.LowRankTerm(A, B, 2.0)]}, name="x")
    y = compose.Adapter({"l": [compose.LowRankTerm(A, B, -0.5)]}, name="y")
    assert compose.cosine(x, x)["l"] == pytest.approx(1.0)
    assert compose.cosine(x, y)["l"] == pytest.approx(-1.0)


def test_concat_is_exact_and_loads_in_peft(three_llama_adapters, tmp_path):
    adapters, _ = three_llama_adapters
    weights = [0.5, 1.0, -2.0]
    total = compose.concat(adapters, weights)
    for layer in total:
        dense = sum(w * x.delta(layer) for x, w in zip(adapters, weights) if layer in x)
        assert rel_err(total.delta(layer), dense) < 1e-12
        assert total.rank(layer) == sum(x.rank(layer) for x in adapters if layer in x)
    total.save_peft(tmp_path / "sum")
    ids = torch.randint(0, 96, (2, 9))
    summed = compose.sum_into(llama(), adapters, weights)
    loaded = peft.PeftModel.from_pretrained(llama(), str(tmp_path / "sum")).eval()
    with torch.no_grad():
        assert rel_err(loaded(ids).logits, summed(ids).logits) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sum_into_equals_dense_sum(three_llama_adapters, dtype):
    adapters, _ = three_llama_adapters
    model = llama().to(dtype)
    before = {n: m.weight.detach().double().clone() for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear)}
    compose.sum_into(model, adapters, [1.0, 0.3, 1.0])
    for layer in set().union(*adapters):
        expected = before[layer] + sum(w * x.delta(layer) for x, w in
                                       zip(adapters, [1.0, 0.3, 1.0]) if layer in x)
        got = model.get_submodule(layer).weight.double()
        # Float32 accumulation, one rounding per adapter term.
        assert rel_err(got, expected) < (1e-6 if dtype == torch.float32 else 1e-2)


def test_gpt2_conv1d_adapters_fan_in_fan_out(tmp_path):
    a = peft_adapter(tmp_path / "a", gpt2, 1, r=4, lora_alpha=64, target_modules=["c_attn"],
                     fan_in_fan_out=True)
    b = peft_adapter(tmp_path / "b", gpt2, 2, r=4, lora_alpha=64,
                     target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    adapters = [compose.load(a), compose.load(b)]
    assert all(x.fan_in_fan_out for x in adapters)
    ids = torch.randint(0, 96, (2, 9))
    reference = peft.PeftModel.from_pretrained(gpt2(), str(a)).merge_and_unload()
    reference = peft.PeftModel.from_pretrained(reference, str(b)).merge_and_unload()
    with torch.no_grad():
        assert rel_err(compose.sum_into(gpt2(), adapters)(ids).logits, reference(ids).logits) < 1e-5
    compose.concat(adapters).save_peft(tmp_path / "sum")
    loaded = peft.PeftModel.from_pretrained(gpt2(), str(tmp_path / "sum")).eval()
    with torch.no_grad():
        assert rel_err(loaded(ids).logits, reference(ids).logits) < 1e-5


def test_adapters_for_different_bases_are_refused(tmp_path):
    a = compose.load(peft_adapter(tmp_path / "a", llama, 1, r=4, target_modules=["q_proj"]))

    def wide():
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(
            vocab_size=96, hidden_size=64, intermediate_size=56, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))

    b = compose.load(peft_adapter(tmp_path / "b", wide, 2, r=4, target_modules=["q_proj"]))
    with pytest.raises(sl.AdapterError, match="layer 'model.layers.0.self_attn.q_proj'"):
        compose.cosine(a, b)
    with pytest.raises(sl.AdapterError, match="layer 'model.layers.0.self_attn.q_proj'"):
        compose.concat([a, b])
    model = wide()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(sl.AdapterError, match="q_proj"):
        compose.sum_into(model, [b, a])  # b fits, a does not: nothing may change
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(sl.AdapterError, match="weights must be 2"):
        compose.concat([a, a], weights=[1.0])
    with pytest.raises(sl.AdapterError, match="file not found"):
        compose.load(tmp_path / "missing")


def test_compose_cli_on_peft_adapters(tmp_path, capsys):
    from transformers import BertTokenizerFast

    words = ["def", "return", "x", "y", "(", ")", ":", "the", "of", "and", "int", ";"]
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
                                                   *words]) + "\n")
    model_dir = tmp_path / "model"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(words) + 5, hidden_size=32, intermediate_size=48,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2)).save_pretrained(model_dir)
    BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(model_dir)

    def small():
        return LlamaForCausalLM.from_pretrained(model_dir)

    dirs = [str(peft_adapter(tmp_path / n, small, s, r=4, lora_alpha=64,
                             target_modules=["q_proj", "v_proj"])) for n, s in (("a", 1), ("b", 2))]
    (tmp_path / "text.txt").write_text("def x ( ) : return y ; the int of x and y\n" * 30)

    capsys.readouterr()
    assert main(["compose", "report", *dirs, "--json", str(tmp_path / "r.json"),
                 "--plot", str(tmp_path / "r.png")]) == 0
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["adapters"] == ["a", "b"] and (tmp_path / "r.png").stat().st_size > 1000
    assert "pairwise RMS cosine" in capsys.readouterr().out

    assert main(["compose", "concat", *dirs, "--out", str(tmp_path / "sum")]) == 0
    assert main(["compose", "merge", *dirs, "--into", str(model_dir),
                 "--out", str(tmp_path / "merged")]) == 0
    ids = torch.randint(0, 17, (2, 8))
    merged = LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    summed = peft.PeftModel.from_pretrained(small(), str(tmp_path / "sum")).eval()
    with torch.no_grad():
        assert rel_err(merged(ids).logits, summed(ids).logits) < 1e-5

    assert main(["compose", "eval", *dirs, "--model", str(model_dir), "--text",
                 str(tmp_path / "text.txt"), "--max-length", "16", "--json",
                 str(tmp_path / "ppl.json")]) == 0
    ppl = json.loads((tmp_path / "ppl.json").read_text())["perplexity"]
    assert set(ppl) == {"base", "a", "b", "a+b"} and all(v > 1 for v in ppl.values())

    capsys.readouterr()
    assert main(["compose", "report", str(tmp_path / "nothing")]) == 2
    assert capsys.readouterr().err.startswith("error:")
