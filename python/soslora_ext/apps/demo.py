"""End-to-end SOS-LoRA run on CPU: adapt a frozen MLP to a shifted task, merge, verify.

The frozen "pretrained" network is a 3-layer MLP with random weights. The task is the same
network with a rank-6 change to its hidden layers' weights, so a rank-8 adapter can learn it
exactly. We train SOS-LoRA (K=4 experts, channel scales, gate, orthogonality schedule) on
(x, teacher(x)) pairs, then merge the adapters and check the merged model gives the same outputs.
It runs on one CPU thread and takes about a second (plus a few seconds to import torch).
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn as nn

from ..layers.model import apply_sos_lora, merge_and_unload, sos_layers, trainable_parameters
from ..layers.schedules import GateSchedule, OrthoSchedule
from ..layers.structure import one_thread  # its products are 64 wide


def mlp(width: int, depth: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.GELU()]
    return nn.Sequential(*layers, nn.Linear(width, width))


def run(steps: int = 600, width: int = 64, batch: int = 128, seed: int = 0,
        log_every: int = 60, out=sys.stdout) -> dict:
    with one_thread():
        return _run(steps, width, batch, seed, log_every, out)


def _run(steps: int, width: int, batch: int, seed: int, log_every: int, out) -> dict:
    torch.manual_seed(seed)
    student = mlp(width, depth=2)
    teacher = mlp(width, depth=2)
    teacher.load_state_dict(student.state_dict())
    with torch.no_grad():
        for i in (0, 2):  # the task: a low-rank change of the hidden layers
            w = teacher[i].weight
            w += 0.5 * torch.randn(width, 6) @ torch.randn(6, width) / width**0.5

    apply_sos_lora(student, target_modules=["0", "2"], num_experts=4, rank=8, alpha=16.0,
                   scale_mode="channel", gate=True, dropout=0.0)
    trainable, total = trainable_parameters(student)
    print(f"SOS-LoRA on layers {[n for n, _ in sos_layers(student)]}: "
          f"{trainable} trainable of {total} parameters", file=out)
    ortho = OrthoSchedule(student, lambda_max=0.006, total_steps=steps)
    gate = GateSchedule(student, total_steps=steps)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=3e-3)
    x_eval = torch.randn(1024, width)
    with torch.no_grad():
        y_eval = teacher(x_eval)
        start_loss = nn.functional.mse_loss(student(x_eval), y_eval).item()

    print(f"{'step':>6} {'train loss':>11} {'lambda':>8} {'gate T':>7}", file=out)
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        x = torch.randn(batch, width)
        with torch.no_grad():
            target = teacher(x)
        loss = nn.functional.mse_loss(student(x), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lam, temp = ortho.step(), gate.step()
        if step % log_every == 0 or step == 1:
            print(f"{step:>6} {loss.item():>11.5f} {lam:>8.4f} {temp:>7.3f}", file=out)
    seconds = time.perf_counter() - t0

    student.eval()
    with torch.no_grad():
        end_loss = nn.functional.mse_loss(student(x_eval), y_eval).item()
        unmerged = student(x_eval)
        merge_and_unload(student)
        merged = student(x_eval)
    merge_gap = (merged - unmerged).abs().max().item()
    result = dict(eval_loss_start=start_loss, eval_loss_end=end_loss, seconds=seconds,
                  merged_minus_unmerged_max_abs=merge_gap,
                  plain_model_after_merge=all(isinstance(m, nn.Linear) for m in student[::2]))
    print(f"\neval loss {start_loss:.5f} -> {end_loss:.5f} in {steps} steps ({seconds:.1f} s)",
          file=out)
    print(f"merged vs unmerged outputs: max |diff| = {merge_gap:.2e}", file=out)
    ok = end_loss < 0.1 * start_loss and merge_gap < 1e-4 and result["plain_model_after_merge"]
    print("OK" if ok else "FAILED: the loss did not fall tenfold or the merge changed outputs",
          file=out)
    result["ok"] = ok
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m soslora_ext demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps (default 600)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args(argv)
    if args.steps <= 0:
        parser.error("--steps must be positive")
    return 0 if run(steps=args.steps, seed=args.seed)["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
