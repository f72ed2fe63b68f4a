"""CPS-LoRA's cluster-local forward over convolutions and embeddings (layers/cps_kinds.py):
values and every gradient against the float64 oracle (the dense merged weight applied by the
base's functional form) with uneven, random and empty clusters, odd shapes, dropout, and
merged against unmerged."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import soslora_ext as sl
from soslora_ext.layers import cps_kinds

from conftest import rel_err
from kinds_oracle import leaf_params, oracle_delta, oracle_forward, randomize

F64 = dict(dtype=torch.float64)


def conv1d_dilated():
    return nn.Conv1d(7, 10, 4, stride=3, padding=3, dilation=2, **F64)


def conv2d_odd():
    return nn.Conv2d(11, 13, (3, 2), stride=(2, 1), padding=(2, 0), dilation=(1, 2), **F64)


def conv3d_odd():
    return nn.Conv3d(5, 9, (2, 1, 3), stride=(1, 2, 1), padding=(1, 0, 2), bias=False, **F64)


# Channels that G = 2 and G = 3 split evenly: the grouped-convolution path at equal ranks.
def conv1d_even():
    return nn.Conv1d(6, 12, 3, stride=2, padding=1, dilation=3, **F64)


def conv2d_even():
    return nn.Conv2d(12, 18, (3, 2), stride=(1, 2), padding=(2, 1), dilation=(2, 1), **F64)


def conv3d_even():
    return nn.Conv3d(4, 10, (2, 2, 1), stride=(1, 2, 1), padding=(1, 0, 1), **F64)


def embedding_odd():
    return nn.Embedding(37, 11, padding_idx=30, **F64)


def embedding_plain():
    return nn.Embedding(19, 9, **F64)


BASES = [conv1d_dilated, conv2d_odd, conv3d_odd, conv1d_even, conv2d_even, conv3d_even,
         embedding_odd, embedding_plain]
# Uneven: ranks differ per cluster, and a random partition gives uneven blocks after a reload.
CONFIGS = [dict(num_clusters=3, rank_per_cluster=(1, 3, 2), init_partition="random"),
           dict(num_clusters=2, rank=2, alpha=5.0, use_rslora=True),
           dict(num_clusters=3, rank=1, init_partition="random")]


def inputs(base, g, batch=(2,)):
    if isinstance(base, nn.Embedding):
        ids = torch.randint(0, base.num_embeddings, (*batch, 9), generator=g)
        if base.padding_idx is not None:
            ids.view(-1)[::4] = base.padding_idx
        return ids
    spatial = {1: (13,), 2: (9, 7), 3: (4, 6, 5)}[base.weight.dim() - 2]
    return torch.randn(*batch, base.in_channels, *spatial, generator=g, **F64)


def check_against_oracle(layer, x, g):
    """The layer's output and every gradient (input, A, B) against the oracle's."""
    floating = x.is_floating_point()
    x1, x2 = (x.clone().requires_grad_(floating) for _ in range(2))
    y = layer(x1)
    params = leaf_params(layer)
    expected = oracle_forward(layer, x2, params)
    assert y.dtype == torch.float64 and y.shape == expected.shape
    assert rel_err(y, expected) < 1e-10
    w = torch.randn(expected.shape, generator=g, **F64)
    (y * w).sum().backward()
    (expected * w).sum().backward()
    if floating:
        assert rel_err(x1.grad, x2.grad) < 1e-10
    mine = dict(layer.named_parameters())
    for name, p in params.items():
        assert mine[name].grad is not None, name
        assert rel_err(mine[name].grad, p.grad) < 1e-10, name
    return y


def with_partition(layer, row_offsets, col_offsets, g):
    """The layer moved to random row and column orders with the given cluster offsets."""
    state = layer.state_dict()
    state["row_index"] = torch.randperm(layer.out_features, generator=g)
    state["col_index"] = torch.randperm(len(layer.col_index), generator=g)
    state["row_offsets"] = torch.tensor(row_offsets)
    state["col_offsets"] = torch.tensor(col_offsets)
    layer.load_state_dict(state)
    layer._zero_padding()
    return layer


@pytest.mark.parametrize("make", BASES)
@pytest.mark.parametrize("config", CONFIGS)
def test_values_and_every_gradient_match_the_oracle(make, config):
    g = torch.Generator().manual_seed(11)
    layer = sl.CPSLinear(make(), **config).train()
    randomize(layer, g)
    check_against_oracle(layer, inputs(layer.base_layer, g), g)


@pytest.mark.parametrize("make", BASES)
def test_uneven_and_empty_clusters(make):
    """Cluster 0 has rows but no columns, cluster 1 columns but no rows: both contribute
    nothing and their factor slots get a zero gradient; the other two are uneven."""
    g = torch.Generator().manual_seed(12)
    layer = sl.CPSLinear(make(), num_clusters=4, rank=1)
    out, cols = layer.out_features, len(layer.col_index)
    layer = with_partition(layer, [0, 2, 2, 3, out], [0, 0, 3, 4, cols], g).train()
    randomize(layer, g)
    check_against_oracle(layer, inputs(layer.base_layer, g), g)
    taps = layer._taps
    assert layer.lora_B.grad[:2].abs().max() == 0  # cluster 0: rows, no columns
    assert layer.lora_A.grad[:, :3 * taps].abs().max() == 0  # cluster 1: columns, no rows


@pytest.mark.parametrize("make", [conv2d_odd, embedding_odd])
def test_no_live_cluster_gives_the_base_and_zero_gradients(make):
    g = torch.Generator().manual_seed(13)
    layer = sl.CPSLinear(make(), num_clusters=2, rank=1)
    out, cols = layer.out_features, len(layer.col_index)
    layer = with_partition(layer, [0, 0, out], [0, cols, cols], g).train()
    randomize(layer, g)
    x = inputs(layer.base_layer, g)
    y = layer(x)
    assert torch.equal(y, layer.base_layer(x))
    y.sum().backward()
    assert layer.lora_A.grad.abs().max() == 0 and layer.lora_B.grad.abs().max() == 0


@pytest.mark.parametrize("make", [conv1d_dilated, conv2d_odd, conv3d_odd, conv2d_even])
@pytest.mark.parametrize("config", CONFIGS)
def test_conv_dropout_is_one_mask_on_the_input_image(make, config):
    """As the dense path and PEFT: x dropped once, before the clusters' convolutions."""
    g = torch.Generator().manual_seed(14)
    base = make()
    layer = sl.CPSLinear(base, **config, dropout=0.4).train()
    randomize(layer, g)
    x = inputs(base, g).requires_grad_()
    torch.manual_seed(3)
    y = layer(x)
    torch.manual_seed(3)
    dropped = F.dropout(x, 0.4, training=True)
    delta = oracle_delta(layer, leaf_params(layer)).reshape(base.weight.shape)
    expected = base(x) + base._conv_forward(dropped, delta, None)
    assert rel_err(y, expected) < 1e-10
    w = torch.randn(y.shape, generator=g, **F64)
    gx, = torch.autograd.grad((y * w).sum(), x)
    gx_expected, = torch.autograd.grad((expected * w).sum(), x)
    assert rel_err(gx, gx_expected) < 1e-10


@pytest.mark.parametrize("make", BASES)
@pytest.mark.parametrize("config", CONFIGS)
def test_unbatched_and_merged_match_unmerged(make, config):
    g = torch.Generator().manual_seed(15)
    base = make()
    layer = sl.CPSLinear(base, **config).eval()
    randomize(layer, g)
    x = inputs(base, g, batch=())
    with torch.no_grad():
        y = layer(x)
        assert rel_err(y, oracle_forward(layer, x, leaf_params(layer))) < 1e-10
        layer.merge()
        assert rel_err(layer(x), y) < 1e-10
        layer.unmerge()
        assert rel_err(layer(x), y) < 1e-10


def test_embedding_gradient_reaches_only_the_looked_up_columns():
    """The lookup is of A's own columns (no permuted copy of A): unseen tokens' columns and
    the padding column get exactly zero."""
    g = torch.Generator().manual_seed(16)
    layer = sl.CPSLinear(embedding_odd(), num_clusters=3, rank=2, init_partition="random")
    randomize(layer, g)
    ids = torch.tensor([[1, 5, 30, 5]])
    layer(ids).square().sum().backward()
    position = torch.argsort(layer.col_index)
    touched = layer.lora_A.grad.abs().sum(0) != 0
    assert touched.nonzero().flatten().tolist() == sorted(position[[1, 5]].tolist())


def conv2d_rows_uneven():
    return nn.Conv2d(6, 7, 3, padding=1, **F64)


@pytest.mark.parametrize("make,config,even", [
    (conv2d_even, CONFIGS[1], True), (conv2d_even, CONFIGS[2], True),
    (conv2d_rows_uneven, CONFIGS[1], True), (conv1d_dilated, CONFIGS[2], False),
    (conv1d_even, CONFIGS[0], False), (conv2d_odd, CONFIGS[1], False)])
def test_equal_clusters_take_the_grouped_path(make, config, even):
    """Both convolution paths are covered: equal column groups of equal rank (one grouped
    convolution; the rows may differ) and the rest (one convolution per cluster)."""
    g = torch.Generator().manual_seed(18)
    layer = sl.CPSLinear(make(), **config).train()
    assert cps_kinds._even(layer) == even
    randomize(layer, g)
    check_against_oracle(layer, inputs(layer.base_layer, g), g)


@pytest.mark.parametrize("make", [conv2d_even, conv2d_odd, embedding_odd])
def test_bfloat16_base_with_float32_factors(make):
    """The products in the factors' float32, added into the bf16 base output: within bf16
    rounding of the float64 oracle."""
    g = torch.Generator().manual_seed(17)
    layer = sl.CPSLinear(make(), **CONFIGS[1]).train()
    randomize(layer, g)
    x = inputs(layer.base_layer, g)
    expected = oracle_forward(layer, x, leaf_params(layer))
    layer.base_layer.to(torch.bfloat16)
    y = layer(x.to(torch.bfloat16) if x.is_floating_point() else x)
    assert y.dtype == torch.bfloat16 and rel_err(y, expected) < 1e-2
    y.float().sum().backward()
    assert torch.isfinite(layer.lora_A.grad).all() and torch.isfinite(layer.lora_B.grad).all()
