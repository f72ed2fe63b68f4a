"""The examples run as documented (few steps)."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script", ["train_plain_loop.py", "train_with_trainer.py"])
def test_example_runs(tmp_path, script):
    result = subprocess.run([sys.executable, str(ROOT / "examples" / script), "--steps", "8",
                             "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
