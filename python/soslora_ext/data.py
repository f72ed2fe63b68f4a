"""A small real-text classification task built from files already on a Debian machine.

``filekinds``: which kind of file does a snippet come from?

    python     Python's standard library sources         (<stdlib>/**/*.py)
    c_header   C headers                                 (/usr/include/**/*.h)
    license    license texts                             (/usr/share/common-licenses/*,
                                                          /usr/share/doc/*/copyright)
    man_page   manual pages, roff source                 (/usr/share/man/man1/*.gz)

Deterministic: files are listed in sorted order and shuffled with a seeded generator; each
file is assigned to train or test by a hash of its path, so no file feeds both splits; a
snippet is `snippet_lines` consecutive non-blank lines from a fixed place in the file (at most
`max_chars` characters). Up to two snippets are taken per file, until each class has its quota.
"""
from __future__ import annotations

import gzip
import hashlib
import random
import sysconfig
from pathlib import Path
from typing import Iterator

LABELS = ["python", "c_header", "license", "man_page"]


def _sources() -> dict[str, list[Path]]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    doc = Path("/usr/share/doc")
    return {
        # The standard library only: what pip installed varies from machine to machine.
        "python": sorted(p for p in stdlib.rglob("*.py") if "site-packages" not in p.parts),
        "c_header": sorted(Path("/usr/include").rglob("*.h")),
        "license": sorted(p for p in Path("/usr/share/common-licenses").glob("*") if p.is_file())
        + sorted(doc.glob("*/copyright")),
        "man_page": sorted(Path("/usr/share/man/man1").glob("*.gz")),
    }


def _read(path: Path, limit: int = 1 << 16) -> str:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            return f.read(limit).decode("utf-8", errors="replace")
    except (OSError, EOFError):
        return ""


def _snippets(text: str, snippet_lines: int, max_chars: int) -> Iterator[str]:
    lines = [line.rstrip() for line in text.splitlines() if line.strip()]
    # Two fixed places: the start of the file and its middle.
    for start in sorted({0, max(0, len(lines) // 2 - snippet_lines // 2)}):
        chunk = lines[start:start + snippet_lines]
        if len(chunk) == snippet_lines:
            yield "\n".join(chunk)[:max_chars]


def _in_test_split(path: Path, test_fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha256(str(path).encode()).digest()[:8], "little")
    return h / 2**64 < test_fraction


def build_filekinds(train_per_class: int = 256, test_per_class: int = 64, seed: int = 0,
                    snippet_lines: int = 6, max_chars: int = 320
                    ) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(train, test) lists of (snippet, label index into LABELS); see the module docstring."""
    train, test = [], []
    test_fraction = test_per_class / (train_per_class + test_per_class)
    for label, (kind, files) in enumerate(_sources().items()):
        files = list(files)
        random.Random(f"{seed}:{kind}").shuffle(files)
        quota = {True: test_per_class, False: train_per_class}
        got = {True: [], False: []}
        for path in files:
            split = _in_test_split(path, test_fraction)
            for snippet in _snippets(_read(path), snippet_lines, max_chars):
                if len(got[split]) < quota[split]:
                    got[split].append((snippet, label))
            if all(len(got[s]) >= quota[s] for s in got):
                break
        for split, rows in got.items():
            if len(rows) < quota[split]:
                raise RuntimeError(f"filekinds: only {len(rows)} {kind} snippets for the "
                                   f"{'test' if split else 'train'} split, {quota[split]} needed")
        train += got[False]
        test += got[True]
    random.Random(seed).shuffle(train)
    return train, test


def domain_text(kind: str, train_chars: int, test_chars: int, seed: int = 0) -> tuple[str, str]:
    """(train, held-out) text of one filekinds domain: whole files (first 64 KiB of each,
    exact duplicates skipped), shuffled with `seed`, split by file as build_filekinds does,
    each side cut at its character budget."""
    sources = _sources()
    if kind not in sources:
        raise ValueError(f"kind must be one of {list(sources)}, got {kind!r}")
    files = list(sources[kind])
    random.Random(f"{seed}:{kind}").shuffle(files)
    budget = {False: train_chars, True: test_chars}
    parts: dict[bool, list[str]] = {False: [], True: []}
    size = {False: 0, True: 0}
    seen = set()
    for path in files:
        split = _in_test_split(path, test_chars / (train_chars + test_chars))
        if size[split] >= budget[split]:
            if all(size[s] >= budget[s] for s in size):
                break
            continue
        text = _read(path).strip()
        digest = hashlib.sha256(text.encode()).digest()
        if not text or digest in seen:
            continue
        seen.add(digest)
        parts[split].append(text)
        size[split] += len(text) + 2
    for split in (False, True):
        if size[split] < budget[split]:
            raise RuntimeError(f"domain_text: only {size[split]} characters of {kind} text for "
                               f"the {'test' if split else 'train'} split")
    return ("\n\n".join(parts[False])[:train_chars], "\n\n".join(parts[True])[:test_chars])
