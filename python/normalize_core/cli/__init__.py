"""The ``normalize`` command line: one module per family of commands, all on one typer app.

``main`` declares only the command its arguments name: declaring the other nine is a good part
of a short run's start-up. ``run`` (the console script, and ``python -m normalize_core``) is
``main`` without the interpreter's teardown. ``app`` (for tests and embedding) has them all.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from typing import NoReturn

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
    """Runs the command line in ``sys.argv``; ends with ``SystemExit`` like any click program."""
    warnings.showwarning = print_warning
    register_commands(named_command(sys.argv[1:]))()


def run() -> NoReturn:
    """Console-script entry point: ``main``, then the process ends without tearing the interpreter
    down. Every command has synced and closed what it wrote by then, so teardown would only free
    memory, a tenth of a short command's time. An uncaught exception (a bug) still ends in a
    traceback, the normal way."""
    try:
        main()
        status = 0
    except SystemExit as e:
        status = e.code
    if status is not None and not isinstance(status, int):
        print(status, file=sys.stderr)
        status = 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:  # a closed pipe (``normalize inspect ... | head``): what was printed is all there is
        pass
    os._exit(status or 0)


def __getattr__(name: str):
    if name == "app":
        return register_commands()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["app", "main", "register_commands", "run"]
