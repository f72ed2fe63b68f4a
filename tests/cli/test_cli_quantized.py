"""`train --quantize` (a base loaded in 4 or 8 bits by bitsandbytes) and `merge --dequantize`
on a tiny BERT classifier: the record in the adapter and metrics.json, the merge refused
without --dequantize and exact with it, and bad combinations refused before any work."""
import importlib.util
import json

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BitsAndBytesConfig,
)

import soslora_ext as sl
from soslora_ext.cli import quantize as cli_quantize
from soslora_ext.formats.native import config_sha256, read_adapter_config
from soslora_ext.layers import quantized

from conftest import rel_err
from helpers import classification_data, run_cli, tiny_dir

needs_bitsandbytes = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                                        reason="bitsandbytes is not installed")
HEADS = ["bert.pooler", "classifier"]  # the tiny BERT's heads, kept in full precision
TEXTS = ["def x ( ) : return y", "struct x { int y ; }", "# include x", "import x"]


def one_line_error(capsys, *args, contains):
    capsys.readouterr()
    assert run_cli(*args) == 2
    err = capsys.readouterr().err.strip()
    assert contains in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def train(tmp_path, *options, steps=4):
    model_dir, tokenizer = tiny_dir(tmp_path)
    data = classification_data(tmp_path / "data.jsonl")
    out = tmp_path / "run"
    assert run_cli("train", model_dir, "--data", data, "--out", out, "--steps", steps,
                   "--rank", 4, "--experts", 2, "--max-length", 16, "--lr", 1e-2,
                   *options) == 0
    return model_dir, tokenizer, out


def quantized_classifier(model_dir, config):
    return AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=2, quantization_config=config, device_map="cpu")


CASES = {  # options: (the BitsAndBytesConfig they mean, the record, the layer's description)
    "nf4-double": (["--quantize", "nf4", "--double-quant"],
                   BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.float32,
                                      llm_int8_skip_modules=HEADS),
                   dict(quantize="nf4", double_quant=True, compute_dtype="float32"),
                   "bitsandbytes Linear4bit (nf4, double-quantized, blocksize 64, compute "
                   "torch.float32)"),
    "fp4-bfloat16": (["--quantize", "fp4", "--compute-dtype", "bfloat16"],
                     BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4",
                                        bnb_4bit_compute_dtype=torch.bfloat16,
                                        llm_int8_skip_modules=HEADS),
                     dict(quantize="fp4", double_quant=False, compute_dtype="bfloat16"),
                     "bitsandbytes Linear4bit (fp4, blocksize 64, compute torch.bfloat16)"),
    "int8": (["--quantize", "int8"],
             BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=HEADS),
             dict(quantize="int8", double_quant=False, compute_dtype=None),
             "bitsandbytes Linear8bitLt (int8 with per-row scales, outlier threshold 6)"),
}


@needs_bitsandbytes
@pytest.mark.parametrize("case", CASES)
def test_quantized_train_records_the_base_and_merges_only_dequantized(tmp_path, capsys, case):
    options, config, expected, layer = CASES[case]
    model_dir, tokenizer, out = train(tmp_path, *options)
    record = dict(expected, full_precision=HEADS, base_layer=layer)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["quantization"] == record and 0 <= metrics["accuracy"] <= 1
    assert read_adapter_config(out / "adapter")["metadata"]["quantization"] == record
    capsys.readouterr()
    assert run_cli("info", out / "adapter") == 0
    assert f"trained over quantized base layers: {layer}" in capsys.readouterr().out

    # The adapter on the same quantized base, evaluated as train evaluates it.
    adapted = sl.load_adapter(quantized_classifier(model_dir, config), out / "adapter")
    layers = dict(sl.sos_layers(adapted))
    assert len(layers) == 12 and all(layer.quantized for layer in layers.values())
    assert all(layer.lora_B.abs().sum() > 0 for layer in layers.values())  # trained (B starts 0)
    batch = dict(tokenizer(TEXTS, return_tensors="pt", padding=True))
    with quantized.exact_path(adapted.eval()), torch.no_grad():
        expected_logits = adapted(**batch).logits

    merged_dir = tmp_path / "merged"
    one_line_error(capsys, "merge", out / "adapter", "--base", model_dir, "--out", merged_dir,
                   contains="add --dequantize")
    assert not merged_dir.exists()
    assert run_cli("merge", out / "adapter", "--base", model_dir, "--out", merged_dir,
                   "--dequantize") == 0
    saved = json.loads((merged_dir / "config.json").read_text())
    assert "quantization_config" not in saved
    merged = AutoModelForSequenceClassification.from_pretrained(merged_dir).eval()
    assert not list(sl.adapter_layers(merged))
    assert not any(quantized.is_quantized_linear(m) for m in merged.modules())
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    with torch.no_grad():
        # float32 weights against the base's compute dtype (bfloat16 products for fp4 here)
        tolerance = 2e-2 if expected["compute_dtype"] == "bfloat16" else 1e-5
        assert rel_err(merged(**batch).logits, expected_logits) < tolerance

    assert run_cli("export-peft", out / "adapter", "--base", model_dir,
                   "--out", tmp_path / "peft") == 0
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["peft_type"] \
        == "LORA"


@needs_bitsandbytes
def test_dequantized_merge_writes_the_dtype_asked_for_and_layers_not_adapted(tmp_path):
    # Only the queries are adapted: the other quantized layers are dequantized as they are.
    model_dir, tokenizer, out = train(tmp_path, "--quantize", "nf4", "--targets", "query")
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=HEADS)
    adapted = sl.load_adapter(quantized_classifier(model_dir, config), out / "adapter")
    assert len(list(sl.sos_layers(adapted))) == 2
    batch = dict(tokenizer(TEXTS, return_tensors="pt", padding=True))
    with quantized.exact_path(adapted.eval()), torch.no_grad():
        expected = adapted(**batch).logits
    assert run_cli("merge", out / "adapter", "--base", model_dir, "--out", tmp_path / "m16",
                   "--dequantize", "--dtype", "bfloat16") == 0
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m16",
                                                                dtype="auto").eval()
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}
    assert not any(quantized.is_quantized_linear(m) for m in merged.modules())
    with torch.no_grad():
        assert rel_err(merged(**batch).logits.float(), expected) < 3e-2


@needs_bitsandbytes
def test_quantized_text_task_keeps_the_lm_head_and_merges_into_a_plain_causal_lm(tmp_path):
    model_dir, _ = tiny_dir(tmp_path, kind="llama")
    text = tmp_path / "corpus"
    text.mkdir()
    (text / "a.txt").write_text("def x ( ) : return y\n" * 40)
    out = tmp_path / "run"
    assert run_cli("train", model_dir, "--data", text, "--out", out, "--steps", 15, "--rank", 4,
                   "--experts", 2, "--max-length", 16, "--lr", 3e-3, "--quantize", "nf4") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["quantization"]["full_precision"] == ["lm_head"]
    assert metrics["losses"][-1] < metrics["losses"][0] - 0.3
    adapted = sl.load_adapter(AutoModelForCausalLM.from_pretrained(
        model_dir, device_map="cpu", quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)),
        out / "adapter")
    assert type(adapted.lm_head) is torch.nn.Linear  # a head: neither quantized nor adapted
    assert len(list(sl.sos_layers(adapted))) == 14  # 7 Linear layers in each of 2 blocks
    ids = torch.randint(0, 20, (2, 10), generator=torch.Generator().manual_seed(0))
    with quantized.exact_path(adapted.eval()), torch.no_grad():
        expected = adapted(ids).logits
    assert run_cli("merge", out / "adapter", "--base", model_dir, "--out", tmp_path / "m",
                   "--dequantize") == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert not any(quantized.is_quantized_linear(m) for m in merged.modules())
    with torch.no_grad():
        assert rel_err(merged(ids).logits, expected) < 1e-5


@pytest.mark.parametrize("options,message", [
    (["--double-quant"], "--double-quant: applies to 4-bit bases only"),
    (["--quantize", "int8", "--double-quant"],
     "it needs --quantize nf4 or fp4, got --quantize int8"),
    (["--quantize", "int8", "--compute-dtype", "bfloat16"], "--compute-dtype: applies to 4-bit"),
    (["--compute-dtype", "float32"], "--compute-dtype: applies to 4-bit bases only"),
    (["--quantize", "nf3"], "invalid choice: 'nf3'"),
    (["--quantize", "nf4", "--compute-dtype", "float16"], "invalid choice: 'float16'"),
])
def test_bad_quantization_options_are_refused_before_any_work(tmp_path, capsys, options,
                                                              message):
    out = tmp_path / "run"
    model_dir, _ = tiny_dir(tmp_path)
    # Checked before the data is read (a missing file would be the error otherwise).
    one_line_error(capsys, "train", model_dir, "--data", tmp_path / "missing.jsonl",
                   "--out", out, *options, contains=message)
    assert not out.exists()


def test_quantize_without_bitsandbytes_says_what_to_install(tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(cli_quantize.importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    model_dir, _ = tiny_dir(tmp_path)
    one_line_error(capsys, "train", model_dir, "--data", "filekinds", "--out", tmp_path / "x",
                   "--quantize", "nf4", contains="--quantize nf4: needs the bitsandbytes "
                   "package (pip install bitsandbytes)")


def test_merge_options_on_a_full_precision_adapter_are_refused(tmp_path, capsys):
    model_dir, _, out = train(tmp_path, steps=2)
    assert json.loads((out / "metrics.json").read_text())["quantization"] is None
    assert "quantization" not in read_adapter_config(out / "adapter")["metadata"]
    for options in (["--dequantize"], ["--dtype", "bfloat16"], ["--dequantize", "--dtype",
                                                                "float16"]):
        one_line_error(capsys, "merge", out / "adapter", "--base", model_dir,
                       "--out", tmp_path / "merged", *options,
                       contains=f"{options[0]}: {out / 'adapter'} was trained on a "
                       "full-precision base; there is nothing to dequantize")
    assert not (tmp_path / "merged").exists()


@needs_bitsandbytes
def test_merge_of_a_quantized_adapter_refuses_dtype_alone_and_a_bad_record(tmp_path, capsys):
    model_dir, _, out = train(tmp_path, "--quantize", "nf4", steps=1)
    one_line_error(capsys, "merge", out / "adapter", "--base", model_dir, "--out",
                   tmp_path / "merged", "--dtype", "float16", contains="add --dequantize")
    config_path = out / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["metadata"]["quantization"]["quantize"] = "nf3"
    config["config_sha256"] = config_sha256(config)  # a consistent file, a bad record
    config_path.write_text(json.dumps(config))
    one_line_error(capsys, "merge", out / "adapter", "--base", model_dir, "--out",
                   tmp_path / "merged", "--dequantize",
                   contains="its metadata's quantization must be an object with quantize")


@needs_bitsandbytes
def test_exact_path_computes_the_dequantized_layer_in_eval_mode_and_restores_it():
    import bitsandbytes as bnb

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 64)
    base = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32, quant_type="nf4")
    base.load_state_dict(linear.state_dict())
    model = torch.nn.Sequential(base.to("cpu"), torch.nn.Dropout(0.5))
    x = torch.randn(5, 64)
    expected = torch.nn.functional.linear(x, quantized.dequantized_weight(base), base.bias)
    with quantized.exact_path(model), torch.no_grad():
        model.eval()  # as an evaluation loop does, inside the block
        got = model(x)
    assert rel_err(got, expected) < 1e-6  # the base exact, the dropout off
    assert not base.training and "packed" not in quantized.describe(base)
    with torch.no_grad():  # bitsandbytes' inference path, for comparison
        inference = model(x)
    assert rel_err(inference, expected) < 2e-2
