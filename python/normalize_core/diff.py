"""``diff``: how two checkpoints' tensors relate, from headers and indexes alone.

Used on its own (``normalize diff``) and as the first step of ``merge``: which tensors only the
extra checkpoint has (what a merge adds), which both have (base wins), and which of those
disagree in dtype or shape (base still wins, but a user merging them must know). No tensor data
is read. Also here: which non-tensor files of one directory are missing from, or differ in,
another (what ``merge`` leaves out and what ``place`` has to copy).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from normalize_core._core import Checkpoint, files_equal, list_aux_files


@dataclass(frozen=True)
class TensorConflict:
    """A tensor both checkpoints hold with a different dtype or shape."""

    name: str
    base_dtype: str
    base_shape: list[int]
    extra_dtype: str
    extra_shape: list[int]

    def describe(self) -> str:
        """``name: BF16 [4, 8] in base, F8_E4M3 [4, 8] in extra``."""
        return (
            f"{self.name}: {self.base_dtype} {self.base_shape} in base, {self.extra_dtype} {self.extra_shape} in extra"
        )


@dataclass
class CheckpointDiff:
    """The tensor-level comparison of a base and an extra checkpoint.

    ``extra_only`` is in the extra checkpoint's order (the order a merge writes them);
    ``overlap`` and ``conflicts`` are sorted by name.
    """

    base: Path
    extra: Path
    base_count: int
    extra_count: int
    extra_only: list[str]
    extra_only_bytes: int
    overlap: list[str]
    conflicts: list[TensorConflict] = field(default_factory=list)

    @property
    def base_only_count(self) -> int:
        """Tensors only the base holds."""
        return self.base_count - len(self.overlap)

    def as_dict(self) -> dict[str, Any]:
        """The ``normalize diff --json`` object: sorted name lists and counts."""
        return {
            "base": str(self.base),
            "extra": str(self.extra),
            "base_count": self.base_count,
            "extra_count": self.extra_count,
            "extra_only": sorted(self.extra_only),
            "extra_only_bytes": self.extra_only_bytes,
            "overlap": self.overlap,
            "conflicts": [c.name for c in self.conflicts],
        }


def diff(base: str | os.PathLike | Checkpoint, extra: str | os.PathLike | Checkpoint) -> CheckpointDiff:
    """Compares two checkpoints (directories or open ``Checkpoint``s) by their headers: O(tensors),
    no tensor data read. Raises ``NormalizeError`` when either cannot be opened."""
    base_ckpt = base if isinstance(base, Checkpoint) else Checkpoint.open(Path(base))
    extra_ckpt = extra if isinstance(extra, Checkpoint) else Checkpoint.open(Path(extra))
    base_tensors = {t.name: t for t in base_ckpt.tensors}
    extra_only: list[str] = []
    extra_only_bytes = 0
    overlap: list[str] = []
    conflicts: list[TensorConflict] = []
    for tensor in extra_ckpt.tensors:
        ours = base_tensors.get(tensor.name)
        if ours is None:
            extra_only.append(tensor.name)
            extra_only_bytes += tensor.nbytes
            continue
        overlap.append(tensor.name)
        if ours.dtype != tensor.dtype or ours.shape != tensor.shape:
            conflicts.append(
                TensorConflict(tensor.name, ours.dtype, list(ours.shape), tensor.dtype, list(tensor.shape))
            )
    return CheckpointDiff(
        base=base_ckpt.dir,
        extra=extra_ckpt.dir,
        base_count=len(base_tensors),
        extra_count=len(extra_ckpt),
        extra_only=extra_only,
        extra_only_bytes=extra_only_bytes,
        overlap=sorted(overlap),
        conflicts=sorted(conflicts, key=lambda c: c.name),
    )


#: ``changed_aux_files`` statuses.
ONLY_IN_SOURCE = "new"
DIFFERS = "differs"


def changed_aux_files(source: Path, reference: Path) -> dict[str, str]:
    """Non-tensor files of ``source`` (configs, tokenizer, sub-folders; hidden entries skipped,
    as ``copy_aux_files`` does) that ``reference`` lacks (``"new"``) or holds with other bytes
    (``"differs"``), as sorted relative POSIX paths. A ``reference`` entry that is no regular file
    counts as lacking (it is never opened); a ``source`` file compared must be one: a FIFO or device
    raises ``NormalizeError`` rather than block or read forever."""
    changed: dict[str, str] = {}
    for relative in sorted(aux_file_paths(source)):
        theirs = reference / relative
        if not theirs.is_file():
            changed[relative] = ONLY_IN_SOURCE
        elif not files_equal(source / relative, theirs):
            changed[relative] = DIFFERS
    return changed


def aux_file_paths(directory: Path) -> Iterator[str]:
    """Relative paths of every regular file among ``directory``'s aux entries, recursively."""
    for name in list_aux_files(directory):
        yield from _files_under(directory, Path(name))


def _files_under(root: Path, relative: Path) -> Iterator[str]:
    path = root / relative
    if not path.is_dir():
        yield relative.as_posix()
        return
    for child in sorted(path.iterdir()):
        if not child.name.startswith("."):
            yield from _files_under(root, relative / child.name)
