"""Perplexity of a causal LM with adapters summed into it: the base, each adapter alone, every
pair and all of them (``compose eval`` on the command line)."""
from __future__ import annotations

import itertools
import math
import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

from ..formats.files import AdapterError
from .sums import sum_into
from .terms import Adapter

Tensor = torch.Tensor


def read_texts(path: str | os.PathLike) -> str:
    """A text file, or every .txt file below a folder (sorted), joined by blank lines."""
    path = Path(path)
    if not path.exists():
        raise AdapterError(f"{path}: no such file or directory")
    files = sorted(path.rglob("*.txt")) if path.is_dir() else [path]
    text = "\n\n".join(f.read_text(errors="replace") for f in files)
    if not text.strip():
        raise AdapterError(f"{path}: no text found")
    return text


def _check_counts(max_chunks: int | None = None, **values) -> None:
    """Chunk lengths and counts are positive ints (a negative count would silently slice);
    max_chunks may also be None (all chunks)."""
    if max_chunks is not None:
        values["max_chunks"] = max_chunks
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _chunks(tokenizer, text: str, max_length: int, max_chunks: int | None, desc: str) -> Tensor:
    """The text's tokens as [n, max_length] consecutive chunks (at most max_chunks)."""
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
    n = ids.numel() // max_length
    if n < 1:
        raise AdapterError(f"{desc}: the text has {ids.numel()} tokens, fewer than "
                           f"max_length={max_length}: give more text or a smaller max_length "
                           "(--max-length on the command line)")
    return ids[: n * max_length].view(n, max_length)[:max_chunks]


def perplexity(model: nn.Module, tokenizer, text: str, max_length: int = 128,
               batch_size: int = 8, max_chunks: int | None = None, desc: str = "eval",
               progress: bool = True) -> float:
    """exp(mean next-token negative log-likelihood) over consecutive `max_length` chunks."""
    _check_counts(max_length=max_length, batch_size=batch_size, max_chunks=max_chunks)
    return _chunks_perplexity(model, _chunks(tokenizer, text, max_length, max_chunks, desc),
                              batch_size, desc, progress)


@torch.no_grad()
def _chunks_perplexity(model: nn.Module, chunks: Tensor, batch_size: int, desc: str,
                       progress: bool) -> float:
    import sys

    from tqdm.auto import tqdm

    model.eval()
    total, count = 0.0, 0
    for i in tqdm(range(0, len(chunks), batch_size), desc=desc, disable=not progress,
                  file=sys.stderr, leave=False):
        batch = chunks[i:i + batch_size]
        logits = model(input_ids=batch).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                batch[:, 1:].reshape(-1), reduction="sum")
        total += float(nll)
        count += batch[:, 1:].numel()
    return math.exp(total / count)


def evaluate(model_dir: str | os.PathLike, adapters: Sequence[Adapter], text: str,
             max_length: int = 128, max_chunks: int | None = None, progress: bool = True
             ) -> dict:
    """Perplexity of the causal LM at `model_dir` on `text`: the base, each adapter summed into
    it alone, every pair summed, and all of them summed (when more than two). Everything is
    checked before the first model is loaded: the arguments, that `model_dir` is a causal LM
    (any other model would get an untrained LM head) and that the text is long enough."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..formats.base_models import causal_lm_architectures

    _check_counts(max_length=max_length, max_chunks=max_chunks)
    names = [a.name for a in adapters]
    if len(set(names) | {"base"}) != len(names) + 1:
        raise AdapterError(f"evaluate: adapter names must be distinct and not 'base', got {names}")
    causal_lm_architectures(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    chunks = _chunks(tokenizer, text, max_length, max_chunks, "evaluate")
    variants = [("base", [])] + [(a.name, [a]) for a in adapters]
    variants += [("+".join(x.name for x in pair), list(pair))
                 for pair in itertools.combinations(adapters, 2)]
    if len(adapters) > 2:
        variants.append(("+".join(a.name for a in adapters), list(adapters)))
    results = {}
    for name, members in variants:
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        sum_into(model, members)
        results[name] = _chunks_perplexity(model, chunks, 8, name, progress)
    return dict(model=str(model_dir), max_length=max_length, perplexity=results)
