"""Progress bars for long work: bytes done, bytes/s and time left, drawn on stderr.

The library reports progress through a plain ``advance`` callable; only the commands draw it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from normalize_core.cli.console import stderr

#: ``advance(n_bytes, items=0)``: report bytes (and, optionally, finished items) done.
Advance = Callable[..., None]


def progress_label(command: str, device: str, world_size: int) -> str:
    """``to-fp8 on cuda:0``; for a distributed run, ``to-fp8 on 8 ranks`` (rank 0's bar stands for all)."""
    return f"{command} on {device}" if world_size == 1 else f"{command} on {world_size} ranks"


@contextmanager
def byte_progress(
    total: int, description: str, enabled: bool = True, items_total: int | None = None, items_label: str = ""
) -> Iterator[Advance]:
    """Yields ``advance(n_bytes, items=0)``; shows a bar of ``total`` bytes while the block runs,
    when enabled and stderr is a terminal. With ``items_total``, also counts items (e.g. tensors).
    Without a bar to draw, rich is not imported."""
    if not (enabled and stderr.stream().isatty()):
        yield lambda _n, items=0: None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = [TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(binary_units=True)]
    if items_total is not None:
        columns.append(TextColumn("{task.fields[items]}/" + f"{items_total} {items_label}"))
    columns += [TransferSpeedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=stderr.console(), transient=False) as progress:
        task = progress.add_task(description, total=total, items=0)
        done_items = 0

        def advance(n: int, items: int = 0) -> None:
            nonlocal done_items
            done_items += items
            progress.update(task, advance=n, items=done_items)

        yield advance
