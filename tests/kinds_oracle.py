"""The float64 oracle of an adapter over another kind than a linear layer (an embedding, a
convolution, an attention module): the dense update written plainly, applied by the base's own
functional form."""
import torch
import torch.nn as nn
import torch.nn.functional as F

import soslora_ext as sl

from conftest import oracle_expert_scales


def randomize(layer, g):
    with torch.no_grad():
        for adapter in [layer] + layer.nested_adapters():
            adapter.lora_B.copy_(torch.randn(adapter.lora_B.shape, generator=g) * 0.3)
            if getattr(adapter, "expert_scales", None) is not None:
                adapter.expert_scales.mul_(torch.rand(adapter.expert_scales.shape,
                                                      generator=g) + 0.5)
            if getattr(adapter, "gate_logits", None) is not None:
                adapter.gate_logits.copy_(torch.randn(adapter.gate_logits.shape, generator=g))


def oracle_delta(layer, params):
    """The dense [out, in] update from the parameters `params`, written plainly."""
    A, B = params["lora_A"], params["lora_B"]
    if isinstance(layer, sl.SOSLinear):
        scales = oracle_expert_scales(layer, params)
        delta = torch.zeros(layer.out_features, layer.in_features, dtype=torch.float64)
        for k, s in enumerate(layer.expert_ranges):
            scale = scales[k] if scales.dim() == 1 else scales[k][:, None]
            delta = delta + scale * (B[:, s] @ A[s])
        return delta
    # CPS: cluster c's block, columns = input channels with all their kernel taps.
    rows, cols = layer.partition()
    taps = layer.in_features // len(cols)
    row_off, col_off = (t.tolist() for t in (layer.row_offsets, layer.col_offsets))
    delta = torch.zeros(layer.out_features, len(cols), taps, dtype=torch.float64)
    for c, r in enumerate(layer.ranks):
        R = layer.row_index[row_off[c]:row_off[c + 1]]
        C = layer.col_index[col_off[c]:col_off[c + 1]]
        a = A[:r, col_off[c] * taps:col_off[c + 1] * taps].reshape(r, len(C), taps)
        b = B[row_off[c]:row_off[c + 1], :r]
        block = float(layer.cluster_scales[c]) * torch.einsum("or,rct->oct", b, a)
        delta = delta.index_put((R[:, None], C[None, :]), block, accumulate=True)
    return delta.reshape(layer.out_features, layer.in_features)


def oracle_forward(layer, x, params, nested_params=None):
    """The base's functional form with weight + the oracle update (float64)."""
    base = layer.base_layer
    delta = oracle_delta(layer, params)
    if isinstance(base, nn.Embedding):
        return F.embedding(x, base.weight + delta.t(), padding_idx=base.padding_idx)
    if isinstance(base, nn.MultiheadAttention):
        out_proj = base.out_proj
        w_out = out_proj.base_layer.weight + oracle_delta(out_proj, nested_params)
        q = x if not base.batch_first else x.transpose(0, 1)
        y, _ = F.multi_head_attention_forward(
            q, q, q, base.embed_dim, base.num_heads, base.in_proj_weight + delta,
            base.in_proj_bias, None, None, False, 0.0, w_out, out_proj.bias, training=False,
            need_weights=False)
        return y if not base.batch_first else y.transpose(0, 1)
    return base._conv_forward(x, base.weight + delta.reshape(base.weight.shape), base.bias)


def leaf_params(layer):
    return {n: p.detach().clone().requires_grad_() for n, p in layer.named_adapter_parameters()
            if "." not in n}
