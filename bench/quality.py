"""Quality benchmark: does SOS-LoRA beat tuned baselines? Seeds, a learning-rate sweep per
method, confidence intervals and paired tests, on real weights and this machine's own text.

Two tasks (bench/quality_tasks.py, data in bench/quality_data.py):
  stdlib-modules  all-MiniLM-L6-v2 classifies short snippets of Python's standard library by
                  module (24 classes, 16 examples per class); metric: test accuracy.
  man-pages       the small GPT-2 pretrained by examples/naive_summation adapted to roff man
                  pages, a domain it never saw; metric: test perplexity.
Eight methods (bench/quality_methods.py) at matched trainable parameters: PEFT LoRA, rsLoRA and
DoRA, SOS-LoRA (default and the authors' preset), CPS-LoRA (static and repartitioned) and full
fine-tuning of the targeted layers as the ceiling. Every method gets the same learning-rate
sweep; the learning rate is chosen on the validation split (mean over seeds) and the test
split is reported at it; the comparison with LoRA is paired over seeds (bench/quality_stats.py).

    python bench/quality.py --out runs/quality      # the full run (about 45 min, 2 cores)
    python bench/quality.py --tiny --out DIR        # seconds: checks the pipeline, not numbers

Writes results.json (every run, the selection and the statistics), quality.png and RESULTS.md
(bench/quality_report.py) into --out. The pretrained GPT-2 is kept under --cache (default
OUT/cache) and reused by later runs with the same settings.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from soslora_ext.apps import finetune  # noqa: E402
from soslora_ext.apps.main_job import environment  # noqa: E402
from soslora_ext.layers.model import trainable_parameters  # noqa: E402

from quality_methods import BASELINE, METHODS, adapt, saved_parameters  # noqa: E402
from quality_report import plot, results_markdown  # noqa: E402
from quality_stats import holm, mean_ci, paired_t_test  # noqa: E402
from quality_tasks import ClassificationTask, LanguageModelTask  # noqa: E402

MATCHING = (
    "every low-rank method has rank r per targeted Linear (in x out), r (in + out) "
    "parameters: LoRA, rsLoRA and DoRA rank r; SOS-LoRA 4 experts of rank r/4 (total rank "
    "r); CPS-LoRA 4 clusters of rank r each, whose factors are [r, in] and [out, r]. On top "
    "of that DoRA trains a magnitude per output channel and the official SOS-LoRA preset a "
    "scale per expert and output channel plus 4 gate logits (counted in the table, not "
    "compensated). alpha = 2r for LoRA, rsLoRA, DoRA, SOS-LoRA and CPS-LoRA; the official "
    "preset keeps its alpha = r (each expert's scale alpha / (r/4) = 4 as in the authors' "
    "run) with its other layer settings (trainable channel scales, gate, LoRA+ ratio 2, "
    "dropout 0.05, scale anchor and uniform prior) and its regularizer schedules; its "
    "training arguments (lr 2e-5, cosine schedule) are replaced by this benchmark's sweep "
    "and schedule like every other method's. Full fine-tuning trains the targeted layers' "
    "weights and biases. Modules trained whole (the classifier head and pooler) train in "
    "every method and are counted after the +.")

# (task settings, steps, batch size, learning rates) of each configuration.
CONFIGS = {
    "full": dict(
        seeds=5,
        classification=dict(task=dict(train_per_class=16, val_per_class=8, test_per_class=16,
                                      snippet_lines=4, max_chars=200, max_length=48,
                                      adapted_layers=2, rank=16),
                            steps=100, batch_size=16, lrs=(3e-4, 1e-3, 3e-3)),
        language_model=dict(task=dict(train_chars=100_000, heldout_chars=40_000, rank=16,
                                      pretrain_train_chars=400_000, pretrain_test_chars=40_000,
                                      pretrain_steps=600),
                            steps=50, batch_size=8, lrs=(3e-4, 1e-3, 3e-3, 1e-2))),
    "tiny": dict(
        seeds=2,
        classification=dict(task=dict(train_per_class=2, val_per_class=1, test_per_class=2,
                                      snippet_lines=2, max_chars=60, max_length=16,
                                      adapted_layers=1, rank=4,
                                      classes=("argparse", "optparse", "json"),
                                      targets=r"bert\.encoder\.layer\.0\.attention\.self\.query"),
                            steps=2, batch_size=4, lrs=(1e-3, 3e-3)),
        language_model=dict(task=dict(train_chars=6_000, heldout_chars=3_000, rank=4,
                                      pretrain_train_chars=20_000, pretrain_test_chars=4_000,
                                      pretrain_steps=2, seq=32,
                                      targets=r"transformer\.h\.0\.attn\.c_attn"),
                            steps=2, batch_size=4, lrs=(1e-3, 3e-3))),
}


def fingerprinted(batches):
    """(batches, sha256 object): the same batches, each step's rows hashed as they are drawn
    (the first 8 values of every row of every tensor, enough to tell rows apart), so runs can
    show that they saw the same batches in the same order."""
    digest = hashlib.sha256()

    def draw(step, generator):
        batch = batches(step, generator)
        for key in sorted(batch):
            t = batch[key]
            digest.update(t.reshape(t.shape[0], -1)[:, :8].contiguous().numpy().tobytes())
        return batch

    return draw, digest


def run_one(task, pristine, method: str, seed: int, lr: float, steps: int,
            batch_size: int) -> dict:
    """Train `method` from the pristine model with `seed` and `lr`; its validation and test
    scores (None where training diverged) and what it cost."""
    model = task.fresh_model(pristine, seed)
    saved = saved_parameters(model, task.spec())
    model, preset = adapt(model, method, task.spec(), steps)
    trainable, _ = trainable_parameters(model)
    record = dict(method=method, seed=seed, lr=lr, trainable_parameters=trainable,
                  adapter_parameters=trainable - saved, saved_parameters=saved)
    start, cpu_start = time.perf_counter(), time.process_time()
    batches, digest = fingerprinted(finetune.sample_batches(task.train_data(), batch_size))
    try:
        fit = finetune.train(model, batches, steps, lr=lr, seed=seed, progress=False,
                             log_every=0, preset=preset)
    except FloatingPointError as e:
        record.update(diverged=True, error=str(e), val=None, test=None,
                      train_seconds=time.perf_counter() - start,
                      cpu_seconds=time.process_time() - cpu_start)
        return record
    last = fit.losses[-10:]
    record.update(diverged=False, batches_sha256=digest.hexdigest(),
                  train_seconds=fit.seconds, final_loss=sum(last) / len(last))
    if fit.repartition_log:
        record["repartitions"] = [
            dict(step=r["step"], seconds=r["seconds"],
                 adopted=sum(v["adopted"] for v in r["layers"].values()),
                 layers=len(r["layers"])) for r in fit.repartition_log]
    record["val"] = task.evaluate(model, "val")
    record["test"] = task.evaluate(model, "test")
    if not all(math.isfinite(v) for split in ("val", "test") for v in record[split].values()):
        record.update(diverged=True, error="non-finite evaluation")
    record["seconds"] = time.perf_counter() - start
    record["cpu_seconds"] = time.process_time() - cpu_start
    return record


def summarize(task, runs: list[dict], lrs) -> dict:
    """Per method: the chosen lr (best mean validation metric over seeds; ties: lower mean
    validation loss; an lr where any seed diverged is not eligible), the test metric at it by
    seed with its mean and CI, and the paired comparison with the baseline."""
    metric, sign = task.metric, (1 if task.higher_is_better else -1)
    summary = {}
    for method in METHODS:
        mine = [r for r in runs if r["method"] == method]
        if not mine:
            continue
        by_lr = {lr: [r for r in mine if r["lr"] == lr] for lr in lrs}
        val_by_lr, candidates = {}, []
        for lr, rs in by_lr.items():
            if rs and not any(r["diverged"] for r in rs):
                val = sum(r["val"][metric] for r in rs) / len(rs)
                loss = sum(r["val"]["loss"] for r in rs) / len(rs)
                val_by_lr[f"{lr:g}"] = val
                candidates.append((-sign * val, loss, lr))
            else:
                val_by_lr[f"{lr:g}"] = None
        first = mine[0]
        entry = dict(adapter_parameters=first["adapter_parameters"],
                     saved_parameters=first["saved_parameters"], val_by_lr=val_by_lr,
                     best_lr=None, test=None)
        if candidates:
            best = min(candidates)[2]
            chosen = sorted(by_lr[best], key=lambda r: r["seed"])
            entry.update(best_lr=best, test_by_seed=[r["test"][metric] for r in chosen],
                         seeds=[r["seed"] for r in chosen])
            entry["test"] = mean_ci(entry["test_by_seed"])
        summary[method] = entry
    base = summary.get(BASELINE)
    p_values = {}
    for method, entry in summary.items():
        if method == BASELINE or not entry["test"] or not base or not base["test"]:
            continue
        entry["vs_baseline"] = paired_t_test(entry["test_by_seed"], base["test_by_seed"])
        p_values[method] = entry["vs_baseline"]["p"]
    for method, p in holm(p_values).items():
        summary[method]["vs_baseline"]["p_holm"] = p
    return summary


def run_task(task, config: dict, seeds: list[int], methods, cache: Path, out_json,
             progress) -> dict:
    """Every (seed, lr, method) run of one task, then its summary; `out_json(runs)` and
    `progress(task, record)` are called after each run."""
    t0 = time.perf_counter()
    data = task.prepare(cache)
    pristine = task.pristine()
    runs = []
    for seed in seeds:
        for lr in config["lrs"]:
            for method in methods:
                record = run_one(task, pristine, method, seed, lr, config["steps"],
                                 config["batch_size"])
                runs.append(record)
                progress(task, record)
                out_json(runs)
    spec = task.spec()
    return dict(name=task.name, description=task.description(), metric=task.metric,
                higher_is_better=task.higher_is_better, baseline=BASELINE,
                settings=asdict(task), data=data,
                steps=config["steps"], batch_size=config["batch_size"],
                lrs=list(config["lrs"]), seeds=len(seeds), rank=spec.rank, alpha=spec.alpha,
                summary=summarize(task, runs, config["lrs"]), runs=runs,
                seconds=time.perf_counter() - t0)


def build_tasks(config: dict) -> list:
    """The two tasks of a configuration (CONFIGS[name]), not yet prepared."""
    return [ClassificationTask(**config["classification"]["task"]),
            LanguageModelTask(**config["language_model"]["task"])]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/quality"),
                        help="output directory (default runs/quality)")
    parser.add_argument("--tiny", action="store_true",
                        help="the seconds-long configuration that checks the pipeline")
    parser.add_argument("--cache", type=Path, default=None,
                        help="where the pretrained GPT-2 is kept (default OUT/cache)")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads (default 2, the cores of this machine)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                        metavar="METHOD", help=f"a subset of {list(METHODS)} (default all; "
                        f"{BASELINE} is always included)")
    parser.add_argument("--tasks", nargs="+", default=["stdlib-modules", "man-pages"],
                        choices=["stdlib-modules", "man-pages"], help="default both")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    name = "tiny" if args.tiny else "full"
    config = CONFIGS[name]
    methods = [m for m in METHODS if m in set(args.methods) | {BASELINE}]
    seeds = list(range(config["seeds"]))
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    cache = args.cache or out / "cache"
    command = "python bench/quality.py " + " ".join(shlex.quote(a) for a in
                                                    (argv if argv is not None else sys.argv[1:]))
    configs = dict(zip(("stdlib-modules", "man-pages"),
                       (config["classification"], config["language_model"])))
    result = dict(command=command.strip(), config=name, seeds=seeds, methods=methods,
                  matching=MATCHING, environment=environment(), tasks=[])

    def write_partial(runs):
        (out / "results.partial.json").write_text(json.dumps(dict(result, runs=runs)) + "\n")

    def progress(task, r):
        score = ("diverged" if r["diverged"] else
                 f"val {r['val'][task.metric]:.4f} test {r['test'][task.metric]:.4f}")
        print(f"{task.name:<15} {r['method']:<23} seed {r['seed']} lr {r['lr']:<7g} {score} "
              f"({r['train_seconds']:.1f} s)", flush=True)

    for task in build_tasks(config):
        if task.name in args.tasks:
            result["tasks"].append(run_task(task, configs[task.name], seeds, methods, cache,
                                            write_partial, progress))
    result["seconds"] = time.perf_counter() - started
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "results.partial.json").unlink(missing_ok=True)
    plot(result, out / "quality.png")
    (out / "RESULTS.md").write_text(results_markdown(result))
    print(f"{result['seconds']:.0f} s; results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
