"""Which base model an adapter was trained on, and whether a model directory can take it.

An adapter's delta only means something on the architecture it was trained on. Shapes alone
do not tell: a Llama and a Mistral of the same size have the same module names and shapes, and
`AutoModelForCausalLM` turns a BERT classifier directory into a BertLMHeadModel with an
untrained head. So merges and evaluations check what the files record:

    our format   base_model_class (the class the adapter was saved from)
    PEFT         task_type; auto_mapping.base_model_class (written when task_type is None);
                 else the architectures of base_model_name_or_path when it is a local directory
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from .native import CONFIG_NAME, FORMAT, AdapterError


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _causal_lm_classes() -> dict[str, set[str]]:
    """model_type -> the transformers causal-LM class names for it."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return {k: {v} if isinstance(v, str) else set(v)
            for k, v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items()}


def causal_lm_architectures(model_dir: str | os.PathLike) -> list[str]:
    """The architectures (class names) of a causal-LM model directory; AdapterError for a
    classifier, an encoder or anything else AutoModelForCausalLM would give a new LM head."""
    config = _read_json(Path(model_dir) / "config.json")
    if config is None:
        raise AdapterError(f"{model_dir}: not a model directory (no readable config.json)")
    classes = _causal_lm_classes()
    known = set().union(*classes.values())
    architectures = config.get("architectures") or []
    if not isinstance(architectures, list):
        architectures = []
    if not architectures:  # an old config: the model type decides
        architectures = sorted(classes.get(config.get("model_type"), ()))
        if not architectures:
            raise AdapterError(f"{model_dir}: model type {config.get('model_type')!r} is not a "
                               "causal language model")
    other = [a for a in architectures if a not in known]
    if other:
        raise AdapterError(f"{model_dir}: a {', '.join(map(str, other))}, not a causal language "
                           "model; adapters are summed into causal LMs (e.g. a "
                           "...ForCausalLM directory)")
    return architectures


def recorded_base(directory: str | os.PathLike) -> tuple[str | None, str | None]:
    """(model class, PEFT task type) that an adapter directory records for its base model,
    None for what it does not record (an unreadable config is left to the loader to report)."""
    config = _read_json(Path(directory) / CONFIG_NAME)
    if config is None:
        return None, None
    if config.get("format") == FORMAT:
        meta = config.get("metadata") if isinstance(config.get("metadata"), dict) else {}
        return config.get("base_model_class") or meta.get("base_model_class"), None
    mapping = config.get("auto_mapping") if isinstance(config.get("auto_mapping"), dict) else {}
    cls = mapping.get("base_model_class")
    base = config.get("base_model_name_or_path")
    if cls is None and isinstance(base, str) and base:
        base_config = _read_json(Path(base) / "config.json")  # only a local directory tells
        architectures = (base_config or {}).get("architectures") or []
        if isinstance(architectures, list) and len(architectures) == 1:
            cls = architectures[0]
    task = config.get("task_type")
    return (cls if isinstance(cls, str) else None), (task if isinstance(task, str) else None)


def check_bases(directories: Sequence[str | os.PathLike],
                architectures: Sequence[str] | None = None) -> None:
    """Refuse adapters recorded for different base models, or (given the `architectures` of
    a causal-LM model directory) for another architecture than that model's."""
    seen: dict[str, str] = {}  # class -> the first adapter that records it
    for directory in directories:
        cls, task = recorded_base(directory)
        if task is not None and task != "CAUSAL_LM" and architectures is not None:
            raise AdapterError(f"{directory}: a PEFT adapter for a {task} model, not for a "
                               f"causal language model ({', '.join(architectures)})")
        if cls is None:
            continue
        if architectures is not None and cls not in architectures:
            raise AdapterError(f"{directory}: trained on a {cls}, but the model is a "
                               f"{', '.join(architectures)}; an adapter is only merged into "
                               "the architecture it was trained on")
        seen.setdefault(cls, str(directory))
        if len(seen) > 1:
            (first_cls, first_dir), (cls, directory) = seen.items()
            raise AdapterError(f"{directory}: trained on a {cls}, but {first_dir} on a "
                               f"{first_cls}: adapters of different base models do not combine")
