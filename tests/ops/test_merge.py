"""merge_into_ and weight_stats: the stats from the pass that writes (or reads) the weight against
float64 and integer oracles (sharing.fingerprint bit for bit), every CPU form, layouts a model
has (transposed Conv1D views, strided slices), the sums beyond the dtype's range never written,
and the guard's bound checked by the op."""
import struct

import pytest
import torch
from torch.library import opcheck

import soslora_ext as sl
from soslora_ext.layers.sharing import fingerprint

from conftest import isa_runs_here

_ops = torch.ops.soslora
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
ISAS = ["scalar", "avx2", "avx512"]
SHAPES = [(1, 1), (1, 70), (70, 1), (37, 29), (64, 128), (129, 65), (8, 33), (300, 301)]


def layouts(rows, cols, dtype, generator):
    """The weight in the layouts merges meet: contiguous, a transposed view (GPT-2's Conv1D
    weight written through .t()), a strided slice, a view at an odd offset."""
    full = torch.randn(2 * rows + 1, 2 * cols + 1, generator=generator).to(dtype)
    yield "contiguous", full[:rows, :cols].contiguous()
    yield "transposed", torch.randn(cols, rows, generator=generator).to(dtype).t()
    yield "strided", full[1::2, 1::2][:rows, :cols]
    yield "offset", full[1:rows + 1, 1:cols + 1]


def oracle(w):
    """(max |w| as float64, fingerprint sums, count of non-finite values)."""
    f = fingerprint(w)
    finite = torch.isfinite(w)
    peak = float("inf") if not finite.all() else (w.double().abs().max().item() if w.numel()
                                                  else 0.0)
    return peak, tuple(f[2:]), int((~finite).sum())


def check_stats(stats, w):
    assert (stats.max_abs, stats.sums, stats.count) == oracle(w)


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    if not isa_runs_here(request.param):
        pytest.skip(f"this CPU does not run {request.param}")
    monkeypatch.setenv("SOSLORA_CPU_ISA", request.param)
    return request.param


@pytest.mark.parametrize("dtype", DTYPES)
def test_weight_stats_equal_the_oracles(dtype, isa):
    g = torch.Generator().manual_seed(1)
    for rows, cols in SHAPES:
        for name, w in layouts(rows, cols, dtype, g):
            check_stats(sl.ops.weight_stats(w), w)
            if rows * cols > 2:  # an infinity and a NaN: counted, the max is +inf
                bad = w.clone()
                bad[0, -1], bad[-1, 0] = float("inf"), float("nan")
                assert sl.ops.weight_stats(bad).count == 2, name
                check_stats(sl.ops.weight_stats(bad), bad)
    assert sl.ops.weight_stats(torch.empty(0, 5, dtype=dtype)) == (0.0, (0, 0), 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_channel", [False, True])
def test_merge_writes_the_oracle_and_returns_the_stats_of_what_it_wrote(dtype, per_channel, isa):
    g = torch.Generator().manual_seed(2)
    factor = torch.float64 if dtype == torch.float64 else torch.float32
    for rows, cols in SHAPES:
        r = 1 + (rows * cols) % 9
        A = torch.randn(r, cols, generator=g, dtype=factor)
        B = torch.randn(rows, r, generator=g, dtype=factor)
        scale = torch.rand(*((rows, r) if per_channel else (r,)), generator=g,
                           dtype=factor) + 0.5
        # Bounds: one rounding into the weight's dtype, and the accumulation's rounding.
        eps, eps_acc = torch.finfo(dtype).eps, torch.finfo(factor).eps
        magnitude = (B.abs() * scale.abs()).double() @ A.abs().double()
        for alpha in (1.0, -0.75):
            for name, w in layouts(rows, cols, dtype, g):
                w0 = w.clone()
                expected = w0.double() + alpha * (B.double() * scale.double()) @ A.double()
                stats = sl.ops.merge_into_(w, A, B, scale, alpha)
                check_stats(stats, w)
                accumulation = (r + 4) * eps_acc * (w0.double().abs() + abs(alpha) * magnitude)
                assert ((w.double() - expected).abs()
                        <= eps * expected.abs() + accumulation).all(), (name, rows, cols)
                # The same inputs give the same update: merging -alpha takes it back (one more
                # rounding, of the merged value).
                merged = w.double()
                sl.ops.merge_into_(w, A, B, scale, -alpha)
                assert ((w.double() - w0.double()).abs()
                        <= eps * (merged.abs() + w.double().abs()) + 2 * accumulation).all(), (
                    name, rows, cols)


def test_the_simd_forms_write_the_same_bits():
    """AVX2 and AVX-512 sum each update as one chain of fused multiply-adds in the same order,
    and write it the same way (float32 tiles from the registers, the rest in sweeps)."""
    if not isa_runs_here("avx512"):
        pytest.skip("needs AVX-512 and AVX2")
    g = torch.Generator().manual_seed(3)
    mp = pytest.MonkeyPatch()
    for dtype in DTYPES:
        for rows, cols in [(37, 29), (129, 65), (300, 301)]:
            A, B = torch.randn(16, cols, generator=g), torch.randn(rows, 16, generator=g)
            scale = torch.rand(16, generator=g)
            for name, w in layouts(rows, cols, dtype, g):
                results = []
                for isa in ("avx2", "avx512"):
                    mp.setenv("SOSLORA_CPU_ISA", isa)
                    out = w.clone()
                    results.append((sl.ops.merge_into_(out, A, B, scale, 0.3), out))
                mp.undo()
                assert results[0][0] == results[1][0] and torch.equal(results[0][1],
                                                                      results[1][1]), name


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_sum_beyond_the_range_is_never_written_and_the_merge_is_taken_back(dtype, isa):
    """One sum beyond the range (as a weight changed behind the guard's back would give):
    nothing non-finite is written, the value is as it was, the rest within one rounding of
    the merged value, and the count says how many."""
    g = torch.Generator().manual_seed(4)
    big = torch.finfo(dtype).max
    factor = torch.float64 if dtype == torch.float64 else torch.float32
    for rows, cols in [(37, 29), (64, 128), (300, 301), (9, 64)]:
        i, j = rows // 2, cols // 3
        A = torch.randn(4, cols, generator=g, dtype=factor)
        B = torch.randn(rows, 4, generator=g, dtype=factor)
        B[:, 0], B[i, 0], A[0, j] = 0.0, 1.0, 0.5 * big  # the update at (i, j) alone is huge
        scale = torch.ones(4, dtype=factor)
        for name, w in layouts(rows, cols, dtype, g):
            w[i, j] = 0.75 * big
            w0 = w.clone()
            update = (B.double() * scale.double()) @ A.double()
            stats = sl.ops.merge_into_(w, A, B, scale, 1.0)
            assert stats == (0.0, (0, 0), 1), name
            assert torch.isfinite(w).all() and w[i, j] == w0[i, j]
            bound = 4 * torch.finfo(dtype).eps * (w0.double().abs() + update.abs())
            assert ((w.double() - w0.double()).abs() <= bound).all(), name


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_op_checks_the_guards_bound_before_writing(dtype):
    """With max_abs, nothing is written (count -1) where max_abs plus the update's bound is not
    inside the range, a non-finite factor included; where it is, the merge is the same."""
    torch.manual_seed(5)
    w = torch.randn(24, 40).to(dtype)
    A, B, scale = torch.randn(3, 40), torch.randn(24, 3), torch.rand(3)
    bound = ((B * scale).square().sum(1).max() * A.square().sum(0).max()).sqrt().item()
    limit = torch.finfo(dtype).max
    for max_abs, A_ in ((limit - bound / 2, A), (1.0, A.where(A < 1.5, float("nan")))):
        before = w.clone()
        assert sl.ops.merge_into_(w, A_, B, scale, 1.0, max_abs=max_abs) == (0.0, (0, 0), -1)
        assert torch.equal(w, before)
    plain = w.clone()
    expected = sl.ops.merge_into_(plain, A, B, scale, 1.0)
    assert sl.ops.merge_into_(w, A, B, scale, 1.0, max_abs=4.0) == expected
    assert torch.equal(w, plain)


def test_opcheck_and_the_raw_stats_tensor():
    torch.manual_seed(6)
    A, B, scale = torch.randn(3, 9), torch.randn(5, 3), torch.rand(3)
    for dtype in DTYPES:
        w = torch.randn(5, 9).to(dtype)
        opcheck(_ops.merge_into_, (w.clone(), A, B, scale, 0.5))
        opcheck(_ops.merge_into_, (w.clone(), A, B, scale, 0.5, 10.0))
        opcheck(_ops.weight_stats, (w,))
        raw = _ops.weight_stats(w)
        assert raw.dtype == torch.int64 and raw.shape == (4,)
        peak = struct.unpack("<d", struct.pack("<q", raw[2].item()))[0]
        assert peak == w.double().abs().max().item()
    assert _ops.merge_into_(torch.empty(0, 9), torch.randn(3, 9), torch.randn(0, 3),
                            torch.rand(3), 1.0).tolist() == [0, 0, 0, 0]
