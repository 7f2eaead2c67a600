"""The ``normalize`` command line: one module per family of commands, all on one typer app.

``main`` (the console script) declares only the command its arguments name: declaring the other
nine is a good part of a short run's start-up. ``app`` (for tests and embedding) has them all.
"""

from __future__ import annotations

import importlib
import sys
import warnings

from normalize_core.cli.application import COMMAND_MODULES, print_warning


def register_commands(names: list[str] | None = None):
    """Imports the modules declaring ``names`` (every command when None or when a name is not a
    command, so typer can suggest the right one) and returns the typer app."""
    if names is None or not set(names) <= COMMAND_MODULES.keys():
        names = list(COMMAND_MODULES)
    for name in names:
        importlib.import_module(f"{__name__}.{COMMAND_MODULES[name]}")
    from normalize_core.cli.application import app

    return app


def named_command(args: list[str]) -> list[str] | None:
    """The command a command line runs when it starts with one, or None (``normalize --help``,
    ``normalize --help merge``: the app's own options list every command)."""
    return args[:1] if args and not args[0].startswith("-") else None


def main() -> None:
    """Console-script entry point."""
    warnings.showwarning = print_warning
    register_commands(named_command(sys.argv[1:]))()


def __getattr__(name: str):
    if name == "app":
        return register_commands()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["app", "main", "register_commands"]
