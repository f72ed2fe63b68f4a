"""The `compose` commands: report, merge, concat and eval of adapters summed naively."""
from __future__ import annotations

import json
from pathlib import Path

from .args import CliError, model_directory, name_adapters, quiet_transformers, write_text


def _adapters(specs, model_dir: str | None = None, combined: bool = True, weights=None):
    """Load `path` / `name=path` adapters under distinct names. Adapters that are combined
    must record the same base model, and that of `model_dir` (a causal LM) when given."""
    from .. import compose
    from ..formats.base_models import causal_lm_architectures, check_bases

    named = name_adapters(specs)
    if weights is not None and len(weights) != len(named):
        raise CliError(f"--weights: {len(weights)} given for {len(named)} adapters; give one "
                       "per adapter")
    if model_dir is not None:
        check_bases([p for _, p in named], causal_lm_architectures(model_directory(model_dir)))
    elif combined:
        check_bases([p for _, p in named])
    return [compose.load(p, name=name) for name, p in named]


def _check_weights(adapters, weights) -> None:
    """--weights so large that a weighted factor overflows float32 are refused naming them
    (the adapters' own factors are finite: every reader checks them)."""
    from .. import compose

    bad = compose.concat(adapters, weights).overflowing() if weights is not None else []
    if bad:
        raise CliError(f"--weights {' '.join(f'{w:g}' for w in weights)}: too large: the "
                       f"adapters' factors times these weights overflow float32 (in layer "
                       f"{bad[0]!r}); give smaller weights")


def cmd_compose_report(args) -> int:
    from .. import compose

    if args.plot:
        try:
            compose.require_matplotlib()
        except ImportError as e:
            raise CliError(f"--plot: {e}") from None
    rep = compose.report(_adapters(args.adapters, combined=False))
    print(compose.format_report(rep))
    if args.json:
        write_text(args.json, json.dumps(rep, indent=2) + "\n")
    if args.plot:
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        compose.plot_report(rep, args.plot)
    return 0


def cmd_compose_merge(args) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .. import compose

    adapters = _adapters(args.adapters, model_dir=args.into, weights=args.weights)
    _check_weights(adapters, args.weights)
    quiet_transformers()
    model = AutoModelForCausalLM.from_pretrained(model_directory(args.into))
    compose.sum_into(model, adapters, args.weights)
    model.save_pretrained(args.out)
    AutoTokenizer.from_pretrained(args.into).save_pretrained(args.out)
    print(f"base + sum of {len(adapters)} adapters written to {args.out}")
    return 0


def cmd_compose_concat(args) -> int:
    from .. import compose

    adapters = _adapters(args.adapters, weights=args.weights)
    for adapter in adapters:  # the sum keeps no aliases: what PEFT cannot hold is refused here
        adapter.check_writable(f"compose concat: adapter {adapter.name!r}")
    _check_weights(adapters, args.weights)
    total = compose.concat(adapters, args.weights)
    total.save_peft(args.out)
    print(f"exact sum (one PEFT LoRA, ranks {sorted({total.rank(n) for n in total})}) written "
          f"to {args.out}")
    return 0


def cmd_compose_eval(args) -> int:
    from .. import compose

    adapters = _adapters(args.adapters, model_dir=args.model)
    quiet_transformers()
    result = compose.evaluate(args.model, adapters, compose.read_texts(args.text),
                              max_length=args.max_length, max_chunks=args.max_chunks)
    for name, ppl in result["perplexity"].items():
        print(f"{name:<40} perplexity {ppl:10.3f}")
    if args.json:
        write_text(args.json, json.dumps(result, indent=2) + "\n")
    return 0
