"""The main job says what runs and records what its numbers depend on."""
import importlib.util
import json

import pytest
import torch
import torch.nn as nn

from soslora_ext.apps import main_job
from soslora_ext.apps.data import build_filekinds
from soslora_ext.cli import build_parser
from soslora_ext.layers import quantized


def test_data_digest_tells_data_sets_apart():
    rows = [("import os", 0), ("#include <x.h>", 1)]
    digest = main_job.data_digest(rows)
    assert len(digest) == 64 and digest == main_job.data_digest(list(rows))
    assert main_job.data_digest(rows[::-1]) != digest  # the order of the batches matters too
    assert main_job.data_digest([("import os", 1), ("#include <x.h>", 1)]) != digest
    assert main_job.data_digest([("import o", 0), ("s#include <x.h>", 1)]) != digest


def test_environment_records_threads_and_kernels():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        env = main_job.environment()
    finally:
        torch.set_num_threads(threads)
    assert env["threads"] == 1
    assert env["torch"] == torch.__version__
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert env["transformers"] and env["peft"] and env["cpu"]


def test_results_record_data_hashes_and_environment(tmp_path):
    summary = main_job.run(tmp_path, steps=1, batch_size=2, train_per_class=2, test_per_class=1,
                           progress=False, memory_probe=False)
    saved = json.loads((tmp_path / "results.json").read_text())
    train, test = build_filekinds(2, 1, seed=0)
    assert saved["data"] == dict(train=8, test=4, train_sha256=main_job.data_digest(train),
                                 test_sha256=main_job.data_digest(test))
    assert saved["environment"] == summary["environment"] == main_job.environment()
    # The four full-precision runs first, in their order (their random streams unchanged).
    assert list(saved["results"]) == ["SOS-LoRA", "CPS-LoRA", "CPS-LoRA static", "LoRA",
                                      "SOS-LoRA nf4"]
    # Every repartition proposal's gain and loss, and the decision, per layer.
    (record,) = saved["results"]["CPS-LoRA"]["repartitions"]
    assert len(record["layers"]) == 36
    assert record["adopted"] == sum(v["adopted"] for v in record["layers"].values())
    assert all({"captured_before", "captured_after", "update_discarded"} <= set(v)
               for v in record["layers"].values())


def test_help_names_the_five_runs():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    text = " ".join(sub.choices["main-job"].format_help().split())
    summary = next(a.help for a in sub._choices_actions if a.dest == "main-job")
    for method in ("SOS-LoRA", "CPS-LoRA", "static", "LoRA", "nf4"):
        assert method in summary and method in text
    assert "both methods" not in text  # the learning rate and steps apply to all five runs
    assert "learning rate of all five runs" in text
    assert "rank per cluster of both CPS-LoRA runs" in text


needs_bitsandbytes = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                                        reason="bitsandbytes is not installed")


@needs_bitsandbytes
def test_quantized_run_reports_accuracy_and_memory_against_the_full_base(tmp_path):
    summary = main_job.run(tmp_path, steps=1, batch_size=2, train_per_class=2, test_per_class=1,
                           progress=False, methods=("SOS-LoRA", main_job.QUANTIZED))
    assert summary["checks"]["ok"] and "skipped" not in summary
    full, nf4 = summary["results"]["SOS-LoRA"], summary["results"][main_job.QUANTIZED]
    assert nf4["trainable_parameters"] == full["trainable_parameters"]
    for key in ("accuracy", "accuracy_exact_base"):
        assert isinstance(nf4[key], float) and 0 <= nf4[key] <= 1
    assert nf4["quantization"]["base_layer"] == ("bitsandbytes Linear4bit (nf4, "
                                                 "double-quantized, blocksize 64, compute "
                                                 "torch.float32)")
    assert "bitsandbytes" in nf4["quantization"]["eval_path"]
    # The encoder's Linear weights in 4 bits: a bit over half a byte each instead of four
    # (the embeddings, a third of the bytes saved, stay in float32).
    config = json.loads((main_job.minilm_dir() / "config.json").read_text())
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    linear_weights = layers * (4 * hidden**2 + 2 * hidden * config["intermediate_size"])
    saved = full["memory"]["base_weight_bytes"] - nf4["memory"]["base_weight_bytes"]
    assert 0.85 * 4 * linear_weights < saved < (4 - 0.5) * linear_weights
    for run in (full, nf4):
        memory = run["memory"]
        assert 0 < memory["train_start_rss_mib"] < memory["train_peak_rss_mib"]
    assert "VmHWM" in summary["memory_probe"]
    saved_json = json.loads((tmp_path / "results.json").read_text())
    assert saved_json["results"][main_job.QUANTIZED]["memory"] == nf4["memory"]


def test_quantized_run_is_skipped_without_bitsandbytes(tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(main_job.importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    summary = main_job.run(tmp_path, steps=1, batch_size=2, train_per_class=1, test_per_class=1,
                           progress=False, methods=("SOS-LoRA", main_job.QUANTIZED),
                           memory_probe=False)
    assert list(summary["results"]) == ["SOS-LoRA"] and summary["checks"]["ok"]
    assert "bitsandbytes is not installed" in summary["skipped"][main_job.QUANTIZED]
    assert "SOS-LoRA nf4: skipped" in capsys.readouterr().out


@pytest.mark.parametrize("methods", [("LoRA",), ("SOS-LoRA", "QLoRA")])
def test_run_refuses_unknown_methods_or_one_without_sos(tmp_path, methods):
    with pytest.raises(ValueError, match="SOS-LoRA among them"):
        main_job.run(tmp_path, methods=methods)
    assert not (tmp_path / "results.json").exists()


def test_storage_bytes_counts_weights_once_and_quantization_state():
    linear = nn.Linear(128, 64)
    assert quantized.storage_bytes(linear) == (128 * 64 + 64) * 4
    tied = nn.Sequential(linear, nn.Linear(128, 64))
    tied[1].weight = linear.weight  # shared: counted once
    assert quantized.storage_bytes(tied) == (128 * 64 + 2 * 64) * 4
    assert quantized.storage_bytes(nn.BatchNorm1d(8)) == 4 * 8 * 4 + 8  # buffers too


@needs_bitsandbytes
@pytest.mark.parametrize("quant", ["nf4", "nf4-double", "int8"])
def test_storage_bytes_of_quantized_layers(quant):
    import bitsandbytes as bnb

    if quant == "int8":
        layer = bnb.nn.Linear8bitLt(128, 64, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(128, 64, quant_type="nf4",
                                  compress_statistics=quant.endswith("double"))
    layer = layer.to("cpu")  # quantized on the move
    bias = 64 * 4
    if quant == "int8":  # int8 codes and a float32 scale per row
        expected = 128 * 64 + 64 * 4 + bias
    elif quant == "nf4":  # two codes a byte, a float32 scale per block of 64, the 16-entry code
        expected = 128 * 64 // 2 + 128 * 4 + 16 * 4 + bias
    else:  # the block scales in 8 bits, with one float32 scale per 256 of them, their
        # 256-entry code and their float32 offset
        expected = 128 * 64 // 2 + 128 + 16 * 4 + 4 + 256 * 4 + 4 + bias
    assert quantized.storage_bytes(layer) == expected
