"""Training-step cost of an adapted convolution and embedding: SOS-LoRA and CPS-LoRA against
PEFT's LoRA with the same trainable parameters, and the frozen layer.

Times forward + backward, base frozen, of a UNet-sized nn.Conv2d (320 -> 320 channels, 3x3,
padding 1, a batch of 4 latents of 32x32; its input requires grad, as inside a UNet) and an
LLM-sized nn.Embedding (32000 x 1024, a batch of 8 x 512 tokens; the frozen one's step is its
forward, nothing needs its gradient), each adapted by
apply_sos_lora (K experts, total rank r), apply_cps_lora (K clusters of rank r: the parameters
of a rank-r LoRA, as in bench_layer.py) and PEFT's LoRA of rank r, all in one process, for each
thread count. Every figure is also a ratio against the frozen layer and against PEFT measured
in the same run, with the peak extra memory of one step (bench/peak_memory.py) and the ATen ops
it dispatches (bench/op_count.py). A method the package cannot apply to a kind is reported with
its one-line refusal. Prints a markdown table last; --json writes the rows.

    python bench/bench_kinds.py                      # both layers, r = 16, 1 and 2 threads
    python bench/bench_kinds.py --ranks 16 64 --threads 2 --json runs/bench/kinds.json
    python bench/bench_kinds.py --tiny               # seconds: small layers (the tests run it)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import soslora_ext as sl  # noqa: E402

from baselines import peft_lora  # noqa: E402
from bench_layer import machine_name, time_step  # noqa: E402
from op_count import count_ops  # noqa: E402
from peak_memory import peak_extra_mib  # noqa: E402

K = 4
# (what, base factory, input factory): the shapes, and the tiny ones of --tiny.
SHAPES = {
    "Conv2d 320→320 3×3, 4×32×32": (lambda: nn.Conv2d(320, 320, 3, padding=1),
                                     lambda: torch.randn(4, 320, 32, 32, requires_grad=True)),
    "Embedding 32000×1024, 8×512": (lambda: nn.Embedding(32000, 1024),
                                    lambda: torch.randint(0, 32000, (8, 512))),
}
TINY_SHAPES = {
    "Conv2d 16→24 3×3, 2×8×8": (lambda: nn.Conv2d(16, 24, 3, padding=1),
                                lambda: torch.randn(2, 16, 8, 8, requires_grad=True)),
    "Embedding 500×32, 2×16": (lambda: nn.Embedding(500, 32),
                               lambda: torch.randint(0, 500, (2, 16))),
}
METHODS = ["frozen", "PEFT LoRA", "SOS-LoRA", "CPS-LoRA"]


class Holder(nn.Module):
    """The layer under a name (`proj`) that apply_* and PEFT can target."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.proj = base

    def forward(self, x):
        return self.proj(x)


def adapted(method: str, make_base, r: int) -> nn.Module:
    """The frozen layer adapted by `method` (raises what apply_* raises for a kind it refuses)."""
    torch.manual_seed(0)
    base = make_base()
    base.requires_grad_(False)
    alpha = 2.0 * r
    if method == "frozen":
        return Holder(base)
    if method == "PEFT LoRA":
        return peft_lora(base, r, alpha, 0.0)
    if method == "SOS-LoRA":
        return sl.apply_sos_lora(Holder(base), ["proj"], num_experts=K, rank=r, alpha=alpha)
    return sl.apply_cps_lora(Holder(base), ["proj"], num_clusters=K, rank=r, alpha=alpha,
                             init_partition="random")


def clear_grads(module: nn.Module, x: torch.Tensor) -> None:
    x.grad = None
    for p in module.parameters():
        p.grad = None


def training_step(module: nn.Module, x: torch.Tensor, grad: torch.Tensor):
    """One forward + backward (gradients reset first)."""
    def step():
        clear_grads(module, x)
        y = module(x)
        if y.requires_grad:  # the frozen embedding has nothing to back-propagate into
            y.backward(grad)
    return step


def bench_layer(what: str, make_base, make_input, r: int, warmup: int, iters: int,
                budget_s: float) -> list[dict]:
    torch.manual_seed(1)
    x = make_input()
    with torch.no_grad():
        grad = torch.randn_like(Holder(make_base())(x))
    rows = []
    for method in METHODS:
        row = dict(layer=what, r=r, threads=torch.get_num_threads(), method=method)
        try:
            module = adapted(method, make_base, r)
        except Exception as error:  # a kind the method does not adapt: its refusal, one line
            rows.append(dict(row, refused=f"{type(error).__name__}: {str(error)[:160]}"))
            continue
        if module is None:  # peft is not installed
            continue
        module.train()
        params = sum(p.numel() for p in module.parameters() if p.requires_grad)

        step = training_step(module, x, grad)
        ms, spread = time_step(step, torch.device("cpu"), warmup, iters, budget_s)
        step()
        clear_grads(module, x)  # so that the peak counts the step's gradients
        mem = peak_extra_mib(step, torch.device("cpu"))
        rows.append(dict(row, ms=ms, spread=spread, peak_extra_mib=mem,
                         ops=sum(count_ops(step).values()), trainable_params=params))
        del module
    measured = {r["method"]: r for r in rows if "ms" in r}
    for row in rows:
        if "ms" not in row:
            continue
        for ref, key in (("frozen", "x_frozen"), ("PEFT LoRA", "x_peft")):
            if ref in measured:
                row[key] = row["ms"] / measured[ref]["ms"]
        peft_mib = measured.get("PEFT LoRA", {}).get("peak_extra_mib")
        if peft_mib and row["peak_extra_mib"] is not None:
            row["mem_x_peft"] = row["peak_extra_mib"] / peft_mib
    return rows


def targets(rows: list[dict]) -> list[dict]:
    """The issue's CPU target: an adapted layer's training step at or under PEFT's time."""
    return [dict(target=f"{r['method']} step time <= PEFT LoRA", layer=r["layer"],
                 threads=r["threads"], r=r["r"], value=r["x_peft"], met=r["x_peft"] <= 1.0)
            for r in rows if r["method"] in ("SOS-LoRA", "CPS-LoRA") and "x_peft" in r]


def markdown_table(rows: list[dict]) -> str:
    lines = ["| layer | r | threads | method | ms per step | × frozen | × PEFT | peak extra "
             "memory | trainable | ATen ops |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = f"| {r['layer']} | {r['r']} | {r['threads']} | {r['method']} |"
        if "ms" not in r:
            lines.append(f"{head} refused: {r['refused']} | | | | | |")
            continue
        mem = "" if r["peak_extra_mib"] is None else f"{r['peak_extra_mib']:.1f} MiB"
        if "mem_x_peft" in r:
            mem += f" ({r['mem_x_peft']:.2f}× PEFT)"
        x_peft = f"{r['x_peft']:.2f}×" if "x_peft" in r else ""
        lines.append(f"{head} {r['ms']:.2f} ±{50 * r['spread']:.0f}% | {r['x_frozen']:.2f}× | "
                     f"{x_peft} | {mem} | {r['trainable_params']:,} | {r['ops']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[16],
                        help="PEFT's rank r (SOS-LoRA's total rank; CPS-LoRA's per cluster)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--budget", type=float, default=4.0,
                        help="seconds of repeats per method (at least 5 repeats)")
    parser.add_argument("--tiny", action="store_true",
                        help="small layers, r = 4, few repeats: checks the script in seconds")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    args = parser.parse_args(argv)
    shapes = TINY_SHAPES if args.tiny else SHAPES
    if args.tiny:
        args.ranks, args.warmup, args.iters, args.budget = [4], 1, 3, 0.2
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for what, (make_base, make_input) in shapes.items():
            for r in args.ranks:
                rows += bench_layer(what, make_base, make_input, r, args.warmup, args.iters,
                                    args.budget)
                print(f"done: {what}, r = {r}, {threads} thread(s)", flush=True)
    machine = machine_name(torch.device("cpu"), args.threads)
    met = targets(rows)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(machine=machine, rows=rows, targets=met),
                                        indent=2) + "\n")
    print()
    for t in met:
        print(f"{'met' if t['met'] else 'MISSED'}: {t['target']} ({t['layer']}, r = {t['r']}, "
              f"{t['threads']} thread(s)): {t['value']:.2f}×")
    print(f"\n{machine}; medians of the repeats (± half their interquartile range)\n")
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
