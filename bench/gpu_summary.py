"""One summary of a `bench/gpu_check.sh` run: the machine, each stage's status and time, and each
performance target of the layer and model benches, met or not, with the rows that miss it.

    python bench/gpu_summary.py bench/results      # writes summary.json and summary.md there

Targets (each a ratio measured in one run, so the machine's speed cancels):
- layer step: SOSLinear (post- and pre-dropout) at or under PEFT LoRA's time and peak extra
  memory, and within 1.05x of the best plain-PyTorch form with the same dropout placement;
  CPSLinear at most 1.1x PEFT's time and at most its peak extra memory;
- merge: SOSLinear.merge at most 1.2x one addmm_ of the folded factors into W;
- model step: SOSLinear's tokens/s at least PEFT's, its peak memory at most PEFT's;
- output-gradient pass: `lowrank_grad_hidden` on the one-pass kernel at most its time on the two
  cuBLAS products (ATen path), each replayed from a CUDA graph: the measurement the per-shape
  choice between them rests on.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def stage_records(results: Path) -> dict:
    """The last record of each stage in stages.tsv: {stage: {rc, seconds}}."""
    stages = {}
    path = results / "stages.tsv"
    if path.exists():
        for line in path.read_text().splitlines():
            name, rc, seconds = line.split("\t")
            stages[name] = dict(rc=int(rc), seconds=int(seconds))
    return stages


def check(name: str, pairs: list[tuple[str, float | None, float | None]], limit: float) -> dict:
    """Target `value <= limit * baseline` for each (label, value, baseline) with both known."""
    measured = [(label, v / b) for label, v, b in pairs if v is not None and b]
    missed = [dict(row=label, ratio=round(ratio, 3)) for label, ratio in measured
              if ratio > limit]
    return dict(target=name, limit=limit, rows=len(measured), missed=missed,
                met=None if not measured else not missed,
                worst=round(max((r for _, r in measured), default=float("nan")), 3))


def layer_targets(data: dict) -> list[dict]:
    cells: dict[tuple, dict] = {}
    for row in data["rows"]:
        key = (row["N"], row["shape"], row["r_tot"], row["dropout"], row.get("threads"))
        cells.setdefault(key, {})[row["method"]] = row

    def pairs(method, baseline, field="ms"):
        out = []
        for key, cell in cells.items():
            if method in cell and baseline in cell:
                threads = f" {key[4]} threads" if key[4] else ""
                label = f"N={key[0]} {key[1]} r={key[2]} p={key[3]}{threads} {method}"
                out.append((label, cell[method][field], cell[baseline][field]))
        return out

    sos = ["SOSLinear", "SOSLinear pre-drop"]
    targets = [
        check("SOSLinear step time <= PEFT LoRA", sum((pairs(m, "PEFT LoRA") for m in sos), []),
              1.0),
        # Each dropout placement against the plain form with the same placement.
        check("SOSLinear step time <= 1.05x plain PyTorch",
              pairs("SOSLinear", "plain PyTorch") + pairs("SOSLinear pre-drop",
                                                          "plain PyTorch pre-drop"), 1.05),
        # The one-node step's target: at or under the plain form (host no longer the bound).
        check("SOSLinear step time <= plain PyTorch",
              pairs("SOSLinear", "plain PyTorch") + pairs("SOSLinear pre-drop",
                                                          "plain PyTorch pre-drop"), 1.0),
        check("SOSLinear peak extra memory <= PEFT LoRA",
              sum((pairs(m, "PEFT LoRA", "peak_extra_mib") for m in sos), []), 1.0),
        check("CPSLinear step time <= 1.1x PEFT LoRA", pairs("CPSLinear", "PEFT LoRA"), 1.1),
        check("CPSLinear peak extra memory <= PEFT LoRA",
              pairs("CPSLinear", "PEFT LoRA", "peak_extra_mib"), 1.0),
    ]
    merges: dict[tuple, dict] = {}
    for row in data.get("merge", []):
        merges.setdefault((row["shape"], row["r_tot"]), {})[row["method"]] = row["ms"]
    targets.append(check("merge <= 1.2x one addmm_", [
        (f"{shape} r={r}", m.get("SOSLinear.merge"), m.get("addmm_ into W"))
        for (shape, r), m in merges.items()], 1.2))
    return targets


def model_targets(data: dict) -> list[dict]:
    rows = data["rows"]
    if "peft_lora" not in rows or "soslinear" not in rows:
        return []
    sos, peft = rows["soslinear"], rows["peft_lora"]
    # Time per token, so that "at or under" reads the same way as the layer targets.
    return [check("model step time <= PEFT LoRA",
                  [("model", 1 / sos["tokens_per_s"], 1 / peft["tokens_per_s"])], 1.0),
            check("model peak memory <= PEFT LoRA",
                  [("model", sos["peak_gib"], peft["peak_gib"])], 1.0)]


def grads_targets(data: dict) -> list[dict]:
    cells: dict[tuple, dict] = {}
    for row in data["rows"]:
        key = (row["N"], row["out"], row["r_tot"], row["dropout"])
        cells.setdefault(key, {})[row["method"]] = row

    def ms(row):
        return row["graph_ms"] if row["graph_ms"] is not None else row["ms"]

    kernel, aten = "lowrank_grad_hidden kernel", "lowrank_grad_hidden ATen"
    return [check("output-gradient pass <= its two cuBLAS products",
                  [(f"N={k[0]} out={k[1]} r={k[2]} p={k[3]}", ms(c[kernel]), ms(c[aten]))
                   for k, c in cells.items() if kernel in c and aten in c], 1.0)]


def summarize(results: Path) -> dict:
    summary = dict(gpu=None, machine=None, stages=stage_records(results), targets=[])
    if (results / "gpu.txt").exists():
        summary["gpu"] = (results / "gpu.txt").read_text().strip()
    for name, targets in (("bench_layer.json", layer_targets), ("bench_model.json", model_targets),
                          ("bench_output_grads.json", grads_targets)):
        path = results / name
        if path.exists():
            data = json.loads(path.read_text())
            summary["machine"] = summary["machine"] or data["machine"]
            summary["targets"] += targets(data)
    return summary


def markdown(summary: dict) -> str:
    lines = [f"# GPU check on {summary['machine'] or 'an unnamed machine'}", ""]
    if summary["gpu"]:
        lines += [f"nvidia-smi: {summary['gpu']}", ""]
    lines += ["| stage | status | seconds |", "|---|---|---|"]
    lines += [f"| {s} | {'ok' if r['rc'] == 0 else 'FAILED rc=' + str(r['rc'])} | {r['seconds']} |"
              for s, r in summary["stages"].items()]
    lines += ["", "| target | met | rows | worst ratio | missed in |", "|---|---|---|---|---|"]
    for t in summary["targets"]:
        missed = "; ".join(f"{m['row']} ({m['ratio']}x)" for m in t["missed"][:6])
        if len(t["missed"]) > 6:
            missed += f"; and {len(t['missed']) - 6} more"
        met = {True: "yes", False: "NO", None: "not measured"}[t["met"]]
        lines.append(f"| {t['target']} | {met} | {t['rows']} | {t['worst']} | {missed} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    results = Path(argv[0] if argv else "bench/results")
    summary = summarize(results)
    (results / "summary.json").write_text(json.dumps(summary, indent=1))
    text = markdown(summary)
    (results / "summary.md").write_text(text)
    print(text)
    failed = [s for s, r in summary["stages"].items() if r["rc"] != 0 and s != "summary"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
