"""Model-level training throughput: a Llama-architecture model built from a `transformers`
config (no weights downloaded), adapters on all 7 projections of every layer.

Times a full training step (loss, backward; base frozen) for the frozen base (backward through
the network, no adapters), PEFT's LoRA, the reference SOS formulation, the best plain-PyTorch
form and SOSLinear, all in one process; tokens/s and peak memory, each as a ratio to the frozen
base measured in the same run. Prints a markdown table last; --json writes the rows.

    python bench/bench_model.py                 # CUDA: 4 layers, hidden 4096, batch 4 x 1024
    python bench/bench_model.py --tiny          # a seconds-long check of the script itself
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

from baselines import PlainTorchSOS, ReferenceSOS  # noqa: E402
from bench_layer import machine_name, time_step  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
K = 4


class Flatten2d(nn.Module):
    """Runs a [N, in] -> [N, out] module on [..., in] inputs (the baselines take 2-D inputs)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)


def build(size: dict, device, dtype) -> nn.Module:
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=size["vocab"], hidden_size=size["hidden"], intermediate_size=size["inter"],
        num_hidden_layers=size["layers"], num_attention_heads=size["heads"],
        num_key_value_heads=size["heads"], max_position_embeddings=2048)
    config._attn_implementation = "sdpa"
    model = transformers.LlamaForCausalLM(config).to(device, dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    model.enable_input_require_grads()  # backward runs through the whole network
    return model


def replace_targets(model: nn.Module, make) -> nn.Module:
    for name, module in list(model.named_modules()):
        if name.rsplit(".", 1)[-1] in TARGETS and isinstance(module, nn.Linear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, make(module))
    return model


def variants(size, device, dtype, r_tot, dropout):
    alpha = 2.0 * r_tot

    def frozen():
        return build(size, device, dtype)

    def peft_model():
        from peft import LoraConfig, get_peft_model
        config = LoraConfig(r=r_tot, lora_alpha=alpha, lora_dropout=dropout,
                            target_modules=TARGETS)
        return get_peft_model(build(size, device, dtype), config).to(device, dtype)

    def reference():
        return replace_targets(build(size, device, dtype), lambda m: Flatten2d(
            ReferenceSOS(m, K, r_tot, alpha, dropout)))

    def plain():
        return replace_targets(build(size, device, dtype), lambda m: Flatten2d(
            PlainTorchSOS(m, K, r_tot, alpha, dropout)))

    def sos():
        model = sl.apply_sos_lora(build(size, device, dtype), TARGETS, num_experts=K,
                                  rank=r_tot, alpha=alpha, dropout=dropout, dtype=dtype)
        for _, layer in sl.sos_layers(model):
            layer.ortho_lambda.fill_(0.006)  # the penalty's gradient is part of the step
        return model

    available = dict(frozen_base=frozen)
    try:
        import peft  # noqa: F401
        available["peft_lora"] = peft_model
    except ImportError:
        print("peft is not installed: no PEFT row")
    available.update(reference_sos=reference, plain_pytorch=plain, soslinear=sos)
    return available


def measure(model, batch, seq, vocab, device, warmup, iters) -> dict:
    ids = torch.randint(0, vocab, (batch, seq), device=device)
    model.train()

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        for p in model.parameters():
            p.grad = None

    ms, _ = time_step(step, device, warmup, iters)
    peak = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**30
    return dict(ms=ms, tokens_per_s=batch * seq / ms * 1e3, peak_gib=peak)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="a small model, to check the script")
    parser.add_argument("--rank", type=int, default=64, help="total rank")
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.tiny:
        size = dict(layers=2, hidden=64, inter=160, vocab=500, heads=4, batch=2, seq=32)
    else:
        size = dict(layers=4, hidden=4096, inter=11008, vocab=32000, heads=32, batch=4, seq=1024)
    rows = {}
    for name, make in variants(size, device, dtype, args.rank, args.dropout).items():
        model = make()
        rows[name] = measure(model, size["batch"], size["seq"], size["vocab"], device,
                             args.warmup, args.iters)
        print(name, {k: round(v, 3) if v is not None else None for k, v in rows[name].items()},
              flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    base = rows["frozen_base"]
    for row in rows.values():
        row["x_frozen_tokens_per_s"] = row["tokens_per_s"] / base["tokens_per_s"]
        row["x_frozen_peak"] = row["peak_gib"] / base["peak_gib"] if base["peak_gib"] else None
    machine = machine_name(device)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(machine=machine, dtype=str(dtype), size=size,
                                             r_tot=args.rank, K=K, dropout=args.dropout,
                                             rows=rows), indent=1))
    print(f"\nModel training step, Llama {size['layers']} layers, hidden {size['hidden']}, "
          f"batch {size['batch']}x{size['seq']}, r_tot={args.rank}, K={K}, "
          f"dropout={args.dropout}, {dtype}, on {machine}\n")
    print("| | tokens/s | × frozen base | peak memory | × frozen base |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        peak = f"{r['peak_gib']:.2f} GiB | {r['x_frozen_peak']:.2f}" if r["peak_gib"] else "- | -"
        print(f"| {name} | {r['tokens_per_s']:.0f} | {r['x_frozen_tokens_per_s']:.2f} | {peak} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
