"""SOS-LoRA and CPS-LoRA over nn.Embedding, nn.Conv1d/2d/3d and nn.MultiheadAttention: values
and every gradient against a float64 oracle (the dense merged weight applied by the base's own
functional form), merge/unmerge, delta_weight's layout, state dicts and torch.compile."""
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

import soslora_ext as sl
from soslora_ext.ops import reference

from conftest import rel_err
from kinds_oracle import leaf_params, oracle_delta, oracle_forward, randomize

SOS = dict(num_experts=3, rank=6, scale_mode="channel", gate=True)
CPS = dict(num_clusters=2, rank=2)
METHODS = [(sl.SOSLinear, SOS), (sl.CPSLinear, CPS)]


def embedding():
    return nn.Embedding(23, 10, padding_idx=4, dtype=torch.float64)


def conv1d():
    return nn.Conv1d(5, 7, 3, stride=2, padding=2, dtype=torch.float64)


def conv2d():
    return nn.Conv2d(6, 9, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(2, 1),
                     dtype=torch.float64)


def conv2d_same():
    return nn.Conv2d(4, 5, 3, padding="same", bias=False, dtype=torch.float64)


def conv3d():
    return nn.Conv3d(4, 6, (1, 2, 3), padding=(0, 1, 1), dtype=torch.float64)


def attention():
    return nn.MultiheadAttention(12, 3, batch_first=True, dtype=torch.float64)


def attention_seq_first():
    return nn.MultiheadAttention(8, 2, bias=False, dtype=torch.float64)


def inputs(base, g):
    """A fresh random input (ids for an embedding) for `base`."""
    if isinstance(base, nn.Embedding):
        ids = torch.randint(0, base.num_embeddings, (3, 7), generator=g)
        if base.padding_idx is not None:
            ids[0, :2] = base.padding_idx  # padding tokens in the batch
        return ids
    if isinstance(base, nn.MultiheadAttention):
        shape = (3, 5, base.embed_dim) if base.batch_first else (5, 3, base.embed_dim)
        return torch.randn(*shape, generator=g, dtype=torch.float64)
    spatial = {1: (11,), 2: (9, 8), 3: (3, 5, 6)}[base.weight.dim() - 2]
    return torch.randn(2, base.in_channels, *spatial, generator=g, dtype=torch.float64)


BASES = [embedding, conv1d, conv2d, conv2d_same, conv3d, attention, attention_seq_first]


def call(layer, x):
    if isinstance(layer.base_layer, nn.MultiheadAttention):
        return layer(x, x, x, need_weights=False)[0]
    return layer(x)


@pytest.mark.parametrize("make", BASES)
@pytest.mark.parametrize("cls,kwargs", METHODS)
def test_values_and_every_gradient_match_the_oracle(make, cls, kwargs):
    g = torch.Generator().manual_seed(7)
    layer = cls(make(), **kwargs).eval()
    randomize(layer, g)
    x = inputs(layer.base_layer, g)
    floating = x.is_floating_point()
    x1, x2 = (x.clone().requires_grad_(floating) for _ in range(2))
    y = call(layer, x1)
    params = leaf_params(layer)
    nested = [leaf_params(n) for n in layer.nested_adapters()]
    expected = oracle_forward(layer, x2, params, *nested)
    assert y.dtype == torch.float64 and y.shape == expected.shape
    assert rel_err(y, expected) < 1e-10
    w = torch.randn(expected.shape, generator=g, dtype=torch.float64)
    (y * w).sum().backward()
    (expected * w).sum().backward()
    if floating:
        assert rel_err(x1.grad, x2.grad) < 1e-10
    mine = dict(layer.named_parameters())
    pairs = list(params.items()) + [(f"base_layer.out_proj.{n}", p) for d in nested
                                    for n, p in d.items()]
    for name, p in pairs:
        assert mine[name].grad is not None, name
        assert rel_err(mine[name].grad, p.grad) < 1e-10, name


def test_embedding_padding_row_has_no_update_and_no_gradient():
    for cls, kwargs in METHODS:
        layer = cls(embedding(), **kwargs)
        randomize(layer, torch.Generator().manual_seed(1))
        assert layer.delta_weight()[4].abs().max() == 0
        ids = torch.full((2, 3), 4)
        layer(ids).sum().backward()
        assert layer.lora_A.grad.abs().max() == 0 and layer.lora_B.grad.abs().max() == 0


@pytest.mark.parametrize("make", BASES)
@pytest.mark.parametrize("cls,kwargs", METHODS)
def test_merge_unmerge_and_delta_weight_layout(make, cls, kwargs):
    g = torch.Generator().manual_seed(3)
    base = make().float()
    layer = cls(base, **kwargs).eval()
    randomize(layer, g)
    x = inputs(base, g)
    x = x if not x.is_floating_point() else x.float()
    weights = [layer.weight] + [n.base_layer.weight for n in layer.nested_adapters()]
    before = [w.detach().clone() for w in weights]
    deltas = [layer.delta_weight()] + [n.delta_weight() for n in layer.nested_adapters()]
    for w, d in zip(before, deltas):
        assert d.shape == w.shape
    with torch.no_grad():
        y = call(layer, x)
        layer.merge()
        assert layer.merged and all(n.merged for n in layer.nested_adapters())
        for w, b, d in zip(weights, before, deltas):
            # one rounding of the float32 sum
            assert torch.equal(w, (b.double() + d.double()).float())
        assert rel_err(call(layer, x), y) < 1e-5
        layer.unmerge()
        assert not layer.merged
        for w, b, d in zip(weights, before, deltas):
            assert (w - b).abs().max() <= 2 * torch.finfo(torch.float32).eps * \
                (b.abs() + d.abs()).max()
    unloaded = layer.merge_and_unload()
    assert type(unloaded) is type(base) and unloaded is base
    if isinstance(base, nn.MultiheadAttention):
        assert type(base.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear


@pytest.mark.parametrize("make", BASES)
@pytest.mark.parametrize("cls,kwargs", METHODS)
def test_state_dict_and_safetensors_round_trip_bit_exact(make, cls, kwargs):
    g = torch.Generator().manual_seed(5)
    layer = cls(make(), **kwargs).eval()
    randomize(layer, g)
    state = {k: v.contiguous() for k, v in layer.state_dict().items()}
    fresh = cls(make(), **kwargs).eval()
    fresh.load_state_dict(st_load(st_save(state)))
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    twin = cls(make(), **kwargs).eval()
    twin.load_state_dict(torch.load(buffer))
    x = inputs(layer.base_layer, g)
    with torch.no_grad():
        expected = call(layer, x)
        assert torch.equal(call(fresh, x), expected)
        assert torch.equal(call(twin, x), expected)
    layer.merge()
    merged = cls(make(), **kwargs).eval()
    merged.load_state_dict(layer.state_dict())
    assert merged.merged
    merged.unmerge()


@pytest.mark.parametrize("make,cls,kwargs", [
    (embedding, sl.CPSLinear, CPS), (conv2d, sl.SOSLinear, SOS), (conv3d, sl.CPSLinear, CPS),
    (attention, sl.SOSLinear, SOS)])
def test_torch_compile_matches_eager(make, cls, kwargs):
    """One whole graph (inductor), forward and backward, per kind."""
    g = torch.Generator().manual_seed(9)
    layer = cls(make(), **kwargs).train()
    randomize(layer, g)
    x = inputs(layer.base_layer, g)
    compiled = torch.compile(lambda t: call(layer, t), fullgraph=True)
    y = call(layer, x)
    y.square().sum().backward()
    grads = [p.grad.clone() for _, p in layer.named_adapter_parameters()]
    layer.zero_grad()
    yc = compiled(x)
    yc.square().sum().backward()
    assert rel_err(yc, y) < 1e-12
    for (_, p), expected in zip(layer.named_adapter_parameters(), grads):
        assert rel_err(p.grad, expected) < 1e-10


@pytest.mark.parametrize("make", [lambda: nn.Embedding(23, 10, dtype=torch.float64), conv2d])
def test_recipe_gradient_terms_equal_the_linear_layers(make):
    """Orthogonality, LoRA+, the gate prior and the scale anchor reach the factors as on a
    linear layer over the same matrix (its input: one-hot rows, or the unfolded patches)."""
    kwargs = dict(SOS, uniform_prior=0.3, scale_anchor=0.2, loraplus_ratio=4.0)
    g = torch.Generator().manual_seed(11)
    base = make()
    layer = sl.SOSLinear(base, **kwargs).train()
    layer.ortho_lambda.fill_(0.7)
    randomize(layer, g)
    x = inputs(base, g)
    linear = nn.Linear(layer.in_features, layer.out_features, bias=False, dtype=torch.float64)
    twin = sl.SOSLinear(linear, **kwargs).train()
    twin.load_state_dict({k: v for k, v in layer.state_dict().items()
                          if not k.startswith("base_layer.")}, strict=False)
    if isinstance(base, nn.Embedding):
        rows = F.one_hot(x.reshape(-1), base.num_embeddings).double()
        flat = lambda y: y.reshape(-1, y.shape[-1])  # noqa: E731
    else:
        rows = F.unfold(x, base.kernel_size, base.dilation, base.padding, base.stride)
        rows = rows.transpose(1, 2).reshape(-1, layer.in_features)
        flat = lambda y: y.movedim(1, -1).reshape(-1, y.shape[1])  # noqa: E731
    w = torch.randn(flat(layer(x)).shape, generator=g, dtype=torch.float64)
    (flat(layer(x) - base(x)) * w).sum().backward()
    (twin(rows) * w).sum().backward()
    for (name, p), (_, q) in zip(layer.named_adapter_parameters(),
                                 twin.named_adapter_parameters()):
        assert rel_err(p.grad, q.grad) < 1e-11, name


def test_conv_dropout_is_on_the_input_image():
    """PEFT's convolution dropout: on x before A's convolution, one mask per input element."""
    base = conv2d()
    layer = sl.SOSLinear(base, rank=4, num_experts=1, dropout=0.5, dropout_position="pre")
    randomize(layer, torch.Generator().manual_seed(2))
    x = inputs(base, torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    y = layer(x)
    torch.manual_seed(0)
    dropped = F.dropout(x, 0.5, training=True)
    params = leaf_params(layer)
    delta = oracle_delta(layer, params).reshape(base.weight.shape)
    expected = base(x) + base._conv_forward(dropped, delta, None)
    assert rel_err(y, expected) < 1e-10


@pytest.mark.parametrize("cls,kwargs", METHODS)
def test_unbatched_conv_and_attention_inputs(cls, kwargs):
    g = torch.Generator().manual_seed(4)
    for make in (conv2d, attention_seq_first):
        layer = cls(make(), **kwargs).eval()
        randomize(layer, g)
        x = inputs(layer.base_layer, g)
        one = x[0] if isinstance(layer.base_layer, nn.Conv2d) else x[:, 0]
        with torch.no_grad():
            full, single = call(layer, x), call(layer, one)
        expected = full[0] if isinstance(layer.base_layer, nn.Conv2d) else full[:, 0]
        assert rel_err(single, expected) < 1e-12


@pytest.mark.parametrize("base,match", [
    (lambda: nn.Conv2d(4, 6, 3, groups=2), "groups=2"),
    (lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"), "padding_mode='reflect'"),
    (lambda: nn.Embedding(10, 4, max_norm=1.0), "max_norm"),
    (lambda: nn.Embedding(10, 4, sparse=True), "sparse"),
    (lambda: nn.MultiheadAttention(8, 2, kdim=4, vdim=4), "kdim/vdim"),
    (lambda: nn.ConvTranspose2d(4, 6, 3), "ConvTranspose2d"),
])
@pytest.mark.parametrize("cls,kwargs", METHODS)
def test_unsupported_bases_are_refused_by_name(base, match, cls, kwargs):
    with pytest.raises((TypeError, ValueError), match=match):
        one = dict(num_experts=1) if cls is sl.SOSLinear else dict(num_clusters=1)
        cls(base(), **one, rank=1)


@pytest.mark.parametrize("cls,kwargs", METHODS)
def test_bad_inputs_are_refused(cls, kwargs):
    emb = cls(embedding(), **kwargs)
    with pytest.raises(TypeError, match="token ids"):
        emb(torch.randn(2, 3, dtype=torch.float64))
    conv = cls(conv2d(), **kwargs)
    with pytest.raises(ValueError, match=r"\[batch, 6"):
        conv(torch.randn(2, 5, 8, 8, dtype=torch.float64))
    with pytest.raises(TypeError, match="float32"):
        conv(torch.randn(2, 6, 8, 8))
    with pytest.raises(TypeError, match="one input"):
        conv(torch.randn(2, 6, 8, 8, dtype=torch.float64), 3)


def test_cps_on_a_convolution_clusters_channels_with_whole_taps():
    layer = sl.CPSLinear(conv2d(), num_clusters=3, rank=2)
    rows, cols = layer.partition()
    assert rows.shape == (9,) and cols.shape == (6,)
    delta = layer.delta_weight()  # [out, in, kh, kw]
    randomize(layer, torch.Generator().manual_seed(0))
    delta = layer.delta_weight()
    for c in range(3):
        block = delta[rows != c][:, cols == c]
        assert block.abs().max() == 0  # rows outside cluster c see none of its channels
    with pytest.raises(RuntimeError, match="not supported on a Conv2d"):
        layer.repartition(signal="delta")
    with pytest.raises(RuntimeError, match="linear bases only"):
        layer.collect_statistics()


def test_cps_embedding_repartitions_on_the_update():
    layer = sl.CPSLinear(embedding(), num_clusters=2, rank=2)
    randomize(layer, torch.Generator().manual_seed(0))
    before = layer.delta_weight()
    change = layer.repartition(signal="delta", force=True)
    assert change >= 0 and layer.delta_weight()[4].abs().max() == 0
    assert reference is not None and before.shape == layer.delta_weight().shape


@pytest.mark.parametrize("make", [embedding, conv2d, attention])
@pytest.mark.parametrize("cls,kwargs", METHODS)
def test_bfloat16_bases_train_and_merge(make, cls, kwargs):
    """float32 factors on a bf16 base (as PEFT); outputs in the base's dtype, and a merged
    layer within bf16 rounding of the unmerged one."""
    g = torch.Generator().manual_seed(6)
    layer = cls(make().to(torch.bfloat16), **kwargs).train()
    randomize(layer, g)
    assert layer.lora_A.dtype == torch.float32
    x = inputs(layer.base_layer, g)
    x = x.to(torch.bfloat16) if x.is_floating_point() else x
    y = call(layer, x)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all()
               for _, p in layer.named_parameters() if p.requires_grad)
    layer.eval()
    with torch.no_grad():
        unmerged = call(layer, x)
        layer.merge()
        assert rel_err(call(layer, x), unmerged) < 2e-2
