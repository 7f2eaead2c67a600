"""``to-bf16``: dequantize a block-FP8 checkpoint back to bf16 (or float16/float32). torch is imported
only for a GPU run; the library code only when the command runs."""

import json
from pathlib import Path
from typing import Annotated

import typer

from normalize_core.cli.application import (
    ConversionJobsOpt,
    DeviceOpt,
    DistributedOpt,
    MaxShardOpt,
    NoRepackOpt,
    OptionalOutputOpt,
    OverwriteOpt,
    PlaceOpt,
    QuietOpt,
    RepackOpt,
    ResumeOpt,
    ShardGbOpt,
    SourceOpt,
    YesOpt,
    app,
    check_dry_run_options,
    check_write_mode,
    failed,
    repack_choice,
    shard_limit,
)
from normalize_core.cli.console import print_table, say, write_line
from normalize_core.cli.summaries import print_conversion, print_reused, print_skipped_aux
from normalize_core.sizes import format_bytes
from normalize_core.words import plural


def print_bf16_plan(bf16) -> None:
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


@app.command("to-bf16", short_help="Dequantize a block-FP8 checkpoint back to bf16.")
def to_bf16_command(
    source: SourceOpt,
    output: OptionalOutputOpt = None,
    dtype: Annotated[
        str, typer.Option("--dtype", help="Output dtype of the dequantized weights: bfloat16, float16 or float32.")
    ] = "bfloat16",
    device: DeviceOpt = "auto",
    no_repack: NoRepackOpt = False,
    repack: RepackOpt = False,
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
    jobs: ConversionJobsOpt = 1,
    overwrite: OverwriteOpt = False,
    resume: ResumeOpt = False,
    distributed: DistributedOpt = False,
    quiet: QuietOpt = False,
    place: PlaceOpt = None,
    yes: YesOpt = False,
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

    --output is a staging area: afterwards you choose (on a terminal, or with --place) whether
    the weights stay there, are copied into --source, or are copied to another directory.
    """
    layout = repack_choice(repack, no_repack)
    if dtype not in ("bfloat16", "float16", "float32"):
        raise typer.BadParameter("--dtype must be bfloat16, float16 or float32")
    check_dry_run_options(output, dry_run, as_json)
    limit = shard_limit(shard_size_gb, max_shard_size)
    check_write_mode(overwrite, resume)
    from normalize_core._core import NormalizeError
    from normalize_core.bf16.convert import plan_bf16
    from normalize_core.cli.placement import check_place_option, place_output
    from normalize_core.distributed import joined, run_everywhere

    try:
        with joined(distributed) as group:
            if not dry_run:
                check_place_option(place, output)
            bf16 = run_everywhere(group, lambda: plan_bf16(source, dtype=dtype, repack=layout, max_shard_bytes=limit))
            if dry_run:
                if group.rank == 0:
                    print_dry_run(bf16, as_json)
                return
            result = write_with_progress(bf16, output, device, jobs, overwrite, resume, group, quiet)
    except (NormalizeError, ValueError) as e:
        raise failed(e) from None
    if group.rank == 0:
        print_result(result, bf16)
        place_output(result.output, source, place, yes, quiet=quiet, group=group)


def print_dry_run(bf16, as_json: bool) -> None:
    """The plan, as a table or (``--json``) one JSON object."""
    if as_json:
        print(json.dumps(bf16.summary()))
    else:
        print_bf16_plan(bf16)
        note_dropped_activation_scales(bf16)


def write_with_progress(bf16, output: Path, device: str, jobs: int, overwrite: bool, resume: bool, group, quiet: bool):
    """``write_bf16`` on the device this rank dequantizes on, with a progress bar on rank 0."""
    from normalize_core.bf16.convert import write_bf16
    from normalize_core.bf16.dequantizers import dequantizer_for
    from normalize_core.cli.progress import byte_progress, progress_label
    from normalize_core.distributed import device_for_rank, run_everywhere

    def target() -> str:
        return dequantizer_for(device_for_rank(device, group), bf16.checkpoint, bf16.format.block, bf16.dtype).device

    on = run_everywhere(group, target)
    progress = byte_progress(
        bf16.source_bytes,
        progress_label("to-bf16", on, group.world_size),
        enabled=not quiet and group.rank == 0,
        items_total=len(bf16.roles.weights),
        items_label="dequantized",
    )
    with progress as advance:
        return write_bf16(
            bf16, output, device=on, jobs=jobs, overwrite=overwrite, resume=resume, group=group, progress=advance
        )


def print_result(result, bf16) -> None:
    """What the conversion did, and what it left out."""
    print_conversion(
        result,
        f"{plural(result.dequantized, 'FP8 weight')} to {bf16.dtype}, {plural(result.copied, 'tensor')} copied, "
        f"{plural(result.dropped_scales, 'scale')} removed",
    )
    print_reused(result.reused)
    note_dropped_activation_scales(bf16)
    print_skipped_aux(result.skipped_aux)
