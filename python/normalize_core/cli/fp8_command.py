"""``to-fp8``: convert a bf16/fp16/fp32 checkpoint to per-block FP8. torch is imported only for a
GPU run; the library code only when the command runs."""

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
    fail,
    failed,
    repack_choice,
    shard_limit,
)
from normalize_core.cli.console import print_finding, print_table, say, write_line
from normalize_core.cli.summaries import print_conversion, print_reused, print_skipped_aux
from normalize_core.sizes import format_bytes
from normalize_core.words import plural


def print_decisions(fp8) -> None:
    """The dry run's table: one row per name pattern, what happens to it and what it saves."""
    from normalize_core.fp8.rules import summarize

    sizes = {t.name: t.nbytes for t in fp8.entries}
    rows = [
        [
            row["pattern"],
            "FP8" if row["quantize"] else "keep",
            row["reason"],
            str(row["count"]),
            format_bytes(row["bytes"]),
            format_bytes(row["bytes_saved"]) if row["quantize"] else "",
        ]
        for row in summarize(fp8.decisions, sizes, fp8.layouts)
    ]
    headers = ["pattern", "decision", "reason", "tensors", "bytes", "saved"]
    print_table(headers, rows, right={3, 4, 5}, title="FP8 decisions by name pattern")
    say(
        f"{plural(len(fp8.quantized), 'tensor')} to FP8, {len(fp8.kept)} kept; "
        f"{format_bytes(fp8.checkpoint.total_size)} → {format_bytes(fp8.output_bytes)} "
        f"({'bin-packed into model-i-of-n shards' if fp8.repacked else 'source shard layout kept'})"
    )


def kept_to_load(decisions) -> dict[str, str]:
    """Engine layer → why it stays unquantized so that vLLM loads the output."""
    from normalize_core.engines.loadability import kept_layers

    return {layer: f"TP {d.tp}: {d.problem}" for layer, d in kept_layers(decisions).items()}


def print_kept_to_load(decisions) -> None:
    """The layers kept unquantized so that vLLM loads the output, one line per name pattern."""
    from normalize_core.cli.check_command import print_layer_reasons

    kept = kept_to_load(decisions)
    if kept:
        say(
            f"Kept {plural(len(kept), 'layer')} unquantized so vLLM can load the output "
            "(--allow-unloadable quantizes them anyway):"
        )
        print_layer_reasons(kept)


@app.command("to-fp8", short_help="Quantize weights to per-block FP8 with _scale_inv scales.")
def to_fp8_command(
    source: SourceOpt,
    output: OptionalOutputOpt = None,
    reference: Annotated[
        Path | None,
        typer.Option(
            "--reference",
            help="An FP8 checkpoint to imitate: a tensor is quantized iff the reference has <name>_scale_inv "
            "(its index, or its headers); its scale dtype is followed.",
        ),
    ] = None,
    quantize_pattern: Annotated[
        list[str] | None,
        typer.Option(
            "--quantize-pattern", "-p", help="Regex (repeatable) of tensors to quantize; replaces the built-in rules."
        ),
    ] = None,
    skip_pattern: Annotated[
        list[str] | None,
        typer.Option("--skip-pattern", help="Regex (repeatable) of tensors to keep, on top of any rules."),
    ] = None,
    no_repack: NoRepackOpt = False,
    repack: RepackOpt = False,
    shard_size_gb: ShardGbOpt = None,
    max_shard_size: MaxShardOpt = None,
    device: DeviceOpt = "auto",
    scale_fmt: Annotated[
        str,
        typer.Option(
            "--scale-fmt", help="float (any scale) or ue8m0 (power-of-two scales; writes scale_fmt to the config)."
        ),
    ] = "float",
    scale_dtype: Annotated[
        str | None,
        typer.Option("--scale-dtype", help="float32 or bfloat16 (default: the reference's, else float32)."),
    ] = None,
    block_size: Annotated[int, typer.Option("--block-size", min=1, help="Tile edge of the per-block scales.")] = 128,
    tp: Annotated[
        list[str] | None,
        typer.Option(
            "--tp",
            metavar="N[,N...]",
            help="Also keep unquantized what vLLM could not load as FP8 at these TP sizes (repeatable or a "
            "comma list; TP 1 is always included).",
        ),
    ] = None,
    allow_unloadable: Annotated[
        bool,
        typer.Option(
            "--allow-unloadable",
            help="Quantize by the rules alone, even layers vLLM refuses as FP8 (merged partitions or MoE "
            "intermediate sizes that are not whole blocks).",
        ),
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the decisions (headers only); write nothing.")
    ] = False,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json", help="With --dry-run: one JSON object {quantize: [...], keep: [...], kept_to_load: {layer: why}}."
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
    """Quantize weights to per-block (128x128) float8_e4m3fn with float32 <name>_scale_inv scales.

    Large matmul weights become FP8; norms, routers, embeddings, lm_head, MTP fusion projections,
    vision towers, biases and linear-attention control tensors stay as they are (or follow
    --reference / --quantize-pattern / --skip-pattern). 3-D fused experts are quantized per
    expert. config.json gets a quantization_config that vLLM, SGLang and transformers read.
    A layer vLLM would refuse as FP8 at TP 1 (or at a --tp size) stays unquantized and is listed in
    modules_to_not_convert; --allow-unloadable quantizes it anyway.
    Engine-named shards are bin-packed into standard shards in the same pass unless --no-repack.

    --output is a staging area: afterwards you choose (on a terminal, or with --place) whether
    the weights stay there, are copied into --source, or are copied to another directory.
    """
    layout = repack_choice(repack, no_repack)
    check_scale_options(scale_fmt, scale_dtype)
    check_dry_run_options(output, dry_run, as_json)
    limit = shard_limit(shard_size_gb, max_shard_size)
    loadable_at = tp_sizes_to_load(tp, allow_unloadable)
    check_write_mode(overwrite, resume)
    from normalize_core._core import NormalizeError
    from normalize_core.cli.placement import check_place_option, place_output
    from normalize_core.distributed import joined, run_everywhere
    from normalize_core.fp8.convert import plan_fp8

    def plan():
        return plan_fp8(
            source,
            reference=reference,
            quantize_patterns=quantize_pattern or (),
            skip_patterns=skip_pattern or (),
            repack=layout,
            max_shard_bytes=limit,
            scale_fmt=scale_fmt,
            scale_dtype=scale_dtype,
            block_size=block_size,
            build_plan=not dry_run,
            loadable_at=loadable_at,
            allow_unloadable=allow_unloadable,
        )

    try:
        with joined(distributed) as group:
            if not dry_run:
                check_place_option(place, output)
            fp8 = run_everywhere(group, plan)
            if group.rank == 0:
                print_reference_mismatch(fp8)
            if dry_run:
                if group.rank == 0:
                    print_dry_run(fp8, as_json)
                return
            result = write_with_progress(fp8, output, device, jobs, overwrite, resume, group, quiet)
    except (NormalizeError, ValueError) as e:
        raise failed(e) from None
    if group.rank == 0:
        print_result(result, fp8)
        place_output(result.output, source, place, yes, quiet=quiet, group=group)


def check_scale_options(scale_fmt: str, scale_dtype: str | None) -> None:
    """``--scale-fmt`` and ``--scale-dtype`` name values the library knows."""
    if scale_fmt not in ("float", "ue8m0"):
        raise typer.BadParameter("--scale-fmt must be float or ue8m0")
    if scale_dtype not in (None, "float32", "bfloat16"):
        raise typer.BadParameter("--scale-dtype must be float32 or bfloat16")


def tp_sizes_to_load(tp: list[str] | None, allow_unloadable: bool) -> tuple[int, ...]:
    """The TP sizes the output must load at: 1 and every ``--tp`` size."""
    if tp and allow_unloadable:
        raise fail("give --tp or --allow-unloadable, not both")
    from normalize_core.cli.check_command import parse_tp_sizes

    return parse_tp_sizes(["1", *tp] if tp else None, (1,))


def write_with_progress(fp8, output: Path, device: str, jobs: int, overwrite: bool, resume: bool, group, quiet: bool):
    """``write_fp8`` on the device this rank quantizes on, with a progress bar on rank 0."""
    from normalize_core.cli.progress import byte_progress, progress_label
    from normalize_core.distributed import device_for_rank, run_everywhere
    from normalize_core.fp8.convert import write_fp8
    from normalize_core.fp8.quantizers import quantizer_for

    target = run_everywhere(group, lambda: quantizer_for(device_for_rank(device, group), fp8).device)
    progress = byte_progress(
        fp8.checkpoint.total_size,
        progress_label("to-fp8", target, group.world_size),
        enabled=not quiet and group.rank == 0,
        items_total=len(fp8.layouts),
        items_label="quantized",
    )
    with progress as advance:
        return write_fp8(
            fp8, output, device=target, jobs=jobs, overwrite=overwrite, resume=resume, group=group, progress=advance
        )


def print_result(result, fp8) -> None:
    """What the conversion did, and what it could not."""
    print_conversion(result, f"{plural(result.quantized, 'tensor')} to FP8, {result.kept} kept")
    print_kept_to_load(fp8.decisions)
    print_reused(result.reused)
    print_skipped_aux(result.skipped_aux)
    if not result.config_written:
        print_finding("warning", "the source has no config.json, so no quantization_config was written")


def print_reference_mismatch(fp8) -> None:
    """With --reference: how the reference's weights differ from the source's, if they do."""
    if not fp8.reference_mismatch:
        return
    only_source, only_reference = fp8.reference_mismatch
    if only_source or only_reference:
        write_line(
            ("reference differs:", "yellow"),
            f" {plural(len(only_source), 'weight')} only in the source"
            f"{' (e.g. ' + only_source[0] + ')' if only_source else ''}, {len(only_reference)} only in the "
            f"reference{' (e.g. ' + only_reference[0] + ')' if only_reference else ''}",
        )


def print_dry_run(fp8, as_json: bool) -> None:
    """The decisions, as a table or (``--json``) one JSON object."""
    if as_json:
        decisions = {"quantize": sorted(fp8.quantized), "keep": sorted(fp8.kept)}
        print(json.dumps(decisions | {"kept_to_load": kept_to_load(fp8.decisions)}))
    else:
        print_decisions(fp8)
        print_kept_to_load(fp8.decisions)
