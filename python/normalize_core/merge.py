"""``merge``: out = base ∪ (extra \\ base), base wins, without re-running any conversion.

Only headers are compared (see ``diff``). Every base shard is re-emitted byte for byte under the
standard name for its position, in the base's order (a kernel copy, or a hard link), then the
tensors only the extra checkpoint holds are bin-packed into new shards after them by the same
planner and writer as ``repack``. The index is written last, so a failed merge never leaves one
behind. A quantized and an unquantized checkpoint are not merged unless asked (``allow_mixed``):
the result would hold FP8 weights or scales that its ``config.json`` does not describe.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from normalize_core._core import Checkpoint, OutputPlan, PlanBuilder
from normalize_core.devices import DEFAULT_JOBS
from normalize_core.diff import CheckpointDiff, changed_aux_files, diff
from normalize_core.distributed import SOLO, Group, joined, run_everywhere
from normalize_core.errors import normalize_error
from normalize_core.fp8.layout import SCALE_SUFFIX, marks_quantization
from normalize_core.kinds import Naming
from normalize_core.output import RunSpec, WriteResult, write_output
from normalize_core.sizes import GIB


@dataclass
class MergePlan:
    """Everything a merge will write, known before any byte moves."""

    base: Checkpoint
    extra: Checkpoint
    diff: CheckpointDiff
    plan: OutputPlan
    #: Extra's non-tensor files that the merge does not copy, relative path → ``"new"`` (base
    #: lacks it) or ``"differs"`` (base has other bytes); the user merges them by hand.
    extra_aux_left_out: dict[str, str]
    #: Why base and extra do not go together (one quantized, one not, or extra holding scales of
    #: base's weights), when ``allow_mixed`` let the merge go ahead anyway; None when they do.
    mixed_quantization: str | None = None

    @property
    def base_shards(self) -> int:
        """Output shards that are base files re-emitted whole (the first ones)."""
        return len(self.base.files)

    @property
    def new_shards(self) -> int:
        """Output shards holding the extra-only tensors (after the base ones)."""
        return len(self.plan.shards) - self.base_shards


@dataclass
class MergeResult:
    """What a finished merge wrote."""

    written: WriteResult
    diff: CheckpointDiff
    base_shards: int
    new_shards: int
    #: Base shards hard-linked (with ``hardlink=True``).
    linked: int = 0
    #: Base shards copied although a link was asked for, with the reason (e.g. another file system).
    link_fallbacks: list[tuple[str, str]] = field(default_factory=list)
    extra_aux_left_out: dict[str, str] = field(default_factory=dict)


def plan_merge(
    base: str | os.PathLike,
    extra: str | os.PathLike,
    max_shard_bytes: int = 4 * GIB,
    *,
    allow_mixed: bool = False,
) -> MergePlan:
    """Opens both checkpoints, compares them and plans the merged shards; reads headers only.

    Raises ``NormalizeError`` (kind ``mixed_quantization``) when one checkpoint is quantized (FP8
    weights or scale tensors) and the other is not, or when extra adds scales of base's weights,
    unless ``allow_mixed``; the plan then says why in ``mixed_quantization``.
    """
    base_ckpt = Checkpoint.open(Path(base))
    extra_ckpt = Checkpoint.open(Path(extra))
    comparison = diff(base_ckpt, extra_ckpt)
    mixed = mixed_quantization(base_ckpt, extra_ckpt, comparison)
    if mixed is not None and not allow_mixed:
        raise normalize_error(
            "mixed_quantization", f"{mixed}; pass --allow-mixed to merge anyway", file=str(extra_ckpt.dir)
        )
    builder = PlanBuilder([base_ckpt, extra_ckpt])
    for file_name in base_shard_order(base_ckpt):
        builder.whole_file(file_name, checkpoint=0)
    if comparison.extra_only:
        # One group per tensor, in the extra's order: source-contiguous tensors stay contiguous.
        groups = [builder.group([builder.copied(name, checkpoint=1)]) for name in comparison.extra_only]
        builder.pack_greedy(groups, max_shard_bytes)
    return MergePlan(
        base=base_ckpt,
        extra=extra_ckpt,
        diff=comparison,
        plan=builder.finish(naming=Naming.STANDARD),
        extra_aux_left_out=changed_aux_files(extra_ckpt.dir, base_ckpt.dir),
        mixed_quantization=mixed,
    )


def base_shard_order(checkpoint: Checkpoint) -> list[str]:
    """Base's shard files in the order they are re-emitted: the natural order of their names
    (``model-00002-of-00004`` before ``model-00004-of-00004``, ``rank2`` before ``rank10``). An
    index's own order says nothing: transformers sorts its keys, so the shard holding
    ``lm_head.weight`` would come first."""
    return sorted(checkpoint.files, key=_natural_key)


def _natural_key(name: str) -> list[int | str]:
    return [int(part) if part.isdigit() else part for part in re.split(r"([0-9]+)", name)]


def mixed_quantization(base: Checkpoint, extra: Checkpoint, comparison: CheckpointDiff) -> str | None:
    """Why merging these two would mix quantized and unquantized tensors, or None when it would
    not: one holds FP8 weights or scale tensors and the other none, or extra adds scales of
    weights only base holds (they would be orphans beside base's unquantized weights)."""
    base_marks = [t.name for t in base.tensors if marks_quantization(t.name, t.dtype)]
    extra_marks = [t.name for t in extra.tensors if marks_quantization(t.name, t.dtype)]
    if bool(base_marks) != bool(extra_marks):
        quantized, plain, marks = ("base", "extra", base_marks) if base_marks else ("extra", "base", extra_marks)
        return (
            f"{quantized} is quantized ({len(marks)} FP8 or scale tensors, e.g. '{marks[0]}') and {plain} is not: "
            "the merge would hold FP8 weights or scales its config.json does not describe"
        )
    base_names = set(base.names())
    scales_of_base = [name for name in comparison.extra_only if _scaled_weight(name) in base_names]
    if scales_of_base:
        return (
            f"extra adds {len(scales_of_base)} scale tensors of base's weights (e.g. '{scales_of_base[0]}'), "
            "which base does not quantize"
        )
    return None


def _scaled_weight(name: str) -> str | None:
    """The weight a scale tensor belongs to (``x.weight_scale_inv`` and compressed-tensors'
    ``x.weight_scale`` → ``x.weight``), or None for other names."""
    for suffix in (SCALE_SUFFIX, "_scale"):
        if name.endswith(suffix):
            return name.removesuffix(suffix)
    return None


def merge(
    base: str | os.PathLike,
    extra: str | os.PathLike,
    out: str | os.PathLike,
    *,
    max_shard_bytes: int = 4 * GIB,
    hardlink: bool = False,
    jobs: int = DEFAULT_JOBS,
    overwrite: bool = False,
    allow_mixed: bool = False,
    resume: bool = False,
    distributed: bool = False,
    progress: Callable[[int], None] | None = None,
) -> MergeResult:
    """Writes base ∪ (extra \\ base) to ``out``: base shards re-emitted in base order as
    ``model-{i:05d}-of-{n:05d}.safetensors`` (hard-linked with ``hardlink``, copied where a link
    is impossible), then the extra-only tensors packed into shards of at most ``max_shard_bytes``,
    base's non-tensor files, and a fresh index.

    Where both hold a tensor, base's is kept even if dtype or shape differ (see ``diff``).
    ``resume`` finishes an interrupted merge into ``out``; ``distributed`` makes this process one
    rank of a run started by torchrun. Raises ``NormalizeError`` (nothing left behind) on corrupt
    input, an ``out`` that is, contains or lies in base or extra, or quantized and unquantized
    checkpoints unless ``allow_mixed`` (see ``plan_merge``).
    """
    with joined(distributed) as group:
        planned = run_everywhere(group, lambda: plan_merge(base, extra, max_shard_bytes, allow_mixed=allow_mixed))
        return write_merge(
            planned,
            out,
            hardlink=hardlink,
            jobs=jobs,
            overwrite=overwrite,
            resume=resume,
            group=group,
            progress=progress,
        )


def write_merge(
    planned: MergePlan,
    out: str | os.PathLike,
    *,
    hardlink: bool = False,
    jobs: int = DEFAULT_JOBS,
    overwrite: bool = False,
    resume: bool = False,
    group: Group = SOLO,
    progress: Callable[[int], None] | None = None,
) -> MergeResult:
    """Executes a plan made by ``plan_merge`` (see ``merge``); ``group`` comes from
    ``distributed.joined``."""
    written = write_output(
        planned.plan,
        out,
        RunSpec("merge", [planned.base, planned.extra]),
        jobs=jobs,
        hardlink=hardlink,
        overwrite=overwrite,
        resume=resume,
        group=group,
        progress=progress,
    )
    return MergeResult(
        written=written,
        diff=planned.diff,
        base_shards=planned.base_shards,
        new_shards=planned.new_shards,
        linked=written.linked,
        link_fallbacks=written.link_fallbacks,
        extra_aux_left_out=planned.extra_aux_left_out,
    )
