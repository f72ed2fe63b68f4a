"""Does CPS-LoRA fit a model? The report of ``layers.structure.check_structure`` as a table
and a picture (``python -m soslora_ext cps-check``, which also writes it as JSON)."""
from __future__ import annotations

import os
from pathlib import Path

from ..compose import require_matplotlib


def describe_source(report: dict) -> str:
    source = report.get("source") or {}
    if source.get("kind") == "gradients":
        return (f"the sum of {source['steps']} steps' gradients (batches of "
                f"{source['batch_size']}, no optimizer step)")
    if source.get("kind") == "delta":
        return f"the update of {source['tuned']} (tuned - base weights)"
    return "the given matrices"


def format_structure(report: dict) -> str:
    """The report as a readable table: one row per layer, then the model's verdict."""
    G, r = report["num_clusters"], report["rank"]
    lines = [f"CPS-LoRA structure check of {describe_source(report)}: {G} blocks of rank {r} "
             f"against one rank-{r} term (equal parameters); block energy against "
             f"{report['null_draws']} spectral nulls (same singular values, random singular "
             "vectors)", ""]
    width = max(len("layer"), *(len(n) for n in report["layers"]))
    lines.append(f"{'layer':<{width}} {'shape':>10} {'top-r':>6} {'blocks':>7} "
                 f"{'null min-max':>13} {'excess':>7} {'CPS err':>8} {'global':>7}  verdict")
    for name, layer in report["layers"].items():
        energy, error = layer["block_energy"], layer["error"]
        shape = "x".join(str(s) for s in layer["shape"])
        null = f"{min(energy['null']):.3f}-{max(energy['null']):.3f}"
        lines.append(f"{name:<{width}} {shape:>10} {layer['top_rank_energy']:>6.3f} "
                     f"{energy['value']:>7.3f} {null:>13} {energy['excess']:>+7.3f} "
                     f"{error['best']:>8.3f} {error['global']:>7.3f}  {layer['verdict']}")
    m = report["model"]["medians"]
    lines.append(f"{'median':<{width}} {'':>10} {m['top_rank_energy']:>6.3f} "
                 f"{m['block_energy']:>7.3f} {m['null_energy']:>13.3f} {m['excess']:>+7.3f} "
                 f"{m['cps_error']:>8.3f} {m['global_error']:>7.3f}")
    if report.get("skipped"):
        lines.append(f"skipped (zero): {', '.join(report['skipped'])}")
    timing = f"{len(report['layers'])} layers measured in {report['seconds']:.1f} s"
    if "seconds" in (report.get("source") or {}):
        timing += f", after {report['source']['seconds']:.1f} s of gradients"
    lines.append(timing)
    lines += ["", "top-r: share of ||W||^2 in the top r singular values; blocks: share on the "
              "diagonal blocks of the co-clustering; excess: blocks - the nulls' mean; CPS err: "
              "relative error of the best of the contiguous, CPS-LoRA's and the co-clustered "
              "partitions; global: one rank-r term's", "",
              f"model: {report['model']['text']}"]
    return "\n".join(lines)


def plot_structure(report: dict, path: str | os.PathLike) -> Path:
    """A PNG: each layer's block energy against its nulls' range (left), and the best CPS
    error against one global term's at equal parameters (right, below the diagonal: the
    blocks fit better)."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(report["layers"].values())
    x = range(len(layers))
    colors = {"clustered": "tab:green", "inconclusive": "tab:orange", "global": "tab:red"}
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    low = [min(l["block_energy"]["null"]) for l in layers]
    high = [max(l["block_energy"]["null"]) for l in layers]
    left.fill_between(x, low, high, step="mid", color="0.8", label="spectral null (min-max)")
    left.scatter(x, [l["block_energy"]["value"] for l in layers],
                 c=[colors[l["verdict"]] for l in layers], s=18, zorder=3, label="the matrix")
    left.set_xlabel("layer (in model order)")
    left.set_ylabel("share of ||W||² on the diagonal blocks")
    left.set_ylim(0, 1.02)
    left.legend(loc="upper left", fontsize=8)
    left.set_title("Block energy of the co-clustering")
    for verdict, color in colors.items():
        chosen = [l for l in layers if l["verdict"] == verdict]
        if chosen:
            right.scatter([l["error"]["global"] for l in chosen],
                          [l["error"]["best"] for l in chosen], c=color, s=18,
                          label=f"{verdict} ({len(chosen)})")
    right.plot([0, 1], [0, 1], color="0.5", lw=1)
    right.set_xlim(0, 1.02)
    right.set_ylim(0, 1.02)
    right.set_xlabel(f"one rank-{report['rank']} term: relative error")
    right.set_ylabel(f"{report['num_clusters']} blocks of rank {report['rank']}: relative error")
    right.legend(loc="lower right", fontsize=8)
    right.set_title("Equal parameters: blocks vs one term")
    fig.suptitle(f"CPS-LoRA structure check: {report['model']['verdict']}")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

