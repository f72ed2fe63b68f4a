"""Command line: `python -m soslora_ext demo` runs the end-to-end example."""
import sys

from . import demo

COMMANDS = {"demo": demo.main}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m soslora_ext {{{','.join(COMMANDS)}}} [--help]", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
