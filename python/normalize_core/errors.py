"""Raising ``NormalizeError`` from Python with the same attributes the Rust core sets."""

from __future__ import annotations

from normalize_core._core import NormalizeError


def normalize_error(kind: str, message: str, *, file: str | None = None, tensor: str | None = None) -> NormalizeError:
    """A ``NormalizeError`` whose ``kind``, ``file`` and ``tensor`` attributes are set."""
    error = NormalizeError(message)
    error.kind = kind
    error.file = file
    error.tensor = tensor
    return error
