"""The quality benchmark (bench/quality.py): its statistics against known values and an
independent computation, its data splits, and the tiny configuration end to end."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import quality_data  # noqa: E402
import quality_stats as qs  # noqa: E402
from quality_methods import METHODS  # noqa: E402

# t_{0.975, df} from printed tables (6 significant digits).
T975 = {1: 12.7062, 2: 4.30265, 3: 3.18245, 4: 2.77645, 5: 2.57058, 6: 2.44691, 7: 2.36462,
        8: 2.30600, 9: 2.26216, 10: 2.22814, 12: 2.17881, 15: 2.13145, 20: 2.08596,
        25: 2.05954, 30: 2.04227}


@pytest.mark.parametrize("df,expected", sorted(T975.items()))
def test_t_quantile_matches_printed_tables(df, expected):
    assert qs.t_quantile(0.975, df) == pytest.approx(expected, rel=2e-6)


def test_t_quantile_other_levels_and_symmetry():
    assert qs.t_quantile(0.995, 4) == pytest.approx(4.60409, rel=2e-6)
    assert qs.t_quantile(0.95, 10) == pytest.approx(1.81246, rel=2e-6)
    assert qs.t_quantile(0.9, 1) == pytest.approx(3.07768, rel=2e-6)
    assert qs.t_quantile(0.025, 4) == pytest.approx(-qs.t_quantile(0.975, 4), rel=1e-12)
    assert qs.t_quantile(0.5, 3) == 0.0
    for bad in (0, 1, -0.1):
        with pytest.raises(ValueError, match="p must be in"):
            qs.t_quantile(bad, 4)
    with pytest.raises(ValueError, match="df must be an int"):
        qs.t_quantile(0.9, 0)


def _t_density(x, df):
    return (math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))
            * (1 + x * x / df) ** (-(df + 1) / 2))


@pytest.mark.parametrize("df", [1, 2, 3, 4, 7, 10, 29])
@pytest.mark.parametrize("t", [0.3, 1.0, 2.5, 6.0])
def test_t_cdf_agrees_with_integrating_the_density(df, t):
    # Simpson's rule on the density from 0 to t, an independent route to P(0 <= T <= t).
    n = 2000
    h = t / n
    integral = _t_density(0, df) + _t_density(t, df) + sum(
        (4 if i % 2 else 2) * _t_density(i * h, df) for i in range(1, n))
    assert qs.t_cdf(t, df) == pytest.approx(0.5 + integral * h / 3, abs=1e-9)
    assert qs.t_cdf(-t, df) == pytest.approx(1 - qs.t_cdf(t, df), abs=1e-15)


def test_mean_ci_by_hand():
    ci = qs.mean_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    half = 2.776445105 * math.sqrt(2.5) / math.sqrt(5)
    assert ci["mean"] == 3.0 and ci["n"] == 5
    assert ci["sd"] == pytest.approx(math.sqrt(2.5))
    assert ci["half_width"] == pytest.approx(half, rel=1e-8)
    assert (ci["low"], ci["high"]) == pytest.approx((3 - half, 3 + half), rel=1e-8)
    assert math.isnan(qs.mean_ci([0.7])["half_width"])
    with pytest.raises(ValueError, match="must not be empty"):
        qs.mean_ci([])


def test_paired_t_test_by_hand():
    a = [0.71, 0.69, 0.74, 0.70, 0.73]
    b = [0.70, 0.66, 0.70, 0.69, 0.69]
    d = [x - y for x, y in zip(a, b)]  # 0.01, 0.03, 0.04, 0.01, 0.04
    mean = sum(d) / 5
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 4)
    t = mean / (sd / math.sqrt(5))
    r = qs.paired_t_test(a, b)
    assert r["mean_difference"] == pytest.approx(0.026)
    assert r["t"] == pytest.approx(t) and r["df"] == 4
    # Two-sided p for t = 3.88 with 4 degrees of freedom (by the closed form for even df:
    # P(|T| <= t) = sin(theta) (1 + cos(theta)^2 / 2)).
    theta = math.atan(t / 2)
    assert r["p"] == pytest.approx(1 - math.sin(theta) * (1 + math.cos(theta) ** 2 / 2))
    assert 0.01 < r["p"] < 0.05
    assert r["low"] == pytest.approx(mean - 2.776445105 * sd / math.sqrt(5), rel=1e-8)
    flipped = qs.paired_t_test(b, a)
    assert flipped["p"] == pytest.approx(r["p"]) and flipped["t"] == pytest.approx(-t)
    # Pairing matters: the same values unpaired-shuffled give a different answer.
    assert qs.paired_t_test(a, b[::-1])["p"] != pytest.approx(r["p"])


def test_paired_t_test_degenerate_and_bad_input():
    assert qs.paired_t_test([1.0, 2.0], [1.0, 2.0])["p"] == 1.0
    same_shift = qs.paired_t_test([1.5, 2.5, 3.5], [1.0, 2.0, 3.0])
    assert same_shift["p"] == 0.0 and same_shift["mean_difference"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="two equally long lists"):
        qs.paired_t_test([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="two equally long lists"):
        qs.paired_t_test([1.0], [1.0])


def test_holm_adjustment():
    adjusted = qs.holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.5})
    # Sorted: a 0.01 * 4, c 0.03 * 3, b 0.04 * 2 (raised to c's), d 0.5 * 1 (raised to 0.5).
    assert adjusted == pytest.approx({"a": 0.04, "c": 0.09, "b": 0.09, "d": 0.5})
    assert qs.holm({"a": 0.6, "b": 0.7}) == pytest.approx({"a": 1.0, "b": 1.0})


def test_split_pattern_spreads_each_split():
    assert quality_data.split_pattern({"a": 2, "b": 1}) == ["a", "b", "a"]
    pattern = quality_data.split_pattern({"train": 16, "val": 6, "test": 12})
    assert [pattern.count(s) for s in ("train", "val", "test")] == [16, 6, 12]
    # Every stretch of a quarter of the cycle holds some of each split.
    quarter = len(pattern) // 4
    for start in range(0, len(pattern) - quarter + 1, quarter):
        assert set(pattern[start:start + quarter]) == {"train", "val", "test"}


def test_stdlib_modules_splits_are_fixed_disjoint_and_balanced():
    classes = ("argparse", "optparse", "json", "email")
    rows, labels = quality_data.build_stdlib_modules(4, 2, 3, classes=classes)
    again, _ = quality_data.build_stdlib_modules(4, 2, 3, classes=classes)
    assert rows == again and labels == list(classes)
    assert quality_data.digests(rows) == quality_data.digests(again)
    for split, per_class in (("train", 4), ("val", 2), ("test", 3)):
        counts = [sum(1 for _, label in rows[split] if label == c) for c in range(4)]
        assert counts == [per_class] * 4
    texts = {s: {t for t, _ in r} for s, r in rows.items()}
    assert not texts["train"] & texts["test"] and not texts["val"] & texts["test"]
    assert all(40 <= len(t) <= 200 and t.count("\n") <= 3 for t, _ in rows["train"])
    with pytest.raises(FileNotFoundError, match="no_such_module"):
        quality_data.build_stdlib_modules(1, 1, 1, classes=("no_such_module",))
    with pytest.raises(RuntimeError, match="tomllib has .* snippets"):
        quality_data.build_stdlib_modules(500, 1, 1, classes=("tomllib",))


def test_tiny_run_writes_every_entry_and_the_report(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the installed package, as a user runs it
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "quality.py"), "--tiny",
                             "--threads", "1", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("results.json", "quality.png", "RESULTS.md"):
        assert (tmp_path / name).stat().st_size > 500, name
    r = json.loads((tmp_path / "results.json").read_text())
    assert [t["name"] for t in r["tasks"]] == ["stdlib-modules", "man-pages"]
    assert r["seconds"] > 0 and r["environment"]["cpu"]
    for task in r["tasks"]:
        keys = {(run["method"], run["seed"], run["lr"]) for run in task["runs"]}
        assert keys == {(m, s, lr) for m in METHODS for s in r["seeds"] for lr in task["lrs"]}
        assert len(task["lrs"]) >= 2 and len(r["seeds"]) >= 2
        assert set(task["summary"]) == set(METHODS)
        for method, s in task["summary"].items():
            assert s["best_lr"] in task["lrs"]
            assert set(s["test"]) >= {"mean", "half_width", "low", "high"}
            assert len(s["test_by_seed"]) == len(r["seeds"])
            if method == "LoRA":
                assert "vs_baseline" not in s
            else:
                assert set(s["vs_baseline"]) >= {"mean_difference", "low", "high", "p", "p_holm"}
        # Matched parameters: the low-rank methods train the same factor count.
        counts = {m: task["summary"][m]["adapter_parameters"] for m in METHODS}
        assert counts["LoRA"] == counts["rsLoRA"] == counts["SOS-LoRA"] \
            == counts["CPS-LoRA static"] == counts["CPS-LoRA repartitioned"]
        assert counts["LoRA"] < counts["DoRA"] < counts["full FT"]
        assert set(task["data"]["sha256"]) == {"train", "val", "test"}
        # Fairness: one batch sequence per seed, whatever the method and learning rate.
        trained = [run for run in task["runs"] if not run["diverged"]]
        assert len(trained) >= len(task["runs"]) - 2
        for seed in r["seeds"]:
            assert len({run["batches_sha256"] for run in trained if run["seed"] == seed}) == 1
        assert len({run["batches_sha256"] for run in trained}) == len(r["seeds"])
    md = (tmp_path / "RESULTS.md").read_text()
    assert r["environment"]["cpu"] in md
    for task in r["tasks"]:
        section = md[md.index(f"## {task['name']}"):]
        assert "| method | trainable parameters" in section
        for method in METHODS:
            assert f"\n| {method} |" in section
        assert "significantly better than LoRA" in section
    assert "![test metric by method](quality.png)" in md
