"""The fake kernels (ops/fakes.py) check their inputs as the C++ ops do: every bad call that the
real op refuses on the CPU, its fake refuses under FakeTensorMode (and on meta tensors) with the
same message, and good calls get the real outputs' shapes and dtypes, with static and symbolic
sizes. opcheck (test_ops.py, test_adapted_linear.py, test_cps.py) covers the other good calls."""
import contextlib

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv

import soslora_ext  # noqa: F401  registers torch.ops.soslora

_ops = torch.ops.soslora
F32, F64, I64 = torch.float32, torch.float64, torch.int64
_gen = torch.Generator().manual_seed(0)


def t(*shape, dtype=F32):
    """A random tensor for the tables below (integer dtypes get small integers)."""
    if dtype.is_floating_point:
        return torch.randn(shape, generator=_gen, dtype=dtype)
    return torch.randint(0, 3, shape, generator=_gen, dtype=dtype)


def make(name, N=3, n_in=4, n_out=6, r=2, dtype=F32, p=0.3, on_input=False, blocks=False,
         factor_dtype=None):
    """Valid arguments of op `name` (a dict in schema order): x [N, in], A [r, in], B [out, r];
    blocks: CPS-LoRA's partition into two clusters of ranks (r, r - 1)."""
    fd = factor_dtype or dtype
    seed = torch.tensor([7, 8]) if p > 0 else None
    drop = dict(dropout_seed=seed, dropout_p=p)
    ranks = [r, max(r - 1, 0)]
    partition = dict(row_index=torch.randperm(n_out, generator=_gen),
                     col_index=torch.randperm(n_in, generator=_gen),
                     row_offsets=[0, n_out // 2, n_out], col_offsets=[0, n_in // 2, n_in],
                     ranks=ranks)
    layout = partition if blocks else dict(row_index=None, col_index=None, row_offsets=[],
                                           col_offsets=[], ranks=[])
    x, A, B = t(N, n_in, dtype=dtype), t(r, n_in, dtype=fd), t(n_out, r, dtype=fd)
    R = sum(ranks) if blocks else r  # the rank of the dense factors
    scale = t(2) if blocks else t(r, n_out)  # adapted_linear's: G = r ranks, per channel
    lowrank = dict(x=x, A=A, B=B, scale=t(r, dtype=dtype))
    cluster = dict(x=x, A=A, B=B, scale=t(2), **partition)
    if name == "lowrank_forward":
        return dict(**lowrank, base_out=t(N, n_out, dtype=dtype), **drop, dropout_on_input=on_input)
    if name == "linear_lowrank_forward":
        return dict(x=x, weight=t(n_out, n_in, dtype=dtype), bias=t(n_out, dtype=dtype), A=A, B=B,
                    scale=lowrank["scale"], **drop, dropout_on_input=on_input)
    if name == "linear_lowrank_grad_x":
        return dict(grad_out=t(N, n_out, dtype=dtype), weight=t(n_out, n_in, dtype=dtype),
                    grad_hidden=t(N, r, dtype=dtype), A=A, **drop, dropout_on_input=on_input)
    if name == "lowrank_grad_hidden":
        return dict(grad_out=t(N, n_out, dtype=dtype), B=B, scale=t(n_out, r, dtype=dtype),
                    hidden=t(N, r, dtype=dtype), **drop, dropout_on_input=on_input)
    if name == "lowrank_grad_A":
        return dict(grad_hidden=t(N, r, dtype=dtype), x=x, **drop, dropout_on_input=on_input)
    if name == "lowrank_grad_x":
        return dict(grad_hidden=t(N, r, dtype=dtype), A=A, grad_x_base=t(N, n_in, dtype=dtype),
                    **drop, dropout_on_input=on_input)
    if name == "input_dropout_grads_":
        return dict(grad_x=t(N, n_in, dtype=dtype), grad_hidden=t(N, r, dtype=dtype), A=A, x=x,
                    dropout_seed=torch.tensor([7, 8]), dropout_p=p)
    if name == "cluster_lowrank_forward":
        return dict(**cluster, base_out=t(N, n_out, dtype=dtype), **drop)
    if name == "cluster_lowrank_backward":
        return dict(grad_out=t(N, n_out, dtype=dtype), x=x, A=A, B=B, scale=t(2),
                    hidden=t(N, sum(ranks), dtype=dtype), grad_hidden=t(N, sum(ranks), dtype=dtype),
                    **partition, grad_x_base=t(N, n_in, dtype=dtype), **drop)
    if name == "dropout_mask":
        return dict(dropout_seed=torch.tensor([7, 8]), size=[N, n_in, r], dropout_p=p, dtype=dtype)
    if name == "ortho_penalty":
        return dict(A=t(2 * r, n_in, dtype=dtype), num_experts=2)
    if name == "ortho_penalty_grad_":
        return dict(grad_A=t(2 * r, n_in, dtype=dtype), A=t(2 * r, n_in, dtype=dtype),
                    weight=torch.tensor(0.5), num_experts=2)
    if name == "merge_into_":
        return dict(weight=t(n_out, n_in, dtype=dtype), A=A, B=B, scale=lowrank["scale"],
                    alpha=0.5, max_abs=None)
    if name == "weight_stats":
        return dict(weight=t(n_out, n_in, dtype=dtype))
    base = dict(weight=t(n_out, n_in, dtype=dtype), bias=t(n_out, dtype=dtype))
    if name == "adapted_linear_forward":
        return dict(x=x, **base, base_out=None, A=A, B=B, scale=scale, **layout, **drop,
                    dropout_on_input=on_input)
    if name == "adapted_linear_backward":
        return dict(grad_out=t(N, n_out, dtype=dtype), x=x, weight=base["weight"], A=A, B=B,
                    scale=scale, hidden=t(N, R, dtype=dtype), scaled_B=t(n_out, R, dtype=dtype),
                    **layout, **drop, dropout_on_input=on_input, ortho_lambda=torch.tensor(0.1),
                    num_experts=r, grad_A_multiplier=2.0, output_mask=[True] * 3 + [not blocks])
    assert name == "adapted_linear", name
    return dict(x=x, **base, base_out=None, A=A, B=B, scale=scale, **layout,
                dense_blocks=False, dropout_p=p, dropout_on_input=on_input,
                ortho_lambda=None, num_experts=1, grad_A_multiplier=1.0, gate_logits=None,
                gate_temperature=None, uniform_prior=0.0, anchor_scales=None, scale_anchor=0.0)


def bad(name, phrase, opts=None, **change):
    """A call of op `name` that the real op refuses with a message containing `phrase`."""
    return pytest.param(name, opts or {}, change, phrase, id=f"{name}: {phrase}")


SEED = torch.tensor([7, 8])
BLOCKS = dict(blocks=True)
CLUSTER_FORM = dict(blocks=True, on_input=True)  # adapted_linear by the cluster op
BAD = [
    bad("lowrank_forward", "x must be 2-D", x=t(4)),
    bad("lowrank_forward", "A must be 2-D", A=t(2, 4, 1)),
    bad("lowrank_forward", "A must be [r, in] with in = x.size(1) = 4", A=t(2, 5)),
    bad("lowrank_forward", "B must be [out, r]", B=t(6, 3)),
    bad("lowrank_forward", "x and A must have the same dtype", A=t(2, 4, dtype=F64)),
    bad("lowrank_forward", "x must be a floating-point tensor", x=t(3, 4, dtype=I64)),
    bad("lowrank_forward", "scale must be [r]", scale=t(3)),
    bad("lowrank_forward", "scale must be [r]", scale=t(6, 3)),
    bad("lowrank_forward", "scale must be a floating-point", scale=t(2, dtype=I64)),
    bad("lowrank_forward", "base_out must be [N, out]", base_out=t(3, 5)),
    bad("lowrank_forward", "base_out and x must have the same dtype", base_out=t(3, 6, dtype=F64)),
    bad("lowrank_forward", "dropout_p must be in [0, 1)", dropout_p=1.0),
    bad("lowrank_forward", "dropout_p must be in [0, 1)", dropout_p=-0.1),
    bad("lowrank_forward", "dropout_seed is required", dropout_seed=None),
    bad("lowrank_forward", "dropout_seed must be an int64", dropout_seed=t(2)),
    bad("lowrank_forward", "dropout_seed must be an int64", dropout_seed=torch.tensor([1, 2, 3])),
    bad("linear_lowrank_forward", "weight must be 2-D", weight=t(6)),
    bad("linear_lowrank_forward", "weight must be [out, in]", weight=t(6, 5)),
    bad("linear_lowrank_forward", "x and weight must have the same dtype",
        weight=t(6, 4, dtype=F64)),
    bad("linear_lowrank_forward", "bias must be [out]", bias=t(5)),
    bad("linear_lowrank_forward", "bias and x must have the same dtype", bias=t(6, dtype=F64)),
    bad("linear_lowrank_forward", "B must be [out, r] with out = weight", B=t(7, 2)),
    bad("linear_lowrank_forward", "scale must be [r]", scale=t(1)),
    bad("linear_lowrank_forward", "dropout_seed is required", dropout_seed=None),
    bad("linear_lowrank_grad_x", "grad_hidden must be 2-D", grad_hidden=t(3)),
    bad("linear_lowrank_grad_x", "expected grad_out [N, out], weight", A=t(2, 5)),
    bad("linear_lowrank_grad_x", "expected grad_out [N, out], weight", grad_hidden=t(4, 2)),
    bad("linear_lowrank_grad_x", "grad_out and A must have the same dtype", A=t(2, 4, dtype=F64)),
    bad("linear_lowrank_grad_x", "dropout_seed must be an int64", dropout_seed=SEED.int()),
    bad("lowrank_grad_hidden", "hidden must be 2-D", hidden=t(3, 2, 1)),
    bad("lowrank_grad_hidden", "expected grad_out [N, out], B", hidden=t(3, 3)),
    bad("lowrank_grad_hidden", "grad_out and B must have the same dtype", B=t(6, 2, dtype=F64)),
    bad("lowrank_grad_hidden", "scale must be [r]", scale=t(2, 6)),
    bad("lowrank_grad_hidden", "dropout_p must be in", dropout_p=1.5),
    bad("lowrank_grad_A", "grad_hidden must be 2-D", grad_hidden=t(3)),
    bad("lowrank_grad_A", "must share N", x=t(4, 4)),
    bad("lowrank_grad_A", "grad_hidden and x must have the same dtype", x=t(3, 4, dtype=I64)),
    bad("lowrank_grad_A", "grad_hidden must be a floating-point", grad_hidden=t(3, 2, dtype=I64)),
    bad("lowrank_grad_A", "dropout_seed must be an int64", dropout_seed=SEED.view(2, 1)),
    bad("lowrank_grad_x", "must share r", A=t(3, 4)),
    bad("lowrank_grad_x", "grad_x_base must be [N, in]", grad_x_base=t(3, 5)),
    bad("lowrank_grad_x", "grad_x_base must be [N, in]", grad_x_base=t(12)),
    bad("lowrank_grad_x", "grad_x_base and grad_hidden must have the same dtype",
        grad_x_base=t(3, 4, dtype=F64)),
    bad("lowrank_grad_x", "dropout_seed is required", dropout_seed=None),
    bad("input_dropout_grads_", "x must be 2-D", x=t(12)),
    bad("input_dropout_grads_", "expected grad_x [N, in]", grad_x=t(3, 5)),
    bad("input_dropout_grads_", "expected grad_x [N, in]", A=t(3, 4)),
    bad("input_dropout_grads_", "A and x must have the same dtype", A=t(2, 4, dtype=F64)),
    bad("input_dropout_grads_", "dropout_seed must be an int64", dropout_seed=t(2)),
    bad("input_dropout_grads_", "dropout_p must be in", dropout_p=1.0),
    bad("cluster_lowrank_forward", "A must be 2-D", A=t(8)),
    bad("cluster_lowrank_forward", "A must be [r_max, in]", A=t(2, 5)),
    bad("cluster_lowrank_forward", "B must be [out, r_max]", B=t(6, 3)),
    bad("cluster_lowrank_forward", "x and B must have the same dtype", B=t(6, 2, dtype=F64)),
    bad("cluster_lowrank_forward", "ranks must name at least one cluster", ranks=[]),
    bad("cluster_lowrank_forward", "scale must be a floating-point tensor [num_clusters]",
        scale=t(3)),
    bad("cluster_lowrank_forward", "scale must be a floating-point tensor [num_clusters]",
        scale=t(2, dtype=I64)),
    bad("cluster_lowrank_forward", "row_index must be an int64 permutation of shape [6]",
        row_index=torch.arange(5)),
    bad("cluster_lowrank_forward", "col_index must be an int64 permutation",
        col_index=torch.arange(4, dtype=torch.int32)),
    bad("cluster_lowrank_forward", "row_offsets must have num_clusters + 1", row_offsets=[0, 6]),
    bad("cluster_lowrank_forward", "col_offsets must start at 0 and end at 4",
        col_offsets=[0, 2, 3]),
    bad("cluster_lowrank_forward", "col_offsets must be non-decreasing", col_offsets=[0, 3, 2, 4],
        ranks=[1, 1, 1], scale=t(3), row_offsets=[0, 2, 4, 6]),
    bad("cluster_lowrank_forward", "every rank must be in [0, r_max = 2]", ranks=[3, 1]),
    bad("cluster_lowrank_forward", "every rank must be in", ranks=[-1, 1]),
    bad("cluster_lowrank_forward", "base_out must be [N, out]", base_out=t(3, 7)),
    bad("cluster_lowrank_forward", "dropout_seed is required", dropout_seed=None),
    bad("cluster_lowrank_backward", "grad_out must be 2-D", grad_out=t(18)),
    bad("cluster_lowrank_backward", "grad_out must be [N, out]", grad_out=t(3, 5)),
    bad("cluster_lowrank_backward", "grad_out and x must have the same dtype",
        grad_out=t(3, 6, dtype=F64)),
    bad("cluster_lowrank_backward", "hidden must be [N, sum(ranks)] = [3, 3]", hidden=t(3, 2)),
    bad("cluster_lowrank_backward", "grad_hidden must have hidden's shape", grad_hidden=t(3, 2)),
    bad("cluster_lowrank_backward", "grad_hidden and x must have the same dtype",
        grad_hidden=t(3, 3, dtype=F64)),
    bad("cluster_lowrank_backward", "grad_x_base must be [N, in]", grad_x_base=t(3, 5)),
    bad("cluster_lowrank_backward", "grad_x_base and x must have the same dtype",
        grad_x_base=t(3, 4, dtype=F64)),
    bad("cluster_lowrank_backward", "every rank must be in", ranks=[2, 3]),
    bad("cluster_lowrank_backward", "dropout_seed must be an int64", dropout_seed=SEED.float()),
    bad("adapted_linear_forward", "x must be floating-point", x=t(3, 4, dtype=I64)),
    bad("adapted_linear_forward", "x must be 2-D", x=t(1, 3, 4)),
    bad("adapted_linear_forward", "B must be floating-point", B=t(6, 2, dtype=I64)),
    bad("adapted_linear_forward", "A must be [r, in]", A=t(2, 3)),
    bad("adapted_linear_forward", "B must be [out, r]", B=t(6, 1)),
    bad("adapted_linear_forward", "scale must be [G] or [G, out]", scale=t(4)),
    bad("adapted_linear_forward", "scale must be [G] or [G, out]", scale=t(2, 5)),
    bad("adapted_linear_forward", "scale must be [G] or [G, out]", scale=t()),
    bad("adapted_linear_forward", "scale must be [G] or [G, out]", scale=t(0)),
    bad("adapted_linear_forward", "scale must be floating-point", scale=t(2, dtype=I64)),
    bad("adapted_linear_forward", "not both", base_out=t(3, 6)),
    bad("adapted_linear_forward", "bias needs weight", weight=None),
    bad("adapted_linear_forward", "weight must be [out, in]", weight=t(6, 5)),
    bad("adapted_linear_forward", "weight and x must have the same dtype",
        weight=t(6, 4, dtype=F64)),
    bad("adapted_linear_forward", "bias must be [out]", bias=t(1, 6)),
    bad("adapted_linear_forward", "base_out must be [N, out]", weight=None, bias=None,
        base_out=t(3, 5)),
    bad("adapted_linear_forward", "dropout_seed is required", dropout_seed=None),
    bad("adapted_linear_forward", "every rank must be in", BLOCKS, ranks=[3, 1]),
    bad("adapted_linear_forward", "col_offsets must start at 0", BLOCKS, col_offsets=[1, 2, 4]),
    bad("adapted_linear_forward", "scale must be a floating-point tensor [num_clusters]", BLOCKS,
        scale=t(3)),
    bad("adapted_linear_backward", "grad_out must be 2-D", grad_out=t(18)),
    bad("adapted_linear_backward", "expected grad_out [N, out], hidden", grad_out=t(3, 5)),
    bad("adapted_linear_backward", "expected grad_out [N, out], hidden", hidden=t(3, 3)),
    bad("adapted_linear_backward", "expected grad_out [N, out], hidden", scaled_B=t(5, 2)),
    bad("adapted_linear_backward", "scaled_B must be 2-D", scaled_B=t(6)),
    bad("adapted_linear_backward", "scaled_B [out, R] with R = 2", scaled_B=t(6, 3), hidden=t(3, 3),
        output_mask=[False, True, False, False]),  # R checked against A's rank
    bad("adapted_linear_backward", "row_index needs col_index", BLOCKS, col_index=None),
    bad("adapted_linear_forward", "row_index needs col_index", BLOCKS, col_index=None),
    bad("adapted_linear_forward", "col_index needs row_index", col_index=torch.arange(4)),
    bad("adapted_linear_backward", "hidden and x must have the same dtype",
        hidden=t(3, 2, dtype=F64)),
    bad("adapted_linear_backward", "A must be [r, in]", A=t(2, 5)),
    bad("adapted_linear_backward", "scale must be [G] or [G, out]", scale=t(3)),
    bad("adapted_linear_backward", "weight must be [out, in]", weight=t(5, 4)),
    bad("adapted_linear_backward", "dropout_p must be in", dropout_p=2.0),
    bad("adapted_linear_backward", "the cluster scales are fixed", BLOCKS,
        output_mask=[True] * 4),
    bad("adapted_linear_backward", "weight must be a floating-point tensor with one element",
        ortho_lambda=t(2)),
    bad("adapted_linear_backward", "must be divisible by num_experts", num_experts=3),
    bad("adapted_linear", "scale must be [G] or [G, out], got []", scale=t()),
    bad("adapted_linear", "gate_logits and gate_temperature come together", gate_logits=t(2)),
    bad("adapted_linear", "gate_logits must be [G] = [2]", gate_logits=t(3),
        gate_temperature=torch.tensor(1.5)),
    bad("adapted_linear", "gate_logits must be a floating-point tensor",
        gate_logits=t(2, dtype=I64), gate_temperature=torch.tensor(1.5)),
    bad("adapted_linear", "gate_temperature must be 0-d or have one element", gate_logits=t(2),
        gate_temperature=t(2)),
    bad("adapted_linear", "gate_temperature must be 0-d or have one element, got shape [1, 1]",
        gate_logits=t(2), gate_temperature=torch.ones(1, 1)),
    bad("adapted_linear", "ortho_lambda must be a floating-point tensor with one element",
        ortho_lambda=t(3), num_experts=2),
    bad("adapted_linear", "A.size(0) = 2 must be divisible by num_experts = 3",
        ortho_lambda=t(), num_experts=3),
    bad("adapted_linear", "num_experts must be >= 1", num_experts=0),
    bad("adapted_linear", "A must be floating-point, got Long", CLUSTER_FORM,
        A=t(2, 4, dtype=I64)),  # checked before the cluster form casts the factors
    bad("cluster_lowrank_backward", "hidden and x must have the same dtype", BLOCKS,
        hidden=t(3, 3, dtype=F64)),
    bad("adapted_linear", "anchor_scales must be [G] = [2]", anchor_scales=t(3)),
    bad("adapted_linear", "anchor_scales must be [G] = [2] with a [G, out] scale",
        scale=t(2), anchor_scales=t(2)),
    bad("adapted_linear", "not to cluster blocks", BLOCKS, gate_logits=t(2),
        gate_temperature=torch.tensor(1.5)),
    bad("adapted_linear", "soslora::adapted_linear: dropout_p must be in", dropout_p=1.0),
    bad("adapted_linear", "adapted_linear_forward: A must be [r, in]", A=t(2, 5)),
    bad("adapted_linear", "adapted_linear_forward: every rank must be in", BLOCKS,
        dense_blocks=True, ranks=[1, 3]),
    bad("adapted_linear", "the cluster form drops the input", BLOCKS),
    bad("adapted_linear", "soslora::adapted_linear: bias needs weight", CLUSTER_FORM,
        weight=None),
    bad("adapted_linear", "cluster_lowrank_forward: every rank must be in", CLUSTER_FORM,
        ranks=[1, 3]),
    bad("adapted_linear", "cluster_lowrank_forward: x must be a floating-point", CLUSTER_FORM,
        x=t(3, 4, dtype=I64), weight=None, bias=None),
    bad("dropout_mask", "dtype must be floating-point, got Int", dtype=torch.int32),
    bad("dropout_mask", "dropout_p must be in", dropout_p=1.0),
    bad("dropout_mask", "dropout_seed must be an int64", dropout_seed=t(2)),
    bad("ortho_penalty", "A must be 2-D [r_tot, in]", A=t(8)),
    bad("ortho_penalty", "A must be floating-point", A=t(4, 4, dtype=I64)),
    bad("ortho_penalty", "num_experts must be >= 1", num_experts=0),
    bad("ortho_penalty", "must be divisible by num_experts", num_experts=3),
    bad("ortho_penalty_grad_", "grad_A must have A's shape", grad_A=t(4, 3)),
    bad("ortho_penalty_grad_", "grad_A must be floating-point", grad_A=t(4, 4, dtype=I64)),
    bad("ortho_penalty_grad_", "weight must be a floating-point tensor with one element",
        weight=t(2)),
    bad("ortho_penalty_grad_", "weight must be a floating-point tensor with one element",
        weight=torch.tensor(1)),
    bad("ortho_penalty_grad_", "must be divisible by num_experts", num_experts=3),
    bad("merge_into_", "must be 2-D", weight=t(24)),
    bad("merge_into_", "shapes do not chain", A=t(2, 5)),
    bad("merge_into_", "shapes do not chain", weight=t(5, 4)),
    bad("merge_into_", "weight, A and B must be floating-point", A=t(2, 4, dtype=I64)),
    bad("merge_into_", "scale must be [r]", scale=t(3)),
    bad("merge_into_", "share memory", weight=t(1, 4).expand(6, 4)),
    bad("merge_into_", "weight must be float32, float64, float16 or bfloat16",
        weight=t(6, 4).to(torch.float8_e4m3fn)),
    bad("weight_stats", "weight must be a 2-D [out, in] matrix", weight=t(6)),
    bad("weight_stats", "weight must be float32, float64, float16 or bfloat16",
        weight=t(6, 4, dtype=I64)),
]


def to_meta(v):
    """v on the meta device, strides kept (an expanded weight stays expanded)."""
    if not isinstance(v, torch.Tensor):
        return v
    return torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device="meta")


def run_fake(name, args, *, shape_env=None, inference=False, meta=False):
    """The op on fake tensors (FakeTensorMode), or on meta tensors; inference mode bypasses
    the C++ autograd node of adapted_linear, so that its own fake runs."""
    if meta:
        mode, args = contextlib.nullcontext(), [to_meta(a) for a in args]
    else:
        mode = FakeTensorMode(shape_env=shape_env)
        args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
    with mode, torch.inference_mode(inference):
        return getattr(_ops, name)(*args)


def error_of(call):
    with pytest.raises(Exception) as info:
        call()
    return info.value


@pytest.mark.parametrize("name,opts,change,phrase", BAD)
def test_fake_refuses_what_the_op_refuses_with_its_message(name, opts, change, phrase):
    args = list({**make(name, **opts), **change}.values())
    real = error_of(lambda: getattr(_ops, name)(*args))
    assert isinstance(real, (RuntimeError, IndexError)) and phrase in str(real), real
    for how in (dict(), dict(inference=True), dict(meta=True)):
        fake = error_of(lambda: run_fake(name, args, **how))
        message = str(real).replace("cpu", "meta") if how.get("meta") else str(real)
        assert (type(fake), str(fake)) == (type(real), message), how


def test_every_op_with_a_fake_has_bad_calls():
    # Every op but dropout_seed, which takes any tensor.
    ops = {n.split("::")[1] for n in torch._C._dispatch_get_all_op_names()
           if n.startswith("soslora::")}
    assert ops - {"dropout_seed"} == {p.values[0] for p in BAD}


# ---- devices: a meta tensor among CPU ones (CUDA below, where there is one) ---------------------
DEVICE = [
    ("lowrank_forward", {}, "A", "x and A must be on the same device, got cpu and meta"),
    ("lowrank_forward", {}, "base_out",
     "base_out and x must be on the same device, got meta and cpu"),
    ("lowrank_forward", {}, "scale", "scale must be on B's device cpu, got meta"),
    ("lowrank_forward", {}, "dropout_seed", "dropout_seed must be on cpu, got meta"),
    ("lowrank_grad_x", {}, "grad_x_base",
     "grad_x_base and grad_hidden must be on the same device, got meta and cpu"),
    ("adapted_linear_forward", {}, "scale", "scale must be on x's device cpu, got meta"),
    ("adapted_linear_forward", BLOCKS, "row_index", "row_index must be on cpu, got meta"),
    ("cluster_lowrank_forward", {}, "scale",
     "scale must be a floating-point tensor [num_clusters] = [2] on cpu, got Float [2] on meta"),
    ("cluster_lowrank_backward", {}, "col_index", "col_index must be on cpu, got meta"),
    ("merge_into_", {}, "B", "weight, A and B must be on one device, got cpu, cpu, meta"),
    ("ortho_penalty_grad_", {}, "weight",
     "grad_A, A and weight must be on one device, got cpu, cpu, meta"),
    ("input_dropout_grads_", {}, "grad_x", "grad_x and x must be on the same device, got meta "
     "and cpu"),
]


@pytest.mark.parametrize("name,opts,moved,message", DEVICE, ids=[f"{d[0]}: {d[2]}" for d in DEVICE])
def test_fake_refuses_a_tensor_on_another_device(name, opts, moved, message):
    # The CPU kernels never see a meta tensor (the dispatcher picks the meta kernel, the fake):
    # the message is the C++ one, as written in csrc/.
    kwargs = make(name, **opts)
    kwargs[moved] = kwargs[moved].to("meta")
    args = list(kwargs.values())
    for fake in (error_of(lambda: getattr(_ops, name)(*args)),
                 error_of(lambda: run_fake(name, args))):
        assert isinstance(fake, RuntimeError) and str(fake) == f"soslora::{name}: {message}"


def test_adapted_linear_scale_terms_device_check_matches_the_cpp_one():
    # The C++ autograd node checks the scale terms on any device: its message, and the fake's.
    args = list({**make("adapted_linear"), "gate_logits": t(2).to("meta"),
                 "gate_temperature": torch.tensor(1.5)}.values())
    real = error_of(lambda: _ops.adapted_linear(*args))
    fake = error_of(lambda: run_fake("adapted_linear", args, inference=True))
    assert str(real) == str(fake) == ("soslora::adapted_linear: gate_logits must be a "
                                      "floating-point tensor on scale's device cpu, got Float "
                                      "on meta")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name,opts,moved,message", DEVICE, ids=[f"{d[0]}: {d[2]}" for d in DEVICE])
def test_fake_refuses_cpu_and_cuda_mixed_as_the_op_does(name, opts, moved, message):
    kwargs = make(name, **opts)
    kwargs = {k: v.cuda() if isinstance(v, torch.Tensor) and k != moved else v
              for k, v in kwargs.items()}
    args = list(kwargs.values())
    real = error_of(lambda: getattr(_ops, name)(*args))
    assert str(error_of(lambda: run_fake(name, args))) == str(real)


# ---- what a fake cannot check ---------------------------------------------------------------
@pytest.mark.parametrize("name", ["cluster_lowrank_forward", "adapted_linear_forward"])
def test_partition_values_are_left_to_the_op(name):
    # Whether the indices are permutations depends on their values, which fake tensors lack.
    kwargs = make(name, blocks=True)
    kwargs["row_index"] = torch.zeros(6, dtype=I64)
    args = list(kwargs.values())
    with pytest.raises(RuntimeError, match="row_index must be a permutation"):
        getattr(_ops, name)(*args)
    run_fake(name, args)


# ---- good calls: the fakes' outputs are the op's ---------------------------------------------
def good(name, seed, change=None, **opts):
    """A good call of op `name` with odd random sizes (N, in, out and r from 1 to 13)."""
    g = torch.Generator().manual_seed(seed)
    sizes = (2 * int(v) + 1 for v in torch.randint(0, 7, (4,), generator=g))
    opts = {**dict(zip(("N", "n_in", "n_out", "r"), sizes)), **opts}
    tag = ",".join(f"{k}={v}" if not isinstance(v, torch.Tensor) else k
                   for k, v in {**opts, **(change or {})}.items())
    return pytest.param(name, opts, change or {}, id=f"{name}({tag})")


DTYPES, BLOCK_FORMS = (F32, F64), (False, True)
DROPS = [dict(p=0.0), dict(p=0.3), dict(p=0.3, on_input=True)]
MASKS = ([False, True, False, False], [True, False, True, False], [False] * 4, [True] * 4)
GOOD = [  # what opcheck does not call
    *(good("cluster_lowrank_backward", i, dtype=dt, p=p, change=c) for i, (dt, p, c) in
      enumerate((dt, p, c) for dt in DTYPES for p in (0.0, 0.3)
                for c in ({}, dict(grad_hidden=None, grad_x_base=None)))),
    good("cluster_lowrank_forward", 9, dtype=F32, change=dict(base_out=None)),
    *(good("adapted_linear_forward", 10 + i, dtype=dt, blocks=b, **d) for i, (dt, b, d) in
      enumerate((dt, b, d) for dt in DTYPES for b in BLOCK_FORMS for d in DROPS)),
    good("adapted_linear_forward", 30, factor_dtype=F64, change=dict(bias=None)),
    good("adapted_linear_forward", 31, change=dict(weight=None, bias=None)),
    *(good("adapted_linear_backward", 40 + i, dtype=dt, blocks=b, change=dict(output_mask=m))
      for i, (dt, b, m) in enumerate((dt, b, m) for dt in DTYPES for b in BLOCK_FORMS
                                     for m in MASKS if not (b and m[3]))),
    good("adapted_linear_backward", 60, p=0.3, on_input=True, change=dict(weight=None)),
    good("adapted_linear_backward", 61, dtype=F64, factor_dtype=F32, p=0.0),
    *(good("adapted_linear", 70 + i, dtype=dt, blocks=b, on_input=b, change=c) for i, (dt, b, c)
      in enumerate((dt, b, c) for dt in DTYPES for b in BLOCK_FORMS
                   for c in ({}, dict(dense_blocks=True), dict(weight=None, bias=None)))),
    good("adapted_linear", 90, factor_dtype=F64, change=dict(bias=None)),
    good("adapted_linear", 91, N=5, n_in=7, n_out=9, r=3,
         change=dict(gate_logits=t(3), gate_temperature=torch.tensor(1.5), anchor_scales=t(3),
                     scale_anchor=0.2, uniform_prior=0.1)),
    good("input_dropout_grads_", 92, dtype=F64, p=0.0),
    good("dropout_mask", 93, dtype=F64),
    good("lowrank_grad_hidden", 94, dtype=F64, p=0.3, on_input=True),
]


@pytest.mark.parametrize("symbolic", [False, True], ids=["static", "symbolic"])
@pytest.mark.parametrize("name,opts,change", GOOD)
def test_fake_outputs_are_the_ops(name, opts, change, symbolic):
    args = list({**make(name, **opts), **change}.values())
    torch.manual_seed(0)
    real = getattr(_ops, name)(*args)
    real = real if isinstance(real, tuple) else (real,)
    for inference in (False, True):
        fake = run_fake(name, args, shape_env=ShapeEnv() if symbolic else None,
                        inference=inference)
        fake = fake if isinstance(fake, tuple) else (fake,)
        assert [None if f is None else (tuple(f.shape), f.dtype, f.device) for f in fake] == \
            [None if r is None else (tuple(r.shape), r.dtype, r.device) for r in real]
