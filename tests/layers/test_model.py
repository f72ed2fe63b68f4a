"""apply_sos_lora on transformers models built from configs, schedules, and bad input."""
import pytest
import torch
import torch.nn as nn
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

import soslora_ext as sl

from conftest import make_layer, rel_err


def tiny_llama() -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=56, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def state_snapshot(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_apply_to_llama_only_adapters_train_and_merge_is_exact():
    model = tiny_llama().double()
    ids = torch.randint(0, 96, (2, 9))
    before = model(ids).logits
    sl.apply_sos_lora(model, target_modules=["q_proj", "v_proj"], num_experts=4, rank=8,
                      alpha=16.0, scale_mode="channel", gate=True)
    layers = dict(sl.sos_layers(model))
    assert sorted(layers) == [f"model.layers.{i}.self_attn.{p}" for i in (0, 1)
                              for p in ("q_proj", "v_proj")]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(any(k in n for k in ("lora_A", "lora_B", "expert_scales",
                                                  "gate_logits")) for n in trainable)
    assert rel_err(model(ids).logits, before) < 1e-12  # B = 0: the model is unchanged at init

    n_train, n_total = sl.trainable_parameters(model)
    per_layer = {name: sum(p.numel() for p in l.parameters() if p.requires_grad)
                 for name, l in layers.items()}
    assert n_train == sum(per_layer.values())
    assert n_total == sum(p.numel() for p in model.parameters())

    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(3):
        loss = model(ids, labels=ids).loss + 0.01 * sl.ortho_penalty(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    adapted = model(ids).logits
    assert rel_err(adapted, before) > 1e-6
    sl.merge_and_unload(model)
    assert not list(sl.sos_layers(model))
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear)
    assert rel_err(model(ids).logits, adapted) < 1e-10


def test_apply_with_regex_to_bert():
    cfg = BertConfig(vocab_size=64, hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=40, max_position_embeddings=32)
    model = BertModel(cfg)
    sl.apply_sos_lora(model, target_modules=r".*attention\.self\.(query|value)", num_experts=2,
                      rank=4)
    assert len(list(sl.sos_layers(model))) == 4
    out = model(torch.randint(0, 64, (2, 5))).last_hidden_state
    out.sum().backward()
    layer = model.encoder.layer[0].attention.self.query
    assert isinstance(layer, sl.SOSLinear) and layer.lora_B.grad is not None
    assert model.embeddings.word_embeddings.weight.grad is None


def test_ortho_penalty_model_sum():
    model = tiny_llama()
    sl.apply_sos_lora(model, ["k_proj"], num_experts=2, rank=4)
    layers = [l for _, l in sl.sos_layers(model)]
    with torch.no_grad():
        for l in layers:
            l.lora_A.normal_()
    total = sl.ortho_penalty(model)
    assert total.item() == pytest.approx(sum(l.ortho_penalty().item() for l in layers))


@pytest.mark.parametrize("targets,kwargs,error,match", [
    (["no_such_module"], {}, ValueError, "matches no module"),
    ("q_pr", {}, ValueError, "matches no module"),
    (["act_fn"], {}, TypeError, "not an nn.Linear"),
    (["q_proj", "act_fn"], {}, TypeError, "not an nn.Linear"),
    (["q_proj"], dict(rank=6, num_experts=4), ValueError, "divisible by num_experts"),
    (["q_proj"], dict(dropout=1.0), ValueError, "dropout"),
    ([], {}, ValueError, "target_modules"),
    (None, {}, ValueError, "target_modules"),
])
def test_apply_bad_input_changes_nothing(targets, kwargs, error, match):
    model = tiny_llama()
    before = state_snapshot(model)
    grads_before = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(error, match=match):
        sl.apply_sos_lora(model, targets, **{"num_experts": 2, "rank": 4, **kwargs})
    assert not list(sl.sos_layers(model))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads_before
    after = state_snapshot(model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in after)


def test_apply_twice_refuses():
    model = tiny_llama()
    sl.apply_sos_lora(model, ["q_proj"], num_experts=2, rank=4)
    with pytest.raises(ValueError, match="already has an adapter"):
        sl.apply_sos_lora(model, ["q_proj"], num_experts=2, rank=4)


# ---- layer bad input ------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    (dict(rank=6, num_experts=4), "rank=6 must be divisible by num_experts=4"),
    (dict(rank=0), "rank must be a positive int"),
    (dict(rank=-4), "rank must be a positive int"),
    (dict(rank=4.0), "rank must be a positive int"),
    (dict(alpha=0.0), "alpha must be a positive"),
    (dict(alpha=-1.0), "alpha must be a positive"),
    (dict(num_experts=0), "num_experts must be a positive int"),
    (dict(gamma_max=0.5), "gamma_max must be a number >= 1"),
    (dict(dropout=-0.1), r"dropout must be in \[0, 1\)"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
    (dict(rank_mode="per_expert"), "rank_mode must be one of"),
    (dict(scale_base="layer"), "scale_base must be one of"),
    (dict(scale_mode="learned"), "scale_mode must be one of"),
    (dict(dropout_position="preA"), "dropout_position must be one of"),
    (dict(loraplus_ratio=0.0), "loraplus_ratio must be a positive"),
    (dict(init_gain=0.0), "init_gain must be a positive"),
    (dict(scale_anchor=0.1), "scale_anchor > 0 needs scale_mode='channel'"),
    (dict(uniform_prior=0.1), "uniform_prior > 0 needs gate=True"),
    (dict(gate="yes"), "gate must be a bool"),
    (dict(dtype=torch.int32), "dtype must be a floating-point"),
])
def test_layer_bad_hyperparameters(kwargs, match):
    base = nn.Linear(8, 6)
    w = base.weight.detach().clone()
    with pytest.raises(ValueError, match=match):
        sl.SOSLinear(base, **{"num_experts": 2, "rank": 4, **kwargs})
    assert torch.equal(base.weight, w) and base.weight.requires_grad


def test_layer_bad_base():
    with pytest.raises(TypeError,
                       match=r"base must be an nn.Linear \(or a transformers Conv1D\), "
                             r"nn.Embedding, nn.Conv1d/2d/3d or nn.MultiheadAttention, got "
                             r"LayerNorm"):
        sl.SOSLinear(nn.LayerNorm(4))


def test_layer_bad_inputs():
    layer = make_layer(8, 6, num_experts=2, rank=4)
    with pytest.raises(ValueError, match=r"last dimension in_features=8, got shape \(3, 7\)"):
        layer(torch.randn(3, 7, dtype=torch.float64))
    with pytest.raises(ValueError, match="last dimension"):
        layer(torch.tensor(1.0, dtype=torch.float64))
    with pytest.raises(ValueError, match="is on meta but the layer is on cpu"):
        layer(torch.randn(3, 8, device="meta"))


# ---- schedules -------------------------------------------------------------------------------
def test_ortho_schedule_values_and_buffers():
    model = tiny_llama()
    sl.apply_sos_lora(model, ["q_proj", "v_proj"], num_experts=2, rank=4)
    sched = sl.OrthoSchedule(model, lambda_max=0.006, delay=0.15, ramp=0.20, total_steps=100)
    values = [0.0] + [sched.step() for _ in range(100)]
    assert values[:16] == [0.0] * 16
    assert values[25] == pytest.approx(0.006 * 10 / 20)
    assert values[35:] == [pytest.approx(0.006)] * 66
    assert all(l.ortho_lambda.item() == pytest.approx(0.006) for _, l in sl.sos_layers(model))
    resumed = sl.OrthoSchedule(model, lambda_max=0.006, total_steps=100)
    resumed.load_state_dict({"last_step": 20})
    assert all(l.ortho_lambda.item() == pytest.approx(0.006 * 5 / 20)
               for _, l in sl.sos_layers(model))


def test_gate_schedule_values_and_buffers():
    model = tiny_llama()
    sl.apply_sos_lora(model, ["q_proj"], num_experts=2, rank=4, gate=True)
    sched = sl.GateSchedule(model, start=2.0, end=1.0, anneal=0.30, total_steps=10)
    assert all(l.gate_temperature.item() == 2.0 for _, l in sl.sos_layers(model))
    values = [sched.step() for _ in range(10)]
    assert values[0] == pytest.approx(2.0 - 1 / 3) and values[2:] == [1.0] * 8
    assert all(l.gate_temperature.item() == 1.0 for _, l in sl.sos_layers(model))


@pytest.mark.parametrize("make,match", [
    (lambda m: sl.OrthoSchedule(nn.Linear(2, 2), total_steps=10), "no SOSLinear"),
    (lambda m: sl.OrthoSchedule(m, lambda_max=-1, total_steps=10), "lambda_max"),
    (lambda m: sl.OrthoSchedule(m, delay=1.5, total_steps=10), "delay"),
    (lambda m: sl.OrthoSchedule(m, total_steps=0), "total_steps"),
    (lambda m: sl.GateSchedule(m, total_steps=10), "gate=True"),
    (lambda m: sl.GateSchedule(m, start=0, total_steps=10), "start temperature"),
])
def test_schedule_bad_input(make, match):
    model = tiny_llama()
    sl.apply_sos_lora(model, ["q_proj"], num_experts=2, rank=4)
    with pytest.raises(ValueError, match=match):
        make(model)


def test_training_with_schedules_reduces_loss():
    torch.manual_seed(0)
    model = tiny_llama()
    with torch.no_grad():  # a head large enough for confident predictions through frozen weights
        model.lm_head.weight.normal_(0, 0.3)
    sl.apply_sos_lora(model, ["q_proj", "v_proj", "up_proj", "down_proj"], num_experts=4, rank=8,
                      alpha=16.0,
                      gate=True, scale_mode="channel", dropout=0.05)
    model.train()
    ids = (torch.randint(0, 96, (4, 1)) + torch.arange(16)) % 96  # next token = token + 1
    steps = 40
    ortho = sl.OrthoSchedule(model, lambda_max=0.006, total_steps=steps)
    gate = sl.GateSchedule(model, total_steps=steps)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        ortho.step()
        gate.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses


def test_tied_weight_refuses_merge_and_model_stays_intact():
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=56, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    sl.apply_sos_lora(model, ["lm_head", "q_proj"], num_experts=2, rank=4)
    head = model.lm_head
    assert head.weight_shared_with == ["model.embed_tokens.weight"]
    with torch.no_grad():
        head.lora_B.normal_()
    embeddings = model.model.embed_tokens.weight.detach().clone()
    with pytest.raises(RuntimeError, match=r"shared with \['model.embed_tokens.weight'\]"):
        head.merge()
    with pytest.raises(RuntimeError, match="layer 'lm_head': the weight is shared with"):
        sl.merge_and_unload(model)
    assert isinstance(model.model.layers[0].self_attn.q_proj, sl.SOSLinear)  # nothing merged
    assert torch.equal(model.model.embed_tokens.weight, embeddings)
    # The untied layer merges as usual, and the adapted model still runs unmerged.
    model.model.layers[0].self_attn.q_proj.merge()
    with torch.no_grad():  # a merged layer serves inference only
        model(torch.randint(0, 96, (1, 5)))


def test_check_finite_names_the_layer():
    model = tiny_llama()
    sl.apply_sos_lora(model, ["q_proj"], num_experts=2, rank=4)
    sl.check_finite(model)
    layer = model.model.layers[1].self_attn.q_proj
    layer.lora_B.grad = torch.full_like(layer.lora_B, float("nan"))
    with pytest.raises(FloatingPointError, match="'model.layers.1.self_attn.q_proj': the gradient "
                                                 "of lora_B"):
        sl.check_finite(model)
    layer.lora_B.grad = None
    with torch.no_grad():
        layer.lora_A[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="lora_A has non-finite"):
        sl.check_finite(model)
