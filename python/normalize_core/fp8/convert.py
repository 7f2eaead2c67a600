"""``to_fp8``: a bf16/fp16/fp32 checkpoint to per-block FP8, in one streaming pass.

Planning reads headers only: the rules decide per tensor, each quantized weight becomes an FP8
tensor of the same shape plus a ``_scale_inv`` whose size is known up front, so the Rust planner
fixes every output shard, header and offset before any byte moves. Then the output module writes
the shards (``jobs`` at a time; resumable; split between ranks in a distributed run): the Rust
writer copies a shard's untouched tensors inside the kernel (on a helper thread) while a job
quantizes the others, each source tensor read one tensor ahead, its bytes handed to the writer
without a copy.

On the CPU the Rust kernel quantizes, and torch is not even imported; on a GPU, torch does (see
``quantize.py``), with the same bytes as result.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from normalize_core._core import Checkpoint, OutputPlan, PlanBuilder, TensorEntry, sha256_hex
from normalize_core.config_file import CONFIG_FILE, read_config
from normalize_core.conversion import ConversionResult, pack, repack_by_default, write_converted
from normalize_core.distributed import SOLO, Group, joined, run_everywhere
from normalize_core.engines.loadability import keep_unloadable
from normalize_core.errors import normalize_error
from normalize_core.fp8.config import (
    check_fused_groups,
    fp8_quantization_config,
    module_sets,
    write_quantized_config,
)
from normalize_core.fp8.layout import (
    DEFAULT_BLOCK_SIZE,
    FP8_WEIGHT_DTYPE,
    QuantizedLayout,
    marks_quantization,
    quantized_layout,
    scale_dtype_of,
)
from normalize_core.fp8.quantizers import quantizer_for
from normalize_core.fp8.rules import (
    Decision,
    HeuristicRules,
    PatternRules,
    ReferenceRules,
    decide_all,
    with_skip_patterns,
)
from normalize_core.kinds import Naming, ScaleDtype, ScaleFormat
from normalize_core.output import RunSpec
from normalize_core.shard_filling import ComputedTensors
from normalize_core.sizes import GIB


@dataclass
class Fp8Plan:
    """Everything ``to_fp8`` decided before writing."""

    checkpoint: Checkpoint
    #: The checkpoint's tensors, in order (one entry per decision).
    entries: list[TensorEntry]
    decisions: list[Decision]
    #: None when planned with ``build_plan=False``.
    plan: OutputPlan | None
    repacked: bool
    scale_dtype: ScaleDtype
    scale_fmt: ScaleFormat
    block_size: int
    quantization_config: dict
    #: With ``--reference``: (weights only in the source, weights only in the reference).
    reference_mismatch: tuple[list[str], list[str]] | None = None
    #: The shard size limit the plan was packed with (it changes nothing when the layout is kept).
    max_shard_bytes: int = 4 * GIB

    @property
    def quantized(self) -> list[str]:
        return [d.name for d in self.decisions if d.quantize]

    @property
    def kept(self) -> list[str]:
        return [d.name for d in self.decisions if not d.quantize]

    @functools.cached_property
    def layouts(self) -> dict[str, QuantizedLayout]:
        """The output layout of every quantized tensor."""
        return quantized_layouts(self.decisions, self.entries, self.block_size, self.scale_dtype)

    @property
    def output_bytes(self) -> int:
        """Tensor bytes of the output (what its ``total_size`` will be)."""
        layouts = self.layouts
        return sum(layouts[entry.name].nbytes if entry.name in layouts else entry.nbytes for entry in self.entries)


@dataclass(kw_only=True)
class Fp8Result(ConversionResult):
    """What ``to_fp8`` wrote."""

    #: Tensors quantized, and tensors kept as they were.
    quantized: int
    kept: int
    #: False when the source had no config.json (so no quantization_config was written).
    config_written: bool


def refuse_quantized_source(checkpoint: Checkpoint, entries: list[TensorEntry]) -> None:
    """An FP8 (or otherwise scaled) source cannot be quantized again."""
    for entry in entries:
        if marks_quantization(entry.name, entry.dtype):
            raise normalize_error(
                "already_quantized",
                f"{checkpoint.dir}: tensor '{entry.name}' ({entry.dtype}) shows the checkpoint is already quantized; "
                "to-fp8 needs a bf16/fp16/fp32 source",
                file=entry.file,
                tensor=entry.name,
            )


def choose_rules(reference, quantize_patterns: Sequence[str], skip_patterns: Sequence[str]):
    """Reference rules, else user patterns, else the built-in heuristic; skip patterns on top."""
    if reference is not None and quantize_patterns:
        raise ValueError("give --reference or --quantize-pattern, not both")
    if reference is not None:
        rules = ReferenceRules.from_dir(Path(reference))
    elif quantize_patterns:
        rules = PatternRules(quantize_patterns)
    else:
        rules = HeuristicRules()
    return with_skip_patterns(rules, skip_patterns) if skip_patterns else rules, rules


def decide(
    entries: list[TensorEntry],
    rules,
    *,
    loadable_at: Sequence[int] = (1,),
    config: dict | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> tuple[list[Decision], set[str]]:
    """A decision per source tensor, in checkpoint order, and the modules whose weight stays
    unquantized; split fused groups are an error. Layers an engine could not load as FP8 at a TP
    size in ``loadable_at`` stay unquantized (``engines.loadability``); ``()`` turns that off."""
    decisions = decide_all(((t.name, t.dtype, t.shape) for t in entries), rules)
    if loadable_at:
        decisions = keep_unloadable(entries, decisions, config, loadable_at, block_size=block_size)
    dtypes = {t.name: t.dtype for t in entries}
    fp8, kept = module_sets(
        (d.name for d in decisions if d.quantize), (d.name for d in decisions if not d.quantize), dtypes
    )
    check_fused_groups(fp8, kept)
    return decisions, kept


def plan_fp8(
    source: str | os.PathLike,
    *,
    reference: str | os.PathLike | None = None,
    quantize_patterns: Sequence[str] = (),
    skip_patterns: Sequence[str] = (),
    repack: bool | None = None,
    max_shard_bytes: int = 4 * GIB,
    scale_fmt: ScaleFormat | str = ScaleFormat.FLOAT,
    scale_dtype: ScaleDtype | str | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    build_plan: bool = True,
    loadable_at: Sequence[int] = (1,),
    allow_unloadable: bool = False,
) -> Fp8Plan:
    """Decides and plans a conversion from headers alone.

    With ``build_plan=False`` (dry runs) only the decisions are made: ``plan`` is None.
    ``repack=None`` keeps a standard or single-file source's shard layout and bin-packs other
    (engine-named) layouts into ``model-{i:05d}-of-{n:05d}`` shards; ``True`` always bin-packs,
    ``False`` always keeps the source's files. ``scale_fmt`` is a ``ScaleFormat`` ("float" or
    "ue8m0"); ``scale_dtype`` a ``ScaleDtype`` ("float32" or "bfloat16"), by default the
    reference's, else float32. A value outside those raises ``ValueError`` naming the allowed ones.
    Layers vLLM could not load as FP8 at a TP size in ``loadable_at`` stay unquantized unless
    ``allow_unloadable``.
    """
    scale_fmt, scale_dtype = checked_scale_options(scale_fmt, scale_dtype, block_size)
    checkpoint = Checkpoint.open(Path(source))
    entries = checkpoint.tensors
    refuse_quantized_source(checkpoint, entries)
    rules, base_rules = choose_rules(reference, quantize_patterns, skip_patterns)
    decisions, kept_modules = decide(
        entries,
        rules,
        loadable_at=() if allow_unloadable else loadable_at,
        config=read_config(checkpoint.dir),
        block_size=block_size,
    )
    if scale_dtype is None:
        scale_dtype = scale_dtype_of(getattr(base_rules, "scale_dtype", None)) or ScaleDtype.FLOAT32
    repack = repack_by_default(checkpoint) if repack is None else repack
    fp8 = Fp8Plan(
        checkpoint=checkpoint,
        entries=entries,
        decisions=decisions,
        plan=None,
        repacked=repack,
        scale_dtype=scale_dtype,
        scale_fmt=scale_fmt,
        block_size=block_size,
        quantization_config=fp8_quantization_config(sorted(kept_modules), block_size=block_size, scale_fmt=scale_fmt),
        reference_mismatch=reference_mismatch(base_rules, entries),
        max_shard_bytes=max_shard_bytes,
    )
    if build_plan:
        fp8.plan = build_output_plan(checkpoint, decisions, fp8.layouts, repack, max_shard_bytes)
    return fp8


def reference_mismatch(rules, entries: list[TensorEntry]) -> tuple[list[str], list[str]] | None:
    """With ``--reference``: (weights only in the source, weights only in the reference)."""
    return rules.compare(t.name for t in entries) if isinstance(rules, ReferenceRules) else None


def checked_scale_options(
    scale_fmt: ScaleFormat | str, scale_dtype: ScaleDtype | str | None, block_size: int
) -> tuple[ScaleFormat, ScaleDtype | None]:
    """The scale options as ``kinds`` members; ``ValueError`` naming the allowed values otherwise."""
    scale_fmt = ScaleFormat(scale_fmt)
    scale_dtype = None if scale_dtype is None else ScaleDtype(scale_dtype)
    if block_size <= 0:
        raise ValueError("block size must be positive")
    return scale_fmt, scale_dtype


def quantized_layouts(
    decisions: list[Decision], entries: list[TensorEntry], block_size: int, scale_dtype: ScaleDtype
) -> dict[str, QuantizedLayout]:
    """The output layout of every tensor decided to be quantized."""
    return {
        d.name: quantized_layout(d.name, entry.shape, block_size, scale_dtype)
        for d, entry in zip(decisions, entries, strict=True)
        if d.quantize
    }


def build_output_plan(
    checkpoint: Checkpoint,
    decisions: list[Decision],
    layouts: dict[str, QuantizedLayout],
    repack: bool,
    max_shard_bytes: int,
) -> OutputPlan:
    """Every kept tensor copied; every quantized one an FP8 weight and its scale, in one group."""
    builder = PlanBuilder([checkpoint])
    groups = []
    for decision in decisions:
        layout = layouts.get(decision.name)
        if layout is None:
            groups.append(builder.group([builder.copied(decision.name)]))
            continue
        weight = builder.provided(layout.name, FP8_WEIGHT_DTYPE, list(layout.shape))
        scale = builder.provided(layout.scale_name, layout.scale_tensor_dtype, list(layout.scale_shape))
        groups.append(builder.group([weight, scale], home=decision.name))
    return pack(builder, groups, repack, max_shard_bytes, Naming.STANDARD if repack else Naming.SOURCE)


def to_fp8(
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    device: str = "auto",
    jobs: int = 1,
    overwrite: bool = False,
    resume: bool = False,
    distributed: bool = False,
    progress: Callable[[int], None] | None = None,
    **plan_options,
) -> Fp8Result:
    """Converts ``source`` to block FP8 in ``output`` (see ``plan_fp8`` for the options):
    FP8 weights with ``_scale_inv`` companions, a fresh index, ``config.json`` with its
    ``quantization_config``, every other file copied. ``progress(n)`` receives source bytes done.
    ``jobs`` shards are quantized at a time (on the CPU, the cores are shared between them);
    ``resume`` finishes an interrupted run into ``output``; ``distributed`` makes this process one
    rank of a run started by torchrun (see ``write_fp8``).
    """
    with joined(distributed) as group:
        fp8 = run_everywhere(group, lambda: plan_fp8(source, **plan_options))
        return write_fp8(
            fp8, output, device=device, jobs=jobs, overwrite=overwrite, resume=resume, group=group, progress=progress
        )


def write_fp8(
    fp8: Fp8Plan,
    output: str | os.PathLike,
    *,
    device: str = "auto",
    jobs: int = 1,
    overwrite: bool = False,
    resume: bool = False,
    group: Group = SOLO,
    progress: Callable[..., None] | None = None,
) -> Fp8Result:
    """Executes a plan made by ``plan_fp8``. ``progress(n_bytes, items=0)`` receives source bytes
    done and, per quantized tensor, ``items=1``. In a distributed run (``group`` from
    ``distributed.joined``) each rank quantizes its own shards on ``cuda:LOCAL_RANK`` where
    ``device`` is ``auto`` (with a GPU) or ``cuda``, else with the CPU kernel."""
    output = Path(output)
    source_config = fp8.checkpoint.dir / CONFIG_FILE
    written = write_converted(
        RunSpec("to-fp8", [fp8.checkpoint], run_options(fp8)),
        fp8.plan,
        output,
        lambda rank_device, threads: fp8_filler(fp8, rank_device, threads),
        lambda: write_quantized_config(source_config, output / CONFIG_FILE, fp8.quantization_config),
        device=device,
        jobs=jobs,
        overwrite=overwrite,
        resume=resume,
        group=group,
        progress=progress,
    )
    return Fp8Result(
        **written,
        quantized=len(fp8.layouts),
        kept=len(fp8.decisions) - len(fp8.layouts),
        config_written=source_config.is_file(),
    )


def run_options(fp8: Fp8Plan) -> dict[str, object]:
    """What changes to-fp8's bytes beyond the planned headers, for the run record: the scale
    format (same shapes, other values), and, to name the cause, the other scale settings, the
    layout and which tensors become FP8."""
    quantized = sorted(fp8.layouts)
    digest = sha256_hex("\n".join(quantized).encode())[:16]
    return {
        "scale_fmt": str(fp8.scale_fmt),
        "scale_dtype": str(fp8.scale_dtype),
        "block_size": fp8.block_size,
        "repack": fp8.repacked,
        "max_shard_bytes": fp8.max_shard_bytes if fp8.repacked else None,
        "tensors_to_fp8": f"{len(quantized)} tensors (sha256 {digest})",
    }


class Fp8Converter:
    """Quantizes one source weight into its FP8 bytes and scale (a ``shard_filling.Converter``)."""

    def __init__(self, quantizer, layouts: dict[str, QuantizedLayout]):
        self.quantizer = quantizer
        self.layouts = layouts
        self.device = quantizer.device
        self.load = quantizer.load

    def convert(self, loaded, name: str) -> list[tuple[str, object]]:
        layout = self.layouts[name]
        fp8_bytes, scale_bytes = self.quantizer.quantize(loaded, layout)
        return [(name, fp8_bytes), (layout.scale_name, scale_bytes)]


def fp8_filler(fp8: Fp8Plan, device: str, threads: int) -> ComputedTensors:
    """The filler that quantizes each shard's weights on ``device``, one quantizer per job."""
    inputs = [[name for name in shard.provided if name in fp8.layouts] for shard in fp8.plan.shards]
    return ComputedTensors(
        inputs,
        lambda: Fp8Converter(quantizer_for(device, fp8, threads=threads), fp8.layouts),
        lambda name: fp8.checkpoint.tensor(name).nbytes,
    )
