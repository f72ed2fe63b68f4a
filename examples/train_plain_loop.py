"""SOS-LoRA in a plain PyTorch training loop: schedules, penalty, save, merge.

Builds a small Llama-style causal LM from a transformers config (nothing is downloaded) and
teaches it a fixed next-token rule. Swap in `AutoModelForCausalLM.from_pretrained(dir)` for a
real model.

    python examples/train_plain_loop.py --steps 60 --out /tmp/sos-example
"""
import argparse
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import soslora_ext as sl


def main(steps: int, out: Path) -> None:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, max_position_embeddings=64))
    sl.apply_sos_lora(model, ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
                      num_experts=4, rank=16, alpha=32.0, scale_mode="channel", gate=True,
                      dropout=0.05)
    trainable, total = sl.trainable_parameters(model)
    print(f"{trainable} of {total} parameters train")

    ortho = sl.OrthoSchedule(model, lambda_max=0.006, delay=0.15, ramp=0.20, total_steps=steps)
    gate = sl.GateSchedule(model, start=2.0, end=1.0, anneal=0.30, total_steps=steps)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    for step in range(steps):
        ids = (torch.randint(0, 128, (8, 1)) + 3 * torch.arange(24)) % 128  # next = token + 3
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()  # each layer adds ortho_lambda * d(penalty)/dA to its A gradient
        opt.step()
        ortho.step()
        gate.step()
        if step % 10 == 0 or step == steps - 1:
            print(f"step {step:>4}  loss {loss.item():.4f}  "
                  f"penalty {sl.ortho_penalty(model).item():.4f}")

    model.eval()
    sl.save_adapter(model, out / "adapter")
    sl.export_peft(model, out / "adapter_peft")
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        sl.merge_and_unload(model)
        after = model(input_ids=ids).logits
    print(f"merged: max |logit change| {(after - before).abs().max().item():.2e}; "
          f"adapter saved to {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", type=Path, default=Path("runs/example-plain-loop"))
    args = parser.parse_args()
    main(args.steps, args.out)
