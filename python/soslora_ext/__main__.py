"""`python -m soslora_ext COMMAND`: see soslora_ext.cli."""
import sys

from .cli.commands import main

if __name__ == "__main__":
    sys.exit(main())
