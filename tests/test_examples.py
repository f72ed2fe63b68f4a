"""The examples run as documented (few steps)."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script", ["train_plain_loop.py", "train_with_trainer.py"])
def test_example_runs(tmp_path, script):
    result = subprocess.run([sys.executable, str(ROOT / "examples" / script), "--steps", "8",
                             "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


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
    config = sl.serialization.read_adapter_config(tmp_path / "adapter")  # checksum verified
    assert len(config["modules"]) == 13  # 2 layers x (query, key, value, 3 dense) + pooler


def test_naive_summation_experiment_small(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "naive_summation" / "run.py"), "--out",
         str(tmp_path), "--train-chars", "20000", "--test-chars", "4000", "--pretrain-steps", "4",
         "--lora-steps", "3"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    import json

    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["domains"] for r in rows] == ["python+c_header", "python+english",
                                            "c_header+english", "python+c_header+english"]
    assert all(0 <= r["rms_cosine"] <= 1 and r["ppl_naive_sum"] for r in rows)
    assert (tmp_path / "scatter.png").stat().st_size > 1000
    assert "Pearson correlation" in (tmp_path / "RESULTS.md").read_text()
