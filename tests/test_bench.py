"""The bench scripts run end to end on a small CPU grid and write what they promise (their
GPU runs happen in bench/gpu_check.sh; nothing here times anything)."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(*args):
    result = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True,
                            timeout=600, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_layer_bench_writes_json_png_and_markdown(tmp_path):
    out = run(ROOT / "bench" / "bench_layer.py", "--n", "64", "--shapes", "48x40", "--ranks", "8",
              "--dropout", "0.1", "--warmup", "1", "--iters", "2", "--json",
              tmp_path / "layer.json", "--png", tmp_path / "layer.png")
    data = json.loads((tmp_path / "layer.json").read_text())
    methods = {r["method"] for r in data["rows"]}
    assert {"frozen base", "PEFT LoRA", "reference SOS", "plain PyTorch", "SOSLinear",
            "SOSLinear pre-drop", "CPSLinear"} <= methods
    assert all(r["ms"] > 0 for r in data["rows"] + data["merge"] + data["penalty"])
    assert (tmp_path / "layer.png").stat().st_size > 1000
    table = out[out.rindex("| N |"):]  # the markdown table is printed last
    assert table.count("\n|") == 2 and "SOSLinear" in table


def test_model_bench_runs_every_variant(tmp_path):
    out = run(ROOT / "bench" / "bench_model.py", "--tiny", "--warmup", "1", "--iters", "1",
              "--json", tmp_path / "model.json")
    rows = json.loads((tmp_path / "model.json").read_text())["rows"]
    assert list(rows) == ["frozen_base", "peft_lora", "reference_sos", "plain_pytorch",
                          "soslinear"]
    assert rows["frozen_base"]["x_frozen_tokens_per_s"] == 1.0
    assert all(r["tokens_per_s"] > 0 for r in rows.values())
    assert out.rstrip().splitlines()[-1].startswith("| soslinear |")
