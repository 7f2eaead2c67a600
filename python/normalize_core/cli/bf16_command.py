"""``to-bf16``: dequantize a block-FP8 checkpoint back to bf16 (or float16/float32). torch is imported
only for a GPU run; the library code only when the command runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from normalize_core.cli.app import (
    DeviceOpt,
    DistributedOpt,
    MaxShardOpt,
    OverwriteOpt,
    QuietOpt,
    ResumeOpt,
    ShardGbOpt,
    SourceOpt,
    app,
    failed,
    shard_limit,
)
from normalize_core.cli.checkpoint_commands import print_reused
from normalize_core.cli.console import print_finding, print_table, say, write_line
from normalize_core.sizes import format_bytes
from normalize_core.words import plural


def print_plan(bf16) -> None:
    """The dry run: what happens to which tensors, and the output's size and shards."""
    checkpoint = bf16.checkpoint
    nbytes = {t.name: t.nbytes for t in checkpoint.tensors}
    fp8_bytes = sum(nbytes[name] for name in bf16.roles.weights)
    copied_bytes = sum(t.nbytes for t in bf16.copied)
    dropped = bf16.roles.activation_scales
    rows = [
        (f"FP8 weights → {bf16.dtype}", len(bf16.roles.weights), fp8_bytes, bf16.plan.total_size - copied_bytes),
        ("copied unchanged", len(bf16.copied), copied_bytes, copied_bytes),
        ("scales removed", len(bf16.roles.scales), sum(nbytes[n] for n in bf16.roles.scales), 0),
        ("activation scales dropped", len(dropped), sum(nbytes[n] for n in dropped), 0),
    ]
    print_table(
        ["tensors", "count", "source bytes", "output bytes"],
        [[label, str(count), format_bytes(before), format_bytes(after)] for label, count, before, after in rows],
        right={1, 2, 3},
        title=f"to-bf16: {bf16.format.describe()}",
    )
    layout = "bin-packed into model-i-of-n shards" if bf16.repacked else "source shard layout kept"
    say(
        f"{format_bytes(checkpoint.total_size)} → {format_bytes(bf16.plan.total_size)} "
        f"in {plural(len(bf16.plan.shards), 'shard')} ({layout})"
    )


def note_dropped_activation_scales(bf16) -> None:
    """Says so when activation scales are left out (nothing reads them once the weights are bf16)."""
    dropped = bf16.roles.activation_scales
    if dropped:
        write_line(
            ("note:", "yellow"),
            f" {plural(len(dropped), 'activation scale')} (*.input_scale, e.g. {dropped[0]}) dropped: "
            "a static activation scheme means nothing without FP8 weights",
        )


@app.command("to-bf16")
def to_bf16_command(
    source: SourceOpt,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Directory to write (created; must be empty unless --overwrite)."),
    ] = None,
    dtype: Annotated[
        str, typer.Option("--dtype", help="Output dtype of the dequantized weights: bfloat16, float16 or float32.")
    ] = "bfloat16",
    device: DeviceOpt = "auto",
    no_repack: Annotated[
        bool, typer.Option("--no-repack", help="Keep the source's shard files even when their names are not standard.")
    ] = False,
    repack: Annotated[
        bool, typer.Option("--repack", help="Bin-pack into model-{i:05d}-of-{n:05d} shards even for standard sources.")
    ] = False,
    shard_size_gb: ShardGbOpt = None,
    max_shard_size: MaxShardOpt = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print what would be dequantized, copied and dropped; write nothing.")
    ] = False,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="With --dry-run: one JSON object (format, dequantize/copy/drop lists, shards, total_size).",
        ),
    ] = False,
    jobs: Annotated[
        int,
        typer.Option(
            "--jobs", "-j", min=1, help="Shards dequantized at the same time on the CPU (they share the cores)."
        ),
    ] = 1,
    overwrite: OverwriteOpt = False,
    resume: ResumeOpt = False,
    distributed: DistributedOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Dequantize a block-FP8 checkpoint (DeepSeek-V3/R1, Kimi-K2, Qwen3-FP8, MiniMax-M2, to-fp8's
    output, llm-compressor FP8_BLOCK) back to bf16, e.g. to train from it.

    Reads both scale forms: <name>_scale_inv (quant_method fp8, float32, bfloat16 or power-of-two
    scales) and compressed-tensors <module>.weight_scale; the block size comes from config.json.
    Each element becomes bf16(float32(q) * float32(s)), s its block's scale, rounded to nearest
    even: the Rust kernel on the CPU, torch on a GPU, the same bytes either way.

    Scales (and static activation scales) are removed, every other tensor is copied as is, the
    index gets the new total_size, and config.json loses its quantization_config. An FP8 weight
    without its scale, a scale without its weight, a scale of the wrong shape or an unknown
    quantization format stops the run before anything is written.
    """
    if no_repack and repack:
        raise typer.BadParameter("give --repack or --no-repack, not both")
    if dtype not in ("bfloat16", "float16", "float32"):
        raise typer.BadParameter("--dtype must be bfloat16, float16 or float32")
    if output is None and not dry_run:
        raise typer.BadParameter("--output is required unless --dry-run")
    if as_json and not dry_run:
        raise typer.BadParameter("--json goes with --dry-run")
    limit = shard_limit(shard_size_gb, max_shard_size)
    from normalize_core._core import NormalizeError
    from normalize_core.bf16.convert import plan_bf16, write_bf16
    from normalize_core.bf16.dequantizers import dequantizer_for
    from normalize_core.cli.progress import byte_progress
    from normalize_core.distributed import device_for_rank, joined, run_everywhere

    if overwrite and resume:
        raise typer.BadParameter("give --overwrite or --resume, not both")

    def plan():
        return plan_bf16(
            source, dtype=dtype, repack=True if repack else (False if no_repack else None), max_shard_bytes=limit
        )

    try:
        with joined(distributed) as group:
            lead = group.rank == 0
            bf16 = run_everywhere(group, plan)
            if dry_run:
                if lead and as_json:
                    print(json.dumps(bf16.summary()))
                elif lead:
                    print_plan(bf16)
                    note_dropped_activation_scales(bf16)
                return
            target = run_everywhere(
                group,
                lambda: (
                    dequantizer_for(device_for_rank(device, group), bf16.checkpoint, bf16.format.block, dtype).device
                ),
            )
            progress = byte_progress(
                bf16.source_bytes,
                f"to-bf16 on {target}" if group.world_size == 1 else f"to-bf16 on {group.world_size} ranks",
                enabled=not quiet and lead,
                items_total=len(bf16.roles.weights),
                items_label="dequantized",
            )
            with progress as advance:
                result = write_bf16(
                    bf16,
                    output,
                    device=target,
                    jobs=jobs,
                    overwrite=overwrite,
                    resume=resume,
                    group=group,
                    progress=advance,
                )
    except (NormalizeError, ValueError) as e:
        raise failed(e) from None
    if not lead:
        return
    say(
        f"Wrote {plural(len(result.shards), 'shard')} to {result.output} on {result.device} in {result.seconds:.1f} s: "
        f"{plural(result.dequantized, 'FP8 weight')} to {dtype}, {plural(result.copied, 'tensor')} copied, "
        f"{plural(result.dropped_scales, 'scale')} removed, "
        f"{format_bytes(result.bytes_before)} → {format_bytes(result.bytes_after)}."
    )
    print_reused(result.reused)
    note_dropped_activation_scales(bf16)
    for name, reason in result.skipped_aux:
        print_finding("warning", f"{name} not copied: {reason}")
