"""Parents that compute with an adapted layer's .weight instead of calling it: apply_* refuses
the torch classes known to do so; any other is reported by a warning on the model's first
training forward, in any loop, without false alarms (eval, no_grad, frozen adapters,
activation checkpointing, torch.compile, MoE experts that get no token)."""
import copy
import pickle
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import BertConfig, BertForSequenceClassification

import soslora_ext as sl
from soslora_ext.layers.bypass import MAX_FORWARDS, AdapterBypassWarning


def snapshot(model):
    return ({n: type(m) for n, m in model.named_modules()},
            {n: (p.requires_grad, p.detach().clone()) for n, p in model.named_parameters()})


def assert_unchanged(model, before):
    modules, params = snapshot(model)
    assert modules == before[0] and params.keys() == before[1].keys()
    for n, (flag, value) in params.items():
        assert flag == before[1][n][0] and torch.equal(value, before[1][n][1]), n


# ---- refused when applying: torch classes known to read a child's weight ---------------------
class WithAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.proj = nn.Linear(16, 4)

    def forward(self, x):
        return self.proj(self.attn(x, x, x)[0])


def test_apply_refuses_the_out_proj_of_multihead_attention():
    # MultiheadAttention passes out_proj.weight to F.multi_head_attention_forward: an adapter
    # on out_proj used to be accepted and then changed nothing.
    model = WithAttention()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"apply_sos_lora: module 'attn.out_proj' is the "
                                         r"out_proj of 'attn', a MultiheadAttention, which "
                                         r"computes with out_proj.weight directly.*Leave "
                                         r"'attn.out_proj' out of target_modules.*adapt the "
                                         r"parent module.*or merge an update"):
        sl.apply_sos_lora(model, ["proj", "out_proj"], num_experts=2, rank=2)
    assert_unchanged(model, before)  # `proj`, a fine target, was not adapted either
    with pytest.raises(ValueError, match="'attn.out_proj' is the out_proj"):
        sl.apply_cps_lora(model, r".*proj", num_clusters=2, rank=1)
    assert_unchanged(model, before)
    sl.apply_sos_lora(model, ["proj"], num_experts=2, rank=2)  # the rest is adaptable
    assert model._forward_hooks  # the watch, until the first training forward
    sl.merge_and_unload(model)  # no adapted layer left: no watch
    assert not model._forward_hooks and not model._forward_pre_hooks


@pytest.mark.parametrize("make, target, child", [
    (lambda: nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), "linear1", "linear1"),
    (lambda: nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), "linear2", "linear2"),
    (lambda: nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), "out_proj", "out_proj"),
    (lambda: nn.LinearCrossEntropyLoss(16, 5), "linear", "linear")])
def test_apply_refuses_other_torch_parents_that_read_a_child_weight(make, target, child):
    # TransformerEncoderLayer's inference fast path (eval, no grad) passes linear1.weight and
    # linear2.weight to one fused op; LinearCrossEntropyLoss reads linear.weight.
    model = nn.Sequential(make())
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"is the {child} of '0(\.self_attn)?'.*would have no "
                                         "effect"):
        sl.apply_sos_lora(model, [target], num_experts=2, rank=2)
    assert_unchanged(model, before)


def test_the_refused_fast_path_really_skips_the_adapter():
    # Why linear1 is refused: with the adapter forced in, eval + no_grad ignores it.
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0).eval()
    adapter = sl.SOSLinear(layer.linear1, num_experts=2, rank=2)
    with torch.no_grad():
        adapter.lora_B.normal_()
        x = torch.randn(2, 5, 16)
        plain = layer(x)
        layer.linear1 = adapter
        assert torch.equal(layer(x), plain)  # the fast path: the adapter changed nothing
    assert not torch.equal(layer(x), plain)  # with grad: the slow path calls it


# ---- found in use: the first training forward ------------------------------------------------
class WeightReadingHead(nn.Module):
    def __init__(self, hidden=8, labels=3):
        super().__init__()
        self.proj = nn.Linear(hidden, labels)

    def forward(self, x):
        return F.linear(x, self.proj.weight, self.proj.bias)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
        self.head = WeightReadingHead()

    def forward(self, x):
        return self.head(self.body(x))


def train_step(model, x=None):
    x = torch.randn(4, 8) if x is None else x
    model.train()
    out = model(x)
    if out.requires_grad:  # not where every adapter is bypassed and the rest frozen
        out.sum().backward()


def test_a_parent_reading_the_weight_is_reported_once_in_a_plain_loop():
    model = Net()
    sl.apply_sos_lora(model, ["body.0", "head.proj"], num_experts=2, rank=2)
    with pytest.warns(AdapterBypassWarning, match=r"adapted layers \['head.proj'\] were not "
                                                  r"called in a training forward although "
                                                  r"their parent module ran"):
        train_step(model)  # a user's own loop: no finetune.train, no Trainer callback
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train_step(model)  # once
    assert not model._forward_hooks and not model._forward_pre_hooks  # the watch is off
    assert not model.head._forward_pre_hooks


def test_a_bert_classifier_that_reads_the_weight_is_reported():
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=64, hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=40, max_position_embeddings=32, num_labels=2))
    model.classifier = WeightReadingHead(24, 2)
    sl.apply_cps_lora(model, ["query", "value", "classifier.proj"], num_clusters=2, rank=1)
    ids = torch.randint(5, 60, (2, 12))
    with pytest.warns(AdapterBypassWarning) as record:
        model.train()(input_ids=ids, labels=torch.tensor([0, 1])).loss.backward()
    assert len(record) == 1 and "['classifier.proj']" in str(record[0].message)


def test_no_alarm_in_eval_mode_without_grad_or_for_frozen_adapters():
    model = Net()
    sl.apply_sos_lora(model, ["head.proj"], num_experts=2, rank=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.eval()(torch.randn(2, 8))  # eval mode, grad enabled
        with torch.no_grad():
            model.train()(torch.randn(2, 8))  # training mode, no grad
        for p in model.head.proj.parameters():
            p.requires_grad_(False)
        model.train()(torch.randn(2, 8))  # a frozen adapter: nothing to train
    for _, p in model.head.proj.named_adapter_parameters():
        p.requires_grad_(True)
    with pytest.warns(AdapterBypassWarning, match="head.proj"):
        train_step(model)  # the watch was still on


class Block(nn.Module):
    def __init__(self, reentrant):
        super().__init__()
        self.reentrant = reentrant
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

    def inner(self, x):
        return self.fc2(torch.relu(self.fc1(x)))

    def forward(self, x):
        return x + checkpoint(self.inner, x, use_reentrant=self.reentrant)


@pytest.mark.parametrize("reentrant", [False, True])
def test_no_alarm_under_activation_checkpointing(reentrant):
    torch.manual_seed(0)
    model = nn.Sequential(Block(reentrant), Block(reentrant))
    sl.apply_sos_lora(model, ["fc1", "fc2"], num_experts=2, rank=2)
    x = torch.randn(3, 8, requires_grad=reentrant)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train_step(model, x)
    assert all(layer.lora_B.grad is not None for _, layer in sl.adapter_layers(model))


def test_no_alarm_with_gradient_checkpointing_of_a_transformers_model():
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=64, hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=40, max_position_embeddings=32, num_labels=2))
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.x
    (enable or model.gradient_checkpointing_enable)()
    sl.apply_sos_lora(model, ["query", "value", "dense"], num_experts=2, rank=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.train()(input_ids=torch.randint(5, 60, (2, 12)),
                      labels=torch.tensor([0, 1])).loss.backward()


def test_no_alarm_under_torch_compile():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    sl.apply_sos_lora(model, ["0", "2"], num_experts=2, rank=2)
    compiled = torch.compile(model, backend="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            compiled(torch.randn(3, 8)).sum().backward()
    assert model[0].lora_B.grad is not None


class Expert(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


class MoE(nn.Module):
    """Top-1 routing: an expert that gets no token is not called at all."""

    def __init__(self, experts=4):
        super().__init__()
        self.router = nn.Linear(8, experts)
        self.experts = nn.ModuleList(Expert() for _ in range(experts))
        self.force: int | None = None  # route every token to this expert

    def forward(self, x):
        choice = self.router(x).argmax(-1) if self.force is None else \
            torch.full(x.shape[:1], self.force)
        out = torch.zeros_like(x)
        for i, expert in enumerate(self.experts):
            rows = (choice == i).nonzero().flatten()
            if rows.numel():
                out[rows] = expert(x[rows])
        return x + out


def test_no_alarm_for_moe_experts_that_get_no_token():
    torch.manual_seed(0)
    model = MoE()
    sl.apply_sos_lora(model, ["up", "down"], num_experts=2, rank=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in range(4):  # one expert per step: the others sit out, their parent too
            model.force = step
            train_step(model)
    assert not model._forward_hooks  # every expert was called once: the watch is off


def test_the_watch_gives_up_after_max_forwards_and_survives_copies():
    torch.manual_seed(0)
    model = MoE()
    sl.apply_sos_lora(model, ["up", "down"], num_experts=2, rank=2)
    model.force = 0
    twin = pickle.loads(pickle.dumps(model))
    for net in (model, copy.deepcopy(model), twin):
        for _ in range(MAX_FORWARDS):  # experts 1-3 never called: unknown, not alarmed
            assert net._forward_hooks
            train_step(net)
        assert not net._forward_hooks
    # A copy's watch watches the copy: a bypass in it is reported.
    net = Net()
    sl.apply_sos_lora(net, ["head.proj"], num_experts=2, rank=2)
    for copied in (copy.deepcopy(net), pickle.loads(pickle.dumps(net))):
        with pytest.warns(AdapterBypassWarning, match="head.proj"):
            train_step(copied)
