"""The CPS-LoRA structure diagnostic (soslora_ext.layers.structure) validated both ways, and
what it says about the main job's model.

planted: on each of the main job's layer shapes, G shuffled blocks of rank r plus 5% Gaussian
noise must be called "clustered" with the blocks recovered (adjusted Rand index), and the
matrix with the same singular values and random singular vectors (the spectral null) must not.
finetune (--finetune): all-MiniLM-L6-v2 fully fine-tuned as the main job trains its adapters
(filekinds, every encoder Linear's weight and bias plus the classifier and pooler, AdamW,
--steps steps, batch 16, 64 tokens, seed 0), then the diagnostic on its update
dW = W_tuned - W_base of the 36 Linear layers.

    python bench/bench_structure.py [--finetune] [--json results.json]
    python bench/bench_structure.py --tiny      # seconds: checks the script, not numbers

Prints a markdown table last; --json writes every number.
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import time

import torch

from soslora_ext.apps import finetune, main_job
from soslora_ext.layers.partition import adjusted_rand_index
from soslora_ext.layers.structure import check_structure, layer_structure, spectral_null


def planted(m, n, clusters, rank, noise, generator):
    """(W [m, n], row labels, column labels): shuffled blocks of rank `rank`, plus Gaussian
    noise of `noise` times the blocks' norm."""
    rows = torch.randperm(m, generator=generator) % clusters
    cols = torch.randperm(n, generator=generator) % clusters
    W = torch.zeros(m, n, dtype=torch.float64)
    for c in range(clusters):
        r, k = (rows == c).nonzero()[:, 0], (cols == c).nonzero()[:, 0]
        W[r[:, None], k[None, :]] = torch.randn(len(r), rank, generator=generator,
                                                dtype=torch.float64) @ \
            torch.randn(rank, len(k), generator=generator, dtype=torch.float64)
    N = torch.randn(m, n, generator=generator, dtype=torch.float64)
    return W + noise * W.norm() / N.norm() * N, rows, cols


def run_planted(shapes, clusters, rank, null_draws, seed) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows_out = []
    for m, n in shapes:
        W, rows, cols = planted(m, n, clusters, rank, 0.05, g)
        null = spectral_null(torch.linalg.svdvals(W), (m, n), g)
        for kind, matrix in (("planted", W), ("spectral null", null)):
            start = time.perf_counter()
            result = layer_structure(matrix, clusters, rank, null_draws, seed, labels=True)
            found = result["labels"]["cocluster"]
            rows_out.append(dict(
                shape=f"{m}x{n}", matrix=kind, verdict=result["verdict"],
                block_energy=result["block_energy"]["value"],
                null_max=max(result["block_energy"]["null"]), cps_error=result["error"]["best"],
                global_error=result["error"]["global"],
                row_ari=adjusted_rand_index(torch.tensor(found["rows"]), rows),
                col_ari=adjusted_rand_index(torch.tensor(found["cols"]), cols),
                seconds=time.perf_counter() - start))
    return rows_out


def run_finetune(steps, lr, clusters, rank, null_draws, seed) -> dict:
    """Full fine-tuning of the main job's targets, then the diagnostic on the update."""
    from transformers import AutoTokenizer

    from soslora_ext.apps.data import build_filekinds

    model_dir = main_job.minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    train_rows, test_rows = build_filekinds(256, 64, seed=seed)
    train = finetune.encode(tokenizer, [t for t, _ in train_rows], 64)
    train["labels"] = torch.tensor([l for _, l in train_rows])
    test = finetune.encode(tokenizer, [t for t, _ in test_rows], 64)
    model = main_job.load_classifier(model_dir, seed)
    names = [n for n, _ in model.named_modules() if re.fullmatch(main_job.TARGETS, n)]
    base = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    keep = {id(p) for n, m in model.named_modules()
            if n in names or n in main_job.FULL_PRECISION for p in m.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    fit = finetune.train(model, finetune.sample_batches(train, 16), steps, lr=lr, seed=seed,
                         desc="full fine-tuning", progress=False, log_every=0)
    accuracy = finetune.accuracy(finetune.predict_logits(model, test),
                                 torch.tensor([l for _, l in test_rows]))
    deltas = {n: model.get_submodule(n).weight.detach() - base[n] for n in names}
    report = check_structure(deltas, clusters, rank, null_draws, seed)
    return dict(steps=steps, lr=lr, accuracy=accuracy, train_seconds=fit.seconds,
                report=report)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clusters", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--null-draws", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--finetune", action="store_true",
                        help="also fully fine-tune the main job's model (minutes)")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--tiny", action="store_true", help="small shapes, seconds")
    parser.add_argument("--json", help="write the numbers here")
    args = parser.parse_args(argv)
    shapes = [(48, 40), (40, 96)] if args.tiny else [(384, 384), (1536, 384), (384, 1536)]
    clusters, rank = (4, 2) if args.tiny else (args.clusters, args.rank)
    machine = (f"{main_job.cpu_name()}, {torch.get_num_threads()} threads, torch "
               f"{torch.__version__}, Python {platform.python_version()}")
    results = dict(machine=machine, clusters=clusters, rank=rank, null_draws=args.null_draws,
                   planted=run_planted(shapes, clusters, rank, args.null_draws, args.seed))
    if args.finetune:
        results["finetune"] = run_finetune(args.steps, args.lr, clusters, rank,
                                           args.null_draws, args.seed)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    if "finetune" in results:
        f = results["finetune"]
        m = f["report"]["model"]
        print(f"full fine-tuning, {f['steps']} steps at lr {f['lr']}: test accuracy "
              f"{f['accuracy']:.4f}; the update's structure: {m['text']}")
        print("medians over the layers: " + ", ".join(f"{k} {v:.3f}"
                                                     for k, v in m["medians"].items()))
        print()
    print(f"Machine: {machine}; {clusters} blocks of rank {rank} against one rank-{rank} term, "
          f"{args.null_draws} null draws\n")
    print("| shape | matrix | verdict | block energy | null max | CPS error | global error "
          "| row ARI | col ARI | s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results["planted"]:
        print(f"| {r['shape']} | {r['matrix']} | {r['verdict']} | {r['block_energy']:.3f} | "
              f"{r['null_max']:.3f} | {r['cps_error']:.3f} | {r['global_error']:.3f} | "
              f"{r['row_ari']:.3f} | {r['col_ari']:.3f} | {r['seconds']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
