"""The command line with the new base kinds: train adapts an nn.Embedding beside the Linears
(info, merge and export-peft follow), and one-line refusals for what is not supported."""
import peft
import pytest
import torch
from transformers import AutoModelForSequenceClassification

import soslora_ext as sl

from conftest import rel_err
from helpers import classification_data, one_line_error, run_cli, tiny_dir

EMBEDDING = "bert.embeddings.word_embeddings"


def test_train_adapts_an_embedding_then_info_merge_export(tmp_path, capsys):
    model_dir, tokenizer = tiny_dir(tmp_path)
    data = classification_data(tmp_path / "data.jsonl")
    out = tmp_path / "run"
    assert run_cli("train", model_dir, "--data", data, "--out", out, "--steps", 6, "--rank", 4,
                   "--experts", 2, "--max-length", 16, "--targets", "word_embeddings",
                   "query", "value") == 0
    capsys.readouterr()
    assert run_cli("info", out / "adapter") == 0
    assert EMBEDDING in capsys.readouterr().out

    def fresh():
        return AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)

    adapted = sl.load_adapter(fresh(), out / "adapter").eval()
    assert isinstance(adapted.get_submodule(EMBEDDING), sl.SOSLinear)
    assert adapted.get_submodule(EMBEDDING).lora_B.abs().max() > 0  # it trained
    batch = tokenizer(["def x ( ) : return y", "struct x"], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = adapted(**batch).logits
    assert run_cli("merge", out / "adapter", "--base", model_dir,
                   "--out", tmp_path / "merged") == 0
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert run_cli("export-peft", out / "adapter", "--base", model_dir,
                   "--out", tmp_path / "peft") == 0
    theirs = peft.PeftModel.from_pretrained(fresh(), tmp_path / "peft").eval()
    with torch.no_grad():
        assert rel_err(merged(**batch).logits, expected) < 1e-5
        assert rel_err(theirs(**batch).logits, expected) < 1e-5


@pytest.mark.parametrize("extra,message", [
    (["--targets", "LayerNorm"], "matched target_modules but is a LayerNorm, not an nn.Linear"),
    (["--method", "cps", "--clusters", "1", "--rank", "2", "--repartition-every", "3",
      "--targets", "word_embeddings", "query"],
     "(type Embedding): repartition_every=3 is supported on linear layers only"),
])
def test_train_refuses_unsupported_targets_in_one_line(tmp_path, capsys, extra, message):
    model_dir, _ = tiny_dir(tmp_path)
    data = classification_data(tmp_path / "data.jsonl")
    capsys.readouterr()
    assert run_cli("train", model_dir, "--data", data, "--out", tmp_path / "run", "--steps", 2,
                   "--max-length", 16, *extra) == 2
    assert message in one_line_error(capsys)
    assert not (tmp_path / "run" / "adapter").exists()


def test_cps_check_refuses_an_embedding_target(tmp_path, capsys):
    model_dir, _ = tiny_dir(tmp_path)
    data = classification_data(tmp_path / "data.jsonl")
    capsys.readouterr()
    assert run_cli("cps-check", model_dir, "--data", data, "--targets", "word_embeddings",
                   "--clusters", 2, "--rank", 2, "--steps", 1, "--max-length", 16) == 2
    assert "'bert.embeddings.word_embeddings' (type Embedding): cps-check measures " \
        "Linear layers only" in one_line_error(capsys)
