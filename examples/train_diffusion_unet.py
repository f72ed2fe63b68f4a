"""SOS-LoRA and CPS-LoRA on a diffusion UNet: train, export to PEFT, reload, measure interference.

Builds a small diffusers UNet2DConditionModel from a config (nothing is downloaded), adapts its
attention projections (to_q, to_k, to_v, to_out.0) and its convolutions (conv_in and every
ResNet block's conv1 and conv2) with each method, and trains the adapters a few steps on the
usual noise-prediction loss (MSE between the added noise and the UNet's prediction of it) over
a fixed set of random latents and text states. Each adapter is exported in PEFT's format,
reloaded with peft.PeftModel.from_pretrained into a fresh UNet (the outputs must agree), and
`compose report` then gives the factored interference of the two adapters, convolutions
included. Seconds on a CPU.

    python examples/train_diffusion_unet.py --steps 30 --out /tmp/unet-example
"""
import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel

import soslora_ext as sl
from soslora_ext import compose

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv_in", "conv1", "conv2"]


def unet() -> UNet2DConditionModel:
    """A toy text-conditioned UNet (0.8M parameters); the same weights on every call."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64),
        layers_per_block=1, cross_attention_dim=32, norm_num_groups=8, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


def adapt(model, method: str):
    if method == "sos":
        return sl.apply_sos_lora(model, TARGETS, num_experts=2, rank=8, alpha=16.0)
    return sl.apply_cps_lora(model, TARGETS, num_clusters=2, rank=4, alpha=8.0)


def train(method: str, steps: int, data) -> tuple[torch.nn.Module, list[float]]:
    latents, states = data
    model = adapt(unet(), method)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    g = torch.Generator().manual_seed(1)
    model.train()
    losses = []
    for step in range(steps):
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, 1000, (latents.shape[0],), generator=g)
        noisy = scheduler.add_noise(latents, noise, t)
        loss = F.mse_loss(model(noisy, t, states).sample, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return model, losses


def main(steps: int, out: Path) -> dict:
    import peft

    g = torch.Generator().manual_seed(0)
    data = (torch.randn(8, 4, 16, 16, generator=g), torch.randn(8, 5, 32, generator=g))
    probe = (torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 700]),
             torch.randn(2, 5, 32, generator=g))
    result = {}
    for method in ("sos", "cps"):
        model, losses = train(method, steps, data)
        first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
        sl.export_peft(model, out / method)
        reloaded = peft.PeftModel.from_pretrained(unet(), str(out / method)).eval()
        with torch.no_grad():
            ours, theirs = model(*probe).sample, reloaded(*probe).sample
        diff = float((ours - theirs).norm() / ours.norm())
        trainable, total = sl.trainable_parameters(model)
        print(f"{method}: {trainable} of {total} parameters trained; loss {first:.4f} -> "
              f"{last:.4f} (means of the first and last 5 steps); PEFT reload relative "
              f"difference {diff:.2e}")
        result[method] = dict(first_loss=first, final_loss=last, peft_difference=diff)
    rep = compose.report([compose.load(out / m) for m in ("sos", "cps")])
    convs = {k: v for k, v in rep["pairs"][0]["cosine"].items() if "conv" in k}
    print(compose.format_report(rep))
    print(f"{len(convs)} convolution layers in common; their max |cosine| "
          f"{max(map(abs, convs.values())):.4f}")
    result["rms_cosine"] = rep["pairs"][0]["rms_cosine"]
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path("runs/example-diffusion-unet"))
    args = parser.parse_args()
    main(args.steps, args.out)
