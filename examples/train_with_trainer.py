"""SOS-LoRA with transformers.Trainer: SOSLoRACallback runs the lambda and gate schedules.

Builds a small BERT classifier from a config (nothing is downloaded); the classifier head
trains whole (modules_to_save). Runs as is, or under accelerate:

    python examples/train_with_trainer.py --out /tmp/sos-trainer
    accelerate launch --multi_gpu --num_processes 2 examples/train_with_trainer.py   # 2 processes

(--multi_gpu starts the processes with torchrun; use_cpu=True below then makes accelerate
use gloo on the CPU. `--cpu` alone starts a single process.)
"""
import argparse
from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

import soslora_ext as sl


class ParityTask(torch.utils.data.Dataset):
    """Label = whether the first token id is even: learnable by attention from [CLS]."""

    def __init__(self, n: int):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(5, 100, (n, 16), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return dict(input_ids=self.ids[i], labels=self.ids[i, 0] % 2)


def main(steps: int, out: Path) -> None:
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=32, num_labels=2))
    sl.apply_sos_lora(model, ["query", "key", "value", "dense"], modules_to_save=["classifier"],
                      num_experts=4, rank=16, alpha=32.0)
    args = TrainingArguments(output_dir=str(out / "trainer"), max_steps=steps,
                             per_device_train_batch_size=16, gradient_accumulation_steps=2,
                             learning_rate=1e-3, logging_steps=10, report_to=[],
                             save_strategy="no", use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=ParityTask(2048),
                      callbacks=[sl.SOSLoRACallback(lambda_max=0.006)])
    trainer.train()  # the logs carry ortho_penalty, ortho_lambda
    if trainer.is_world_process_zero():
        sl.save_adapter(trainer.model, out / "adapter")
        print(f"trained in {args.world_size} process(es); adapter saved to {out / 'adapter'}")
    # Every rank waits for the save, then leaves the process group: a rank that exits with the
    # group still open can be aborted by gloo ("terminate called without an active exception").
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", type=Path, default=Path("runs/example-trainer"))
    args = parser.parse_args()
    main(args.steps, args.out)
