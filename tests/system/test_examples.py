"""The examples run as documented."""
import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NAIVE = ROOT / "examples" / "naive_summation"
# The examples' models are tiny: one thread each keeps them fast beside other work.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def test_trainer_example_runs(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "train_with_trainer.py"),
                             "--steps", "8", "--out", str(tmp_path)], capture_output=True,
                            text=True, timeout=600, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


def test_plain_loop_example_learns_its_rule(tmp_path):
    # Its default number of steps: the loss must clearly fall and the merged model must have
    # learned next = token + 3 on sequences it never saw.
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "train_plain_loop.py"),
                             "--out", str(tmp_path)], capture_output=True, text=True,
                            timeout=600, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-2000:]
    match = re.search(r"loss ([\d.]+) -> ([\d.]+) .*accuracy on new sequences ([\d.]+)",
                      result.stdout)
    assert match, result.stdout[-2000:]
    first, final, accuracy = map(float, match.groups())
    assert first > 4.0 and final < 0.5, (first, final)
    assert accuracy > 0.95
    change = float(re.search(r"max \|logit change\| ([\d.e+-]+)", result.stdout).group(1))
    assert change < 1e-4
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "adapter_peft" / "adapter_config.json").is_file()


def test_diffusion_unet_example_trains_exports_and_reports(tmp_path):
    pytest.importorskip("diffusers")
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "train_diffusion_unet.py"),
                             "--steps", "12", "--out", str(tmp_path)], capture_output=True,
                            text=True, timeout=600, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-2000:]
    for method in ("sos", "cps"):
        match = re.search(rf"{method}: .*loss ([\d.]+) -> ([\d.]+) .*difference ([\d.e+-]+)",
                          result.stdout)
        assert match, result.stdout[-2000:]
        first, final, difference = map(float, match.groups())
        assert final < first and difference < 1e-5, (method, first, final, difference)
        assert (tmp_path / method / "adapter_config.json").is_file()
    convs = int(re.search(r"(\d+) convolution layers in common", result.stdout).group(1))
    assert convs == 17  # conv_in and both convolutions of the 8 ResNet blocks


def test_trainer_example_under_accelerate_launch_with_2_cpu_processes(tmp_path):
    # --multi_gpu makes accelerate start the processes with torchrun; the example's
    # use_cpu=True then selects MULTI_CPU (gloo). `--cpu` alone would start one process.
    # HF_HOME: no user accelerate config file; port 0: a free port.
    import os

    import soslora_ext as sl

    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
         "2", "--num_machines", "1", "--main_process_port", "0", "--mixed_precision", "no",
         "--dynamo_backend", "no", str(ROOT / "examples" / "train_with_trainer.py"),
         "--steps", "8", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trained in 2 process(es)" in result.stdout, result.stdout[-2000:]
    assert result.stdout.count("trained in") == 1  # rank 0 alone reports and saves
    config = sl.formats.native.read_adapter_config(tmp_path / "adapter")  # checksum verified
    assert len(config["modules"]) == 13  # 2 layers x (query, key, value, 3 dense) + pooler


def committed_results() -> dict[str, str]:
    return {name: hashlib.sha256((NAIVE / name).read_bytes()).hexdigest()
            for name in ("results.json", "RESULTS.md", "scatter.png")}


def test_naive_summation_experiment_small_writes_a_scratch_directory(tmp_path):
    # No --out: the results go to ./runs/naive-summation, and the committed ones stay as they are.
    before = committed_results()
    result = subprocess.run(
        [sys.executable, str(NAIVE / "run.py"), "--train-chars", "20000", "--test-chars", "4000",
         "--pretrain-steps", "4", "--lora-steps", "3"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-2000:]
    assert committed_results() == before
    out = tmp_path / "runs" / "naive-summation"
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["domains"] for r in rows] == ["python+c_header", "python+english",
                                            "c_header+english", "python+c_header+english"]
    assert all(0 <= r["rms_cosine"] <= 1 and r["ppl_naive_sum"] for r in rows)
    assert (out / "scatter.png").stat().st_size > 1000
    assert "Pearson correlation" in (out / "RESULTS.md").read_text()


def naive_summation_args(*argv):
    spec = importlib.util.spec_from_file_location("naive_summation_run", NAIVE / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.parse_args(list(argv))


def test_naive_summation_replaces_committed_results_only_when_asked(capsys):
    assert naive_summation_args().out == Path("runs/naive-summation")
    assert naive_summation_args("--out", "/tmp/x").out == Path("/tmp/x")
    assert naive_summation_args("--update-results").out == NAIVE
    with pytest.raises(SystemExit) as exit_info:
        naive_summation_args("--out", str(NAIVE))
    assert exit_info.value.code == 2
    assert "--update-results" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        naive_summation_args("--update-results", "--out", "/tmp/x")
