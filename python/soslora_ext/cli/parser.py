"""The command line's parser: every command, its options and their help (the layer options'
help is the config fields' own)."""
from __future__ import annotations

import argparse

from .args import (
    Parser,
    document_defaults,
    finite_float,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    probability,
    seed,
)
from .quantize import add_merge_options, add_train_options


def build_parser() -> argparse.ArgumentParser:
    from ..apps import main_job
    from ..layers.config import PRESETS, CPSConfig, SOSConfig, field_help

    def sos(name):
        return f"SOS: {field_help(SOSConfig, name)}"

    def cps(name):
        return f"CPS: {field_help(CPSConfig, name)}"

    # The commands are listed once, by the subparsers' help.
    parser = Parser(prog="python -m soslora_ext",
                    description="Structured low-rank adapters (SOS-LoRA, CPS-LoRA, naive "
                    "summation) from the command line. Errors are reported in one line (set "
                    "SOSLORA_DEBUG=1 for the traceback).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="synthetic end-to-end run on CPU (seconds)")
    p.add_argument("--steps", type=positive_int, default=600, help="optimizer steps")
    p.add_argument("--seed", type=seed, default=0, help="random seed")

    p = sub.add_parser("main-job", help=main_job.__doc__.splitlines()[0],
                       description=main_job.__doc__)
    main_job.add_arguments(p)
    for action in p._actions:  # the same checks as the other commands' counts
        if action.dest == "seed":
            action.type = seed
        elif action.type is int:
            action.type = positive_int
        elif action.type is float:
            action.type = positive_float

    p = sub.add_parser("train", help="fine-tune a model directory with SOS-LoRA or CPS-LoRA",
                       description="Fine-tune a Hugging Face model directory with SOS-LoRA or "
                       "CPS-LoRA on a classification (.jsonl with text/label, or 'filekinds') "
                       "or text (.txt file or directory: causal LM) dataset; writes OUT/adapter "
                       "and OUT/metrics.json. Accuracy is measured on held-out rows: for a "
                       ".jsonl, each label's rows are shuffled with --seed and the last fifth "
                       "of them is held out; 'filekinds' uses its own split, by file.")
    p.add_argument("model_dir", help="a model directory (config.json, weights, tokenizer)")
    p.add_argument("--data", required=True,
                   help="'filekinds', a .jsonl file of {\"text\", \"label\"}, or text files")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--task", choices=["auto", "classification", "text"], default="auto",
                   help="auto: classification for 'filekinds' and .jsonl, text otherwise")
    p.add_argument("--targets", nargs="+", default=None,
                   help="module names to adapt (default: every Linear except the heads); "
                   "nn.Embedding, nn.Conv1d/2d/3d and nn.MultiheadAttention modules too, e.g. "
                   "word_embeddings")
    p.add_argument("--method", choices=["sos", "cps"], default="sos",
                   help="sos: SOS-LoRA; cps: CPS-LoRA")
    p.add_argument("--preset", choices=sorted(PRESETS), default="default",
                   help="SOS: a named recipe of layer hyperparameters and schedules: "
                   "default (the defaults below) or official, the SOS-LoRA authors' recipe "
                   "(rank 128, alpha 128, 4 experts, channel scales with "
                   "anchor 1e-4, gate starting at temperature 2 with uniform prior 2e-4, LoRA+ "
                   "ratio 2, dropout 0.05, factors in the base dtype, lambda per micro-batch); "
                   "--rank/--alpha/--experts/--scale-mode/--gate/--dropout override it when "
                   "given. --lr/--steps/--batch-size are not part of it")
    # Layer options: their help is the config fields' own; the defaults are the command's.
    p.add_argument("--rank", type=positive_int, default=None,
                   help=f"{sos('rank')}; {cps('rank')} (default 16; 128 with --preset official)")
    p.add_argument("--experts", type=positive_int, default=None,
                   help=f"{sos('num_experts')} (default 4)")
    p.add_argument("--alpha", type=positive_float, default=None,
                   help=f"{sos('alpha')}; {cps('alpha')} (default 2 * rank; 128 with --preset "
                   "official)")
    p.add_argument("--scale-mode", choices=["fixed", "channel"], default=None,
                   help=f"{sos('scale_mode')} (default fixed; channel with --preset official)")
    p.add_argument("--gate", action=argparse.BooleanOptionalAction, default=None,
                   help=f"{sos('gate')} (default off; on with --preset official)")
    p.add_argument("--clusters", type=positive_int, default=4, help=cps("num_clusters"))
    p.add_argument("--repartition-every", type=non_negative_int, default=0,
                   help=cps("repartition_every"))
    p.add_argument("--dropout", type=probability, default=None,
                   help=f"{sos('dropout')}; {cps('dropout')} (default 0.0; 0.05 with --preset "
                   "official)")
    p.add_argument("--ortho-lambda", type=non_negative_float, default=None,
                   help="orthogonality weight after the ramp (default 0.006, as both presets)")
    p.add_argument("--steps", type=positive_int, default=200)
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--lr", type=positive_float, default=5e-4)
    p.add_argument("--max-length", type=positive_int, default=128,
                   help="tokens per example (classification) or per chunk (text)")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--log-every", type=non_negative_int, default=20,
                   help="print the mean loss this often (0: never)")
    add_train_options(p)

    p = sub.add_parser(
        "cps-check", help="does CPS-LoRA fit this model? block structure against a null",
        description="Measure, per Linear, whether the update a fine-tuning makes has "
        "CPS-LoRA's structure (row x column clusters): the energy on the diagonal blocks of a "
        "spectral co-clustering against spectral nulls (the same singular values, random "
        "singular vectors), and the error of --clusters blocks of rank --rank against one "
        "rank --rank term (the same parameters); a verdict per layer and for the model. The "
        "update is the sum of --steps steps' gradients on --data (no optimizer step), or the "
        "difference between a fine-tuned copy (--tuned) and MODEL_DIR.")
    p.add_argument("model_dir", help="a model directory (config.json, weights, tokenizer)")
    p.add_argument("--data", help="gradients on this data, read as train reads it: "
                   "'filekinds', a .jsonl file of {\"text\", \"label\"}, or text files")
    p.add_argument("--tuned", help="a fully fine-tuned copy of MODEL_DIR: its update (tuned - "
                   "base weights) is checked instead of gradients")
    p.add_argument("--task", choices=["auto", "classification", "text"], default="auto",
                   help="with --data: auto: classification for 'filekinds' and .jsonl, text "
                   "otherwise")
    p.add_argument("--targets", nargs="+", default=None,
                   help="Linear module names to check (default: every Linear except the heads)")
    p.add_argument("--clusters", type=positive_int, default=4, help=cps("num_clusters"))
    p.add_argument("--rank", type=positive_int, default=16, help="CPS: every cluster's rank, "
                   "and the rank of the global term it is compared with")
    p.add_argument("--null-draws", type=positive_int, default=5,
                   help="spectral null matrices per layer")
    p.add_argument("--steps", type=positive_int, default=8, help="batches of gradients")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--max-length", type=positive_int, default=128,
                   help="tokens per example (classification) or per chunk (text)")
    p.add_argument("--seed", type=seed, default=0,
                   help="random seed (the data split, batches, new head, nulls, clustering)")
    p.add_argument("--json", help="write the report as JSON here")
    p.add_argument("--plot", help="write a PNG of block energies and errors here (needs "
                   "matplotlib: pip install matplotlib)")

    for name, text in (("merge", "write the merged model to OUT (from_pretrained loads it)"),
                       ("export-peft", "write the adapter in PEFT's LoRA format to OUT")):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("adapter", help="an adapter directory written by train or save_adapter")
        p.add_argument("--base", required=True, help="the base model directory")
        p.add_argument("--out", required=True, help="output directory")
        if name == "merge":
            add_merge_options(p)

    p = sub.add_parser("info", help="layers, ranks, scales and trainable parameters")
    p.add_argument("adapter", help="an adapter directory written by train or save_adapter")

    compose = sub.add_parser("compose", help="sum adapters and measure their interference",
                             description="Naive summation of LoRA adapters (PEFT directories "
                             "or our own) and their interference, computed on the factors. "
                             "Adapters are named by the shortest end of their path that tells "
                             "them apart, or NAME=PATH.")
    csub = compose.add_subparsers(dest="compose_command", required=True, metavar="ACTION")
    adapters_help = "adapter directories (PATH or NAME=PATH)"
    p = csub.add_parser("report", help="pairwise cosines, RMS cosine, norms, effective ranks")
    p.add_argument("adapters", nargs="+", help=adapters_help)
    p.add_argument("--json", help="write the report as JSON here")
    p.add_argument("--plot", help="write a PNG heatmap of the pairwise RMS cosine here "
                   "(needs matplotlib: pip install matplotlib)")
    p = csub.add_parser("merge", help="write MODEL_DIR + sum of the adapters as a model")
    p.add_argument("adapters", nargs="+", help=adapters_help)
    p.add_argument("--into", required=True, help="the base causal-LM model directory")
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--weights", type=finite_float, nargs="+",
                   help="one weight per adapter (default 1 each)")
    p = csub.add_parser("concat", help="write the exact sum as one PEFT LoRA adapter")
    p.add_argument("adapters", nargs="+", help=adapters_help)
    p.add_argument("--out", required=True, help="output adapter directory")
    p.add_argument("--weights", type=finite_float, nargs="+",
                   help="one weight per adapter (default 1 each)")
    p = csub.add_parser("eval", help="perplexity of the base, each adapter and each sum")
    p.add_argument("adapters", nargs="+", help=adapters_help)
    p.add_argument("--model", required=True, help="the base causal-LM model directory")
    p.add_argument("--text", required=True, help="a text file or a folder of .txt files")
    p.add_argument("--max-length", type=positive_int, default=128, help="tokens per chunk")
    p.add_argument("--max-chunks", type=positive_int, default=None,
                   help="evaluate at most this many chunks (default: all)")
    p.add_argument("--json", help="write the perplexities as JSON here")
    document_defaults(parser)
    return parser
