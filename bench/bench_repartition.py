"""CPS-LoRA's repartition rule, examined: discard what the new blocks cannot hold (the rule
today), or carry it over into the frozen base, on the main job's task.

Today a proposal is adopted when its blocks capture at least 1.25x the gradient signal the
current ones do (the gain) and the gain is larger than the share of dW a re-fit would discard
(the loss). "carry" keeps the learned function instead: the part of dW that the new blocks
cannot hold is added to the frozen base weight, so nothing is discarded, and only the gain
decides. Three CPS-LoRA runs with the main job's settings (all-MiniLM-L6-v2, filekinds, 4
clusters of rank 16, repartitions after steps 10, 50, 90 of 120): static, "discard", "carry".
Each records the test accuracy, the mean loss of the last 20 steps and every proposal.

    python bench/bench_repartition.py [--json results.json]
    python bench/bench_repartition.py --tiny     # seconds: checks the script, not numbers

Prints a markdown table last.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

from soslora_ext.apps import finetune, main_job
from soslora_ext.layers.cps import ADOPTION_MARGIN, CPSLinear
from soslora_ext.layers.model import apply_cps_lora, cps_layers

RULES = ("static", "discard", "carry")


class CarryOver:
    """While active, a CPSLinear's repartition adopts every proposal whose gain passes the
    margin, and adds what the re-fit leaves out of dW to the frozen base weight."""

    def __init__(self):
        self.original = CPSLinear.repartition

    def __enter__(self):
        original = self.original

        @torch.no_grad()
        def repartition(layer, signal="auto", force=False):
            saved = {k: v.clone() for k, v in layer.state_dict().items()
                     if k.split(".")[0] in ("lora_A", "lora_B", "row_index", "col_index",
                                            "row_offsets", "col_offsets")}
            offsets = layer._offsets
            before = layer.delta_weight().double()
            change = original(layer, signal, force=True)
            info = layer.last_repartition
            if info["captured_after"] > info["captured_before"] * ADOPTION_MARGIN:
                after = layer.delta_weight().double()
                layer.base_layer.weight += (before - after).to(layer.base_layer.weight.dtype)
                return change
            layer.load_state_dict(saved, strict=False)  # the proposal is declined
            layer._offsets = offsets
            layer.last_repartition = dict(info, adopted=False, delta_change=0.0)
            return 0.0

        CPSLinear.repartition = repartition
        return self

    def __exit__(self, *exc):
        CPSLinear.repartition = self.original


def run(rule, data, test, labels, steps, seed, model_dir, tiny):
    if tiny:
        from transformers import BertConfig, BertForSequenceClassification
        torch.manual_seed(seed)
        model = BertForSequenceClassification(BertConfig(
            vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=48, num_labels=4))
    else:
        model = main_job.load_classifier(model_dir, seed)
    schedule = (dict(repartition_every=0) if rule == "static" else
                dict(repartition_every=max(2, steps // 3), statistics_steps=max(1, steps // 12)))
    rank = 2 if tiny else 16
    apply_cps_lora(model, main_job.TARGETS, modules_to_save=main_job.MODULES_TO_SAVE,
                   num_clusters=4, rank=rank, alpha=2.0 * rank, **schedule)
    if rule == "carry":
        with CarryOver():
            fit = finetune.train(model, finetune.sample_batches(data, 16), steps, lr=5e-4,
                                 seed=seed, desc=rule, progress=False, log_every=0)
    else:
        fit = finetune.train(model, finetune.sample_batches(data, 16), steps, lr=5e-4,
                             seed=seed, desc=rule, progress=False, log_every=0)
    accuracy = finetune.accuracy(finetune.predict_logits(model, test), labels)
    proposals = [v for record in fit.repartition_log for v in record["layers"].values()
                 if "captured_after" in v]
    tail = fit.losses[-20:]
    return dict(rule=rule, accuracy=accuracy, final_loss=sum(tail) / len(tail),
                seconds=fit.seconds, proposals=len(proposals),
                adopted=sum(v["adopted"] for v in proposals),
                median_captured_before=median(v["captured_before"] for v in proposals),
                median_captured_after=median(v["captured_after"] for v in proposals),
                median_update_discarded=median(v["update_discarded"] for v in proposals),
                repartitions=fit.repartition_log, layers=len(list(cps_layers(model))))


def median(values):
    values = list(values)
    return statistics.median(values) if values else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="a tiny random BERT, seconds")
    parser.add_argument("--json", help="write the numbers here")
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    from soslora_ext.apps.data import build_filekinds

    model_dir = main_job.minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    steps = 12 if args.tiny else args.steps
    per_class = (32, 8) if args.tiny else (256, 64)
    train_rows, test_rows = build_filekinds(*per_class, seed=args.seed)
    data = finetune.encode(tokenizer, [t for t, _ in train_rows], 64)
    data["labels"] = torch.tensor([l for _, l in train_rows])
    if args.tiny:  # the tiny model's vocabulary
        data["input_ids"] = data["input_ids"] % 120
    test = finetune.encode(tokenizer, [t for t, _ in test_rows], 64)
    if args.tiny:
        test["input_ids"] = test["input_ids"] % 120
    labels = torch.tensor([l for _, l in test_rows])
    results = dict(machine=f"{main_job.cpu_name()}, {torch.get_num_threads()} threads",
                   steps=steps, seed=args.seed,
                   runs=[run(rule, data, test, labels, steps, args.seed, model_dir, args.tiny)
                         for rule in RULES])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    print(f"Machine: {results['machine']}; {steps} steps, seed {args.seed}\n")
    print("| rule | accuracy | loss, last 20 steps | adopted / proposals | captured before -> "
          "after (median) | update discarded (median) |")
    print("|---|---|---|---|---|---|")
    for r in results["runs"]:
        shares = ("-" if r["proposals"] == 0 else
                  f"{r['median_captured_before']:.3f} -> {r['median_captured_after']:.3f}")
        discarded = "-" if r["proposals"] == 0 else f"{r['median_update_discarded']:.3f}"
        print(f"| {r['rule']} | {r['accuracy']:.4f} | {r['final_loss']:.4f} | "
              f"{r['adopted']} / {r['proposals']} | {shares} | {discarded} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
