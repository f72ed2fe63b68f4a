"""The package's architecture: its import graph flows one way, from the ops up to the command
line, with no circles and no private name crossing modules; every import path of earlier
releases still works; each subpackage's docstring names every module in it."""
import ast
import importlib
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import soslora_ext as sl
from soslora_ext._legacy_paths import MOVED

PACKAGE = Path(sl.__file__).parent
SOURCE = Path(__file__).resolve().parents[2] / "python" / "soslora_ext"
# Floors of the house: a module imports only from its own floor or the ones below.
FLOORS = {"ops": 0, "layers": 1, "formats": 2, "compose": 3, "integrations": 3, "apps": 4,
          "cli": 5}
# Top-level modules every floor may use: the compiled library and the version.
GROUND = {"soslora_ext._C", "soslora_ext.version"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SOURCE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in SOURCE.rglob("*.py")}


def imports(name: str) -> list[tuple[str, str]]:
    """(imported module, imported name) for every import of the package inside `name`'s file,
    at module level or inside functions."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != "soslora_ext":
                continue
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                is_module = submodule in MODULES or submodule in GROUND
                found.append((submodule if is_module else source,
                              "" if is_module else alias.name))
        elif isinstance(node, ast.Import):
            found += [(a.name, "") for a in node.names if a.name.split(".")[0] == "soslora_ext"]
    return found


def graph() -> dict[str, set[str]]:
    return {name: {m for m, _ in imports(name) if m != name} for name in MODULES}


def floor(name: str) -> int | None:
    parts = name.split(".")
    return FLOORS.get(parts[1]) if len(parts) > 1 else None


def test_the_source_tree_is_the_installed_package():
    installed = {module_name(SOURCE / p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")}
    assert installed == set(MODULES)


def test_the_import_graph_has_no_circles():
    edges = graph()
    # Circles through the package root are circles too: only the root may import it.
    for name, deps in edges.items():
        assert "soslora_ext" not in deps, f"{name} imports the package root"
    state: dict[str, str] = {}

    def visit(name, path):
        state[name] = "open"
        for dep in sorted(edges.get(name, ())):
            if state.get(dep) == "open":
                cycle = path[path.index(dep):] + [dep]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, path + [dep])
        state[name] = "done"

    for name in sorted(edges):
        if name not in state:
            visit(name, [name])


def test_every_import_goes_down_the_floors():
    wrong = []
    for name, deps in graph().items():
        here = floor(name)
        if here is None:
            continue
        for dep in deps:
            there = floor(dep)
            if dep in GROUND:
                continue
            if there is None or there > here:
                wrong.append(f"{name} -> {dep}")
    assert not wrong, "imports against the floors " + str(FLOORS) + ": " + ", ".join(wrong)


def test_no_private_name_is_imported_from_another_module():
    private = [f"{name}: from {source} import {what}" for name in MODULES
               for source, what in imports(name)
               if what.startswith("_") and not what.endswith("__")]  # dunders are public
    private += [f"{name}: import of {source}" for name in MODULES for source, _ in imports(name)
                if source.rpartition(".")[2].startswith("_")
                and source not in GROUND | {"soslora_ext._legacy_paths"}]
    assert not private, private


def test_the_legacy_paths_module_is_used_by_the_package_root_only():
    users = [name for name in MODULES
             if any(source == "soslora_ext._legacy_paths" for source, _ in imports(name))]
    assert users == ["soslora_ext"]


@pytest.mark.parametrize("package", sorted(FLOORS))
def test_each_subpackage_docstring_names_every_module_in_it(package):
    doc = importlib.import_module(f"soslora_ext.{package}").__doc__
    files = sorted(p.name for p in (SOURCE / package).glob("*.py") if p.name != "__init__.py")
    missing = [f for f in files if f not in doc]
    assert not missing, f"soslora_ext/{package}/__init__.py does not describe {missing}"


@pytest.mark.parametrize("old", sorted(MOVED))
def test_an_old_module_path_is_the_module_it_became(old):
    before = importlib.import_module(f"soslora_ext.{old}")
    assert before is importlib.import_module(f"soslora_ext.{MOVED[old]}")
    assert getattr(sl, old) is before  # the attribute form, soslora_ext.cps.X
    assert before.__spec__.name == f"soslora_ext.{MOVED[old]}"  # its own spec kept


def test_old_import_statements_work_in_a_fresh_process():
    lines = [f"from soslora_ext.{old} import *" for old in sorted(MOVED)]
    lines += ["from soslora_ext.layer import SOSLinear",
              "from soslora_ext.serialization import save_adapter, CONFIG_NAME",
              "from soslora_ext.cli import main, build_parser",
              "from soslora_ext.integrations import SOSLoRACallback, CPSLoRACallback",
              "from soslora_ext.compose import Adapter, AdapterError, load, concat, report",
              "import soslora_ext.peft_format, soslora_ext.merging",
              "assert soslora_ext.merging.merge_ is soslora_ext.layers.merge_guard.merge_"]
    run = subprocess.run([sys.executable, "-W", "error::ImportWarning", "-c", "\n".join(lines)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]


def test_the_public_names_all_resolve():
    for name in sl.__all__:
        assert getattr(sl, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        sl.not_a_name


def test_a_pickled_layer_loads_back():
    layer = sl.SOSLinear.from_config(nn.Linear(6, 5), sl.SOSConfig(num_experts=2, rank=4))
    with torch.no_grad():
        layer.lora_B.normal_()
    copy = pickle.loads(pickle.dumps(layer))
    x = torch.randn(3, 6)
    assert torch.equal(copy(x), layer(x))
    assert type(copy) is sl.SOSLinear


def test_python_dash_m_and_the_soslora_script_list_each_command_once():
    script = Path(sys.executable).with_name("soslora")
    assert script.is_file(), f"the console script {script} is not installed"
    for command in ([sys.executable, "-m", "soslora_ext", "--help"], [str(script), "--help"]):
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        for name in ("demo", "main-job", "train", "merge", "export-peft", "info", "compose"):
            listed = [line for line in out.splitlines() if line.split()[:1] == [name]]
            assert len(listed) == 1, f"{command[-2:]}: {name!r} listed {len(listed)} times\n{out}"
