"""What the commands of the command line (``python -m soslora_ext COMMAND``, also installed as
``soslora``) do: train, cps-check, merge, export-peft and info here, compose in compose.py; ``main``
parses (parser.py, which holds every command's help) and runs one. Errors are reported in one
line (set SOSLORA_DEBUG=1 for the traceback)."""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path

from .args import (
    CliError,
    check_outputs,
    model_directory,
    quiet_transformers,
    train_layer_kwargs,
    write_text,
)
from .compose import cmd_compose_concat, cmd_compose_eval, cmd_compose_merge, cmd_compose_report
from .parser import build_parser
from .quantize import (
    check_merge,
    dequantized_merge,
    describe_base,
    keep_heads,
    load_kwargs,
    quantization,
    recorded,
)

# Module names that hold a task head: trained whole (modules_to_save), never adapted.
HEADS = ("classifier", "score", "lm_head", "pooler")


# ---- train and cps-check ----------------------------------------------------------------------
def _load_task(args, quant: dict | None = None):
    """(task, model, tokenizer, training tensors, held-out rows, label names, model_kwargs,
    quant) for MODEL_DIR and --data/--task/--seed/--max-length: what train fine-tunes and
    cps-check takes gradients of. A classifier gets a new head; `quant` (train --quantize)
    loads the base quantized, keeping the heads whole."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from ..apps import finetune
    from ..apps.data import read_training_data
    from ..formats.base_models import causal_lm_architectures

    model_dir = model_directory(args.model_dir)
    try:
        task, payload = read_training_data(args.data, args.task, args.seed)
    except ValueError as e:
        raise CliError(f"--data {e}") from None
    if task == "text":
        causal_lm_architectures(model_dir)  # any other model would get an untrained LM head
    quiet_transformers()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(args.seed)
    test_rows, names, model_kwargs = [], None, {}
    if task == "classification":
        train_rows, test_rows, names = payload
        quant = keep_heads(quant, AutoModelForSequenceClassification, model_dir, HEADS)
        model = AutoModelForSequenceClassification.from_pretrained(
            model_dir, num_labels=len(names), ignore_mismatched_sizes=True,  # a new head
            **load_kwargs(quant))
        _set_labels(model, names)
        model_kwargs = dict(num_labels=len(names))
        data = finetune.encode(tokenizer, [t for t, _ in train_rows], args.max_length)
        data["labels"] = torch.tensor([l for _, l in train_rows])
    else:
        ids = tokenizer(payload, return_tensors="pt")["input_ids"][0]
        n = ids.numel() // args.max_length
        if n < 1:
            raise CliError(f"--data {args.data}: {ids.numel()} tokens, fewer than --max-length="
                           f"{args.max_length}: give more text or a smaller --max-length")
        quant = keep_heads(quant, AutoModelForCausalLM, model_dir, HEADS)
        model = AutoModelForCausalLM.from_pretrained(model_dir, **load_kwargs(quant))
        chunks = ids[: n * args.max_length].view(n, args.max_length)
        data = dict(input_ids=chunks, labels=chunks)
    return task, model, tokenizer, data, test_rows, names, model_kwargs, quant


def _targets(model, given: list[str] | None) -> list[str]:
    """The module names to adapt (or check): those --targets names (as apply_sos_lora matches
    a list), or by default every Linear (nn.Linear, bitsandbytes', GPT-2's Conv1D) except the
    heads."""
    from ..layers.base import is_linear

    return [n for n, m in model.named_modules() if is_linear(m) and (
        any(n == t or n.endswith("." + t) for t in given) if given
        else not any(h in n.split(".") for h in HEADS))]


def cmd_train(args) -> int:
    import torch

    from ..apps import finetune
    from ..formats.native import save_adapter
    from ..layers.model import apply_cps_lora, apply_sos_lora, trainable_parameters
    from ..layers.quantized import exact_path

    model_dir = model_directory(args.model_dir)
    layer_kwargs = train_layer_kwargs(args)  # bad values fail before the model loads
    quant = quantization(args)
    apply = apply_sos_lora if args.method == "sos" else apply_cps_lora
    task, model, tokenizer, data, test_rows, names, model_kwargs, quant = _load_task(args, quant)
    quant = describe_base(quant, model)
    targets = args.targets or _targets(model, None)
    heads = [n for n, _ in model.named_modules() if n.split(".")[-1] in HEADS and n
             and task == "classification"]
    with _memory_for("--rank", layer_kwargs["rank"], "the adapters do not fit"):
        apply(model, targets, modules_to_save=heads, **layer_kwargs)
    trainable, total = trainable_parameters(model)
    print(f"{task}: {trainable} trainable of {total} parameters"
          + (f", base layers {quant['base_layer']}" if quant else ""), file=sys.stderr)
    with _memory_for("--batch-size/--max-length", f"{args.batch_size}/{args.max_length}",
                     "a training step does not fit"):
        fit = finetune.train(model, finetune.sample_batches(data, args.batch_size), args.steps,
                             lr=args.lr, seed=args.seed, log_every=args.log_every,
                             lambda_max=args.ortho_lambda, preset=args.preset)
    metrics = dict(task=task, steps=args.steps, losses=fit.losses, seconds=fit.seconds,
                   trainable_parameters=trainable, quantization=quant)
    if args.method == "sos":
        metrics["preset"] = args.preset
    if args.method == "cps":
        metrics["repartitions"] = fit.repartition_log
    if task == "classification":
        test = finetune.encode(tokenizer, [t for t, _ in test_rows], args.max_length)
        with exact_path(model):  # a quantized base computes as in training, on any shape
            logits = finetune.predict_logits(model, test)
        metrics["accuracy"] = finetune.accuracy(logits, torch.tensor([l for _, l in test_rows]))
        metrics["labels"] = names
        metrics["split"] = dict(train=len(data["labels"]), test=len(test_rows), test_per_label={
            name: sum(l == i for _, l in test_rows) for i, name in enumerate(names)})
    out = Path(args.out)
    save_adapter(model, out / "adapter", metadata=dict(
        base_model_class=type(model).__name__, model_kwargs=model_kwargs,
        base_model_dir=str(model_dir.resolve()), labels=metrics.get("labels"),
        **({"preset": args.preset} if args.method == "sos" else {}),
        **({"quantization": quant} if quant else {})))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    summary = f"accuracy {metrics['accuracy']:.4f}, " if "accuracy" in metrics else ""
    if args.method == "cps":
        adopted = sum(v["adopted"] for r in fit.repartition_log for v in r["layers"].values())
        summary += (f"{len(fit.repartition_log)} repartitions ({adopted} new layer partitions "
                    "adopted), " if args.repartition_every else "fixed partitions, ")
    print(f"{summary}final loss {sum(fit.losses[-10:]) / len(fit.losses[-10:]):.4f}; "
          f"adapter written to {out / 'adapter'}")
    return 0


def cmd_cps_check(args) -> int:
    import torch
    from transformers import AutoModel

    from ..apps import finetune
    from ..apps.cps_check import format_structure, plot_structure
    from ..compose import require_matplotlib
    from ..layers.structure import check_structure, gradient_sums, weight_deltas

    if (args.data is None) == (args.tuned is None):
        raise CliError("give --data (the gradients of a few steps on it) or --tuned (a fine-"
                       "tuned copy of MODEL_DIR, whose update is checked), one of the two")
    if args.plot:
        try:
            require_matplotlib()
        except ImportError as e:
            raise CliError(f"--plot: {e}") from None
    if args.data is not None:
        _, model, _, data, *_ = _load_task(args)
        names = _check_targets(model, args)
        generator = torch.Generator().manual_seed(args.seed)
        sample = finetune.sample_batches(data, args.batch_size)
        model.train()  # dropout as in training: the gradients CPS-LoRA's statistics see
        start = time.perf_counter()
        matrices = gradient_sums(model, names, lambda step: sample(step, generator), args.steps)
        source = dict(kind="gradients", steps=args.steps, batch_size=args.batch_size,
                      data=args.data, max_length=args.max_length,
                      seconds=time.perf_counter() - start)
    else:
        base_dir, tuned_dir = model_directory(args.model_dir), model_directory(args.tuned)
        quiet_transformers()
        base, tuned = AutoModel.from_pretrained(base_dir), AutoModel.from_pretrained(tuned_dir)
        if type(base) is not type(tuned):
            raise CliError(f"--tuned {args.tuned}: a {type(tuned).__name__}, but MODEL_DIR is "
                           f"a {type(base).__name__}")
        names = _check_targets(base, args)
        try:
            matrices = weight_deltas(base, tuned, names)
        except ValueError as e:
            raise CliError(f"--tuned {args.tuned}: {e}") from None
        source = dict(kind="delta", tuned=args.tuned)
    report = dict(check_structure(matrices, args.clusters, args.rank, args.null_draws,
                                  args.seed), source=source, model_dir=args.model_dir)
    print(format_structure(report))
    if args.json:
        write_text(args.json, json.dumps(report, indent=2) + "\n")
    if args.plot:
        plot_structure(report, args.plot)
    return 0


def _refuse_other_kinds(model, given: list[str] | None) -> None:
    """cps-check measures linear layers (the update's statistics are a linear layer's input and
    output gradients): a --targets name of another adaptable kind is refused, not skipped."""
    from ..layers.base import is_adaptable, is_linear

    for name, module in model.named_modules():
        if given and is_adaptable(module) and not is_linear(module) and any(
                name == t or name.endswith("." + t) for t in given):
            raise CliError(f"--targets {' '.join(given)}: {name!r} (type "
                           f"{type(module).__name__}): cps-check measures Linear layers only "
                           "(train adapts it)")


def _check_targets(model, args) -> list[str]:
    """The layers cps-check measures, checked against --clusters before any work."""
    from ..layers.base import base_features

    names = _targets(model, args.targets)
    _refuse_other_kinds(model, args.targets)
    if not names:
        raise CliError(f"--targets {' '.join(args.targets)}: no Linear module of the model has "
                       "these names" if args.targets
                       else "the model has no Linear module besides its heads")
    modules = dict(model.named_modules())
    for name in names:
        in_features, out_features = base_features(modules[name])
        if args.clusters > min(in_features, out_features):
            raise CliError(f"--clusters {args.clusters}: more than the rows or columns of "
                           f"{name} ({in_features} -> {out_features}); give fewer clusters or "
                           "other --targets")
    return names


@contextlib.contextmanager
def _memory_for(option: str, value, what: str):
    """An allocation that fails inside the block is reported naming the option that sized it
    (`what` says what did not fit)."""
    import torch

    try:
        yield
    except (MemoryError, torch.OutOfMemoryError, RuntimeError) as e:
        if not isinstance(e, MemoryError) and "alloc" not in str(e).lower():
            raise
        raise CliError(f"{option} {value}: {what} in memory; use a smaller value "
                       f"({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})"
                       ) from None


# ---- merge / export / info --------------------------------------------------------------------
def _own_adapter(path: str) -> str:
    """An adapter directory in this package's format: a PEFT one gets pointed to the commands
    and functions that read PEFT adapters."""
    from ..formats.files import read_config
    from ..formats.native import AdapterError

    try:
        _, config = read_config(Path(path))
    except AdapterError:
        return path  # the loader reports a missing or unreadable config precisely
    if "peft_type" in config:
        raise CliError(f"{path}: a PEFT adapter, not a soslora_ext one: load it into a model "
                       "with soslora_ext.import_peft, or use `compose report/merge/concat/eval`, "
                       "which read PEFT adapters")
    return path


def _set_labels(model, names) -> None:
    """The label names in the model's config, so a saved (merged) classifier keeps them."""
    if names and getattr(model.config, "num_labels", None) == len(names):
        model.config.id2label = dict(enumerate(names))
        model.config.label2id = {name: i for i, name in enumerate(names)}


def _load_adapted(adapter: str, base: str):
    import transformers

    from ..formats.native import load_adapter, read_adapter_config

    config = read_adapter_config(_own_adapter(adapter))
    meta = config.get("metadata") or {}
    if not (isinstance(meta.get("model_kwargs", {}), dict)
            and isinstance(meta.get("labels") or [], list)):
        raise CliError(f"{adapter}: its metadata's model_kwargs must be an object and labels a "
                       "list")
    class_name = config.get("base_model_class") or meta.get("base_model_class")
    model_class = getattr(transformers, str(class_name), None)
    if model_class is None or not hasattr(model_class, "from_pretrained"):
        raise CliError(f"{adapter}: base model class {class_name!r} is not a transformers class")
    base_dir = model_directory(base)
    base_type = json.loads((base_dir / "config.json").read_text()).get("model_type")
    trained_type = getattr(getattr(model_class, "config_class", None), "model_type", None)
    if trained_type and base_type != trained_type:
        raise CliError(f"--base {base}: a {base_type!r} model, but {adapter} was trained on a "
                       f"{class_name} ({trained_type!r})")
    quant = recorded(adapter, config)  # the base is loaded quantized as it was trained
    quiet_transformers()
    model = model_class.from_pretrained(base_dir, **meta.get("model_kwargs", {}),
                                        **load_kwargs(quant))
    _set_labels(model, meta.get("labels"))
    return load_adapter(model, adapter)


def cmd_merge(args) -> int:
    from transformers import AutoTokenizer

    from ..formats.native import read_adapter_config
    from ..layers.model import merge_and_unload

    check_merge(args, recorded(args.adapter, read_adapter_config(_own_adapter(args.adapter))))
    model = _load_adapted(args.adapter, args.base)
    model = dequantized_merge(model, args.dtype) if args.dequantize else merge_and_unload(model)
    model.save_pretrained(args.out)
    try:
        AutoTokenizer.from_pretrained(args.base).save_pretrained(args.out)
    except (OSError, ValueError):
        pass  # a model directory without a tokenizer: nothing to copy
    print(f"merged model written to {args.out}")
    return 0


def cmd_export_peft(args) -> int:
    from ..formats.native import export_peft

    export_peft(_load_adapted(args.adapter, args.base), args.out)
    print(f"PEFT LoRA adapter written to {args.out}")
    return 0


def cmd_info(args) -> int:
    from ..formats.native import read_adapter

    # The tensors saved whole come from the same checked read as the layers (the weights
    # file alone may be a newer save's while that save is between its renames).
    config, layers, whole_tensors = read_adapter(_own_adapter(args.adapter))
    print(f"adapter {args.adapter}: method {config.get('method')}, library "
          f"{config.get('library_version')}, base {config.get('base_model_class')}")
    quant = (config.get("metadata") or {}).get("quantization")
    if isinstance(quant, dict):
        print(f"trained over quantized base layers: {quant.get('base_layer')}")
    print(f"{'layer':<48} {'in->out':>11}  structure")
    adapter_params = 0
    for name, layer in layers.items():
        adapter_params += sum(p.numel() for _, p in layer.named_adapter_parameters())
        print(f"{name:<48} {layer.in_features:>5}->{layer.out_features:<5}  {layer.describe()}")
    saved = config.get("modules_to_save") or {}
    whole = sum(t.numel() for t in whole_tensors.values())
    print(f"trainable parameters: {adapter_params + whole} ({adapter_params} in adapters, "
          f"{whole} in modules saved whole: {sorted(saved) or 'none'})")
    return 0


# ---- entry point -----------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    from ..apps import demo, main_job

    commands = {"demo": lambda a: demo.main(["--steps", str(a.steps), "--seed", str(a.seed)]),
                "main-job": main_job.main, "train": cmd_train, "cps-check": cmd_cps_check,
                "merge": cmd_merge,
                "export-peft": cmd_export_peft, "info": cmd_info,
                "compose": lambda a: {"report": cmd_compose_report, "merge": cmd_compose_merge,
                                      "concat": cmd_compose_concat,
                                      "eval": cmd_compose_eval}[a.compose_command](a)}
    try:
        args = build_parser().parse_args(argv)
        check_outputs(args)  # before any work: a bad --out would otherwise fail at the end
        return commands[args.command](args)
    except Exception as e:  # one line for the user; the traceback on request
        if os.environ.get("SOSLORA_DEBUG") and not isinstance(e, CliError):
            raise
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2
