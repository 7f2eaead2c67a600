"""How the commands print: rich consoles that never wrap off a terminal, and labelled lines.

Every message goes through here. Markup is off (messages carry user paths and tensor names,
which can hold brackets); styles are applied with ``Text``. rich is imported on first use, so
``normalize --help`` never pays for it.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console
    from rich.text import Text

#: Line width off a terminal: wide enough that rich never folds a table cell or a summary line
#: (logs and pipes get whole lines, as ``grep`` and the tests expect).
UNWRAPPED_WIDTH = 1 << 16


class StreamConsole:
    """A rich ``Console`` on the current ``sys.stdout`` or ``sys.stderr``, made when first used and
    remade when the stream is swapped (as test runners do). On a terminal lines fit the window;
    anywhere else nothing wraps. Attribute access (``print``, ``is_terminal``, …) goes to it."""

    def __init__(self, stream: str):
        self._stream = stream
        self._made: tuple[Any, Console] | None = None

    def console(self) -> Console:
        """The console for the stream as it is now."""
        stream = getattr(sys, self._stream)
        if self._made is None or self._made[0] is not stream:
            from rich.console import Console

            width = None if stream.isatty() else UNWRAPPED_WIDTH
            console = Console(file=stream, width=width, markup=False, highlight=False, soft_wrap=True)
            self._made = (stream, console)
        return self._made[1]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.console(), name)


stdout = StreamConsole("stdout")
stderr = StreamConsole("stderr")


def say(message: str, style: str = "") -> None:
    """Prints one message on stdout as plain text (``style`` applies to all of it)."""
    from rich.text import Text

    stdout.print(Text(message, style=style))


def labelled(label: str, message: str, style: str) -> Text:
    """``label: message`` with the label styled and the message verbatim."""
    from rich.text import Text

    return Text.assemble((f"{label}:", style), " ", message)


def finding(severity: str, message: str) -> Text:
    """An ``error:`` or ``warning:`` line."""
    return labelled(severity, message, "bold red" if severity == "error" else "yellow")
