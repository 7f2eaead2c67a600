"""How messages count and list things: ``1 shard`` / ``2 shards``, and long name lists cut short."""

from __future__ import annotations

from collections.abc import Sequence


def plural(count: int, noun: str, plural_form: str | None = None) -> str:
    """``1 shard``, ``2 shards``, ``0 shards``: the count and the noun in the number it needs
    (``plural_form`` where adding an s is wrong: ``2 entries``)."""
    return f"{count} {noun}" if count == 1 else f"{count} {plural_form or noun + 's'}"


def short_list(names: Sequence[str], limit: int = 8) -> str:
    """The first ``limit`` names, comma-separated, and how many more there are."""
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown}, … ({len(names) - limit} more)"
