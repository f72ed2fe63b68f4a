"""Interference of two adapters: factored cosines against building the dense deltas.

Adapters shaped like rank-16 LoRAs on all 7 projections of a 32-layer, 4096-wide Llama-style
model (224 layers, intermediate 11008), tensors already in memory, float32. Times one pair's
per-layer cosines computed by soslora_ext.compose (factored: r x r products only) and by
materialising each [out, in] delta; checks that both agree. Prints a table and writes JSON.

    python bench/bench_compose.py [--layers 32] [--rank 16] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from soslora_ext import compose

PROJECTIONS = {  # name: (out, in)
    "q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096),
    "o_proj": (4096, 4096), "gate_proj": (11008, 4096), "up_proj": (11008, 4096),
    "down_proj": (4096, 11008),
}


def random_adapter(name: str, blocks: int, rank: int, seed: int) -> compose.Adapter:
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for i in range(blocks):
        for proj, (n_out, n_in) in PROJECTIONS.items():
            A = torch.randn(rank, n_in, generator=g) / n_in**0.5
            B = torch.randn(n_out, rank, generator=g) / rank**0.5
            layers[f"model.layers.{i}.{proj}"] = [compose.LowRankTerm(A, B, 4.0)]
    return compose.Adapter(layers, name=name)


def dense_cosines(a: compose.Adapter, b: compose.Adapter) -> dict[str, float]:
    out = {}
    for layer in sorted(a.keys() & b.keys()):
        x, y = a.delta(layer, torch.float32), b.delta(layer, torch.float32)
        out[layer] = float((x * y).sum() / (x.norm() * y.norm()))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=32, help="transformer blocks (default 32)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="factored timing repeats")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    a = random_adapter("a", args.layers, args.rank, 1)
    b = random_adapter("b", args.layers, args.rank, 2)
    factored_times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        factored = compose.cosine(a, b)
        factored_times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    dense = dense_cosines(a, b)
    dense_s = time.perf_counter() - t0
    max_diff = max(abs(factored[k] - dense[k]) for k in dense)
    factored_s = sorted(factored_times)[len(factored_times) // 2]
    machine = (f"CPU {platform.machine()}, {torch.get_num_threads()} threads, "
               f"torch {torch.__version__}")
    result = dict(machine=machine, layers=len(dense), rank=args.rank, factored_s=factored_s,
                  dense_s=dense_s, speedup=dense_s / factored_s,
                  max_abs_cosine_difference=max_diff, rms_cosine=compose.rms_cosine(a, b))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nOne pair's per-layer cosines, {len(dense)} layers (rank {args.rank}, 4096/11008), "
          f"on {machine}")
    print(f"{'method':<34} {'seconds':>9} {'x factored':>11}")
    print(f"{'factored (soslora_ext.compose)':<34} {factored_s:>9.3f} {1.0:>11.1f}")
    print(f"{'dense deltas, then cosine':<34} {dense_s:>9.3f} {dense_s / factored_s:>11.1f}")
    print(f"max |cosine difference| = {max_diff:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
