"""The command line: ``python -m soslora_ext COMMAND`` or ``soslora COMMAND``.

    commands.py  the parser and the train, merge, export-peft, info, main-job and demo commands
    compose.py   the compose commands (report, merge, concat, eval)
    quantize.py  train --quantize and merge --dequantize
    args.py      option values and output targets, checked before any work
"""
from .commands import build_parser, main

__all__ = ["build_parser", "main"]
