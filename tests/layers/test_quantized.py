"""Quantized frozen bases (bitsandbytes Linear4bit nf4/fp4 with and without double quantization,
and Linear8bitLt): SOS and CPS layers over them against the oracle on the dequantized base,
the merge decision (refused in place; dequantized merge_and_unload), a transformers model
quantized by transformers itself, our format, and the real peft both ways."""
import collections
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

bnb = pytest.importorskip("bitsandbytes")

import peft  # noqa: E402
from bitsandbytes import functional as bnb_functional  # noqa: E402
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM  # noqa: E402

import soslora_ext as sl  # noqa: E402
from soslora_ext.apps import finetune  # noqa: E402
from soslora_ext.layers import quantized  # noqa: E402
from soslora_ext.ops import reference  # noqa: E402

from conftest import oracle_forward, randomize_adapters, rel_err  # noqa: E402

QUANTS = ["nf4", "nf4-double", "fp4", "fp4-double", "int8"]
FOUR_BIT = [q for q in QUANTS if q != "int8"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def bnb_linear(quant, in_features=64, out_features=32):
    """(quantized layer, the float32 nn.Linear it was quantized from)."""
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features)
    torch.nn.init.normal_(linear.bias)
    if quant == "int8":
        layer = bnb.nn.Linear8bitLt(in_features, out_features, has_fp16_weights=False,
                                    threshold=6.0)
    else:
        layer = bnb.nn.Linear4bit(in_features, out_features, compute_dtype=torch.float32,
                                  quant_type=quant[:3],
                                  compress_statistics=quant.endswith("double"))
    layer.load_state_dict(linear.state_dict())
    return layer.to("cpu"), linear  # bitsandbytes quantizes on the move to the device


def storage(module):
    """Copies of every tensor that holds a quantized layer's weight: its codes and scales."""
    tensors = {}
    for name, m in module.named_modules():
        if quantized.is_4bit(m):
            state = m.weight.quant_state
            tensors.update({f"{name}.weight": m.weight.data, f"{name}.absmax": state.absmax})
            if state.nested:
                tensors[f"{name}.absmax2"] = state.state2.absmax
        elif quantized.is_8bit(m):
            tensors.update({f"{name}.weight": m.weight.data,
                            f"{name}.SCB": quantized._row_scales(m)})
    return {k: v.detach().clone() for k, v in tensors.items()}


def assert_same_storage(before, module):
    after = storage(module)
    assert after.keys() == before.keys()
    for key, t in before.items():
        assert after[key].dtype == t.dtype and torch.equal(after[key], t), key


def plain_linear(weight, bias):
    linear = nn.Linear(weight.shape[1], weight.shape[0], dtype=weight.dtype)
    linear.load_state_dict(dict(weight=weight, bias=bias))
    return linear


# ---- the layer against the oracle ------------------------------------------------------------
@pytest.mark.parametrize("quant", QUANTS)
def test_dequantized_weight_is_the_matrix_the_layer_multiplies_by(quant):
    base, original = bnb_linear(quant, 128, 64)
    assert quantized.is_quantized_linear(base) and not quantized.is_quantized_linear(original)
    W = quantized.dequantized_weight(base)
    assert W.shape == (64, 128) and W.dtype == torch.float32
    # A quantization of the original [out, in] weight (not a transposed or reordered one).
    assert rel_err(W, original.weight) < (0.02 if quant == "int8" else 0.2)
    base.train()  # bitsandbytes' exact path (its inference paths approximate it)
    x = torch.randn(6, 128)
    assert rel_err(base(x), F.linear(x, W, base.bias)) < 1e-6
    assert rel_err(base(x.requires_grad_()), F.linear(x, W, base.bias)) < 1e-6
    assert quantized.dequantized_weight(base, torch.float64).dtype == torch.float64


SOS_KWARGS = [dict(num_experts=3, rank=6, scale_mode="channel", gate=True),
              dict(num_experts=2, rank=4, dropout_position="pre")]


@pytest.mark.parametrize("kwargs", SOS_KWARGS)
@pytest.mark.parametrize("quant", QUANTS)
def test_sos_over_a_quantized_base_matches_the_oracle_values_and_gradients(quant, kwargs):
    base, _ = bnb_linear(quant)
    layer = sl.SOSLinear(base, **kwargs).train()
    assert layer.quantized and layer.lora_A.dtype == torch.float32
    assert (layer.in_features, layer.out_features) == (64, 32)
    randomize_adapters(layer)
    # The oracle over the dequantized base: a twin on a plain nn.Linear of that weight gives
    # the structure; the parameters are the quantized layer's own.
    twin = sl.SOSLinear(plain_linear(quantized.dequantized_weight(base), base.bias), **kwargs)
    params = dict(layer.named_parameters())
    x = torch.randn(2, 5, 64, requires_grad=True)
    y = layer(x)
    expected = oracle_forward(twin, x, params=params)
    assert y.dtype == torch.float32 and rel_err(y, expected) < 1e-5
    g = torch.randn_like(y)
    wrt = [x] + [p for _, p in layer.named_adapter_parameters()]
    for got, want in zip(torch.autograd.grad(y, wrt, g), torch.autograd.grad(expected, wrt, g)):
        assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("quant", QUANTS)
def test_cps_over_a_quantized_base_matches_the_oracle_values_and_gradients(quant):
    base, _ = bnb_linear(quant, 48, 40)
    layer = sl.CPSLinear(base, num_clusters=3, rank=2, init_partition="random").train()
    randomize_adapters(layer)
    W = quantized.dequantized_weight(base).double()
    x = torch.randn(9, 48, requires_grad=True)
    y = layer(x)

    def oracle():  # the dense update from the factors by plain indexing, in float64
        A, B, scale = (t.double() for t in layer._update_factors())
        return reference.cps_forward(x.double(), W, base.bias.double(), (B * scale) @ A)

    assert rel_err(y, oracle()) < 1e-5
    g = torch.randn_like(y)
    wrt = [x, layer.lora_A, layer.lora_B]
    for got, want in zip(torch.autograd.grad(y, wrt, g), torch.autograd.grad(oracle(), wrt, g)):
        assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_inputs_in_another_float_dtype_are_cast_by_the_quantized_base(dtype):
    base, _ = bnb_linear("nf4")
    layer = sl.SOSLinear(base, num_experts=2, rank=4).train()
    randomize_adapters(layer)
    x = torch.randn(4, 64)
    y = layer(x.to(dtype))  # the base casts to its float32 compute dtype and back
    assert y.dtype == dtype and rel_err(y, layer(x.to(dtype).float())) < 1e-2
    with pytest.raises(TypeError, match="input x is torch.int64"):
        layer(torch.ones(4, 64, dtype=torch.long))


def test_cpu_packed_layout_is_dequantized_as_the_cpu_kernel_reads_it():
    # bitsandbytes repacks a 4-bit weight for its CPU inference kernel (in place, on the first
    # eval() forward without grad on AVX512-BF16 CPUs): per-block scales in bfloat16, codes
    # interleaved in 32-row tiles. Packed here by its own converter, so any CPU checks it.
    for quant in FOUR_BIT:
        base, _ = bnb_linear(quant, 128, 64)
        state = base.weight.quant_state
        data = base.weight.data.reshape(-1)
        codes = torch.stack([data >> 4, data & 0xF], dim=1).reshape(64, 128).long()
        absmax = state.absmax
        if state.nested:  # as the converter computes the float scales
            absmax = bnb_functional.dequantize_blockwise(state.absmax, state.state2)
            absmax += state.offset
        scales = absmax.float().reshape(64, 2).repeat_interleave(64, dim=1)
        assert torch.equal(state.code[codes] * scales, quantized.dequantized_weight(base))
        expected = state.code[codes] * scales.bfloat16().float()
        base.weight.data, base.weight.quant_state = bnb_functional._convert_weight_packed_for_cpu(
            base.weight.data, state)
        assert "packed for CPU inference" in quantized.describe(base)
        assert torch.equal(quantized.dequantized_weight(base), expected)
        if bnb_functional.has_avx512bf16():  # the kernel itself: bfloat16 products
            base.eval()
            x = torch.randn(5, 128)
            with torch.no_grad():
                assert rel_err(base(x), F.linear(x, expected, base.bias)) < 2e-2


@pytest.mark.parametrize("quant", FOUR_BIT)
@pytest.mark.parametrize("method", ["sos", "cps"])
def test_training_after_the_cpu_repack_computes_the_exact_product(quant, method):
    """An eval() forward repacks a 4-bit weight for good on AVX512-BF16 CPUs (packed here by
    bitsandbytes' own converter, so any CPU checks it); bitsandbytes' own training forward
    then fails. Train, evaluate, train again (a Trainer with periodic evaluation) must work and
    compute the exact product with the dequantized (repacked) weight."""
    base, _ = bnb_linear(quant, 128, 64)
    state = base.weight.quant_state
    base.weight.data, base.weight.quant_state = bnb_functional._convert_weight_packed_for_cpu(
        base.weight.data, state)
    assert quantized.is_packed_for_cpu(base)
    W = quantized.dequantized_weight(base).double()
    x = torch.randn(2, 5, 128, requires_grad=True)
    if method == "sos":
        layer = sl.SOSLinear(base, num_experts=2, rank=4).train()
        randomize_adapters(layer)
        twin = sl.SOSLinear(plain_linear(W.float(), base.bias), num_experts=2, rank=4)
        expected = oracle_forward(twin, x, params=dict(layer.named_parameters()))
    else:  # the update as one dense matrix (its own oracle tests are in test_cps.py)
        layer = sl.CPSLinear(base, num_clusters=2, rank=2, init_partition="random").train()
        randomize_adapters(layer)
        expected = F.linear(x.double(), W + layer.delta_weight().double(), base.bias.double())
    y = layer(x)
    assert rel_err(y, expected) < 1e-5
    g = torch.randn_like(y)
    got, = torch.autograd.grad(y, [x], g, retain_graph=True)
    want, = torch.autograd.grad(expected, [x], g)
    assert rel_err(got, want) < 1e-5
    y.backward(g)  # and the factors get their gradient
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for _, p in layer.named_adapter_parameters() if p.requires_grad)


# ---- merging ---------------------------------------------------------------------------------
@pytest.mark.parametrize("quant", QUANTS)
def test_in_place_merge_is_refused_and_says_what_to_do_instead(quant):
    base, _ = bnb_linear(quant)
    layer = sl.SOSLinear(base, num_experts=2, rank=4)
    randomize_adapters(layer)
    before = storage(layer)
    kind = "Linear8bitLt" if quant == "int8" else f"Linear4bit \\({quant[:3]}"
    for call in (layer.merge, layer.unmerge, layer.merge_and_unload):
        with pytest.raises(RuntimeError, match=rf"{kind}.*merge_and_unload\(dequantize=True\)"):
            call()
    with pytest.raises(ValueError, match="dequantize=True"):
        layer.merge_and_unload(dtype=torch.float64)
    assert not layer.merged
    assert_same_storage(before, layer)
    assert layer.delta_weight().shape == (32, 64)  # reads only the factors


@pytest.mark.parametrize("quant", QUANTS)
def test_dequantized_merge_and_unload_is_exact_and_leaves_the_layer_alone(quant):
    base, _ = bnb_linear(quant)
    layer = sl.CPSLinear(base, num_clusters=2, rank=3).train()
    randomize_adapters(layer)
    x = torch.randn(7, 64)
    with torch.no_grad():
        before_out = layer(x)
    before = storage(layer)
    merged = layer.merge_and_unload(dequantize=True)
    assert type(merged) is nn.Linear and merged.weight.dtype == torch.float32
    assert not merged.weight.requires_grad
    expected = quantized.dequantized_weight(base).double() + layer.delta_weight().double()
    assert rel_err(merged.weight, expected) < 1e-6 and torch.equal(merged.bias, base.bias)
    with torch.no_grad():
        assert rel_err(merged(x), before_out) < 1e-5
        assert torch.equal(layer(x), before_out)
    assert layer.base_layer is base and not layer.merged
    assert_same_storage(before, layer)
    wide = layer.merge_and_unload(dequantize=True, dtype=torch.float64)
    A, B, scale = (t.detach().double() for t in layer._update_factors())
    exact = quantized.dequantized_weight(base, torch.float64) + (B * scale) @ A
    assert wide.weight.dtype == torch.float64 and rel_err(wide.weight, exact) < 1e-12
    with torch.no_grad():
        layer.lora_B.mul_(1e6)  # beyond float16's range once added
    with pytest.raises(FloatingPointError, match="range of torch.float16"):
        layer.merge_and_unload(dequantize=True, dtype=torch.float16)


def test_merged_state_cannot_be_loaded_onto_a_quantized_base():
    plain = sl.SOSLinear(nn.Linear(64, 32), num_experts=2, rank=4)
    randomize_adapters(plain)
    plain.merge()
    state = {k: v for k, v in plain.state_dict().items()
             if k not in ("base_layer.weight", "base_layer.bias")}
    layer = sl.SOSLinear(bnb_linear("nf4")[0], num_experts=2, rank=4)
    with pytest.raises(RuntimeError, match="merged update cannot be loaded onto the quantized"):
        layer.load_state_dict(state, strict=False)


# ---- a transformers model quantized by transformers ------------------------------------------
@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64)
    directory = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def quantized_llama(directory, quant):
    if quant == "int8":
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant[:3],
                                    bnb_4bit_use_double_quant=quant.endswith("double"),
                                    bnb_4bit_compute_dtype=torch.float32)
    return LlamaForCausalLM.from_pretrained(directory, quantization_config=config,
                                            device_map="cpu")


IDS = torch.randint(0, 96, (8, 12), generator=torch.Generator().manual_seed(1))


def logits(model):
    """Through bitsandbytes' inference paths (bfloat16 or int8 products: a rounding flip
    where inputs differ in the last bit moves the output by ~1e-3 relative)."""
    model.eval()
    with torch.no_grad():
        return model(IDS).logits


def exact_logits(model):
    """Through bitsandbytes' exact paths: training mode (Llama has no dropout), and before any
    inference forward (which may repack a 4-bit weight for good)."""
    model.train()
    with torch.no_grad():
        return model(IDS).logits


def both_logits(model):  # in this order
    return exact_logits(model), logits(model)


@pytest.mark.parametrize("quant", QUANTS)
def test_model_merge_is_refused_before_anything_changes_and_dequantize_replaces_layers(
        llama_dir, quant):
    model = quantized_llama(llama_dir, quant)
    assert type(model.lm_head) is nn.Linear  # transformers keeps the head in full precision
    sl.apply_sos_lora(model, ["q_proj", "v_proj", "lm_head"], num_experts=2, rank=4)
    randomize_adapters(model)
    layers = dict(sl.adapter_layers(model))
    assert len(layers) == 3 and sum(layer.quantized for layer in layers.values()) == 2
    head = model.lm_head.base_layer.weight.detach().clone()
    before, expected = storage(model), exact_logits(model)
    with pytest.raises(RuntimeError, match="model.layers.0.self_attn.q_proj.*and 1 more"):
        sl.merge_and_unload(model)
    with pytest.raises(ValueError, match="dequantize=True"):
        sl.merge_and_unload(model, dtype=torch.float16)
    assert dict(sl.adapter_layers(model)) == layers and not model.lm_head.merged
    assert torch.equal(model.lm_head.base_layer.weight, head)
    assert_same_storage(before, model)
    sl.merge_and_unload(model, dequantize=True)
    assert not list(sl.adapter_layers(model))
    assert type(model.model.layers[0].self_attn.v_proj) is nn.Linear
    assert rel_err(exact_logits(model), expected) < 1e-5


@pytest.mark.parametrize("method,quant", [("sos", q) for q in QUANTS]
                         + [("cps", "nf4-double"), ("cps", "int8")])
def test_quantized_model_trains_saves_and_exports_through_peft(llama_dir, tmp_path, method,
                                                               quant):
    model = quantized_llama(llama_dir, quant)
    if method == "sos":
        sl.apply_sos_lora(model, TARGETS, num_experts=2, rank=4, alpha=8.0)
    else:
        sl.apply_cps_lora(model, TARGETS, num_clusters=2, rank=2, alpha=4.0)
    layers = dict(sl.adapter_layers(model))
    assert len(layers) == 7 and all(quantized.is_quantized_linear(layer.base_layer)
                                     for layer in layers.values())
    before = storage(model)
    data = dict(input_ids=IDS, labels=IDS)
    fit = finetune.train(model, lambda step, generator: data, 8, lr=1e-2, progress=False)
    assert fit.losses[-1] < fit.losses[0] - 0.05
    assert_same_storage(before, model)  # frozen and still quantized
    assert not any(p.requires_grad for layer in layers.values()
                   for p in layer.base_layer.parameters())
    exact, trained = both_logits(model)

    sl.save_adapter(model, tmp_path / "own")
    reloaded = sl.load_adapter(quantized_llama(llama_dir, quant), tmp_path / "own")
    assert [rel_err(a, b) for a, b in zip(both_logits(reloaded), (exact, trained))] == [0, 0]

    sl.export_peft(model, tmp_path / "peft")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", category=UserWarning, module="peft")
        peft_model = peft.PeftModel.from_pretrained(quantized_llama(llama_dir, quant),
                                                    str(tmp_path / "peft"))
    peft_exact, peft_inference = both_logits(peft_model)
    assert rel_err(peft_exact, exact) < 1e-5 and rel_err(peft_inference, trained) < 1e-3
    # Saving and exporting read the adapters only: the bases compute as before.
    assert torch.equal(logits(model), trained)


@pytest.mark.parametrize("quant", QUANTS)
def test_import_of_a_peft_lora_trained_on_a_quantized_model(llama_dir, tmp_path, quant):
    peft_model = peft.get_peft_model(quantized_llama(llama_dir, quant), peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)
    expected, expected_inference = both_logits(peft_model)
    peft_model.save_pretrained(str(tmp_path))
    model = sl.import_peft(quantized_llama(llama_dir, quant), tmp_path, num_experts=2)
    assert len(list(sl.sos_layers(model))) == 3
    assert all(layer.quantized for _, layer in sl.sos_layers(model))
    exact, inference = both_logits(model)
    assert rel_err(exact, expected) < 1e-5 and rel_err(inference, expected_inference) < 1e-3


def test_saving_never_asks_a_cpu_packed_base_for_its_state(tmp_path):
    # bitsandbytes' state_dict() of a CPU-packed 4-bit layer converts it back (scales left in
    # another layout, or re-quantized), changing what it computes from then on.
    model = nn.Sequential(collections.OrderedDict(proj=bnb_linear("nf4", 64, 64)[0]))
    sl.apply_sos_lora(model, ["proj"], num_experts=2, rank=4)
    base = model.proj.base_layer
    base.weight.data, base.weight.quant_state = bnb_functional._convert_weight_packed_for_cpu(
        base.weight.data, base.weight.quant_state)
    before = storage(model)
    sl.save_adapter(model, tmp_path / "own")
    sl.export_peft(model, tmp_path / "peft")
    assert base.weight.quant_state.packing_format_for_cpu
    assert_same_storage(before, model)


# ---- bad input -------------------------------------------------------------------------------
def test_a_layer_not_yet_quantized_is_refused():
    raw4 = bnb.nn.Linear4bit(64, 32, quant_type="nf4")  # quantized on .to(device) only
    with pytest.raises(ValueError, match=r"Linear4bit base is not quantized yet.*\.to\(device\)"):
        sl.SOSLinear(raw4)
    raw8 = bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=False)
    with pytest.raises(ValueError, match="Linear8bitLt base is not quantized yet"):
        sl.CPSLinear(raw8)
    fp16_weights = bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=True).to("cpu")
    with pytest.raises(TypeError, match="has_fp16_weights=True"):
        sl.SOSLinear(fp16_weights)


@pytest.mark.parametrize("quant", ["nf4-double", "int8"])
def test_quantization_state_off_the_weights_device_is_refused(quant):
    base, _ = bnb_linear(quant)
    if quant == "int8":
        base.weight.SCB = base.weight.SCB.to("meta")
        what = "SCB"
    else:
        base.weight.quant_state.absmax = base.weight.quant_state.absmax.to("meta")
        what = "absmax"
    with pytest.raises(ValueError, match=f"quantization state \\({what}\\) is on meta"):
        sl.SOSLinear(base)


def test_an_unknown_quantized_linear_is_refused_by_apply_with_the_model_unchanged():
    model = nn.Sequential(collections.OrderedDict(
        a=bnb_linear("nf4")[0], b=bnb.nn.OutlierAwareLinear(32, 16)))
    with pytest.raises(TypeError, match="'b'.*bitsandbytes OutlierAwareLinear is not a supported"):
        sl.apply_sos_lora(model, ["a", "b"])
    assert not list(sl.adapter_layers(model))


def test_a_torchao_quantized_weight_is_refused():
    # A stand-in for torchao's NF4Tensor (a tensor subclass reporting a float dtype, which an
    # nn.Linear happily runs): torchao is not a dependency.
    stand_in = type("NF4Tensor", (torch.Tensor,),
                    {"__module__": "torchao.quantization.quantize_.workflows.nf4.nf4_tensor"})
    linear = nn.Linear(16, 8)
    linear.weight = nn.Parameter(linear.weight.detach().as_subclass(stand_in),
                                 requires_grad=False)
    assert linear.weight.dtype == torch.float32
    with pytest.raises(TypeError, match="weight is a torchao NF4Tensor"):
        sl.SOSLinear(linear, num_experts=2, rank=2)


def test_importing_the_package_does_not_import_bitsandbytes():
    code = ("import sys, torch, soslora_ext as sl\n"
            "sl.SOSLinear(torch.nn.Linear(8, 8), num_experts=2, rank=2)(torch.randn(2, 8))\n"
            "assert 'bitsandbytes' not in sys.modules\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
