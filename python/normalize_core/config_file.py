"""A checkpoint's ``config.json``, read through the core's regular-file checks.

A FIFO, a device, a directory or a dangling symlink named ``config.json`` is an error that says what
it is (``NormalizeError``, kind ``not_a_regular_file``): it is never opened in a way that could block
or read forever. Only a name with nothing behind it counts as "no config.json".
"""

from __future__ import annotations

import os
from pathlib import Path

from normalize_core._core import read_regular_file
from normalize_core.sizes import MIB

CONFIG_FILE = "config.json"

#: A real release's config.json is at most a few MB, a skip list naming every expert of a
#: 1T-parameter MoE included; a far larger one is not a config.
CONFIG_MAX_BYTES = 64 * MIB


def read_config_bytes(path: Path) -> bytes | None:
    """The bytes of the ``config.json`` at ``path``, or None when nothing has that name. Raises
    ``NormalizeError`` naming the file when it is not (a symlink to) a regular file, is larger than
    ``CONFIG_MAX_BYTES``, or cannot be read."""
    if not os.path.lexists(path):
        return None
    return read_regular_file(path, CONFIG_MAX_BYTES)
