"""``repack``, ``inspect``, ``verify`` and ``demo``: commands that need no torch."""

import json
import os
from pathlib import Path
from typing import Annotated

import typer

from normalize_core.cli.application import (
    PROBLEMS_FOUND,
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
    check_write_mode,
    fail,
    failed,
    shard_limit,
)
from normalize_core.cli.console import print_finding, print_table, say, write_line
from normalize_core.cli.summaries import print_reused, print_shard_plan, print_skipped_aux
from normalize_core.devices import DEFAULT_JOBS
from normalize_core.sizes import format_bytes
from normalize_core.words import plural


def require_directory(directory: Path) -> None:
    """Exit 2 (input error) unless ``directory`` is a directory this process can list: what
    cannot be read cannot be checked, so the checking commands exit 1 only for what they found."""
    try:
        os.scandir(directory).close()
    except OSError as e:
        raise fail(f"{directory}: {e.strerror or e}") from None


@app.command(short_help="Re-shard any checkpoint into standard shards and an index.")
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
    check_write_mode(overwrite, resume)
    limit = shard_limit(shard_size_gb, max_shard_size)
    from normalize_core._core import NormalizeError
    from normalize_core.cli.placement import check_place_option, place_output
    from normalize_core.distributed import joined, run_everywhere
    from normalize_core.repack import plan_repack

    try:
        with joined(distributed) as group:
            if not dry_run:
                check_place_option(place, output)
            checkpoint, plan = run_everywhere(group, lambda: plan_repack(source, limit))
            if dry_run:
                if group.rank == 0:
                    print_shard_plan(plan)
                return
            result = write_with_progress(checkpoint, plan, output, jobs, overwrite, resume, group, quiet)
    except NormalizeError as e:
        raise failed(e) from None
    if group.rank == 0:
        print_repack_result(result)
        place_output(result.output, source, place, yes, quiet=quiet, group=group)


def write_with_progress(checkpoint, plan, output: Path, jobs: int, overwrite: bool, resume: bool, group, quiet: bool):
    """``write_repack`` with a progress bar on rank 0."""
    from normalize_core.cli.progress import byte_progress
    from normalize_core.repack import write_repack

    total = sum(s.file_len for s in plan.shards)
    with byte_progress(total, "repack", enabled=not quiet and group.rank == 0) as advance:
        return write_repack(
            checkpoint, plan, output, jobs=jobs, overwrite=overwrite, resume=resume, group=group, progress=advance
        )


def print_repack_result(result) -> None:
    """What the repack wrote, copied, removed and left out."""
    rate = result.total_size / max(result.seconds, 1e-9)
    say(
        f"Wrote {plural(len(result.shards), 'shard')} ({plural(result.tensors, 'tensor')}, "
        f"{format_bytes(result.total_size)}) to {result.output} in {result.seconds:.1f} s ({format_bytes(rate)}/s)."
    )
    print_reused(result.reused)
    if result.aux_files:
        say(f"Copied {plural(len(result.aux_files), 'other file')}: {', '.join(result.aux_files)}")
    print_skipped_aux(result.skipped_aux)
    if result.removed_stale:
        say(f"Removed stale shards of an earlier run: {', '.join(result.removed_stale)}")
    if result.ignored_files:
        say(f"Left out source files not referenced by the index: {', '.join(result.ignored_files)}")


@app.command("inspect", short_help="Describe a checkpoint and the problems it has.")
def inspect_command(
    directory: Annotated[Path, typer.Argument(help="Checkpoint directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Describe a checkpoint: tensors, dtypes and their bytes, shards, naming style, quantization, problems.

    Exit status: 0 when no error-level problem is found (warnings allowed), 1 when one is (the
    same ones verify fails on, e.g. engine-named shards without an index, or a file that is not
    valid safetensors), 2 when DIRECTORY cannot be read.
    """
    from normalize_core._core import NormalizeError
    from normalize_core.report import inspect_checkpoint, read_config

    require_directory(directory)
    # A config.json that cannot be read (a FIFO, a directory) is an input error (exit 2, raised
    # here); what is wrong with the checkpoint itself is reported below (exit 1).
    read_config(directory)
    try:
        info = inspect_checkpoint(directory)
    except NormalizeError as e:
        print_finding("error", str(e))
        raise typer.Exit(PROBLEMS_FOUND) from None
    errors = sum(p["severity"] == "error" for p in info["problems"])
    if as_json:
        print(json.dumps(info, indent=2))
        raise typer.Exit(PROBLEMS_FOUND if errors else 0)
    write_line((info["path"], "bold"), f"  ({info['naming']} naming, {info['layout']})")
    say(
        f"{plural(info['tensors'], 'tensor')}, {plural(info['total_parameters'], 'parameter')}, "
        f"{format_bytes(info['total_size'])} in {plural(len(info['shards']), 'shard file')}"
    )
    rows = [[dtype, str(d["tensors"]), format_bytes(d["bytes"])] for dtype, d in sorted(info["dtypes"].items())]
    print_table(["dtype", "tensors", "bytes"], rows, right={1, 2})
    q = info["quantization"]
    say(f"quantization: {q['scheme']} ({plural(q['fp8_tensors'], 'FP8 tensor')}, {q['block_scaled']} with _scale_inv)")
    if info["aux_files"]:
        say(f"other files: {', '.join(info['aux_files'])}")
    for p in info["problems"]:
        print_finding(p["severity"], p["message"])
    if not info["problems"]:
        say("no problems found")
    if errors:
        raise typer.Exit(PROBLEMS_FOUND)


@app.command(short_help="Check that a checkpoint loads as written.")
def verify(
    directory: Annotated[Path, typer.Argument(help="Checkpoint directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Check that a checkpoint loads as written.

    Checks: valid headers, index and shards consistent, correct total_size, no stray or missing
    tensors, and for FP8 checkpoints the scale tensors and quantization_config.

    Exit status: 0 when every check holds, 1 when one fails (each failure is listed), 2 when
    DIRECTORY cannot be read.
    """
    from normalize_core.report import verify_checkpoint

    require_directory(directory)
    report = verify_checkpoint(directory)
    if as_json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        for severity, message in report.findings:
            print_finding(severity, message)
        verdict = ("OK", "green") if report.ok else ("FAILED", "red")
        write_line(
            verdict, f" {report.path}: {plural(report.tensors, 'tensor')} in {plural(report.shards, 'shard file')}"
        )
    if not report.ok:
        raise typer.Exit(PROBLEMS_FOUND)


@app.command(short_help="Run repack and verify on a built-in sample checkpoint.")
def demo(
    directory: Annotated[
        Path | None, typer.Argument(help="Empty or new directory to work in (default: a new temporary one).")
    ] = None,
) -> None:
    """Write a small sample checkpoint with engine-style shard names, repack it, verify the result."""
    import tempfile

    from normalize_core._core import NormalizeError
    from normalize_core.repack import plan_repack, write_repack
    from normalize_core.report import verify_checkpoint
    from normalize_core.sample import write_sample_checkpoint
    from normalize_core.sizes import MIB

    root = directory or Path(tempfile.mkdtemp(prefix="normalize-demo-"))
    if root.exists() and not root.is_dir():
        raise fail(f"{root}: not a directory; give a new or empty directory")
    if root.exists() and any(root.iterdir()):
        raise fail(f"{root}: directory is not empty; give a new or empty directory")
    source, output = root / "engine-checkpoint", root / "normalized"
    try:
        write_sample_checkpoint(source)
    except OSError as e:
        raise fail(f"{e.filename or root}: cannot write the sample checkpoint: {e.strerror or e}") from None
    say(f"1. Wrote a sample engine checkpoint to {source}:")
    for f in sorted(source.iterdir()):
        say(f"     {f.name}  ({format_bytes(f.stat().st_size)})")
    limit = MIB
    try:
        checkpoint, plan = plan_repack(source, limit)
        result = write_repack(checkpoint, plan, output, jobs=DEFAULT_JOBS)
    except NormalizeError as e:
        raise fail(str(e)) from None
    say(f"2. Repacked it into {plural(len(result.shards), 'shard')} of at most {format_bytes(limit)} in {output}:")
    for f in sorted(output.iterdir()):
        say(f"     {f.name}  ({format_bytes(f.stat().st_size)})")
    report = verify_checkpoint(output)
    say(
        f"3. Verified: {'OK' if report.ok else 'FAILED'} ({plural(report.tensors, 'tensor')}, "
        f"total_size {result.total_size} bytes)"
    )
    for severity, message in report.findings:
        say(f"     {severity}: {message}")
    say(f"Try: normalize inspect {output}")
    if not report.ok:
        raise typer.Exit(PROBLEMS_FOUND)
