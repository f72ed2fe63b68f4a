"""The command line on tiny models built from transformers configs, and the main job."""
import json
import subprocess
import sys

import peft
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
)

import soslora_ext as sl
from soslora_ext.apps import main_job

from conftest import rel_err
from helpers import classification_data, run_cli, tiny_dir


def test_train_cps_then_info_and_export(tmp_path, capsys):
    model_dir, tokenizer = tiny_dir(tmp_path)
    data = classification_data(tmp_path / "data.jsonl")
    out = tmp_path / "run"
    assert run_cli("train", model_dir, "--data", data, "--out", out, "--steps", 6, "--rank", 2,
                   "--method", "cps", "--clusters", 2, "--repartition-every", 3,
                   "--max-length", 16) == 0
    capsys.readouterr()
    assert run_cli("info", out / "adapter") == 0
    info = capsys.readouterr().out
    assert "method cps" in info and "CPS G=2 ranks=[2, 2]" in info
    assert run_cli("export-peft", out / "adapter", "--base", model_dir,
                   "--out", tmp_path / "peft") == 0
    adapted = sl.load_adapter(AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=2), out / "adapter").eval()
    assert all(int(layer.repartition_count) == 2 for _, layer in sl.cps_layers(adapted))


def test_train_info_merge_export_on_tiny_classifier(tmp_path, capsys):
    model_dir, tokenizer = tiny_dir(tmp_path)
    data = classification_data(tmp_path / "data.jsonl")
    out = tmp_path / "run"
    assert run_cli("train", model_dir, "--data", data, "--out", out, "--steps", 12, "--rank", 4,
                   "--experts", 2, "--max-length", 16, "--log-every", 6) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "classification" and 0 <= metrics["accuracy"] <= 1
    assert len(metrics["losses"]) == 12

    capsys.readouterr()
    assert run_cli("info", out / "adapter") == 0
    info = capsys.readouterr().out
    assert "bert.encoder.layer.0.attention.self.query" in info and "trainable parameters" in info

    batch = tokenizer(["def x ( ) : return y", "struct x { int y ; }"], return_tensors="pt",
                      padding=True)
    adapted = sl.load_adapter(AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=2), out / "adapter").eval()
    with torch.no_grad():
        expected = adapted(**batch).logits

    assert run_cli("merge", out / "adapter", "--base", model_dir, "--out", tmp_path / "merged") == 0
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert not list(sl.sos_layers(merged))
    with torch.no_grad():
        assert rel_err(merged(**batch).logits, expected) < 1e-5

    assert run_cli("export-peft", out / "adapter", "--base", model_dir,
                   "--out", tmp_path / "peft") == 0
    peft_model = peft.PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=2), str(tmp_path / "peft")).eval()
    with torch.no_grad():
        assert rel_err(peft_model(**batch).logits, expected) < 1e-5


def train_on_text(tmp_path, kind, *options):
    """`train` on a tiny causal LM of `kind` with a small text corpus: the adapted model."""
    model_dir, _ = tiny_dir(tmp_path, kind=kind)
    text = tmp_path / "corpus"
    text.mkdir()
    (text / "a.txt").write_text("def x ( ) : return y\n" * 40)
    out = tmp_path / "run"
    assert run_cli("train", model_dir, "--data", text, "--out", out, "--steps", 15, "--rank", 4,
                   "--experts", 2, "--max-length", 16, "--lr", 3e-3, *options) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "text" and metrics["losses"][-1] < metrics["losses"][0]
    return sl.load_adapter(AutoModelForCausalLM.from_pretrained(model_dir), out / "adapter")


def test_train_text_task_on_tiny_llama(tmp_path):
    model = train_on_text(tmp_path, "llama", "--gate")
    assert all(layer.config.gate for _, layer in sl.sos_layers(model))


def test_train_text_task_on_tiny_gpt2_adapts_its_conv1d_layers(tmp_path):
    model = train_on_text(tmp_path, "gpt2")
    names = {name.rpartition(".")[2] for name, _ in sl.sos_layers(model)}
    assert names == {"c_attn", "c_proj", "c_fc"}  # every Conv1D; lm_head stays a head


@pytest.mark.parametrize("args,message", [
    (["train", "/nonexistent", "--data", "filekinds", "--out", "x"], "not a model directory"),
    (["info", "/nonexistent"], "file not found"),
    (["train", "MODEL", "--data", "/nonexistent.jsonl", "--out", "x"], "no such file"),
    (["train", "MODEL", "--data", "BADJSONL", "--out", "x"], "expected a JSON object"),
    (["train", "MODEL", "--data", "filekinds", "--out", "x", "--rank", "6", "--experts", "4"],
     "divisible by num_experts"),
    (["train", "MODEL", "--data", "filekinds", "--out", "x", "--steps", "0"],
     "must be a positive integer"),
])
def test_cli_errors_are_one_line(tmp_path, capsys, args, message):
    model_dir, _ = tiny_dir(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x"}\n')
    args = [str(model_dir) if a == "MODEL" else str(bad) if a == "BADJSONL" else a for a in args]
    capsys.readouterr()
    assert run_cli(*args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_help_is_complete():
    for command in ["", "demo", "main-job", "train", "merge", "export-peft", "info"]:
        result = subprocess.run([sys.executable, "-m", "soslora_ext", *command.split(), "--help"],
                                capture_output=True, text=True)
        assert result.returncode == 0 and "usage:" in result.stdout
    result = subprocess.run([sys.executable, "-m", "soslora_ext", "frobnicate"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "invalid choice" in result.stderr


def test_main_job_small_end_to_end(tmp_path):
    summary = main_job.run(tmp_path, steps=4, batch_size=4, train_per_class=8, test_per_class=4,
                           progress=False, memory_probe=False)
    assert summary["checks"]["ok"]
    assert set(summary["results"]) == set(main_job.METHODS) - set(summary.get("skipped", {}))
    cps, lora = summary["results"]["CPS-LoRA"], summary["results"]["LoRA"]
    assert cps["trainable_parameters"] == lora["trainable_parameters"]
    assert [r["step"] for r in cps["repartitions"]] == [1, 3]
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    peft_config = json.loads((tmp_path / "adapter_peft" / "adapter_config.json").read_text())
    assert peft_config["peft_type"] == "LORA"
