"""The merge guard's kept max |W| (merge_guard.known_max): a merge reads its weight once when the
max is known, an unmerge twice (its fingerprint check); every write torch counts forgets the max;
a write torch does not count (.data, numpy) can never let an overflow through; the fingerprint
the layer records from the op's pass is sharing.fingerprint's, bit for bit."""
import pytest
import torch
import torch.nn as nn

import soslora_ext as sl
from soslora_ext.layers import merge_guard
from soslora_ext.layers.base import weight_matrix
from soslora_ext.layers.sharing import fingerprint

from conftest import randomize_adapters

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def layer_of(dtype=torch.float32, n_in=24, n_out=20):
    torch.manual_seed(0)
    layer = sl.SOSLinear(nn.Linear(n_in, n_out, dtype=dtype), num_experts=4, rank=8)
    layer.lora_B.data.normal_()
    return layer


@pytest.fixture
def reads(monkeypatch):
    """Counts the ops' passes over a weight: reads (weight_stats) and writes (merge_into_)."""
    counts = {"read": 0, "write": 0}
    for op, what in (("weight_stats", "read"), ("merge_into_", "write")):
        real = getattr(torch.ops.soslora, op)

        def counted(*args, real=real, what=what):
            counts[what] += 1
            return real(*args)
        monkeypatch.setattr(torch.ops.soslora, op, counted)
    return counts


def test_a_merge_reads_its_weight_once_when_its_max_is_known(reads):
    layer = layer_of()
    layer.merge()  # cold: one read for max |W|, one write
    assert reads == {"read": 1, "write": 1}
    layer.unmerge()  # the fingerprint check reads it; its max serves the bound
    assert reads == {"read": 2, "write": 2}
    for _ in range(3):
        layer.merge()
        layer.unmerge()
    assert reads == {"read": 5, "write": 8}
    w = weight_matrix(layer.base_layer)
    assert merge_guard.known_max(w) == w.double().abs().max().item()


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_fingerprint_recorded_from_the_op_is_sharing_fingerprint(dtype):
    layer = layer_of(dtype, n_in=25, n_out=18)  # odd columns: 16-bit values one by one
    layer.merge()
    assert layer._merged_fingerprint == fingerprint(layer.weight)
    layer.unmerge()
    layer.merge()  # warm
    assert layer._merged_fingerprint == fingerprint(layer.weight)
    layer.unmerge()


def test_a_conv1d_weight_is_fingerprinted_as_the_view_merge_writes():
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    torch.manual_seed(0)
    for dtype in DTYPES:
        layer = sl.SOSLinear(pytorch_utils.Conv1D(18, 24).to(dtype), num_experts=2, rank=4)
        layer.lora_B.data.normal_(0, 1e-3)
        w0 = layer.base_layer.weight.detach().clone()
        layer.merge()
        view = weight_matrix(layer.base_layer)  # [out, in], a transposed view
        assert not view.is_contiguous()
        assert layer._merged_fingerprint == fingerprint(view)
        layer.unmerge()
        assert (layer.base_layer.weight.double() - w0.double()).abs().max() < 1e-3


@pytest.mark.parametrize("write", [
    lambda w: w.add_(0.0),
    lambda w: w.copy_(w.clone()),
    lambda w: w.mul_(1.0),
])
def test_every_write_torch_counts_forgets_the_max(write):
    layer = layer_of()
    layer.merge()
    w = layer.base_layer.weight
    assert merge_guard.known_max(w) is not None
    with torch.no_grad():
        write(w)
    assert merge_guard.known_max(w) is None


def test_a_reloaded_replaced_or_cast_weight_has_no_max():
    model = nn.Sequential(nn.Linear(12, 10))
    sl.apply_sos_lora(model, ["0"], num_experts=2, rank=2)
    randomize_adapters(model)
    layer = model[0]
    layer.merge()
    layer.unmerge()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    assert merge_guard.known_max(layer.base_layer.weight) is None
    layer.merge()
    layer.unmerge()
    layer.base_layer.weight.data = layer.base_layer.weight.data.clone()  # new memory
    assert merge_guard.known_max(layer.base_layer.weight) is None
    layer.merge()
    layer.unmerge()
    model.double()
    assert merge_guard.known_max(layer.base_layer.weight) is None


def test_a_weight_changed_behind_torchs_back_cannot_overflow():
    """A write torch does not count (through .data) leaves the kept max stale: the op still
    refuses every sum beyond the range and takes back what it wrote, the guard forgets the
    max and raises; the next merge reads the weight and refuses bit-identically."""
    layer = layer_of(torch.float16)
    with torch.no_grad():
        layer.lora_A[:, 3] = 4.0
        layer.lora_B[2] = 4.0  # the update at (2, 3): about a thousand
    layer.merge()
    layer.unmerge()
    w = layer.base_layer.weight
    assert merge_guard.known_max(w) is not None
    w.data[2, 3] = 65000.0  # behind torch's count of writes
    before = w.detach().clone()
    with pytest.raises(FloatingPointError, match="changed where torch does not count writes"):
        layer.merge()
    assert not layer.merged and torch.isfinite(w).all() and w[2, 3] == 65000.0
    update = layer.delta_weight().double()
    assert ((w.double() - before.double()).abs()
            <= 2 * torch.finfo(torch.float16).eps * (before.double().abs() + update.abs())).all()
    assert merge_guard.known_max(w) is None
    before = w.detach().clone()
    with pytest.raises(FloatingPointError, match="exceed the range of torch.float16"):
        layer.merge()  # read, checked, refused: nothing written
    assert not layer.merged and torch.equal(w, before)


def test_a_stale_max_in_a_model_merge_takes_back_the_weights_written_before():
    model = nn.Sequential(nn.Linear(12, 10, dtype=torch.float16),
                          nn.Linear(10, 8, dtype=torch.float16))
    sl.apply_sos_lora(model, ["0", "1"], num_experts=2, rank=2)
    randomize_adapters(model)
    with torch.no_grad():
        model[1].lora_A[:, 1] = 3.0
        model[1].lora_B[0] = 3.0  # the update at (0, 1): a few thousand
    for _, layer in sl.adapter_layers(model):
        layer.merge()
        layer.unmerge()
    model[1].base_layer.weight.data[0, 1] = 65000.0  # behind torch's count of writes
    before = [m.base_layer.weight.detach().clone() for m in (model[0], model[1])]
    with pytest.raises(FloatingPointError, match="changed where torch does not count writes"):
        sl.merge_and_unload(model)
    for layer, w0 in zip((model[0], model[1]), before):
        w = layer.base_layer.weight
        assert not layer.merged and torch.isfinite(w).all()
        update = layer.delta_weight().double()
        assert ((w.double() - w0.double()).abs()
                <= 2 * torch.finfo(torch.float16).eps * (w0.double().abs() + update.abs())).all()
