"""Placement: a write's output directory is a staging area; this copies its result to its final home.

After ``repack`` or ``to-fp8`` the user chooses: keep the output where it is, copy it into the
source directory (replacing its weights in place), or copy it to another directory. What is
copied: the staging index, every shard it references, and the staging's non-tensor files that
the destination lacks or holds with other bytes (``to-fp8`` rewrites ``config.json``; placing
FP8 weights without it would give a checkpoint engines misread).

Rules, whatever the caller:

- copy, never move: nothing in the staging directory is ever changed or deleted;
- nothing is overwritten unless the caller confirmed it (``overwrite=True``) after seeing the list;
- every file is first copied next to its final place under a hidden temporary name
  (``.NAME.partial-place-PID``, fsynced); only renames then change what the destination holds;
- at every moment a crash can hit, the destination's ``config.json`` and index describe the same
  weights, and its index never names a missing, half-written or replaced shard. When nothing
  but the index and new shard files change, renaming the index is the switch. When
  ``config.json`` or other non-tensor files change too (``to-fp8``), shards the current state
  reads are replaced, or there is no index to switch, no order of renames changes two files at
  once, so ``config.json`` is first set aside (``.config.json.previous-place-PID``): without it no
  engine loads the directory at all (rather than, say, bf16 weights under an FP8 config). Then
  shards, other files and the index are renamed, stale shards removed if asked, and
  ``config.json`` (the new one, or the one set aside) comes back last. A crash inside that window
  leaves a directory that refuses to load; placing again finishes the job;
- what a killed placement left (temporary copies, a set-aside ``config.json``) is cleared by the
  next placement into the same destination: temporary copies of processes that no longer run
  (never of a live one), a set-aside ``config.json`` once ``config.json`` is back. Both are reported;
- shards of the destination that the new index does not reference ("stale") are removed only
  when asked (``remove_stale=True``), and only after the new index is in place.

``plan_placement`` / ``execute_placement`` / ``place`` take explicit answers; the prompts are the
command line's (``normalize_core.cli.placement``).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from normalize_core._core import INDEX_FILE, Checkpoint, NormalizeError, copy_file, sync_dir
from normalize_core.config_file import CONFIG_FILE
from normalize_core.diff import changed_aux_files
from normalize_core.kinds import Layout
from normalize_core.processes import process_runs
from normalize_core.words import plural, short_list

#: Crash tests set this to N: the placing process kills itself (SIGKILL) just before its N-th
#: change to the destination (each temporary copy, rename and removal), so that every state a
#: crash can leave behind is checked.
KILL_AT_STEP_ENV = "NORMALIZE_TEST_PLACE_KILL_AT"

#: Names of what a placement leaves while it runs: ``.NAME.partial-place-PID`` (a temporary copy;
#: the copy itself may still be under the core's ``temp_path_for`` name of that, ending
#: ``.partial-PID``) and ``.NAME.previous-place-PID`` (the set-aside ``config.json``).
#:
#: Not the core's ``temp_path_for`` names (``.NAME.partial-PID``), for two reasons. The set-aside
#: ``config.json`` is no temporary file but, after a crash, the only copy: it must not look like one
#: to a writer that clears temporary files from its output (``--overwrite`` removes every
#: ``.NAME.partial-PID``). And the next placement removes and reports what dead placements left in
#: a directory that is a user's checkpoint: ``place`` in the name tells its own copies from a
#: killed writer's temporary files. A copy's name still holds the core's ``.partial-`` marker, so
#: writers and cleanups treat a stale one as temporary too.
_LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?P<kind>partial|previous)-place-(?P<pid>[0-9]+)(?:\.partial-[0-9]+)?")


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
    #: What placements killed earlier had left in the destination, removed now (relative paths).
    leftovers_removed: list[str] = field(default_factory=list)
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
    if checkpoint.layout != Layout.INDEXED:
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
    is False. On an I/O failure (``NormalizeError``, or ``PlacementError`` of kind ``"io"``)
    while copying, the temporary copies are removed and the destination is as it was; one in the
    middle of the renames leaves it refusing to load (``config.json`` set aside), and says so."""
    started = time.monotonic()
    if plan.replaced and not overwrite:
        raise PlacementError(
            f"{plan.destination}: placing would replace {plural(len(plan.replaced), 'file')} "
            f"({short_list(plan.replaced)}); confirm the overwrite (--yes)",
            "placement_needs_confirmation",
            plan.destination,
        )
    created = not plan.destination.exists()
    step = _Steps()
    try:
        plan.destination.mkdir(parents=True, exist_ok=True)
        leftovers = _remove_dead_copies(plan.destination)
        staged = _stage_copies(plan, step, progress)
        removed = _commit(plan, staged, step, remove_stale)
        leftovers += _remove_set_aside_configs(plan.destination)
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
        leftovers_removed=leftovers,
        copied_bytes=plan.copy_bytes,
        seconds=time.monotonic() - started,
    )


class _Steps:
    """Counts the changes a placement makes to the destination; see ``KILL_AT_STEP_ENV``."""

    def __init__(self) -> None:
        self.kill_at = int(os.environ.get(KILL_AT_STEP_ENV) or 0)
        self.done = 0

    def __call__(self) -> None:
        self.done += 1
        if self.done == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)


def _stage_copies(plan: PlacementPlan, step: _Steps, progress: Callable[[int], None] | None) -> dict[str, Path]:
    """Copies every file, the index included, next to its final place under a hidden temporary
    name; returns name → temporary path. On failure (or Ctrl-C) removes what it copied and the
    folders it created, and re-raises."""
    staged: dict[str, Path] = {}
    created_dirs: list[Path] = []
    try:
        for name in plan.files:
            final = plan.destination / name
            for parent in reversed(final.parents):
                if parent.is_relative_to(plan.destination) and not parent.exists():
                    parent.mkdir()
                    created_dirs.append(parent)
            temp = _placement_name(final, "partial")
            step()
            copy_file(plan.staging / name, temp, progress)
            staged[name] = temp
    except BaseException:
        for temp in staged.values():
            with contextlib.suppress(OSError):
                temp.unlink()
        for directory in reversed(created_dirs):
            with contextlib.suppress(OSError):
                directory.rmdir()
        raise
    return staged


def _commit(plan: PlacementPlan, staged: dict[str, Path], step: _Steps, remove_stale: bool) -> list[str]:
    """Renames the staged copies into place in the order the module docstring explains; returns
    the stale shards removed."""
    destination = plan.destination
    config = destination / CONFIG_FILE
    index = destination / INDEX_FILE
    set_aside = None
    try:
        if config.is_file() and _config_must_be_absent(plan):
            set_aside = _placement_name(config, "previous")
            step()
            os.replace(config, set_aside)
            sync_dir(destination)
        if index.exists() and any(name in plan.replaced for name in plan.shards):
            # The old index names shards whose bytes are about to change: no index beats a wrong one.
            step()
            index.unlink()
            sync_dir(destination)
        for name in [*plan.shards, *(name for name in plan.aux_files if name != CONFIG_FILE)]:
            step()
            os.replace(staged.pop(name), destination / name)
        for directory in sorted({(destination / name).parent for name in plan.aux_files} | {destination}):
            sync_dir(directory)
        step()
        os.replace(staged.pop(INDEX_FILE), index)
        sync_dir(destination)
        removed = _remove_stale(plan, step) if remove_stale else []
        if CONFIG_FILE in staged:
            step()
            os.replace(staged.pop(CONFIG_FILE), config)
        elif set_aside is not None:
            step()
            os.replace(set_aside, config)
        sync_dir(destination)
        if set_aside is not None and set_aside.exists():
            step()
            set_aside.unlink()
    except (OSError, NormalizeError) as e:
        if set_aside is None or config.exists():
            raise
        raise PlacementError(
            f"{_failure_line(e, destination)}; the placement stopped half-way with {CONFIG_FILE} set aside as "
            f"{set_aside.name}, so nothing loads {destination}: place again to finish",
            "io",
            e.filename if isinstance(e, OSError) else e.file,
        ) from e
    finally:
        for temp in staged.values():
            with contextlib.suppress(OSError):
                temp.unlink()
    return removed


def _config_must_be_absent(plan: PlacementPlan) -> bool:
    """Whether the switch changes more than one file engines read together (see the module
    docstring): other non-tensor files, shards the current state may read, or a destination
    without an index (vLLM then reads every ``*.safetensors`` file there)."""
    replaces_shards = any(name in plan.replaced for name in plan.shards)
    return bool(plan.aux_files) or replaces_shards or not (plan.destination / INDEX_FILE).exists()


def _remove_stale(plan: PlacementPlan, step: _Steps) -> list[str]:
    """Removes the destination shards the new index (already in place) does not reference."""
    for name in plan.stale:
        step()
        (plan.destination / name).unlink()
    sync_dir(plan.destination)
    return list(plan.stale)


def _leftovers(destination: Path) -> Iterator[tuple[Path, str, str]]:
    """``(path, kind, name)`` of every leftover of a placement whose process no longer runs, in
    ``destination`` and its non-hidden sub-folders; ``kind`` is ``partial`` or ``previous``."""
    for root, dirs, files in os.walk(destination):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for file_name in sorted(files):
            match = _LEFTOVER.fullmatch(file_name)
            if match and not process_runs(int(match["pid"])):
                yield Path(root) / file_name, match["kind"], match["name"]


def _remove_dead_copies(destination: Path) -> list[str]:
    """Removes the temporary copies of killed placements (they can be large); returns their
    paths relative to ``destination``."""
    removed = []
    for path, kind, _name in _leftovers(destination):
        if kind == "partial":
            path.unlink()
            removed.append(path.relative_to(destination).as_posix())
    return removed


def _remove_set_aside_configs(destination: Path) -> list[str]:
    """Removes the ``config.json`` files killed placements set aside, where a ``config.json`` is
    back in place (otherwise the set-aside one is the only copy and stays)."""
    removed = []
    for path, kind, name in _leftovers(destination):
        if kind == "previous" and (path.parent / name).exists():
            path.unlink()
            removed.append(path.relative_to(destination).as_posix())
    return removed


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


def _placement_name(final: Path, kind: str) -> Path:
    """The hidden name of a placement's ``kind`` (``partial`` or ``previous``) file for ``final``
    (see ``_LEFTOVER`` for why it is not the core's ``temp_path_for``)."""
    return final.with_name(f".{final.name}.{kind}-place-{os.getpid()}")


def _failure_line(error: OSError | NormalizeError, fallback: Path) -> str:
    """``file: what went wrong`` for an I/O failure (``NormalizeError`` messages name their file)."""
    if isinstance(error, OSError):
        return f"{error.filename or fallback}: {error.strerror or error}"
    return str(error)
