"""CLI commands, one module per command group.

Each module defines ``register(subparsers) -> None`` which adds its sub-command(s) with
``set_defaults(func=...)``; ``func(args) -> int`` does the work and returns an exit code. Modules
hold argument plumbing only: the work itself lives in the library packages.
"""
