"""`cps-check`: the structure diagnostic from the command line, on gradients and on a given
update; planted blocks give "clustered", their spectral null "global"; bad input is refused in
one line before any work."""
import importlib.util
import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from soslora_ext.layers.structure import spectral_null

from helpers import classification_data, one_line_error, planted_blocks, tiny_dir
from helpers import run_cli as run

LAYERS = [f"encoder.layer.{i}.{name}" for i in range(2)
          for name in ("attention.self.query", "attention.self.key", "attention.self.value",
                       "attention.output.dense", "intermediate.dense", "output.dense")]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny BERT classifier, two fine-tuned copies of it (every encoder Linear moved by
    4 shuffled blocks of rank 2, or by those updates' spectral nulls), a GPT-2 and data."""
    tmp = tmp_path_factory.mktemp("cps_check")
    bert, tokenizer = tiny_dir(tmp)
    g = torch.Generator().manual_seed(0)
    tuned = {}
    for kind in ("planted", "null"):
        model = AutoModelForSequenceClassification.from_pretrained(bert)
        modules = dict(model.named_modules())
        with torch.no_grad():
            for name in LAYERS:
                weight = modules[f"bert.{name}"].weight
                update = 0.1 * planted_blocks(*weight.shape, 4, 2, 0.0, g)[0]
                if kind == "null":
                    update = spectral_null(torch.linalg.svdvals(update), update.shape, g)
                weight += update.float()
        model.save_pretrained(tmp / kind)
        tokenizer.save_pretrained(tmp / kind)
        tuned[kind] = tmp / kind
    gpt2, _ = tiny_dir(tmp, "gpt2")
    return dict(bert=bert, gpt2=gpt2, data=classification_data(tmp / "data.jsonl"), **tuned)


@pytest.mark.parametrize("kind,verdict", [("planted", "clustered"), ("null", "global")])
def test_a_given_update_planted_blocks_and_their_null(models, tmp_path, capsys, kind, verdict):
    out = tmp_path / "report.json"
    assert run("cps-check", models["bert"], "--tuned", models[kind], "--rank", 2,
               "--null-draws", 3, "--json", out) == 0
    report = json.loads(out.read_text())
    assert report["source"] == dict(kind="delta", tuned=str(models[kind]))
    assert sorted(report["layers"]) == sorted(LAYERS)  # every Linear but the pooler
    assert {layer["verdict"] for layer in report["layers"].values()} == {verdict}
    assert report["model"]["verdict"] == verdict
    printed = capsys.readouterr().out
    assert f"model: {verdict} " in printed
    assert all(name in printed for name in LAYERS)


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="needs matplotlib")
def test_gradients_on_data_with_table_json_and_plot(models, tmp_path, capsys):
    out, plot = tmp_path / "report.json", tmp_path / "plots" / "structure.png"
    assert run("cps-check", models["bert"], "--data", models["data"], "--clusters", 2,
               "--rank", 2, "--steps", 2, "--batch-size", 4, "--max-length", 16,
               "--null-draws", 2, "--targets", "query", "value", "--json", out,
               "--plot", plot) == 0
    report = json.loads(out.read_text())
    assert report["source"]["kind"] == "gradients" and report["source"]["steps"] == 2
    assert sorted(report["layers"]) == sorted(
        f"bert.{n}" for n in LAYERS if n.endswith(("query", "value")))
    assert report["model"]["verdict"] in ("clustered", "global", "mixed")
    assert plot.read_bytes().startswith(b"\x89PNG")
    assert report["source"]["seconds"] > 0
    printed = capsys.readouterr().out
    assert "the sum of 2 steps' gradients" in printed and " s of gradients" in printed


@pytest.mark.parametrize("args,message", [
    ([], "give --data"),
    (["--data", "DATA", "--tuned", "PLANTED"], "give --data"),
    (["--tuned", "NOWHERE"], "not a model directory"),
    (["--tuned", "GPT2"], "a GPT2Model, but MODEL_DIR is a BertModel"),
    (["--data", "DATA", "--targets", "nothing"], "--targets nothing: no Linear module"),
    (["--tuned", "PLANTED", "--clusters", "33"], "--clusters 33: more than the rows or columns "
     "of encoder.layer.0.attention.self.query (32 -> 32)"),
    (["--data", "DATA", "--clusters", "33"], "--clusters 33: more than"),
    (["--data", "NOWHERE"], "--data"),
    (["--tuned", "PLANTED", "--rank", "0"], "--rank: must be a positive integer"),
    (["--tuned", "PLANTED", "--json", "DIR"], "--json"),
])
def test_bad_input_is_one_line(models, tmp_path, capsys, args, message):
    (tmp_path / "DIR").mkdir()
    names = dict(DATA=models["data"], PLANTED=models["planted"], GPT2=models["gpt2"],
                 NOWHERE=tmp_path / "nowhere", DIR=tmp_path / "DIR")
    assert run("cps-check", models["bert"], *[names.get(a, a) for a in args]) == 2
    assert message in one_line_error(capsys)
    assert not any((tmp_path / "DIR").iterdir())
