"""The transformers.Trainer callback drives lambda and the gate temperature on schedule."""
import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainingArguments,
)

import soslora_ext as sl

from helpers import Recorder, Rows


@pytest.mark.parametrize("accumulation", [1, 2])
def test_trainer_callback_schedules_lambda_and_temperature(tmp_path, accumulation):
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=64, hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=40, max_position_embeddings=32, num_labels=2))
    sl.apply_sos_lora(model, ["query", "value"], modules_to_save=["classifier"], num_experts=2,
                      rank=4, gate=True)
    layer = model.bert.encoder.layer[0].attention.self.query
    recorder = Recorder(layer)
    steps = 20
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=steps,
                             per_device_train_batch_size=4,
                             gradient_accumulation_steps=accumulation, learning_rate=1e-3,
                             logging_steps=5, report_to=[], use_cpu=True, save_strategy="no",
                             disable_tqdm=True)
    callback = sl.SOSLoRACallback(lambda_max=0.01, delay=0.15, ramp=0.20, gate_start=2.0,
                                  gate_end=1.0, gate_anneal=0.30)
    Trainer(model=model, args=args, train_dataset=Rows(), callbacks=[callback, recorder]).train()

    assert sorted(recorder.seen) == list(range(steps))
    for step, (lam, temperature) in recorder.seen.items():
        # delay 3 steps, ramp over 4, then 0.01; each micro-batch gets lambda / accumulation.
        want = 0.0 if step < 3 else 0.01 * min((step - 3) / 4, 1.0)
        assert lam == pytest.approx(want / accumulation, abs=1e-7), step
        assert temperature == pytest.approx(2.0 - min(step / 6, 1.0), abs=1e-6), step
    logged = [log for log in recorder.logs if "ortho_penalty" in log]
    assert logged and logged[-1]["ortho_lambda"] == pytest.approx(0.01)
    assert logged[-1]["gate_temperature"] == pytest.approx(1.0)
    assert all(log["ortho_penalty"] >= 0 for log in logged)
