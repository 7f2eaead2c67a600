"""A checkpoint's ``config.json``: read through the core's regular-file checks, written atomically.

A FIFO, a device, a directory or a dangling symlink named ``config.json`` is an error that says what
it is (``NormalizeError``, kind ``not_a_regular_file``): it is never opened in a way that could block
or read forever. Only a name with nothing behind it counts as "no config.json".

Two readers, for two kinds of command: the checking commands describe whatever they find
(``read_config``: a config that is not JSON is as good as none), the writing commands build their
output's config from the source's and refuse one they cannot parse (``load_config``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from normalize_core._core import read_regular_file, write_atomically
from normalize_core.errors import normalize_error
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


def read_config(directory: Path) -> Any:
    """``directory``'s ``config.json`` parsed, or None when absent or not JSON. Raises
    ``NormalizeError`` when it is there but cannot be read as a regular file (see the module
    docstring)."""
    text = read_config_bytes(directory / CONFIG_FILE)
    try:
        return None if text is None else json.loads(text)
    except ValueError:
        return None


def load_config(path: Path) -> dict[str, Any] | None:
    """The ``config.json`` at ``path`` as a dict; None when the file does not exist. Raises
    ``NormalizeError`` (kind ``invalid_config``) for a file that is not a JSON object, and as
    ``read_config_bytes`` does for one that is not (a symlink to) a regular file."""
    text = read_config_bytes(path)
    if text is None:
        return None
    try:
        config = json.loads(text)
    except ValueError as e:
        raise normalize_error("invalid_config", f"{path}: not valid JSON: {e}", file=str(path)) from None
    if not isinstance(config, dict):
        raise normalize_error("invalid_config", f"{path}: not a JSON object", file=str(path))
    return config


def write_config(path: Path, config: dict[str, Any]) -> None:
    """Writes ``config`` to ``path`` as transformers does (two-space indent, UTF-8, a final newline),
    atomically: a temporary file, fsynced, renamed over whatever was there (never written through a
    symlink)."""
    write_atomically(path, (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode())


def quantization_config_of(config: Any) -> dict[str, Any]:
    """``config["quantization_config"]`` when both are JSON objects, else an empty dict."""
    quantization = config.get("quantization_config") if isinstance(config, dict) else None
    return quantization if isinstance(quantization, dict) else {}
