"""``diff``, ``merge`` and ``place``: combining checkpoints and moving a finished output to its home."""

import json
from pathlib import Path
from typing import Annotated

import typer

from normalize_core.cli.application import (
    DistributedOpt,
    JobsOpt,
    MaxShardOpt,
    OverwriteOpt,
    QuietOpt,
    ResumeOpt,
    ShardGbOpt,
    app,
    check_write_mode,
    fail,
    failed,
    shard_limit,
)
from normalize_core.cli.console import say
from normalize_core.cli.summaries import print_reused, print_shard_plan, print_skipped_aux
from normalize_core.devices import DEFAULT_JOBS
from normalize_core.sizes import format_bytes
from normalize_core.words import plural

#: Extra-only tensors listed by name in the human-readable summary (``--json`` lists all).
LISTED_TENSORS = 40


def print_diff(comparison, extra) -> None:
    """The human-readable summary of a ``CheckpointDiff`` against the ``extra`` checkpoint
    (shared by ``diff`` and ``merge``)."""
    say(f"base   {comparison.base}: {plural(comparison.base_count, 'tensor')}")
    say(f"extra  {comparison.extra}: {plural(comparison.extra_count, 'tensor')}")
    say(f"  only in base:  {comparison.base_only_count}")
    say(
        f"  only in extra: {len(comparison.extra_only)} ({format_bytes(comparison.extra_only_bytes)}, "
        f"{comparison.extra_only_bytes} bytes)"
    )
    say(f"  in both:       {len(comparison.overlap)} (base's copy wins)")
    for name in comparison.extra_only[:LISTED_TENSORS]:
        tensor = extra.tensor(name)
        say(f"    + {name}  {tensor.dtype} {list(tensor.shape)}  {format_bytes(tensor.nbytes)}")
    if len(comparison.extra_only) > LISTED_TENSORS:
        say(f"    … and {len(comparison.extra_only) - LISTED_TENSORS} more (--json lists all)")
    if comparison.conflicts:
        say(
            f"{plural(len(comparison.conflicts), 'tensor')} in both differ in dtype or shape; base's are kept:",
            "yellow",
        )
        for conflict in comparison.conflicts:
            say(f"    ! {conflict.describe()}")


@app.command("diff", short_help="Compare two checkpoints' tensors by their headers.")
def diff_command(
    base: Annotated[Path, typer.Argument(help="Base checkpoint directory.")],
    extra: Annotated[Path, typer.Argument(help="Checkpoint compared against it.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Compare two checkpoints by their headers and indexes alone (no tensor data is read).

    Counts the tensors of each, lists the ones only EXTRA holds (with their bytes: what
    `normalize merge` would add) and those both hold, and flags tensors both hold with a
    different dtype or shape (a merge keeps base's). --json prints {extra_only, overlap,
    conflicts} (sorted names) and base_count, extra_count, extra_only_bytes.

    Exit status 0 whenever both could be compared (differences are not errors), 2 otherwise.
    """
    from normalize_core._core import Checkpoint, NormalizeError
    from normalize_core.diff import diff

    try:
        extra_ckpt = Checkpoint.open(extra)
        comparison = diff(Checkpoint.open(base), extra_ckpt)
    except NormalizeError as e:
        raise fail(str(e)) from None
    if as_json:
        print(json.dumps(comparison.as_dict(), indent=2))
    else:
        print_diff(comparison, extra_ckpt)


def print_merge_plan(planned, hardlink: bool) -> None:
    """What the ``MergePlan`` will write, and which of extra's other files it leaves out."""
    how = "hard-linked" if hardlink else "copied"
    plan = planned.plan
    say(
        f"Merge: {plural(planned.base_shards, 'base shard')} {how} as they are, then "
        f"{plural(len(planned.diff.extra_only), 'extra tensor')} in {plural(planned.new_shards, 'new shard')}; "
        f"{plural(len(plan.shards), 'shard')}, total_size {plan.total_size} bytes ({format_bytes(plan.total_size)})."
    )
    if not planned.diff.extra_only:
        say("extra adds no tensors: the output is a copy of base.", "yellow")
    if planned.mixed_quantization:
        say(f"warning: {planned.mixed_quantization} (merging anyway: --allow-mixed)", "yellow")
    print_aux_left_out(planned.extra_aux_left_out)


def print_aux_left_out(left_out: dict[str, str]) -> None:
    """Extra's non-tensor files that the merge does not copy, and why."""
    if not left_out:
        return
    say("Non-tensor files of extra that are not copied (base's are); merge them by hand if needed:")
    for path, status in left_out.items():
        say(f"    {path}  ({'only in extra' if status == 'new' else 'differs from base'})")


def print_merge_result(result) -> None:
    """What a ``MergeResult`` holds: shards, tensors, links, files left out."""
    written = result.written
    rate = written.total_size / max(written.seconds, 1e-9)
    say(
        f"Merged into {written.output}: {plural(len(written.shards), 'shard')} ({result.base_shards} from base, "
        f"{result.new_shards} new), {plural(written.tensors, 'tensor')}, {format_bytes(written.total_size)} "
        f"in {written.seconds:.1f} s ({format_bytes(rate)}/s)."
    )
    print_reused(written.reused)
    if result.linked:
        say(f"Hard-linked {plural(result.linked, 'base shard')} (they share their data with base's files).")
    if result.link_fallbacks:
        reason = result.link_fallbacks[0][1]
        say(
            f"Could not hard-link {plural(len(result.link_fallbacks), 'base shard')} ({reason}); copied them instead.",
            "yellow",
        )
    if written.aux_files:
        say(f"Copied base's other files: {', '.join(written.aux_files)}")
    print_skipped_aux(written.skipped_aux)
    if result.extra_aux_left_out:
        say(f"Not copied from extra (listed above): {', '.join(result.extra_aux_left_out)}")


@app.command(short_help="Write base plus the tensors only extra holds.")
def merge(
    base: Annotated[Path, typer.Option("--base", "-b", help="Checkpoint whose tensors all go in (wins on overlap).")],
    extra: Annotated[Path, typer.Option("--extra", "-e", help="Checkpoint whose tensors missing from base are added.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory to write: the final home, created if missing.")],
    shard_size_gb: ShardGbOpt = None,
    max_shard_size: MaxShardOpt = None,
    hardlink: Annotated[
        bool,
        typer.Option(
            "--hardlink",
            help="Hard-link base's shards instead of copying them (instant; they then share storage with base, "
            "so do not edit them in place). Across file systems they are copied, and the summary says so.",
        ),
    ] = False,
    jobs: JobsOpt = DEFAULT_JOBS,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the diff and the shard plan; write nothing.")
    ] = False,
    yes: Annotated[
        bool, typer.Option("--yes", "-y", help="Merge without asking (required when not on a terminal).")
    ] = False,
    overwrite: OverwriteOpt = False,
    allow_mixed: Annotated[
        bool,
        typer.Option(
            "--allow-mixed",
            help="Merge even when one checkpoint is quantized (FP8 weights, *_scale_inv or weight_scale tensors) "
            "and the other is not, or extra adds scales of base's weights. The result then holds tensors its "
            "config.json does not describe (e.g. orphan scales beside bf16 weights, no quantization_config); "
            "without this flag such a merge is refused.",
        ),
    ] = False,
    resume: ResumeOpt = False,
    distributed: DistributedOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Write base ∪ (extra − base) to --out: base wins wherever both hold a tensor.

    Compares headers only, prints that diff (including tensors whose dtype or shape differ) and
    asks to confirm. Base's shards are re-emitted in base order under the standard
    model-{i:05d}-of-{n:05d} names, copied inside the kernel (or hard-linked with --hardlink);
    tensors only extra holds are packed into new shards after them; then base's non-tensor
    files and a fresh index (written last). Extra's own non-tensor files are not copied: the
    summary names those that are new or differ. Works on any layout (index, one
    model.safetensors, engine-named shards). --out is final: there is no placement step.
    A quantized and an unquantized checkpoint are refused unless --allow-mixed. Declining the
    confirmation writes nothing and exits 0.
    """
    check_write_mode(overwrite, resume)
    if distributed and not (yes or dry_run):
        raise fail("a distributed merge never asks for confirmation; pass --yes")
    limit = shard_limit(shard_size_gb, max_shard_size)
    from normalize_core._core import NormalizeError
    from normalize_core.distributed import joined, run_everywhere
    from normalize_core.merge import plan_merge

    try:
        with joined(distributed) as group:
            planned = run_everywhere(group, lambda: plan_merge(base, extra, limit, allow_mixed=allow_mixed))
            if group.rank == 0:
                print_diff(planned.diff, planned.extra)
                print_merge_plan(planned, hardlink)
                if dry_run:
                    print_shard_plan(planned.plan)
            if dry_run:
                return
            if not (yes or confirmed(out)):
                say("Nothing written.")
                return
            result = write_with_progress(planned, out, hardlink, jobs, overwrite, resume, group, quiet)
    except NormalizeError as e:
        raise failed(e) from None
    if group.rank == 0:
        print_merge_result(result)


def write_with_progress(
    planned, out: Path, hardlink: bool, jobs: int, overwrite: bool, resume: bool, group, quiet: bool
):
    """``write_merge`` with a progress bar on rank 0."""
    from normalize_core.cli.progress import byte_progress
    from normalize_core.merge import write_merge

    total = sum(s.file_len for s in planned.plan.shards)
    with byte_progress(total, "merge", enabled=not quiet and group.rank == 0) as advance:
        return write_merge(
            planned,
            out,
            hardlink=hardlink,
            jobs=jobs,
            overwrite=overwrite,
            resume=resume,
            group=group,
            progress=advance,
        )


def confirmed(out: Path) -> bool:
    """Asks on a terminal whether to write; refuses off one (``--yes`` skips this)."""
    from normalize_core.cli import placement

    if not placement.terminal_attached():
        raise fail("merge asks for confirmation and this is not a terminal; pass --yes to merge without asking")
    return typer.confirm(f"Write the merged checkpoint to {out}?", default=True)


@app.command("place", short_help="Copy a written output's weights to their final home.")
def place_command(
    staging: Annotated[Path, typer.Argument(help="A written output (shards + index), e.g. repack's --output.")],
    dest: Annotated[Path, typer.Argument(help="Directory to copy it into (created if missing), e.g. the source.")],
    yes: Annotated[
        bool, typer.Option("--yes", "-y", help="Replace the listed files without asking (required off a terminal).")
    ] = False,
    remove_stale: Annotated[
        bool | None,
        typer.Option(
            "--remove-stale/--keep-stale",
            help="Remove DEST's *.safetensors files the new index does not reference, or keep them. "
            "Default: ask on a terminal (answer defaults to keep), keep otherwise.",
        ),
    ] = None,
    quiet: QuietOpt = False,
) -> None:
    """Copy a finished output's weights into DEST: its shards, its index (written last) and the
    non-tensor files DEST lacks or holds with other bytes (e.g. to-fp8's config.json).

    Copies, never moves: STAGING stays intact (delete it yourself). Files DEST already has are
    listed and replaced only after confirmation (--yes off a terminal). New files arrive under
    temporary names and are renamed into place together, so DEST's index never names a missing
    or half-written shard. DEST's old shards the new index no longer references are listed;
    they stay unless you choose to remove them. Leftovers of an interrupted placement into DEST
    are removed (only those of processes that no longer run) and listed.
    """
    from normalize_core._core import NormalizeError
    from normalize_core.cli.placement import place_interactively

    try:
        place_interactively(staging, dest, yes, remove_stale=remove_stale, show_progress=not quiet)
    except NormalizeError as e:
        raise fail(str(e)) from None
