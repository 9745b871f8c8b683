"""The ``dmoe`` command line: a thin dispatcher over ``dmoe.commands.*``.

Errors a user can fix (``DmoeError``, ``ValueError``) print as one line and exit 2; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from dmoe import __version__
from dmoe.errors import DmoeError

# Command modules, in pipeline order; each exposes register(subparsers).
COMMAND_MODULES: list[str] = [
    "dmoe.commands.demo",
    "dmoe.commands.build",
    "dmoe.commands.experts",
    "dmoe.commands.ask",
    "dmoe.commands.router",
    "dmoe.commands.eval",
    "dmoe.commands.ablate",
    "dmoe.commands.bench",
    "dmoe.commands.serve",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dmoe",
        description="Decoupled final-layer LoRA experts: inject knowledge into a frozen LLM.",
        epilog="Run `dmoe COMMAND --help` for a command's options and an example.",
    )
    parser.add_argument("--version", action="version", version=f"dmoe {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (DmoeError, ValueError, FileNotFoundError) as e:
        if args.debug:
            raise
        print(f"dmoe: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dmoe: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
