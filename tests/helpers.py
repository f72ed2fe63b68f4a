"""Helpers shared by tests in several folders: tiny model directories, data sets, a CLI runner,
real PEFT adapters, an op log and oracles."""
import json

import peft
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertTokenizerFast,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    TrainerCallback,
)

from soslora_ext.cli import main
from soslora_ext.ops import reference

WORDS = ["def", "return", "import", "include", "struct", "int", "license", "copyright",
         "the", "of", "and", "permission", "x", "y", "(", ")", "{", "}", ";", "#", "=", ":"]


def tiny_dir(tmp_path, kind="bert"):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(vocab))
    torch.manual_seed(0)
    if kind == "bert":
        model = BertForSequenceClassification(BertConfig(
            vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=2, intermediate_size=48, max_position_embeddings=64))
    elif kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(WORDS) + 5, n_embd=32, n_layer=2,
                                           n_head=4, n_positions=64, bos_token_id=2,
                                           eos_token_id=3))
    else:
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(WORDS) + 5, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    path = tmp_path / kind
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, tokenizer


def classification_data(path):
    rows = [{"text": "def x ( ) : return y", "label": "python"},
            {"text": "struct x { int y ; }", "label": "c"},
            {"text": "# include x", "label": "c"},
            {"text": "import x", "label": "python"}] * 10
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def run_cli(*args):
    return main([str(a) for a in args])


def one_line_error(capsys):
    """The command's stderr, which must be one line starting with "error:"."""
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:"), err
    return err


def peft_adapter(path, make, seed, **cfg):
    """An adapter made by the real peft package, with random (non-zero) factors."""
    model = peft.get_peft_model(make(), peft.LoraConfig(**cfg))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
    model.save_pretrained(str(path))
    return path


class OpLog(TorchDispatchMode):
    """The names of the ops run inside it (namespace.name)."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func._schema.name.replace("::", "."))
        return func(*args, **(kwargs or {}))


def oracle_delta(A, B, scale, row_index, col_index, row_offsets, col_offsets, ranks):
    G = len(ranks)
    rows = [row_index[row_offsets[c]:row_offsets[c + 1]] for c in range(G)]
    cols = [col_index[col_offsets[c]:col_offsets[c + 1]] for c in range(G)]
    As = [A.double()[:ranks[c], col_offsets[c]:col_offsets[c + 1]] for c in range(G)]
    Bs = [B.double()[row_offsets[c]:row_offsets[c + 1], :ranks[c]] for c in range(G)]
    return reference.cps_delta_weight(B.shape[0], A.shape[1], rows, cols, As, Bs,
                                      scale.double().tolist())


def planted_blocks(m, n, clusters, rank, noise, generator):
    """(W [m, n] float64, row labels, column labels): `clusters` shuffled blocks of rank
    `rank` (zero off the blocks) plus Gaussian noise of `noise` times ||blocks||_F."""
    rows = torch.randperm(m, generator=generator) % clusters
    cols = torch.randperm(n, generator=generator) % clusters
    W = torch.zeros(m, n, dtype=torch.float64)
    for c in range(clusters):
        r, k = (rows == c).nonzero()[:, 0], (cols == c).nonzero()[:, 0]
        W[r[:, None], k[None, :]] = (
            torch.randn(len(r), rank, generator=generator, dtype=torch.float64)
            @ torch.randn(rank, len(k), generator=generator, dtype=torch.float64))
    N = torch.randn(m, n, generator=generator, dtype=torch.float64)
    return W + noise * W.norm() / N.norm() * N, rows, cols


def layer_oracle_delta(layer):
    row_offsets, col_offsets = layer._offsets
    return oracle_delta(layer.lora_A, layer.lora_B, layer.cluster_scales, layer.row_index,
                        layer.col_index, row_offsets, col_offsets, layer.ranks)


class Recorder(TrainerCallback):
    """Reads the layers' device buffers as the optimizer step begins (after SOSLoRACallback)."""

    def __init__(self, layer):
        self.layer, self.seen, self.logs = layer, {}, []

    def on_step_begin(self, args, state, control, **kwargs):
        self.seen[state.global_step] = (self.layer.ortho_lambda.item(),
                                        self.layer.gate_temperature.item())

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


class Rows(torch.utils.data.Dataset):
    def __init__(self, n=64):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(5, 60, (n, 12), generator=g)
        self.labels = (self.ids[:, 0] > 30).long()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return dict(input_ids=self.ids[i], labels=self.labels[i])
