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

Also what ``train --data`` reads (read_training_data) and how labelled rows are split into
training and held-out rows (split_rows).
"""
from __future__ import annotations

import gzip
import hashlib
import json
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


def split_rows(rows: list[tuple[str, int]], seed: int = 0, test_fraction: float = 0.2
               ) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(train, held out) of labelled rows, stratified: each label's rows are shuffled with
    `seed` and the last `test_fraction` of them (rounded, at least one of a label with two or
    more rows) is held out, so the held-out set has the labels in the data's proportions
    whatever order the file lists them in."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    by_label: dict[int, list[tuple[str, int]]] = {}
    for row in rows:
        by_label.setdefault(row[1], []).append(row)
    train, test = [], []
    for label in sorted(by_label):
        group = list(by_label[label])
        random.Random(f"{seed}:{label}").shuffle(group)
        n_test = max(1, round(len(group) * test_fraction)) if len(group) >= 2 else 0
        train += group[:len(group) - n_test]
        test += group[len(group) - n_test:]
    random.Random(seed).shuffle(train)
    return train, test


def read_training_data(spec: str, task: str, seed: int):
    """What `train --data SPEC` reads: ("classification", (train_rows, held_out_rows,
    label_names)) for 'filekinds' (its own split) or a .jsonl of {"text", "label"} (split by
    split_rows), else ("text", text) of a file or of a folder's .txt files. ValueError names
    SPEC."""
    if spec == "filekinds":
        train, test = build_filekinds(seed=seed)  # its own split, by file
        return "classification", (train, test, LABELS)
    path = Path(spec)
    if not path.exists():
        raise ValueError(f"{spec}: no such file or directory")
    if path.suffix == ".jsonl" and task in ("auto", "classification"):
        rows = []
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{spec}: cannot read it as UTF-8 text ({e})") from None
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                text, label = obj["text"], obj["label"]
            except (json.JSONDecodeError, KeyError, TypeError, IndexError):
                text = label = None
            # A null or nested value would otherwise become the text "None" or "[...]".
            if not (isinstance(text, str) and type(label) in (str, int)):
                raise ValueError(f"{spec}:{n}: expected a JSON object with a string 'text' and "
                                 "a string or integer 'label'")
            rows.append((text, str(label)))
        names = sorted({label for _, label in rows})
        if len(names) < 2:
            raise ValueError(f"{spec}: needs at least two distinct labels")
        train, test = split_rows([(t, names.index(l)) for t, l in rows], seed=seed)
        if not test:
            raise ValueError(f"{spec}: too few rows to hold any out (a label needs two)")
        return "classification", (train, test, names)
    if task == "classification":
        raise ValueError(f"{spec}: classification data must be a .jsonl file or "
                         "'filekinds'")
    files = sorted(path.rglob("*.txt")) if path.is_dir() else [path]
    try:
        text = "\n\n".join(f.read_text(errors="replace") for f in files)
    except OSError as e:
        raise ValueError(f"{spec}: cannot read it ({e})") from None
    if not text.strip():
        raise ValueError(f"{spec}: no text found")
    return "text", text


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
