"""The quality benchmark's tasks: how a fresh model is built, what it trains on, how it is scored.

Both tasks give every method the same model, data and batches. ``ClassificationTask`` adapts
the top layers of all-MiniLM-L6-v2; the frozen lower layers never change, so their outputs
(in eval mode, without dropout) are computed once for every snippet and the models are cut
after them: each run starts from these cached hidden states, which gives the same logits as
the whole model (checked when the cache is built) at a fraction of the cost.
``LanguageModelTask`` adapts every block of the small GPT-2 of examples/naive_summation.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from soslora_ext.apps import finetune
from soslora_ext.apps.main_job import minilm_dir

import quality_data
from quality_methods import AdapterSpec


class _PassThrough(nn.Module):
    """Stands in for BertEmbeddings when the model is fed cached hidden states as
    inputs_embeds: returns them unchanged."""

    def forward(self, input_ids=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, past_key_values_length=0):
        return inputs_embeds


@dataclass
class ClassificationTask:
    """stdlib-modules on all-MiniLM-L6-v2: the last `adapted_layers` encoder blocks are
    adapted (every Linear in them), the pooler and the new classifier train whole.

    Metric: accuracy (higher is better)."""

    train_per_class: int
    val_per_class: int
    test_per_class: int
    snippet_lines: int
    max_chars: int
    max_length: int
    adapted_layers: int
    rank: int
    classes: tuple[str, ...] = quality_data.STDLIB_CLASSES
    # A regex over module names of the cut model (its blocks are numbered from 0); None: every
    # Linear of the adapted blocks.
    targets: str | None = None

    name = "stdlib-modules"
    metric = "accuracy"
    higher_is_better = True

    def prepare(self, cache=None) -> dict:
        """Builds the splits and the cached hidden states; returns what the report records."""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        from transformers.utils import logging

        logging.set_verbosity_error()
        self.model_dir = minilm_dir()
        rows, self.labels = quality_data.build_stdlib_modules(
            self.train_per_class, self.val_per_class, self.test_per_class, self.snippet_lines,
            self.max_chars, self.classes)
        tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        torch.manual_seed(0)
        full = AutoModelForSequenceClassification.from_pretrained(
            self.model_dir, num_labels=len(self.labels), torch_dtype=torch.float32).eval()
        self.frozen_layers = full.config.num_hidden_layers - self.adapted_layers
        if not 0 <= self.frozen_layers < full.config.num_hidden_layers:
            raise ValueError(f"adapted_layers must be in [1, {full.config.num_hidden_layers}], "
                             f"got {self.adapted_layers}")
        self.splits = {}
        for split, r in rows.items():
            enc = finetune.encode(tokenizer, [t for t, _ in r], self.max_length)
            with torch.no_grad():
                hidden = full.bert(input_ids=enc["input_ids"],
                                   attention_mask=enc["attention_mask"],
                                   output_hidden_states=True).hidden_states[self.frozen_layers]
            self.splits[split] = dict(inputs_embeds=hidden, attention_mask=enc["attention_mask"],
                                      labels=torch.tensor([label for _, label in r]))
        self._check_cut(full, tokenizer, rows["val"][:8])
        return dict(classes=self.labels, sizes={s: len(r) for s, r in rows.items()},
                    sha256=quality_data.digests(rows), frozen_layers=self.frozen_layers,
                    adapted_layers=self.adapted_layers)

    def _cut(self, model: nn.Module) -> nn.Module:
        model.bert.embeddings = _PassThrough()
        model.bert.encoder.layer = model.bert.encoder.layer[self.frozen_layers:]
        return model

    def _check_cut(self, full: nn.Module, tokenizer, rows) -> None:
        enc = finetune.encode(tokenizer, [t for t, _ in rows], self.max_length)
        with torch.no_grad():
            expected = full(**enc).logits
            cut = self._cut(full)
            hidden = self.splits["val"]["inputs_embeds"][:len(rows)]
            got = cut(inputs_embeds=hidden, attention_mask=enc["attention_mask"]).logits
        if not torch.allclose(got, expected, atol=1e-4, rtol=1e-4):
            raise RuntimeError("the cut model's logits differ from the whole model's: "
                               f"max |diff| {(got - expected).abs().max().item():.3g}")

    def spec(self) -> AdapterSpec:
        return AdapterSpec(
            targets=self.targets or (
                r"bert\.encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|"
                r"attention\.output\.dense|intermediate\.dense|output\.dense)"),
            rank=self.rank, alpha=2.0 * self.rank, modules_to_save=("classifier", "pooler.dense"))

    def pristine(self) -> nn.Module:
        """The cut model as loaded, never trained: every run starts from a copy."""
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(
            self.model_dir, num_labels=len(self.labels), torch_dtype=torch.float32)
        return self._cut(model)

    def fresh_model(self, pristine: nn.Module, seed: int) -> nn.Module:
        """A copy of `pristine` with a new classifier head drawn from `seed` (the same head
        for every method; drawn as transformers initialises it: N(0, initializer_range),
        bias 0)."""
        model = copy.deepcopy(pristine)
        torch.manual_seed(seed)
        with torch.no_grad():
            model.classifier.weight.normal_(0.0, model.config.initializer_range)
            model.classifier.bias.zero_()
        return model

    def description(self) -> str:
        return (f"all-MiniLM-L6-v2 classifies snippets of {self.snippet_lines} non-blank lines "
                f"(at most {self.max_chars} characters, {self.max_length} tokens) by the "
                f"standard-library module they come from: {len(self.labels)} classes, "
                f"{self.train_per_class} training, {self.val_per_class} validation and "
                f"{self.test_per_class} test snippets per class. The top "
                f"{self.adapted_layers} of 6 encoder blocks are adapted ("
                + ("every Linear in them: query, key, value, attention output, intermediate, "
                   "output" if self.targets is None else f"the modules matching {self.targets}")
                + "); the lower blocks are frozen and their outputs cached (without dropout). "
                f"Metric: test accuracy (chance 1/{len(self.labels)}).")

    def train_data(self) -> dict[str, torch.Tensor]:
        return self.splits["train"]

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        """{"accuracy", "loss"} (mean cross-entropy) on `split`."""
        data = self.splits[split]
        logits = finetune.predict_logits(model, data)
        return dict(accuracy=finetune.accuracy(logits, data["labels"]),
                    loss=F.cross_entropy(logits, data["labels"]).item())


@dataclass
class LanguageModelTask:
    """man-pages: the example's pretrained GPT-2 adapted to roff manual pages; the modules
    named by `targets` are adapted in every block, nothing else trains.

    Metric: perplexity (lower is better)."""

    train_chars: int
    heldout_chars: int
    rank: int
    pretrain_train_chars: int
    pretrain_test_chars: int
    pretrain_steps: int
    seq: int = 128
    # Module name suffixes (or one regex over whole names), as PEFT's target_modules.
    targets: tuple[str, ...] | str = ("c_attn", "c_proj", "c_fc")

    name = "man-pages"
    metric = "perplexity"
    higher_is_better = False

    def prepare(self, cache) -> dict:
        from transformers import PreTrainedTokenizerFast
        from transformers.utils import logging

        logging.set_verbosity_error()
        logging.disable_progress_bar()
        self.base_dir = quality_data.pretrained_gpt2(
            cache, self.pretrain_train_chars, self.pretrain_test_chars, self.pretrain_steps,
            seq=self.seq, batch=16)
        tokenizer = PreTrainedTokenizerFast.from_pretrained(self.base_dir)
        self.splits = quality_data.build_man_pages(tokenizer, self.train_chars,
                                                   self.heldout_chars, self.seq)
        return dict(sizes={s: list(t.shape) for s, t in self.splits.items()},
                    sha256=quality_data.tensor_digests(self.splits),
                    base_model=self.base_dir.name, pretrain_steps=self.pretrain_steps,
                    pretrain_chars_per_domain=self.pretrain_train_chars)

    def spec(self) -> AdapterSpec:
        return AdapterSpec(targets=self.targets, rank=self.rank,
                           alpha=2.0 * self.rank, fan_in_fan_out=True)

    def pristine(self) -> nn.Module:
        from transformers import GPT2LMHeadModel

        return GPT2LMHeadModel.from_pretrained(self.base_dir)

    def fresh_model(self, pristine: nn.Module, seed: int) -> nn.Module:
        """A copy of `pristine`, with torch's generator seeded for the adapters' initialisation."""
        model = copy.deepcopy(pristine)
        torch.manual_seed(seed)
        return model

    def description(self) -> str:
        return ("The small GPT-2 of examples/naive_summation (4 layers, width 128, "
                f"pretrained {self.pretrain_steps} steps on {self.pretrain_train_chars:,} "
                "characters each of Python, C headers and license texts) is adapted to roff "
                f"man pages, which it never saw: {self.train_chars:,} characters of training "
                f"text, {self.heldout_chars:,} held out (other files), half validation and half "
                f"test, in chunks of {self.seq} tokens. Adapted: "
                + (f"every {', '.join(self.targets)}" if not isinstance(self.targets, str)
                   else f"the modules matching {self.targets}") + ". Metric: test perplexity.")

    def train_data(self) -> dict[str, torch.Tensor]:
        ids = self.splits["train"]
        return dict(input_ids=ids, labels=ids)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str, batch_size: int = 32) -> dict[str, float]:
        """{"perplexity", "loss"} (mean next-token cross-entropy) on `split`."""
        model.eval()
        ids = self.splits[split]
        total, count = 0.0, 0
        for i in range(0, ids.shape[0], batch_size):
            batch = ids[i:i + batch_size]
            logits = model(input_ids=batch).logits[:, :-1].float()
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                     batch[:, 1:].reshape(-1), reduction="sum").item()
            count += batch[:, 1:].numel()
        loss = total / count
        return dict(perplexity=math.exp(loss) if loss < 700 else math.inf, loss=loss)
