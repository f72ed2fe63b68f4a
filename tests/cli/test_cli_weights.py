"""compose's --weights: weights too large for the adapters' factors are refused naming
--weights, before anything is written."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import soslora_ext as sl

from helpers import one_line_error
from helpers import run_cli as run


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("adapters")
    paths = []
    for seed in (1, 2):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
            num_attention_heads=4, num_key_value_heads=2))
        sl.apply_sos_lora(model, ["q_proj", "v_proj"], num_experts=2, rank=4)
        torch.manual_seed(seed)
        with torch.no_grad():
            for _, layer in sl.sos_layers(model):
                layer.lora_B.normal_(0, 0.3)
        paths.append(sl.save_adapter(model, tmp / f"a{seed}"))
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp / "llama")
    return paths


@pytest.mark.parametrize("weights", [["1e308", "1e308"], ["1e300", "2"]])
def test_concat_weights_too_large_name_weights(adapters, tmp_path, capsys, weights):
    # Before: "tensor 'base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight' has
    # non-finite values", as if an adapter held NaN.
    out = tmp_path / "sum"
    assert run("compose", "concat", *adapters, "--out", out, "--weights", *weights) == 2
    err = one_line_error(capsys)
    assert err.startswith("error: --weights ") and ": too large" in err, err
    assert "give smaller weights" in err and "non-finite" not in err, err
    assert not out.exists()


def test_concat_with_ordinary_weights_still_writes_the_sum(adapters, tmp_path):
    assert run("compose", "concat", *adapters, "--out", tmp_path / "sum",
               "--weights", "0.5", "2") == 0
    assert (tmp_path / "sum" / "adapter_model.safetensors").is_file()


def test_merge_weights_too_large_name_weights(adapters, tmp_path, capsys):
    # Before: "layer ...: adapter 'a1''s scale 1.0 times its weight 1e+300 is not a finite
    # float32 number", not naming the option.
    out = tmp_path / "merged"
    assert run("compose", "merge", *adapters, "--into", adapters[0].parent / "llama", "--out",
               out, "--weights", "1e300", "2") == 2
    err = one_line_error(capsys)
    assert err.startswith("error: --weights 1e+300 2: too large"), err
    assert not out.exists()
