"""CPS-LoRA on a planted block-structured update: recovery of the partition and of the update,
against a global LoRA with the same number of trainable parameters.

The target dW* has G blocks, each of rank r on its own rows and columns, with rows and columns
shuffled. Both adapters are fitted by Adam to y = x dW*^T on fresh Gaussian inputs. A LoRA of
rank r has r (in + out) parameters, exactly those of CPS-LoRA with rank r per cluster, but it
can hold only r of the G r directions. Prints a markdown table; --json writes the numbers.

    python bench/bench_cps.py [--seeds 3] [--json results.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import torch.nn as nn

import soslora_ext as sl
from soslora_ext.layers.partition import adjusted_rand_index


def planted_target(out_features, in_features, clusters, rank, generator):
    """(dW* [out, in], row labels, column labels): G shuffled blocks of rank `rank`."""
    rows = torch.randperm(out_features, generator=generator) % clusters
    cols = torch.randperm(in_features, generator=generator) % clusters
    target = torch.zeros(out_features, in_features)
    for c in range(clusters):
        r_idx, c_idx = (rows == c).nonzero().flatten(), (cols == c).nonzero().flatten()
        block = torch.randn(len(r_idx), rank, generator=generator) @ \
            torch.randn(rank, len(c_idx), generator=generator) / rank ** 0.5
        target[r_idx[:, None], c_idx[None, :]] = block
    return target, rows, cols


class GlobalLoRA(nn.Module):
    """Plain LoRA, B A x * alpha / r (PEFT's init: A uniform, B zero)."""

    def __init__(self, in_features, out_features, rank, alpha):
        super().__init__()
        self.A = nn.Parameter((torch.rand(rank, in_features) * 2 - 1) / in_features ** 0.5)
        self.B = nn.Parameter(torch.zeros(out_features, rank))
        self.scale = alpha / rank

    def forward(self, x):
        return (x @ self.A.T) @ self.B.T * self.scale

    def delta_weight(self):
        return self.B.detach() @ self.A.detach() * self.scale


def fit(model, target, steps, batch, lr, generator, schedule=None):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    sched = schedule(model, opt) if schedule else None
    changes = []
    for _ in range(steps):
        x = torch.randn(batch, target.shape[1], generator=generator)
        loss = (model(x) - x @ target.T).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sched is not None:
            changes += list(sched.step().values())
    return changes


def recovery(seed=0, out_features=64, in_features=48, clusters=4, rank=2, steps=300,
             batch=512, lr=5e-3, repartition_every=100, statistics_steps=20) -> dict:
    """Fit CPS-LoRA and global LoRA to one planted target; relative errors, ARIs, parameters."""
    g = torch.Generator().manual_seed(seed)
    target, rows, cols = planted_target(out_features, in_features, clusters, rank, g)
    torch.manual_seed(seed)
    base = nn.Linear(in_features, out_features, bias=False)
    nn.init.zeros_(base.weight)
    cps = sl.CPSLinear(base, num_clusters=clusters, rank=rank, alpha=2.0 * rank,
                       repartition_every=repartition_every, statistics_steps=statistics_steps)
    start = time.perf_counter()
    changes = fit(cps, target, steps, batch, lr, torch.Generator().manual_seed(seed + 1),
                  schedule=sl.RepartitionSchedule)
    cps_time = time.perf_counter() - start
    lora = GlobalLoRA(in_features, out_features, rank, alpha=2.0 * rank)
    fit(lora, target, steps, batch, lr, torch.Generator().manual_seed(seed + 1))

    def error(delta):
        return float((delta - target).norm() / target.norm())
    found_rows, found_cols = cps.partition()
    return dict(
        seed=seed, cps_rel_error=error(cps.delta_weight()),
        lora_rel_error=error(lora.delta_weight()),
        row_ari=adjusted_rand_index(found_rows, rows),
        col_ari=adjusted_rand_index(found_cols, cols),
        cps_params=sum(p.numel() for p in (cps.lora_A, cps.lora_B)),
        lora_params=sum(p.numel() for p in lora.parameters()),
        repartition_changes=changes, cps_seconds=cps_time)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    results = [recovery(seed) for seed in range(args.seeds)]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(machine=platform.processor() or platform.machine(),
                           torch=torch.__version__, results=results), f, indent=2)
    print(f"planted 4 blocks of rank 2, 48 -> 64, rank 2 per cluster vs LoRA rank 2 "
          f"({results[0]['cps_params']} vs {results[0]['lora_params']} parameters), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| seed | CPS rel. error | LoRA rel. error | row ARI | column ARI | "
          "changes at repartitions |")
    print("|---|---|---|---|---|---|")
    for r in results:
        changes = ", ".join(f"{c:.2f}" for c in r["repartition_changes"])
        print(f"| {r['seed']} | {r['cps_rel_error']:.4f} | {r['lora_rel_error']:.4f} | "
              f"{r['row_ari']:.3f} | {r['col_ari']:.3f} | {changes} |")


if __name__ == "__main__":
    main()
