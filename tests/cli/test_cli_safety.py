"""The command line refuses bad input before any work: option values, output targets, models
and adapters of another architecture; train holds out the documented rows; merge keeps labels."""
import argparse
import json
import math
import sys
from types import SimpleNamespace

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    BertTokenizerFast,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
)

import soslora_ext as sl
from soslora_ext import compose
from soslora_ext.apps import finetune
from soslora_ext.apps.data import build_filekinds, read_training_data, split_rows
from soslora_ext.cli import build_parser
from soslora_ext.cli.args import CliError, check_outputs, name_adapters

from helpers import one_line_error, tiny_dir
from helpers import peft_adapter as compose_peft_adapter
from helpers import run_cli as run

WORDS = ["def", "return", "x", "y", "(", ")", ":", "the", "of", "and", "int", ";"]


# ---- fixtures: a trained classifier adapter, causal LMs and PEFT adapters ---------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny BERT classifier trained by `train` on a .jsonl whose first 10 rows are 'b' and
    the other 40 'a' (the order that used to hold out only 'b' rows)."""
    tmp = tmp_path_factory.mktemp("trained")
    model_dir, tokenizer = tiny_dir(tmp)
    rows = [{"text": "struct x { int y ; }", "label": "b"}] * 10 + \
           [{"text": "def x ( ) : return y", "label": "a"}] * 40
    data = tmp / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp / "run"
    assert run("train", model_dir, "--data", data, "--out", out, "--steps", 20, "--rank", 4,
               "--experts", 2, "--max-length", 16, "--lr", 3e-3, "--log-every", 0) == 0
    return model_dir, out, tokenizer


def causal_dir(path, cls=LlamaForCausalLM, config_cls=LlamaConfig):
    (path.parent / "vocab.txt").write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    torch.manual_seed(0)
    cls(config_cls(vocab_size=len(WORDS) + 5, hidden_size=32, intermediate_size=48,
                   num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2)).save_pretrained(path)
    BertTokenizerFast(vocab_file=str(path.parent / "vocab.txt")).save_pretrained(path)
    return path


def peft_adapter(path, model_dir, cls, seed, **cfg):
    return compose_peft_adapter(path, lambda: cls.from_pretrained(model_dir), seed, r=4,
                                target_modules=["q_proj", "v_proj"], **cfg)


@pytest.fixture(scope="module")
def lms(tmp_path_factory):
    """A Llama and a Mistral directory of identical module names and shapes, and PEFT adapters
    trained on each; text long enough for two 16-token chunks."""
    tmp = tmp_path_factory.mktemp("lms")
    llama = causal_dir(tmp / "llama")
    mistral = causal_dir(tmp / "mistral", MistralForCausalLM, MistralConfig)
    a = peft_adapter(tmp / "a" / "adapter", llama, LlamaForCausalLM, 1)
    b = peft_adapter(tmp / "b" / "adapter", llama, LlamaForCausalLM, 2, task_type="CAUSAL_LM")
    m = peft_adapter(tmp / "m", mistral, MistralForCausalLM, 3)
    text = tmp / "text.txt"
    text.write_text("def x ( ) : return y ; the int of x and y\n" * 30)
    return dict(llama=llama, mistral=mistral, a=a, b=b, m=m, text=text, tmp=tmp)


# ---- 1, 3, 10: option values and their help ----------------------------------------------------
@pytest.mark.parametrize("args,message", [
    (["train", "M", "--data", "D", "--out", "O", "--alpha", "0"],
     "argument --alpha: must be a positive number, got '0'"),
    (["train", "M", "--data", "D", "--out", "O", "--alpha", "-2"], "argument --alpha"),
    (["train", "M", "--data", "D", "--out", "O", "--alpha", "nan"], "argument --alpha"),
    (["train", "M", "--data", "D", "--out", "O", "--lr", "0"], "argument --lr"),
    (["train", "M", "--data", "D", "--out", "O", "--dropout", "1"], "argument --dropout"),
    (["train", "M", "--data", "D", "--out", "O", "--repartition-every", "-1"],
     "argument --repartition-every"),
    (["compose", "eval", "A", "--model", "M", "--text", "T", "--max-chunks", "-3"],
     "argument --max-chunks: must be a positive integer, got '-3'"),
    (["compose", "eval", "A", "--model", "M", "--text", "T", "--max-chunks", "0"],
     "argument --max-chunks: must be a positive integer"),
    (["compose", "eval", "A", "--model", "M", "--text", "T", "--max-length", "0"],
     "argument --max-length"),
    (["compose", "merge", "A", "--into", "M", "--out", "O", "--weights", "inf"],
     "argument --weights"),
    (["main-job", "--steps", "0"], "argument --steps"),
])
def test_bad_option_values_are_refused_in_one_line(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    assert run(*args) == 2
    assert message in one_line_error(capsys)
    assert not any(tmp_path.iterdir())  # nothing written


def test_alpha_omitted_is_two_rank(trained):
    _, out, _ = trained
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert {m["config"]["alpha"] for m in config["modules"].values()} == {8.0}  # rank 4


def test_perplexity_and_evaluate_check_their_counts(lms):
    tokenizer = BertTokenizerFast.from_pretrained(lms["llama"])
    model = LlamaForCausalLM.from_pretrained(lms["llama"])
    text = lms["text"].read_text()
    for kwargs, name in [(dict(max_chunks=-3), "max_chunks"), (dict(max_chunks=0), "max_chunks"),
                         (dict(max_length=0), "max_length"), (dict(batch_size=0), "batch_size"),
                         (dict(max_length=16.0), "max_length"),
                         (dict(max_chunks=True), "max_chunks")]:
        with pytest.raises(ValueError, match=f"{name} must be a positive integer"):
            compose.perplexity(model, tokenizer, text, **{"max_length": 16, **kwargs})
    with pytest.raises(ValueError, match="max_chunks must be a positive integer"):
        compose.evaluate(lms["llama"], [], text, max_length=16, max_chunks=-3)
    # max_chunks=1 is exactly the first chunk.
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0][:16][None]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1]
        expected = math.exp(float(torch.nn.functional.cross_entropy(logits[0], ids[0, 1:])))
    assert compose.perplexity(model, tokenizer, text, max_length=16, max_chunks=1,
                              progress=False) == pytest.approx(expected, rel=1e-5)


def test_every_option_has_help_with_its_default():
    def parsers(parser):
        yield parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    yield from parsers(sub)

    checked = 0
    for parser in parsers(build_parser()):
        for action in parser._actions:
            if not action.option_strings or isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{parser.prog} {action.option_strings[0]} has no help"
            if action.default is not None and action.default is not False:
                assert "default" in action.help, \
                    f"{parser.prog} {action.option_strings[0]}: {action.help!r}"
            checked += 1
    assert checked > 40


# ---- 2: output targets ---------------------------------------------------------------------------
def test_merge_into_an_existing_file_is_refused_before_any_work(trained, tmp_path, capsys):
    model_dir, out, _ = trained
    target = tmp_path / "merged"
    target.write_text("keep me")
    assert run("merge", out / "adapter", "--base", model_dir, "--out", target) == 2
    assert "--out" in (err := one_line_error(capsys)) and "not a directory" in err
    assert target.read_text() == "keep me"


@pytest.mark.parametrize("args,message", [
    (["train", "MODEL", "--data", "DATA", "--out", "FILE"], "--out"),
    (["export-peft", "ADAPTER", "--base", "MODEL", "--out", "FILE"], "--out"),
    (["merge", "ADAPTER", "--base", "MODEL", "--out", "FILE/sub"], "is not a directory"),
    (["merge", "ADAPTER", "--base", "MODEL", "--out", "/proc/1/merged"], "cannot write in"),
    (["merge", "ADAPTER", "--base", "MODEL", "--out", "MODEL"], "one of the command's inputs"),
    (["compose", "merge", "A", "--into", "LLAMA", "--out", "FILE"], "--out"),
    (["compose", "concat", "A", "--out", "FILE"], "--out"),
    (["compose", "concat", "A", "--out", "A"], "one of the command's inputs"),
    (["compose", "report", "A", "--json", "DIR"], "--json"),
    (["compose", "report", "A", "--plot", "DIR"], "--plot"),
    (["compose", "report", "A", "--json", "DIR/x.json", "--plot", "DIR/x.json"], "same path"),
    (["compose", "eval", "A", "--model", "LLAMA", "--text", "TEXT", "--json", "DIR"], "--json"),
])
def test_every_output_target_is_checked_first(trained, lms, tmp_path, capsys, args, message):
    model_dir, out, _ = trained
    (tmp_path / "FILE").write_text("keep me")
    (tmp_path / "DIR").mkdir()
    names = dict(MODEL=model_dir, ADAPTER=out / "adapter", DATA=lms["text"], A=lms["a"],
                 LLAMA=lms["llama"], TEXT=lms["text"])
    args = [str(names.get(a, tmp_path / a if a.split("/")[0] in ("FILE", "DIR") else a))
            for a in args]
    assert run(*args) == 2
    assert message in one_line_error(capsys)
    assert (tmp_path / "FILE").read_text() == "keep me" and not any((tmp_path / "DIR").iterdir())


def test_an_output_file_that_exists_is_accepted(tmp_path):
    """A file a previous run wrote (--json, --plot) may be written again: it used to be
    refused as "not a directory" (its own path was taken for the folder to write in)."""
    (target := tmp_path / "report.json").write_text("{}")
    check_outputs(argparse.Namespace(json=str(target), plot=str(tmp_path / "new" / "x.png")))
    with pytest.raises(CliError, match="is a directory"):
        check_outputs(argparse.Namespace(json=str(tmp_path)))


# ---- 4: only the architecture an adapter was trained on ------------------------------------------
def test_compose_refuses_a_model_that_is_not_a_causal_lm(trained, lms, tmp_path, capsys):
    bert, _, _ = trained
    assert run("compose", "merge", lms["a"], "--into", bert, "--out", tmp_path / "out") == 2
    assert "BertForSequenceClassification, not a causal language model" in one_line_error(capsys)
    assert not (tmp_path / "out").exists()
    assert run("compose", "eval", lms["a"], "--model", bert, "--text", lms["text"],
               "--max-length", 16) == 2
    assert "not a causal language model" in one_line_error(capsys)
    with pytest.raises(sl.AdapterError, match="not a causal language model"):
        compose.evaluate(bert, [], lms["text"].read_text(), max_length=16)


@pytest.mark.parametrize("command", ["merge", "eval", "concat"])
def test_compose_refuses_adapters_of_another_architecture(trained, lms, tmp_path, capsys,
                                                          command):
    """The Mistral and Llama models have the same module names and shapes: only the recorded
    base tells a Llama adapter from a Mistral one."""
    options = dict(merge=["--into", lms["mistral"], "--out", tmp_path / "out"],
                   eval=["--model", lms["mistral"], "--text", lms["text"], "--max-length", 16],
                   concat=["--out", tmp_path / "out"])[command]
    first = lms["m"] if command == "concat" else lms["a"]
    assert run("compose", command, first, lms["b"] if command == "concat" else lms["m"],
               *options) == 2
    err = one_line_error(capsys)
    assert "trained on a LlamaForCausalLM" in err and "Mistral" in err
    assert not (tmp_path / "out").exists()


def test_compose_refuses_our_classifier_adapter_and_peft_task_mismatch(trained, lms, tmp_path,
                                                                       capsys):
    _, out, _ = trained
    assert run("compose", "merge", out / "adapter", "--into", lms["llama"],
               "--out", tmp_path / "out") == 2
    assert "trained on a BertForSequenceClassification" in one_line_error(capsys)
    seq = tmp_path / "seq"
    seq.mkdir()
    config = json.loads((lms["a"] / "adapter_config.json").read_text())
    config.update(task_type="SEQ_CLS", auto_mapping=None)
    (seq / "adapter_config.json").write_text(json.dumps(config))
    (seq / "adapter_model.safetensors").write_bytes(
        (lms["a"] / "adapter_model.safetensors").read_bytes())
    assert run("compose", "merge", seq, "--into", lms["llama"], "--out", tmp_path / "out") == 2
    assert "PEFT adapter for a SEQ_CLS model" in one_line_error(capsys)
    assert not (tmp_path / "out").exists()


def test_merge_refuses_a_base_of_another_model_type(trained, lms, tmp_path, capsys):
    _, out, _ = trained
    assert run("merge", out / "adapter", "--base", lms["llama"], "--out", tmp_path / "m") == 2
    assert "a 'llama' model" in one_line_error(capsys)
    assert not (tmp_path / "m").exists()


# ---- 5: adapter names ------------------------------------------------------------------------
def test_adapter_names_are_shortest_distinct_path_ends():
    assert name_adapters(["/r/x/a/adapter", "/r/y/a/adapter", "/r/z/math"]) == [
        ("x/a/adapter", "/r/x/a/adapter"), ("y/a/adapter", "/r/y/a/adapter"),
        ("math", "/r/z/math")]
    assert name_adapters(["med=/r/a/adapter", "/r/b/adapter"]) == [
        ("med", "/r/a/adapter"), ("adapter", "/r/b/adapter")]
    with pytest.raises(CliError, match="NAME=PATH"):
        name_adapters(["/r/a", "/r/a"])
    with pytest.raises(CliError, match="given twice"):
        name_adapters(["x=/r/a", "x=/r/b"])


def test_report_on_two_adapters_called_adapter(lms, tmp_path, capsys):
    assert run("compose", "report", lms["a"], lms["b"], "--json", tmp_path / "r.json") == 0
    assert json.loads((tmp_path / "r.json").read_text())["adapters"] == ["a/adapter", "b/adapter"]
    assert run("compose", "report", f"first={lms['a']}", lms["b"],
               "--json", tmp_path / "s.json") == 0
    assert json.loads((tmp_path / "s.json").read_text())["adapters"] == ["first", "adapter"]
    assert run("compose", "eval", lms["a"], lms["b"], "--model", lms["llama"], "--text",
               lms["text"], "--max-length", 16, "--json", tmp_path / "p.json") == 0
    ppl = json.loads((tmp_path / "p.json").read_text())["perplexity"]
    assert set(ppl) == {"base", "a/adapter", "b/adapter", "a/adapter+b/adapter"}
    assert ppl["a/adapter"] != ppl["b/adapter"]


# ---- 6: --plot without matplotlib -------------------------------------------------------------
def test_plot_without_matplotlib_says_how_to_install_before_any_work(lms, tmp_path, monkeypatch,
                                                                     capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert run("compose", "report", lms["a"], lms["b"], "--json", tmp_path / "r.json",
               "--plot", tmp_path / "r.png") == 2
    captured = capsys.readouterr()
    assert "pip install matplotlib" in captured.err and "--plot" in captured.err
    assert captured.out == "" and not (tmp_path / "r.json").exists()


# ---- 7: the held-out split -----------------------------------------------------------------------
def test_train_holds_out_each_labels_last_fifth_after_a_seeded_shuffle(trained):
    _, out, _ = trained
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["split"] == dict(train=40, test=10, test_per_label={"a": 8, "b": 2})
    assert metrics["accuracy"] >= 0.8  # the first-fifth split held out only 'b': accuracy 0.0


def test_split_rows_is_stratified_disjoint_and_seeded():
    rows = [(f"b{i}", 1) for i in range(10)] + [(f"a{i}", 0) for i in range(40)] + [("c", 2)]
    train, test = split_rows(rows, seed=0)
    assert sorted(train + test) == sorted(rows) and not set(train) & set(test)
    assert sorted(l for _, l in test) == [0] * 8 + [1] * 2  # the lone 'c' row is trained on
    assert split_rows(rows, seed=0) == (train, test)
    assert set(split_rows(rows, seed=1)[1]) != set(test)


def test_filekinds_uses_its_own_split_by_file():
    task, (train, test, labels) = read_training_data("filekinds", "auto", seed=0)
    assert task == "classification" and (train, test) == build_filekinds(seed=0)
    assert len(test) == 256 and len(train) == 1024


# ---- 8: CPS repartitions are announced and recorded ----------------------------------------------
def test_cps_repartitions_are_announced_and_recorded(tmp_path, capsys):
    model_dir, _ = tiny_dir(tmp_path)
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in [
        {"text": "def x ( ) : return y", "label": "p"}, {"text": "struct x { int y ; }",
                                                        "label": "c"}] * 10) + "\n")
    out = tmp_path / "run"
    capsys.readouterr()
    assert run("train", model_dir, "--data", data, "--out", out, "--steps", 6, "--rank", 2,
               "--method", "cps", "--clusters", 2, "--repartition-every", 3,
               "--max-length", 16, "--log-every", 0) == 0
    captured = capsys.readouterr()
    records = json.loads((out / "metrics.json").read_text())["repartitions"]
    adapted = sl.load_adapter(AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=2), out / "adapter")
    layers = {name for name, _ in sl.cps_layers(adapted)}
    assert len(records) == 2 and all(set(r["layers"]) == layers for r in records)
    assert captured.err.count("repartitioning 12 CPS-LoRA layers") == 2
    for r in records:
        adopted = sum(v["adopted"] for v in r["layers"].values())
        assert f"step {r['step']}: repartition took" in captured.err
        assert f"{adopted} of 12 layers adopted a new partition" in captured.err
        assert all(v["relative_change"] == 0.0 for v in r["layers"].values() if not v["adopted"])
    assert "2 repartitions" in captured.out


def test_train_loop_records_what_each_layer_did():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 12), torch.nn.Linear(12, 12))
    sl.apply_cps_lora(model, ["0", "1"], num_clusters=2, rank=2, repartition_every=2)

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, x, y):
            return SimpleNamespace(loss=((self.net(x) - y) ** 2).mean())

    x, y = torch.randn(32, 12), torch.randn(32, 12)
    wrapped = Wrapped()
    fit = finetune.train(wrapped, lambda step, g: dict(x=x, y=y), 4, lr=1e-2, progress=False,
                         log_every=0)
    assert [r["step"] for r in fit.repartition_log] == [s for s, _ in fit.repartitions] == [1, 3]
    last = fit.repartition_log[-1]["layers"]
    assert set(last) == {"net.0", "net.1"}
    for name, layer in sl.cps_layers(wrapped):
        assert last[name]["adopted"] == layer.last_repartition["adopted"]
        assert last[name]["relative_change"] == layer.last_repartition["delta_change"]
        # Every proposal's gain and loss, adopted or not.
        for key in ("captured_before", "captured_after", "update_discarded"):
            assert last[name][key] == layer.last_repartition[key]
    assert "of the gradient and would discard" in finetune.describe_repartition(
        fit.repartition_log[-1])


# ---- 9: short text -------------------------------------------------------------------------------
def test_eval_on_short_text_says_what_to_change(lms, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("def x ( ) : return y\n")
    assert run("compose", "eval", lms["a"], "--model", lms["llama"], "--text", short) == 2
    err = one_line_error(capsys)
    assert "fewer than max_length=128" in err and "--max-length" in err and "more text" in err


# ---- 11: merge keeps the label names -------------------------------------------------------------
def test_merged_classifier_keeps_the_label_names(trained, tmp_path):
    model_dir, out, _ = trained
    assert run("merge", out / "adapter", "--base", model_dir, "--out", tmp_path / "merged") == 0
    config = AutoConfig.from_pretrained(tmp_path / "merged")
    assert config.id2label == {0: "a", 1: "b"} and config.label2id == {"a": 0, "b": 1}


# ---- 12: PEFT folders given to commands that read our format -------------------------------------
@pytest.mark.parametrize("command", ["info", "merge", "export-peft"])
def test_peft_folder_points_to_import_peft_and_compose(trained, lms, tmp_path, capsys, command):
    model_dir, _, _ = trained
    extra = [] if command == "info" else ["--base", model_dir, "--out", tmp_path / "o"]
    assert run(command, lms["a"], *extra) == 2
    err = one_line_error(capsys)
    assert "PEFT adapter" in err and "import_peft" in err and "compose" in err


@pytest.mark.parametrize("content,message", [
    ('{"text": null, "label": "a"}\n{"text": "x", "label": "b"}\n' * 3,
     "data.jsonl:1: expected a JSON object with a string 'text'"),
    ('{"text": "x", "label": null}\n{"text": "x", "label": "b"}\n' * 3,
     "data.jsonl:1: expected a JSON object with a string 'text' and a string or integer"),
    (b'\xff\xfe{"text": "x"}\n', "data.jsonl: cannot read it as UTF-8 text"),
    (None, r"data.jsonl: cannot read it as UTF-8 text \(.*Is a directory"),
])
def test_bad_training_data_is_refused_naming_data(trained, tmp_path, capsys, content, message):
    # Before: null text or label trained on the text "None"; bad UTF-8 or a folder named
    # .jsonl gave an error that did not name the file or option.
    import re

    data = tmp_path / "data.jsonl"
    if content is None:
        data.mkdir()
    elif isinstance(content, bytes):
        data.write_bytes(content)
    else:
        data.write_text(content)
    assert run("train", trained[0], "--data", data, "--out", tmp_path / "o", "--steps", 1) == 2
    assert re.search("--data .*" + message, one_line_error(capsys))
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args,message", [
    (["--seed", str(2**70)], "argument --seed: must be an integer in [-2**63, 2**64)"),
    (["--experts", "3"], "--experts/--rank: rank=4 must be divisible by num_experts=3"),
])
def test_train_options_are_named_in_their_errors(trained, tmp_path, capsys, args, message):
    # Before: "Overflow when unpacking long long"; a hyperparameter error without the option.
    assert run("train", trained[0], "--data", "filekinds", "--out", tmp_path / "o",
               "--rank", 4, *args) == 2
    assert message in one_line_error(capsys)


def test_train_out_may_not_be_its_data_folder(trained, tmp_path, capsys):
    (tmp_path / "a.txt").write_text("x " * 100)
    assert run("train", trained[0], "--data", tmp_path, "--out", tmp_path) == 2
    assert f"--out {tmp_path}: is one of the command's inputs" in one_line_error(capsys)


def test_merge_refuses_metadata_of_the_wrong_type(trained, tmp_path, capsys):
    # Before: "error: 'list' object has no attribute 'items'"-style messages.
    import shutil

    from conftest import restamp_adapter

    adapter = tmp_path / "adapter"
    shutil.copytree(trained[1] / "adapter", adapter)
    restamp_adapter(adapter, lambda c: c["metadata"].update(model_kwargs=[2]))
    assert run("merge", adapter, "--base", trained[0], "--out", tmp_path / "m") == 2
    assert "model_kwargs must be an object" in one_line_error(capsys)


@pytest.mark.parametrize("args, option", [
    (["--rank", 2**40], "--rank 1099511627776: the adapters do not fit in memory"),
    (["--rank", 4, "--batch-size", 2**40],
     "--batch-size/--max-length 1099511627776/16: a training step does not fit in memory")])
def test_sizes_beyond_memory_name_the_option(trained, tmp_path, capsys, args, option):
    # Before: a one-line allocator error that named no option.
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"text": t, "label": l})
                              for t, l in [("def x", "a"), ("int y", "b")] * 5) + "\n")
    assert run("train", trained[0], "--data", data, "--out", tmp_path / "o", "--steps", 2,
               "--max-length", 16, "--experts", 2, *args) == 2
    last = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert last.startswith("error: ") and option in last, last  # after the progress output
    assert not (tmp_path / "o").exists()
