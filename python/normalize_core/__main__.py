"""``python -m normalize_core`` is the ``normalize`` command. Started by torchrun, it runs as one rank
of a distributed run (as ``--distributed`` asks)."""

import os

from normalize_core.cli import run
from normalize_core.cli.application import DISTRIBUTED_ENV
from normalize_core.distributed import launched_by_torchrun

if launched_by_torchrun():
    os.environ.setdefault(DISTRIBUTED_ENV, "1")
run()
