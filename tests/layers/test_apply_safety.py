"""apply_sos_lora / apply_cps_lora check every target before changing the model, keep earlier
modules_to_save trainable, refuse bases that cannot work; an adapter its parent never calls
(the parent reads .weight) is reported after the first training step."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainingArguments,
)

import soslora_ext as sl
from soslora_ext.apps import finetune
from soslora_ext.layers.bypass import AdapterBypassWarning


def llama(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=56, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def snapshot(model):
    return ({n: type(m) for n, m in model.named_modules()},
            {n: (p.requires_grad, p.detach().clone()) for n, p in model.named_parameters()})


def assert_unchanged(model, before):
    modules, params = snapshot(model)
    assert modules == before[0]
    assert params.keys() == before[1].keys()
    for n, (flag, value) in params.items():
        assert flag == before[1][n][0] and torch.equal(value, before[1][n][1]), n


# ---- modules_to_save across calls ------------------------------------------------------------
def test_second_apply_keeps_earlier_modules_to_save_trainable():
    model = llama()
    sl.apply_sos_lora(model, ["q_proj"], modules_to_save=["lm_head"], num_experts=2, rank=4)
    sl.apply_cps_lora(model, ["v_proj"], num_clusters=2, rank=2)
    sl.apply_sos_lora(model, ["o_proj"], num_experts=2, rank=4)
    assert model.lm_head.weight.requires_grad
    assert list(sl.modules_to_save(model)) == ["lm_head"]
    assert not model.model.embed_tokens.weight.requires_grad
    assert not model.model.layers[0].self_attn.v_proj.base_layer.weight.requires_grad


# ---- every target checked first --------------------------------------------------------------
class TwoLayers(nn.Module):
    def __init__(self, dtype=torch.int32):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.b.weight = nn.Parameter(torch.zeros(8, 8, dtype=dtype), requires_grad=False)


@pytest.mark.parametrize("apply, kwargs", [
    (sl.apply_sos_lora, dict(num_experts=2, rank=4)),
    (sl.apply_cps_lora, dict(num_clusters=2, rank=2))])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.complex64])
def test_unusable_base_dtype_names_the_module_and_changes_nothing(apply, kwargs, dtype):
    model = TwoLayers(dtype)
    before = snapshot(model)
    with pytest.raises(TypeError, match=rf"module 'b': the base weight is {dtype}; expected "
                                        r"one of \['torch.float16'"):
        apply(model, ["a", "b"], **kwargs)
    assert_unchanged(model, before)  # 'a' neither replaced nor frozen


def test_a_failing_build_restores_the_model(monkeypatch):
    model = TwoLayers(torch.float32)
    before = snapshot(model)
    built = []
    real = sl.layers.model.SOSLinear

    def build(linear, *args, **kwargs):
        if built:
            raise RuntimeError("out of memory")
        built.append(linear)
        return real(linear, *args, **kwargs)
    monkeypatch.setattr(sl.layers.model, "SOSLinear", build)
    with pytest.raises(RuntimeError, match="out of memory"):
        sl.apply_sos_lora(model, ["a", "b"], num_experts=2, rank=4)
    assert_unchanged(model, before)  # 'a' was built (its base frozen) and is thawed again


@pytest.mark.parametrize("arg", ["target_modules", "modules_to_save"])
def test_invalid_regex_names_the_argument(arg):
    model = llama()
    before = snapshot(model)
    kwargs = dict(target_modules=["q_proj"], modules_to_save=())
    kwargs[arg] = r".*(q_proj"
    with pytest.raises(ValueError, match=rf"apply_sos_lora: {arg}='\.\*\(q_proj' is not a "
                                         "valid regular expression"):
        sl.apply_sos_lora(model, num_experts=2, rank=4, **kwargs)
    assert_unchanged(model, before)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@pytest.mark.parametrize("make", [
    lambda base: sl.SOSLinear(base, num_experts=2, rank=4),
    lambda base: sl.CPSLinear(base, num_clusters=1, rank=1)])
@pytest.mark.parametrize("shape", [(0, 4), (4, 0)])
def test_empty_base_is_refused_at_construction(make, shape):
    with pytest.raises(ValueError, match="in_features and out_features must be positive"):
        make(nn.Linear(*shape))


@pytest.mark.parametrize("cls, kwargs", [(sl.SOSLinear, dict(num_experts=2, rank=4)),
                                         (sl.CPSLinear, dict(num_clusters=2, rank=2))])
def test_integer_base_is_refused_at_construction(cls, kwargs):
    base = nn.Linear(8, 8)
    base.weight = nn.Parameter(torch.zeros(8, 8, dtype=torch.int8), requires_grad=False)
    with pytest.raises(TypeError, match=f"{cls.__name__}: the base weight is torch.int8"):
        cls(base, **kwargs)
    assert base.bias.requires_grad  # nothing frozen


# ---- a parent that reads .weight instead of calling the module -------------------------------
class WeightReadingHead(nn.Module):
    """A head that uses its projection's weight directly (the adapter cannot act here)."""

    def __init__(self, hidden, labels):
        super().__init__()
        self.proj = nn.Linear(hidden, labels)

    def forward(self, x):
        return F.linear(x, self.proj.weight, self.proj.bias)


def bert_with_weight_reading_head():
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=64, hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=40, max_position_embeddings=32, num_labels=2))
    model.classifier = WeightReadingHead(24, 2)
    return model


def batches(step, generator):
    ids = torch.randint(5, 60, (4, 12), generator=generator)
    return dict(input_ids=ids, labels=(ids[:, 0] > 30).long())


def test_train_names_an_adapter_its_parent_never_calls():
    model = bert_with_weight_reading_head()
    sl.apply_sos_lora(model, ["query", "classifier.proj"], num_experts=2, rank=4)
    assert sl.layers.model.uncalled_adapters(model) == [  # nothing ran yet
        "bert.encoder.layer.0.attention.self.query", "classifier.proj"]
    with pytest.warns(AdapterBypassWarning, match=r"\['classifier.proj'\]"), \
            pytest.raises(RuntimeError, match=r"adapted layers \['classifier.proj'\] were not "
                                              r"called in the training forward.*not read its "
                                              r"\.weight"):
        finetune.train(model, batches, steps=3, progress=False, log_every=0)
    # Legitimate .weight reads (dtype checks) are untouched, and a model whose adapters are all
    # called trains as before.
    assert model.classifier.proj.weight.dtype == torch.float32
    ok = bert_with_weight_reading_head()
    sl.apply_sos_lora(ok, ["query"], num_experts=2, rank=4)
    assert len(finetune.train(ok, batches, steps=2, progress=False, log_every=0).losses) == 2


class Rows(torch.utils.data.Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, i):
        ids = torch.randint(5, 60, (12,), generator=torch.Generator().manual_seed(i))
        return dict(input_ids=ids, labels=int(ids[0] > 30))


@pytest.mark.parametrize("callback, apply", [
    (sl.SOSLoRACallback, lambda m: sl.apply_sos_lora(
        m, ["query", "classifier.proj"], num_experts=2, rank=4)),
    (sl.CPSLoRACallback, lambda m: sl.apply_cps_lora(
        m, ["query", "classifier.proj"], num_clusters=2, rank=1))])
def test_trainer_callbacks_name_an_adapter_its_parent_never_calls(tmp_path, callback, apply):
    model = bert_with_weight_reading_head()
    apply(model)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                             report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=Rows(), callbacks=[callback()])
    with pytest.warns(AdapterBypassWarning, match=r"\['classifier.proj'\]"), \
            pytest.raises(RuntimeError, match=r"\['classifier.proj'\] were not called"):
        trainer.train()
    assert trainer.state.global_step == 1  # stopped after the first step

    # Opted out (a layer that may sit out a step), the same run trains to the end.
    model = bert_with_weight_reading_head()
    apply(model)
    trainer = Trainer(model=model, args=args, train_dataset=Rows(),
                      callbacks=[callback(check_called=False)])
    with pytest.warns(AdapterBypassWarning):  # the model's own watch still reports it
        trainer.train()
    assert trainer.state.global_step == 3


# ---- odd arguments and odd bases -------------------------------------------------------------
def test_modules_to_save_none_means_none():
    # PEFT's LoraConfig default; it used to be refused as "not a list".
    model = llama()
    sl.apply_sos_lora(model, ["q_proj"], modules_to_save=None, num_experts=2, rank=4)
    assert sl.modules_to_save(model) == {}


@pytest.mark.parametrize("saved", [["q_proj"], ["self_attn"],
                                   ["model.layers.0.self_attn.q_proj"]])
def test_a_module_both_adapted_and_saved_whole_is_refused(saved):
    # The saved module's parameters, the adapter's frozen base among them, used to be thawed.
    model = llama()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"which is or holds the adapted layer "
                                         r"'model.layers.0.self_attn.q_proj'"):
        sl.apply_sos_lora(model, ["q_proj"], modules_to_save=saved, num_experts=2, rank=4)
    assert_unchanged(model, before)
    sl.apply_sos_lora(model, ["q_proj"], num_experts=2, rank=4)  # an earlier adapter, too
    with pytest.raises(ValueError, match="holds the adapted layer"):
        sl.apply_sos_lora(model, ["v_proj"], modules_to_save=["self_attn"], num_experts=2,
                          rank=4)
    assert not model.model.layers[0].self_attn.q_proj.base_layer.weight.requires_grad


def test_a_module_under_two_names_is_adapted_under_both():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6))
    model.add_module("alias", model[0])  # one module, two paths to it
    sl.apply_sos_lora(model, ["alias"], num_experts=2, rank=2)  # used to match nothing
    assert isinstance(model[0], sl.SOSLinear) and model.alias is model[0]
    assert model[0].weight_shared_with == []  # its own other name is not another module
    model[0].lora_B.data.normal_()
    x = torch.randn(3, 8)
    with torch.no_grad():
        y = model.alias(x)
    sl.merge_and_unload(model)
    assert type(model[0]) is nn.Linear and model.alias is model[0]
    with torch.no_grad():
        assert torch.allclose(model[0](x), y, atol=1e-4)


def test_a_base_whose_weight_is_a_plain_tensor():
    # Its weight has no owner among the parameters: a KeyError once the second target was
    # built, with the first already frozen.
    model = TwoLayers(torch.float32)
    weight = model.b.weight.detach().clone().normal_()
    del model.b.weight
    model.b.weight = weight
    sl.apply_sos_lora(model, ["a", "b"], num_experts=2, rank=2)
    assert isinstance(model.b, sl.SOSLinear) and model.b.weight_shared_with == []
    model.b.lora_B.data.normal_()
    expected = weight + model.b.delta_weight()
    model.b.merge()
    assert torch.allclose(model.b.weight, expected)


def test_an_adapter_in_a_submodule_kept_in_eval_mode_counts_as_called():
    # A backbone kept in eval() (dropout off) while its adapters train: they get gradients,
    # and check_adapters_called used to report them as never called.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
    sl.apply_sos_lora(model, ["0", "2"], num_experts=2, rank=2)
    model.train()
    model[0].eval()
    model(torch.randn(3, 8)).sum().backward()
    assert model[0].lora_A.grad is not None
    sl.check_adapters_called(model)
    with torch.no_grad():  # an inference call alone does not count
        fresh = sl.apply_sos_lora(nn.Sequential(nn.Linear(8, 6)), ["0"], num_experts=2, rank=2)
        fresh.eval()(torch.randn(3, 8))
    assert sl.layers.model.uncalled_adapters(fresh) == ["0"]
