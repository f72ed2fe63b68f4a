"""RESULTS.md and quality.png of the quality benchmark, from its results.json summary."""
from __future__ import annotations

import math
from pathlib import Path

ALPHA = 0.05


def _fmt(value: float, metric: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.4f}" if metric == "accuracy" else f"{value:.3f}"


def _p(value: float) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    return "< 0.001" if value < 0.001 else f"{value:.3f}"


def significance_sentences(task: dict) -> list[str]:
    """Which methods differ from the baseline at Holm-adjusted p < ALPHA, and which do not."""
    metric, baseline = task["metric"], task["baseline"]
    better, worse, same = [], [], []
    for method, s in task["summary"].items():
        c = s.get("vs_baseline")
        if method == baseline or c is None:
            continue
        improved = (c["mean_difference"] > 0) == task["higher_is_better"]
        if c["p_holm"] < ALPHA:
            (better if improved else worse).append(method)
        else:
            same.append(f"{method} ({'+' if c['mean_difference'] >= 0 else ''}"
                        f"{_fmt(c['mean_difference'], metric)}, p = {_p(c['p'])})")
    direction = "higher" if task["higher_is_better"] else "lower"
    lines = [f"Against {baseline} ({direction} {metric} is better; paired over the "
             f"{task['seeds']} seeds, Holm-adjusted over the {len(task['summary']) - 1} "
             f"comparisons, significant at p < {ALPHA}):"]
    lines.append(f"- significantly better than {baseline}: "
                 f"{', '.join(better) if better else 'none'}")
    lines.append(f"- significantly worse than {baseline}: {', '.join(worse) if worse else 'none'}")
    lines.append(f"- no significant difference: {', '.join(same) if same else 'none'}")
    ceiling = task["summary"].get("full FT")
    base = task["summary"].get(baseline)
    if ceiling and base and ceiling.get("test") and base.get("test"):
        gap = ceiling["test"]["mean"] - base["test"]["mean"]
        lines.append(f"- ceiling: full fine-tuning of the targeted layers reaches "
                     f"{_fmt(ceiling['test']['mean'], metric)} against {baseline}'s "
                     f"{_fmt(base['test']['mean'], metric)} "
                     f"({'+' if gap >= 0 else ''}{_fmt(gap, metric)}).")
    return lines


def task_table(task: dict) -> list[str]:
    metric, baseline = task["metric"], task["baseline"]
    lines = [f"| method | trainable parameters (adapters + whole modules) | best lr | test "
             f"{metric}, mean ± 95% CI | difference vs {baseline} [95% CI] | p | p (Holm) |",
             "|---|---|---|---|---|---|---|"]
    for method, s in task["summary"].items():
        if s.get("test") is None:
            lines.append(f"| {method} | {s['adapter_parameters']:,} + {s['saved_parameters']:,} "
                         "| every lr diverged | n/a | n/a | n/a | n/a |")
            continue
        test = s["test"]
        c = s.get("vs_baseline")
        if c is None:
            diff, p, ph = "(baseline)", "", ""
        else:
            sign = "+" if c["mean_difference"] >= 0 else ""
            diff = (f"{sign}{_fmt(c['mean_difference'], metric)} "
                    f"[{_fmt(c['low'], metric)}, {_fmt(c['high'], metric)}]")
            p, ph = _p(c["p"]), _p(c["p_holm"])
        lines.append(f"| {method} | {s['adapter_parameters']:,} + {s['saved_parameters']:,} | "
                     f"{s['best_lr']:g} | {_fmt(test['mean'], metric)} ± "
                     f"{_fmt(test['half_width'], metric)} | {diff} | {p} | {ph} |")
    return lines


def sweep_table(task: dict) -> list[str]:
    metric = task["metric"]
    lrs = task["lrs"]
    lines = ["| method | " + " | ".join(f"val {metric}, lr {lr:g}" for lr in lrs) + " |",
             "|---|" + "---|" * len(lrs)]
    for method, s in task["summary"].items():
        cells = []
        for lr in lrs:
            v = s["val_by_lr"].get(f"{lr:g}")
            cell = "diverged" if v is None else _fmt(v, metric)
            cells.append(f"**{cell}**" if lr == s.get("best_lr") else cell)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def results_markdown(r: dict) -> str:
    env = r["environment"]
    lines = [
        "# Quality benchmark: SOS-LoRA against tuned baselines",
        "",
        f"Produced by `{r['command']}` in {r['seconds'] / 60:.1f} min "
        f"({r['seconds']:.0f} s) on {env['cpu']} ({env['threads']} threads, "
        f"{env['cpu_capability']} kernels); torch {env['torch']}, peft {env['peft']}, "
        f"transformers {env['transformers']}. Per task: "
        + ", ".join(f"{t['name']} {t['seconds']:.0f} s" for t in r["tasks"]) + ".",
        "",
        "Protocol: every method trains the same model on the same data, for the same number "
        "of steps, with the same batches (the batch order of seed s is the same for every "
        "method and learning rate) and the same seeds "
        f"({', '.join(map(str, r['seeds']))}). Each method gets the same learning-rate sweep; "
        "its learning rate is the one with the best validation metric (mean over the seeds), "
        "and the test split is reported at that learning rate only. The comparison against "
        "LoRA is paired over seeds (paired t-test on the per-seed differences); intervals "
        "are Student t 95% intervals over the seeds. Optimizer: AdamW, no weight decay, "
        "linear warm-up over the first tenth of the steps, then constant, gradient norm "
        "clipped at 1.",
        "",
        "Matched parameters: " + r["matching"],
        "",
    ]
    for t in r["tasks"]:
        lines += [f"## {t['name']}", "", t["description"], "",
                  f"Steps {t['steps']}, batch {t['batch_size']}, rank {t['rank']}, alpha "
                  f"{t['alpha']:g}, learning rates {', '.join(f'{lr:g}' for lr in t['lrs'])}. "
                  "Data sha256 (first 12): "
                  + ", ".join(f"{k} {v[:12]}" for k, v in t["data"]["sha256"].items())
                  + f"; sizes {t['data']['sizes']}.", ""]
        lines += task_table(t) + [""] + significance_sentences(t) + [""]
        lines += ["Validation metric by learning rate (mean over seeds; the chosen one in "
                  "bold):", ""] + sweep_table(t) + [""]
    lines += ["![test metric by method](quality.png)", ""]
    return "\n".join(lines)


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = r["tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.6), squeeze=False)
    for ax, t in zip(axes[0], tasks):
        methods = [m for m, s in t["summary"].items() if s.get("test")]
        for i, m in enumerate(methods):
            s = t["summary"][m]
            color = "tab:red" if m == t["baseline"] else (
                "tab:grey" if m == "full FT" else "tab:blue")
            ax.scatter([i] * len(s["test_by_seed"]), s["test_by_seed"], s=10, color=color,
                       alpha=0.4)
            ax.errorbar(i, s["test"]["mean"], yerr=s["test"]["half_width"], fmt="o",
                        color=color, capsize=4)
        base = t["summary"].get(t["baseline"], {}).get("test")
        if base:
            ax.axhline(base["mean"], color="tab:red", linestyle="--", linewidth=0.8)
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels(methods, rotation=35, ha="right", fontsize=8)
        better = "higher" if t["higher_is_better"] else "lower"
        ax.set_ylabel(f"test {t['metric']} ({better} is better)")
        ax.set_title(f"{t['name']}: mean ± 95% CI over {t['seeds']} seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
