"""The checks every reader and writer of adapters shares (adapter_check): configs edited and
re-stamped, sizes checked before anything is allocated, non-finite values on every path, PEFT
configs that disagree with their tensors, and bad import arguments."""
import dataclasses
import json
import os
import shutil
import time

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

import soslora_ext as sl
from soslora_ext import compose
from soslora_ext.cli import main as cli_main
from soslora_ext.formats import peft_checks as peft_check
from soslora_ext.formats.checks import layer_tensors
from soslora_ext.formats.native import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    layers_from_directory,
    read_adapter_config,
    read_peft_lora,
    write_peft_lora,
)
from soslora_ext.layers.config import CPSConfig, SOSConfig

from conftest import restamp_adapter
from save_kills import Tiny, adapted


def fresh_tiny():
    torch.manual_seed(0)
    return Tiny()


def unchanged(model, before):
    after = model.state_dict()
    return after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in after)


def through_load_adapter(directory):
    model = fresh_tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        return sl.load_adapter(model, directory)
    except sl.AdapterError:
        assert unchanged(model, before) and not list(sl.adapter_layers(model))
        raise


def through_info(directory):
    """The `soslora_ext info` command: its one-line error, raised as AdapterError."""
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli_main(["info", str(directory)])
    if code:
        raise sl.AdapterError(err.getvalue())


READERS = {"load_adapter": through_load_adapter, "compose.load": compose.load,
           "layers_from_directory": layers_from_directory,
           "read_adapter_config": read_adapter_config, "info": through_info}


@pytest.fixture
def saved(tmp_path):
    return sl.save_adapter(adapted(0), tmp_path / "a")


def rewrite(directory, edit):
    """Edit the tensors and re-record the checksums, as a buggy writer would."""
    tensors = load_file(str(directory / WEIGHTS_NAME))
    edit(tensors)
    save_file(tensors, str(directory / WEIGHTS_NAME))
    restamp_adapter(directory)


def layer(name, **changes):
    return lambda c: c["modules"][name].update(changes)


def hyper(name, **changes):
    return lambda c: c["modules"][name]["config"].update(changes)


CONFIG_EDITS = {
    "dtype int32": (layer("up", dtype="int32"), r"layer 'up': bad entry .*dtype must be one of"),
    "modules_to_save a list": (lambda c: c.update(modules_to_save=["head"]),
                               "modules_to_save must map module names"),
    "rank 2**40": (hyper("up", rank=2**40), r"layer 'up': tensor 'lora_A' is torch.float32 "
                   r"\(4, 6\), expected torch.float32 \(1099511627776, 6\)"),
    "rank 8,000,000": (hyper("up", rank=8_000_000), r"expected torch.float32 \(8000000, 6\)"),
    "a layer inside a layer": (lambda c: c["modules"].update({"up.base_layer": c["modules"]["up"]}),
                               "'up.base_layer' is, or lies inside, the adapted layer 'up'"),
    "an adapted layer saved whole": (lambda c: c["modules_to_save"].update(up=["weight"]),
                                     "'up' is, or lies inside, the adapted layer 'up'"),
    "an empty module name": (lambda c: c["modules"].update({"": c["modules"]["up"]}),
                             "module name '' is not a dotted module path"),
    "in_features 0": (layer("up", in_features=0), "layer 'up': "),
    "in_features True": (layer("up", in_features=True), "layer 'up': "),
    "unknown method": (layer("up", method="lora"), "layer 'up': bad entry .*unknown method"),
    "bias a string": (layer("up", bias="yes"), "layer 'up': bad entry .*bias must be a bool"),
    "config a list": (layer("up", config=[4]), "layer 'up': bad entry .*config must be an object"),
    "entry a number": (lambda c: c["modules"].update(up=3), "layer 'up': bad entry"),
    "num_experts 0": (hyper("up", num_experts=0), "layer 'up': bad entry .*num_experts"),
    "unknown hyperparameter": (hyper("up", rnak=3), "layer 'up': bad entry .*rnak"),
    "format_version 2": (lambda c: c.update(format_version=2), "unsupported format_version 2"),
}


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("edit", CONFIG_EDITS)
def test_edited_configs_are_refused_by_every_reader(saved, monkeypatch, reader, edit):
    # Before, e.g.: dtype int32 raised RuntimeError, modules_to_save as a list AttributeError,
    # rank 2**40 an allocator error, rank 8e6 took 10 s and 1.2 GB; compose.load and `info`
    # checked none of it.
    change, match = CONFIG_EDITS[edit]
    restamp_adapter(saved, change)

    def no_layer_before_the_checks(*args, **kwargs):
        raise AssertionError("a layer was built before the config was checked")

    monkeypatch.setattr(sl.SOSLinear, "__init__", no_layer_before_the_checks)
    start = time.perf_counter()
    with pytest.raises(sl.AdapterError, match=match):
        READERS[reader](saved)
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize("reader", [
    *READERS, "read_peft_lora", "import_peft"])
def test_deeply_nested_json_is_refused(saved, reader):
    # Before: RecursionError.
    (saved / CONFIG_NAME).write_text("[" * 100_000 + "]" * 100_000)
    read = {"read_peft_lora": read_peft_lora,
            "import_peft": lambda d: sl.import_peft(llama(), d)}.get(reader) or READERS[reader]
    with pytest.raises(sl.AdapterError, match=f"{CONFIG_NAME}: JSON nested too deeply"):
        read(saved)


@pytest.mark.parametrize("kind", ["ours", "peft"])
def test_a_200_gib_sparse_weights_file_is_refused_before_it_is_read(tmp_path, kind):
    # Before: MemoryError after reading all of it.
    directory = tmp_path / "a"
    (sl.save_adapter if kind == "ours" else sl.export_peft)(adapted(0), directory)
    size = (directory / WEIGHTS_NAME).stat().st_size
    os.truncate(directory / WEIGHTS_NAME, 200 << 30)
    read = through_load_adapter if kind == "ours" else read_peft_lora
    start = time.perf_counter()
    with pytest.raises(sl.AdapterError, match=f"{WEIGHTS_NAME}: {200 << 30} bytes, but its "
                                              f"header declares {size}"):
        read(directory)
    assert time.perf_counter() - start < 5


TENSOR_FAULTS = {
    "one more row": (lambda t: t.update({"up.lora_B": torch.cat([t["up.lora_B"]] * 2)}),
                     r"layer 'up': tensor 'lora_B' is torch.float32 \(10, 4\), expected"),
    "NaN": (lambda t: t["down.lora_A"].view(-1).__setitem__(3, float("nan")),
            "tensor 'down.lora_A' has non-finite values"),
    "missing": (lambda t: t.pop("up.expert_scales"),
                "layer 'up': tensor 'expert_scales' is missing"),
    "NaN in a module saved whole": (lambda t: t["head.bias"].fill_(float("inf")),
                                    "tensor 'head.bias' has non-finite values"),
}


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("fault", TENSOR_FAULTS)
def test_bad_tensors_are_refused_by_every_reader(saved, reader, fault):
    # Before, compose.load and `info` gave "Error(s) in loading state_dict", a LinAlgError or
    # "not on the expected device meta".
    change, match = TENSOR_FAULTS[fault]
    rewrite(saved, change)
    with pytest.raises(sl.AdapterError, match=match):
        READERS[reader](saved)


def test_info_on_a_peft_directory_points_to_import_peft(tmp_path):
    sl.export_peft(adapted(0), tmp_path / "p")
    with pytest.raises(sl.AdapterError, match="not a soslora_ext adapter .*use import_peft"):
        read_adapter_config(tmp_path / "p")
    with pytest.raises(sl.AdapterError, match="import_peft"):
        through_info(tmp_path / "p")


def test_compose_load_carries_modules_saved_whole(tmp_path):
    # Before: compose.load dropped them, so `compose concat` wrote an adapter without the head.
    a, b = adapted(0), adapted(1)
    sl.save_adapter(a, tmp_path / "a")
    sl.save_adapter(b, tmp_path / "b")
    loaded = [compose.load(tmp_path / n) for n in "ab"]
    assert all(torch.equal(loaded[0].whole[f"head.{k}"], v) for k, v in a.head.named_parameters())
    assert len(loaded[0].whole) == 2
    compose.concat(loaded).save_peft(tmp_path / "sum")
    _, factors, whole = read_peft_lora(tmp_path / "sum")
    assert factors["up"][0].shape == (12, 6)  # ranks 4 + 8
    assert all(torch.equal(whole[f"head.{k}"], v) for k, v in b.head.named_parameters())


def test_save_adapter_refuses_what_a_reader_would_refuse(tmp_path):
    # The same checks run before a save: a CPS partition that is not one is not written.
    torch.manual_seed(0)
    model = sl.apply_cps_lora(Tiny(), ["up"], num_clusters=2, rank=1)
    with torch.no_grad():
        model.up.row_index[0] = model.up.row_index[1]
    with pytest.raises(sl.AdapterError, match="layer 'up': .*rows partition is invalid"):
        sl.save_adapter(model, tmp_path / "a")
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("method,config,dtype", [
    ("sos", SOSConfig(num_experts=3, rank=6), torch.float32),
    ("sos", SOSConfig(num_experts=2, rank=3, rank_mode="expert", scale_mode="channel",
                      gate=True), torch.float64),
    ("sos", SOSConfig(num_experts=4, rank=8, gate=True), torch.bfloat16),
    ("cps", CPSConfig(num_clusters=2, rank=2), torch.float32),
    ("cps", CPSConfig(num_clusters=3, rank_per_cluster=(1, 2, 1)), torch.float16),
])
def test_expected_tensors_are_what_layers_save(method, config, dtype):
    # The sizes checked before anything is allocated come from the hyperparameters alone.
    cls = sl.SOSLinear if method == "sos" else sl.CPSLinear
    real = cls(torch.nn.Linear(11, 9), dtype=dtype, **config.to_dict())
    state = {k: (v.dtype, tuple(v.shape)) for k, v in real.state_dict().items()
             if not k.startswith("base_layer.")}
    assert layer_tensors(method, config, 11, 9, dtype) == state


# ---- PEFT ------------------------------------------------------------------------------------
def llama(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=56, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)).eval()


Q = "model.layers.0.self_attn.q_proj"
KEY = f"base_model.model.{Q}"


@pytest.fixture
def peft_dir(tmp_path):
    model = peft.get_peft_model(llama(), peft.LoraConfig(r=8, lora_alpha=16,
                                                         target_modules=["q_proj", "v_proj"],
                                                         modules_to_save=["lm_head"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)
    model.save_pretrained(str(tmp_path / "p"))
    return tmp_path / "p"


def edit_peft(directory, config=None, tensors=None):
    if config:
        c = json.loads((directory / CONFIG_NAME).read_text())
        config(c)
        (directory / CONFIG_NAME).write_text(json.dumps(c))
    if tensors:
        t = load_file(str(directory / WEIGHTS_NAME))
        tensors(t)
        save_file(t, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})


PEFT_FAULTS = {
    "NaN in lora_B": (None, lambda t: t[f"{KEY}.lora_B.weight"].fill_(float("nan")),
                      f"tensor '{KEY}.lora_B.weight' has non-finite values"),
    "NaN in a module saved whole": (
        None, lambda t: t["base_model.model.lm_head.weight"].view(-1).__setitem__(0, float("nan")),
        "lm_head.weight' has non-finite"),
    "lora_alpha NaN": (lambda c: c.update(lora_alpha=float("nan")), None,
                       "lora_alpha must be a finite number, got nan"),
    "lora_alpha a string": (lambda c: c.update(lora_alpha="16"), None,
                            "lora_alpha must be a finite number, got '16'"),
    "r a string": (lambda c: c.update(r="8"), None, "r must be a positive int, got '8'"),
    "r edited": (lambda c: c.update(r=4), None,
                 f"layer '{Q}': the factors have rank 8, but {CONFIG_NAME} gives this layer r=4"),
    "rank_pattern edited": (lambda c: c.update(rank_pattern={"v_proj": 2}), None,
                            "gives this layer r=2"),
    "rank_pattern a list": (lambda c: c.update(rank_pattern=[2]), None,
                            "rank_pattern must map module names to positive ints"),
    "alpha_pattern a string value": (lambda c: c.update(alpha_pattern={"q_proj": "x"}), None,
                                     "alpha_pattern must map module names to finite numbers"),
    "a bad regex in rank_pattern": (lambda c: c.update(rank_pattern={"q_proj(": 8}), None,
                                    "is not a regex"),
    "use_rslora a string": (lambda c: c.update(use_rslora="yes"), None,
                            "use_rslora must be a bool"),
    "rank-0 factors": (None, lambda t: t.update({f"{KEY}.lora_A.weight": torch.zeros(0, 32),
                                                 f"{KEY}.lora_B.weight": torch.zeros(32, 0)}),
                       "the factors have rank 0"),
    "r 0": (lambda c: c.update(r=0), None, "r must be a positive int, got 0"),
    "a LoRA inside a layer's base": (None, lambda t: t.update(
        {f"{KEY}.base_layer.lora_A.weight": torch.zeros(8, 32),
         f"{KEY}.base_layer.lora_B.weight": torch.zeros(32, 8)}), "lies inside"),
}


@pytest.mark.parametrize("fault", PEFT_FAULTS)
def test_import_peft_refuses_bad_adapters_and_changes_nothing(peft_dir, fault):
    # Before: NaN was imported; rank-0 factors gave ZeroDivisionError, a string lora_alpha a
    # TypeError; an r that disagrees with the tensors was read with the wrong scaling.
    config, tensors, match = PEFT_FAULTS[fault]
    edit_peft(peft_dir, config, tensors)
    model = llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(sl.AdapterError, match=match):
        sl.import_peft(model, peft_dir, num_experts=4)
    assert unchanged(model, before) and not list(sl.sos_layers(model))
    with pytest.raises(sl.AdapterError, match=match):
        compose.load(peft_dir)


def trained_peft(path, init):
    """A PEFT LoRA made by the real peft with `init`, its factors then moved as training would."""
    extra = dict(eva_config=peft.EvaConfig()) if init == "eva" else {}
    model = peft.get_peft_model(llama(), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=init, **extra))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(str(path))
    return path


def peft_logits(directory, ids):
    with torch.no_grad():
        return peft.PeftModel.from_pretrained(llama(), str(directory)).eval()(ids).logits


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_inits_that_change_the_base_are_refused(tmp_path, init):
    # Before: imported without complaint, while PEFT re-applies the init to the base weights on
    # load: the imported model's logits were off by 0.65 (olora) and 0.40 (pissa).
    directory = trained_peft(tmp_path / init, init)
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(0))
    as_plain = shutil.copytree(directory, tmp_path / "as_plain")
    edit_peft(as_plain, config=lambda c: c.update(init_lora_weights=True))
    # The same factors over the original base (what importing B A would give) are not what
    # PEFT's own load of the adapter gives.
    assert (peft_logits(directory, ids) - peft_logits(as_plain, ids)).abs().max() > 1e-2
    model = llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(sl.AdapterError, match=rf"init_lora_weights='{init}': PEFT applies this "
                                              "initialisation to the base weights"):
        sl.import_peft(model, directory, num_experts=2)
    assert unchanged(model, before) and not list(sl.sos_layers(model))
    with pytest.raises(sl.AdapterError, match="init_lora_weights"):
        compose.load(directory)


@pytest.mark.parametrize("init, match", [
    ("pissa_niter_4", "PEFT applies this initialisation"), ("corda", "PEFT applies this"),
    ("loftq", "PEFT applies this"), ("lora_ga", "PEFT applies this"),
    ("something_new", "not an initialisation this package knows"),
    (3, "not an initialisation this package knows")])
def test_every_base_changing_or_unknown_init_is_refused(peft_dir, init, match):
    edit_peft(peft_dir, config=lambda c: c.update(init_lora_weights=init))
    with pytest.raises(sl.AdapterError, match=match):
        sl.import_peft(llama(), peft_dir, num_experts=4)


# EVA sets lora_A from activation statistics; PEFT leaves the base weights alone on load.
@pytest.mark.parametrize("init", ["gaussian", "orthogonal", "eva", False])
def test_inits_that_only_set_the_factors_import_exactly(tmp_path, init):
    directory = trained_peft(tmp_path / str(init), init)
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(1))
    model = sl.import_peft(llama(), directory, num_experts=2).eval()
    with torch.no_grad():
        ours = model(ids).logits
    expected = peft_logits(directory, ids)
    assert torch.allclose(ours, expected, atol=1e-5, rtol=1e-5), (ours - expected).abs().max()


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_peft_bias_adapters_are_refused_saying_what_is_unsupported(tmp_path, bias):
    # Before: refused with "module to save '....base_layer': parameter 'bias' does not fit".
    model = peft.get_peft_model(llama(), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], bias=bias))
    model.save_pretrained(str(tmp_path))
    target = llama()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    match = rf"bias='{bias}': the adapter trained the base layers' biases"
    with pytest.raises(sl.AdapterError, match=match):
        sl.import_peft(target, tmp_path, num_experts=2)
    assert unchanged(target, before) and not list(sl.sos_layers(target))
    with pytest.raises(sl.AdapterError, match=match):
        compose.load(tmp_path)


@pytest.mark.parametrize("field, value", [
    ("use_dora", True), ("lora_bias", True), ("layer_replication", [[0, 1]]),
    ("use_qalora", True), ("alora_invocation_tokens", [5, 6]), ("target_parameters", ["w"]),
    ("trainable_token_indices", [3]), ("ensure_weight_tying", True), ("kasa_config", {"k": 1}),
    ("megatron_config", {"tp": 2}), ("arrow_config", {"top_k": 2}), ("use_bdlora", True)])
def test_peft_variants_that_change_the_model_are_refused_by_name(peft_dir, field, value):
    edit_peft(peft_dir, config=lambda c: c.update({field: value}))
    model = llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(sl.AdapterError, match=rf"{field}=.* is not supported"):
        sl.import_peft(model, peft_dir, num_experts=4)
    assert unchanged(model, before)
    with pytest.raises(sl.AdapterError, match=field):
        compose.load(peft_dir)


def test_an_unknown_peft_field_is_refused_by_name_unless_it_is_off(peft_dir):
    edit_peft(peft_dir, config=lambda c: c.update(shiny_new_mode="fast"))
    with pytest.raises(sl.AdapterError, match="unknown field shiny_new_mode=fast"):
        sl.import_peft(llama(), peft_dir, num_experts=4)
    # A feature left off cannot change the model: accepted.
    edit_peft(peft_dir, config=lambda c: c.update(shiny_new_mode=None, other_new_flag=False))
    assert len(list(sl.sos_layers(sl.import_peft(llama(), peft_dir, num_experts=4)))) == 2


def test_every_field_of_peft_lora_config_is_classified():
    # A field a new PEFT adds must be classified here before its adapters import silently.
    known = (set(peft_check.PEFT_READ_FIELDS) | set(peft_check.PEFT_INERT_FIELDS)
             | set(peft_check.PEFT_UNSUPPORTED_FIELDS))
    fields = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    assert fields <= known, sorted(fields - known)


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_experts=0), "num_experts must be a positive int, got 0"),
    (dict(num_experts=2.0), "num_experts must be a positive int, got 2.0"),
    (dict(num_experts=True), "num_experts must be a positive int, got True"),
    (dict(alpha="16"), "alpha must be a positive number"),
    (dict(dtype=torch.int32), "dtype must be a floating-point torch.dtype"),
])
def test_import_peft_refuses_bad_arguments_naming_them(peft_dir, kwargs, match):
    model = llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(sl.AdapterError, match=match):
        sl.import_peft(model, peft_dir, **kwargs)
    assert unchanged(model, before)
    assert all(p.requires_grad for p in model.parameters())


def test_import_peft_into_an_adapted_layers_base_is_refused(peft_dir):
    # The LoRA of "q_proj" would be applied inside an SOS layer already there.
    edit_peft(peft_dir, tensors=lambda t: [t.update({k.replace(Q, f"{Q}.base_layer"): t.pop(k)})
                                           for k in list(t) if Q in k])
    model = sl.apply_sos_lora(llama(), ["q_proj"], num_experts=2, rank=4)
    with pytest.raises(sl.AdapterError, match=f"layer '{Q}.base_layer' lies inside the adapted "
                                              f"layer '{Q}'"):
        sl.import_peft(model, peft_dir, num_experts=4)


@pytest.mark.parametrize("how", ["write_peft_lora", "concat"])
def test_non_finite_values_are_not_exported(tmp_path, how):
    # Before: compose.concat(...).save_peft wrote NaN.
    A, B = torch.randn(4, 6), torch.randn(5, 4)
    B[2, 1] = float("nan")
    with pytest.raises(sl.AdapterError, match="tensor 'base_model.model.up.lora_B.weight' has "
                                              "non-finite values"):
        if how == "write_peft_lora":
            write_peft_lora(tmp_path / "out", {"up": (A, B)})
        else:
            compose.Adapter({"up": [compose.LowRankTerm(A, B)]}).save_peft(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_peft_loads_our_exports_without_warnings(tmp_path, recwarn):
    # The export's config holds only PEFT's own keys (which config the weights go with is in
    # the weights' metadata), so PEFT loads it without "unexpected keyword" warnings.
    model = sl.apply_sos_lora(llama(), ["q_proj", "v_proj"], num_experts=2, rank=4)
    with torch.no_grad():
        for _, layer in sl.sos_layers(model):
            layer.lora_B.normal_(0, 0.3)
    sl.export_peft(model, tmp_path / "p")
    ids = torch.randint(0, 96, (2, 7))
    loaded = peft.PeftModel.from_pretrained(llama(), str(tmp_path / "p")).eval()
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-5)
    assert not [w for w in recwarn if "nexpected" in str(w.message)]


# ---- new members of the same classes --------------------------------------------------------
def test_a_config_with_a_duplicated_key_is_refused(saved):
    # Before: json kept the last "format", so the file said two things and one was read.
    text = (saved / CONFIG_NAME).read_text().replace("{", '{\n  "format": "x",', 1)
    (saved / CONFIG_NAME).write_text(text)
    with pytest.raises(sl.AdapterError, match=r"duplicate keys \['format'\]"):
        read_adapter_config(saved)


@pytest.mark.parametrize("metadata,error,match", [
    ([1, 2], TypeError, "expected a dict, got list"),
    ({"x": float("nan")}, sl.AdapterError, "Out of range float"),
    ({"x": object()}, TypeError, "not JSON serializable")])
def test_save_adapter_refuses_bad_metadata_and_writes_nothing(tmp_path, metadata, error, match):
    # Before: a list was stored (and broke `merge`), NaN written as non-standard JSON.
    with pytest.raises(error, match=f"metadata must be .*{match}"):
        sl.save_adapter(adapted(0), tmp_path / "a", metadata=metadata)
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("edit,match", [
    (lambda c: c.update(metadata=[1]), "metadata must be an object"),
    (lambda c: c.update(base_model_class=[1]), "base_model_class must be a string")])
def test_edited_metadata_is_refused_by_every_reader(saved, edit, match):
    restamp_adapter(saved, edit)
    for reader in READERS.values():
        with pytest.raises(sl.AdapterError, match=match):
            reader(saved)


def peft_files(directory, tensors, **config):
    directory.mkdir()
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    (directory / CONFIG_NAME).write_text(json.dumps({"peft_type": "LORA", "r": 4,
                                                     "lora_alpha": 4, **config}))
    return directory


def lora(dtype=torch.float32):
    torch.manual_seed(0)
    return {"base_model.model.up.lora_A.weight": torch.randn(4, 6).to(dtype),
            "base_model.model.up.lora_B.weight": torch.randn(5, 4).to(dtype)}


def test_float8_factors_are_checked_and_imported(tmp_path):
    # Before: NotImplementedError ("isfinite" not implemented for Float8_e4m3fn).
    t = lora(torch.float8_e4m3fn)
    model = sl.import_peft(fresh_tiny(), peft_files(tmp_path / "p", t), num_experts=2)
    assert isinstance(model.up, sl.SOSLinear)
    a = compose.load(tmp_path / "p")
    expected = t["base_model.model.up.lora_B.weight"].double() @ \
        t["base_model.model.up.lora_A.weight"].double()
    assert torch.allclose(a.delta("up"), expected)


@pytest.mark.parametrize("how", ["import_peft", "compose.load"])
def test_a_lora_alpha_that_overflows_the_update_is_refused(tmp_path, how):
    # Before: lora_alpha 1e300 imported lora_B as inf, and compose summed infinities.
    directory = peft_files(tmp_path / "p", lora(), lora_alpha=1e300)
    model = fresh_tiny()
    with pytest.raises(sl.AdapterError, match=r"layer 'up': lora_B times the scaling 2.5e\+299"):
        sl.import_peft(model, directory, num_experts=2) if how == "import_peft" else \
            compose.load(directory)
    assert not list(sl.adapter_layers(model))


def test_import_into_float16_that_overflows_is_refused_and_changes_nothing(tmp_path):
    directory = peft_files(tmp_path / "p", lora(), lora_alpha=1e7)
    model = fresh_tiny()
    with pytest.raises(sl.AdapterError, match="layer 'up': .*overflow torch.float16"):
        sl.import_peft(model, directory, num_experts=2, dtype=torch.float16)
    assert not list(sl.adapter_layers(model))


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_a_module_saved_whole_must_be_floating_point(tmp_path, dtype):
    # Before: an int64 or bool "lm_head.weight" was cast into the model's float parameter.
    t = {**lora(), "base_model.model.head.weight": torch.ones(2, 3, dtype=dtype)}
    with pytest.raises(sl.AdapterError, match=f"head.weight' is {dtype}, expected a floating"):
        sl.import_peft(fresh_tiny(), peft_files(tmp_path / "p", t), num_experts=2)
    with pytest.raises(sl.AdapterError, match=f"head.weight' is {dtype}, expected a floating"):
        write_peft_lora(tmp_path / "w", {"up": (torch.ones(2, 6), torch.ones(5, 2))},
                        {"head.weight": torch.ones(2, 3, dtype=dtype)})
    assert not (tmp_path / "w").exists()


def test_write_peft_lora_refuses_what_is_not_a_tensor(tmp_path):
    # Before: AttributeError: 'numpy.ndarray' object has no attribute 'dim'.
    with pytest.raises(sl.AdapterError, match=r"factors\['up'\] must be an \(A, B\) pair"):
        write_peft_lora(tmp_path / "w", {"up": (torch.ones(2, 6).numpy(), torch.ones(5, 2))})
    with pytest.raises(sl.AdapterError, match=r"whole\['head.weight'\] must be a torch.Tensor"):
        write_peft_lora(tmp_path / "w", {"up": (torch.ones(2, 6), torch.ones(5, 2))},
                        {"head.weight": [[1.0]]})
    assert not (tmp_path / "w").exists()


def test_info_reads_the_committed_pair_and_tolerates_missing_fields(saved, capsys):
    # Before: `info` re-read adapter_model.safetensors itself (a newer save's weights while
    # that save is between its renames: KeyError) and a config without library_version
    # failed with "error: 'library_version'".
    restamp_adapter(saved, lambda c: c.pop("library_version"))
    (saved / WEIGHTS_NAME).rename(saved / ".adapter_model.safetensors.previous")
    sl.save_adapter(adapted(1), saved.parent / "other")
    (saved.parent / "other" / WEIGHTS_NAME).rename(saved / WEIGHTS_NAME)
    assert cli_main(["info", str(saved)]) == 0
    out = capsys.readouterr().out
    assert "library None" in out and "8 in modules saved whole: ['head']" in out
