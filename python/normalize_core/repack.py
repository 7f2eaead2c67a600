"""``repack``: re-shard any safetensors checkpoint into HF's standard layout.

Headers are read, a shard plan is computed (greedy bin-packing in checkpoint order), then the
Rust writer moves tensor bytes from the source files into the new shards inside the kernel. No
tensor is ever loaded into Python, and torch is never imported (a distributed run imports
``torch.distributed`` to coordinate, and still never touches a GPU).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from normalize_core._core import Checkpoint, OutputPlan, plan_shards
from normalize_core.devices import DEFAULT_JOBS
from normalize_core.distributed import SOLO, Group, joined, run_everywhere
from normalize_core.output import RunSpec, WriteResult, write_output
from normalize_core.sizes import GIB

__all__ = ["WriteResult", "plan_repack", "repack", "write_repack"]


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
    resume: bool = False,
    distributed: bool = False,
    progress: Callable[[int], None] | None = None,
) -> WriteResult:
    """Re-shards ``source`` into ``output`` as ``model-{i:05d}-of-{n:05d}.safetensors`` shards of at
    most ``max_shard_bytes`` bytes plus ``model.safetensors.index.json``, and copies every
    non-tensor file through.

    ``resume`` finishes an interrupted run into ``output`` (see ``normalize_core.output``);
    ``distributed`` makes this process one rank of a run started by torchrun. ``progress(n)`` is
    called with bytes written since the last call. Raises ``NormalizeError`` (nothing written) on
    corrupt input or an output that is, contains or lies in the source.
    """
    with joined(distributed) as group:
        checkpoint, plan = run_everywhere(group, lambda: plan_repack(source, max_shard_bytes))
        return write_repack(
            checkpoint, plan, output, jobs=jobs, overwrite=overwrite, resume=resume, group=group, progress=progress
        )


def write_repack(
    checkpoint: Checkpoint,
    plan: OutputPlan,
    output: str | os.PathLike,
    *,
    jobs: int = DEFAULT_JOBS,
    overwrite: bool = False,
    resume: bool = False,
    group: Group = SOLO,
    progress: Callable[[int], None] | None = None,
) -> WriteResult:
    """Executes a repack plan made by ``plan_repack`` (see ``repack``); ``group`` comes from
    ``distributed.joined``."""
    result = write_output(
        plan,
        output,
        RunSpec("repack", [checkpoint]),
        jobs=jobs,
        overwrite=overwrite,
        resume=resume,
        group=group,
        progress=progress,
    )
    result.ignored_files = list(checkpoint.unreferenced_files)
    return result
