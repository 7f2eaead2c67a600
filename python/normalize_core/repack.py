"""``repack``: re-shard any safetensors checkpoint into HF's standard layout.

Headers are read, a shard plan is computed (greedy bin-packing in checkpoint order), then the
Rust writer moves tensor bytes from the source files into the new shards inside the kernel. No
tensor is ever loaded into Python, and torch is never imported.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from normalize_core._core import (
    Checkpoint,
    OutputPlan,
    check_separate,
    copy_aux_files,
    plan_shards,
    prepare_output_dir,
    remove_stale_shards,
)
from normalize_core.sizes import GIB

DEFAULT_JOBS = min(4, os.cpu_count() or 1)


@dataclass
class WriteResult:
    """What a finished write produced."""

    output: Path
    shards: list[str]
    tensors: int
    total_size: int
    aux_files: list[str] = field(default_factory=list)
    #: ``(path, reason)`` of source symlinks not copied (they lead outside the source, or nowhere).
    skipped_aux: list[tuple[str, str]] = field(default_factory=list)
    removed_stale: list[str] = field(default_factory=list)
    #: ``*.safetensors`` files of the source that its index does not reference, left out.
    ignored_files: list[str] = field(default_factory=list)
    seconds: float = 0.0


def plan_repack(source: str | os.PathLike, max_shard_bytes: int = 4 * GIB) -> tuple[Checkpoint, OutputPlan]:
    """Opens ``source`` and plans its repack; reads headers only."""
    checkpoint = Checkpoint.open(Path(source))
    return checkpoint, plan_shards(checkpoint, max_shard_bytes)


def repack(
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    max_shard_bytes: int = 4 * GIB,
    jobs: int = DEFAULT_JOBS,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
) -> WriteResult:
    """Re-shards ``source`` into ``output`` as ``model-{i:05d}-of-{n:05d}.safetensors`` shards of at
    most ``max_shard_bytes`` bytes plus ``model.safetensors.index.json``, and copies every
    non-tensor file through.

    ``progress(n)`` is called with bytes written since the last call. Raises ``NormalizeError``
    (nothing written) on corrupt input or an output that is, contains or lies in the source.
    """
    check_separate([Path(source)], Path(output))
    checkpoint, plan = plan_repack(source, max_shard_bytes)
    return write_repack(checkpoint, plan, output, jobs=jobs, overwrite=overwrite, progress=progress)


def write_repack(
    checkpoint: Checkpoint,
    plan: OutputPlan,
    output: str | os.PathLike,
    *,
    jobs: int = DEFAULT_JOBS,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
) -> WriteResult:
    """Executes a repack plan made by ``plan_repack`` (see ``repack``)."""
    started = time.monotonic()
    output = Path(output)
    check_separate([checkpoint.dir], output)
    with fresh_output(output, overwrite):
        plan.execute(output, jobs=jobs, progress=progress)
        result = finish_output(plan, checkpoint.dir, output, started)
    result.ignored_files = list(checkpoint.unreferenced_files)
    return result


def finish_output(
    plan: OutputPlan,
    source: Path,
    output: Path,
    started: float,
    before_index: Callable[[], None] | None = None,
) -> WriteResult:
    """After all shards are in place: aux files, ``before_index`` (e.g. rewriting config.json),
    then the index, then stale shards of an earlier run removed."""
    aux = copy_aux_files(source, output)
    if before_index is not None:
        before_index()
    plan.write_index(output)
    shards = [s.file_name for s in plan.shards]
    stale = remove_stale_shards(output, shards)
    return WriteResult(
        output=output,
        shards=shards,
        tensors=sum(len(s.tensor_names) for s in plan.shards),
        total_size=plan.total_size,
        aux_files=aux.copied,
        skipped_aux=aux.skipped,
        removed_stale=stale,
        seconds=time.monotonic() - started,
    )


class fresh_output:  # noqa: N801 - used as a context manager, reads like a function
    """Prepares the output directory; if the block fails and the directory was created for this
    run, removes it again with everything in it (all written by this run: shards completed before
    a later step such as copying aux files failed, aux files copied so far)."""

    def __init__(self, output: Path, overwrite: bool):
        self.output = output
        self.overwrite = overwrite
        self.created = False

    def __enter__(self) -> Path:
        self.created = not self.output.exists()
        prepare_output_dir(self.output, self.overwrite)
        return self.output

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and self.created:
            shutil.rmtree(self.output, ignore_errors=True)
