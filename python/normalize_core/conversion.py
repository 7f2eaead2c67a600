"""What ``to-fp8`` and ``to-bf16`` share: both compute some output tensors from source tensors, one
source tensor at a time, copy every other tensor inside the kernel, and rewrite ``config.json``.

- Planning: ``repack_by_default`` (engine-named shards are bin-packed into standard ones, a
  standard or single-file source keeps its shard files) and ``pack`` (the plan's groups packed
  either way).
- Writing: ``write_converted`` goes through the output module (``normalize_core.output``) with a
  ``ComputedTensors`` filler made on every rank for that rank's device and share of the cores,
  and the new ``config.json`` written just before the index; ``ConversionResult`` holds what both
  report about the write.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from normalize_core._core import Checkpoint, OutputPlan, PlanBuilder, TensorGroup
from normalize_core.distributed import SOLO, Group, device_for_rank, kernel_threads, run_everywhere
from normalize_core.kinds import Layout, Naming
from normalize_core.output import RunSpec, write_output
from normalize_core.shard_filling import Advance, ComputedTensors


def repack_by_default(checkpoint: Checkpoint) -> bool:
    """Whether a conversion bin-packs when not told: yes for engine-named shards, no for a
    standard or single-file source (its shard files are kept)."""
    return not (checkpoint.has_standard_names or checkpoint.layout == Layout.SINGLE_FILE)


def pack(
    builder: PlanBuilder, groups: list[TensorGroup], repack: bool, max_shard_bytes: int, naming: Naming
) -> OutputPlan:
    """The plan of ``groups``: bin-packed in order into shards of at most ``max_shard_bytes``
    (``repack``), or each group in the shard of its home tensor's source file; shards named by
    ``naming``."""
    if repack:
        builder.pack_greedy(groups, max_shard_bytes)
    else:
        builder.pack_by_source_file(groups)
    return builder.finish(naming)


@dataclass(kw_only=True)
class ConversionResult:
    """What a conversion wrote (``Fp8Result`` and ``Bf16Result`` add their own counts)."""

    output: Path
    shards: list[str]
    #: Tensor bytes of the source and of the output (its ``total_size``).
    bytes_before: int
    bytes_after: int
    #: Where the tensors were computed (``cpu``, ``cuda:0``).
    device: str
    seconds: float
    aux_files: list[str] = field(default_factory=list)
    #: ``(path, reason)`` of source symlinks not copied (they lead outside the source, or nowhere).
    skipped_aux: list[tuple[str, str]] = field(default_factory=list)
    removed_stale: list[str] = field(default_factory=list)
    #: Shards an interrupted earlier run had finished, kept by ``resume``.
    reused: list[str] = field(default_factory=list)


def write_converted(
    spec: RunSpec,
    plan: OutputPlan,
    output: Path,
    make_filler: Callable[[str, int], ComputedTensors],
    write_config: Callable[[], None],
    *,
    device: str,
    jobs: int,
    overwrite: bool,
    resume: bool,
    group: Group = SOLO,
    progress: Advance | None = None,
) -> dict[str, Any]:
    """Writes ``plan`` into ``output`` through ``write_output``: ``make_filler(device, threads)``
    makes this rank's filler (``device`` as ``device_for_rank`` resolves it, ``threads`` per CPU
    job), and ``write_config`` runs before the index. Returns the ``ConversionResult`` fields."""
    checkpoint = spec.checkpoints[0]
    filler = run_everywhere(group, lambda: make_filler(device_for_rank(device, group), kernel_threads(jobs, group)))
    written = write_output(
        plan,
        output,
        spec,
        fill=filler,
        jobs=jobs,
        before_index=write_config,
        overwrite=overwrite,
        resume=resume,
        group=group,
        progress=progress,
        shard_work=filler.shard_work(plan.shards, checkpoint),
    )
    return {
        "output": written.output,
        "shards": written.shards,
        "bytes_before": checkpoint.total_size,
        "bytes_after": written.total_size,
        "device": filler.device,
        "seconds": written.seconds,
        "aux_files": written.aux_files,
        "skipped_aux": written.skipped_aux,
        "removed_stale": written.removed_stale,
        "reused": written.reused,
    }
