"""Naive LoRA summation, small and real: does interference predict the cost of summing?

The protocol of "naive LoRA summation" (GPT-2, LoRA rank 4, alpha 64, three domains), with what
this machine has and no downloads:

1. A byte-level BPE tokenizer (vocabulary 4096) is trained on a mixed corpus of three real
   domains found on the machine (soslora_ext.apps.data.domain_text): Python's standard library,
   C headers, and English license/copyright texts.
2. A small GPT-2 (4 layers, width 128) built from a transformers config is pretrained briefly
   on the mix.
3. With the real peft package, one LoRA (rank 4, alpha 64, on c_attn, c_proj and c_fc) is
   trained per domain, plus one on the merged data of every pair and of the triple.
4. For every pair and the triple, the script compares the naive sum of the single-domain
   adapters (summed into the weights by soslora_ext.compose.sum_into) with the merged-data
   adapter. Both are scored by perplexity on the held-out text of the domains involved (the mean
   over domains), and the change is reported as delta% = (ppl_sum - ppl_merged) / ppl_merged.
   Beside it stands the RMS cosine of the summed adapters' deltas (for the triple, the mean
   over its pairs), computed in factored form.
5. It writes results.json, a table in RESULTS.md, and scatter.png (delta% against RMS cosine),
   along with the Pearson correlation between the two.

Deterministic (fixed seeds, single process). On a 2-core CPU it takes about six minutes.

    python examples/naive_summation/run.py                    # writes runs/naive-summation
    python examples/naive_summation/run.py --out DIR          # writes DIR
    python examples/naive_summation/run.py --update-results   # replaces the committed results

The committed results.json, RESULTS.md and scatter.png next to this script are replaced only
with --update-results.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from pathlib import Path

import torch

from soslora_ext import compose
from soslora_ext.apps import finetune
from soslora_ext.apps.data import domain_text

HERE = Path(__file__).resolve().parent
DOMAINS = {"python": "python", "c_header": "c_header", "english": "license"}
LORA = dict(r=4, lora_alpha=64, target_modules=["c_attn", "c_proj", "c_fc"], lora_dropout=0.0,
            fan_in_fan_out=True)


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")


def chunks(tokenizer, text: str, length: int) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
    n = ids.numel() // length
    return ids[: n * length].view(n, length)


def lm_batches(data: torch.Tensor, batch_size: int):
    return finetune.sample_batches(dict(input_ids=data, labels=data), batch_size)


def pretrain_base(base_dir: Path, train_texts: dict[str, str], pretrain_steps: int,
                  seq: int = 128, batch: int = 16, seed: int = 0):
    """Train the tokenizer (vocabulary 4096) on `train_texts` (domain -> text), pretrain the
    small GPT-2 on their mix and save both to `base_dir`. Returns (tokenizer, {domain: int64
    [n, seq] training chunks}). Also used by bench/quality.py."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = train_tokenizer(list(train_texts.values()), vocab_size=4096)
    train = {d: chunks(tokenizer, t, seq) for d, t in train_texts.items()}
    torch.manual_seed(seed)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=seq, n_embd=128,
                                      n_layer=4, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
                                      attn_pdrop=0.0))
    mixed = torch.cat(list(train.values()))
    fit = finetune.train(base, lm_batches(mixed, batch), pretrain_steps, lr=1e-3, seed=seed,
                         desc="pretrain", log_every=max(pretrain_steps // 5, 1))
    base.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    print(f"pretrained {pretrain_steps} steps: loss {fit.losses[0]:.3f} -> {fit.losses[-1]:.3f}")
    return tokenizer, train


def run(out: Path, train_chars: int, test_chars: int, pretrain_steps: int, lora_steps: int,
        seq: int = 128, batch: int = 16, seed: int = 0) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2LMHeadModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    texts = {d: domain_text(kind, train_chars, test_chars, seed) for d, kind in DOMAINS.items()}
    test = {d: t for d, (_, t) in texts.items()}
    base_dir = out / "work" / "base"
    tokenizer, train = pretrain_base(base_dir, {d: t for d, (t, _) in texts.items()},
                                     pretrain_steps, seq=seq, batch=batch, seed=seed)

    def train_lora(domains: tuple[str, ...]) -> compose.Adapter:
        name = "+".join(domains)
        model = get_peft_model(GPT2LMHeadModel.from_pretrained(base_dir), LoraConfig(**LORA))
        data = torch.cat([train[d] for d in domains])
        torch.manual_seed(seed)
        finetune.train(model, lm_batches(data, batch), lora_steps, lr=1e-3, seed=seed,
                       desc=f"LoRA {name}", log_every=0)
        path = out / "work" / "adapters" / name
        model.save_pretrained(str(path))
        return compose.load(path, name=name)

    singles = {d: train_lora((d,)) for d in DOMAINS}
    groups = [g for k in (2, 3) for g in itertools.combinations(DOMAINS, k)]
    merged = {g: train_lora(g) for g in groups}

    def ppl(adapters, domain) -> float:
        model = GPT2LMHeadModel.from_pretrained(base_dir)
        compose.sum_into(model, adapters)
        return compose.perplexity(model, tokenizer, test[domain], seq, progress=False)

    rows = []
    for g in groups:
        parts = [singles[d] for d in g]
        rms = [compose.rms_cosine(a, b) for a, b in itertools.combinations(parts, 2)]
        ppl_sum = {d: ppl(parts, d) for d in g}
        ppl_merged = {d: ppl([merged[g]], d) for d in g}
        mean_sum = sum(ppl_sum.values()) / len(g)
        mean_merged = sum(ppl_merged.values()) / len(g)
        rows.append(dict(domains="+".join(g), rms_cosine=sum(rms) / len(rms),
                         ppl_naive_sum=ppl_sum, ppl_merged_data=ppl_merged,
                         delta_percent=100 * (mean_sum - mean_merged) / mean_merged))
        print(f"{rows[-1]['domains']:<26} RMS cosine {rows[-1]['rms_cosine']:.4f}  "
              f"naive sum vs merged data {rows[-1]['delta_percent']:+.2f}%")
    base_ppl = {d: ppl([], d) for d in DOMAINS}
    single_ppl = {d: ppl([singles[d]], d) for d in DOMAINS}

    xs = [r["rms_cosine"] for r in rows]
    ys = [r["delta_percent"] for r in rows]
    result = dict(domains=DOMAINS, lora=LORA, pretrain_steps=pretrain_steps,
                  lora_steps=lora_steps, seq=seq, batch=batch, seed=seed,
                  train_chars=train_chars, test_chars=test_chars, base_perplexity=base_ppl,
                  single_adapter_perplexity=single_ppl, rows=rows,
                  pearson_r=pearson(xs, ys), pearson_r_pairs_only=pearson(xs[:3], ys[:3]),
                  seconds=time.perf_counter() - t0, torch=torch.__version__)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    scatter(rows, out / "scatter.png")
    (out / "RESULTS.md").write_text(results_markdown(result))
    print(f"pearson r (RMS cosine vs delta%) = {result['pearson_r']:.3f}; "
          f"{result['seconds']:.0f} s; results in {out}")
    return result


def pearson(xs: list[float], ys: list[float]) -> float:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else float("nan")


def scatter(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for r in rows:
        ax.scatter(r["rms_cosine"], r["delta_percent"], color="tab:blue")
        ax.annotate(r["domains"], (r["rms_cosine"], r["delta_percent"]), fontsize=8,
                    xytext=(4, 4), textcoords="offset points")
    ax.axhline(0, color="grey", linewidth=0.5)
    ax.set_xlabel("RMS cosine of the summed adapters' deltas")
    ax.set_ylabel("perplexity change, naive sum vs merged data (%)")
    ax.set_title("Interference predicts the cost of naive summation?")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def results_markdown(r: dict) -> str:
    lines = [
        "# Naive LoRA summation: results",
        "",
        "Produced by `python examples/naive_summation/run.py` (see its docstring for the "
        f"protocol) in {r['seconds']:.0f} s on a 2-core CPU, torch {r['torch']}.",
        f"Pretraining: {r['pretrain_steps']} steps; each LoRA (rank {r['lora']['r']}, alpha "
        f"{r['lora']['lora_alpha']}, {', '.join(r['lora']['target_modules'])}): "
        f"{r['lora_steps']} steps; batch {r['batch']} x {r['seq']} tokens; seed {r['seed']}.",
        "",
        "Held-out perplexity of the base model and of each single-domain adapter on its domain:",
        "",
        "| domain | base | own adapter |",
        "|---|---|---|",
    ]
    for d in r["domains"]:
        lines.append(f"| {d} | {r['base_perplexity'][d]:.2f} | "
                     f"{r['single_adapter_perplexity'][d]:.2f} |")
    lines += ["", "| adapters summed | RMS cosine | perplexity, naive sum | perplexity, "
              "merged-data adapter | change |", "|---|---|---|---|---|"]
    for row in r["rows"]:
        fmt = lambda d: ", ".join(f"{k} {v:.2f}" for k, v in d.items())  # noqa: E731
        lines.append(f"| {row['domains']} | {row['rms_cosine']:.4f} | {fmt(row['ppl_naive_sum'])} "
                     f"| {fmt(row['ppl_merged_data'])} | {row['delta_percent']:+.2f}% |")
    lines += ["", f"Pearson correlation between RMS cosine and the change: "
              f"r = {r['pearson_r']:.3f} over the three pairs and the triple "
              f"(pairs only: {r['pearson_r_pairs_only']:.3f}). With four points this is an "
              "illustration, not evidence.", "", "![scatter](scatter.png)", ""]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--out", type=Path, default=Path("runs/naive-summation"),
                       help="output directory (default runs/naive-summation)")
    where.add_argument("--update-results", action="store_true",
                       help=f"write into {HERE}, replacing the committed results")
    parser.add_argument("--train-chars", type=int, default=400_000, help="per domain")
    parser.add_argument("--test-chars", type=int, default=40_000, help="per domain")
    parser.add_argument("--pretrain-steps", type=int, default=600)
    parser.add_argument("--lora-steps", type=int, default=200)
    args = parser.parse_args(argv)
    if args.update_results:
        args.out = HERE
    elif args.out.resolve() == HERE:
        parser.error(f"--out {args.out} holds the committed results: pass --update-results "
                     "to replace them")
    return args


if __name__ == "__main__":
    args = parse_args()
    run(args.out, args.train_chars, args.test_chars, args.pretrain_steps, args.lora_steps)
