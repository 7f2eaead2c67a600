"""How the commands print: whole lines, styled on a terminal, verbatim everywhere else.

Every message goes through here. Off a terminal (pipes, logs, tests) a line is written as it is:
never folded at 80 columns, no markup or emoji codes read into paths and tensor names, and rich
not even imported. On a terminal, rich applies the styles (``(text, style)`` parts) and draws the
progress bars. Tables are plain columns, the same everywhere.
"""

from __future__ import annotations

import sys
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console

#: Style of an ``error:`` or ``warning:`` label.
SEVERITY_STYLES = {"error": "bold red", "warning": "yellow"}

#: A piece of a line: plain text, or ``(text, rich style)``.
Part = str | tuple[str, str]


class StreamConsole:
    """A rich ``Console`` on the current ``sys.stdout`` or ``sys.stderr``, made when first used and
    remade when the stream is swapped (as test runners do). Attribute access (``print``,
    ``is_terminal``, …) goes to it. Markup, emoji codes and highlighting are off."""

    def __init__(self, stream: str):
        self._stream = stream
        self._made: tuple[Any, Console] | None = None

    def stream(self) -> Any:
        """The stream as it is now."""
        return getattr(sys, self._stream)

    def console(self) -> Console:
        """The console for the stream as it is now."""
        stream = self.stream()
        if self._made is None or self._made[0] is not stream:
            from rich.console import Console

            console = Console(file=stream, markup=False, emoji=False, highlight=False, soft_wrap=True)
            self._made = (stream, console)
        return self._made[1]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.console(), name)


stdout = StreamConsole("stdout")
stderr = StreamConsole("stderr")


def write_line(*parts: Part, err: bool = False) -> None:
    """Prints one line made of ``parts`` on stdout (stderr with ``err``); styles apply on a terminal."""
    target = stderr if err else stdout
    stream = target.stream()
    if stream.isatty():
        from rich.text import Text

        target.print(Text.assemble(*parts))
    else:
        print("".join(part if isinstance(part, str) else part[0] for part in parts), file=stream)


def say(message: str, style: str = "") -> None:
    """Prints one message on stdout (``style``, a rich style name, colours all of it on a terminal)."""
    write_line((message, style))


def print_finding(severity: str, message: str, *, err: bool = False) -> None:
    """An ``error: ...`` or ``warning: ...`` line, the label styled on a terminal."""
    write_line((f"{severity}:", SEVERITY_STYLES.get(severity, "")), f" {message}", err=err)


def print_table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], *, right: Collection[int] = (), title: str = ""
) -> None:
    """``rows`` under a header line, each column as wide as its widest cell; the columns whose
    index is in ``right`` (numbers) are aligned right. Nothing is folded, however long a cell."""
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        padded = (
            cell.rjust(w) if i in right else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(cells, widths, strict=True))
        )
        return "  ".join(padded).rstrip()

    if title:
        say(title, "bold")
    say(line(headers), "bold")
    for row in rows:
        say(line(row))
