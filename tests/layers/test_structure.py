"""The CPS-LoRA structure diagnostic: planted blocks are found and called "clustered", the
spectral null is not; its measurements against direct float64 oracles; the verdict rule both
ways; the gradients and updates it reads from a model; bad input."""
import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from soslora_ext.layers import structure
from soslora_ext.layers.partition import adjusted_rand_index
from soslora_ext.layers.structure import (
    block_error,
    check_structure,
    cocluster,
    diagonal_energy,
    gradient_sums,
    layer_structure,
    layer_verdict,
    model_verdict,
    spectral_null,
    weight_deltas,
)

from conftest import rel_err
from helpers import planted_blocks


def planted(m, n, clusters, rank, noise, seed):
    return planted_blocks(m, n, clusters, rank, noise, torch.Generator().manual_seed(seed))


# ---- validated both ways ---------------------------------------------------------------------
@pytest.mark.parametrize("m,n,seed", [(96, 80, 0), (60, 150, 1), (130, 44, 2)])
def test_planted_blocks_are_clustered_and_recovered(m, n, seed):
    W, rows, cols = planted(m, n, clusters=4, rank=3, noise=0.05, seed=seed)
    result = layer_structure(W, num_clusters=4, rank=3, null_draws=4, seed=seed, labels=True)
    assert result["verdict"] == "clustered", result["reason"]
    assert result["blocks_beat_null"] and result["cps_fits_better"]
    found = result["labels"]["cocluster"]
    assert adjusted_rand_index(torch.tensor(found["rows"]), rows) == 1.0
    assert adjusted_rand_index(torch.tensor(found["cols"]), cols) == 1.0
    # The best partition is the planted one: only the noise is left out.
    assert result["error"]["best"] < 0.1 < 0.5 < result["error"]["global"]
    assert result["block_energy"]["value"] > 0.99
    assert result["block_energy"]["excess_interval"][0] > 0.5


@pytest.mark.parametrize("m,n,seed", [(96, 80, 0), (60, 150, 1), (130, 44, 2)])
def test_the_spectral_null_of_planted_blocks_is_not_clustered(m, n, seed):
    """The same singular values with random singular vectors: no blocks, and the diagnostic
    must not see any."""
    W, _, _ = planted(m, n, clusters=4, rank=3, noise=0.05, seed=seed)
    null = spectral_null(torch.linalg.svdvals(W), W.shape,
                         torch.Generator().manual_seed(seed + 100))
    result = layer_structure(null, num_clusters=4, rank=3, null_draws=4, seed=seed)
    assert result["verdict"] == "global", result["reason"]
    assert not result["blocks_beat_null"] and not result["cps_fits_better"]
    low, high = result["block_energy"]["excess_interval"]
    assert low < structure.ENERGY_MARGIN and high > -structure.ENERGY_MARGIN


def test_a_global_low_rank_update_is_global():
    g = torch.Generator().manual_seed(5)
    W = torch.randn(90, 3, generator=g, dtype=torch.float64) @ \
        torch.randn(3, 70, generator=g, dtype=torch.float64)
    result = layer_structure(W + 0.01 * torch.randn(90, 70, generator=g, dtype=torch.float64),
                             num_clusters=3, rank=3, null_draws=3)
    assert result["verdict"] == "global"
    assert result["error"]["global"] < 0.05 < result["error"]["best"]


def test_model_verdicts_on_planted_and_null_matrices():
    planted_layers = {f"p{i}": planted(64, 48, 4, 2, 0.05, i)[0] for i in range(3)}
    report = check_structure(planted_layers, num_clusters=4, rank=2, null_draws=3)
    assert report["model"]["verdict"] == "clustered"
    assert report["model"]["counts"] == {"clustered": 3, "inconclusive": 0, "global": 0}
    g = torch.Generator().manual_seed(9)
    nulls = {name: spectral_null(torch.linalg.svdvals(W), W.shape, g)
             for name, W in planted_layers.items()}
    report = check_structure(nulls, num_clusters=4, rank=2, null_draws=3)
    assert report["model"]["verdict"] == "global"
    assert report["model"]["text"].startswith("global (0 clustered")


# ---- the measurements against direct oracles -------------------------------------------------
def test_spectral_null_keeps_the_singular_values_and_draws_new_vectors():
    g = torch.Generator().manual_seed(0)
    sigma = torch.rand(7, dtype=torch.float64, generator=g).sort(descending=True).values
    a, b = (spectral_null(sigma, (7, 19), g) for _ in range(2))
    for N in (a, b):
        assert N.shape == (7, 19)
        assert rel_err(torch.linalg.svdvals(N), sigma) < 1e-12
    assert rel_err(a, b) > 0.5  # two draws are unrelated
    tall = spectral_null(sigma, (19, 7), g)
    assert rel_err(torch.linalg.svdvals(tall), sigma) < 1e-12


def test_the_gram_svd_matches_an_svd():
    g = torch.Generator().manual_seed(1)
    for shape in [(40, 17), (17, 40), (23, 23)]:
        W = torch.randn(*shape, generator=g, dtype=torch.float64)
        U, sigma, Vh = structure._svd(W)
        assert rel_err(sigma, torch.linalg.svdvals(W)) < 1e-12
        assert rel_err((U * sigma) @ Vh, W) < 1e-10
        assert rel_err(U.T @ U, torch.eye(U.shape[1], dtype=torch.float64)) < 1e-10


def random_labels(n, clusters, g, empty=None):
    labels = torch.randint(clusters, (n,), generator=g)
    if empty is not None:
        labels[labels == empty] = (empty + 1) % clusters
    return labels


@pytest.mark.parametrize("empty", [None, 1])
def test_diagonal_energy_and_block_error_match_oracles(empty):
    g = torch.Generator().manual_seed(2)
    W = torch.randn(31, 23, generator=g, dtype=torch.float64)
    rows, cols = random_labels(31, 3, g, empty), random_labels(23, 3, g)
    blocks = [W[rows == c][:, cols == c] for c in range(3)]
    energy = sum(float(b.square().sum()) for b in blocks) / float(W.square().sum())
    assert diagonal_energy(W, rows, cols, 3) == pytest.approx(energy, rel=1e-12)
    # Oracle: place each block's truncated SVD (rank 2) and measure the error directly.
    approx = torch.zeros_like(W)
    for c, b in enumerate(blocks):
        if b.numel():
            U, s, Vh = torch.linalg.svd(b, full_matrices=False)
            r, k = (rows == c).nonzero()[:, 0], (cols == c).nonzero()[:, 0]
            approx[r[:, None], k[None, :]] = (U[:, :2] * s[:2]) @ Vh[:2]
    assert block_error(W, rows, cols, 3, 2) == pytest.approx(rel_err(approx, W), rel=1e-10)
    assert block_error(torch.zeros(4, 5), rows[:4], cols[:5], 3, 2) == 0.0


def test_cocluster_edge_cases():
    g = torch.Generator().manual_seed(3)
    W, rows, cols = planted(40, 30, 2, 2, 0.0, 3)
    W[5], W[:, 7] = 0, 0  # a row and a column without energy are dealt out, not dropped
    found_rows, found_cols = cocluster(W, 2, g)
    assert found_rows.shape == (40,) and found_cols.shape == (30,)
    keep_r, keep_c = torch.arange(40) != 5, torch.arange(30) != 7
    assert adjusted_rand_index(found_rows[keep_r], rows[keep_r]) == 1.0
    assert adjusted_rand_index(found_cols[keep_c], cols[keep_c]) == 1.0
    one = cocluster(W, 1, g)
    assert one[0].eq(0).all() and one[1].eq(0).all()
    zero = cocluster(torch.zeros(6, 5), 2, g)
    assert zero[0].tolist() == [0, 1, 0, 1, 0, 1]
    # Rank 1: the energies' only direction is the trivial one; no noise is amplified into
    # clusters.
    rank_one = torch.randn(30, 1, generator=g) @ torch.randn(1, 20, generator=g)
    found = cocluster(rank_one, 3, g)
    assert found[0].eq(0).all() and found[1].eq(0).all()


# ---- the verdict rule, both ways -------------------------------------------------------------
@pytest.mark.parametrize("energy,nulls,cps,glob,verdict", [
    (0.90, [0.30, 0.32], 0.10, 0.70, "clustered"),
    (0.36, [0.30, 0.32], 0.10, 0.70, "inconclusive"),  # fits better, energy within the margin
    (0.90, [0.30, 0.32], 0.80, 0.50, "global"),        # blocks beat the null, but fit worse
    (0.33, [0.30, 0.32], 0.80, 0.50, "global"),
    (0.90, [0.30, 0.32], 0.64, 0.70, "global"),        # not 10% better: ERROR_RATIO
])
def test_layer_verdict(energy, nulls, cps, glob, verdict):
    result = layer_verdict(energy, nulls, cps, glob)
    assert result["verdict"] == verdict
    assert f"{cps:.3f}" in result["reason"] and f"{max(nulls):.3f}" in result["reason"]


def layer(verdict):
    return dict(verdict=verdict, blocks_beat_null=verdict == "clustered", top_rank_energy=0.5,
                block_energy=dict(value=0.4, null_mean=0.3, excess=0.1),
                error=dict(best=0.5, **{"global": 0.6}))


@pytest.mark.parametrize("verdicts,expected", [
    (["clustered"] * 3 + ["global"] * 2, "clustered"),
    (["global"] * 3 + ["clustered", "inconclusive"], "global"),
    (["clustered", "global"], "mixed"),                 # a tie is no majority
    (["inconclusive"] * 2 + ["global"], "mixed"),
])
def test_model_verdict_is_the_strict_majority(verdicts, expected):
    result = model_verdict({str(i): layer(v) for i, v in enumerate(verdicts)})
    assert result["verdict"] == expected
    assert result["counts"]["clustered"] == verdicts.count("clustered")
    assert result["text"].startswith(expected)


# ---- what it reads from a model --------------------------------------------------------------
def tiny_gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=30, n_embd=16, n_layer=1, n_head=2,
                                      n_positions=16, bos_token_id=0, eos_token_id=1)
                           ).double().eval()  # no dropout: the same loss twice


def test_gradient_sums_match_autograd_and_leave_the_model_as_it_was():
    model = tiny_gpt2()
    names = ["transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_proj"]  # Conv1D: [in, out]
    g = torch.Generator().manual_seed(0)
    batches = [dict(input_ids=(ids := torch.randint(30, (3, 9), generator=g)), labels=ids)
               for _ in range(3)]
    model.transformer.wpe.weight.requires_grad_(False)  # a flag that must survive
    sentinel = torch.full_like(model.transformer.ln_f.weight, 7.0)  # and a gradient
    model.transformer.ln_f.weight.grad = sentinel
    got = gradient_sums(model, names, lambda step: batches[step], 3)
    modules = dict(model.named_modules())
    weights = [modules[n].weight for n in names]
    expected = [torch.zeros_like(w) for w in weights]
    for batch in batches:
        for e, gw in zip(expected, torch.autograd.grad(model(**batch).loss, weights)):
            e += gw
    for name, e in zip(names, expected):
        assert got[name].shape == e.T.shape  # [out, in]
        assert rel_err(got[name], e.T) < 1e-12
    assert not model.transformer.wpe.weight.requires_grad
    assert all(p.requires_grad for n, p in model.named_parameters() if "wpe" not in n)
    assert model.transformer.ln_f.weight.grad is sentinel
    assert all(p.grad is None for n, p in model.named_parameters() if "ln_f.weight" not in n)


def test_weight_deltas_and_bad_names():
    base, tuned = tiny_gpt2(), tiny_gpt2()
    with torch.no_grad():
        tuned.transformer.h[0].attn.c_proj.weight.add_(1.5)
    deltas = weight_deltas(base, tuned, ["transformer.h.0.attn.c_proj"])
    assert torch.equal(deltas["transformer.h.0.attn.c_proj"], torch.full((16, 16), 1.5,
                                                                         dtype=torch.float64))
    with pytest.raises(ValueError, match="names must be modules of the model"):
        weight_deltas(base, tuned, ["transformer.nope"])
    with pytest.raises(ValueError, match="names must be modules"):
        gradient_sums(base, [], lambda step: {}, 1)


def test_check_structure_skips_zero_layers_and_restores_threads():
    threads = torch.get_num_threads()
    W, _, _ = planted(40, 36, 2, 2, 0.05, 0)
    report = check_structure({"w": W, "zero": torch.zeros(8, 8)}, num_clusters=2, rank=2,
                             null_draws=2)
    assert list(report["layers"]) == ["w"] and report["skipped"] == ["zero"]
    assert torch.get_num_threads() == threads
    assert math.isfinite(report["seconds"])


@pytest.mark.parametrize("matrices,message", [
    ({}, "no matrices given"),
    ({"z": torch.zeros(3, 3)}, "every matrix is zero"),
    ({"v": torch.ones(5)}, "'v': layer_structure: a matrix must be a 2-D floating tensor"),
    ({"i": torch.ones(3, 3, dtype=torch.long)}, "2-D floating tensor"),
    ({"n": torch.full((3, 3), math.nan)}, "non-finite"),
    ({"small": torch.randn(3, 9)}, "num_clusters=4 is more than the matrix's rows"),
])
def test_check_structure_refuses_bad_input(matrices, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        check_structure(matrices)


@pytest.mark.parametrize("kwargs", [dict(num_clusters=0), dict(rank=1.5), dict(null_draws=True)])
def test_layer_structure_refuses_bad_settings(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=f"{name} must be an int"):
        layer_structure(torch.randn(8, 8), **kwargs)


def test_inputs_of_any_dtype_and_layout():
    W, _, _ = planted(48, 40, 2, 2, 0.05, 4)
    expected = layer_structure(W, num_clusters=2, rank=2, null_draws=2)
    got = layer_structure(W.float().T.contiguous().T, num_clusters=2, rank=2, null_draws=2)
    assert got["verdict"] == expected["verdict"]
    assert got["error"]["global"] == pytest.approx(expected["error"]["global"], rel=1e-5)
