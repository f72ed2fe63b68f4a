"""soslora_ext: structured low-rank adapters (SOS-LoRA, CPS-LoRA) as a PyTorch C++/CUDA
extension.

    import soslora_ext as sl
    layer = sl.SOSLinear.from_config(nn.Linear(4096, 4096), sl.SOSConfig(rank=32))
    model = sl.apply_sos_lora(model, target_modules=["q_proj", "v_proj"], rank=32)
"""
import importlib

from . import _legacy_paths, compose, ops
from ._C import built_with_cuda
from .formats.native import AdapterError, export_peft, import_peft, load_adapter, save_adapter
from .layers.base import AdapterLinear
from .layers.config import PRESETS, CPSConfig, SOSConfig
from .layers.cps import CPSLinear
from .layers.model import (
    adapter_layers,
    apply_cps_lora,
    apply_sos_lora,
    check_adapters_called,
    check_finite,
    cps_layers,
    merge_and_unload,
    modules_to_save,
    ortho_penalty,
    sos_layers,
    trainable_parameters,
    uncalled_adapters,
)
from .layers.schedules import GateSchedule, OrthoSchedule, RepartitionSchedule
from .layers.sos import SOSLinear
from .ops import reference
from .version import __version__

_legacy_paths.install()


def __getattr__(name):
    # The Trainer callbacks import transformers: loaded only when asked for.
    if name in ("SOSLoRACallback", "CPSLoRACallback"):
        from .integrations import transformers
        return getattr(transformers, name)
    if name in _legacy_paths.MOVED:  # soslora_ext.cps and friends, as before
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'soslora_ext' has no attribute {name!r}")


__all__ = [
    "AdapterLinear", "CPSConfig", "CPSLinear", "RepartitionSchedule", "adapter_layers",
    "apply_cps_lora", "cps_layers", "CPSLoRACallback", "PRESETS", "SOSConfig", "SOSLinear",
    "apply_sos_lora",
    "check_adapters_called", "check_finite", "merge_and_unload", "modules_to_save",
    "ortho_penalty", "sos_layers", "trainable_parameters", "uncalled_adapters", "OrthoSchedule",
    "GateSchedule", "SOSLoRACallback", "save_adapter", "load_adapter", "export_peft",
    "import_peft", "AdapterError", "compose", "ops", "reference", "built_with_cuda",
    "__version__",
]
