"""`train --quantize` and `merge --dequantize`: a base model loaded in 4 or 8 bits by
bitsandbytes (QLoRA-style), recorded in the adapter's metadata so that `merge` and
`export-peft` load the same quantized base.

The record (metadata "quantization", also in metrics.json): quantize (nf4, fp4 or int8),
double_quant, compute_dtype (4-bit; None for int8), full_precision (the head modules kept
unquantized, by full name) and base_layer (quantized.describe of the first quantized layer).
"""
from __future__ import annotations

import argparse
import importlib.util
import logging

from .args import CliError

QUANTIZE = ("none", "nf4", "fp4", "int8")
FOUR_BIT = ("nf4", "fp4")
COMPUTE_DTYPES = ("float32", "bfloat16")
MERGED_DTYPES = ("float32", "bfloat16", "float16")
# train runs on the CPU (its loop moves nothing), so the quantized layers are put there too.
DEVICE = "cpu"


def add_train_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quantize", choices=QUANTIZE, default="none",
                        help="load the base frozen in 4 bits (nf4 or fp4) or 8 bits (int8, "
                        "LLM.int8()) with bitsandbytes and train the adapters over it "
                        "(QLoRA-style); the heads stay in full precision")
    parser.add_argument("--double-quant", action="store_true",
                        help="4-bit: quantize the per-block scales too (about 0.37 bits less "
                        "per weight)")
    parser.add_argument("--compute-dtype", choices=COMPUTE_DTYPES, default=None,
                        help="4-bit: the dtype the quantized layers compute in (default "
                        "float32)")


def add_merge_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dequantize", action="store_true",
                        help="an adapter trained with --quantize: write the dequantized base "
                        "weights plus the update (a quantized weight cannot hold them)")
    parser.add_argument("--dtype", choices=MERGED_DTYPES, default=None,
                        help="with --dequantize: the dtype of the written model (default: that "
                        "of the base's unquantized weights)")


def quantization(args) -> dict | None:
    """train's quantization options, checked before any work: None for a full-precision
    base, else the record's options (the rest is added by keep_heads and describe_base)."""
    four_bit = args.quantize in FOUR_BIT
    for option, given in (("--double-quant", args.double_quant),
                          ("--compute-dtype", args.compute_dtype)):
        if given and not four_bit:
            raise CliError(f"{option}: applies to 4-bit bases only; it needs --quantize nf4 or "
                           f"fp4, got --quantize {args.quantize}")
    if args.quantize == "none":
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise CliError(f"--quantize {args.quantize}: needs the bitsandbytes package "
                       "(pip install bitsandbytes)")
    return dict(quantize=args.quantize, double_quant=bool(args.double_quant),
                compute_dtype=(args.compute_dtype or "float32") if four_bit else None)


def keep_heads(record: dict | None, model_class, model_dir, heads) -> dict | None:
    """`record` with full_precision: the modules of `model_class` whose own name is one of
    `heads` (found on a weightless copy built on the meta device). A quantized load keeps them
    in full precision: they are trained whole, or not at all."""
    if record is None:
        return None
    import torch
    from transformers import AutoConfig

    with torch.device("meta"):
        skeleton = model_class.from_config(AutoConfig.from_pretrained(model_dir))
    names = [n for n, _ in skeleton.named_modules() if n and n.split(".")[-1] in heads]
    return dict(record, full_precision=names)


def load_kwargs(record: dict | None) -> dict:
    """from_pretrained's keywords loading the base as `record` says (none for full precision)."""
    if record is None:
        return {}
    import torch
    from transformers import BitsAndBytesConfig

    # bitsandbytes' notice that an optional CPU kernel from the Hub is not installed
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # None: transformers' own choice of modules to keep (the output embeddings)
    skip = record["full_precision"] or None
    if record["quantize"] == "int8":
        config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    else:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=record["quantize"],
                                    bnb_4bit_use_double_quant=record["double_quant"],
                                    bnb_4bit_compute_dtype=getattr(torch, record["compute_dtype"]),
                                    llm_int8_skip_modules=skip)
    return dict(quantization_config=config, device_map={"": DEVICE})


def describe_base(record: dict | None, model) -> dict | None:
    """`record` with base_layer: how the first quantized layer of the loaded `model` stores its
    weight (before any inference forward repacks it)."""
    if record is None:
        return None
    from ..layers.quantized import describe, is_quantized_linear

    layer = next((m for m in model.modules() if is_quantized_linear(m)), None)
    if layer is None:
        raise CliError(f"--quantize {record['quantize']}: bitsandbytes quantized no layer of "
                       "this model (it replaces nn.Linear layers)")
    return dict(record, base_layer=describe(layer))


def recorded(adapter: str, config: dict) -> dict | None:
    """The quantization an adapter's metadata records (None: a full-precision base), checked
    so that its base can be loaded the same way."""
    record = (config.get("metadata") or {}).get("quantization")
    if record is None:
        return None
    keys = ("quantize", "double_quant", "compute_dtype", "full_precision")
    if not (isinstance(record, dict) and all(k in record for k in keys)
            and record["quantize"] in QUANTIZE[1:]
            and record["compute_dtype"] in (None, *COMPUTE_DTYPES)
            and isinstance(record["full_precision"], list)):
        raise CliError(f"{adapter}: its metadata's quantization must be an object with "
                       f"{', '.join(keys)} as `train --quantize` writes it, got {record!r}")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise CliError(f"{adapter}: trained on a base quantized to {record['quantize']} by "
                       "bitsandbytes; loading it needs the bitsandbytes package (pip install "
                       "bitsandbytes)")
    return record


def check_merge(args, record: dict | None) -> None:
    """merge's --dequantize/--dtype against the adapter's base, before the model loads."""
    if record is None:
        if args.dequantize or args.dtype:
            option = "--dequantize" if args.dequantize else "--dtype"
            raise CliError(f"{option}: {args.adapter} was trained on a full-precision base; "
                           "there is nothing to dequantize (drop the option)")
        return
    if not args.dequantize:
        raise CliError(f"{args.adapter}: trained on a quantized base ("
                       f"{record.get('base_layer') or record['quantize']}), which cannot hold "
                       "W + delta (re-quantizing would round the update away), so nothing is "
                       "merged; add --dequantize to write the dequantized base weights plus the "
                       "update (--dtype float32, bfloat16 or float16 sets their dtype)")


def dequantized_merge(model, dtype_name: str | None):
    """merge_and_unload(dequantize=True) into a plain model: every adapted layer a Linear
    holding the dequantized weight plus the update, any quantized layer left (not adapted)
    dequantized too, all weights in one dtype (`dtype_name`, default the model's unquantized
    weights' dtype) and no quantization config, so that from_pretrained loads it as saved."""
    import torch

    from ..layers.model import merge_and_unload, replace_module
    from ..layers.quantized import dequantized_linear, is_quantized_linear

    dtype = getattr(torch, dtype_name) if dtype_name else model.dtype
    merge_and_unload(model, dequantize=True, dtype=dtype)
    for name, module in list(model.named_modules()):
        if is_quantized_linear(module):
            replace_module(model, name, dequantized_linear(module, dtype))
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    return model.to(dtype)
