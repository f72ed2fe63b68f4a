"""Training-step cost of one adapted linear layer: SOSLinear and CPSLinear against what users
run instead; plus the in-place merge and the orthogonality penalty.

Times forward + backward (base frozen, input requiring grad, as inside a network) for the
frozen base nn.Linear, PEFT's LoRA at the same total rank (when peft is installed), the
reference SOS-LoRA formulation, the best plain-PyTorch form, SOSLinear (on CUDA once per
implementation: the default dispatch, the hand-written kernels everywhere, ATen/cuBLAS
everywhere; and with dropout on the input, as PEFT places it), and CPSLinear with K clusters of
rank r (the same trainable parameters as the rank-r LoRA), all in one process. Every figure is
a ratio against the frozen base measured in the same run. Writes JSON (--json) and a PNG
(--png), and prints a markdown table last.

    python bench/bench_layer.py                      # CUDA if present, else a small CPU grid
    python bench/bench_layer.py --n 8192 --shapes 4096x4096 --ranks 64 --dropout 0.05
    python bench/bench_layer.py --grid cpu --json runs/bench/cpu.json --png runs/bench/cpu.png
    python bench/bench_layer.py --tiny               # the host's cost: N=8, 64->64, 1 thread
    python bench/bench_layer.py --ops                # which ATen ops each method dispatches there

On the CPU each row also gives the ATen ops one step dispatches (bench/op_count.py): on a GPU
each costs the host about 10-20 µs, so the count predicts where a step is bound by the host.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import soslora_ext as sl  # noqa: E402
from soslora_ext.apps.main_job import cpu_name  # noqa: E402

from baselines import PlainTorchSOS, ReferenceSOS, peft_lora  # noqa: E402
from gpu_summary import layer_targets  # noqa: E402
from op_count import count_ops  # noqa: E402
from peak_memory import peak_extra_mib  # noqa: E402

K = 4
# The tiny step: N=8, 64 -> 64, total rank 16, dropout 0.1 (one thread): almost all host work.
TINY = (8, 64, 64, 16, 0.1)
TINY_TIMING = dict(warmup=200, iters=3000, budget_s=4.0)


def machine_name(device: torch.device, threads: list[int] | None = None) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    counts = "/".join(map(str, threads or [torch.get_num_threads()]))
    return f"CPU {cpu_name()}, {os.cpu_count()} cores, {counts} threads " \
           f"(torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()})"


# Named grids. "cpu": the CPU targets' grid (all-MiniLM's 384 <-> 1536 and square shapes up to
# a 1024 <-> 4096 MLP), on one and two threads.
GRIDS = {
    "cpu": dict(n=[256, 2048, 8192],
                shapes=["384x1536", "1536x384", "384x384", "1024x1024", "1024x4096",
                        "4096x1024"],
                ranks=[16, 64], dropout=[0.0, 0.1], threads=[1, 2]),
}


def time_step(step, device, warmup: int, iters: int, budget_s: float = 2.0
              ) -> tuple[float, float]:
    """(median ms, spread) of step(): the spread is the interquartile range over the median.
    At most `iters` repeats, fewer when a step is slow (about `budget_s` seconds, at least 5)."""
    for _ in range(warmup):
        step()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
    deadline = time.perf_counter() + budget_s
    while len(times) < iters and (len(times) < 5 or time.perf_counter() < deadline):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    q1, median, q3 = statistics.quantiles(times, n=4) if len(times) > 1 else times * 3
    return median, (q3 - q1) / median


def candidates(n_in, n_out, r_tot, dropout, dtype, device, tiny: bool = False) -> dict:
    """name: (module factory, CUDA path of the soslora ops) for every method the bench times
    (`tiny`: also SOSLinear without the orthogonality term, lambda = 0)."""
    alpha = 2.0 * r_tot

    def frozen_base():
        lin = nn.Linear(n_in, n_out, bias=False, device=device, dtype=dtype)
        lin.weight.requires_grad_(False)
        return lin

    def sos(dropout_position="post", ortho_lambda=0.006):
        layer = sl.SOSLinear(frozen_base(), num_experts=K, rank=r_tot, alpha=alpha,
                             dropout=dropout, dropout_position=dropout_position, dtype=dtype)
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.01)
        layer.ortho_lambda.fill_(ortho_lambda)
        return layer

    def cps():  # the same trainable parameters as a LoRA of rank r_tot
        layer = sl.CPSLinear(frozen_base(), num_clusters=K, rank=r_tot, alpha=alpha,
                             init_partition="random", dropout=dropout, dtype=dtype)
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.01)
        return layer

    methods = {
        "frozen base": (frozen_base, None),
        "PEFT LoRA": (lambda: peft_lora(frozen_base(), r_tot, alpha, dropout), None),
        "reference SOS": (lambda: ReferenceSOS(frozen_base(), K, r_tot, alpha, dropout), None),
        "plain PyTorch": (lambda: PlainTorchSOS(frozen_base(), K, r_tot, alpha, dropout), None),
        "plain PyTorch pre-drop": (lambda: PlainTorchSOS(frozen_base(), K, r_tot, alpha, dropout,
                                                         dropout_position="pre"), None),
        "SOSLinear": (sos, "auto"),
        "SOSLinear pre-drop": (lambda: sos("pre"), "auto"),
        "CPSLinear": (cps, "auto"),
    }
    if tiny:
        methods["SOSLinear λ=0"] = (lambda: sos(ortho_lambda=0.0), "auto")
    if device.type == "cuda":  # each implementation of the ops, for the dispatch choice
        methods["SOSLinear kernels"] = (sos, "kernels")
        methods["SOSLinear pre-drop kernels"] = (lambda: sos("pre"), "kernels")
        methods["SOSLinear ATen"] = (sos, "aten")
        methods["SOSLinear pre-drop ATen"] = (lambda: sos("pre"), "aten")
    return methods


def clear_grads(module, x) -> None:
    x.grad = None
    for p in module.parameters():
        p.grad = None


def training_step(module, x, grad):
    """One forward + backward of `module` on x (gradients reset first)."""
    def step():
        clear_grads(module, x)
        module(x).backward(grad)
    return step


# Timed again with forward and backward captured as CUDA graphs (on CUDA): without the host's
# launch and Python time, what is left is each method's device cost.
GRAPHED = ["frozen base", "PEFT LoRA", "plain PyTorch", "SOSLinear"]


def graphed(module: nn.Module, x: torch.Tensor) -> nn.Module | None:
    try:
        return torch.cuda.make_graphed_callables(module, (x,))
    except Exception as error:  # a method that cannot be captured just has no graph row
        print(f"no CUDA-graph row for {type(module).__name__}: {type(error).__name__}: {error}")
        return None


def bench_config(N, n_in, n_out, r_tot, dropout, dtype, device, warmup, iters,
                 budget_s: float = 2.0, tiny: bool = False) -> list[dict]:
    x = torch.randn(N, n_in, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(N, n_out, device=device, dtype=dtype)
    methods = candidates(n_in, n_out, r_tot, dropout, dtype, device, tiny)
    runs = [(name, make, path, False) for name, (make, path) in methods.items()]
    if device.type == "cuda":
        runs += [(f"{name}, CUDA graph", methods[name][0], methods[name][1], True)
                 for name in GRAPHED]
    rows = []
    for name, make, path, capture in runs:
        module = make()
        if module is None:
            continue
        module.train()
        previous = sl.ops.set_cuda_path(path or "auto")
        if capture and (module := graphed(module, x)) is None:
            sl.ops.set_cuda_path(previous)
            continue
        step = training_step(module, x, grad)
        try:
            ms, spread = time_step(step, device, warmup, iters, budget_s)
            clear_grads(module, x)  # so that the peak counts the step's gradients
            mem = peak_extra_mib(step, device)
            ops = sum(count_ops(step).values()) if device.type == "cpu" else None
        finally:
            sl.ops.set_cuda_path(previous)
        rows.append(dict(N=N, shape=f"{n_in}x{n_out}", r_tot=r_tot, dropout=dropout,
                         threads=torch.get_num_threads(), method=name, ms=ms, spread=spread,
                         peak_extra_mib=mem, ops=ops))
        del module
    base_ms, base_mib = rows[0]["ms"], rows[0]["peak_extra_mib"]
    for row in rows:
        row["x_frozen"] = row["ms"] / base_ms
        row["mem_x_frozen"] = row["peak_extra_mib"] / base_mib if base_mib else None
    return rows


def time_pair(first, second, device, warmup: int, iters: int, budget_s: float = 2.0
              ) -> list[tuple[float, float]]:
    """time_step() for each of two steps run in turn (the second undoes the first): [(median
    ms, spread)] of each."""
    for _ in range(warmup):
        first()
        second()
    times: list[list[float]] = [[], []]
    deadline = time.perf_counter() + budget_s
    while len(times[0]) < iters and (len(times[0]) < 5 or time.perf_counter() < deadline):
        for fn, out in ((first, times[0]), (second, times[1])):
            if device.type == "cuda":
                start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                out.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                out.append((time.perf_counter() - t0) * 1e3)
    result = []
    for t in times:
        q1, median, q3 = statistics.quantiles(t, n=4) if len(t) > 1 else t * 3
        result.append((median, (q3 - q1) / median))
    return result


def bench_merge(n_in, n_out, r_tot, dtype, device, warmup, iters) -> list[dict]:
    """SOSLinear.merge() and unmerge() against one addmm_ of the folded factors into W (the
    floor) and the reference code's dense per-expert update; ms per merge and peak extra
    memory. merge() is timed as it runs after an unmerge() (the weight's max |W| known, one
    pass over it), the first merge of a weight (cold: its max read first) on its own, and
    unmerge() (its fingerprint read, then the write)."""
    layer = sl.SOSLinear(nn.Linear(n_in, n_out, bias=False, device=device, dtype=dtype),
                         num_experts=K, rank=r_tot, dtype=dtype)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.01)
    W, A, B = layer.weight, layer.lora_A, layer.lora_B
    r = r_tot // K
    scale = layer._rank_scale().detach()

    @torch.no_grad()
    def addmm(sign):
        W.addmm_(B * scale.to(B.dtype), A, alpha=sign)

    @torch.no_grad()
    def cold_merge():
        W.add_(0.0)  # an in-place write torch counts: the kept max |W| no longer holds
        sync(device)
        t0 = time.perf_counter()
        layer.merge()
        sync(device)
        ms = (time.perf_counter() - t0) * 1e3
        layer.unmerge()
        return ms

    def reference(sign):
        with torch.no_grad():
            for k in range(K):
                sl_k = slice(k * r, (k + 1) * r)
                W.add_(sign * (B[:, sl_k] * scale[sl_k].to(B.dtype)) @ A[sl_k])

    shape = f"{n_in}x{n_out}"
    timed = {
        "addmm_ into W": time_pair(lambda: addmm(1), lambda: addmm(-1), device, warmup, iters),
        "SOSLinear.merge": time_pair(layer.merge, layer.unmerge, device, warmup, iters),
        "reference dense update": time_pair(lambda: reference(1), lambda: reference(-1),
                                            device, warmup, iters),
    }
    colds = sorted(cold_merge() for _ in range(max(3, min(iters, 15))))
    rows = []
    for method, ((ms, spread), (undo_ms, undo_spread)) in timed.items():
        pair = {"addmm_ into W": lambda: (addmm(1), addmm(-1)),
                "SOSLinear.merge": lambda: (layer.merge(), layer.unmerge()),
                "reference dense update": lambda: (reference(1), reference(-1))}[method]
        rows.append(dict(shape=shape, r_tot=r_tot, method=method, ms=ms, spread=spread,
                         peak_extra_mib=peak_extra_mib(pair, device)))
        if method == "SOSLinear.merge":
            rows.append(dict(shape=shape, r_tot=r_tot, method="SOSLinear.unmerge", ms=undo_ms,
                             spread=undo_spread, peak_extra_mib=None))
            rows.append(dict(shape=shape, r_tot=r_tot, method="SOSLinear.merge (cold)",
                             ms=colds[len(colds) // 2], spread=None, peak_extra_mib=None))
    base = rows[0]["ms"]
    for row in rows:
        row["x_addmm"] = row["ms"] / base
    return rows


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_penalty(N, n_in, n_out, r_tot, dtype, device, warmup, iters) -> list[dict]:
    """The orthogonality-penalty gradient added into grad_A (what a training step pays), per
    implementation, as a share of the SOSLinear layer step at the same shape."""
    A = torch.randn(r_tot, n_in, device=device, dtype=dtype)
    grad_A = torch.zeros_like(A)
    lam = torch.tensor(0.006, device=device)
    paths = ("auto", "kernels", "aten") if device.type == "cuda" else ("auto",)
    rows = []
    for path in paths:
        previous = sl.ops.set_cuda_path(path)
        try:
            ms, _ = time_step(lambda: sl.ops.add_ortho_penalty_grad_(grad_A, A, lam, K),
                              device, warmup, iters)
        finally:
            sl.ops.set_cuda_path(previous)
        rows.append(dict(N=N, shape=f"{n_in}x{n_out}", r_tot=r_tot, method=f"penalty {path}",
                         ms=ms))
    return rows


def config_key(row: dict) -> tuple:
    return row["N"], row["shape"], row["r_tot"], row["dropout"], row.get("threads")


def markdown_table(rows: list[dict], methods: list[str]) -> str:
    """One line per configuration: median ms (× frozen base ± half the interquartile range of
    the repeats, as a share of the median; peak extra memory where measured; ATen ops per
    step on the CPU)."""
    lines = ["| N | in→out | r | drop | threads | " + " | ".join(methods) + " |",
             "|---|---|---|---|---|" + "---|" * len(methods)]
    for key in dict.fromkeys(config_key(r) for r in rows):
        cells = {r["method"]: r for r in rows if config_key(r) == key}
        text = []
        for m in methods:
            r = cells.get(m)
            if r is None:
                text.append("")
                continue
            mem = f", +{r['peak_extra_mib']:.0f} MiB" if r["peak_extra_mib"] is not None else ""
            ops = f", {r['ops']} ops" if r.get("ops") is not None else ""
            text.append(f"{r['ms']:.3f} ms ({r['x_frozen']:.2f}× ±{50 * r['spread']:.0f}%{mem}"
                        f"{ops})")
        lines.append(f"| {key[0]} | {key[1].replace('x', '→')} | {key[2]} | {key[3]} | {key[4]} | "
                     + " | ".join(text) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], methods: list[str], path: Path, title: str) -> None:
    """Small multiples: a panel per (N, threads) row and shape column; in each, the step time
    × the frozen base (y) of every method (colour) at each rank and dropout (x). The reference
    formulation (5-10× slower) is left out so the others can be read."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no plot written to {path}")
        return
    shown = [m for m in methods if m not in ("frozen base", "reference SOS")]
    panel_rows = sorted({(r["N"], r.get("threads")) for r in rows},
                        key=lambda k: (k[0], k[1] or 0))
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    settings = sorted({(r["r_tot"], r["dropout"]) for r in rows})
    cell = {(r["N"], r.get("threads"), r["shape"], r["r_tot"], r["dropout"], r["method"]):
            r["x_frozen"] for r in rows}
    fig, axes = plt.subplots(len(panel_rows), len(shapes), squeeze=False, sharey="row",
                             figsize=(2.6 * len(shapes) + 1, 2.1 * len(panel_rows) + 1.2))
    colours = plt.get_cmap("tab10")
    width = 0.8 / max(1, len(shown))
    for i, (N, threads) in enumerate(panel_rows):
        for j, shape in enumerate(shapes):
            ax = axes[i][j]
            for m, method in enumerate(shown):
                xs = [k - 0.4 + (m + 0.5) * width for k in range(len(settings))]
                ys = [cell.get((N, threads, shape, r, p, method), float("nan"))
                      for r, p in settings]
                ax.plot(xs, ys, "o", markersize=3.5, color=colours(m % 10),
                        label=method if (i, j) == (0, 0) else None)
            ax.axhline(1.0, color="black", linewidth=0.6)
            ax.set_xticks(range(len(settings)))
            ax.set_xticklabels([f"r{r}\np{p:g}" for r, p in settings], fontsize=6)
            ax.tick_params(axis="y", labelsize=6)
            ax.grid(axis="y", linewidth=0.3, alpha=0.5)
            if i == 0:
                ax.set_title(shape.replace("x", "→"), fontsize=8)
            if j == 0:
                thr = f", {threads} thr" if threads else ""
                ax.set_ylabel(f"N={N}{thr}\n× frozen", fontsize=7)
    fig.legend(loc="upper center", ncol=min(len(shown), 5), fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=8, y=0.005, va="bottom")
    fig.tight_layout(rect=(0, 0.02, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def op_breakdown() -> int:
    """Which ATen ops every method dispatches in one tiny training step (CPU, one thread)."""
    torch.set_num_threads(1)
    n, n_in, n_out, r, p = TINY
    x = torch.randn(n, n_in, requires_grad=True)
    grad = torch.randn(n, n_out)
    for name, (make, _) in candidates(n_in, n_out, r, p, torch.float32, x.device).items():
        module = make()
        if module is None:
            continue
        counts = count_ops(training_step(module.train(), x, grad))
        print(f"{name:<24} {sum(counts.values()):3d}  " + " ".join(
            f"{k.split('::')[1]}×{v}" if v > 1 else k.split("::")[1]
            for k, v in sorted(counts.items())))
    return 0


def tiny(device, dtype, args) -> int:
    """The tiny step's table: time, × frozen and ATen ops per step of every method."""
    torch.set_num_threads(1)
    N, n_in, n_out, r_tot, p = TINY
    rows = [row for drop in (0.0, p) for row in bench_config(
        N, n_in, n_out, r_tot, drop, dtype, device, tiny=True, **TINY_TIMING)]
    machine = machine_name(device, [1])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(machine=machine, dtype=str(dtype), rows=rows),
                                        indent=1))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    print(f"\nTiny step (N={N}, {n_in}→{n_out}, r={r_tot}, {dtype}) on {machine}: median "
          "ms (× frozen base ± half the interquartile range, ATen ops per step)\n")
    print("| method | " + " | ".join(f"dropout {d}" for d in (0.0, p)) + " |")
    print("|---|---|---|")
    for m in methods:
        cells = [next(r for r in rows if r["method"] == m and r["dropout"] == d)
                 for d in (0.0, p)]
        print(f"| {m} | " + " | ".join(
            f"{c['ms'] * 1e3:.0f} µs ({c['x_frozen']:.2f}× ±{50 * c['spread']:.0f}%"
            + (f", {c['ops']} ops)" if c["ops"] is not None else ")") for c in cells) + " |")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="bfloat16 (CUDA default) or float32 (CPU)")
    parser.add_argument("--n", type=int, nargs="+", default=None, help="tokens per step")
    parser.add_argument("--shapes", nargs="+", default=None, help="INxOUT, e.g. 4096x11008")
    parser.add_argument("--ranks", type=int, nargs="+", default=None, help="total ranks")
    parser.add_argument("--dropout", type=float, nargs="+", default=None,
                        help="dropout rates (default 0 and 0.05)")
    parser.add_argument("--threads", type=int, nargs="+", default=None,
                        help="CPU thread counts, each a pass over the grid (default: torch's)")
    parser.add_argument("--grid", choices=sorted(GRIDS), default=None,
                        help="a named grid of N, shapes, ranks, dropout and threads (the other "
                             "options override its entries)")
    parser.add_argument("--tiny", action="store_true",
                        help="the tiny step only (N=8, 64->64, r=16, dropout 0 and 0.1, one "
                             "thread, thousands of repeats): what a step costs the host")
    parser.add_argument("--ops", action="store_true",
                        help="print which ATen ops every method dispatches at the tiny step")
    parser.add_argument("--plot-only", type=Path, default=None, metavar="JSON",
                        help="draw --png from a JSON this script wrote, measuring nothing")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=25)
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    parser.add_argument("--png", type=Path, default=None, help="write the plot here")
    args = parser.parse_args(argv)

    if args.plot_only:
        data = json.loads(args.plot_only.read_text())
        methods = list(dict.fromkeys(r["method"] for r in data["rows"]))
        plot(data["rows"], methods, args.png or args.plot_only.with_suffix(".png"),
             f"Training step (fwd+bwd), {data['dtype']}, K={K}, on {data['machine']}")
        return 0
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if gpu else torch.float32)
    if args.ops:
        return op_breakdown()
    if args.tiny:
        return tiny(device, dtype, args)
    grid = GRIDS[args.grid] if args.grid else {}
    ns = args.n or grid.get("n") or ([2048, 8192, 32768] if gpu else [1024])
    shapes = args.shapes or grid.get("shapes") or (
        ["4096x4096", "4096x11008", "11008x4096"] if gpu else ["1024x1024"])
    ranks = args.ranks or grid.get("ranks") or ([16, 64, 128] if gpu else [16, 64])
    dropouts = args.dropout or grid.get("dropout") or [0.0, 0.05]
    threads = args.threads or grid.get("threads") or [torch.get_num_threads()]
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True

    rows = []
    for thread_count in threads:
        torch.set_num_threads(thread_count)
        for N in ns:
            for shape in shapes:
                n_in, n_out = (int(v) for v in shape.lower().split("x"))
                for r_tot in ranks:
                    for p in dropouts:
                        rows += bench_config(N, n_in, n_out, r_tot, p, dtype, device,
                                             args.warmup, args.iters)
                        print(f"done N={N} {shape} r={r_tot} p={p} threads={thread_count}",
                              flush=True)
    torch.set_num_threads(max(threads))  # merge and penalty on the most threads
    merge_shapes = [(4096, 4096, 64), (4096, 11008, 128)] if gpu else [(1024, 1024, 64),
                                                                     (4096, 4096, 64)]
    merges = [row for n_in, n_out, r in merge_shapes
              for row in bench_merge(n_in, n_out, r, dtype, device, args.warmup, args.iters)]
    N_pen, shape_pen, r_pen = (8192, "4096x4096", 64) if gpu else (ns[0], shapes[0], ranks[0])
    n_in, n_out = (int(v) for v in shape_pen.split("x"))
    penalties = bench_penalty(N_pen, n_in, n_out, r_pen, dtype, device, args.warmup, args.iters)
    step = next((r for r in rows if r["method"] == "SOSLinear" and r["N"] == N_pen and
                 r["shape"] == shape_pen and r["r_tot"] == r_pen), None)
    for row in penalties:
        row["share_of_layer_step"] = row["ms"] / step["ms"] if step else None

    choices = sl.ops.cuda_choices()  # what "auto" measured for each shape class it met
    machine = machine_name(device, threads)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    title = f"Training step (fwd+bwd), {dtype}, K={K}, on {machine}"
    targets = layer_targets(dict(rows=rows, merge=merges))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(machine=machine, dtype=str(dtype), rows=rows,
                                             merge=merges, penalty=penalties, targets=targets,
                                             auto_choices=choices),
                                        indent=1))
    if args.png:
        plot(rows, methods, args.png, title)

    print("\nIn-place merge (per merge or unmerge, x one addmm_; peak extra memory of a merge "
          "and unmerge):")
    for r in merges:
        print(f"  {r['shape']:>10} r={r['r_tot']:<4} {r['method']:<24} {r['ms']:8.4f} ms "
              f"{r['x_addmm']:5.2f}x"
              + (f"  +{r['peak_extra_mib']:.1f} MiB" if r["peak_extra_mib"] is not None else ""))
    print(f"Orthogonality-penalty gradient at N={N_pen} {shape_pen} r={r_pen}:")
    for r in penalties:
        share = f"  ({100 * r['share_of_layer_step']:.1f}% of the SOSLinear step)" \
            if r["share_of_layer_step"] is not None else ""
        print(f"  {r['method']:<18} {r['ms']:8.4f} ms{share}")
    if choices:
        print("What 'auto' chose, per shape class (op device dtype N-class x sizes):")
        for key, (path, kernel_ms, aten_ms) in sorted(choices.items()):
            print(f"  {key:<52} {path:<8} kernel {kernel_ms:8.4f} ms  ATen {aten_ms:8.4f} ms")
    print("Targets (met / missed, worst ratio):")
    for t in targets:
        state = {True: "met", False: "MISSED", None: "no data"}[t["met"]]
        print(f"  {t['target']:<45} {state:<8} worst {t['worst']} over {t['rows']} rows")
    print(f"\n{title}: median ms (× frozen base ± half the interquartile range of the repeats, "
          "peak extra memory)\n")
    print(markdown_table(rows, methods))
    return 0


if __name__ == "__main__":
    sys.exit(main())
