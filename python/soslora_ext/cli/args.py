"""Command-line input checked before any work: option values, output targets, adapter names.

Everything here fails with a one-line CliError (or an argparse error, also one line) naming
the option, so that no command loads a model or trains only to fail at its last step.
"""
from __future__ import annotations

import argparse
import math
import os
import re
from pathlib import Path


class CliError(Exception):
    pass


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (raised as CliError for main to print)."""

    def error(self, message):
        raise CliError(f"{message} (see {self.prog} --help)")


# ---- option values ---------------------------------------------------------------------------
def _number(kind, text: str, test, expected: str):
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or (isinstance(value, float) and not math.isfinite(value)) or not test(value):
        raise argparse.ArgumentTypeError(f"must be {expected}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return _number(int, text, lambda v: v > 0, "a positive integer")


def non_negative_int(text: str) -> int:
    return _number(int, text, lambda v: v >= 0, "an integer >= 0")


def positive_float(text: str) -> float:
    return _number(float, text, lambda v: v > 0, "a positive number")


def non_negative_float(text: str) -> float:
    return _number(float, text, lambda v: v >= 0, "a number >= 0")


def probability(text: str) -> float:
    return _number(float, text, lambda v: 0 <= v < 1, "a number in [0, 1)")


def seed(text: str) -> int:
    # The range torch.manual_seed takes.
    return _number(int, text, lambda v: -2**63 <= v < 2**64, "an integer in [-2**63, 2**64)")


def finite_float(text: str) -> float:
    return _number(float, text, lambda v: True, "a finite number")


# Help for options that several commands share (and that a command may define without help).
COMMON_HELP = {
    "steps": "optimizer steps",
    "batch_size": "examples per optimizer step",
    "lr": "peak learning rate (AdamW, linear warm-up over the first tenth of the steps)",
    "seed": "random seed (initialisation, the data split, batches)",
    "rank": "adapter rank",
    "experts": "SOS-LoRA experts",
    "clusters": "CPS-LoRA clusters",
    "out": "output directory",
}


def document_defaults(parser: argparse.ArgumentParser) -> None:
    """Every option of `parser` and its subcommands gets help that states its default."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                document_defaults(sub)
            continue
        if not action.option_strings or action.help == argparse.SUPPRESS:
            continue
        if not action.help:
            action.help = COMMON_HELP.get(action.dest, action.dest.replace("_", " "))
        shown = not (action.default is None or action.default is False
                     or action.default == argparse.SUPPRESS)  # 0 is a default
        if shown and "default" not in action.help:
            action.help += f" (default {action.default})"


# ---- train's layer options ------------------------------------------------------------------
# The command line's own SOS-LoRA defaults (the "default" preset; smaller than SOSConfig's):
# alpha defaults to 2 * rank. With --preset official, the preset's values stand instead.
CLI_SOS_DEFAULTS = dict(num_experts=4, rank=16, scale_mode="fixed", gate=False, dropout=0.0)
# The config field each layer option sets, in the order errors name them.
LAYER_OPTIONS = {"num_experts": "--experts", "num_clusters": "--clusters", "rank": "--rank",
                 "alpha": "--alpha", "scale_mode": "--scale-mode", "gate": "--gate",
                 "dropout": "--dropout", "repartition_every": "--repartition-every"}


def train_layer_kwargs(args) -> dict:
    """The layer keywords of `train`'s options: for SOS-LoRA the preset's fields, overridden
    by the options given; a bad value is a CliError naming its options."""
    from ..layers.config import CPSConfig, SOSConfig

    if args.method == "sos":
        given = dict(num_experts=args.experts, rank=args.rank, alpha=args.alpha,
                     scale_mode=args.scale_mode, gate=args.gate, dropout=args.dropout)
        given = {k: v for k, v in given.items() if v is not None}
        if args.preset == "default":
            given = dict(CLI_SOS_DEFAULTS, **given)
            given.setdefault("alpha", 2.0 * given["rank"])
    else:
        if args.preset != "default":
            raise CliError(f"--preset {args.preset}: presets are SOS-LoRA recipes; it needs "
                           "--method sos")
        rank = 16 if args.rank is None else args.rank
        given = dict(num_clusters=args.clusters, rank=rank,
                     alpha=2.0 * rank if args.alpha is None else args.alpha,
                     dropout=0.0 if args.dropout is None else args.dropout,
                     repartition_every=args.repartition_every)
    try:
        if args.method == "sos":
            return SOSConfig.preset(args.preset, **given).to_dict()
        CPSConfig(**given)
        return given
    except ValueError as e:
        named = [option for key, option in LAYER_OPTIONS.items()
                 if key in given and re.search(rf"\b{key}\b", str(e))]
        fallback = f"--preset {args.preset}" if args.method == "sos" else "--method cps"
        raise CliError(f"{'/'.join(named) or fallback}: {e}") from None


# ---- output targets --------------------------------------------------------------------------
# (option, attribute, a directory?) of every output a command writes.
OUTPUTS = (("--out", "out", True), ("--json", "json", False), ("--plot", "plot", False))
# Attributes naming what a command reads: an output may not overwrite them.
INPUTS = ("model_dir", "base", "into", "model", "adapter", "adapters", "text", "data", "tuned")


def _check_target(option: str, path: Path, directory: bool) -> None:
    if path.exists():
        if directory and not path.is_dir():
            raise CliError(f"{option} {path}: exists and is not a directory")
        if not directory and path.is_dir():
            raise CliError(f"{option} {path}: is a directory; give a file name")
        if not os.access(path, os.W_OK):
            raise CliError(f"{option} {path}: not writable")
    # The nearest existing folder is where the output (and any missing parents) get created;
    # an existing file is overwritten in its own folder.
    ancestor = next(p for p in ((path,) if directory else ()) + tuple(path.parents)
                    if p.exists())
    if not ancestor.is_dir():
        raise CliError(f"{option} {path}: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise CliError(f"{option} {path}: cannot write in {ancestor}")


def check_outputs(args: argparse.Namespace) -> None:
    """Every output of the command can be written, none is given twice, none is an input."""
    seen: dict[Path, str] = {}
    inputs = set()
    for attribute in INPUTS:
        value = getattr(args, attribute, None)
        for item in (value if isinstance(value, list) else [value]):
            if item:
                inputs.add(Path(str(item).partition("=")[2] or item).resolve())
                inputs.add(Path(str(item)).resolve())
    for option, attribute, directory in OUTPUTS:
        value = getattr(args, attribute, None)
        if value is None:
            continue
        path = Path(value).absolute()
        _check_target(option, path, directory)
        resolved = path.resolve()
        if resolved in inputs:
            raise CliError(f"{option} {value}: is one of the command's inputs; give another path")
        if resolved in seen:
            raise CliError(f"{option} {value}: the same path as {seen[resolved]}")
        seen[resolved] = option


def write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# ---- adapter names ---------------------------------------------------------------------------
def name_adapters(specs: list[str]) -> list[tuple[str, str]]:
    """(name, path) of each `path` or `name=path`. Unnamed adapters are called by the shortest
    trailing part of their path that tells them apart (a/adapter and b/adapter: 'a/adapter'
    and 'b/adapter'; c/math: 'math')."""
    given: list[tuple[str | None, str]] = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if sep and name and path and "/" not in name and not Path(spec).exists():
            given.append((name, path))
        else:
            given.append((None, spec))
    parts = {i: Path(p).resolve().relative_to(Path(p).resolve().anchor).parts
             for i, (n, p) in enumerate(given) if n is None}
    named = []
    for i, (name, path) in enumerate(given):
        if name is None:
            mine = parts[i]
            others = [q for j, q in parts.items() if j != i]
            k = next((k for k in range(1, len(mine) + 1)
                      if all(q[-k:] != mine[-k:] for q in others)), len(mine))
            name = "/".join(mine[-k:]) or path
        named.append((name, path))
    names = [n for n, _ in named]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise CliError(f"adapter name(s) {twice} given twice (the same adapter twice?); name "
                       "them with NAME=PATH")
    return named


def model_directory(path: str) -> Path:
    """A Hugging Face model directory (one with a config.json)."""
    p = Path(path)
    if not (p / "config.json").is_file():
        raise CliError(f"{path}: not a model directory (no config.json)")
    return p


def quiet_transformers() -> None:
    """Our own progress bars and one-line errors only."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
