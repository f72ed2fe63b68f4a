"""The quality benchmark's two tasks, built from this machine's own files (no downloads).

``stdlib-modules`` (sequence classification): which module of Python's standard library does
a short snippet of source come from? The classes (STDLIB_CLASSES) are chosen in groups that
share a vocabulary (networking clients, archives, option parsers, number types,
introspection, concurrency, ...), so that the identifiers of a snippet rarely give the answer
away. Each class's source (one module, or every .py file of a package outside its tests) is
cut, file by file, into windows of `snippet_lines` consecutive non-blank lines (at most
`max_chars` characters). Consecutive windows form regions of REGION_WINDOWS; the regions are
dealt to train / validation / test in a fixed interleaved pattern proportional to the
quotas, so neighbouring lines seldom land in two splits and every split samples the whole
module. Each split's quota is then drawn from its pool with a fixed seed. The splits do not
depend on the training seed.

``man-pages`` (causal LM adaptation): the small GPT-2 of examples/naive_summation (pretrained
there on Python, C headers and license texts, built by that example's own pretrain_base) is
adapted to roff manual pages, a domain it never saw. Man pages are split by file into
training and held-out text (soslora_ext.apps.data.domain_text); the held-out chunks are split
in half into validation and test.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import random
import sysconfig
from pathlib import Path

import torch

from soslora_ext.apps.data import domain_text
from soslora_ext.apps.main_job import data_digest

ROOT = Path(__file__).resolve().parents[1]

STDLIB_CLASSES = (
    "ftplib", "smtplib", "imaplib", "nntplib", "http", "urllib",  # network protocols
    "tarfile", "zipfile", "shutil",                                # files and archives
    "argparse", "optparse", "configparser",                        # options and configuration
    "_pydecimal", "fractions", "statistics",                       # numbers
    "inspect", "typing", "dataclasses",                            # introspection
    "asyncio", "multiprocessing", "threading",                     # concurrency
    "email", "mailbox", "unittest",                                # mail, testing
)
REGION_WINDOWS = 4
SPLITS = ("train", "val", "test")


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _class_files(name: str) -> list[Path]:
    root = stdlib_dir()
    package = root / name
    if package.is_dir():
        # A package's own tests would add text that is about testing, not about the package.
        return sorted(p for p in package.rglob("*.py")
                      if not {"test", "tests"} & set(p.relative_to(package).parts))
    module = root / f"{name}.py"
    if not module.is_file():
        raise FileNotFoundError(f"stdlib-modules: {name!r} is neither a package nor a module "
                                f"in {root}")
    return [module]


def _windows(path: Path, snippet_lines: int, max_chars: int) -> list[str]:
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = [line.rstrip() for line in text.splitlines() if line.strip()]
    return ["\n".join(lines[i:i + snippet_lines])[:max_chars]
            for i in range(0, len(lines) - snippet_lines + 1, snippet_lines)]


def split_pattern(quotas: dict[str, int]) -> list[str]:
    """One cycle of split names, each split `quotas[name]` times, spread evenly (the k-th of
    n at (k + 0.5) / n of the cycle), e.g. {"a": 2, "b": 1} -> ["a", "b", "a"]."""
    slots = sorted(((k + 0.5) / n, i, name) for i, (name, n) in enumerate(quotas.items())
                   for k in range(n))
    return [name for *_, name in slots]


def build_stdlib_modules(train_per_class: int = 16, val_per_class: int = 8,
                         test_per_class: int = 16, snippet_lines: int = 4,
                         max_chars: int = 200, classes: tuple[str, ...] = STDLIB_CLASSES
                         ) -> tuple[dict[str, list[tuple[str, int]]], list[str]]:
    """({"train", "val", "test"} -> list of (snippet, label index), class names); see the
    module docstring. RuntimeError names a class without enough distinct windows."""
    quotas = dict(train=train_per_class, val=val_per_class, test=test_per_class)
    pattern = split_pattern(quotas)
    rows: dict[str, list[tuple[str, int]]] = {s: [] for s in SPLITS}
    for label, name in enumerate(classes):
        pools: dict[str, list[str]] = {s: [] for s in SPLITS}
        seen = set()
        region = 0
        for path in _class_files(name):
            windows = _windows(path, snippet_lines, max_chars)
            for start in range(0, len(windows), REGION_WINDOWS):
                split = pattern[region % len(pattern)]
                region += 1
                for w in windows[start:start + REGION_WINDOWS]:
                    if len(w) >= 40 and w not in seen:  # a duplicate could cross splits
                        seen.add(w)
                        pools[split].append(w)
        for split in SPLITS:
            if len(pools[split]) < quotas[split]:
                raise RuntimeError(f"stdlib-modules: {name} has {len(pools[split])} snippets "
                                   f"for the {split} split, {quotas[split]} needed")
            random.Random(f"stdlib-modules:{name}:{split}").shuffle(pools[split])
            rows[split] += [(w, label) for w in pools[split][:quotas[split]]]
    for split in SPLITS:
        random.Random(f"stdlib-modules:{split}").shuffle(rows[split])
    return rows, list(classes)


def digests(rows: dict[str, list[tuple[str, int]]]) -> dict[str, str]:
    """sha256 of each split's (snippet, label) rows, in order."""
    return {split: data_digest(r) for split, r in rows.items()}


# ---- causal LM ---------------------------------------------------------------------------------
def naive_summation():
    """examples/naive_summation/run.py as a module (it is a script, not a package)."""
    path = ROOT / "examples" / "naive_summation" / "run.py"
    spec = importlib.util.spec_from_file_location("naive_summation_run", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pretrained_gpt2(cache: Path, train_chars: int, test_chars: int, pretrain_steps: int,
                    seq: int, batch: int, seed: int = 0) -> Path:
    """The directory of examples/naive_summation's pretrained GPT-2 and tokenizer for these
    settings (its --train-chars, --test-chars, --pretrain-steps), pretrained once by the
    example's own pretrain_base and kept under `cache`, keyed by the settings, the torch
    version and the thread count. Deterministic on one kind of CPU."""
    example = naive_summation()
    settings = dict(domains=example.DOMAINS, train_chars=train_chars, test_chars=test_chars,
                    seq=seq, batch=batch, pretrain_steps=pretrain_steps, seed=seed,
                    torch=torch.__version__, threads=torch.get_num_threads())
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    base_dir = Path(cache) / f"gpt2-{key}"
    done = base_dir / "settings.json"
    if done.is_file():
        return base_dir
    # test_chars decides which files are held out, hence the training text.
    texts = {d: domain_text(kind, train_chars, test_chars, seed)[0]
             for d, kind in example.DOMAINS.items()}
    torch.manual_seed(seed)
    example.pretrain_base(base_dir, texts, pretrain_steps, seq=seq, batch=batch, seed=seed)
    done.write_text(json.dumps(settings, indent=2) + "\n")  # last: a crash leaves no marker
    return base_dir


def build_man_pages(tokenizer, train_chars: int, heldout_chars: int, seq: int, seed: int = 0
                    ) -> dict[str, torch.Tensor]:
    """{"train", "val", "test"} -> int64 [n, seq] token chunks of man pages: training text
    and held-out text split by file; the held-out chunks' first half is validation, the rest
    test."""
    example = naive_summation()
    train, heldout = domain_text("man_page", train_chars, heldout_chars, seed)
    held = example.chunks(tokenizer, heldout, seq)
    half = held.shape[0] // 2
    return dict(train=example.chunks(tokenizer, train, seq), val=held[:half], test=held[half:])


def tensor_digests(chunks: dict[str, torch.Tensor]) -> dict[str, str]:
    """sha256 of each split's token ids."""
    return {split: hashlib.sha256(t.to(torch.int64).numpy().tobytes()).hexdigest()
            for split, t in chunks.items()}
