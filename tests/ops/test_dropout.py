"""The counter-based dropout mask: native == reference, keep rate, determinism."""
import math

import pytest
import torch

import soslora_ext as sl
from soslora_ext.ops import reference

from conftest import isa_runs_here, make_layer

_ops = torch.ops.soslora


@pytest.mark.parametrize("p", [0.05, 0.3, 0.9])
def test_native_mask_equals_reference(p):
    n, r = 37, 11
    seed = torch.tensor([torch.randint(0, 2**62, ()).item(), 12345678901])
    expected = reference.dropout_keep_mask(seed, (n, r), p).double() / (1 - p)
    assert torch.equal(_ops.dropout_mask(seed, [n, r], p, torch.float64), expected)
    # ... and the forward applies exactly that mask: x A^T is all ones here.
    ones = torch.ones(n, 1, dtype=torch.float64)
    _, hidden = _ops.lowrank_forward(ones, torch.ones(r, 1, dtype=torch.float64),
                                     torch.eye(r, dtype=torch.float64),
                                     torch.ones(r, dtype=torch.float64), None, seed, p, False)
    assert torch.equal(hidden, expected)


def test_philox_known_answer():
    # Philox4x32-10 test vectors (Random123 kat_vectors): counter 0, key 0, and counter and key
    # all ones.
    words = reference.philox_words(0, 0, torch.zeros(1, dtype=torch.int64))
    assert [int(w) for w in words] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    ones = 2**64 - 1
    words = reference.philox_words(ones, ones, torch.tensor([-1]))  # int64 -1: all ones
    assert [int(w) for w in words] == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]


def test_each_philox_block_decides_four_consecutive_elements():
    seed, offset = 0x1234_5678_9ABC_DEF0, 77
    index = torch.arange(4 * 50, dtype=torch.int64)
    blocks = reference.philox_words(seed, offset, torch.arange(50))
    expected = torch.stack(blocks, dim=1).reshape(-1)
    assert torch.equal(reference.dropout_words(seed, offset, index), expected)


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_keep_rate_within_statistical_bounds(p):
    n = 200_000
    keep = reference.dropout_keep_mask(torch.tensor([987654321, 7]), (n,), p)
    rate = keep.double().mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(rate - (1 - p)) < 5 * sigma


def test_layer_dropout_deterministic_under_seed_and_off_in_eval():
    layer = make_layer(dropout=0.3, num_experts=2, rank=4)
    x = torch.randn(6, 13, dtype=torch.float64)
    torch.manual_seed(7)
    y1 = layer(x)
    torch.manual_seed(7)
    y2 = layer(x)
    y3 = layer(x)
    assert torch.equal(y1, y2)
    assert not torch.equal(y2, y3)
    layer.eval()
    assert torch.equal(layer(x), layer(x))


def test_new_dropout_seed_follows_torch_generator():
    torch.manual_seed(3)
    a = sl.ops.new_dropout_seed(torch.device("cpu"))
    torch.manual_seed(3)
    b = sl.ops.new_dropout_seed(torch.device("cpu"))
    assert a.dtype == torch.int64 and a.shape == (2,) and torch.equal(a, b)


def _round_once(value: float, mantissa_bits: int) -> float:
    """value rounded once (to nearest, ties to even) to a float with `mantissa_bits` bits of
    significand (11 for float16, 8 for bfloat16); value is a normal number >= 1 here."""
    from fractions import Fraction
    exponent = math.frexp(value)[1] - 1
    ulp = Fraction(2) ** (exponent - mantissa_bits + 1)
    q, rem = divmod(Fraction(value), ulp)
    if rem * 2 > ulp or (rem * 2 == ulp and q % 2 == 1):
        q += 1
    return float(q * ulp)


# p where rounding 1/(1-p) through float32 first lands on another value than one rounding does,
# found by search; plus ordinary ones.
@pytest.mark.parametrize("dtype,bits,p", [(torch.float16, 11, 0.000488043878),
                                          (torch.bfloat16, 8, 0.00389105),
                                          (torch.float16, 11, 0.1), (torch.bfloat16, 8, 0.3)])
def test_keep_scale_rounds_once_to_the_element_type(dtype, bits, p):
    """The kept value 1/(1-p) is rounded once to the mask's dtype (the CUDA kernels convert from
    double directly); the CPU used to round through float32, a different value for these p."""
    seed = torch.tensor([2024, 11])
    mask = _ops.dropout_mask(seed, [4096], p, dtype)
    kept = mask[mask != 0].unique()
    assert kept.numel() == 1
    assert kept.item() == _round_once(1.0 / (1.0 - p), bits)
    # Dropout applied in one pass (on the hidden ones(N, 1)) keeps the same value.
    ones = torch.ones(4096, 1, dtype=dtype)
    _, hidden = _ops.lowrank_forward(ones, torch.ones(1, 1, dtype=dtype),
                                     torch.ones(1, 1, dtype=dtype), torch.ones(1), None, seed, p,
                                     False)
    assert set(hidden.unique().tolist()) == {0.0, kept.item()}


def test_non_contiguous_seed_gives_the_same_mask():
    strided = torch.tensor([777, -1, 3, -1])[::2]
    assert not strided.is_contiguous()
    assert torch.equal(_ops.dropout_mask(strided, [9, 7], 0.4, torch.float32),
                       _ops.dropout_mask(strided.contiguous(), [9, 7], 0.4, torch.float32))


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512"])
def test_every_simd_form_of_the_cpu_mask_equals_the_reference(isa, monkeypatch):
    # The SIMD forms draw 8 or 16 elements at once in runs of 512 per thread chunk: sizes on
    # and around every boundary, and one split across threads.
    if not isa_runs_here(isa):
        pytest.skip(f"this CPU does not run {isa}")
    monkeypatch.setenv("SOSLORA_CPU_ISA", isa)
    generator = torch.Generator().manual_seed(5)
    for n in [1, 7, 8, 15, 16, 17, 511, 512, 513, 2047, 2048, 2049, 50_001]:
        seed = torch.randint(0, 2**62, (2,), generator=generator)
        p = 0.3
        expected = reference.dropout_keep_mask(seed, (n,), p).double() / (1 - p)
        assert torch.equal(_ops.dropout_mask(seed, [n], p, torch.float64), expected), n
        # The fused apply (dropout on the input of the low-rank op) uses the same words.
        x = torch.randn(n, 1, dtype=torch.float64, generator=generator)
        _, hidden = _ops.lowrank_forward(x, torch.ones(1, 1, dtype=torch.float64),
                                         torch.ones(1, 1, dtype=torch.float64),
                                         torch.ones(1, dtype=torch.float64), None, seed, p, True)
        assert torch.equal(hidden, x * expected[:, None]), n


def test_an_unknown_cpu_isa_is_refused_by_name(monkeypatch):
    monkeypatch.setenv("SOSLORA_CPU_ISA", "sse9")
    with pytest.raises(RuntimeError, match="SOSLORA_CPU_ISA=sse9: expected scalar, avx2 or avx512"):
        _ops.dropout_mask(torch.tensor([1, 2]), [10], 0.5, torch.float32)
