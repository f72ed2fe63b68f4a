"""Each product of a LoRA step on the tile engine (the hand-written kernels, set_cuda_path
"kernels") against the cuBLAS/ATen composition of the same op ("aten"), and CPS-LoRA's cluster
op both ways, in one process on one device. Every figure is the kernels' time as a ratio of the
ATen path's for the same op call, measured in the same run.

    python bench/bench_products.py                     # CUDA: 4096x4096, 4096<->11008, N=8192
    python bench/bench_products.py --device cpu --n 64 --shapes 48x40 --r 8   # the logic only

The products (x [N, in], A [r, in], B [out, r], h [N, r], g [N, out], dropout p on the input):
  h = D(x) Aᵀ          lowrank_forward with a one-row B (its output product is negligible)
  out += h (B⊙s)ᵀ      lowrank_grad_x(h, (B⊙s)ᵀ, base)       (both paths copy the base first)
  grad_h = g (B⊙s)     lowrank_grad_x(g, B⊙s, zeros [N, r])
  grad_B = gᵀ h        lowrank_grad_A(g, h)                   (split over N, float atomics)
  grad_A = grad_hᵀ D(x)  lowrank_grad_A(grad_h, x, p)
  grad_x += D(grad_h A)  lowrank_grad_x(grad_h, A, base, p)
  cluster fwd / bwd    cluster_lowrank_forward / _backward, G clusters of rank r / G
On the CPU both paths are ATen (no kernels there): the figures only show that the script runs.
Prints a markdown table last; --json writes the rows.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import soslora_ext as sl
from soslora_ext.layers.partition import labels_to_index

_ops = torch.ops.soslora


def timed(fn, device: torch.device, warmup: int, iters: int) -> float:
    """Median milliseconds of fn() (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def products(n: int, n_in: int, n_out: int, r: int, clusters: int, p: float,
             device: torch.device, dtype: torch.dtype) -> dict:
    """{name: a call running that product's op once}."""
    g = dict(device=device, dtype=dtype)
    x, B = torch.randn(n, n_in, **g), torch.randn(n_out, r, **g)
    A = torch.randn(r, n_in, **g) / n_in**0.5
    scale = torch.full((r,), 0.5, **g)
    Bs = B * scale
    h, gh = torch.randn(n, r, **g), torch.randn(n, r, **g)
    grad_out, base_out = torch.randn(n, n_out, **g), torch.randn(n, n_out, **g)
    base_in = torch.randn(n, n_in, **g)
    seed = torch.tensor([1234, 5], device=device) if p else None
    B1, s1, zeros_r = torch.randn(1, r, **g), torch.ones(r, **g), torch.zeros(n, r, **g)
    rows, row_offsets = labels_to_index(torch.arange(n_out) % clusters, clusters)
    cols, col_offsets = labels_to_index(torch.randperm(n_in) % clusters, clusters)
    rows, cols, ranks = rows.to(device), cols.to(device), [r // clusters] * clusters
    cscale = torch.full((clusters,), 0.5, device=device)
    layout = (cscale, rows, cols, row_offsets, col_offsets, ranks)
    _, hidden = _ops.cluster_lowrank_forward(x, A, B, *layout, None, seed, p)
    return {
        "h = D(x) Aᵀ": lambda: _ops.lowrank_forward(x, A, B1, s1, None, seed, p, True),
        "out += h (B⊙s)ᵀ": lambda: _ops.lowrank_grad_x(h, Bs.t(), base_out, None, 0.0, True),
        "grad_h = g (B⊙s)": lambda: _ops.lowrank_grad_x(grad_out, Bs, zeros_r, None, 0.0, True),
        "grad_B = gᵀ h": lambda: _ops.lowrank_grad_A(grad_out, h, None, 0.0, True),
        "grad_A = grad_hᵀ D(x)": lambda: _ops.lowrank_grad_A(gh, x, seed, p, True),
        "grad_x += D(grad_h A)": lambda: _ops.lowrank_grad_x(gh, A, base_in, seed, p, True),
        f"cluster fwd, G={clusters}": lambda: _ops.cluster_lowrank_forward(
            x, A, B, *layout, base_out, seed, p),
        f"cluster bwd, G={clusters}": lambda: _ops.cluster_lowrank_backward(
            grad_out, x, A, B, cscale, hidden, None, rows, cols, row_offsets, col_offsets, ranks,
            base_in, seed, p),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--shapes", nargs="+", default=["4096x4096", "4096x11008", "11008x4096"],
                    help="in x out of each layer")
    ap.add_argument("--r", type=int, default=64)
    ap.add_argument("--clusters", type=int, default=4)
    ap.add_argument("--dropout", type=float, nargs="+", default=[0.0, 0.05])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--json")
    args = ap.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        machine = f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    else:
        machine = f"CPU, {torch.get_num_threads()} threads (torch {torch.__version__})"
    rows = []
    for shape in args.shapes:
        n_in, n_out = map(int, shape.split("x"))
        for p in args.dropout:
            torch.manual_seed(0)
            calls = products(args.n, n_in, n_out, args.r, args.clusters, p, device, dtype)
            for name, call in calls.items():
                ms = {}
                for path in ("kernels", "aten"):
                    previous = sl.ops.set_cuda_path(path)
                    try:
                        ms[path] = timed(call, device, args.warmup, args.iters)
                    finally:
                        sl.ops.set_cuda_path(previous)
                rows.append(dict(shape=shape, N=args.n, r=args.r, dropout=p, product=name,
                                 kernels_ms=round(ms["kernels"], 4), aten_ms=round(ms["aten"], 4),
                                 ratio=round(ms["kernels"] / ms["aten"], 3)))
                print(f"done {shape} p={p} {name}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(machine=machine, dtype=args.dtype, rows=rows), f, indent=1)
    print(f"\n{machine}, {args.dtype}, N={args.n}, r={args.r}: kernels / ATen (cuBLAS) per op\n")
    print("| in x out | p | product | kernels ms | ATen ms | kernels / ATen |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['shape']} | {row['dropout']} | {row['product']} | {row['kernels_ms']:.3f} "
              f"| {row['aten_ms']:.3f} | {row['ratio']:.2f}× |")


if __name__ == "__main__":
    main()
