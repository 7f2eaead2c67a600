"""The ``normalize`` command line: one module per family of commands, all on one typer app."""

import warnings

from normalize_core.cli import (  # noqa: F401  (registers the commands)
    bf16_command,
    check_command,
    checkpoint_commands,
    fp8_command,
    merge_commands,
)
from normalize_core.cli.app import app, print_warning


def main() -> None:
    """Console-script entry point."""
    warnings.showwarning = print_warning
    app()


__all__ = ["app", "main"]
