"""The support matrix, tested (`make compat`): for each Python and torch the package claims, a
venv of its own under .compat/, the package built there (CPU kernels only: the CUDA build is
the dev venv's), and a quick subset of the tests run against it. Then the claims in
pyproject.toml must be exactly the matrix.

    python .ci/compat.py                 # every cell
    python .ci/compat.py --cell 3.11 2.13.0+cpu

The cells are what this machine kind can install: torch wheels for Python 3.11 lie on its disk
(2.14.1, a CUDA build, and 2.13.0+cpu); PyPI's other torch releases need CUDA libraries that
its package index lacks (nvidia-cudnn), so they cannot be installed here.
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
HOME = ROOT / ".compat"
# (Python, torch): the oldest and the newest release of each torch line the package claims.
MATRIX = [("3.11", "2.13.0+cpu"), ("3.11", "2.14.1")]
# What pyproject.toml must then say.
CLAIMS = {"requires-python": ">=3.11,<3.12", "torch": "torch>=2.13,<2.15"}
# A quick subset: the ops against the oracle and their fakes, the layers, both file formats,
# the import graph and every old import path.
SUBSET = ["tests/ops/test_ops.py", "tests/ops/test_adapted_linear.py", "tests/ops/test_dropout.py",
          "tests/ops/test_fakes.py", "tests/layers/test_sos.py", "tests/layers/test_config.py",
          "tests/layers/test_cps.py", "tests/formats/test_native.py",
          "tests/system/test_architecture.py"]


def makefile_pins(name: str) -> list[str]:
    """The pinned packages of one of the Makefile's dependency lists (BUILD_DEPS, ...)."""
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    match = re.search(rf"^{name} := (.*)$", text, re.M)
    return match.group(1).split()


def run(cmd: list[str], log: Path, **kwargs) -> None:
    with open(log, "a") as out:
        out.write("$ " + " ".join(map(str, cmd)) + "\n")
        out.flush()
        subprocess.run([str(c) for c in cmd], stdout=out, stderr=subprocess.STDOUT, check=True,
                       **kwargs)


def cell(python: str, torch: str) -> tuple[bool, str]:
    """Builds and tests one cell; (passed, what happened)."""
    interpreter = shutil.which(f"python{python}")
    if interpreter is None:
        return False, f"no python{python} on PATH"
    venv = HOME / f"py{python}-torch{torch}"
    py = venv / "bin" / "python"
    log = HOME / f"{venv.name}.log"
    HOME.mkdir(exist_ok=True)
    log.write_text("")
    try:
        if not (venv / ".installed").exists():
            run([interpreter, "-m", "venv", "--clear", venv], log)
            run([py, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                 f"torch=={torch}", *makefile_pins("BUILD_DEPS"), *makefile_pins("TEST_DEPS")],
                log)
            (venv / ".installed").touch()
        env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(Path.home()),
               "SOSLORA_CUDA": "0"}  # the CPU kernels: the dev venv builds the CUDA ones
        run([py, "-m", "pip", "install", "--quiet", "--no-build-isolation", "--no-deps",
             f"--config-settings=build-dir={venv / 'build'}", ROOT], log, env=env)
        run([py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *SUBSET], log, cwd=ROOT,
            env={**env, "OMP_NUM_THREADS": "2"})
    except subprocess.CalledProcessError:
        return False, f"failed: see {log.relative_to(ROOT)}"
    summary = log.read_text().strip().splitlines()[-1]
    return True, summary


def check_claims() -> list[str]:
    """What pyproject.toml claims beyond (or short of) the matrix."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wrong = []
    if project["requires-python"] != CLAIMS["requires-python"]:
        wrong.append(f"requires-python is {project['requires-python']!r}, the matrix "
                     f"{CLAIMS['requires-python']!r}")
    torch = [d for d in project["dependencies"] if d.startswith("torch")]
    if torch != [CLAIMS["torch"]]:
        wrong.append(f"the torch dependency is {torch}, the matrix {CLAIMS['torch']!r}")
    return wrong


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cell", nargs=2, action="append", metavar=("PYTHON", "TORCH"),
                        help="only this cell (repeatable); default: the whole matrix")
    args = parser.parse_args(argv)
    cells = [tuple(c) for c in args.cell] if args.cell else MATRIX
    unknown = [c for c in cells if c not in MATRIX]
    if unknown:
        parser.error(f"--cell {unknown}: not in the matrix {MATRIX}")
    results = []
    for python, torch in cells:
        start = time.monotonic()
        passed, what = cell(python, torch)
        results.append((python, torch, passed, what, time.monotonic() - start))
        print(f"Python {python}, torch {torch}: {'passed' if passed else 'FAILED'} ({what}, "
              f"{results[-1][4] / 60:.1f} min)", flush=True)
    wrong = check_claims()
    for line in wrong:
        print(f"pyproject.toml: {line}")
    return 0 if all(r[2] for r in results) and not wrong else 1


if __name__ == "__main__":
    sys.exit(main())
