"""compose on a diffusion UNet's adapters: PEFT's LoRA on a small diffusers
UNet2DConditionModel's attention projections and convolutions, the factored interference of
the convolution adapters against a float64 dense computation, and their sums against PEFT's
merges."""
import peft
import pytest
import torch

from soslora_ext import compose

from conftest import rel_err
from helpers import peft_adapter

diffusers = pytest.importorskip("diffusers")

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
CONVS = ["conv1", "conv2", "conv_in", "conv_shortcut"]


def unet(seed=0):
    """A toy UNet2DConditionModel (0.8M parameters) built from its config: nothing is
    downloaded."""
    torch.manual_seed(seed)
    return diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64),
        layers_per_block=1, cross_attention_dim=32, norm_num_groups=8, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).eval()


def unet_inputs():
    g = torch.Generator().manual_seed(7)
    return (torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 500]),
            torch.randn(2, 5, 32, generator=g))


@pytest.fixture(scope="module")
def unet_adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("unet")
    configs = {  # a style (attention and convolutions), a subject, a convolution-only one
        "style": dict(r=4, lora_alpha=4, target_modules=ATTENTION + CONVS),
        "subject": dict(r=8, lora_alpha=16, target_modules=ATTENTION + ["conv1", "conv2"],
                        rank_pattern={"conv2": 2}),
        "texture": dict(r=2, lora_alpha=8, use_rslora=True, target_modules=CONVS),
    }
    return {name: peft_adapter(root / name, unet, seed, **cfg)
            for seed, (name, cfg) in enumerate(configs.items(), 1)}


def dense_deltas(path):
    """PEFT's own deltas of every adapted module, as [out, in * k * k] views, in float64."""
    model = peft.PeftModel.from_pretrained(unet(), str(path)).double()
    return {name.removeprefix("base_model.model."):
            layer.get_delta_weight("default").reshape(layer.get_base_layer().weight.shape[0], -1)
            for name, layer in model.named_modules()
            if isinstance(layer, peft.tuners.lora.LoraLayer)}


def test_report_of_unet_conv_adapters_equals_dense(unet_adapters):
    adapters = [compose.load(p) for p in unet_adapters.values()]
    dense = {name: dense_deltas(p) for name, p in unet_adapters.items()}
    rep = compose.report(adapters)
    conv_layers = 0
    for pair in rep["pairs"]:
        a, b = dense[pair["a"]], dense[pair["b"]]
        assert set(pair["cosine"]) == a.keys() & b.keys()
        for layer, value in pair["cosine"].items():
            x, y = a[layer], b[layer]
            assert value == pytest.approx(float((x * y).sum() / (x.norm() * y.norm())),
                                          abs=1e-12)
            conv_layers += layer.rsplit(".", 1)[-1] in CONVS
    assert conv_layers > 20  # the report measured the convolutions, not only the attention
    layouts = adapters[0].layouts
    assert layouts["conv_in"] == compose.Layout("conv", (32, 4, 3, 3))
    assert all(layer.rsplit(".", 1)[-1] in CONVS for layer in layouts)
    for name, deltas in dense.items():
        for layer, delta in deltas.items():
            sv = torch.linalg.svdvals(delta)
            assert rep["layers"][name][layer]["norm"] == pytest.approx(float(sv.norm()), rel=1e-9)


def test_unet_sums_equal_peft_merges(unet_adapters, tmp_path):
    adapters = [compose.load(p) for p in unet_adapters.values()]
    reference = unet()
    for path in unet_adapters.values():
        reference = peft.PeftModel.from_pretrained(reference, str(path)).merge_and_unload()
    with torch.no_grad():
        expected = reference(*unet_inputs()).sample
        assert rel_err(compose.sum_into(unet(), adapters)(*unet_inputs()).sample,
                       expected) < 1e-5
        compose.concat(adapters).save_peft(tmp_path / "sum")
        summed = peft.PeftModel.from_pretrained(unet(), str(tmp_path / "sum")).eval()
        assert rel_err(summed(*unet_inputs()).sample, expected) < 1e-5
