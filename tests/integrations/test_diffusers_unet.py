"""SOS-LoRA and CPS-LoRA on a small diffusers UNet2DConditionModel: attention projections and
convolutions adapted, a few training steps of the noise-prediction loss (it falls), exported to
PEFT and reloaded by peft.PeftModel with the same outputs, and read by compose."""
import peft
import pytest
import torch
import torch.nn.functional as F

import soslora_ext as sl
from soslora_ext import compose

from conftest import rel_err

diffusers = pytest.importorskip("diffusers")

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv_in", "conv1", "conv2"]


def unet():
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64),
        layers_per_block=1, cross_attention_dim=32, norm_num_groups=8, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


def batch():
    """Noisy latents, timesteps, text states and the noise to predict (DDPM's forward process)."""
    g = torch.Generator().manual_seed(3)
    latents, noise = torch.randn(4, 4, 16, 16, generator=g), torch.randn(4, 4, 16, 16, generator=g)
    t = torch.tensor([5, 200, 600, 950])
    noisy = diffusers.DDPMScheduler(num_train_timesteps=1000).add_noise(latents, noise, t)
    return (noisy, t, torch.randn(4, 5, 32, generator=g)), noise


ADAPT = {
    "sos": lambda m: sl.apply_sos_lora(m, TARGETS, num_experts=2, rank=8, alpha=16.0),
    "cps": lambda m: sl.apply_cps_lora(m, TARGETS, num_clusters=2, rank=4, alpha=8.0),
}


@pytest.mark.parametrize("method", sorted(ADAPT))
def test_unet_trains_exports_and_reloads_in_peft(method, tmp_path):
    model = ADAPT[method](unet())
    adapted = {name for name, _ in sl.adapter_layers(model)}
    assert any(n.endswith("conv1") for n in adapted) and any(n.endswith("to_q") for n in adapted)
    inputs, noise = batch()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(8):
        loss = F.mse_loss(model(*inputs).sample, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.95 * losses[0], losses
    model.eval()
    sl.export_peft(model, tmp_path / method)
    reloaded = peft.PeftModel.from_pretrained(unet(), str(tmp_path / method)).eval()
    with torch.no_grad():
        ours, base = model(*inputs).sample, unet()(*inputs).sample
        assert rel_err(reloaded(*inputs).sample, ours) < 1e-5
        assert rel_err(base, ours) > 1e-3  # the adapters changed the outputs
    # compose reads the export, convolutions as views of their weights, and the model itself.
    exported, live = compose.load(tmp_path / method), compose.from_model(model)
    assert set(exported) == set(live) == adapted
    for layer in exported:
        assert rel_err(exported.delta(layer), live.delta(layer)) < 1e-6
    assert exported.layouts and exported.layouts == live.layouts
