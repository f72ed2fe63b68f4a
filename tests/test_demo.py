"""The README's main job: the end-to-end example trains, merges and checks itself."""
import io

from soslora_ext import demo


def test_demo_loss_falls_and_merge_is_exact():
    out = io.StringIO()
    result = demo.run(steps=600, out=out)
    assert result["eval_loss_end"] < 0.1 * result["eval_loss_start"]
    assert result["merged_minus_unmerged_max_abs"] < 1e-4
    assert result["plain_model_after_merge"] and result["ok"]
    assert out.getvalue().strip().endswith("OK")
