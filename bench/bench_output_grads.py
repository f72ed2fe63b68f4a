"""The backward's products over the output gradient g [N, out]: grad_hidden = g (B s) and
grad_B = (gᵀ h) s, from one read of g (the hand-written pass, csrc/cuda/fused_kernels.cu)
against the two cuBLAS products ATen runs, on the same inputs in one process.

Rows per shape: the two products alone (`torch.mm` twice: the floor of the composition), and
the op `lowrank_grad_hidden` (which also forms grad_B and grad_scale from the sum) on each CUDA
path: ATen, the kernel, the kernel under torch.use_deterministic_algorithms. Each is timed
replayed from a CUDA graph (the device's time, without the host's launches) and eagerly; every
figure is a ratio against the two products measured in the same run. The kernel rows also give
their largest relative error against the ATen path. Only `out` enters these products: the
layer's input width does not. Writes JSON (--json) and prints a markdown table last.

    python bench/bench_output_grads.py                   # CUDA: N=8192, out 4096 and 11008, r=64
    python bench/bench_output_grads.py --device cpu --n 64 --outs 40 --ranks 8   # the dry run
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import soslora_ext as sl  # noqa: E402

from bench_layer import machine_name, time_step  # noqa: E402

_ops = torch.ops.soslora


def graph_replay(fn, device):
    """fn captured as a CUDA graph, returned as its replay (None off CUDA or when capture
    fails: such a row keeps only its eager time)."""
    if device.type != "cuda":
        return None
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):  # warm-up outside the capture, as torch.cuda.graphs asks
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph.replay
    except RuntimeError as error:
        print(f"no CUDA-graph time: {error}")
        return None


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm()) if b.norm() > 0 else float((a - b).norm())


def bench_shape(N, out, r, dropout, dtype, device, warmup, iters) -> list[dict]:
    g = dict(device=device, dtype=dtype)
    grad_out, hidden = torch.randn(N, out, **g), torch.randn(N, r, **g)
    B, scale = torch.randn(out, r, **g) / r**0.5, torch.rand(r, device=device) + 0.5
    Bs = (B.float() * scale).to(dtype)
    seed = sl.ops.new_dropout_seed(device) if dropout else None

    def two_products():
        return grad_out.mm(Bs), grad_out.t().mm(hidden)

    def op():
        return _ops.lowrank_grad_hidden(grad_out, B, scale, hidden, seed, dropout, False)

    runs = [("two products: g·Bs, gᵀ·h", two_products, "auto", False),
            ("lowrank_grad_hidden ATen", op, "aten", False)]
    if device.type == "cuda":
        runs += [("lowrank_grad_hidden kernel", op, "kernels", False),
                 ("lowrank_grad_hidden kernel, deterministic", op, "kernels", True)]
    rows, reference = [], None
    for name, fn, path, deterministic in runs:
        previous = sl.ops.set_cuda_path(path)
        torch.use_deterministic_algorithms(deterministic)
        try:
            result = fn()
            eager_ms, spread = time_step(fn, device, warmup, iters)
            replay = graph_replay(fn, device)
            graph_ms = time_step(replay, device, warmup, iters)[0] if replay else None
        finally:
            torch.use_deterministic_algorithms(False)
            sl.ops.set_cuda_path(previous)
        if path == "aten" and fn is op:
            reference = result
        err = (max(rel_err(a, b) for a, b in zip(result, reference))
               if fn is op and reference is not None and path != "aten" else None)
        rows.append(dict(N=N, out=out, r_tot=r, dropout=dropout, method=name, ms=eager_ms,
                         spread=spread, graph_ms=graph_ms, max_rel_err_vs_aten=err))
    base = rows[0]
    for row in rows:
        row["x_cublas"] = row["ms"] / base["ms"]
        row["graph_x_cublas"] = (row["graph_ms"] / base["graph_ms"]
                                 if row["graph_ms"] and base["graph_ms"] else None)
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = ["| N | out | r | drop | method | graph ms (× cuBLAS) | eager ms (× cuBLAS) | "
             "rel. err vs ATen |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        graph = (f"{r['graph_ms']:.4f} ({r['graph_x_cublas']:.2f}×)"
                 if r["graph_ms"] is not None else "")
        err = f"{r['max_rel_err_vs_aten']:.1e}" if r["max_rel_err_vs_aten"] is not None else ""
        lines.append(f"| {r['N']} | {r['out']} | {r['r_tot']} | {r['dropout']} | {r['method']} | "
                     f"{graph} | {r['ms']:.4f} ({r['x_cublas']:.2f}×) | {err} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="bfloat16 (CUDA default) or float32 (CPU)")
    parser.add_argument("--n", type=int, nargs="+", default=[8192], help="tokens per step")
    parser.add_argument("--outs", type=int, nargs="+", default=[4096, 11008],
                        help="output widths (4096x4096 and 11008->4096 layers: 4096; "
                             "4096->11008: 11008)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[64])
    parser.add_argument("--dropout", type=float, nargs="+", default=[0.0])
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (
        torch.bfloat16 if device.type == "cuda" else torch.float32)
    if device.type == "cuda" and not sl.built_with_cuda:
        print("soslora_ext was built without CUDA: the kernel rows time the ATen path")
    rows = [row for N in args.n for out in args.outs for r in args.ranks for p in args.dropout
            for row in bench_shape(N, out, r, p, dtype, device, args.warmup, args.iters)]
    machine = machine_name(device)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(machine=machine, dtype=str(dtype), rows=rows),
                                        indent=1))
    print(f"\nProducts over the output gradient, {dtype}, on {machine}: median ms (× the two "
          "cuBLAS products in the same run)\n")
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
