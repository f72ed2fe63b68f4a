"""Commands print only their own output: no notice from a package they do not use."""
import os
import subprocess
import sys

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

import soslora_ext as sl

NOTICE = "Setting accelerator to CPU"


def run_python(*args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("DS_ACCELERATOR", None)  # deepspeed prints the notice only when it has to guess
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600,
                          cwd=cwd, env=env)


def test_merge_command_prints_no_deepspeed_notice(tmp_path):
    pytest.importorskip("deepspeed")
    if torch.cuda.is_available():
        pytest.skip("deepspeed finds the GPU and prints no notice")
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=30, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=48, max_position_embeddings=16))
    model.save_pretrained(tmp_path / "base", safe_serialization=True)
    sl.apply_sos_lora(model, ["query", "value"], num_experts=2, rank=4)
    sl.save_adapter(model, tmp_path / "adapter",
                    metadata=dict(base_model_class="BertForSequenceClassification"))

    # Without soslora_ext, transformers' save_pretrained does import deepspeed, which prints
    # the notice: the command below would show it too were it not dropped.
    control = run_python("-c", "import sys; from transformers import AutoModel; "
                         "AutoModel.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[2])",
                         str(tmp_path / "base"), str(tmp_path / "copy"), cwd=tmp_path)
    assert control.returncode == 0, control.stderr[-2000:]
    assert NOTICE in control.stdout + control.stderr

    result = run_python("-m", "soslora_ext", "merge", "adapter", "--base", "base",
                        "--out", "merged", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "merged" / "config.json").is_file()
    assert NOTICE not in result.stderr
    assert NOTICE not in result.stdout
