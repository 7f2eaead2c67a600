"""How messages count and list things: ``1 shard`` / ``2 shards``, and long name lists cut short."""

from __future__ import annotations

from collections.abc import Sequence


def plural(count: int, noun: str) -> str:
    """``1 shard``, ``2 shards``, ``0 shards``: the count and the noun in the number it needs."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def short_list(names: Sequence[str], limit: int = 8) -> str:
    """The first ``limit`` names, comma-separated, and how many more there are."""
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown}, … ({len(names) - limit} more)"
