"""The ``normalize`` command line: one module per family of commands, all on one typer app.

``main`` (the console script) declares only the command its arguments name: declaring the other
nine is a good part of a short run's start-up. ``app`` (for tests and embedding) has them all.
"""

from __future__ import annotations

import importlib
import sys
import warnings

from normalize_core.cli.application import COMMAND_MODULES, print_warning


def register_commands(name: str | None = None):
    """Imports the module declaring command ``name`` (every command's when None or when ``name``
    is not a command, so typer can suggest the right one) and returns the typer app."""
    modules = [COMMAND_MODULES[name]] if name in COMMAND_MODULES else dict.fromkeys(COMMAND_MODULES.values())
    for module in modules:
        importlib.import_module(f"{__name__}.{module}")
    from normalize_core.cli.application import app

    return app


def named_command(args: list[str]) -> str | None:
    """The command a command line runs when it starts with one, or None (``normalize --help``,
    ``normalize --help merge``: the app's own options list every command)."""
    return args[0] if args and not args[0].startswith("-") else None


def main() -> None:
    """Console-script entry point."""
    warnings.showwarning = print_warning
    register_commands(named_command(sys.argv[1:]))()


def __getattr__(name: str):
    if name == "app":
        return register_commands()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["app", "main", "register_commands"]
