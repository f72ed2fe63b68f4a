"""Adapter composition by naive summation, and the interference between adapters.

An ``Adapter`` (terms.py) maps module names to sums of low-rank terms. Everything here works on
the factors and never builds an [out, in] matrix:

    <B1 A1, B2 A2>_F = sum((B1^T B2) * (A1 A2^T))        inner products, norms, cosines
    sum_i delta_W_i  = [B_1 | B_2 | ...] [A_1; A_2; ...]   an exact sum is a concatenation

terms.py reads adapters, sums.py adds them (``concat``, ``sum_into``), interference.py measures
how far from orthogonal they are (``report``), evaluation.py gives perplexities (``evaluate``).
kinds.py reads and writes PEFT's convolution and embedding adapters as matrix views of their
weights, so all of the above applies to them unchanged.
"""
from ..formats.files import AdapterError
from .evaluation import evaluate, perplexity, read_texts
from .interference import (
                           check_same_base,
                           cosine,
                           effective_rank,
                           format_report,
                           plot_report,
                           report,
                           require_matplotlib,
                           rms_cosine,
                           singular_values,
)
from .kinds import Layout
from .sums import concat, sum_into
from .terms import Adapter, LowRankTerm, from_model, load

__all__ = [
    "Adapter", "AdapterError", "Layout", "LowRankTerm", "check_same_base", "concat", "cosine",
    "effective_rank", "evaluate", "format_report", "from_model", "load", "perplexity",
    "plot_report", "read_texts", "report", "require_matplotlib", "rms_cosine", "singular_values",
    "sum_into",
]
