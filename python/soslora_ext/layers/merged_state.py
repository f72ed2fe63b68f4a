"""A merged layer's state dict: its weight comes with the update it holds (the factors and
scale merge() added), so that loading it gives a merged layer again, and unmerge() subtracts
exactly that update."""
from __future__ import annotations

import torch

from . import merge_guard, quantized
from .bases import base_weight, weight_matrix
from .sharing import fingerprint

Tensor = torch.Tensor

# Keys under base_layer. that a merged layer's state_dict adds: the update its weight holds.
MERGED_KEYS = ("merged_A", "merged_B", "merged_scale")


class MergedState:
    """The state-dict side of AdapterLinear (base.py): its _merged_A/_B/_scale buffers."""

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.merged:
            for key in MERGED_KEYS:
                t = getattr(self, "_" + key)
                destination[f"{prefix}base_layer.{key}"] = t if keep_vars else t.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        keys = [f"{prefix}base_layer.{key}" for key in MERGED_KEYS]
        update = [state_dict.pop(k) for k in keys if k in state_dict]  # not the base's keys
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if update and len(update) != len(keys):
            error_msgs.append(f"{prefix}base_layer: a merged state needs all of "
                              f"{list(MERGED_KEYS)}")
        elif update and self.quantized:
            error_msgs.append(f"{prefix}base_layer: a merged update cannot be loaded onto the "
                              f"quantized base ({quantized.describe(self.base_layer)})")
        elif update and (problem := merge_guard.update_problem(
                merge_guard.Term(*update), self.out_features, self.in_features,
                base_weight(self.base_layer).dtype)):
            error_msgs.append(f"{prefix}base_layer: {problem}")
        elif (weight_key := f"{prefix}base_layer.{self._weight_attr()}") in state_dict:
            # The loaded base weight decides: merged (it holds `update`) or not.
            device = self.lora_A.device
            merged = [t.detach().clone().to(device) for t in update] or [None] * len(keys)
            self._set_merged(*merged)
            # The base weight is loaded after this (it is a child's): fingerprint_loaded reads
            # it then, as the [out, in] view merge() records.
            self._merged_fingerprint = None
            self._fingerprint_on_load = bool(update) and isinstance(state_dict[weight_key],
                                                                    Tensor)
        elif update:
            error_msgs.append(f"{prefix}base_layer: merged update without "
                              f"base_layer.{self._weight_attr()}")


def fingerprint_loaded(layer, incompatible_keys) -> None:
    """A load_state_dict post hook (run once the children, the base weight among them, are
    loaded): the fingerprint of a merged layer's loaded weight, that unmerge() checks."""
    if layer.__dict__.pop("_fingerprint_on_load", False):
        layer._merged_fingerprint = fingerprint(weight_matrix(layer.base_layer))
