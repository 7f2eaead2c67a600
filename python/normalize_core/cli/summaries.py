"""What the writing commands print about their work: the shard plan of a dry run, and the lines
after a write (the summary of a conversion, the shards a resumed run kept, the files not copied)."""

from __future__ import annotations

from normalize_core.cli.console import print_finding, print_table, say
from normalize_core.sizes import format_bytes
from normalize_core.words import plural


def print_shard_plan(plan) -> None:
    """An ``OutputPlan`` as a table of shards and a one-line total."""
    rows = [
        [shard.file_name, str(len(shard.tensor_names)), format_bytes(shard.data_len), format_bytes(shard.file_len)]
        for shard in plan.shards
    ]
    print_table(["shard", "tensors", "tensor bytes", "file bytes"], rows, right={1, 2, 3}, title="Shard plan")
    say(
        f"{plural(len(plan.shards), 'shard')}, {plural(sum(len(s.tensor_names) for s in plan.shards), 'tensor')}, "
        f"total_size {plan.total_size} bytes ({format_bytes(plan.total_size)})"
    )


def print_conversion(result, what: str) -> None:
    """The summary line of a conversion (``to-fp8``, ``to-bf16``): its shards, where and how fast it
    computed, ``what`` it did to the tensors, and the bytes before and after."""
    say(
        f"Wrote {plural(len(result.shards), 'shard')} to {result.output} on {result.device} in {result.seconds:.1f} s: "
        f"{what}, {format_bytes(result.bytes_before)} → {format_bytes(result.bytes_after)}."
    )


def print_reused(reused: list[str]) -> None:
    """The summary line of a resumed run."""
    if reused:
        say(f"Kept {plural(len(reused), 'shard')} an interrupted run had finished: {', '.join(sorted(reused))}")


def print_skipped_aux(skipped: list[tuple[str, str]]) -> None:
    """One warning per source symlink the copy of the other files left out."""
    for path, reason in skipped:
        print_finding("warning", f"not copied: {path} ({reason})", err=True)
