"""The documentation works as written: README.md, docs/*.md, csrc/README.md, bench/README.md.

Links. Every relative link outside code, ``[text](path)``, ``[text](path#anchor)``,
``[text](#anchor)`` and images alike, must name an existing file or folder, relative to the
page. An ``#anchor`` must be a heading of the target page, as GitHub spells anchors (lower
case, punctuation dropped, spaces made hyphens, ``-1``, ``-2``... for repeated headings).
Links with a scheme (``https:``, ``mailto:``) are not followed.

Fences. Every fenced block names its language, and each language has one rule:

- ``python``: run. The blocks of one page run in order, in one fresh process of this
  interpreter (the venv's python), sharing one namespace, in a temporary working directory,
  with one CPU thread. A failure names the page and the line (tracebacks point at the page).
- ``bash``, ``sh``, ``console``: every command must be runnable as shown. In ``console``
  blocks only the lines starting with ``$ `` are commands; the rest is output. Comments,
  ``VAR=value`` prefixes and redirections (``> file``, ``2>&1``) are ignored, lines ending in
  a backslash are joined, and ``&&``, ``||``, ``;`` and ``|`` separate commands. A command is
  one of:

  * ``python -m soslora_ext ARGS`` (``python``, ``python3``, ``.venv/bin/python`` or ``$PY``)
    or ``soslora ARGS``: ARGS must parse with ``soslora_ext.cli.build_parser()`` (parsed
    only, never run; ``--help`` is fine);
  * ``make [-f FILE] [VAR=value] [TARGET...]``: ``make -n`` with the same arguments succeeds
    in the repository root (the targets exist; nothing is run);
  * ``python SCRIPT ...``, ``bash SCRIPT``, ``sh SCRIPT`` or ``SCRIPT ...`` given as a path:
    the script exists in the repository;
  * ``python -m pytest PATH...``: each path (the part before ``::``) exists;
    ``python -m pip install ...``: as pip below; ``python -m MODULE``: MODULE is importable;
    ``python -c CODE``: CODE compiles;
  * ``pip install ...``: every requirement is either a path in the repository (``.``) or
    pinned as ``name==version`` with a pin that the Makefile holds (so the documented set-up
    and the tested one agree);
  * any other program (``torchrun``, ``accelerate``, ``deepspeed``, ``ruff``...): installed in
    the venv's ``bin``, and every ``.py`` file it is given exists in the repository;
  * ``cd DIR`` (DIR exists) and ``export VAR=value``.

  Anything else fails: output and commands that are not meant to run as shown belong in a
  ``text`` fence.
- ``json``: parses.
- ``text``: not checked.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import importlib.util
import io
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
PAGES = [p.relative_to(ROOT).as_posix() for p in
         [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "csrc" / "README.md",
          ROOT / "bench" / "README.md"] if p.is_file()]
SHELL = ("bash", "sh", "console")
CHECKED = ("python", "json", "text", *SHELL)
# Each page's python blocks run in a process of their own: two at a time on two cores.
PYTHON_TIMEOUT_S = 300


# ---- reading a page ----------------------------------------------------------------------------
@dataclass
class Block:
    language: str
    line: int  # the fence's line, 1-based
    lines: list[str]

    @property
    def source(self) -> str:
        return "".join(line + "\n" for line in self.lines)


@dataclass
class Page:
    path: str
    blocks: list[Block]
    prose: list[tuple[int, str]]  # (line number, text) of the lines outside fences

    @functools.cached_property
    def anchors(self) -> set[str]:
        anchors, seen = set(), {}
        for _, text in self.prose:
            heading = re.match(r"\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$", text)
            if heading:
                slug = github_anchor(heading.group(1))
                n = seen.get(slug, 0)
                seen[slug] = n + 1
                anchors.add(slug if n == 0 else f"{slug}-{n}")
        return anchors


FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([^\s`]*)")


@functools.lru_cache(maxsize=None)
def read_page(path: str) -> Page:
    blocks, prose, current, indent, fence = [], [], None, 0, ""
    for number, text in enumerate((ROOT / path).read_text().splitlines(), start=1):
        opener = FENCE.match(text)
        if current is None:
            if opener:
                indent, fence = len(opener.group(1)), opener.group(2)
                current = Block(opener.group(3).lower(), number, [])
            else:
                prose.append((number, text))
        elif (opener and opener.group(2)[0] == fence[0] and len(opener.group(2)) >= len(fence)
              and not opener.group(3) and text.strip() == opener.group(2)):
            blocks.append(current)
            current = None
        else:
            strip = not indent or text[:indent].isspace()  # a block indented in a list
            current.lines.append(text[indent:] if strip else text.lstrip())
    if current is not None:
        current.language = f"unclosed {current.language}"
        blocks.append(current)
    return Page(path, blocks, prose)


def github_anchor(heading: str) -> str:
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link counts as its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def where(page: str, line: int) -> str:
    return f"{page}:{line}"


# ---- links -------------------------------------------------------------------------------------
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE_SPAN = re.compile(r"(`+)(?:[^`\n]|\n(?!\s*\n))+?\1")


def prose_text(page: Page) -> str:
    """The page outside its fences, code spans blanked (line numbers kept)."""
    lines = dict(page.prose)
    text = "\n".join(lines.get(n, "") for n in range(1, max(lines, default=0) + 1))
    return CODE_SPAN.sub(lambda m: "code" + "\n" * m.group(0).count("\n"), text)


def links(page: Page) -> list[tuple[int, str, str]]:
    """(line, the link as written, its target) of every link outside code."""
    text = prose_text(page)
    return [(text.count("\n", 0, m.start()) + 1, m.group(0), m.group(1))
            for m in LINK.finditer(text)]


def link_problems(page: Page) -> list[str]:
    problems = []
    for number, written, target in links(page):
        if re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*:", target):
            continue  # https:, mailto: ...
        path, _, anchor = target.partition("#")
        file = ((ROOT / page.path).parent / path).resolve() if path else ROOT / page.path
        shown = f"{where(page.path, number)}: link {written!r}"
        if not file.is_relative_to(ROOT):
            problems.append(f"{shown}: points outside the repository")
        elif not file.exists():
            problems.append(f"{shown}: {file.relative_to(ROOT)} does not exist")
        elif anchor and (file.suffix != ".md" or not file.is_file()):
            problems.append(f"{shown}: #{anchor} points into {path}, not a markdown page")
        elif anchor and anchor not in read_page(file.relative_to(ROOT).as_posix()).anchors:
            problems.append(f"{shown}: {file.relative_to(ROOT)} has no heading with the "
                            f"anchor #{anchor}")
    return problems


@pytest.mark.parametrize("page", PAGES)
def test_every_relative_link_resolves(page):
    problems = link_problems(read_page(page))
    if problems:
        pytest.fail("broken links:\n" + "\n".join(problems), pytrace=False)


def test_readme_links_every_documentation_page():
    linked = {os.path.normpath(target.partition("#")[0])
              for _, _, target in links(read_page("README.md"))}
    missing = [p for p in PAGES[1:] if p not in linked]
    assert not missing, f"README.md links none of: {missing}"


def test_readme_is_a_front_door():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move detail into docs/"
    # CI (.ci/run) runs `make test`: the README documents that command.
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    commands = [line for b in read_page("README.md").blocks if b.language in SHELL
                for line in b.lines]
    assert any(re.match(r"\s*make test\b", line) for line in commands), \
        "README.md's set-up block must give `make test` as the test command"


# ---- files named in code spans ----------------------------------------------------------------
NAMED_FILE = re.compile(r"((?:\.ci|bench|csrc|docs|examples|python|tests)/[\w./-]*)(?:::(\w+))?")


@functools.lru_cache(maxsize=None)
def ignored_output(path: str) -> bool:
    """A path under a folder that .gitignore anchors at the root (bench/results/, runs/...):
    written by a run, never committed."""
    folders = [line.strip().strip("/") for line in (ROOT / ".gitignore").read_text().splitlines()
               if line.strip().startswith("/")]
    path = path.strip("/")
    return any(path == f or path.startswith(f + "/") for f in folders)


def defines(path: str, name: str) -> bool:
    return re.search(rf"^\s*(?:async\s+)?(?:def|class)\s+{name}\b",
                     (ROOT / path).read_text(), re.M) is not None


def code_spans(page: Page) -> list[tuple[int, str]]:
    """(line, text) of every code span outside fences (a span may continue on the next line)."""
    lines = dict(page.prose)
    text = "\n".join(lines.get(n, "") for n in range(1, max(lines, default=0) + 1))
    return [(text.count("\n", 0, m.start()) + 1,
             " ".join(m.group(0).strip("`").split()))
            for m in CODE_SPAN.finditer(text)]


@pytest.mark.parametrize("page", PAGES)
def test_files_and_tests_named_in_code_exist(page):
    """`tests/x.py::test_name`, `bench/x.py`, `python/soslora_ext/...` in code spans: the file
    exists (or is an ignored output such as bench/results/) and the test or function is
    defined in it; a bare `::name` refers to the last file named before it on its line."""
    problems, last, last_line = [], None, 0
    for number, span in code_spans(read_page(page)):
        if number != last_line:
            last, last_line = None, number
        named = NAMED_FILE.fullmatch(span)
        if named:
            last, name = named.group(1), named.group(2)
            if not (ROOT / last).exists() and not ignored_output(last):
                problems.append(f"{where(page, number)}: `{span}`: {last} does not exist")
                last = None
                continue
        elif span.startswith("::") and last:
            name = span[2:]
        else:
            continue
        if name and (ROOT / last).is_file() and not defines(last, name):
            problems.append(f"{where(page, number)}: `{span}`: {last} defines no {name}")
    if problems:
        pytest.fail("files named in the text that are not there:\n" + "\n".join(problems),
                    pytrace=False)


@pytest.mark.parametrize("page, config", [("docs/methods.md", "SOSConfig"),
                                          ("docs/cps-lora.md", "CPSConfig")])
def test_every_config_field_is_documented(page, config):
    """The field tables of the layer pages list every field of SOSConfig and CPSConfig."""
    import dataclasses

    import soslora_ext as sl

    rows = {m.group(1) for _, line in read_page(page).prose
            for m in [re.match(r"\|\s*`(\w+)`\s*\|", line)] if m}
    missing = [f.name for f in dataclasses.fields(getattr(sl, config)) if f.name not in rows]
    assert not missing, f"{page}: the {config} table lacks the fields {missing}"


# ---- fences ------------------------------------------------------------------------------------
@pytest.mark.parametrize("page", PAGES)
def test_every_fence_names_a_checked_language(page):
    problems = [f"{where(page, b.line)}: a ```{b.language} block: use one of {list(CHECKED)} "
                "(text for what is not meant to run)"
                for b in read_page(page).blocks if b.language not in CHECKED]
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


@pytest.mark.parametrize("page", PAGES)
def test_json_blocks_parse(page):
    problems = []
    for block in read_page(page).blocks:
        if block.language == "json":
            try:
                json.loads(block.source)
            except ValueError as e:
                problems.append(f"{where(page, block.line + e.lineno)}: json block: {e}")
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


# ---- shell blocks ------------------------------------------------------------------------------
SEPARATORS = {"&&", "||", ";", "|", "&"}
REDIRECTION = re.compile(r"(?<!\S)\d*(?:>>?|<|&>)&?\s*(?:\S+)")
ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")


def shell_commands(block: Block) -> list[tuple[int, str]]:
    """(line, command line) of a shell block: continuations joined, console output dropped."""
    commands, pending, start = [], "", 0
    for offset, text in enumerate(block.lines, start=1):
        if not pending:
            start = block.line + offset
            if block.language == "console":
                if not text.startswith("$ "):
                    continue
                text = text[2:]
        if text.rstrip().endswith("\\"):
            pending += text.rstrip()[:-1] + " "
            continue
        line = (pending + text).strip()
        pending = ""
        if line and not line.startswith("#"):
            commands.append((start, line))
    if pending:
        commands.append((start, pending.strip()))
    return commands


def split_commands(line: str) -> list[list[str]]:
    lexer = shlex.shlex(REDIRECTION.sub(" ", line), posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    commands, current = [], []
    for token in lexer:
        if token in SEPARATORS:
            commands.append(current)
            current = []
        else:
            current.append(token)
    commands.append(current)
    commands = [c for c in commands if c]
    for command in commands:
        while command and ASSIGNMENT.match(command[0]):
            del command[0]  # VAR=value prefixes set the environment of the command
    return [c for c in commands if c]


@functools.lru_cache(maxsize=None)
def makefile_pins() -> frozenset[str]:
    return frozenset(re.findall(r"[A-Za-z0-9_.\-]+==[A-Za-z0-9_.+\-]+",
                                (ROOT / "Makefile").read_text()))


@functools.lru_cache(maxsize=None)
def make_dry_run(args: tuple[str, ...]) -> str | None:
    env = {k: v for k, v in os.environ.items()  # not the flags of a make that runs this test
           if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    result = subprocess.run(["make", "-n", *args], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=60)
    if result.returncode != 0:
        return f"`make -n {' '.join(args)}` fails: {result.stderr.strip()[-300:]}"
    return None


def parse_cli(args: list[str]) -> str | None:
    from soslora_ext.cli import build_parser

    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            build_parser().parse_args(args)
    except SystemExit as e:
        if e.code not in (0, None):
            return f"the command line does not parse: {out.getvalue().strip()[-300:]}"
    except Exception as e:  # CliError: the parser's one-line errors
        return f"the command line does not parse: {e}"
    return None


def repository_path(text: str, what: str) -> str | None:
    path = text.split("::")[0]
    if not (ROOT / path).exists():
        return f"{what} {path} does not exist in the repository"
    return None


def check_pip(args: list[str]) -> str | None:
    if not args or args[0] != "install":
        return f"only `pip install` is documented, not `pip {' '.join(args)}`"
    for arg in args[1:]:
        if arg.startswith("-"):
            continue
        if arg == "." or arg.startswith(("./", "../")):
            if not (ROOT / arg).exists():
                return f"pip install {arg}: no such path"
        elif arg not in makefile_pins():
            return (f"pip install {arg}: name a version the Makefile pins "
                    f"({sorted(makefile_pins())})")
    return None


def is_python(program: str) -> bool:
    return (Path(program).name in ("python", "python3")
            or program in ("$PY", "${PY}", "$(PY)"))


def check_python(args: list[str]) -> str | None:
    if not args:
        return "an interactive python is not a documented command"
    if args[0] == "-c":
        try:
            compile(args[1] if len(args) > 1 else "", "<python -c>", "exec")
        except SyntaxError as e:
            return f"python -c: the code does not compile: {e}"
        return None
    if args[0] == "-m":
        module, rest = (args[1] if len(args) > 1 else ""), args[2:]
        if module == "soslora_ext":
            return parse_cli(rest)
        if module == "pytest":
            for arg in rest:
                if not arg.startswith("-"):
                    problem = repository_path(arg, "test path")
                    if problem:
                        return problem
            return None
        if module == "pip":
            return check_pip(rest)
        if importlib.util.find_spec(module) is None:
            return f"python -m {module}: no such module"
        return None
    if args[0].startswith("-"):
        return f"python {args[0]}: an option this test does not know"
    return repository_path(args[0], "script")


def check_command(argv: list[str]) -> str | None:
    program, args = argv[0], argv[1:]
    if program == "export":
        return None
    if program == "cd":
        return None if args and (ROOT / args[0]).is_dir() else f"cd {args}: no such folder"
    if program == "make":
        return make_dry_run(tuple(args))
    if program == "soslora":
        return parse_cli(args)
    if is_python(program):
        return check_python(args)
    if program in ("pip", "pip3"):
        return check_pip(args)
    if program in ("bash", "sh"):
        return repository_path(args[0], "script") if args else "an interactive shell"
    if "/" in program:
        return repository_path(program.removeprefix("./"), "script")
    if (VENV_BIN / program).exists():
        for arg in args:
            if arg.endswith(".py"):
                problem = repository_path(arg, "script")
                if problem:
                    return problem
        return None
    return (f"`{program}` is neither a documented command nor a tool in the venv; use a "
            "```text fence for what is not meant to run")


@pytest.mark.parametrize("page", PAGES)
def test_shell_blocks_are_runnable_as_shown(page):
    problems = []
    for block in read_page(page).blocks:
        if block.language not in SHELL:
            continue
        for line, text in shell_commands(block):
            try:
                commands = split_commands(text)
            except ValueError as e:
                problems.append(f"{where(page, line)}: `{text}`: {e}")
                continue
            for argv in commands:
                problem = check_command(argv)
                if problem:
                    problems.append(f"{where(page, line)}: `{shlex.join(argv)}`: {problem}")
    if problems:
        pytest.fail("shell commands that would not run:\n" + "\n".join(problems), pytrace=False)


# ---- python blocks -----------------------------------------------------------------------------
RUNNER = r"""
import json, linecache, sys, traceback
page, blocks = json.load(open(sys.argv[1]))
text = open(sys.argv[2]).read()
linecache.cache[page] = (len(text), None, text.splitlines(True), page)  # tracebacks show the page
namespace = {"__name__": "__main__"}
for line, source in blocks:
    try:
        exec(compile("\n" * line + source, page, "exec"), namespace)
    except BaseException:
        print(f"{page}:{line + 1}: the python block starting here failed:", file=sys.stderr)
        traceback.print_exc()
        sys.exit(1)
"""


def python_blocks(page: str) -> list[Block]:
    return [b for b in read_page(page).blocks if b.language == "python"]


PYTHON_PAGES = [p for p in PAGES if python_blocks(p)]


def run_python_blocks(page: str, workdir: Path) -> subprocess.CompletedProcess:
    spec = workdir / "blocks.json"
    spec.write_text(json.dumps([page, [[b.line, b.source] for b in python_blocks(page)]]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    try:
        return subprocess.run([sys.executable, "-c", RUNNER, str(spec), str(ROOT / page)],
                              cwd=workdir, env=env, capture_output=True, text=True,
                              timeout=PYTHON_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        return subprocess.CompletedProcess(e.cmd, -1, "", f"{page}: timed out after "
                                           f"{PYTHON_TIMEOUT_S} s")


@pytest.fixture(scope="module")
def python_runs(tmp_path_factory):
    """Every page's python blocks, started at once, two processes at a time."""
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=2)
    runs = {page: pool.submit(run_python_blocks, page,
                              tmp_path_factory.mktemp(re.sub(r"\W", "_", page)))
            for page in PYTHON_PAGES}
    yield runs
    pool.shutdown(cancel_futures=True)


@pytest.mark.parametrize("page", PYTHON_PAGES)
def test_python_blocks_run(page, python_runs):
    result = python_runs[page].result()
    if result.returncode != 0:
        pytest.fail(f"{page}: its python blocks fail (they run in order in one process):\n"
                    f"{result.stderr[-4000:]}", pytrace=False)
