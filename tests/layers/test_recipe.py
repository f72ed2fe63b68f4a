"""The "official" preset (the SOS-LoRA authors' recipe) and the decisions where our layer and
schedules differ from, or follow, the authors' code: checked against an independent float64
model of the authors' layer, and through the API, SOSConfig, the Trainer callback and the CLI."""
import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from transformers import LlamaConfig, LlamaForCausalLM

import soslora_ext as sl
from soslora_ext.cli import build_parser
from soslora_ext.cli.args import CliError, train_layer_kwargs
from soslora_ext.layers.config import PRESET_SCHEDULES, PRESET_TRAINING_ARGUMENTS, PRESETS
from soslora_ext.ops import reference

from conftest import make_layer, oracle_forward, rel_err, restamp_adapter

F64 = torch.float64
# Numbers of scripts/metamath_llama2_7b/run_sos-lora.sh (their argument names in comments).
OFFICIAL = dict(rank=128, alpha=128.0, num_experts=4, rank_mode="total", normalize_scales=True,
                gamma_max=2.5, scale_base="expert", dropout=0.05, dropout_position="post",
                scale_anchor=1e-4,     # scale_anchor_beta
                uniform_prior=2e-4,    # gate_uniform_prior
                loraplus_ratio=2.0,    # loraplus_lr_ratio
                gate_temperature=2.0)  # gate_temperature_start
OFFICIAL_SCHEDULES = dict(lambda_max=0.006, delay=0.15, ramp=0.20,  # lambda_orth, orth_*_ratio
                          gate_start=2.0, gate_end=1.0, gate_anneal=0.30)


# ---- an independent model of the authors' layer --------------------------------------------
class _OrthoGradient(torch.autograd.Function):
    """Identity on A [K, r, in]; the backward adds lam * d(penalty)/dA, at every call."""

    @staticmethod
    def forward(ctx, A, lam):
        ctx.save_for_backward(A)
        ctx.lam = lam
        return A.view_as(A)

    @staticmethod
    def backward(ctx, grad):
        (A,) = ctx.saved_tensors
        with torch.enable_grad():
            a = A.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(reference.ortho_penalty(list(a.unbind(0))), a)
        return grad + ctx.lam * g, None


class _GateWithPrior(torch.autograd.Function):
    """g = K softmax(l / T); backward: the softmax Jacobian plus prior * (p - 1/K) / T."""

    @staticmethod
    def forward(ctx, logits, T, prior):
        p = torch.softmax(logits / T, dim=0)
        ctx.save_for_backward(p)
        ctx.T, ctx.prior = T, prior
        return p.numel() * p

    @staticmethod
    def backward(ctx, grad_g):
        (p,) = ctx.saved_tensors
        K, T = p.numel(), ctx.T
        grad_p = K * grad_g
        task = (grad_p - (grad_p * p).sum()) * p / T
        return task + ctx.prior * (p - 1 / K) / T, None, None


class AuthorsLayer(nn.Module):
    """The authors' SOS-LoRA layer, float64, no dropout: per-expert A [K, r, in] and
    B [K, out, r], trainable channel scales [K, out] with the anchor pull added to their
    gradient once per backward (a parameter hook), the mean-1 gate with its uniform prior,
    LoRA+ dividing A's whole gradient (only for ratios > 1), and the orthogonality gradient
    added to A's at every call in training mode."""

    def __init__(self, base, A, B, scales, fixed, logits, T, lam, anchor, prior, ratio):
        super().__init__()
        self.base = base
        self.A, self.B = nn.Parameter(A), nn.Parameter(B)
        self.scales, self.logits = nn.Parameter(scales), nn.Parameter(logits)
        self.T, self.lam, self.prior = T, lam, prior
        if anchor > 0:
            self.scales.register_hook(lambda g: g + anchor * (self.scales.detach() - fixed))
        if ratio > 1:
            self.A.register_hook(lambda g: g / ratio)

    def forward(self, x):  # x [N, in]
        A = _OrthoGradient.apply(self.A, self.lam) if self.training and self.lam > 0 else self.A
        h = torch.einsum("ni,kri->nkr", x, A)
        per_expert = torch.einsum("nkr,kor->nko", h, self.B)
        g = _GateWithPrior.apply(self.logits, self.T, self.prior)
        return self.base(x) + (per_expert * (self.scales * g[:, None])).sum(dim=1)


def authors_copy(layer: sl.SOSLinear, lam: float) -> AuthorsLayer:
    """The authors' layer holding copies of `layer`'s parameters, in their layout."""
    c, K, r = layer.config, layer.num_experts, layer.config.r_expert
    A = layer.lora_A.detach().reshape(K, r, layer.in_features).clone()
    B = layer.lora_B.detach().reshape(layer.out_features, K, r).permute(1, 0, 2).clone()
    fixed = torch.tensor(c.fixed_scales(), dtype=F64)[:, None]
    return AuthorsLayer(layer.base_layer, A, B, layer.expert_scales.detach().clone(), fixed,
                        layer.gate_logits.detach().clone(), float(layer.gate_temperature), lam,
                        c.scale_anchor, c.uniform_prior, c.loraplus_ratio)


def official_layer(n_in=12, n_out=10, **overrides) -> sl.SOSLinear:
    """The preset's layer on a float64 base (factors float64: the base dtype), with every
    trainable tensor moved off its initial value so that every gradient term matters."""
    base = nn.Linear(n_in, n_out, dtype=F64)
    layer = sl.SOSLinear(base, **sl.SOSConfig.preset("official", **overrides).to_dict())
    with torch.no_grad():
        layer.lora_A.add_(0.3 * torch.randn_like(layer.lora_A))  # off the orthogonal init
        layer.lora_B.normal_(0, 0.5)
        layer.expert_scales.mul_(torch.rand_like(layer.expert_scales) + 0.5)
        layer.gate_logits.normal_(0, 0.5)
    return layer


# ---- point by point: the preset's layer is the authors' layer --------------------------------
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval-with-grad"])
def test_official_preset_layer_matches_the_authors_layer(training):
    # Large anchor / prior / lambda than the recipe's, so a missing or doubled term shows.
    layer = official_layer(rank=8, dropout=0.0, scale_anchor=0.3, uniform_prior=0.4)
    assert layer.lora_A.dtype == F64 and layer.expert_scales.dtype == F64
    lam = 0.7
    layer.ortho_lambda.fill_(lam)
    theirs = authors_copy(layer, lam)
    layer.train(training)
    theirs.train(training)
    x = torch.randn(6, 12, dtype=F64)
    grad = 0.01 * torch.randn(6, 10, dtype=F64)  # task gradients the size of the extra terms
    y, y_theirs = layer(x), theirs(x)
    assert rel_err(y, y_theirs) < 1e-12
    y.backward(grad)
    y_theirs.backward(grad)
    K, r = 4, 2
    pairs = {"lora_A": (layer.lora_A.grad, theirs.A.grad.reshape(K * r, 12)),
             "lora_B": (layer.lora_B.grad, theirs.B.grad.permute(1, 0, 2).reshape(10, K * r)),
             "expert_scales": (layer.expert_scales.grad, theirs.scales.grad),
             "gate_logits": (layer.gate_logits.grad, theirs.logits.grad)}
    for name, (ours, want) in pairs.items():
        assert rel_err(ours, want) < 1e-10, name

    # Each extra term is really there: without it the gradients differ.
    for attr, value in (("lam", 0.0), ("prior", 0.0)):
        other = authors_copy(layer, lam)
        setattr(other, attr, value)
        other.train(training)
        other(x).backward(grad)
        changed = (other.A.grad if attr == "lam" else other.logits.grad)
        ours = (layer.lora_A.grad.reshape(K, r, 12) if attr == "lam" else layer.gate_logits.grad)
        # Far above the 1e-10 agreement; the orthogonality term only in training.
        assert (rel_err(ours, changed) > 1e-6) == (training or attr == "prior"), attr


def test_official_fixed_scales_temperature_dtypes_and_fields():
    config = sl.SOSConfig.preset("official")
    for name, value in OFFICIAL.items():
        assert getattr(config, name) == value, name
    assert config.scale_mode == "channel" and config.gate and config.factor_dtype == "base"
    # gamma = linspace(1, gamma_max, K) / mean, times alpha / r_expert (scale_base expert).
    gamma = torch.linspace(1.0, 2.5, 4, dtype=F64)
    want = gamma / gamma.mean() * (128.0 / 32)
    assert config.fixed_scales() == pytest.approx(want.tolist(), rel=1e-12)

    base = nn.Linear(64, 48, dtype=torch.bfloat16)
    layer = sl.SOSLinear(base, **config.to_dict())
    assert layer.gate_temperature.item() == 2.0
    assert rel_err(layer.fixed_scales, want) < 1e-7
    assert rel_err(layer.expert_scales, want[:, None].expand(4, 48)) < 1e-7
    # Factors in the base dtype (as the authors' layer.bfloat16()); scales and gate float32.
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.bfloat16
    assert layer.expert_scales.dtype == layer.gate_logits.dtype == torch.float32
    assert sl.SOSLinear(nn.Linear(64, 48, dtype=torch.bfloat16), dtype=torch.float32,
                        **config.to_dict()).lora_A.dtype == torch.float32  # explicit dtype wins
    assert sl.SOSLinear(nn.Linear(64, 48, dtype=torch.bfloat16)).lora_A.dtype == torch.float32
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    layer(x).float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for _, p in layer.named_adapter_parameters())


def test_official_schedules_through_the_callback():
    # The authors' callbacks, written out: lambda 0 until int(0.15 M), a ramp over int(0.2 M)
    # steps to 0.006; temperature 2 -> 1 over int(0.3 M) steps. Written as is into every layer
    # (no division by the accumulation steps: "micro_batch").
    from soslora_ext.integrations import SOSLoRACallback

    M = 100

    def lam(step):
        delay, ramp = int(M * 0.15), int(M * 0.20)
        return 0.0 if step < delay else 0.006 * min(max((step - delay) / max(1, ramp), 0), 1)

    def temperature(step):
        return 2.0 + min(max(step / max(1, int(M * 0.30)), 0.0), 1.0) * (1.0 - 2.0)

    steps = [0, 14, 15, 16, 25, 34, 35, 36, 29, 30, 31, 50, 99, 100]
    seen = {}
    for preset in ("official", "default"):
        model = nn.Sequential(official_layer(rank=8))
        callback = SOSLoRACallback(preset=preset)
        args, state = SimpleNamespace(gradient_accumulation_steps=8), SimpleNamespace(
            max_steps=M, global_step=0)
        callback.on_train_begin(args, state, None, model=model)
        for step in steps:
            state.global_step = step
            callback.on_step_begin(args, state, None)
            seen[preset, step] = (model[0].ortho_lambda.item(), model[0].gate_temperature.item())
    for step in steps:
        assert seen["official", step][0] == pytest.approx(lam(step), abs=1e-12), step
        assert seen["default", step][0] == pytest.approx(lam(step) / 8, abs=1e-12), step
        assert seen["official", step][1] == pytest.approx(temperature(step), abs=1e-7), step
        assert seen["default", step][1] == seen["official", step][1]
    assert PRESET_SCHEDULES["official"] == dict(OFFICIAL_SCHEDULES, lambda_per="micro_batch")


def test_callback_preset_arguments():
    from soslora_ext.integrations import SOSLoRACallback

    cb = SOSLoRACallback(preset="official", lambda_max=0.01, gate_anneal=0.5)
    assert cb.ortho_kwargs == dict(lambda_max=0.01, delay=0.15, ramp=0.20,
                                   lambda_per="micro_batch")
    assert cb.gate_kwargs == dict(start=2.0, end=1.0, anneal=0.5)
    assert SOSLoRACallback(preset="official", lambda_per="optimizer_step").ortho_kwargs[
        "lambda_per"] == "optimizer_step"
    assert SOSLoRACallback().ortho_kwargs["lambda_per"] == "optimizer_step"
    with pytest.raises(ValueError, match=r"SOSLoRACallback: preset must be one of "
                                         r"\['default', 'official'\], got 'offical'"):
        SOSLoRACallback(preset="offical")
    with pytest.raises(ValueError, match="lambda_per must be one of"):
        SOSLoRACallback(lambda_per="step")


def test_official_preset_trainer_run_with_gradient_accumulation(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

    from helpers import Recorder, Rows

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=64, hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=40, max_position_embeddings=32, num_labels=2))
    sl.apply_sos_lora(model, ["query", "value"], modules_to_save=["classifier"],
                      preset="official", rank=8)
    layer = model.bert.encoder.layer[0].attention.self.query
    recorder = Recorder(layer)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=10, per_device_train_batch_size=4,
                             gradient_accumulation_steps=2, learning_rate=1e-3, logging_steps=5,
                             report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=Rows(32),
            callbacks=[sl.SOSLoRACallback(preset="official"), recorder]).train()
    for step, (lam, temperature) in recorder.seen.items():
        want = 0.0 if step < 1 else 0.006 * min((step - 1) / 2, 1.0)  # delay 1, ramp 2 steps
        assert lam == pytest.approx(want, abs=1e-9), step  # per micro-batch, not / 2
        assert temperature == pytest.approx(2.0 - min(step / 3, 1.0), abs=1e-6), step


def test_training_arguments_of_the_preset_are_trainer_arguments(tmp_path):
    from transformers import TrainingArguments

    kwargs = dict(PRESET_TRAINING_ARGUMENTS["official"])
    assert kwargs.pop("bf16") is True  # needs a bf16-capable device, not checked here
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], **kwargs)
    assert (args.learning_rate, args.gradient_accumulation_steps, args.warmup_steps) == \
        (2e-5, 8, 0.03)
    assert args.lr_scheduler_type == "cosine"


# ---- item 1: normalize_scales ----------------------------------------------------------------
def test_normalize_scales_forced_or_tied_to_rank_mode():
    common = dict(rank=64, alpha=128.0, num_experts=4)
    assert sl.SOSConfig(rank_mode="total", normalize_scales=False, **common).fixed_scales() == \
        pytest.approx([8.0, 12.0, 16.0, 20.0])
    tied = sl.SOSConfig(rank_mode="total", **common).fixed_scales()
    assert tied == pytest.approx([32 / 7, 48 / 7, 64 / 7, 80 / 7])
    assert sl.SOSConfig(rank_mode="total", normalize_scales=True, **common).fixed_scales() == \
        pytest.approx(tied)
    assert sl.SOSConfig(rank_mode="expert", **common).fixed_scales() == \
        pytest.approx([2.0, 3.0, 4.0, 5.0])
    assert sl.SOSConfig(rank_mode="expert", normalize_scales=True, **common).fixed_scales() == \
        pytest.approx([2 / 1.75, 3 / 1.75, 4 / 1.75, 5 / 1.75])
    layer = sl.SOSLinear(nn.Linear(8, 4), rank_mode="total", normalize_scales=False, **common)
    assert layer.fixed_scales.tolist() == pytest.approx([8.0, 12.0, 16.0, 20.0])


# ---- item 2: gate_temperature ----------------------------------------------------------------
def test_gate_temperature_initial_value_and_validation():
    layer = make_layer(9, 5, num_experts=2, rank=4, gate=True, gate_temperature=0.5,
                       random_b=False)
    assert layer.gate_temperature.item() == 0.5
    assert make_layer(9, 5, num_experts=2, rank=4, gate=True,
                      random_b=False).gate_temperature.item() == 1.0
    for bad in (0, -1.0, float("nan"), "2", True):
        with pytest.raises(ValueError, match="gate_temperature must be a number > 0"):
            sl.SOSConfig(gate=True, gate_temperature=bad)
    with pytest.raises(ValueError, match="gate_temperature=2.0 needs gate=True"):
        sl.SOSConfig(gate_temperature=2.0)


# ---- item 3: LoRA+ also in eval mode; orthogonality only in training -------------------------
@pytest.mark.parametrize("training", [True, False])
def test_loraplus_applies_in_both_modes_orthogonality_only_in_training(training):
    ratio, lam = 3.0, 0.37
    layer = make_layer(10, 6, num_experts=2, rank=4, loraplus_ratio=ratio)
    with torch.no_grad():
        layer.lora_A.normal_()  # off the orthogonal init, where the penalty's gradient is zero
    layer.ortho_lambda.fill_(lam)
    layer.train(training)
    x, grad = torch.randn(5, 10, dtype=F64), torch.randn(5, 6, dtype=F64)
    layer(x).backward(grad)
    A = layer.lora_A.detach().clone().requires_grad_(True)
    params = dict(layer.named_parameters(), lora_A=A)
    loss = (oracle_forward(layer, x, params=params) * grad).sum()
    if training:
        loss = loss + lam * reference.ortho_penalty([A[s] for s in layer.expert_ranges])
    (want,) = torch.autograd.grad(loss, A)
    assert rel_err(layer.lora_A.grad, want / ratio) < 1e-12
    layer.lora_A.grad = None
    with torch.no_grad():  # no graph, nothing to divide: the forward still works
        assert layer(x).shape == (5, 6)


# ---- item 4: scale anchor per call ------------------------------------------------------------
def test_scale_anchor_is_added_once_per_call():
    beta = 0.25
    layer = make_layer(9, 5, num_experts=3, rank=6, scale_mode="channel", scale_anchor=beta)
    fixed = torch.tensor(layer.config.fixed_scales(), dtype=F64)[:, None]
    pull = beta * (layer.expert_scales.detach() - fixed)
    assert pull.abs().max() > 1e-2
    x1, x2 = torch.randn(4, 9, dtype=F64), torch.randn(3, 9, dtype=F64)
    g1, g2 = torch.randn(4, 5, dtype=F64), torch.randn(3, 5, dtype=F64)
    for inputs in ([(x1, g1)], [(x1, g1), (x2, g2)]):
        layer.expert_scales.grad = None
        sum((layer(x) * g).sum() for x, g in inputs).backward()
        scales = layer.expert_scales.detach().clone().requires_grad_(True)
        params = dict(layer.named_parameters(), expert_scales=scales)
        task = sum((oracle_forward(layer, x, params=params) * g).sum() for x, g in inputs)
        (want,) = torch.autograd.grad(task, scales)
        # Called once: task + beta (s - s0), the authors' once-per-backward pull. Called
        # twice in one forward: the pull appears twice.
        assert rel_err(layer.expert_scales.grad, want + len(inputs) * pull) < 1e-12


# ---- item 5: LoRA+ ratio <= 1 applies --------------------------------------------------------
def test_loraplus_ratio_below_one_multiplies_the_gradient():
    grads = {}
    for ratio in (1.0, 0.5):
        torch.manual_seed(7)
        layer = make_layer(10, 6, num_experts=2, rank=4, loraplus_ratio=ratio)
        x = torch.randn(5, 10, dtype=F64)
        layer(x).square().sum().backward()
        grads[ratio] = layer.lora_A.grad
    assert grads[1.0].abs().max() > 0
    assert torch.equal(grads[0.5], 2 * grads[1.0])


# ---- item 6: lambda under gradient accumulation ----------------------------------------------
@pytest.mark.parametrize("lambda_per,weight", [("optimizer_step", 1), ("micro_batch", 4)])
def test_lambda_per_optimizer_step_or_micro_batch_with_real_accumulation(lambda_per, weight):
    accumulation, lam = 4, 1.0
    layer = make_layer(10, 6, num_experts=2, rank=4, alpha=2.0)
    with torch.no_grad():
        layer.lora_A.normal_()
    model = nn.Sequential(layer)
    sl.OrthoSchedule(model, lambda_max=lam, delay=0.0, ramp=0.0, total_steps=10,
                     accumulation_steps=accumulation, lambda_per=lambda_per)
    batches = [(torch.randn(3, 10, dtype=F64), torch.randn(3, 6, dtype=F64))
               for _ in range(accumulation)]
    for x, target in batches:  # as Trainer: each micro-batch's mean loss / accumulation
        ((model(x) - target).square().mean() / accumulation).backward()
    A = layer.lora_A.detach().clone().requires_grad_(True)
    params = dict(layer.named_parameters(), lora_A=A)
    task = sum((oracle_forward(layer, x, params=params) - t).square().mean()
               for x, t in batches) / accumulation
    penalty = reference.ortho_penalty([A[s] for s in layer.expert_ranges])
    (want,) = torch.autograd.grad(task + weight * lam * penalty, A, retain_graph=True)
    assert rel_err(layer.lora_A.grad, want) < 1e-12
    (other,) = torch.autograd.grad(task + (5 - weight) * lam * penalty, A)  # the other mode
    assert rel_err(layer.lora_A.grad, other) > 1e-6


def test_ortho_schedule_lambda_per_validation():
    model = nn.Sequential(make_layer(10, 6, num_experts=2, rank=4))
    with pytest.raises(ValueError, match=r"lambda_per must be one of \('optimizer_step', "
                                         r"'micro_batch'\), got 'micro'"):
        sl.OrthoSchedule(model, total_steps=10, lambda_per="micro")


# ---- SOSConfig.preset --------------------------------------------------------------------------
def test_preset_names_overrides_and_errors():
    assert sl.SOSConfig.preset("default") == sl.SOSConfig()
    assert PRESETS["default"] == sl.SOSConfig().to_dict()
    assert sl.SOSConfig.preset("official", rank=32).rank == 32
    assert sl.SOSConfig.preset("official", rank=32).alpha == 128.0  # the preset's, unchanged
    with pytest.raises(ValueError, match=r"SOSConfig.preset: name must be one of "
                                         r"\['default', 'official'\], got 'authors'"):
        sl.SOSConfig.preset("authors")
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['ranks'\]"):
        sl.SOSConfig.preset("official", ranks=8)
    with pytest.raises(ValueError, match="rank=6 must be divisible by num_experts=4"):
        sl.SOSConfig.preset("official", rank=6)
    # Switching a feature off drops the preset's settings that act only through it.
    plain = sl.SOSConfig.preset("official", gate=False, scale_mode="fixed")
    assert (plain.uniform_prior, plain.gate_temperature, plain.scale_anchor) == (0.0, 1.0, 0.0)
    assert plain.loraplus_ratio == 2.0 and plain.dropout == 0.05
    with pytest.raises(ValueError, match="uniform_prior > 0 needs gate=True"):
        sl.SOSConfig.preset("official", gate=False, uniform_prior=1e-3)  # explicit: refused


def test_old_configs_load_with_todays_behaviour(tmp_path):
    old_fields = ["num_experts", "rank", "alpha", "gamma_max", "rank_mode", "scale_base",
                  "scale_mode", "gate", "scale_anchor", "uniform_prior", "loraplus_ratio",
                  "dropout", "dropout_position", "init_gain"]
    old = {k: v for k, v in sl.SOSConfig(rank=8, gate=True).to_dict().items() if k in old_fields}
    config = sl.SOSConfig(**old)
    assert (config.normalize_scales, config.gate_temperature, config.factor_dtype) == \
        (None, 1.0, "peft")
    assert config.fixed_scales() == pytest.approx(sl.SOSConfig(rank=8).fixed_scales())

    model = tiny_llama()
    sl.apply_sos_lora(model, ["q_proj"], num_experts=2, rank=4, gate=True)
    with torch.no_grad():
        for _, layer in sl.sos_layers(model):
            layer.lora_B.normal_()
            layer.gate_temperature.fill_(1.5)
    sl.save_adapter(model, tmp_path / "a")
    new_fields = ("normalize_scales", "gate_temperature", "factor_dtype")
    restamp_adapter(tmp_path / "a", lambda c: [
        m["config"].pop(k) for m in c["modules"].values() for k in new_fields])
    loaded = sl.load_adapter(tiny_llama(), tmp_path / "a")
    ids = torch.randint(0, 96, (2, 6))
    with torch.no_grad():
        assert rel_err(loaded(ids).logits, model(ids).logits) < 1e-6
    assert all(l.gate_temperature.item() == 1.5 for _, l in sl.sos_layers(loaded))


def tiny_llama(dtype=torch.float32):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=56, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).to(dtype).eval()


# ---- the API -----------------------------------------------------------------------------------
def test_apply_sos_lora_with_the_official_preset(tmp_path):
    model = tiny_llama(torch.bfloat16)
    sl.apply_sos_lora(model, ["q_proj", "down_proj"], preset="official", rank=8)
    layers = dict(sl.sos_layers(model))
    assert len(layers) == 2
    for layer in layers.values():
        assert layer.config == sl.SOSConfig.preset("official", rank=8)
        assert layer.lora_A.dtype == torch.bfloat16 and layer.expert_scales.dtype == torch.float32
        assert layer.gate_temperature.item() == 2.0
    model.train()
    ids = torch.randint(0, 96, (2, 6))
    model(ids, labels=ids).loss.backward()
    sl.check_finite(model)
    sl.save_adapter(model, tmp_path / "a")
    loaded = sl.load_adapter(tiny_llama(torch.bfloat16), tmp_path / "a")
    assert all(l.config == sl.SOSConfig.preset("official", rank=8) and
               l.lora_A.dtype == torch.bfloat16 for _, l in sl.sos_layers(loaded))

    f32 = tiny_llama(torch.bfloat16)
    sl.apply_sos_lora(f32, ["q_proj"], preset="official", rank=8, dtype=torch.float32)
    assert all(l.lora_A.dtype == torch.float32 for _, l in sl.sos_layers(f32))
    with pytest.raises(ValueError, match=r"apply_sos_lora: preset must be one of"):
        sl.apply_sos_lora(tiny_llama(), ["q_proj"], preset="paper")


# ---- the command line ----------------------------------------------------------------------------
def cli_layer(*options):
    args = build_parser().parse_args(["train", "M", "--data", "d", "--out", "o", *options])
    return train_layer_kwargs(args)


def test_cli_layer_options_from_the_preset():
    # The default preset keeps the command line's own defaults.
    assert cli_layer() == sl.SOSConfig(num_experts=4, rank=16, alpha=32.0).to_dict()
    assert cli_layer("--rank", "8", "--gate") == sl.SOSConfig(rank=8, alpha=16.0,
                                                               gate=True).to_dict()
    assert cli_layer("--preset", "official") == PRESETS["official"]
    assert cli_layer("--preset", "official", "--rank", "16", "--dropout", "0") == \
        sl.SOSConfig.preset("official", rank=16, dropout=0.0).to_dict()
    plain = cli_layer("--preset", "official", "--no-gate", "--scale-mode", "fixed")
    assert not plain["gate"] and plain["uniform_prior"] == 0 and plain["scale_anchor"] == 0
    with pytest.raises(CliError, match="--experts: rank=128 must be divisible by num_experts=3"):
        cli_layer("--preset", "official", "--experts", "3")
    with pytest.raises(CliError, match="--preset official: presets are SOS-LoRA recipes"):
        cli_layer("--preset", "official", "--method", "cps")
    assert cli_layer("--method", "cps")["rank"] == 16


def test_cli_train_with_the_official_preset(tmp_path):
    from soslora_ext.formats.native import read_adapter_config

    from helpers import classification_data, run_cli, tiny_dir

    model_dir, _ = tiny_dir(tmp_path)
    data = classification_data(tmp_path / "data.jsonl")
    out = tmp_path / "run"
    assert run_cli("train", model_dir, "--data", data, "--out", out, "--steps", 3, "--rank", 8,
                   "--max-length", 16, "--preset", "official", "--log-every", 0) == 0
    config = read_adapter_config(out / "adapter")
    assert config["metadata"]["preset"] == "official"
    assert json.loads((out / "metrics.json").read_text())["preset"] == "official"
    layers = config["modules"].values()
    assert layers and all(m["config"] == sl.SOSConfig.preset("official", rank=8).to_dict()
                          for m in layers)
