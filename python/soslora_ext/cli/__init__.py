"""The command line: ``python -m soslora_ext COMMAND`` or ``soslora COMMAND``.

    commands.py  main, and the train, cps-check, merge, export-peft and info commands
    parser.py    the parser: every command and option, with its help
    compose.py   the compose commands (report, merge, concat, eval)
    quantize.py  train --quantize and merge --dequantize
    args.py      option values and output targets, checked before any work
"""
from .commands import main
from .parser import build_parser

__all__ = ["build_parser", "main"]
