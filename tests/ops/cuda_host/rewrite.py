#!/usr/bin/env python3
"""Copies the CUDA sources into a build directory, rewriting only what g++ cannot compile:

  kernel<T><<<grid, block, shmem, stream>>>(args)
      -> ::soslora_emu::launch(::soslora_emu::LaunchConfig(grid, block, shmem, stream),
             "kernel<T>", __FILE__, __LINE__, [](auto... a_) { kernel<T>(a_...); }, args)
  __shared__ T name[n];
      -> static T name[n]; ::soslora_emu::shared_array(name, sizeof(name), "name");

Line numbers are kept (nothing adds or removes a newline), so emulator messages point at the
original source lines. Usage: rewrite.py SRC_CSRC_DIR OUT_DIR  (SRC is the repository's csrc/).
"""
import re
import sys
from pathlib import Path

LAUNCH = re.compile(r"([A-Za-z_]\w*(?:<[^<>;()]*>)?)\s*<<<(.*?)>>>\s*\(", re.S)
SHARED = re.compile(r"__shared__\s+([^;{}]*?)\b([A-Za-z_]\w*)\s*(\[[^\];]*\])\s*;")


def _launch(m: re.Match) -> str:
    kernel, config = m.group(1), m.group(2)
    return (f"::soslora_emu::launch(::soslora_emu::LaunchConfig({config}), \"{kernel}\", "
            f"__FILE__, __LINE__, [](auto... a_) {{ {kernel}(a_...); }}, ")


def _shared(m: re.Match) -> str:
    decl, name, dims = m.group(1), m.group(2), m.group(3)
    return (f"static {decl}{name}{dims}; "
            f"::soslora_emu::shared_array({name}, sizeof({name}), \"{name}\");")


def rewrite(text: str, name: str) -> str:
    text = LAUNCH.sub(_launch, text)
    text = SHARED.sub(_shared, text)
    for token in ("<<<", ">>>", "__shared__"):
        if token in text:
            line = text[: text.index(token)].count("\n") + 1
            raise SystemExit(f"rewrite.py: {name}:{line}: '{token}' left that the rewrite "
                             "does not handle")
    return text


def main(src: Path, out: Path) -> None:
    (out / "cuda").mkdir(parents=True, exist_ok=True)
    for path in sorted((src / "cuda").iterdir()):
        if path.suffix in (".cu", ".cuh", ".h"):
            text = path.read_text()
            if path.suffix in (".cu", ".cuh"):
                text = rewrite(text, path.name)
            target = out / "cuda" / path.name
            if not target.exists() or target.read_text() != text:  # keep mtimes for make
                target.write_text(text)
    philox = (src / "philox.h").read_text()
    if not (out / "philox.h").exists() or (out / "philox.h").read_text() != philox:
        (out / "philox.h").write_text(philox)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]))
