"""``repack``, ``inspect``, ``verify`` and ``demo``: commands that need no torch."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from normalize_core._core import NormalizeError
from normalize_core.cli.app import (
    DistributedOpt,
    JobsOpt,
    MaxShardOpt,
    OutputOpt,
    OverwriteOpt,
    PlaceOpt,
    QuietOpt,
    ResumeOpt,
    ShardGbOpt,
    SourceOpt,
    YesOpt,
    app,
    fail,
    failed,
    finding,
    shard_limit,
    stdout,
)
from normalize_core.distributed import joined, run_everywhere
from normalize_core.place import check_place_option, offer_placement
from normalize_core.progress import byte_progress, stderr
from normalize_core.repack import DEFAULT_JOBS, plan_repack, write_repack
from normalize_core.report import inspect_checkpoint, verify_checkpoint
from normalize_core.sample import write_sample_checkpoint
from normalize_core.sizes import MIB, format_bytes


def print_plan(plan) -> None:
    table = Table(title="Shard plan", show_lines=False)
    table.add_column("shard")
    table.add_column("tensors", justify="right")
    table.add_column("tensor bytes", justify="right")
    table.add_column("file bytes", justify="right")
    for shard in plan.shards:
        table.add_row(
            shard.file_name, str(len(shard.tensor_names)), format_bytes(shard.data_len), format_bytes(shard.file_len)
        )
    stdout.print(table)
    stdout.print(
        f"{len(plan.shards)} shards, {sum(len(s.tensor_names) for s in plan.shards)} tensors, "
        f"total_size {plan.total_size} bytes ({format_bytes(plan.total_size)})"
    )


@app.command()
def repack(
    source: SourceOpt,
    output: OutputOpt,
    shard_size_gb: ShardGbOpt = None,
    max_shard_size: MaxShardOpt = None,
    jobs: JobsOpt = DEFAULT_JOBS,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the shard plan; write nothing.")] = False,
    overwrite: OverwriteOpt = False,
    resume: ResumeOpt = False,
    distributed: DistributedOpt = False,
    quiet: QuietOpt = False,
    place: PlaceOpt = None,
    yes: YesOpt = False,
) -> None:
    """Re-shard a checkpoint into model-{i:05d}-of-{n:05d}.safetensors + model.safetensors.index.json.

    Reads any layout (index, a lone model.safetensors, or engine-named *.safetensors in natural
    order), packs tensors in order into shards of at most the size limit (a larger tensor gets a
    shard of its own) and copies every non-tensor file. Bytes move inside the kernel; torch is
    never imported and no tensor is loaded.

    --output is a staging area: afterwards you choose (on a terminal, or with --place) whether
    the weights stay there, are copied into --source, or are copied to another directory.
    """
    if overwrite and resume:
        raise typer.BadParameter("give --overwrite or --resume, not both")
    limit = shard_limit(shard_size_gb, max_shard_size)
    try:
        with joined(distributed) as group:
            lead = group.rank == 0
            if not dry_run:
                check_place_option(place, output)
            checkpoint, plan = run_everywhere(group, lambda: plan_repack(source, limit))
            if dry_run:
                if lead:
                    print_plan(plan)
                return
            total = sum(s.file_len for s in plan.shards)
            with byte_progress(total, "repack", enabled=not quiet and lead) as advance:
                result = write_repack(
                    checkpoint,
                    plan,
                    output,
                    jobs=jobs,
                    overwrite=overwrite,
                    resume=resume,
                    group=group,
                    progress=advance,
                )
    except NormalizeError as e:
        raise failed(e) from None
    if not lead:
        return
    rate = result.total_size / max(result.seconds, 1e-9)
    stdout.print(
        f"Wrote {len(result.shards)} shards ({result.tensors} tensors, {format_bytes(result.total_size)}) "
        f"to {result.output} in {result.seconds:.1f} s ({format_bytes(rate)}/s)."
    )
    print_reused(result.reused)
    if result.aux_files:
        stdout.print(f"Copied {len(result.aux_files)} other files: {', '.join(result.aux_files)}")
    print_skipped_aux(result.skipped_aux)
    if result.removed_stale:
        stdout.print(f"Removed stale shards of an earlier run: {', '.join(result.removed_stale)}")
    if result.ignored_files:
        stdout.print(f"Left out source files not referenced by the index: {', '.join(result.ignored_files)}")
    try:
        offer_placement(result.output, source, place, yes, show_progress=not quiet, interactive=placement_asks(group))
    except NormalizeError as e:
        raise fail(str(e)) from None


def print_reused(reused: list[str]) -> None:
    """The summary line of a resumed run."""
    if reused:
        stdout.print(f"Kept {len(reused)} shards an interrupted run had finished: {', '.join(sorted(reused))}")


def print_skipped_aux(skipped: list[tuple[str, str]]) -> None:
    """One warning per source symlink the aux copy left out."""
    for path, reason in skipped:
        stderr.print(finding("warning", f"not copied: {path} ({reason})"), soft_wrap=True)


def placement_asks(group) -> bool | None:
    """Placement asks on a terminal, except in a distributed run (never: only --place)."""
    return None if group.world_size == 1 else False


@app.command("inspect")
def inspect_command(
    directory: Annotated[Path, typer.Argument(help="Checkpoint directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Describe a checkpoint: tensors, dtypes and their bytes, shards, naming style, quantization, problems."""
    try:
        info = inspect_checkpoint(directory)
    except NormalizeError as e:
        raise fail(str(e)) from None
    if as_json:
        print(json.dumps(info, indent=2))
        return
    stdout.print(Text.assemble((info["path"], "bold"), f"  ({info['naming']} naming, {info['layout']})"))
    stdout.print(
        f"{info['tensors']} tensors, {info['total_parameters']} parameters, "
        f"{format_bytes(info['total_size'])} in {len(info['shards'])} shard files"
    )
    dtypes = Table("dtype", "tensors", "bytes", title="dtypes")
    for dtype, d in sorted(info["dtypes"].items()):
        dtypes.add_row(dtype, str(d["tensors"]), format_bytes(d["bytes"]))
    stdout.print(dtypes)
    q = info["quantization"]
    stdout.print(f"quantization: {q['scheme']} ({q['fp8_tensors']} FP8 tensors, {q['block_scaled']} with _scale_inv)")
    if info["aux_files"]:
        stdout.print(f"other files: {', '.join(info['aux_files'])}")
    for p in info["problems"]:
        stdout.print(finding(p["severity"], p["message"]))
    if not info["problems"]:
        stdout.print("no problems found")


@app.command()
def verify(
    directory: Annotated[Path, typer.Argument(help="Checkpoint directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Check that a checkpoint loads as written; exit 0 only if every check holds.

    Checks: valid headers, index and shards consistent, correct total_size, no stray or missing
    tensors, and for FP8 checkpoints the scale tensors and quantization_config.
    """
    report = verify_checkpoint(directory)
    if as_json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        for severity, message in report.findings:
            stdout.print(finding(severity, message))
        verdict = Text("OK", style="green") if report.ok else Text("FAILED", style="red")
        stdout.print(Text.assemble(verdict, f" {report.path}: {report.tensors} tensors in {report.shards} shard files"))
    if not report.ok:
        raise typer.Exit(1)


@app.command()
def demo(
    directory: Annotated[
        Path | None, typer.Argument(help="Empty or new directory to work in (default: a new temporary one).")
    ] = None,
) -> None:
    """Write a small sample checkpoint with engine-style shard names, repack it, verify the result."""
    root = directory or Path(tempfile.mkdtemp(prefix="normalize-demo-"))
    if root.exists() and any(root.iterdir()):
        raise fail(f"{root}: directory is not empty; give a new or empty directory")
    source, output = root / "engine-checkpoint", root / "normalized"
    write_sample_checkpoint(source)
    stdout.print(f"1. Wrote a sample engine checkpoint to {source}:")
    for f in sorted(source.iterdir()):
        stdout.print(f"     {f.name}  ({format_bytes(f.stat().st_size)})")
    limit = MIB
    try:
        checkpoint, plan = plan_repack(source, limit)
        result = write_repack(checkpoint, plan, output, jobs=DEFAULT_JOBS)
    except NormalizeError as e:
        raise fail(str(e)) from None
    stdout.print(f"2. Repacked it into {len(result.shards)} shards of at most {format_bytes(limit)} in {output}:")
    for f in sorted(output.iterdir()):
        stdout.print(f"     {f.name}  ({format_bytes(f.stat().st_size)})")
    report = verify_checkpoint(output)
    stdout.print(
        f"3. Verified: {'OK' if report.ok else 'FAILED'} ({report.tensors} tensors, "
        f"total_size {result.total_size} bytes)"
    )
    for severity, message in report.findings:
        stdout.print(f"     {severity}: {message}")
    stdout.print(f"Try: normalize inspect {output}")
    if not report.ok:
        raise typer.Exit(1)
