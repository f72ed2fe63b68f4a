"""The structure report as a table: a row per layer with its verdict, the medians, the zero
layers skipped, the model's verdict last, and where the matrices came from."""
import torch

from soslora_ext.apps.cps_check import describe_source, format_structure
from soslora_ext.layers.structure import check_structure


def test_table_rows_medians_skipped_and_verdict():
    g = torch.Generator().manual_seed(0)
    matrices = {"block.a": torch.randn(24, 20, generator=g),
                "block.b": torch.randn(20, 30, generator=g), "unused": torch.zeros(4, 4)}
    report = check_structure(matrices, num_clusters=2, rank=2, null_draws=2)
    lines = format_structure(report).splitlines()
    rows = {line.split()[0]: line for line in lines if line.startswith(("block.", "median"))}
    assert set(rows) == {"block.a", "block.b", "median"}
    for name in ("block.a", "block.b"):
        layer = report["layers"][name]
        assert rows[name].split()[1] == "x".join(map(str, layer["shape"]))
        assert rows[name].endswith(layer["verdict"])
        assert f"{layer['error']['best']:.3f}" in rows[name]
    assert "skipped (zero): unused" in lines
    assert any(line.startswith("2 layers measured in ") for line in lines)
    assert lines[-1] == f"model: {report['model']['text']}"
    assert "the given matrices" in lines[0]


def test_the_source_is_named():
    assert "the sum of 8 steps' gradients (batches of 16" in describe_source(
        dict(source=dict(kind="gradients", steps=8, batch_size=16)))
    assert "the update of runs/ft (tuned - base" in describe_source(
        dict(source=dict(kind="delta", tuned="runs/ft")))
