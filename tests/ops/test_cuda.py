"""The CUDA path against the float64 oracle (skipped on machines without a CUDA device)."""
import pytest
import torch
from torch.library import opcheck

import soslora_ext as sl
from soslora_ext.ops import reference

from conftest import make_layer, oracle_forward, rel_err

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
_ops = torch.ops.soslora
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


@pytest.fixture(params=["auto", "kernels", "aten"])
def cuda_path(request):
    """Runs a test with each CUDA implementation of the low-rank ops."""
    previous = sl.ops.set_cuda_path(request.param)
    yield request.param
    sl.ops.set_cuda_path(previous)


def poison_cuda_cache():
    """Leaves NaN in the memory the caching allocator hands out next, so an output element a
    kernel forgets to write shows up."""
    torch.cuda.synchronize()
    t = torch.full((64 << 20,), float("nan"), device="cuda")
    del t


CASES = [
    # x leading shape, in, out, layer kwargs
    ((1,), 13, 7, dict(num_experts=1, rank=3)),
    ((5, 3), 9, 11, dict(num_experts=4, rank=12, rank_mode="total", dropout=0.2,
                         scale_mode="channel", gate=True)),
    ((33,), 6, 10, dict(num_experts=3, rank=3, rank_mode="expert", dropout=0.3,
                        dropout_position="pre")),  # r_tot = 9 > in = 6
    ((64,), 40, 24, dict(num_experts=8, rank=16, gate=True)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}")
def test_layer_on_cuda_matches_float64_oracle(case, dtype, cuda_path):
    lead, n_in, n_out, kwargs = case
    layer = make_layer(n_in, n_out, dtype=dtype, device="cuda", adapter_dtype=dtype, **kwargs)
    x = torch.randn(*lead, n_in, device="cuda", dtype=dtype, requires_grad=True)
    poison_cuda_cache()
    state = torch.cuda.get_rng_state()
    seed = sl.ops.new_dropout_seed(x.device).cpu() if layer.config.dropout else None
    torch.cuda.set_rng_state(state)
    y = layer(x)
    grad = torch.randn_like(y)
    trainable = {n: p for n, p in layer.named_parameters() if p.requires_grad}
    got = torch.autograd.grad(y, [x, *trainable.values()], grad)

    cpu_layer = make_layer(n_in, n_out, **kwargs)
    cpu_layer.load_state_dict({k: v.double().cpu() for k, v in layer.state_dict().items()})
    x64 = x.detach().double().cpu().requires_grad_(True)
    p64 = {n: p for n, p in cpu_layer.named_parameters() if p.requires_grad}
    y_ref = oracle_forward(cpu_layer, x64, seed, p64)
    want = torch.autograd.grad(y_ref, [x64, *p64.values()], grad.double().cpu())
    assert rel_err(y, y_ref) < TOL[dtype]
    for name, g, w in zip(["x", *trainable], got, want):
        assert rel_err(g, w) < TOL[dtype], name


# N, in, out, r, dropout p, on input: several tiles in every direction, ragged edges, r > in;
# in >= 1024 with few [N, r] tiles: x Aᵀ split over `in` (float atomics), then dropped.
KERNEL_CASES = [(1, 13, 7, 3, 0.0, False), (130, 70, 45, 67, 0.2, True),
                (257, 33, 140, 9, 0.1, False), (3001, 96, 64, 128, 0.05, True),
                (1000, 1536, 40, 16, 0.1, False), (700, 2056, 30, 8, 0.2, True)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", KERNEL_CASES, ids=str)
def test_linear_lowrank_op_matches_float64_oracle(case, dtype, cuda_path):
    from test_ops import oracle_linear_lowrank

    N, n_in, n_out, r, p, on_input = case
    g = dict(device="cuda", dtype=dtype)
    x, W = torch.randn(N, n_in, **g), torch.randn(n_out, n_in, **g) / n_in**0.5
    bias, A = torch.randn(n_out, **g), torch.randn(r, n_in, **g) / n_in**0.5
    B, scale = torch.randn(n_out, r, **g), torch.rand(n_out, r, **g) + 0.5
    seed = torch.tensor([987654321, 5], device="cuda") if p else None
    diff = [x, W, bias, A, B, scale]
    for t in diff:
        t.requires_grad_(True)
    poison_cuda_cache()
    out = sl.ops.linear_lowrank(*diff, seed, p, on_input)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, diff, grad)

    ref = [t.detach().double().cpu().requires_grad_(True) for t in diff]
    want_out = oracle_linear_lowrank(*ref, None if seed is None else seed.cpu(), p, on_input)
    want = torch.autograd.grad(want_out, ref, grad.double().cpu())
    assert rel_err(out, want_out) < TOL[dtype]
    for name, a, b in zip(["x", "weight", "bias", "A", "B", "scale"], got, want):
        assert rel_err(a, b) < TOL[dtype], name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("on_input", [False, True])
def test_kernels_and_aten_paths_agree(dtype, on_input):
    """Same seed, same mask: the hand-written kernels and the ATen path differ by rounding."""
    g = dict(device="cuda", dtype=dtype)
    x, A = torch.randn(515, 200, **g), torch.randn(24, 200, **g) / 15
    B, scale = torch.randn(77, 24, **g), torch.rand(24, device="cuda")
    seed = torch.tensor([31337, 0], device="cuda")
    grad_out = torch.randn(515, 77, **g)
    results = []
    for path in ("kernels", "aten"):
        previous = sl.ops.set_cuda_path(path)
        try:
            out, hidden = _ops.lowrank_forward(x, A, B, scale, None, seed, 0.3, on_input)
            grad_A = _ops.lowrank_grad_A(hidden, x, seed, 0.3, on_input)
            # The one pass over grad_out (fused kernel) against the two cuBLAS products.
            grads = _ops.lowrank_grad_hidden(grad_out, B, scale, hidden, seed, 0.3, on_input)
        finally:
            sl.ops.set_cuda_path(previous)
        results.append((out, hidden, grad_A, *grads))
    for a, b in zip(*results):
        assert rel_err(a, b) < TOL[dtype]
    if not on_input:  # dropped hidden entries are exactly zero in both: the same Philox mask
        assert torch.equal(results[0][1] == 0, results[1][1] == 0)


# N, out, r: one band of rows and hundreds, `out` under one step and ragged, r = 1 and ranks
# beyond one block's share (128 for 16-bit types, 64 float32, 32 float64).
OUTPUT_GRAD_CASES = [(1, 7, 1), (70, 33, 16), (257, 140, 9), (3001, 96, 130), (515, 4100, 64)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("case", OUTPUT_GRAD_CASES, ids=str)
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("det", [False, True], ids=["atomic", "deterministic"])
def test_output_gradient_pass_matches_float64_oracle(case, dtype, dropout, det):
    """lowrank_grad_hidden on the kernels path: grad_hidden and grad_B from one pass over
    grad_out (fused_kernels.cu), the hidden's dropout applied to grad_hidden; deterministic
    sums repeat bit for bit."""
    N, out, r = case
    g = dict(device="cuda", dtype=dtype)
    grad_out, hidden = torch.randn(N, out, **g), torch.randn(N, r, **g)
    B, scale = torch.randn(out, r, **g) / r**0.5, torch.rand(out, r, **g) + 0.5
    seed = torch.tensor([424242, 17], device="cuda") if dropout else None
    previous = sl.ops.set_cuda_path("kernels")
    torch.use_deterministic_algorithms(det)
    try:
        poison_cuda_cache()
        runs = [_ops.lowrank_grad_hidden(grad_out, B, scale, hidden, seed, dropout, False)
                for _ in range(2 if det else 1)]
    finally:
        torch.use_deterministic_algorithms(False)
        sl.ops.set_cuda_path(previous)
    if det:
        assert all(torch.equal(a, b) for a, b in zip(*runs))
    g64, h64, B64, s64 = (t.double().cpu() for t in (grad_out, hidden, B, scale))
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    Bs = (B.to(acc) * scale.to(acc)).to(dtype).double().cpu()  # scaled_B, as the op rounds it
    want_h = g64 @ Bs
    if dropout:
        want_h = want_h * _ops.dropout_mask(seed.cpu(), [N, r], dropout, dtype).double()
    grad_Bs = g64.T @ h64
    tol = TOL.get(dtype, 1e-12)
    for name, got, want in zip(["grad_hidden", "grad_B", "grad_scale"], runs[0],
                               [want_h, grad_Bs * s64, grad_Bs * B64]):
        assert rel_err(got, want) < tol, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("K,r,n_in", [(2, 3, 10), (4, 16, 300), (4, 32, 4096), (8, 5, 7)])
def test_penalty_gradient_kernel_matches_float64(K, r, n_in, dtype, cuda_path):
    A = torch.randn(K * r, n_in, dtype=torch.float64).to(dtype).double()
    A[1] = 0  # a row below the normalization's eps takes the other branch
    weight = torch.tensor(0.37, dtype=torch.float32).double()  # the same λ on both sides
    delta = torch.zeros_like(A)
    sl.ops.add_ortho_penalty_grad_(delta, A, weight, K)
    # A prior gradient of the penalty's size, so that adding in place is checked too.
    grad = (torch.randn_like(A) * delta.abs().mean()).to(dtype).double()
    want = grad + delta
    got = grad.to(device="cuda", dtype=dtype)
    poison_cuda_cache()
    sl.ops.add_ortho_penalty_grad_(got, A.to(device="cuda", dtype=dtype), weight.cuda().float(), K)
    tol = {torch.float64: 1e-10, **TOL}[dtype]
    assert rel_err(got, want) < tol


def test_training_step_under_cuda_graph_replays():
    """Dropout seeds come from torch's CUDA generator, so a captured step replays with fresh
    masks; without dropout a replay equals the eager step."""
    for dropout in (0.0, 0.1):
        layer = make_layer(64, 48, dtype=torch.bfloat16, device="cuda", num_experts=4, rank=16,
                           dropout=dropout, dropout_position="pre")
        x = torch.randn(96, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        eager = layer(x).detach().clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up on the side stream, as graph capture requires
                layer(x).float().sum().backward()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = layer(x)
            y.float().sum().backward()
        graph.replay()
        first = y.detach().clone()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.isfinite(first).all() and torch.isfinite(y).all()
        if dropout:
            assert not torch.equal(first, y)
        else:
            assert torch.equal(first, eager) and torch.equal(y, eager)


def _graph_layers(dropout=0.0):
    """An SOSLinear with every recipe term and the penalty, and a CPSLinear (dense form)."""
    sos = make_layer(64, 48, dtype=torch.bfloat16, device="cuda", num_experts=4, rank=16,
                     scale_mode="channel", gate=True, scale_anchor=0.1, uniform_prior=0.1,
                     loraplus_ratio=2.0, dropout=dropout)
    sos.ortho_lambda.fill_(0.006)
    cps = sl.CPSLinear(torch.nn.Linear(64, 48, device="cuda", dtype=torch.bfloat16),
                       num_clusters=4, rank=4, init_partition="random", dropout=dropout)
    with torch.no_grad():
        cps.lora_B.normal_()
    return sos, cps


@pytest.mark.parametrize("which", [0, 1], ids=["sos", "cps"])
def test_make_graphed_callables_equals_eager(which):
    """The one-node step is captured whole (forward and backward graphs) and replays what the
    eager step computes; with dropout, each replay draws a new mask."""
    layer = _graph_layers()[which].train()
    x = torch.randn(96, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(96, 48, device="cuda", dtype=torch.bfloat16)
    params = [p for p in layer.parameters() if p.requires_grad]

    def step(fn):
        y = fn(x)
        return (y.detach().clone(), *(g.clone() for g in torch.autograd.grad(y, [x, *params],
                                                                              grad)))

    eager = step(layer)
    graphed = torch.cuda.make_graphed_callables(layer, (x,))
    for _ in range(2):
        for got, want in zip(step(graphed), eager):
            assert torch.equal(got, want)
    graphed = torch.cuda.make_graphed_callables(_graph_layers(0.2)[which].train(), (x,))
    first, second = graphed(x).detach().clone(), graphed(x).detach().clone()
    assert torch.isfinite(first).all() and not torch.equal(first, second)


def test_compile_reduce_overhead_equals_eager():
    sos, _ = _graph_layers()
    x = torch.randn(96, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    compiled = torch.compile(sos, mode="reduce-overhead", fullgraph=True)
    y_e = sos(x)
    g_e = torch.autograd.grad(y_e.float().square().sum(), [x, sos.lora_A, sos.gate_logits])
    for _ in range(3):  # the third call replays the recorded CUDA graph
        y_c = compiled(x)
        g_c = torch.autograd.grad(y_c.float().square().sum(), [x, sos.lora_A, sos.gate_logits])
        assert rel_err(y_c, y_e) < 1e-2
        for a, b in zip(g_c, g_e):
            assert rel_err(a, b) < 2e-2


def test_non_contiguous_3d_input_on_cuda():
    layer = make_layer(12, 5, dtype=torch.float32, device="cuda", num_experts=2, rank=4)
    x = torch.randn(4, 12, 3, device="cuda").transpose(1, 2)
    assert rel_err(layer(x), oracle_forward(layer.double().cpu(), x.double().cpu())) < 1e-5


@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("factor_dtype", [torch.float32, torch.float64])
def test_merge_kernel_matches_cpu(w_dtype, transposed, factor_dtype):
    # Several 64 x 64 tiles with ragged edges; float64 factors promote the accumulation on both.
    n_out, n_in, r = 141, 77, 9
    W = torch.randn(n_in, n_out).t() if transposed else torch.randn(n_out, n_in)
    W = W.to(w_dtype)
    A, B = torch.randn(r, n_in, dtype=factor_dtype), torch.randn(n_out, r, dtype=factor_dtype)
    scale = torch.rand(n_out, r) + 0.5
    expected = W.clone()
    sl.ops.merge_into_(expected, A, B, scale, 0.75)
    got = W.cuda()
    if transposed:
        got = got.t().contiguous().t()
    sl.ops.merge_into_(got, A.cuda(), B.cuda(), scale.cuda(), 0.75)
    if w_dtype in (torch.bfloat16, torch.float16):
        ulp = expected.double().abs() * torch.finfo(w_dtype).eps
        assert ((got.cpu().double() - expected.double()).abs() <= ulp).all()
    else:
        assert rel_err(got, expected) < 1e-6
    sl.ops.merge_into_(got, A.cuda(), B.cuda(), scale.cuda(), -0.75)  # unmerge
    assert rel_err(got, W) < (1e-2 if w_dtype in (torch.bfloat16, torch.float16) else 1e-6)
    expanded = torch.zeros(1, n_in, device="cuda").expand(n_out, n_in)
    with pytest.raises(RuntimeError, match="share memory"):
        sl.ops.merge_into_(expanded, A.float().cuda(), B.float().cuda(), scale.cuda(), 1.0)


@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "strided"])
def test_merge_and_weight_stats_kernels_return_the_cpu_stats(w_dtype, layout):
    """Fingerprint sums and max |w| from the CUDA passes equal sharing.fingerprint's and the
    max of what was written, bit for bit; a sum beyond the range is never written; the
    guard's bound, checked on the device, keeps the merge out."""
    from soslora_ext.layers.sharing import fingerprint
    torch.manual_seed(0)
    n_out, n_in, r = 141, 78, 9  # ragged tiles; an even width pairs 16-bit values
    full = torch.randn(2 * n_out, 2 * n_in).to(w_dtype)
    W = {"contiguous": full[:n_out, :n_in].contiguous(),
         "transposed": full[:n_in, :n_out].contiguous().t(),
         "strided": full[::2, ::2]}[layout].cuda()
    factor = torch.float64 if w_dtype == torch.float64 else torch.float32
    A, B = (torch.randn(r, n_in, dtype=factor, device="cuda"),
            torch.randn(n_out, r, dtype=factor, device="cuda"))
    scale = torch.rand(r, dtype=factor, device="cuda")
    read = sl.ops.weight_stats(W)
    assert read.sums == fingerprint(W)[2:] and read.max_abs == W.double().abs().max().item()
    stats = sl.ops.merge_into_(W, A, B, scale, 0.5)
    assert stats.sums == fingerprint(W)[2:] and stats.count == 0
    assert stats.max_abs == W.double().abs().max().item()
    assert stats == sl.ops.weight_stats(W.cpu())
    before = W.clone()
    limit = torch.finfo(w_dtype).max
    assert sl.ops.merge_into_(W, A, B, scale, 1.0, max_abs=limit) == (0.0, (0, 0), -1)
    assert torch.equal(W, before)
    W[5, 7], A[0, 7], B[:, 0], B[5, 0], scale[0] = 0.75 * limit, 0.5 * limit, 0, 1, 1
    before = W.clone()
    assert sl.ops.merge_into_(W, A, B, scale, 1.0) == (0.0, (0, 0), 1)
    assert torch.isfinite(W).all() and W[5, 7] == before[5, 7]
    update = (B.double() * scale.double()) @ A.double()
    eps = torch.finfo(w_dtype).eps
    assert ((W.double() - before.double()).abs()
            <= 4 * eps * (before.double().abs() + update.abs())).all()


def test_dropout_mask_kernel_equals_reference_everywhere():
    # More elements than one grid covers, so the grid-stride loop runs.
    n = 65536 * 256 + 12345
    seed = torch.tensor([0x1234_5678_9ABC, 77], device="cuda")
    x = torch.ones(n, 1, device="cuda")
    A = torch.ones(1, 1, device="cuda")
    _, hidden = _ops.lowrank_forward(x, A, torch.ones(1, 1, device="cuda"),
                                     torch.ones(1, device="cuda"), None, seed, 0.25, False)
    keep = reference.dropout_keep_mask(seed.cpu(), (n, 1), 0.25)
    assert torch.equal(hidden.cpu() != 0, keep)


def test_opcheck_on_cuda(cuda_path):
    g = dict(device="cuda", dtype=torch.float32)
    x, A, B = torch.randn(6, 9, **g), torch.randn(4, 9, **g), torch.randn(5, 4, **g)
    scale, base = torch.rand(4, **g), torch.randn(6, 5, **g)
    seed = torch.tensor([11, 3], device="cuda")
    for t in (x, A, B, scale):
        t.requires_grad_(True)
    for on_input in (False, True):
        opcheck(_ops.lowrank_forward, (x, A, B, scale, base, seed, 0.3, on_input))
    xd, Ad, Bd, sd = (t.detach() for t in (x, A, B, scale))
    opcheck(_ops.lowrank_grad_hidden, (torch.randn(6, 5, **g), Bd, sd, torch.randn(6, 4, **g),
                                       seed, 0.3, False))
    opcheck(_ops.lowrank_grad_A, (torch.randn(6, 4, **g), xd, seed, 0.3, True))
    opcheck(_ops.lowrank_grad_x, (torch.randn(6, 4, **g), Ad, torch.randn(6, 9, **g), seed, 0.3,
                                  True))
    opcheck(_ops.ortho_penalty, (torch.randn(8, 9, requires_grad=True, **g), 4))
    opcheck(_ops.ortho_penalty_grad_, (torch.randn(8, 9, **g), torch.randn(8, 9, **g),
                                       torch.tensor(0.5, **g), 4))
    opcheck(_ops.merge_into_, (torch.randn(5, 9, **g), Ad, Bd, sd, 1.0))
    opcheck(_ops.merge_into_, (torch.randn(5, 9, **g), Ad, Bd, sd, 1.0, 100.0))
    opcheck(_ops.weight_stats, (torch.randn(5, 9, **g),))
    W, bias = torch.randn(5, 9, **g), torch.randn(5, **g)
    for on_input in (False, True):
        opcheck(_ops.linear_lowrank_forward, (x, W, bias, A, B, scale, seed, 0.3, on_input))
        opcheck(_ops.linear_lowrank_grad_x, (torch.randn(6, 5, **g), W, torch.randn(6, 4, **g),
                                             Ad, seed, 0.3, on_input))


def test_torch_compile_on_cuda_matches_eager():
    layer = make_layer(32, 24, dtype=torch.bfloat16, device="cuda", adapter_dtype=torch.bfloat16,
                       num_experts=4, rank=8, scale_mode="channel", gate=True)
    x = torch.randn(3, 16, 32, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True)
    y_e = layer(x)
    g_e = torch.autograd.grad(y_e.float().square().sum(), [x, layer.lora_A, layer.lora_B])
    y_c = compiled(x)
    g_c = torch.autograd.grad(y_c.float().square().sum(), [x, layer.lora_A, layer.lora_B])
    assert rel_err(y_c, y_e) < 1e-2
    for a, b in zip(g_c, g_e):
        assert rel_err(a, b) < 2e-2


@pytest.mark.parametrize("position", ["post", "pre"])
def test_training_step_has_no_host_sync(position, cuda_path):
    layer = make_layer(64, 48, dtype=torch.bfloat16, device="cuda", num_experts=4, rank=16,
                       scale_mode="channel", gate=True, scale_anchor=0.1, uniform_prior=0.1,
                       loraplus_ratio=2.0, dropout=0.05, dropout_position=position,
                       adapter_dtype=torch.bfloat16)
    layer.ortho_lambda.fill_(0.006)
    assert_step_has_no_host_sync(layer)


def assert_step_has_no_host_sync(layer):
    """fwd+bwd of `layer` on a bf16 batch under set_sync_debug_mode("error")."""
    x = torch.randn(128, layer.in_features, device="cuda", dtype=torch.bfloat16,
                    requires_grad=True)
    layer(x).float().sum().backward()  # warm-up outside the check (lazy initialisation)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        layer(x).float().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_dropout_deterministic_under_seed_on_cuda():
    layer = make_layer(16, 8, dtype=torch.float32, device="cuda", num_experts=2, rank=4,
                       dropout=0.5)
    x = torch.randn(10, 16, device="cuda")
    torch.manual_seed(3)
    a = layer(x)
    torch.manual_seed(3)
    b = layer(x)
    assert torch.equal(a, b) and not torch.equal(b, layer(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_dropout_equals_cpu_bitwise(dtype):
    """The one-pass dropout kernel gives the CPU path's values exactly (same mask, same
    rounding): with A = I the op's hidden output is drop(x) itself."""
    x = torch.randn(37, 19, dtype=dtype)
    A, B, scale = torch.eye(19, dtype=dtype), torch.randn(11, 19, dtype=dtype), torch.rand(19)
    seed = torch.tensor([123456789, 42])
    cpu = _ops.lowrank_forward(x, A, B, scale, None, seed, 0.3, True)[1]
    gpu = _ops.lowrank_forward(x.cuda(), A.cuda(), B.cuda(), scale.cuda(), None, seed.cuda(),
                               0.3, True)[1]
    assert torch.equal(gpu.cpu(), cpu)
    assert torch.equal(cpu == 0, ~reference.dropout_keep_mask(seed, x.shape, 0.3) | (x == 0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_cps_layer_on_cuda_matches_float64_oracle(dtype, dropout, cuda_path):
    from helpers import layer_oracle_delta

    base = torch.nn.Linear(40, 36, dtype=dtype, device="cuda")
    layer = sl.CPSLinear(base, num_clusters=3, rank_per_cluster=[2, 5, 3], init_partition="random",
                         dropout=dropout, dtype=dtype)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.5)
    x = torch.randn(2, 17, 40, device="cuda", dtype=dtype, requires_grad=True)
    state = torch.cuda.get_rng_state()
    seed = sl.ops.new_dropout_seed(x.device).cpu() if dropout else None
    torch.cuda.set_rng_state(state)
    y = layer(x)
    grad = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, layer.lora_A, layer.lora_B], grad)

    cpu = sl.CPSLinear(torch.nn.Linear(40, 36, dtype=torch.float64), num_clusters=3,
                       rank_per_cluster=[2, 5, 3], dropout=dropout, dtype=torch.float64)
    cpu.load_state_dict({k: (v.double() if v.is_floating_point() else v).cpu()
                         for k, v in layer.state_dict().items()})
    x64 = x.detach().double().cpu().requires_grad_(True)
    params = [cpu.lora_A, cpu.lora_B]
    y_ref = reference.cps_forward(x64, cpu.weight, cpu.bias, layer_oracle_delta(cpu), dropout,
                                  seed)
    want = torch.autograd.grad(y_ref, [x64, *params], grad.double().cpu())
    assert rel_err(y, y_ref) < TOL[dtype]
    for name, g, w in zip(["x", "lora_A", "lora_B"], got, want):
        assert rel_err(g, w) < TOL[dtype], name


def test_cps_training_step_has_no_host_sync():
    layer = sl.CPSLinear(torch.nn.Linear(64, 48, device="cuda", dtype=torch.bfloat16),
                         num_clusters=4, rank=4, dropout=0.05)
    assert_step_has_no_host_sync(layer)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_dropout_mask_op_on_cuda_equals_cpu_bitwise(dtype):
    """The mask kernel against the CPU loop, past one grid's worth of elements (the ATen
    integer-op mask, the fallback without kernels, is checked in test_fallback.py)."""
    seed = torch.tensor([-0x1234_5678_9ABC_DEF0, 0x1_0000_0003])
    size = [65536 * 256 + 77]
    cpu = _ops.dropout_mask(seed, size, 0.000488043878, dtype)
    assert torch.equal(_ops.dropout_mask(seed.cuda(), size, 0.000488043878, dtype).cpu(), cpu)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unfused_base_path_on_cuda_matches_float64_oracle(dtype, cuda_path):
    """Adapters in float32 over a 16-bit base (PEFT's default): the base runs apart and the
    adapter op adds into its output."""
    layer = make_layer(40, 24, dtype=dtype, device="cuda", adapter_dtype=torch.float32,
                       num_experts=4, rank=8, dropout=0.1, dropout_position="pre")
    x = torch.randn(3, 33, 40, device="cuda", dtype=dtype, requires_grad=True)
    state = torch.cuda.get_rng_state()
    seed = sl.ops.new_dropout_seed(x.device).cpu()
    torch.cuda.set_rng_state(state)
    y = layer(x)
    grad = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, layer.lora_A, layer.lora_B], grad)
    cpu_layer = make_layer(40, 24, num_experts=4, rank=8, dropout=0.1, dropout_position="pre")
    cpu_layer.load_state_dict({k: v.double().cpu() for k, v in layer.state_dict().items()})
    x64 = x.detach().double().cpu().requires_grad_(True)
    p64 = {n: p for n, p in cpu_layer.named_parameters() if p.requires_grad}
    y_ref = oracle_forward(cpu_layer, x64, seed, p64)
    want = torch.autograd.grad(y_ref, [x64, p64["lora_A"], p64["lora_B"]], grad.double().cpu())
    assert rel_err(y, y_ref) < TOL[dtype]
    for name, g, w in zip(["x", "lora_A", "lora_B"], got, want):
        assert rel_err(g, w) < TOL[dtype], name


@pytest.fixture
def deterministic():
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)


def test_deterministic_mode_gives_bitwise_repeatable_gradients(deterministic):
    """Split-K atomics are off under torch.use_deterministic_algorithms(True): the kernels'
    lora_A gradient, the penalty gradient and the output-gradient pass's grad_B repeat bit for
    bit."""
    previous = sl.ops.set_cuda_path("kernels")
    try:
        x = torch.randn(4099, 300, device="cuda")
        grad_h = torch.randn(4099, 24, device="cuda")
        seed = torch.tensor([5, 9], device="cuda")
        runs = [_ops.lowrank_grad_A(grad_h, x, seed, 0.1, True) for _ in range(3)]
        grad_out, B = torch.randn(4099, 300, device="cuda"), torch.randn(300, 24, device="cuda")
        scale = torch.rand(24, device="cuda")
        output_grads = [_ops.lowrank_grad_hidden(grad_out, B, scale, grad_h, seed, 0.1, False)
                        for _ in range(3)]
        A = torch.randn(24, 4096, device="cuda")
        penalties = []
        for _ in range(3):
            g = torch.zeros_like(A)
            sl.ops.add_ortho_penalty_grad_(g, A, torch.tensor(0.5, device="cuda"), 4)
            penalties.append(g)
    finally:
        sl.ops.set_cuda_path(previous)
    assert all(torch.equal(runs[0], r) for r in runs[1:])
    assert all(torch.equal(penalties[0], p) for p in penalties[1:])
    assert all(torch.equal(a, b) for run in output_grads[1:] for a, b in zip(output_grads[0], run))


def test_penalty_kernel_with_zero_weight_leaves_grad_untouched():
    A = torch.randn(16, 300, device="cuda")
    A[3, 7] = float("inf")
    grad = torch.randn_like(A)
    before = grad.clone()
    sl.ops.add_ortho_penalty_grad_(grad, A, torch.tensor(0.0, device="cuda"), 4)
    assert torch.equal(grad, before)


def test_non_contiguous_seed_accepted_on_every_path(cuda_path):
    """A strided [2] seed is read as {seed, offset} by every implementation, as on the CPU."""
    strided = torch.tensor([777, -1, 3, -1], device="cuda")[::2]
    assert not strided.is_contiguous()
    x, A = torch.randn(70, 33, device="cuda"), torch.randn(8, 33, device="cuda")
    B, scale = torch.randn(5, 8, device="cuda"), torch.rand(8, device="cuda")
    for on_input in (False, True):
        got = _ops.lowrank_forward(x, A, B, scale, None, strided, 0.4, on_input)
        want = _ops.lowrank_forward(x, A, B, scale, None, strided.contiguous(), 0.4, on_input)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_auto_measures_each_shape_class_once_and_keeps_the_faster():
    """'auto' times kernel and ATen on a shape class's first call (ops.cuda_choices()), keeps
    the faster, and reuses it for every N of the same power-of-two class."""
    previous = sl.ops.set_cuda_path("auto")
    sl.ops.clear_cuda_choices()
    try:
        layer = make_layer(256, 192, dtype=torch.bfloat16, device="cuda", num_experts=4,
                           rank=16, dropout=0.1, dropout_position="pre")
        layer.ortho_lambda.fill_(0.006)
        for n in (600, 1000, 513):  # one class: 1024
            x = torch.randn(n, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            layer(x).float().sum().backward()
            if n == 600:
                first = sl.ops.cuda_choices()
        assert first and sl.ops.cuda_choices() == first
        for key, (path, kernel_ms, aten_ms) in first.items():
            assert " cuda:" in key and " 1024x" in key
            assert path == ("kernels" if kernel_ms < aten_ms else "aten"), key
        x = torch.randn(3000, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        layer(x).float().sum().backward()
        assert any(" 4096x" in key for key in sl.ops.cuda_choices())
    finally:
        sl.ops.set_cuda_path(previous)
        sl.ops.clear_cuda_choices()
