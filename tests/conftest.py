import json

import pytest
import torch

import soslora_ext as sl
from soslora_ext.ops import reference


def isa_runs_here(isa: str) -> bool:
    """Whether this CPU runs the SOSLORA_CPU_ISA form `isa` (scalar, avx2, avx512)."""
    capability = torch.backends.cpu.get_cpu_capability()  # DEFAULT, AVX2 or AVX512
    return {"scalar": True, "avx2": capability in ("AVX2", "AVX512"),
            "avx512": capability == "AVX512"}[isa]


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """|actual - expected| / |expected| in float64 (0 when both are 0)."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert a.shape == e.shape, (a.shape, e.shape)
    assert torch.isfinite(a).all(), "non-finite values"
    denom = e.norm()
    return float((a - e).norm() / denom) if denom > 0 else float((a - e).norm())


def make_layer(in_features=13, out_features=7, *, bias=True, dtype=torch.float64,
               device="cpu", random_b=True, **kwargs) -> sl.SOSLinear:
    """An SOSLinear on a random base with B (and gate logits) randomized so every term matters."""
    base = torch.nn.Linear(in_features, out_features, bias=bias, dtype=dtype, device=device)
    layer = sl.SOSLinear(base, dtype=kwargs.pop("adapter_dtype", dtype), **kwargs)
    if random_b:
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.5)
            if layer.config.gate:
                layer.gate_logits.normal_(0, 0.5)
                layer.gate_temperature.fill_(1.7)
            if layer.config.scale_mode == "channel":
                layer.expert_scales.mul_(torch.rand_like(layer.expert_scales) + 0.5)
    return layer


def oracle_forward(layer: sl.SOSLinear, x: torch.Tensor, seed=None, params=None) -> torch.Tensor:
    """reference.sos_forward on the layer's parameters, split per expert (float64)."""
    p = params or dict(layer.named_parameters())
    A, B = p["lora_A"].double(), p["lora_B"].double()
    ranges = layer.expert_ranges
    scales = oracle_expert_scales(layer, p)
    drop = layer.config.dropout if layer.training else 0.0
    base = layer.base_layer
    return reference.sos_forward(
        x.double(), base.weight.double(), None if base.bias is None else base.bias.double(),
        [A[s] for s in ranges], [B[:, s] for s in ranges], list(scales), drop,
        layer.config.dropout_position, seed)


def randomize_adapters(model) -> None:
    """Non-zero factors (and channel scales, gate logits) in every adapted layer, so that every
    term of the update matters."""
    with torch.no_grad():
        for _, layer in sl.adapter_layers(model):
            layer.lora_B.normal_(0, 0.3)
            if getattr(layer, "expert_scales", None) is not None:
                layer.expert_scales.mul_(torch.rand_like(layer.expert_scales) + 0.5)
            if getattr(layer, "gate_logits", None) is not None:
                layer.gate_logits.normal_(0, 0.5)


def next_dropout_seed(layer: sl.SOSLinear, x: torch.Tensor):
    """The dropout seed the layer will draw on its next forward (same generator state)."""
    state = torch.get_rng_state()
    seed = sl.ops.new_dropout_seed(x.device) if layer.training and layer.config.dropout else None
    torch.set_rng_state(state)
    return seed


def oracle_expert_scales(layer: sl.SOSLinear, params=None) -> torch.Tensor:
    """Per-expert scales [K] or [K, out], gate included, computed by the reference formulas."""
    p = params or dict(layer.named_parameters())
    c = layer.config
    scales = p["expert_scales"].double() if c.scale_mode == "channel" else \
        torch.tensor(c.fixed_scales(), dtype=torch.float64)
    if c.gate:
        g = reference.gate(p["gate_logits"].double(), float(layer.gate_temperature))
        scales = scales * (g if scales.dim() == 1 else g[:, None])
    return scales


def restamp_adapter(directory, edit=lambda config: None) -> None:
    """Apply edit(config) to a saved adapter's config and re-record both checksums, as a writer
    that damaged its own output would: the checks behind the checksums must still refuse it."""
    from soslora_ext.formats.native import CONFIG_NAME, WEIGHTS_NAME, config_sha256, file_sha256

    config = json.loads((directory / CONFIG_NAME).read_text())
    edit(config)
    config["weights_sha256"] = file_sha256(directory / WEIGHTS_NAME)
    config["config_sha256"] = config_sha256(config)
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    overwrite(directory / CONFIG_NAME, text.encode())


def overwrite(path, data: bytes) -> None:
    """Replace a file's contents in place: without O_TRUNC, which ext4 makes slow (it flushes)."""
    with open(path, "r+b") as f:
        f.write(data)
        f.truncate()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
