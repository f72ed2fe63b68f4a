"""The bench scripts run end to end on a small CPU grid and write what they promise (their
GPU runs happen in bench/gpu_check.sh; nothing here times anything)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(*args):
    result = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True,
                            timeout=600, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_layer_bench_writes_json_png_and_markdown(tmp_path):
    out = run(ROOT / "bench" / "bench_layer.py", "--n", "64", "--shapes", "48x40", "--ranks", "8",
              "--dropout", "0.1", "--threads", "1", "2", "--warmup", "1", "--iters", "2",
              "--json", tmp_path / "layer.json", "--png", tmp_path / "layer.png")
    data = json.loads((tmp_path / "layer.json").read_text())
    methods = {r["method"] for r in data["rows"]}
    assert {"frozen base", "PEFT LoRA", "reference SOS", "plain PyTorch",
            "plain PyTorch pre-drop", "SOSLinear", "SOSLinear pre-drop", "CPSLinear"} <= methods
    # The CPU peak is measured for every row (its accuracy: the test below; steps this small
    # are within its page-level noise, so only its presence is checked here).
    assert all(r["peak_extra_mib"] is not None and r["peak_extra_mib"] >= 0
               for r in data["rows"])
    assert all(r["ms"] > 0 for r in data["rows"] + data["merge"] + data["penalty"])
    assert {r["threads"] for r in data["rows"]} == {1, 2}
    assert all(r["spread"] >= 0 for r in data["rows"])
    assert "1/2 threads" in data["machine"]
    assert {t["target"] for t in data["targets"]} >= {"merge <= 1.2x one addmm_",
                                                      "CPSLinear step time <= 1.1x PEFT LoRA",
                                                      "CPSLinear peak extra memory <= PEFT LoRA"}
    assert (tmp_path / "layer.png").stat().st_size > 1000
    table = out[out.rindex("| N |"):]  # the markdown table is printed last
    assert table.count("\n|") == 3 and "SOSLinear" in table  # one line per thread count
    # ATen ops per step on the CPU, SOSLinear (one node) far under the reference formulation.
    ops = {r["method"]: r["ops"] for r in data["rows"] if r["threads"] == 1}
    assert all(isinstance(n, int) and n > 0 for n in ops.values())
    assert ops["SOSLinear"] < ops["reference SOS"] / 2
    # The small multiples redraw from the JSON alone.
    run(ROOT / "bench" / "bench_layer.py", "--plot-only", tmp_path / "layer.json", "--png",
        tmp_path / "again.png")
    assert (tmp_path / "again.png").stat().st_size > 1000


def test_tiny_step_table():
    out = run(ROOT / "bench" / "bench_layer.py", "--tiny")
    table = out[out.rindex("| method |"):]
    for method in ("plain PyTorch", "PEFT LoRA", "SOSLinear", "SOSLinear λ=0", "CPSLinear"):
        assert f"| {method} | " in table
    assert table.count(" ops)") == 2 * 9  # both dropout rates of every method


PEAK_CHILD = r"""
import sys
import torch
sys.path.insert(0, sys.argv[1])
import peak_memory
mib = 2**20 // 4  # float32 elements per MiB

def two_live_then_one():
    a = torch.ones(32 * mib)
    b = a * 2  # 64 MiB live here
    del a, b
    return torch.zeros(16 * mib).sum()

def eight_mib():
    return torch.ones(8 * mib).sum()

for _ in range(3):  # glibc now keeps 8 MiB blocks in its heap for reuse
    eight_mib()
for step in (two_live_then_one, eight_mib):
    print(step.__name__, peak_memory.peak_extra_mib(step, torch.device("cpu")))
"""


def test_cpu_peak_memory_counts_what_a_step_holds_at_once():
    # In a fresh process: the measure reads the process's memory, which the heap left by
    # earlier tests in this one (free blocks malloc keeps) would blur.
    out = subprocess.run([sys.executable, "-c", PEAK_CHILD, str(ROOT / "bench")],
                         capture_output=True, text=True, check=True).stdout
    peaks = {name: float(value) for name, value in (line.split() for line in out.splitlines())}
    for name, expected in (("two_live_then_one", 64), ("eight_mib", 8)):
        assert expected - 1 <= peaks[name] <= expected + 8, (name, peaks[name])


def test_model_bench_runs_every_variant(tmp_path):
    out = run(ROOT / "bench" / "bench_model.py", "--tiny", "--warmup", "1", "--iters", "1",
              "--json", tmp_path / "model.json")
    rows = json.loads((tmp_path / "model.json").read_text())["rows"]
    assert list(rows) == ["frozen_base", "peft_lora", "reference_sos", "plain_pytorch",
                          "soslinear"]
    assert rows["frozen_base"]["x_frozen_tokens_per_s"] == 1.0
    assert all(r["tokens_per_s"] > 0 for r in rows.values())
    assert out.rstrip().splitlines()[-1].startswith("| soslinear |")


def test_kinds_bench_times_every_method_on_both_layers(tmp_path):
    out = run(ROOT / "bench" / "bench_kinds.py", "--tiny", "--threads", "1", "2",
              "--json", tmp_path / "kinds.json")
    data = json.loads((tmp_path / "kinds.json").read_text())
    rows = data["rows"]
    assert {(r["layer"].split()[0], r["threads"]) for r in rows} == {
        (kind, t) for kind in ("Conv2d", "Embedding") for t in (1, 2)}
    assert len(rows) == 2 * 2 * 4 and not any("refused" in r for r in rows)
    for r in rows:
        assert r["ms"] > 0 and r["x_frozen"] > 0 and r["x_peft"] > 0 and r["ops"] > 0
        if r["method"] != "frozen":  # PEFT's rank-4 budget: r (in * 3 * 3 + out), r (num + dim)
            assert r["trainable_params"] == (4 * (16 * 9 + 24) if "Conv2d" in r["layer"]
                                             else 4 * (500 + 32)), r
        assert (r["x_peft"] == 1.0) == (r["method"] == "PEFT LoRA")
    assert {t["layer"] for t in data["targets"]} <= {r["layer"] for r in rows}
    assert "1/2 threads" in data["machine"]
    assert out.rstrip().splitlines()[-1].startswith("| Embedding 500×32")


def test_structure_bench_tells_planted_blocks_from_their_null(tmp_path):
    out = run(ROOT / "bench" / "bench_structure.py", "--tiny", "--json", tmp_path / "s.json")
    rows = json.loads((tmp_path / "s.json").read_text())["planted"]
    assert [r["verdict"] for r in rows] == ["clustered", "global"] * 2
    assert all(r["row_ari"] == r["col_ari"] == 1.0 for r in rows if r["matrix"] == "planted")
    assert out.count("\n| ") == 1 + len(rows)  # the table, printed last
    assert out.rstrip().splitlines()[-1].startswith("| 40x96 | spectral null | global")


def test_repartition_bench_runs_each_rule(tmp_path):
    run(ROOT / "bench" / "bench_repartition.py", "--tiny", "--json", tmp_path / "r.json")
    runs = {r["rule"]: r for r in json.loads((tmp_path / "r.json").read_text())["runs"]}
    assert list(runs) == ["static", "discard", "carry"]
    assert runs["static"]["proposals"] == 0 < runs["discard"]["proposals"]
    assert runs["carry"]["proposals"] == runs["discard"]["proposals"]
    for r in runs.values():  # every proposal's gain and loss is recorded
        assert all({"captured_before", "captured_after", "update_discarded"} <= set(v)
                   for record in r["repartitions"] for v in record["layers"].values())


@pytest.mark.parametrize("margin", [0.0, 1e9])  # every proposal adopted, none
def test_carrying_the_update_over_keeps_the_function(monkeypatch, margin):
    """An adopted proposal under "carry" moves what the new blocks cannot hold into the base:
    the layer computes what it did before; a declined one leaves the layer as it was."""
    import importlib.util

    import torch

    import soslora_ext as sl

    spec = importlib.util.spec_from_file_location(
        "bench_repartition", ROOT / "bench" / "bench_repartition.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(bench, "ADOPTION_MARGIN", margin)
    torch.manual_seed(0)
    layer = sl.CPSLinear(torch.nn.Linear(24, 20, dtype=torch.float64), num_clusters=2, rank=2)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, 24, dtype=torch.float64)
    before = layer(x)
    A0, rows0 = layer.lora_A.detach().clone(), layer.row_index.clone()
    layer.collect_statistics()
    layer(torch.randn(64, 24, dtype=torch.float64)).square().sum().backward()
    with bench.CarryOver():
        layer.repartition()
    assert torch.allclose(layer(x), before, atol=1e-12, rtol=0)
    assert layer.last_repartition["adopted"] == (margin == 0.0)
    assert (layer.last_repartition["delta_change"] > 0.1) == (margin == 0.0)
    if margin:  # declined: the factors and the partition are the ones it had
        assert torch.equal(layer.lora_A, A0) and torch.equal(layer.row_index, rows0)


def test_gpu_check_stages_run_dry_on_cpu(tmp_path):
    """bench/gpu_check.sh's logic (every stage, the summary) on the CPU with tiny sizes, so that a
    mistake in it cannot waste the rare GPU time."""
    env = {**ENV, "GPU_CHECK_DRY": "1", "RESULTS": str(tmp_path), "PYTHON": sys.executable}
    env.pop("OUT", None)
    result = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")], capture_output=True,
                            text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [s for s in summary["stages"]] == ["build", "tests", "grads", "layer", "model",
                                              "products"]
    assert all(s["rc"] == 0 for s in summary["stages"].values())
    targets = {t["target"]: t for t in summary["targets"]}
    assert "SOSLinear step time <= PEFT LoRA" in targets and "merge <= 1.2x one addmm_" in targets
    assert "output-gradient pass <= its two cuBLAS products" in targets
    assert all(t["met"] in (True, False) for t in targets.values() if t["rows"])
    assert (tmp_path / "summary.md").read_text().startswith("# GPU check on CPU")
    products = json.loads((tmp_path / "bench_products.json").read_text())["rows"]
    assert {r["product"] for r in products} >= {"h = D(x) Aᵀ", "grad_A = grad_hᵀ D(x)",
                                                 "cluster fwd, G=4", "cluster bwd, G=4"}
    assert all(r["kernels_ms"] > 0 and r["aten_ms"] > 0 for r in products)
    bad = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "tests", "typo"],
                         capture_output=True, text=True, timeout=60, env=env)
    assert bad.returncode == 2 and "unknown stage 'typo'" in bad.stdout
