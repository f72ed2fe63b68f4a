"""compose on PEFT's convolution and embedding adapters: read as matrix views of their weights,
every factored measure equal to a float64 dense computation on PEFT's own deltas, sums into a
model and as one PEFT adapter equal to PEFT's merges."""
import json
import re

import peft
import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import soslora_ext as sl
from soslora_ext import compose
from soslora_ext.cli import main

from conftest import rel_err
from helpers import peft_adapter

LAYERS = ["emb", "c1", "c2", "c3", "lin"]


class Kinds(nn.Module):
    """Every kind PEFT adapts: odd sizes, strides and padding."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(29, 11)
        self.c1 = nn.Conv1d(11, 7, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(3, 6, (3, 2), stride=(1, 2), padding=1)  # PEFT ignores dilation
        self.c3 = nn.Conv3d(2, 5, 2, bias=False)
        self.lin = nn.Linear(7, 4)

    def forward(self, ids, image, volume):
        h = self.c1(self.emb(ids).transpose(1, 2))                    # [b, 7, t']
        return torch.cat([self.lin(h.transpose(1, 2)).flatten(1), self.c2(image).flatten(1),
                          self.c3(volume).flatten(1)], dim=1)


def kinds(seed=0):
    torch.manual_seed(seed)
    return Kinds().double().eval()


def inputs():
    g = torch.Generator().manual_seed(5)
    return (torch.randint(0, 29, (2, 9), generator=g),
            torch.randn(2, 3, 7, 8, generator=g, dtype=torch.float64),
            torch.randn(2, 2, 4, 5, 3, generator=g, dtype=torch.float64))


CONFIGS = [
    dict(r=4, lora_alpha=8, target_modules=LAYERS),
    dict(r=6, lora_alpha=3, use_rslora=True, target_modules=["emb", "c2", "c3", "lin"],
         rank_pattern={"c2": 2}, alpha_pattern={"c3": 5}),
    dict(r=3, lora_alpha=6, target_modules=["c1", "c2", "emb"]),
]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("kinds")
    return [peft_adapter(root / name, kinds, seed, **cfg)
            for name, seed, cfg in zip("abc", (1, 2, 3), CONFIGS)]


def peft_deltas(path):
    """{layer: PEFT's own delta weight, as a [out, in] view} in float64 (PEFT keeps the
    factors in float32 unless cast)."""
    model = peft.PeftModel.from_pretrained(kinds(), str(path)).double()
    deltas = {}
    for name in LAYERS:
        layer = model.base_model.model.get_submodule(name)
        if isinstance(layer, peft.tuners.lora.LoraLayer):
            d = layer.get_delta_weight("default").double()
            deltas[name] = d.T if name == "emb" else d.reshape(d.shape[0], -1)
    return deltas


def test_matrix_views_are_peft_deltas(adapters):
    for path in adapters:
        adapter, expected = compose.load(path), peft_deltas(path)
        assert set(adapter) == set(expected)
        for layer, delta in expected.items():
            assert rel_err(adapter.delta(layer), delta) < 1e-12
    a = compose.load(adapters[0])
    assert a.layouts["c2"] == compose.Layout("conv", (6, 3, 3, 2))
    assert a.layouts["emb"] == compose.Layout("embedding", (29, 11))
    assert "lin" not in a.layouts and a.shape("c3") == (5, 16) and a.shape("emb") == (11, 29)


def test_factored_report_equals_dense(adapters):
    loaded = [compose.load(p) for p in adapters]
    dense = [peft_deltas(p) for p in adapters]
    rep = compose.report(loaded)
    for pair in rep["pairs"]:
        i, j = "abc".index(pair["a"]), "abc".index(pair["b"])
        common = dense[i].keys() & dense[j].keys()
        assert set(pair["cosine"]) == common and common
        for layer in common:
            x, y = dense[i][layer], dense[j][layer]
            assert pair["cosine"][layer] == pytest.approx(
                float((x * y).sum() / (x.norm() * y.norm())), abs=1e-12)
    for name, deltas in zip("abc", dense):
        for layer, delta in deltas.items():
            sv = torch.linalg.svdvals(delta)
            stats = rep["layers"][name][layer]
            assert stats["norm"] == pytest.approx(float(sv.norm()), rel=1e-9)
            assert stats["effective_rank"] == pytest.approx(compose.effective_rank(sv), rel=1e-6)


def test_sum_into_and_concat_equal_peft_merges(adapters, tmp_path):
    loaded = [compose.load(p) for p in adapters]
    weights = [0.5, -1.5, 2.0]
    reference = kinds()
    for path, w in zip(adapters, weights):
        deltas = peft_deltas(path)
        with torch.no_grad():
            for layer, d in deltas.items():
                weight = reference.get_submodule(layer).weight
                (weight.T if layer == "emb" else weight.view(weight.shape[0], -1)).add_(w * d)
    summed = compose.sum_into(kinds(), loaded, weights)
    for layer in LAYERS:  # the merge op takes each term's scale in float32
        assert rel_err(summed.get_submodule(layer).weight,
                       reference.get_submodule(layer).weight) < 1e-6
    total = compose.concat(loaded, weights)
    total.save_peft(tmp_path / "sum")
    stored = load_file(str(tmp_path / "sum" / "adapter_model.safetensors"))
    assert stored["base_model.model.c2.lora_A.weight"].shape == (9, 3, 3, 2)  # 4 + 2 + 3
    assert stored["base_model.model.emb.lora_embedding_B"].shape == (11, 13)
    again = compose.load(tmp_path / "sum")
    for layer in total:
        assert rel_err(again.delta(layer), total.delta(layer)) < 1e-6
    loaded_sum = peft.PeftModel.from_pretrained(kinds(), str(tmp_path / "sum")).eval()
    with torch.no_grad():
        assert rel_err(loaded_sum(*inputs()), reference(*inputs())) < 1e-5


def test_wrong_kind_or_shape_is_refused(adapters, tmp_path):
    a, c = compose.load(adapters[0]), compose.load(adapters[2])
    fits = compose.Adapter({"emb": c["emb"]}, name="c", layouts={"emb": c.layouts["emb"]})

    class Swapped(Kinds):
        def __init__(self):
            super().__init__()
            self.c2 = nn.Conv2d(3, 6, (2, 3), padding=1)  # the same [6, 18] view, another kernel
            self.c1 = nn.Linear(33, 7)

    for name, model, match in (("c2", Swapped(), r"conv weight \(6, 3, 3, 2\).*\(6, 3, 2, 3\)"),
                               ("c1", Swapped(), "conv layer, the model's is Linear")):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        only = compose.Adapter({name: a[name]}, name="a", layouts={name: a.layouts[name]})
        with pytest.raises(sl.AdapterError, match=match):
            compose.sum_into(model, [fits, only])  # the first fits: nothing may change
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    grouped = Kinds()
    grouped.c2 = nn.Conv2d(3, 6, (3, 2), groups=3)
    grouped.c2.weight = nn.Parameter(torch.randn(6, 3, 3, 2))
    with pytest.raises(sl.AdapterError, match="groups=3"):
        compose.sum_into(grouped, [compose.Adapter({"c2": a["c2"]},
                                                   layouts={"c2": a.layouts["c2"]})])
    # A convolution adapter and a linear one with the same matrix shape: not the same base.
    flat = compose.Adapter({"c3": [compose.LowRankTerm(torch.ones(2, 16), torch.ones(5, 2))]})
    with pytest.raises(sl.AdapterError, match=r"layer 'c3'.*conv weight \(5, 2, 2, 2, 2\)"):
        compose.cosine(a, flat)
    # A malformed file: lora_B's kernel dimensions are not ones.
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((adapters[0] / "adapter_config.json").read_text())
    tensors = load_file(str(adapters[0] / "adapter_model.safetensors"))
    tensors["base_model.model.c2.lora_B.weight"] = torch.randn(6, 4, 1, 2)
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    with pytest.raises(sl.AdapterError, match="layer 'c2'.*not a LoRA pair"):
        compose.load(bad)
    tensors["base_model.model.c2.lora_B.weight"] = torch.randn(6, 4, 1, 1)
    tensors["base_model.model.emb.lora_embedding_B"] = torch.randn(11, 4, 1)
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    with pytest.raises(sl.AdapterError, match="layer 'emb'.*not a LoRA pair"):
        compose.load(bad)


def test_compose_report_cli_on_conv_adapters(adapters, tmp_path, capsys):
    assert main(["compose", "report", *map(str, adapters), "--json",
                 str(tmp_path / "r.json")]) == 0
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["adapters"] == ["a", "b", "c"] and set(rep["layers"]["a"]) == set(LAYERS)
    out = capsys.readouterr().out
    assert "pairwise RMS cosine" in out
    assert re.search(r"^a +1\.0000 +\d\.\d{4} +\d\.\d{4}$", out, re.M), out  # cells apart
    assert main(["compose", "concat", *map(str, adapters), "--weights", "1", "-0.5", "2",
                 "--out", str(tmp_path / "sum")]) == 0
    summed = compose.sum_into(kinds(), [compose.load(p) for p in adapters], [1, -0.5, 2])
    loaded = peft.PeftModel.from_pretrained(kinds(), str(tmp_path / "sum")).eval()
    with torch.no_grad():
        assert rel_err(loaded(*inputs()), summed(*inputs())) < 1e-5


@pytest.mark.parametrize("method", ["sos", "cps"])
def test_from_model_reads_adapted_kinds(method, adapters):
    model = kinds()
    if method == "sos":
        sl.apply_sos_lora(model, LAYERS, num_experts=2, rank=4, scale_mode="channel")
    else:
        sl.apply_cps_lora(model, LAYERS, num_clusters=2, rank=2, init_partition="random")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.eval()
    live = compose.from_model(model, name=method)
    assert live.layouts == compose.load(adapters[0]).layouts  # PEFT's, layer for layer
    for name, layer in sl.adapter_layers(model):
        delta = layer.delta_weight().double()
        view = delta.T if name == "emb" else delta.reshape(delta.shape[0], -1)
        assert rel_err(live.delta(name), view) < 1e-6
    # Summed into a fresh base, the adapter gives the adapted model's outputs.
    with torch.no_grad():
        assert rel_err(compose.sum_into(kinds(), [live])(*inputs()), model(*inputs())) < 1e-6


def test_own_format_records_layouts(adapters, tmp_path):
    model = sl.apply_sos_lora(kinds(), LAYERS, num_experts=2, rank=4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    sl.save_adapter(model, tmp_path / "own")
    saved, live = compose.load(tmp_path / "own"), compose.from_model(model)
    assert saved.layouts == live.layouts == compose.load(adapters[0]).layouts
    for layer in live:
        assert rel_err(saved.delta(layer), live.delta(layer)) < 1e-12


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(12, 3, batch_first=True)
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        return self.head(self.attn(x, x, x, need_weights=False)[0])


def attention(seed=0):
    torch.manual_seed(seed)
    return Attention().double().eval()


def test_attention_adapters(tmp_path):
    """An nn.MultiheadAttention's PEFT adapter: in_proj as the attention layout, out_proj under
    PEFT's name, counted twice as PEFT applies it; sums and exports give PEFT's outputs."""
    paths = [peft_adapter(tmp_path / n, attention, s, r=r, lora_alpha=2 * r,
                          target_modules=["attn", "head"])
             for n, s, r in (("a", 1, 2), ("b", 2, 3))]
    a, b = (compose.load(p) for p in paths)
    assert a.layouts == {"attn": compose.Layout("attention", (36, 12))}
    assert set(a) == {"attn", "attn.base_layer.out_proj", "head"}
    x = torch.randn(2, 7, 12, dtype=torch.float64)
    with torch.no_grad():
        for adapter, path in ((a, paths[0]), (b, paths[1])):
            reference = peft.PeftModel.from_pretrained(attention(), str(path)).eval()
            assert rel_err(compose.sum_into(attention(), [adapter])(x), reference(x)) < 1e-6
        summed = compose.sum_into(attention(), [a, b], [1.0, -0.5])
        compose.concat([a, b], [1.0, -0.5]).save_peft(tmp_path / "sum")
        loaded = peft.PeftModel.from_pretrained(attention(), str(tmp_path / "sum")).eval()
        assert rel_err(loaded(x), summed(x)) < 1e-5
    # Our adapter of the module: what compose reads from the export is what the model holds.
    model = sl.apply_sos_lora(attention(), ["attn"], num_experts=2, rank=4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.eval()
    sl.export_peft(model, tmp_path / "ours")
    live, exported = compose.from_model(model), compose.load(tmp_path / "ours")
    assert live.layouts == exported.layouts == {"attn": compose.Layout("attention", (36, 12))}
    for layer in live:
        assert rel_err(exported.delta(layer), live.delta(layer)) < 1e-6
    with torch.no_grad():
        assert rel_err(compose.sum_into(attention(), [live])(x), model(x)) < 1e-6


def test_sum_into_an_adapted_model_writes_its_bases(adapters):
    a = compose.load(adapters[0])
    model = sl.apply_sos_lora(kinds(), LAYERS, num_experts=2, rank=4).eval()  # B = 0: no change
    compose.sum_into(model, [a])
    with torch.no_grad():
        assert rel_err(model(*inputs()), compose.sum_into(kinds(), [a])(*inputs())) < 1e-12
    assert all(not layer.merged for _, layer in sl.adapter_layers(model))
