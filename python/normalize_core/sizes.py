"""Byte sizes as users write them: ``4GiB`` (binary), ``5GB`` (decimal, as HF's ``max_shard_size``)."""

from __future__ import annotations

import math
import re

KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30
EIB = 1 << 60

#: Largest size accepted for a shard limit: no file system holds a larger file, and the limit
#: must fit the planner's 64-bit byte counts.
MAX_SIZE = EIB

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": KIB,
    "MIB": MIB,
    "GIB": GIB,
    "TIB": 1 << 40,
}

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*$")


def parse_size(text: str) -> int:
    """Parses ``"5GB"`` (5·10^9), ``"4GiB"`` (4·2^30), ``"512MiB"``, ``"1000"`` (bytes) into bytes.

    Raises ``ValueError`` for anything else, including sizes that round to zero or exceed 1 EiB.
    """
    match = _SIZE.match(text)
    unit = match.group(2).upper() if match else None
    if not match or unit not in _UNITS:
        raise ValueError(f"not a size: {text!r} (examples: 5GB, 4GiB, 512MiB)")
    return _checked(float(match.group(1)) * _UNITS[unit], repr(text))


def gib_to_bytes(gib: float) -> int:
    """``--shard-size-gb`` semantics: GiB, fractions allowed (0.25 = 256 MiB). Raises ``ValueError``
    for sizes that are not finite, round to zero bytes or exceed 1 EiB."""
    if not math.isfinite(gib):
        raise ValueError(f"shard size must be a finite number of GiB, not {gib}")
    return _checked(gib * GIB, f"{gib:g} GiB")


def _checked(size: float, shown: str) -> int:
    """``size`` as whole bytes, when between 1 byte and ``MAX_SIZE``."""
    if size > MAX_SIZE:
        raise ValueError(f"size must be at most 1 EiB (2^60 bytes), not {shown}")
    if int(size) <= 0:
        raise ValueError(f"size must be at least 1 byte, not {shown}")
    return int(size)


def format_bytes(n: int | float) -> str:
    """Human-readable binary size: ``1.50 GiB``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
