"""The module paths of earlier releases (``soslora_ext.layer``, ``soslora_ext.serialization``,
...) keep importing: each is the module it became, the same object, so a name imported either
way is the same name and pickles stay loadable."""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

MOVED = {
    "adapter": "layers.base",
    "adapter_check": "formats.checks",
    "adapter_files": "formats.files",
    "base_models": "formats.base_models",
    "cli_args": "cli.args",
    "cli_compose": "cli.compose",
    "cli_quantize": "cli.quantize",
    "config": "layers.config",
    "cps": "layers.cps",
    "data": "apps.data",
    "demo": "apps.demo",
    "distributed": "layers.distributed",
    "finetune": "apps.finetune",
    "interference": "compose.interference",
    "layer": "layers.sos",
    "main_job": "apps.main_job",
    "merging": "layers.merge_guard",
    "model": "layers.model",
    "partition": "layers.partition",
    "peft_check": "formats.peft_checks",
    "peft_format": "formats.peft",
    "quantized": "layers.quantized",
    "reference": "ops.reference",
    "schedules": "layers.schedules",
    "serialization": "formats.native",
}
PACKAGE = __name__.rpartition(".")[0]


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``soslora_ext.<old>`` and answers with the module at its new path."""

    def find_spec(self, fullname, path=None, target=None):
        package, _, old = fullname.rpartition(".")
        if package == PACKAGE and old in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def __init__(self):
        self._own_specs = {}

    def create_module(self, spec):
        module = importlib.import_module(f"{PACKAGE}.{MOVED[spec.name.rpartition('.')[2]]}")
        self._own_specs[spec.name] = module.__spec__
        return module

    def exec_module(self, module):
        # Imported already, under its own name; importlib has just given it the old path's
        # spec, so give its own back (relative imports and pickling read it).
        module.__spec__ = self._own_specs.pop(module.__spec__.name)


def install() -> None:
    if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
        sys.meta_path.append(_MovedModules())


