"""The main job says what runs and records what its numbers depend on."""
import json

import torch

from soslora_ext import main_job
from soslora_ext.cli import build_parser
from soslora_ext.data import build_filekinds


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
                           progress=False)
    saved = json.loads((tmp_path / "results.json").read_text())
    train, test = build_filekinds(2, 1, seed=0)
    assert saved["data"] == dict(train=8, test=4, train_sha256=main_job.data_digest(train),
                                 test_sha256=main_job.data_digest(test))
    assert saved["environment"] == summary["environment"] == main_job.environment()
    assert list(saved["results"]) == ["SOS-LoRA", "CPS-LoRA", "CPS-LoRA static", "LoRA"]


def test_help_names_the_four_runs():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    text = " ".join(sub.choices["main-job"].format_help().split())
    summary = next(a.help for a in sub._choices_actions if a.dest == "main-job")
    for method in ("SOS-LoRA", "CPS-LoRA", "static", "LoRA"):
        assert method in summary and method in text
    assert "both methods" not in text  # the learning rate and steps apply to all four runs
    assert "learning rate of all four runs" in text
    assert "rank per cluster of both CPS-LoRA runs" in text
