"""The README's demo: the end-to-end example trains, merges and checks itself, in seconds."""
import io

import pytest
import torch

from soslora_ext.apps import demo


def test_demo_loss_falls_and_merge_is_exact():
    out = io.StringIO()
    result = demo.run(steps=600, out=out)
    assert result["eval_loss_end"] < 0.1 * result["eval_loss_start"]
    assert result["merged_minus_unmerged_max_abs"] < 1e-4
    assert result["plain_model_after_merge"] and result["ok"]
    assert out.getvalue().strip().endswith("OK")


def test_demo_trains_on_one_thread_and_restores_the_thread_count(monkeypatch):
    # Its 64-wide products split over threads made each step wait for a busy core: minutes
    # instead of about a second on a loaded 2-core machine.
    seen = []
    train_step = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        seen.append(torch.get_num_threads())
        return train_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        demo.run(steps=3, out=io.StringIO())
        assert seen == [1, 1, 1]
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError), demo.one_thread():
            raise RuntimeError("restored even on an error")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
