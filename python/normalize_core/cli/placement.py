"""The placement step of the commands: where should the output go, and what placing it will do.

``offer_placement`` runs after every command that writes weights (``place_output`` for them): it
asks on a terminal (or follows ``--place``) whether the output stays where it was written, is
copied into the source, or is copied to another directory. ``place_interactively`` lists what a
placement would replace and which shards it leaves unreferenced, asks what it must, copies
(``normalize_core.place``) and says where the weights are now.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from normalize_core._core import INDEX_FILE, SINGLE_FILE, NormalizeError
from normalize_core.cli.application import fail
from normalize_core.cli.console import say
from normalize_core.cli.progress import byte_progress
from normalize_core.place import (
    PlacementError,
    PlacementResult,
    execute_placement,
    plan_placement,
    refuse_unusable_destination,
)
from normalize_core.sizes import format_bytes
from normalize_core.words import plural, short_list


def terminal_attached() -> bool:
    """Whether the user can answer prompts: stdin and stdout are a terminal."""
    return sys.stdin.isatty() and sys.stdout.isatty()


def check_place_option(place: str | None, staging: str | os.PathLike) -> None:
    """Rejects a ``--place`` directory that can never work (inside the staging directory, or a
    file) before the long write starts, rather than after it. Raises ``PlacementError``."""
    if place in (None, "keep", "source"):
        return
    destination, staging = Path(place).expanduser(), Path(staging)
    if destination.resolve() != staging.resolve():
        refuse_unusable_destination(destination, staging, f"--place {place}", "output directory")


def placement_asks(group) -> bool | None:
    """Placement asks on a terminal, except in a distributed run (never: only --place)."""
    return None if group.world_size == 1 else False


def place_output(staging: Path, source: Path, place: str | None, yes: bool, *, quiet: bool, group) -> None:
    """``offer_placement`` after a write on rank 0 of ``group``; a refusal or failure is one error
    line (exit 2)."""
    try:
        offer_placement(staging, source, place, yes, show_progress=not quiet, interactive=placement_asks(group))
    except NormalizeError as e:
        raise fail(str(e)) from None


def offer_placement(
    staging: str | os.PathLike,
    source: str | os.PathLike | None,
    place: str | None = None,
    yes: bool = False,
    *,
    remove_stale: bool | None = None,
    interactive: bool | None = None,
    show_progress: bool = True,
) -> PlacementResult:
    """The step after a successful write: asks (on a terminal) or follows ``place`` on where the
    output in ``staging`` should go, then copies it there and says where it ended up.

    ``place``: ``"keep"`` (leave it at ``staging``), ``"source"`` (copy into ``source``,
    replacing its weights) or a directory; ``None`` asks on a terminal and keeps otherwise.
    ``yes``, ``remove_stale``, ``interactive``, ``show_progress``: see ``place_interactively``.
    Raises ``PlacementError``/``NormalizeError`` on refusal or failure; the staging directory is
    never changed.
    """
    staging = Path(staging)
    interactive = terminal_attached() if interactive is None else interactive
    destination = _destination(staging, None if source is None else Path(source), place, interactive)
    if destination is None:
        return _keep(staging)
    return place_interactively(
        staging, destination, yes, remove_stale=remove_stale, interactive=interactive, show_progress=show_progress
    )


def place_interactively(
    staging: str | os.PathLike,
    destination: str | os.PathLike,
    yes: bool = False,
    *,
    remove_stale: bool | None = None,
    interactive: bool | None = None,
    show_progress: bool = True,
) -> PlacementResult:
    """Copies ``staging``'s output into ``destination`` after listing what it would replace and
    which destination shards the new index leaves unreferenced, then reports where it went.

    ``yes`` confirms the overwrite; otherwise a terminal user is asked (declining keeps the
    output at ``staging``) and a non-interactive run raises ``PlacementError``. ``remove_stale``:
    ``None`` asks on a terminal (default: leave) and leaves them otherwise. ``interactive``
    defaults to ``terminal_attached()``.
    """
    staging, destination = Path(staging), Path(destination)
    interactive = terminal_attached() if interactive is None else interactive
    if destination.resolve() == staging.resolve():
        return _keep(staging)
    plan = plan_placement(staging, destination)
    if plan.replaced:
        say(f"Placing into {destination} would replace {plural(len(plan.replaced), 'file')}:")
        _print_names(plan.replaced)
        if not yes:
            if not interactive:
                raise PlacementError(
                    f"{destination}: would replace {plural(len(plan.replaced), 'file')} and nothing confirmed it; "
                    f"the output stays at {staging} (rerun with --yes, or: normalize place {staging} "
                    f"{destination} --yes)",
                    "placement_needs_confirmation",
                    destination,
                )
            if not typer.confirm("Replace them?", default=False):
                say("Nothing copied.")
                return _keep(staging)
    if plan.stale:
        say(
            f"{plural(len(plan.stale), 'shard file')} in {destination} not referenced by the new index (engines "
            "following the index ignore them; `normalize verify` reports them):"
        )
        _print_names(plan.stale)
        if SINGLE_FILE in plan.stale:
            _warn_single_file(destination)
        if remove_stale is None:
            remove_stale = interactive and typer.confirm("Remove them? (default: leave them)", default=False)
    with byte_progress(plan.copy_bytes, "place", enabled=show_progress) as advance:
        result = execute_placement(plan, overwrite=True, remove_stale=bool(remove_stale), progress=advance)
    report_placement(result)
    return result


def _keep(staging: Path) -> PlacementResult:
    say(f"The output stays at {staging}.")
    return PlacementResult(destination=staging)


def _destination(staging: Path, source: Path | None, place: str | None, interactive: bool) -> Path | None:
    """The chosen destination, or None to keep the output at ``staging``."""
    if place is None and interactive:
        return _ask_destination(staging, source)
    if place is None or place == "keep":
        return None
    if place == "source":
        if source is None:
            raise PlacementError("--place source: this command has no source directory", "placement_no_source")
        return source
    return Path(place).expanduser()


def _ask_destination(staging: Path, source: Path | None) -> Path | None:
    say("Where should the new weights (shards and index) go?")
    say(f"  1. keep them at {staging}")
    choices = ["1", "3"]
    if source is not None:
        say(f"  2. copy them into the source directory {source} (replaces its weights)")
        choices = ["1", "2", "3"]
    say("  3. copy them to another directory")
    answer = typer.prompt("Choice", default="1")
    while answer not in choices:
        say(f"Please answer {', '.join(choices[:-1])} or {choices[-1]}.")
        answer = typer.prompt("Choice", default="1")
    if answer == "1":
        return None
    if answer == "2":
        return source
    return Path(typer.prompt("Directory")).expanduser()


def report_placement(result: PlacementResult) -> None:
    """Tells the user where the weights are now and what is left for them to do."""
    what = f"{plural(len(result.copied), 'file')} ({format_bytes(result.copied_bytes)})"
    say(f"Copied {what} to {result.destination} in {result.seconds:.1f} s.")
    if result.replaced:
        say(f"Replaced: {short_list(result.replaced)}")
    if result.leftovers_removed:
        say(f"Removed what an interrupted placement had left: {short_list(result.leftovers_removed)}")
    if result.stale_removed:
        say(f"Removed stale shards: {short_list(result.stale_removed)}")
    if result.stale_left:
        say(f"Left unreferenced shards in place: {short_list(result.stale_left)}")
        if SINGLE_FILE in result.stale_left:
            _warn_single_file(result.destination)
    say("The staging directory is unchanged; delete it yourself once you no longer need it.")


def _warn_single_file(destination: Path) -> None:
    say(
        f"warning: transformers loads {SINGLE_FILE} in preference to {INDEX_FILE}: "
        f"remove {destination / SINGLE_FILE} to load the new weights",
        style="yellow",
    )


def _print_names(names: list[str]) -> None:
    for name in names:
        say(f"    {name}")
