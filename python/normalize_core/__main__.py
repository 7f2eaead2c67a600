"""``python -m normalize_core`` is the ``normalize`` command."""

from normalize_core.cli import main

main()
