"""Placement: a write's output directory is a staging area; this copies its result to its final home.

After ``repack`` or ``to-fp8`` the user chooses: keep the output where it is, copy it into the
source directory (replacing its weights in place), or copy it to another directory. What is
copied: the staging index, every shard it references, and the staging's non-tensor files that
the destination lacks or holds with other bytes (``to-fp8`` rewrites ``config.json``; placing
FP8 weights without it would give a checkpoint engines misread).

Rules, whatever the caller:
- copy, never move: nothing in the staging directory is ever changed or deleted;
- nothing is overwritten unless the caller confirmed it (``overwrite=True``) after seeing the list;
- a destination index never points at a missing or half-written file: every file is first copied
  under a hidden temporary name (fsynced), then all are renamed into place, and the new index is
  written last; when shards the old index may reference are about to be replaced, the old index
  is removed before the renames, so a crash in between leaves no index rather than a wrong one;
- shards of the destination that the new index does not reference ("stale") are removed only
  when asked (``remove_stale=True``), and only after the new index is in place.

``plan_placement`` / ``execute_placement`` / ``place`` take explicit answers; ``offer_placement``
is the interactive layer the commands call after a successful write.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import typer
from rich.console import Console
from rich.text import Text

from normalize_core._core import Checkpoint, NormalizeError, copy_file
from normalize_core.diff import changed_aux_files
from normalize_core.progress import byte_progress
from normalize_core.sizes import format_bytes

INDEX_FILE = "model.safetensors.index.json"
#: transformers loads this file in preference to an index when both exist.
SINGLE_FILE = "model.safetensors"

console = Console(soft_wrap=True)


class PlacementError(NormalizeError):
    """A placement that was refused (unconfirmed overwrite, bad destination; nothing copied) or
    failed on I/O (kind ``"io"``; temporary copies removed, see ``execute_placement``).

    A ``NormalizeError``, so commands that report those as one-line errors report these too.
    """

    def __init__(self, message: str, kind: str, file: Path | None = None):
        super().__init__(message)
        self.kind = kind
        self.file = None if file is None else str(file)
        self.tensor = None


@dataclass
class PlacementPlan:
    """What placing ``staging`` into ``destination`` would copy, replace and leave stale."""

    staging: Path
    destination: Path
    #: Shard files the staging index references, in checkpoint order.
    shards: list[str]
    #: Staging non-tensor files the destination lacks (``"new"``) or holds with other bytes
    #: (``"differs"``), relative POSIX paths.
    aux_files: dict[str, str]
    #: Destination files that would be overwritten, sorted.
    replaced: list[str]
    #: Destination ``*.safetensors`` files the new index does not reference, sorted.
    stale: list[str]
    #: Bytes to copy.
    copy_bytes: int

    @property
    def files(self) -> list[str]:
        """Everything copied, in copy order: shards, aux files, then the index."""
        return [*self.shards, *self.aux_files, INDEX_FILE]


@dataclass
class PlacementResult:
    """Where the weights ended up and what changed there."""

    destination: Path
    copied: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    stale_removed: list[str] = field(default_factory=list)
    stale_left: list[str] = field(default_factory=list)
    copied_bytes: int = 0
    seconds: float = 0.0

    @property
    def kept(self) -> bool:
        """Whether nothing was copied (the output stays where it was written)."""
        return not self.copied


def plan_placement(staging: str | os.PathLike, destination: str | os.PathLike) -> PlacementPlan:
    """Validates the staging checkpoint (headers and index) and works out what placing it into
    ``destination`` would copy, replace and leave stale. Changes nothing."""
    staging, destination = Path(staging), Path(destination)
    if destination.resolve() == staging.resolve():
        raise PlacementError(f"{destination}: is the staging directory itself", "placement_is_staging", destination)
    refuse_unusable_destination(destination, staging, str(destination), "staging directory")
    checkpoint = Checkpoint.open(staging)
    if checkpoint.layout != "indexed":
        raise PlacementError(
            f"{staging}: has no {INDEX_FILE}; place copies a written output (shards and index)",
            "placement_without_index",
            staging,
        )
    shards = checkpoint.files
    aux_files = changed_aux_files(staging, destination)
    files = [*shards, *aux_files, INDEX_FILE]
    replaced = sorted(name for name in files if (destination / name).exists())
    keep = set(shards)
    stale = sorted(
        p.name
        for p in (destination.glob("*.safetensors") if destination.is_dir() else [])
        if p.name not in keep and not p.name.startswith(".") and p.is_file()
    )
    copy_bytes = sum((staging / name).stat().st_size for name in files)
    return PlacementPlan(staging, destination, shards, aux_files, replaced, stale, copy_bytes)


def execute_placement(
    plan: PlacementPlan,
    *,
    overwrite: bool = False,
    remove_stale: bool = False,
    progress: Callable[[int], None] | None = None,
) -> PlacementResult:
    """Copies a planned placement (see the module docstring for the guarantees). Raises
    ``PlacementError`` before copying anything when files would be replaced and ``overwrite``
    is False. On an I/O failure (``NormalizeError``, or ``PlacementError`` of kind ``"io"``) the
    temporary copies are removed and the destination's previous files are untouched, except,
    at worst, an old index removed when the failure hits between the renames."""
    started = time.monotonic()
    if plan.replaced and not overwrite:
        raise PlacementError(
            f"{plan.destination}: placing would replace {_count(plan.replaced, 'file')} "
            f"({_short_list(plan.replaced)}); confirm the overwrite (--yes)",
            "placement_needs_confirmation",
            plan.destination,
        )
    created = not plan.destination.exists()
    try:
        plan.destination.mkdir(parents=True, exist_ok=True)
        staged = _stage_copies(plan, progress)
        _commit(plan, staged, progress)
        removed = _remove_stale(plan) if remove_stale else []
    except OSError as e:
        raise PlacementError(f"{e.filename or plan.destination}: {e.strerror or e}", "io", e.filename) from e
    finally:
        if created:
            with contextlib.suppress(OSError):
                plan.destination.rmdir()  # only succeeds when the placement left it empty
    return PlacementResult(
        destination=plan.destination,
        copied=plan.files,
        replaced=plan.replaced,
        stale_removed=removed,
        stale_left=[name for name in plan.stale if name not in removed],
        copied_bytes=plan.copy_bytes,
        seconds=time.monotonic() - started,
    )


def _commit(plan: PlacementPlan, staged: list[tuple[Path, Path]], progress: Callable[[int], None] | None) -> None:
    """Renames the staged copies into place, then writes the new index."""
    index_path = plan.destination / INDEX_FILE
    try:
        if index_path.exists() and any(name in plan.replaced for name in plan.shards):
            # The old index may name shards about to be replaced; no index beats a wrong one.
            index_path.unlink()
            _sync_dir(plan.destination)
        while staged:
            temp, final = staged[0]
            os.replace(temp, final)
            staged.pop(0)
        for directory in {(plan.destination / name).parent for name in plan.aux_files}:
            _sync_dir(directory)
        copy_file(plan.staging / INDEX_FILE, index_path, progress)
        _sync_dir(plan.destination)
    finally:
        for temp, _final in staged:
            with contextlib.suppress(OSError):
                temp.unlink()


def _remove_stale(plan: PlacementPlan) -> list[str]:
    """Removes the destination shards the new index (already in place) does not reference."""
    for name in plan.stale:
        (plan.destination / name).unlink()
    _sync_dir(plan.destination)
    return list(plan.stale)


def _stage_copies(plan: PlacementPlan, progress: Callable[[int], None] | None) -> list[tuple[Path, Path]]:
    """Copies every file but the index next to its final place under a hidden temporary name.
    On failure (or Ctrl-C) removes what it copied and the folders it created, and re-raises."""
    staged: list[tuple[Path, Path]] = []
    created_dirs: list[Path] = []
    try:
        for name in [*plan.shards, *plan.aux_files]:
            final = plan.destination / name
            for parent in reversed(final.parents):
                if parent.is_relative_to(plan.destination) and not parent.exists():
                    parent.mkdir()
                    created_dirs.append(parent)
            temp = final.with_name(f".{final.name}.partial-place-{os.getpid()}")
            copy_file(plan.staging / name, temp, progress)
            staged.append((temp, final))
    except BaseException:
        for temp, _final in staged:
            with contextlib.suppress(OSError):
                temp.unlink()
        for directory in reversed(created_dirs):
            with contextlib.suppress(OSError):
                directory.rmdir()
        raise
    return staged


def place(
    staging: str | os.PathLike,
    destination: str | os.PathLike,
    *,
    overwrite: bool = False,
    remove_stale: bool = False,
    progress: Callable[[int], None] | None = None,
) -> PlacementResult:
    """Copies a written output (index, its shards, changed non-tensor files) from ``staging``
    into ``destination`` (created if missing). ``overwrite`` must be True when any destination
    file would be replaced; ``remove_stale`` removes the destination's ``*.safetensors`` files
    the new index does not reference. The staging directory is never changed."""
    plan = plan_placement(staging, destination)
    return execute_placement(plan, overwrite=overwrite, remove_stale=remove_stale, progress=progress)


def terminal_attached() -> bool:
    """Whether the user can answer prompts: stdin and stdout are a terminal."""
    return sys.stdin.isatty() and sys.stdout.isatty()


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
    if _same_dir(destination, staging):
        return _keep(staging)
    plan = plan_placement(staging, destination)
    if plan.replaced:
        say(f"Placing into {destination} would replace {_count(plan.replaced, 'file')}:")
        _print_names(plan.replaced)
        if not yes:
            if not interactive:
                raise PlacementError(
                    f"{destination}: would replace {_count(plan.replaced, 'file')} and nothing confirmed it; "
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
            f"{_count(plan.stale, 'shard file')} in {destination} not referenced by the new index (engines "
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


def check_place_option(place: str | None, staging: str | os.PathLike) -> None:
    """Rejects a ``--place`` directory that can never work (inside the staging directory, or a
    file) before the long write starts, rather than after it. Raises ``PlacementError``."""
    if place in (None, "keep", "source"):
        return
    destination, staging = Path(place).expanduser(), Path(staging)
    if destination.resolve() != staging.resolve():
        refuse_unusable_destination(destination, staging, f"--place {place}", "output directory")


def refuse_unusable_destination(destination: Path, staging: Path, shown: str, staging_role: str) -> None:
    """A destination inside the staging directory, or a file, can never receive a placement.
    ``shown`` and ``staging_role`` are how the user knows the two. Raises ``PlacementError``."""
    if destination.resolve().is_relative_to(staging.resolve()):
        raise PlacementError(
            f"{shown}: lies inside the {staging_role} {staging}; choose a directory outside it",
            "placement_inside_staging",
            destination,
        )
    if destination.exists() and not destination.is_dir():
        raise PlacementError(f"{shown}: not a directory", "not_a_directory", destination)


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


def _same_dir(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()


def report_placement(result: PlacementResult) -> None:
    """Tells the user where the weights are now and what is left for them to do."""
    what = f"{len(result.copied)} files ({format_bytes(result.copied_bytes)})"
    say(f"Copied {what} to {result.destination} in {result.seconds:.1f} s.")
    if result.replaced:
        say(f"Replaced: {_short_list(result.replaced)}")
    if result.stale_removed:
        say(f"Removed stale shards: {_short_list(result.stale_removed)}")
    if result.stale_left:
        say(f"Left unreferenced shards in place: {_short_list(result.stale_left)}")
        if SINGLE_FILE in result.stale_left:
            _warn_single_file(result.destination)
    say("The staging directory is unchanged; delete it yourself once you no longer need it.")


def _warn_single_file(destination: Path) -> None:
    say(
        f"warning: transformers loads {SINGLE_FILE} in preference to {INDEX_FILE}: "
        f"remove {destination / SINGLE_FILE} to load the new weights",
        style="yellow",
    )


def say(message: str, style: str = "") -> None:
    """Prints one message on stdout as plain text: paths and tensor names may contain ``[``,
    which must never be read as markup."""
    console.print(Text(message, style=style))


def _print_names(names: list[str]) -> None:
    for name in names:
        say(f"    {name}")


def _count(items: list[str], noun: str) -> str:
    return f"{len(items)} {noun}" + ("" if len(items) == 1 else "s")


def _short_list(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown}, … ({len(names) - limit} more)"


def _sync_dir(directory: Path) -> None:
    """Makes renames and removals in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
