"""Where a layer's training step spends its time: torch.profiler over a few steps of each
method of bench_layer.py at one configuration, printing the device kernels by total time and the
device time per step against the wall time per step (a step whose device time is well under
its wall time is bound by the host: launches and Python, not kernels).

    python bench/profile_layer.py --n 8192 --shape 4096x4096 --rank 64 --dropout 0.05 \\
        --methods "PEFT LoRA" "plain PyTorch" SOSLinear "SOSLinear pre-drop"
    python bench/profile_layer.py --merge        # also SOSLinear.merge() + unmerge()
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import soslora_ext as sl  # noqa: E402

from bench_layer import K, candidates, machine_name, training_step  # noqa: E402


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def profile_steps(step, device, steps: int, top: int) -> str:
    for _ in range(3):
        step()
    synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        synchronize(device)
    wall_ms = (time.perf_counter() - t0) * 1e3 / steps
    events = prof.key_averages()
    if device.type == "cuda":
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        total_key = "device_time_total"
    else:
        kernels = [e for e in events if e.key.startswith("aten::") or e.key.startswith("soslora")]
        total_key = "self_cpu_time_total"
    kernels.sort(key=lambda e: getattr(e, total_key), reverse=True)
    busy_ms = sum(getattr(e, total_key) for e in kernels) / 1e3 / steps
    busy = "device" if device.type == "cuda" else "op"
    lines = [f"  wall {wall_ms:.3f} ms/step (profiled), {busy} time {busy_ms:.3f} ms/step"]
    for e in kernels[:top]:
        lines.append(f"  {getattr(e, total_key) / 1e3 / steps:8.4f} ms  x{e.count // steps:<3} "
                     f"{e.key[:110]}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="bfloat16 (CUDA default) or float32 (CPU)")
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--shape", default="4096x4096")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--methods", nargs="+", default=None, help="names as in bench_layer.py")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--merge", action="store_true", help="also profile merge + unmerge")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (
        torch.bfloat16 if device.type == "cuda" else torch.float32)
    n_in, n_out = (int(v) for v in args.shape.lower().split("x"))
    methods = candidates(n_in, n_out, args.rank, args.dropout, dtype, device)
    unknown = set(args.methods or ()) - set(methods)
    if unknown:
        parser.error(f"--methods: unknown {sorted(unknown)}; known: {list(methods)}")
    print(f"Profile on {machine_name(device)}: N={args.n} {args.shape} r={args.rank} K={K} "
          f"p={args.dropout} {dtype}")
    x = torch.randn(args.n, n_in, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(args.n, n_out, device=device, dtype=dtype)
    for name in args.methods or methods:
        make, path = methods[name]
        module = make()
        if module is None:
            continue
        previous = sl.ops.set_cuda_path(path or "auto")
        try:
            print(f"\n{name}:\n" + profile_steps(training_step(module.train(), x, grad), device,
                                                 args.steps, args.top))
        finally:
            sl.ops.set_cuda_path(previous)
    if args.merge:
        layer = sl.SOSLinear(nn.Linear(n_in, n_out, bias=False, device=device, dtype=dtype),
                             num_experts=K, rank=args.rank, dtype=dtype)

        @torch.no_grad()
        def merge_unmerge():
            layer.merge()
            layer.unmerge()

        print("\nSOSLinear.merge() + unmerge():\n"
              + profile_steps(merge_unmerge, device, args.steps, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
