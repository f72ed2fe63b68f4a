"""A module registered under several names: compose reads the names the save recorded and sums
the update into each distinct module once (the same module under two names is written once)."""
import torch
import torch.nn as nn

import soslora_ext as sl
from soslora_ext import compose


class TwoNames(nn.Module):
    def __init__(self, tied: bool):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(12, 10, dtype=torch.float64)
        self.b = self.a if tied else nn.Linear(12, 10, dtype=torch.float64)
        if not tied:
            self.b.load_state_dict(self.a.state_dict())

    def forward(self, x):
        return self.a(x) + self.b(x)


def trained_adapter(tmp_path):
    model = sl.apply_sos_lora(TwoNames(tied=True), ["a", "b"], num_experts=2, rank=4,
                              dtype=torch.float64)
    with torch.no_grad():
        model.a.lora_B.normal_()
    delta = model.a.delta_weight().detach().clone()
    sl.save_adapter(model, tmp_path / "adapter")
    return compose.load(tmp_path / "adapter"), delta


def test_the_update_goes_into_each_module_once(tmp_path):
    adapter, delta = trained_adapter(tmp_path)
    assert adapter.aliases == {"a": ["b"]}
    for tied in (True, False):
        model = TwoNames(tied)
        before = model.a.weight.detach().clone()
        compose.sum_into(model, [adapter])
        for module in (model.a, model.b):  # once each, never twice into the tied one
            torch.testing.assert_close(module.weight, before + delta, rtol=1e-12, atol=1e-12)


def test_concat_keeps_the_names(tmp_path):
    adapter, delta = trained_adapter(tmp_path)
    both = compose.concat([adapter, adapter], weights=[0.25, 0.75])
    assert both.aliases == {"a": ["b"]}
    model = TwoNames(tied=False)
    before = model.b.weight.detach().clone()
    compose.sum_into(model, [both])
    torch.testing.assert_close(model.b.weight, before + delta, rtol=1e-12, atol=1e-12)
