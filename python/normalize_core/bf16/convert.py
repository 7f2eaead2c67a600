"""``to_bf16``: a block-FP8 checkpoint back to bf16 (or float16/float32), in one streaming pass.

Planning reads headers and ``config.json`` only: the format is recognised, every FP8 weight is
paired with its scale (a missing, orphaned or misshapen scale stops here, before any byte is
written), and the Rust planner fixes every output shard, header and offset: each FP8 weight becomes
a provided tensor of the same shape in the output dtype, scales and activation scales are left out,
every other tensor is copied. Then the output module writes the shards (``jobs`` at a time;
resumable; split between ranks in a distributed run): the Rust writer copies a shard's untouched
tensors inside the kernel (on a helper thread) while a job dequantizes the others, each weight and
its scale read one weight ahead.

On the CPU the Rust kernel dequantizes and torch is not imported; on a GPU, torch does (see
``dequantize.py``), with the same bytes as result.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from normalize_core._core import Checkpoint, OutputPlan, PlanBuilder, TensorEntry, sha256_hex
from normalize_core.bf16.dequantizers import OUTPUT_DTYPE_NAMES, dequantizer_for
from normalize_core.bf16.formats import (
    CONFIG_KEYS,
    BlockFp8Format,
    Fp8Weight,
    TensorRoles,
    assign_roles,
    recognise_format,
)
from normalize_core.config_file import CONFIG_FILE, load_config, write_config
from normalize_core.conversion import ConversionResult, pack, repack_by_default, write_converted
from normalize_core.distributed import SOLO, Group, joined, run_everywhere
from normalize_core.errors import normalize_error
from normalize_core.kinds import Naming
from normalize_core.output import RunSpec
from normalize_core.shard_filling import ComputedTensors
from normalize_core.sizes import GIB

#: ``config.json`` keys naming the default load dtype (transformers 4 and 5), updated in place.
DTYPE_CONFIG_KEYS = ("torch_dtype", "dtype")


@dataclass
class Bf16Plan:
    """Everything ``to_bf16`` decided before writing."""

    checkpoint: Checkpoint
    format: BlockFp8Format
    #: "bfloat16", "float16" or "float32".
    dtype: str
    roles: TensorRoles
    #: Source tensors copied unchanged, in checkpoint order.
    copied: list[TensorEntry]
    plan: OutputPlan
    repacked: bool
    config: dict[str, Any]
    #: The shard size limit the plan was packed with (it changes nothing when the layout is kept).
    max_shard_bytes: int = 4 * GIB

    @property
    def source_bytes(self) -> int:
        """Source tensor bytes the write reads (dropped activation scales are never read)."""
        weights = self.roles.weights.values()
        return sum(t.nbytes for t in self.copied) + sum(
            self.checkpoint.tensor(w.name).nbytes + w.scale.nbytes for w in weights
        )

    def summary(self) -> dict[str, Any]:
        """What the conversion does, for ``--dry-run --json``: the format, the tensors dequantized,
        copied and dropped (sorted), the planned shards and the output's ``total_size``."""
        return {
            "format": self.format.method,
            "block_size": list(self.format.block),
            "dtype": self.dtype,
            "dequantize": sorted(self.roles.weights),
            "copy": sorted(t.name for t in self.copied),
            "drop_scales": sorted(self.roles.scales),
            "drop_activation_scales": sorted(self.roles.activation_scales),
            "repacked": self.repacked,
            "shards": [s.file_name for s in self.plan.shards],
            "source_total_size": self.checkpoint.total_size,
            "total_size": self.plan.total_size,
        }


@dataclass(kw_only=True)
class Bf16Result(ConversionResult):
    """What ``to_bf16`` wrote."""

    #: FP8 weights dequantized, and tensors copied unchanged.
    dequantized: int
    copied: int
    #: Scale tensors consumed and activation scales dropped.
    dropped_scales: int
    dropped_activation_scales: int


def plan_bf16(
    source: str | os.PathLike,
    *,
    dtype: str = "bfloat16",
    repack: bool | None = None,
    max_shard_bytes: int = 4 * GIB,
) -> Bf16Plan:
    """Recognises the source's block-FP8 form, pairs weights and scales, and plans the output, from
    headers and ``config.json`` alone. ``repack=None`` keeps a standard or single-file source's
    shard layout and bin-packs other (engine-named) layouts into ``model-{i:05d}-of-{n:05d}``
    shards; ``True`` always bin-packs, ``False`` always keeps the source's files. Raises
    ``ValueError`` for a bad option, ``NormalizeError`` for a source that cannot be dequantized
    (nothing is written)."""
    if dtype not in OUTPUT_DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {', '.join(OUTPUT_DTYPE_NAMES)}, not {dtype!r}")
    checkpoint = Checkpoint.open(Path(source))
    config_path = checkpoint.dir / CONFIG_FILE
    config = load_config(config_path)
    fmt = recognise_format(config, config_path)
    entries = checkpoint.tensors
    roles = assign_roles(entries, fmt, checkpoint.dir)
    if not roles.weights:
        raise normalize_error(
            "not_quantized",
            f"{checkpoint.dir}: config.json declares {fmt.method} block FP8 but no tensor is F8_E4M3; "
            "nothing to dequantize",
            file=str(checkpoint.dir),
        )
    dropped = set(roles.scales) | set(roles.activation_scales)
    copied = [t for t in entries if t.name not in roles.weights and t.name not in dropped]
    repack = repack_by_default(checkpoint) if repack is None else repack
    plan = build_output_plan(checkpoint, entries, roles, dropped, OUTPUT_DTYPE_NAMES[dtype], repack, max_shard_bytes)
    return Bf16Plan(checkpoint, fmt, dtype, roles, copied, plan, repack, config, max_shard_bytes)


def build_output_plan(
    checkpoint: Checkpoint,
    entries: list[TensorEntry],
    roles: TensorRoles,
    dropped: set[str],
    out_dtype: str,
    repack: bool,
    max_shard_bytes: int,
) -> OutputPlan:
    """Every kept tensor copied; every FP8 weight a provided tensor of its shape in ``out_dtype``,
    in the weight's source file (its scale may sit in another). A kept layout of standard names is
    renumbered in file order, so a source shard that held nothing but scales leaves no gap in
    ``-of-N`` and every other shard keeps its place."""
    builder = PlanBuilder([checkpoint])
    kept = [entry for entry in entries if entry.name not in dropped]
    if not repack:
        # Shards follow their groups' first appearance: list the groups file by file.
        kept.sort(key=lambda entry: entry.file)
    groups = []
    for entry in kept:
        if entry.name in roles.weights:
            weight = builder.provided(entry.name, out_dtype, list(entry.shape))
            groups.append(builder.group([weight], home=entry.name))
        else:
            groups.append(builder.group([builder.copied(entry.name)]))
    naming = Naming.STANDARD if repack or checkpoint.has_standard_names else Naming.SOURCE
    return pack(builder, groups, repack, max_shard_bytes, naming)


def to_bf16(
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    device: str = "auto",
    jobs: int = 1,
    overwrite: bool = False,
    resume: bool = False,
    distributed: bool = False,
    progress: Callable[..., None] | None = None,
    **plan_options,
) -> Bf16Result:
    """Dequantizes the block-FP8 checkpoint ``source`` into ``output`` (see ``plan_bf16`` for the
    options): weights in the output dtype, scales and activation scales removed, a fresh index,
    ``config.json`` without its quantization config, every other file copied.
    ``progress(n, items=0)`` receives source bytes done and, per dequantized weight, ``items=1``.
    ``jobs``, ``resume`` and ``distributed`` work as for ``to_fp8``."""
    with joined(distributed) as group:
        bf16 = run_everywhere(group, lambda: plan_bf16(source, **plan_options))
        return write_bf16(
            bf16, output, device=device, jobs=jobs, overwrite=overwrite, resume=resume, group=group, progress=progress
        )


def write_bf16(
    bf16: Bf16Plan,
    output: str | os.PathLike,
    *,
    device: str = "auto",
    jobs: int = 1,
    overwrite: bool = False,
    resume: bool = False,
    group: Group = SOLO,
    progress: Callable[..., None] | None = None,
) -> Bf16Result:
    """Executes a plan made by ``plan_bf16`` (see ``to_bf16``) through ``normalize_core.output``."""
    output = Path(output)
    written = write_converted(
        RunSpec("to-bf16", [bf16.checkpoint], run_options(bf16)),
        bf16.plan,
        output,
        lambda rank_device, threads: bf16_filler(bf16, rank_device, threads),
        lambda: write_config(output / CONFIG_FILE, dequantized_config(bf16.config, bf16.dtype)),
        device=device,
        jobs=jobs,
        overwrite=overwrite,
        resume=resume,
        group=group,
        progress=progress,
    )
    return Bf16Result(
        **written,
        dequantized=len(bf16.roles.weights),
        copied=len(bf16.copied),
        dropped_scales=len(bf16.roles.scales),
        dropped_activation_scales=len(bf16.roles.activation_scales),
    )


def run_options(bf16: Bf16Plan) -> dict[str, object]:
    """What changes to-bf16's bytes beyond the planned headers, for the run record: the block size
    and everything else read from config.json (its digest), and, to name the cause, the output
    dtype and the layout."""
    config = json.dumps(bf16.config, sort_keys=True).encode()
    return {
        "dtype": bf16.dtype,
        "block": list(bf16.format.block),
        "config_sha256": sha256_hex(config),
        "repack": bf16.repacked,
        "max_shard_bytes": bf16.max_shard_bytes if bf16.repacked else None,
    }


class Bf16Converter:
    """Dequantizes one FP8 weight with its scale (a ``shard_filling.Converter``)."""

    def __init__(self, dequantizer, weights: dict[str, Fp8Weight]):
        self.dequantizer = dequantizer
        self.weights = weights
        self.device = dequantizer.device

    def load(self, name: str):
        return self.dequantizer.load(self.weights[name])

    def convert(self, loaded, name: str) -> list[tuple[str, object]]:
        return [(name, self.dequantizer.dequantize(loaded, self.weights[name]))]


def bf16_filler(bf16: Bf16Plan, device: str, threads: int) -> ComputedTensors:
    """The filler that dequantizes each shard's FP8 weights on ``device``, one dequantizer per job."""
    weights = bf16.roles.weights
    checkpoint = bf16.checkpoint
    return ComputedTensors(
        [list(shard.provided) for shard in bf16.plan.shards],
        lambda: Bf16Converter(dequantizer_for(device, checkpoint, bf16.format.block, bf16.dtype, threads), weights),
        lambda name: checkpoint.tensor(name).nbytes + weights[name].scale.nbytes,
    )


def dequantized_config(config: dict[str, Any], dtype: str) -> dict[str, Any]:
    """``config`` without ``quantization_config`` / ``compression_config``, its load dtype
    (``torch_dtype`` / ``dtype``, where present) set to ``dtype``; every other key in its place."""
    result = {key: value for key, value in config.items() if key not in CONFIG_KEYS}
    for key in DTYPE_CONFIG_KEYS:
        if key in result:
            result[key] = dtype
    return result
