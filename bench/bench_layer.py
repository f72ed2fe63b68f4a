"""Training-step cost of one adapted linear layer: SOSLinear and CPSLinear against what users
run instead.

Times forward + backward (base frozen, input requiring grad, as inside a network) for the
frozen base nn.Linear, PEFT's LoRA at the same total rank (when peft is installed), the
reference SOS-LoRA formulation, the best plain-PyTorch form, SOSLinear, and CPSLinear with
K clusters of rank r (the same trainable parameters as the rank-r LoRA), all in one process.
Every figure is a ratio against the frozen base measured in the same run. Prints a table last
and writes JSON (--json).

    python bench/bench_layer.py                      # CUDA if present, else a small CPU grid
    python bench/bench_layer.py --n 8192 --shapes 4096x4096 --ranks 64 --dropout 0.05
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import soslora_ext as sl  # noqa: E402
from baselines import PlainTorchSOS, ReferenceSOS, peft_lora  # noqa: E402

K = 4


def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads " \
           f"(torch {torch.__version__})"


def time_step(step, device, warmup: int, iters: int) -> float:
    """Median milliseconds of step()."""
    for _ in range(warmup):
        step()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_extra_mib(step, device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def bench_config(N, n_in, n_out, r_tot, dropout, dtype, device, warmup, iters) -> list[dict]:
    alpha = 2.0 * r_tot
    x = torch.randn(N, n_in, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(N, n_out, device=device, dtype=dtype)

    def frozen_base():
        lin = nn.Linear(n_in, n_out, bias=False, device=device, dtype=dtype)
        lin.weight.requires_grad_(False)
        return lin

    def sos():
        layer = sl.SOSLinear(frozen_base(), num_experts=K, rank=r_tot, alpha=alpha,
                             dropout=dropout, dtype=dtype)
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.01)
        layer.ortho_lambda.fill_(0.006)
        return layer

    def cps():  # the same trainable parameters as a LoRA of rank r_tot
        layer = sl.CPSLinear(frozen_base(), num_clusters=K, rank=r_tot, alpha=alpha,
                             init_partition="random", dropout=dropout, dtype=dtype)
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.01)
        return layer

    candidates = {
        "frozen base": frozen_base,
        "PEFT LoRA": lambda: peft_lora(frozen_base(), r_tot, alpha, dropout),
        "reference SOS": lambda: ReferenceSOS(frozen_base(), K, r_tot, alpha, dropout),
        "plain PyTorch": lambda: PlainTorchSOS(frozen_base(), K, r_tot, alpha, dropout),
        "SOSLinear": sos,
        "CPSLinear": cps,
    }
    rows = []
    for name, make in candidates.items():
        module = make()
        if module is None:
            continue
        module.train()

        def step(module=module):
            x.grad = None
            for p in module.parameters():
                p.grad = None
            module(x).backward(grad)

        ms = time_step(step, device, warmup, iters)
        rows.append(dict(N=N, shape=f"{n_in}x{n_out}", r_tot=r_tot, dropout=dropout,
                         method=name, ms=ms, peak_extra_mib=peak_extra_mib(step, device)))
        del module
    base_ms = rows[0]["ms"]
    for row in rows:
        row["x_frozen"] = row["ms"] / base_ms
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="bfloat16 (CUDA default) or float32 (CPU)")
    parser.add_argument("--n", type=int, nargs="+", default=None, help="tokens per step")
    parser.add_argument("--shapes", nargs="+", default=None, help="INxOUT, e.g. 4096x11008")
    parser.add_argument("--ranks", type=int, nargs="+", default=None, help="total ranks")
    parser.add_argument("--dropout", type=float, nargs="+", default=[0.0, 0.05])
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=25)
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if gpu else torch.float32)
    ns = args.n or ([2048, 8192] if gpu else [1024])
    shapes = args.shapes or (["4096x4096", "4096x11008", "11008x4096"] if gpu else ["1024x1024"])
    ranks = args.ranks or ([16, 64, 128] if gpu else [16, 64])
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True

    rows = []
    for N in ns:
        for shape in shapes:
            n_in, n_out = (int(v) for v in shape.lower().split("x"))
            for r_tot in ranks:
                for p in args.dropout:
                    rows += bench_config(N, n_in, n_out, r_tot, p, dtype, device, args.warmup,
                                         args.iters)
    machine = machine_name(device)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(machine=machine, dtype=str(dtype), rows=rows),
                                        indent=1))

    methods = list(dict.fromkeys(r["method"] for r in rows))
    print(f"\nTraining step (fwd+bwd), {dtype}, K={K}, median ms and x frozen base, on {machine}")
    header = f"{'N':>6} {'in->out':>11} {'r':>4} {'drop':>5} | " + " | ".join(
        f"{m:>18}" for m in methods)
    print(header)
    print("-" * len(header))
    for key in dict.fromkeys((r["N"], r["shape"], r["r_tot"], r["dropout"]) for r in rows):
        cells = {r["method"]: r for r in rows if (r["N"], r["shape"], r["r_tot"], r["dropout"]) == key}
        text = []
        for m in methods:
            r = cells.get(m)
            mem = f" +{r['peak_extra_mib']:.0f}M" if r and r["peak_extra_mib"] is not None else ""
            text.append(f"{r['ms']:7.3f} {r['x_frozen']:4.2f}x{mem}".rjust(18) if r else " " * 18)
        print(f"{key[0]:>6} {key[1].replace('x', '->'):>11} {key[2]:>4} {key[3]:>5} | "
              + " | ".join(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
