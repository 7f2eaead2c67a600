"""The one way every writing command (repack, to-fp8, to-bf16, merge) fills its output directory.

``write_output(plan, output, spec, ...)`` does, in order:

1. ``check_separate``: the output is never a source, nor inside one, nor around one.
2. Locks the output (``output_lock``): a second run into it fails at once, naming the first.
3. Fresh, ``overwrite`` or ``resume``:
   - fresh: the output must be new or empty; one that holds an unfinished run is refused with a
     hint at ``resume`` and ``overwrite``;
   - ``overwrite``: the old index goes first (it may name shards about to be replaced), then
     temporary files and an old run record; other files stay until replaced;
   - ``resume``: the unfinished run's record must describe this very run (command, options,
     sources, planned shards), else the run is refused, saying what changed; temporary files go;
     every shard marked done whose size and header still match is kept, the rest written again. A
     new or empty output starts fresh, so a job script can always pass ``resume``.
4. Writes the run record (``run_record``) before the first shard.
5. Writes the shards: kernel copies in Rust, ``jobs`` at a time; for plans with provided tensors,
   ``fill`` (see ``shard_filling``, e.g. ``ComputedTensors``) writes those while the kernel copies
   the rest. Each shard is marked done once it is fsynced and renamed into place.
6. Copies the non-tensor files, runs ``before_index`` (to-fp8 and to-bf16 write config.json
   there), removes stale shards of an earlier run, writes the index, and removes the record last.

A failure removes what this run created (the shards it finished, the files it copied, its record,
the directory if it made it) and nothing else, except under ``resume``: then the finished shards
and the record stay for the next ``resume``. A killed run leaves its record for ``resume``, and so
does a distributed run that lost a rank (the dead rank cannot clean up after itself).

Distributed (``group`` from ``distributed.joined``): every rank describes the run and the
fingerprints must agree; rank 0 alone does steps 2–4 and 6 and tells the others which shards are
done; the rest are split between the ranks by bytes; each writes its own; a failure anywhere stops
every rank before the index, and rank 0 names the rank and shard.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from normalize_core._core import (
    INDEX_FILE,
    NormalizeError,
    OutputPlan,
    check_separate,
    copy_aux_files,
    remove_stale_shards,
    remove_temporaries,
)
from normalize_core.distributed import SOLO, Group, assign_shards, run_everywhere
from normalize_core.errors import normalize_error
from normalize_core.kinds import ShardKind
from normalize_core.output_lock import LOCK_FILE, OutputLock
from normalize_core.run_record import (
    RunRecord,
    RunSpec,
    describe_run,
    discard_record,
    ensure_marker_dir,
    mark_done,
    read_record,
    remove_entry,
    unmark,
    verified_done,
    write_record,
)

if TYPE_CHECKING:
    from normalize_core.shard_filling import Advance, ShardFiller

__all__ = ["RunSpec", "WriteResult", "write_output"]


@dataclass
class WriteResult:
    """What a finished write produced."""

    output: Path
    shards: list[str]
    tensors: int
    total_size: int
    aux_files: list[str] = field(default_factory=list)
    #: ``(path, reason)`` of source symlinks not copied (they lead outside the source, or nowhere).
    skipped_aux: list[tuple[str, str]] = field(default_factory=list)
    removed_stale: list[str] = field(default_factory=list)
    #: ``*.safetensors`` files of the source that its index does not reference, left out.
    ignored_files: list[str] = field(default_factory=list)
    #: Shards an interrupted earlier run had finished, kept by ``resume``.
    reused: list[str] = field(default_factory=list)
    #: Whole-file shards hard-linked (with ``hardlink``).
    linked: int = 0
    #: Whole-file shards copied although a link was asked for, with the reason.
    link_fallbacks: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0


def write_output(
    plan: OutputPlan,
    output: str | os.PathLike,
    spec: RunSpec,
    *,
    fill: ShardFiller | None = None,
    jobs: int = 1,
    hardlink: bool = False,
    before_index: Callable[[], None] | None = None,
    overwrite: bool = False,
    resume: bool = False,
    group: Group = SOLO,
    progress: Advance | None = None,
    shard_work: Sequence[tuple[int, int]] | None = None,
) -> WriteResult:
    """Writes ``plan`` into ``output`` as described in the module docstring and returns what it
    wrote. ``fill`` is needed for plans with provided tensors; ``hardlink`` links whole-file
    shards. ``progress`` receives ``advance(n_bytes)`` (and ``items`` from ``fill``);
    ``shard_work[i]`` is the ``(bytes, items)`` shard ``i`` reports in all (default: its tensor
    bytes, or file bytes for a whole-file shard), reported at once for shards this process does
    not write, so that a progress total over the whole plan is reached. Raises
    ``NormalizeError`` with one readable line on any refusal or failure."""
    if overwrite and resume:
        raise ValueError("give overwrite or resume, not both")
    started = time.monotonic()
    run = OutputRun(Path(output), plan, spec, group, resume)
    run_everywhere(group, run.describe)
    run.agree_on_plan()
    try:
        run_everywhere(group, lambda: run.prepare(overwrite))
        run.share_start()
        mine, advance = run.share_out(shard_work, progress)
        report = run_everywhere(group, lambda: run.write(mine, fill, jobs, hardlink, advance))
        reports = group.all_gather(report)
        finished = group.broadcast(run_everywhere(group, lambda: run.finish(before_index)))
        advance.complete()
    except BaseException as failure:
        # A rank that died cannot clean up after itself: the run stays resumable for every rank.
        if getattr(failure, "kind", None) != "rank_lost":
            run.abandon()
        raise
    finally:
        run.release()
    return run.result(finished, reports, time.monotonic() - started)


def default_shard_work(shards) -> list[tuple[int, int]]:
    """The bytes the kernel reports copying for each shard."""
    return [(s.file_len if s.kind == ShardKind.WHOLE_FILE else s.data_len, 0) for s in shards]


class OutputRun:
    """The state of one ``write_output`` call on one rank, for the steps and the cleanup."""

    def __init__(self, output: Path, plan: OutputPlan, spec: RunSpec, group: Group, resume: bool):
        self.output = output
        self.plan = plan
        self.shards = plan.shards
        self.spec = spec
        self.group = group
        self.lead = group.rank == 0
        self.resume = resume
        self.record: RunRecord | None = None
        self.lock: OutputLock | None = None
        self.created_dir = False
        self.created_record = False
        #: Top-level entries the finishing step created (aux files, config.json).
        self.created_entries: set[str] = set()
        #: Shards an earlier run finished, kept (indices).
        self.reused: list[int] = []
        #: Shards this process finished (indices).
        self.finished: list[int] = []
        self.index_written = False

    def describe(self) -> None:
        check_separate([c.dir for c in self.spec.checkpoints], self.output)
        self.record = describe_run(self.spec, self.plan, self.shards)

    def agree_on_plan(self) -> None:
        """Every rank must have planned the very same run as rank 0."""
        fingerprints = self.group.all_gather(self.record.fingerprint)
        differing = [rank for rank, f in enumerate(fingerprints) if f != fingerprints[0]]
        if not differing:
            return
        if self.lead:
            raise normalize_error(
                "plan_mismatch",
                f"{self.output}: rank(s) {', '.join(map(str, differing))} planned another run than rank 0; do all "
                "nodes see the same sources, and run the same command with the same options?",
            )
        if self.group.rank in differing:
            raise normalize_error("plan_mismatch", f"rank {self.group.rank}: planned another run than rank 0")
        raise normalize_error("peer_failed", f"rank {self.group.rank}: another rank planned another run")

    def prepare(self, overwrite: bool) -> None:
        """Rank 0: lock, then fresh / overwrite / resume (see the module docstring)."""
        if not self.lead:
            return
        self.created_dir = make_output_dir(self.output)
        self.lock = OutputLock.acquire(self.output, self.spec.command)
        try:
            previous = read_record(self.output)
        except NormalizeError:
            if not overwrite:
                raise
            previous = None  # discarded below with the rest of the earlier run
        others = [name for name in os.listdir(self.output) if name != LOCK_FILE]
        if previous is not None and self.resume:
            self.continue_run(previous)
        elif previous is not None and not overwrite:
            raise normalize_error(
                "unfinished_run",
                f"{self.output}: holds an unfinished {previous.command} run (pid {previous.owner.get('pid')} on "
                f"{previous.owner.get('host')}, started {previous.owner.get('started')}); pass --resume to finish it "
                "or --overwrite to start over",
                file=str(self.output),
            )
        elif others and not overwrite:
            if self.resume:
                raise normalize_error(
                    "nothing_to_resume",
                    f"{self.output}: holds no unfinished run to resume but is not empty; pass --overwrite to "
                    "replace the files this tool writes",
                    file=str(self.output),
                )
            raise normalize_error(
                "output_not_empty",
                f"{self.output}: output directory is not empty; pass --overwrite to replace the files this tool writes",
                file=str(self.output),
            )
        else:
            if others:
                self.clear_previous_run()
            write_record(self.output, self.record)
            self.created_record = True

    def continue_run(self, previous: RunRecord) -> None:
        """``resume``: the same run, its finished shards kept."""
        changed = previous.difference(self.record)
        if changed is not None:
            raise normalize_error(
                "resume_mismatch",
                f"{self.output}: cannot resume: {changed}; rerun with the unfinished run's sources and options, or "
                "pass --overwrite to start over",
                file=str(self.output),
            )
        self.clear_previous_run(keep_record=True)
        ensure_marker_dir(self.output)
        self.record = previous
        self.reused = verified_done(self.output, previous)

    def clear_previous_run(self, keep_record: bool = False) -> None:
        """The index first (it may name shards about to be replaced), temporary files, and
        unless kept, an earlier run's record."""
        (self.output / INDEX_FILE).unlink(missing_ok=True)
        remove_temporaries(self.output)
        if not keep_record:
            discard_record(self.output)

    def share_start(self) -> None:
        """Rank 0's record (its run id marks the shards), kept shards and directory creation."""
        start = self.group.broadcast((self.record, self.reused, self.created_dir) if self.lead else None)
        if not self.lead:
            self.record, self.reused, self.created_dir = start

    def share_out(
        self, shard_work: Sequence[tuple[int, int]] | None, progress: Advance | None
    ) -> tuple[list[int], SharedProgress]:
        """This rank's shards (those not kept, split between the ranks by bytes) and the progress
        it reports them through (see ``write_output`` for ``shard_work``)."""
        work = list(shard_work) if shard_work is not None else default_shard_work(self.shards)
        reused = set(self.reused)
        pending = [i for i in range(len(self.shards)) if i not in reused]
        mine = assign_shards([s.file_len for s in self.shards], pending, self.group.world_size)[self.group.rank]
        return mine, SharedProgress(progress, work, self.reused, pending, mine, self.lead)

    def write(self, shards: list[int], fill: ShardFiller | None, jobs: int, hardlink: bool, advance: Advance):
        """Writes this rank's shards; returns the kernel's hard-link report."""
        if fill is None:
            return self.plan.execute(
                self.output,
                jobs=jobs,
                hardlink=hardlink,
                progress=advance,
                shards=shards,
                on_shard_done=self.shard_finished,
            )
        from normalize_core.shard_filling import write_filled_shards  # its thread pool: conversions only

        write_filled_shards(self.plan, self.output, shards, fill, jobs, advance, self.shard_finished)
        return {"linked": 0, "link_fallbacks": []}

    def shard_finished(self, shard: int) -> None:
        """Tracks and marks a shard this process renamed into place."""
        self.finished.append(shard)
        mark_done(self.output, self.record, shard)

    def finish(self, before_index: Callable[[], None] | None):
        """Rank 0: aux files, ``before_index``, stale shards, the index, then the record goes.
        Returns ``(aux files copied, aux symlinks skipped, stale shards removed)``."""
        if not self.lead:
            return None
        before = set(os.listdir(self.output))
        try:
            aux = copy_aux_files(self.spec.checkpoints[0].dir, self.output)
            if before_index is not None:
                before_index()
        finally:
            self.created_entries = set(os.listdir(self.output)) - before
        stale = remove_stale_shards(self.output, [s.file_name for s in self.shards])
        self.plan.write_index(self.output)
        self.index_written = True
        discard_record(self.output)
        return aux.copied, [tuple(skip) for skip in aux.skipped], stale

    def result(self, finished, reports: list[dict], seconds: float) -> WriteResult:
        """The ``WriteResult`` of a finished run, from rank 0's ``finish`` and every rank's
        kernel report."""
        aux, skipped_aux, stale = finished
        return WriteResult(
            output=self.output,
            shards=[s.file_name for s in self.shards],
            tensors=sum(len(s.tensor_names) for s in self.shards),
            total_size=self.plan.total_size,
            aux_files=aux,
            skipped_aux=skipped_aux,
            removed_stale=stale,
            reused=[self.shards[i].file_name for i in self.reused],
            linked=sum(r["linked"] for r in reports),
            link_fallbacks=[tuple(f) for r in reports for f in r["link_fallbacks"]],
            seconds=seconds,
        )

    def abandon(self) -> None:
        """After a failure: removes what this process created, unless the output is complete or
        the run is resumable (``resume``)."""
        if self.index_written or self.resume:
            return
        for shard in self.finished:
            (self.output / self.shards[shard].file_name).unlink(missing_ok=True)
            unmark(self.output, self.record, shard)
        if self.lead:
            for name in self.created_entries:
                remove_entry(self.output / name)
            if self.created_record:
                discard_record(self.output)

    def release(self) -> None:
        """Releases the lock; removes the directory this run made if nothing is left in it."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        if self.created_dir and not self.index_written:
            with contextlib.suppress(OSError):
                self.output.rmdir()  # not empty: something else is in it, which stays


def make_output_dir(output: Path) -> bool:
    """Creates ``output`` (and its parents) unless it exists; True when this call made it."""
    if output.exists() and not output.is_dir():
        raise normalize_error("not_a_directory", f"{output}: not a directory", file=str(output))
    output.parent.mkdir(parents=True, exist_ok=True)
    try:
        output.mkdir()
    except FileExistsError:
        return False
    except OSError as e:
        raise normalize_error("io", f"{output}: {e.strerror}", file=str(output)) from None
    return True


class SharedProgress:
    """Forwards progress from any thread. Shards this process does not write are reported at
    once when kept by ``resume``; in a distributed run, rank 0 reports its own pace for all ranks
    (their shares are balanced) and the exact remainder at the end."""

    def __init__(
        self,
        progress: Advance | None,
        work: Sequence[tuple[int, int]],
        reused: Sequence[int],
        pending: Sequence[int],
        mine: Sequence[int],
        lead: bool,
    ):
        self.progress = progress
        self.lock = threading.Lock()
        own = [sum(work[i][k] for i in mine) for k in (0, 1)]
        shown = [sum(work[i][k] for i in (pending if lead else mine)) for k in (0, 1)]
        self.scale = [shown[k] / own[k] if own[k] else 0.0 for k in (0, 1)]
        self.target = shown
        self.done = [0.0, 0.0]
        self.sent = [0, 0]
        self._send(sum(work[i][0] for i in reused), sum(work[i][1] for i in reused))

    def __call__(self, n: int, items: int = 0) -> None:
        if self.progress is None:
            return
        with self.lock:
            self.done[0] = min(self.done[0] + n * self.scale[0], self.target[0])
            self.done[1] = min(self.done[1] + items * self.scale[1], self.target[1])
            self._catch_up()

    def complete(self) -> None:
        """Everything was written (by every rank)."""
        with self.lock:
            self.done = [float(t) for t in self.target]
            self._catch_up()

    def _catch_up(self) -> None:
        self._send(int(self.done[0]) - self.sent[0], int(self.done[1]) - self.sent[1])
        self.sent = [int(self.done[0]), int(self.done[1])]

    def _send(self, n: int, items: int) -> None:
        if self.progress is None or not (n or items):
            return
        if items:
            self.progress(n, items)
        else:
            self.progress(n)
