"""``--resume``: a run killed at any moment is finished byte-identically, and only the same run.

The kill tests run the real command line as a separate process (forked from a warm interpreter,
see ``output_util.Forkserver``), wait until it has written its run record, kill it with SIGKILL
after a random part of an uninterrupted run's write time, check what it left (the source
untouched, no index naming a missing or short shard), then resume and compare every file with an
uninterrupted run's output.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import normalize_core.output
from builders import snapshot
from normalize_core import NormalizeError, merge, repack, to_bf16, to_fp8
from normalize_core.cli import app
from output_util import (
    DONE_DIR,
    INDEX,
    LOCK,
    RECORD,
    Forkserver,
    alive,
    assert_index_names_only_complete_shards,
    llama_tensors,
    marked_done,
    normalize_command,
    run,
    tree_bytes,
    wait_for_pid,
    wait_gone,
    write_engine_checkpoint,
    write_indexed_checkpoint,
)

KB = 1000


@dataclass
class Case:
    """One writing command: its sources, its command line, and the same run through the API."""

    command: str
    sources: list[Path]
    cli: Callable[[Path], list[str]]
    api: Callable[..., object]


def repack_case(root: Path) -> Case:
    source = write_engine_checkpoint(root / "engine", llama_tensors(8))
    return Case(
        "repack",
        [source],
        lambda out: normalize_command("repack", "-s", source, "-o", out, "--max-shard-size", "40KB", "-q"),
        lambda out, **kw: repack(source, out, max_shard_bytes=40 * KB, **kw),
    )


def fp8_case(root: Path) -> Case:
    source = write_engine_checkpoint(root / "engine", llama_tensors(8))
    return Case(
        "to-fp8",
        [source],
        lambda out: normalize_command(
            "to-fp8", "-s", source, "-o", out, "--device", "cpu", "--max-shard-size", "20KB", "-q"
        ),
        lambda out, **kw: to_fp8(source, out, device="cpu", max_shard_bytes=20 * KB, **kw),
    )


def merge_case(root: Path) -> Case:
    tensors = llama_tensors(6)
    base = write_indexed_checkpoint(root / "base", tensors, files=7)
    g = torch.Generator().manual_seed(9)
    mtp = {f"model.mtp.{i}.proj.weight": torch.randn(128, 128, generator=g).bfloat16() for i in range(8)}
    extra = write_engine_checkpoint(root / "extra", tensors | mtp, files=2)
    return Case(
        "merge",
        [base, extra],
        lambda out: normalize_command(
            "merge", "--base", base, "--extra", extra, "--out", out, "--max-shard-size", "40KB", "--yes", "-q"
        ),
        lambda out, **kw: merge(base, extra, out, max_shard_bytes=40 * KB, **kw),
    )


def bf16_case(root: Path) -> Case:
    source = root / "fp8"
    to_fp8(write_engine_checkpoint(root / "engine", llama_tensors(8)), source, device="cpu", max_shard_bytes=20 * KB)
    return Case(
        "to-bf16",
        [source],
        lambda out: normalize_command("to-bf16", "-s", source, "-o", out, "--device", "cpu", "-q"),
        lambda out, **kw: to_bf16(source, out, device="cpu", **kw),
    )


CASES = {"repack": repack_case, "to-fp8": fp8_case, "merge": merge_case, "to-bf16": bf16_case}
#: The commands the kill test runs.
KILLED = list(CASES)


@pytest.fixture(params=list(CASES))
def case(request, tmp_path: Path) -> Case:
    return CASES[request.param](tmp_path / "sources")


@pytest.fixture
def reference(case: Case, tmp_path: Path) -> dict[str, bytes]:
    """Every file of an uninterrupted run's output."""
    case.api(tmp_path / "reference")
    return tree_bytes(tmp_path / "reference")


def write_time(case: Case, output: Path, forkserver: Forkserver) -> float:
    """Seconds an uninterrupted command-line run's record exists (its shards are being written)."""
    pid = forkserver.start(case.cli(output))
    assert wait_for_pid(output / RECORD, pid)
    started = time.monotonic()
    while (output / RECORD).exists():
        time.sleep(0.0005)
    elapsed = time.monotonic() - started
    wait_gone(pid)
    return elapsed


def kill_after(output: Path, pid: int, shards: int, delay: float) -> None:
    """Kills ``pid`` ``delay`` seconds after ``shards`` shards of its run were marked done (or its
    record went: the run is finishing)."""
    wait_for_pid(output / RECORD, pid)
    while alive(pid) and (output / RECORD).exists() and marked_done(output) < shards:
        time.sleep(0.0002)
    time.sleep(delay)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    wait_gone(pid)


@pytest.mark.parametrize("command", KILLED)
def test_killed_at_random_moments_resumes_to_identical_output(command: str, tmp_path: Path, forkserver):
    """Each kill lands a random time after a random number of shards were finished, so the 20
    kills spread over the whole run whatever the machine's speed."""
    case = CASES[command](tmp_path / "sources")
    case.api(tmp_path / "reference")
    reference = tree_bytes(tmp_path / "reference")
    sources = {str(s): snapshot(s) for s in case.sources}
    # The fastest of three runs: one slowed by writeback would push every kill towards the end.
    budget = min(write_time(case, tmp_path / f"timed-{i}", forkserver) for i in range(3))
    for i in range(3):
        assert tree_bytes(tmp_path / f"timed-{i}") == reference
    planned = len([name for name in reference if name.endswith(".safetensors")])
    rng = random.Random(f"kill-{case.command}")
    interrupted, shards_done = 0, set()
    for trial in range(20):
        output = tmp_path / f"killed-{trial}"
        pid = forkserver.start(case.cli(output))
        kill_after(output, pid, rng.randint(0, planned), rng.uniform(0, budget / planned))

        assert_index_names_only_complete_shards(output)
        if (output / RECORD).exists():
            interrupted += 1
            shards_done.add(marked_done(output))
            result = case.api(output, resume=True)
            assert getattr(result, "written", result).output == output
        assert tree_bytes(output) == reference, f"trial {trial}"
    assert {str(s): snapshot(s) for s in case.sources} == sources
    assert interrupted >= 12, interrupted
    assert len(shards_done) >= 5, shards_done


class Interrupted(Exception):
    pass


def leave_unfinished(case: Case, output: Path, monkeypatch) -> None:
    """A run with ``resume`` that fails after every shard was written (copying the aux files):
    it keeps its shards and record for the next ``resume``."""

    def fail(*_args):
        raise Interrupted

    with monkeypatch.context() as patch:
        patch.setattr(normalize_core.output, "copy_aux_files", fail)
        with pytest.raises(Interrupted):
            case.api(output, resume=True)
    assert (output / RECORD).exists()
    assert not (output / INDEX).exists()
    assert not (output / LOCK).exists()


def shard_names(output: Path) -> list[str]:
    return sorted(p.name for p in output.glob("model-*.safetensors"))


def test_resume_keeps_verified_shards_and_rewrites_the_rest(case: Case, reference, tmp_path: Path, monkeypatch):
    output = tmp_path / "out"
    leave_unfinished(case, output, monkeypatch)
    shards = shard_names(output)
    assert len(shards) >= 6
    missing, truncated, unmarked, torn, kept = shards[0], shards[1], shards[2], shards[3], shards[4:]
    # Never finished: no marker, no file, but a temporary cut short by the kill.
    (output / missing).rename(output / f".{missing}.partial-4242")
    os.truncate(output / f".{missing}.partial-4242", 100)
    # Marked done, but the file is short now.
    os.truncate(output / truncated, (output / truncated).stat().st_size - 1)
    # Full size and header, but no marker (renamed into place, killed before the marker): other
    # bytes, which must not survive.
    (output / DONE_DIR / unmarked).unlink()
    # Its marker left empty (markers are not fsynced, so a crash can do that): the same.
    (output / DONE_DIR / torn).write_bytes(b"")
    for name in (unmarked, torn):
        data = bytearray((output / name).read_bytes())
        data[-1] ^= 0xFF
        (output / name).write_bytes(bytes(data))

    result = case.api(output, resume=True)

    assert sorted(getattr(result, "written", result).reused) == kept
    assert tree_bytes(output) == reference


def test_resume_finishes_after_every_shard_was_written(case: Case, reference, tmp_path: Path, monkeypatch):
    output = tmp_path / "out"
    leave_unfinished(case, output, monkeypatch)
    result = case.api(output, resume=True)
    assert len(getattr(result, "written", result).reused) == len(shard_names(output))
    assert tree_bytes(output) == reference


def test_resume_after_a_kill_between_discarding_markers_and_record(case: Case, reference, tmp_path, monkeypatch):
    """The record outlives its markers for a moment at the end of a run (and a kill can land there):
    resume then writes every shard again."""
    output = tmp_path / "out"
    leave_unfinished(case, output, monkeypatch)
    shutil.rmtree(output / DONE_DIR)
    result = case.api(output, resume=True)
    assert getattr(result, "written", result).reused == []
    assert tree_bytes(output) == reference


def test_without_resume_an_unfinished_run_is_refused(case: Case, tmp_path: Path, monkeypatch):
    output = tmp_path / "out"
    leave_unfinished(case, output, monkeypatch)
    before = tree_bytes(output)
    with pytest.raises(NormalizeError) as refused:
        case.api(output)
    assert refused.value.kind == "unfinished_run"
    assert f"unfinished {case.command} run" in str(refused.value)
    assert "--resume" in str(refused.value) and "--overwrite" in str(refused.value)
    assert tree_bytes(output) == before


def test_overwrite_starts_an_unfinished_run_over(case: Case, reference, tmp_path: Path, monkeypatch):
    output = tmp_path / "out"
    leave_unfinished(case, output, monkeypatch)
    result = case.api(output, overwrite=True)
    assert getattr(result, "written", result).reused == []
    assert tree_bytes(output) == reference


def refused_resume(case: Case, output: Path, api: Callable[..., object] | None = None) -> str:
    before = tree_bytes(output)
    with pytest.raises(NormalizeError) as refused:
        (api or case.api)(output, resume=True)
    assert refused.value.kind == "resume_mismatch", refused.value
    assert "--overwrite" in str(refused.value)
    assert tree_bytes(output) == before
    return str(refused.value)


@pytest.mark.parametrize("factory", [repack_case], ids=["repack"])
def test_resume_refused_after_another_shard_size(factory, tmp_path: Path, monkeypatch):
    case = factory(tmp_path / "sources")
    leave_unfinished(case, tmp_path / "out", monkeypatch)
    source = case.sources[0]
    message = refused_resume(
        case, tmp_path / "out", lambda out, **kw: repack(source, out, max_shard_bytes=30 * KB, **kw)
    )
    assert "shards" in message and "--max-shard-size" in message


@pytest.mark.parametrize(
    ("option", "value", "named"),
    [
        ("scale_fmt", "ue8m0", "scale_fmt"),
        ("block_size", 64, "block_size"),
        ("skip_patterns", ["o_proj"], "tensors_to_fp8"),
    ],
)
def test_resume_refused_after_another_to_fp8_option(option, value, named, tmp_path: Path, monkeypatch):
    case = fp8_case(tmp_path / "sources")
    leave_unfinished(case, tmp_path / "out", monkeypatch)
    message = refused_resume(case, tmp_path / "out", lambda out, **kw: case.api(out, **{option: value}, **kw))
    assert f"option {named} was" in message


def rewrite_header(path: Path, change: str) -> None:
    """Rewrites a safetensors file's header, keeping it valid: ``"size"`` pads it with 8 more
    spaces (the file grows), ``"header"`` swaps the order of its last two entries (same size)."""
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    text = data[8 : 8 + length].decode()
    if change == "size":
        new = text + " " * 8
    else:
        header = json.loads(text)
        names = list(header)
        names[-2], names[-1] = names[-1], names[-2]
        new = json.dumps({n: header[n] for n in names}, separators=(",", ":"))
        assert len(new) == len(text.rstrip()), "the reordered header must keep its length"
        new += " " * (length - len(new))
    path.write_bytes(len(new).to_bytes(8, "little") + new.encode() + data[8 + length :])


def test_resume_refused_after_another_to_bf16_option(tmp_path: Path, monkeypatch):
    case = bf16_case(tmp_path / "sources")
    leave_unfinished(case, tmp_path / "out", monkeypatch)
    message = refused_resume(case, tmp_path / "out", lambda out, **kw: case.api(out, dtype="float16", **kw))
    assert "option dtype was 'bfloat16' in the unfinished run, now 'float16'" in message


def test_resume_refused_after_the_source_config_changed(tmp_path: Path, monkeypatch):
    """to-bf16 reads its block size from config.json: another config is another run."""
    case = bf16_case(tmp_path / "sources")
    leave_unfinished(case, tmp_path / "out", monkeypatch)
    config = case.sources[0] / "config.json"
    config.write_text(config.read_text().replace('"hidden_size": 128', '"hidden_size": 256'))
    assert "option config_sha256 was" in refused_resume(case, tmp_path / "out")


@pytest.mark.parametrize("change", ["size", "header", "mtime"])
def test_resume_refused_after_a_source_shard_changed(case: Case, change: str, tmp_path: Path, monkeypatch):
    output = tmp_path / "out"
    leave_unfinished(case, output, monkeypatch)
    victim = sorted(case.sources[0].glob("*.safetensors"))[-1]
    if change == "mtime":
        info = victim.stat()
        os.utime(victim, ns=(info.st_atime_ns, info.st_mtime_ns + 1_000_000_000))
    else:
        rewrite_header(victim, change)
    message = refused_resume(case, output)
    expected = {"size": "changed size", "header": "has another header", "mtime": "was modified"}[change]
    assert f"source file {victim} {expected}" in message


def test_resume_refused_for_another_command(tmp_path: Path, monkeypatch):
    case = repack_case(tmp_path / "sources")
    leave_unfinished(case, tmp_path / "out", monkeypatch)
    source = case.sources[0]
    message = refused_resume(
        case, tmp_path / "out", lambda out, **kw: to_fp8(source, out, device="cpu", max_shard_bytes=40 * KB, **kw)
    )
    assert "the unfinished run is a repack, this is a to-fp8" in message


def test_resume_into_a_new_or_empty_output_starts_fresh(tmp_path: Path):
    case = repack_case(tmp_path / "sources")
    case.api(tmp_path / "new", resume=True)
    (tmp_path / "empty").mkdir()
    case.api(tmp_path / "empty", resume=True)
    assert tree_bytes(tmp_path / "new") == tree_bytes(tmp_path / "empty")
    assert RECORD not in os.listdir(tmp_path / "new")


def test_resume_into_a_finished_output_is_refused(tmp_path: Path):
    case = repack_case(tmp_path / "sources")
    case.api(tmp_path / "out")
    with pytest.raises(NormalizeError) as refused:
        case.api(tmp_path / "out", resume=True)
    assert refused.value.kind == "nothing_to_resume"
    assert "--overwrite" in str(refused.value)


def test_a_failing_resumable_run_keeps_what_it_finished(tmp_path: Path):
    """A to-fp8 run with ``resume`` stopped half-way (an exception from its progress callback,
    as Ctrl-C would) keeps its finished shards; the next ``resume`` writes only the rest."""
    case = fp8_case(tmp_path / "sources")
    case.api(tmp_path / "reference")
    output = tmp_path / "out"
    calls = 0

    def stop_half_way(_n: int, items: int = 0) -> None:
        nonlocal calls
        calls += items
        if calls > 8:
            raise Interrupted

    with pytest.raises(Interrupted):
        case.api(output, resume=True, progress=stop_half_way)
    finished = marked_done(output)
    assert 0 < finished < len(shard_names(tmp_path / "reference"))
    assert not [name for name in os.listdir(output) if ".partial-" in name]

    result = case.api(output, resume=True)

    assert len(result.reused) == finished
    assert tree_bytes(output) == tree_bytes(tmp_path / "reference")


def test_resume_on_the_command_line(tmp_path: Path, monkeypatch):
    case = repack_case(tmp_path / "sources")
    case.api(tmp_path / "reference")
    output = tmp_path / "out"
    leave_unfinished(case, output, monkeypatch)

    refused = run(case.cli(output))
    assert refused.returncode == 2
    [line] = refused.stderr.splitlines()
    assert line.startswith(f"error: {output}: holds an unfinished repack run (pid {os.getpid()} on ")
    assert line.endswith("); pass --resume to finish it or --overwrite to start over")

    resumed = run([*case.cli(output), "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert "Kept " in resumed.stdout and " an interrupted run had finished: model-" in resumed.stdout
    assert tree_bytes(output) == tree_bytes(tmp_path / "reference")


def test_resume_and_overwrite_together_are_a_usage_error(tmp_path: Path):
    source = repack_case(tmp_path / "sources").sources[0]
    result = CliRunner().invoke(
        app, ["repack", "-s", str(source), "-o", str(tmp_path / "out"), "--resume", "--overwrite"]
    )
    assert result.exit_code == 2
    assert "give --overwrite or --resume, not both" in result.output
    assert not (tmp_path / "out").exists()


def test_an_unreadable_record_is_refused_unless_overwriting(tmp_path: Path):
    case = repack_case(tmp_path / "sources")
    case.api(tmp_path / "reference")
    output = tmp_path / "out"
    output.mkdir()
    (output / RECORD).write_text("{not json")
    for resume in (False, True):
        with pytest.raises(NormalizeError) as refused:
            case.api(output, resume=resume)
        assert refused.value.kind == "invalid_run_record"
        assert "--overwrite" in str(refused.value)
    case.api(output, overwrite=True)
    assert tree_bytes(output) == tree_bytes(tmp_path / "reference")
