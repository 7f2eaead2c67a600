"""One writer per output directory: runs into the same output exclude each other at once, a killed
run's lock never blocks the next one, cleanup touches only what a run created, and a file system
without locks degrades with a warning instead of hanging."""

from __future__ import annotations

import errno
import fcntl
import os
import subprocess
import sys
from pathlib import Path

import pytest

from normalize_core import NormalizeError, repack
from normalize_core.output_lock import OutputLockWarning
from output_util import (
    DONE_DIR,
    INDEX,
    LOCK,
    RECORD,
    TIMEOUT,
    assert_index_names_only_complete_shards,
    llama_tensors,
    normalize_command,
    outcome,
    run,
    tree_bytes,
    wait_gone,
    write_engine_checkpoint,
)

KB = 1000


@pytest.fixture
def source(tmp_path: Path) -> Path:
    return write_engine_checkpoint(tmp_path / "engine", llama_tensors(8))


@pytest.fixture
def reference(source: Path, tmp_path: Path) -> dict[str, bytes]:
    repack(source, tmp_path / "reference", max_shard_bytes=40 * KB)
    return tree_bytes(tmp_path / "reference")


def repack_command(source: Path, output: Path, *extra: str) -> list[str]:
    return normalize_command("repack", "-s", source, "-o", output, "--max-shard-size", "40KB", "-q", *extra)


def test_a_finished_output_holds_no_lock_or_record(reference):
    assert not [name for name in reference if name.startswith(".")]


def test_concurrent_overwrite_runs_exclude_each_other(source: Path, reference, tmp_path: Path, forkserver):
    """Two --overwrite runs into one output, started within a millisecond of each other, eight
    times: a run that exits 0 leaves a complete output; the other is refused at once with one
    line naming the first one's pid, or ran after it."""
    output = tmp_path / "out"
    repack(source, output, max_shard_bytes=40 * KB)
    refusals = 0
    for trial in range(8):
        logs = [tmp_path / f"trial-{trial}-{side}" for side in "ab"]
        pids = [forkserver.start(repack_command(source, output, "--overwrite"), log=log) for log in logs]
        for pid in pids:
            wait_gone(pid)
        results = [outcome(log) for log in logs]
        assert any(code == 0 for code, _ in results), results
        for (code, stderr), other in zip(results, reversed(pids), strict=True):
            if code != 0:
                refusals += 1
                assert code == 2, stderr
                [line] = stderr.splitlines()
                assert f"{output}: another run is writing into it (normalize repack, pid {other} on " in line
        assert_index_names_only_complete_shards(output)
        assert tree_bytes(output) == reference, f"trial {trial}"
    assert refusals >= 1


HOLD_LOCK = """
import sys, time
from pathlib import Path
from normalize_core.output_lock import OutputLock
lock = OutputLock.acquire(Path(sys.argv[1]), "repack")
print("locked", flush=True)
time.sleep(600)
"""


def test_the_lock_names_its_holder_and_kill_9_releases_it(source: Path, reference, tmp_path: Path):
    output = tmp_path / "out"
    output.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(output)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        refused = run(repack_command(source, output))
        assert refused.returncode == 2
        [line] = refused.stderr.splitlines()
        assert line.startswith(
            f"error: {output}: another run is writing into it (normalize repack, pid {holder.pid} on "
        )
        assert line.endswith("; wait for it to end or stop it")
        assert os.listdir(output) == [LOCK]
    finally:
        holder.kill()
        holder.wait(timeout=TIMEOUT)
    # The dead holder's lock file is still there, and blocks nothing.
    assert os.listdir(output) == [LOCK]
    finished = run(repack_command(source, output))
    assert finished.returncode == 0, finished.stderr
    assert tree_bytes(output) == reference


def test_without_working_flock_the_run_goes_on_with_a_warning(source: Path, reference, tmp_path: Path, monkeypatch):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    output = tmp_path / "out"
    with pytest.warns(OutputLockWarning, match="cannot lock it .*start only one"):
        repack(source, output, max_shard_bytes=40 * KB)
    assert tree_bytes(output) == reference


def test_the_lock_file_is_never_written_through_a_symlink(source: Path, tmp_path: Path):
    output = tmp_path / "out"
    output.mkdir()
    outside = tmp_path / "outside.txt"
    outside.write_text("keep")
    (output / LOCK).symlink_to(outside)
    with pytest.raises(NormalizeError) as refused:
        repack(source, output, max_shard_bytes=40 * KB, overwrite=True)
    assert "symbolic link" in str(refused.value)
    assert outside.read_text() == "keep"
    assert sorted(os.listdir(output)) == [LOCK]


def test_run_files_are_never_written_through_symlinks(source: Path, reference, tmp_path: Path):
    """Links where the lock, the record or the marker folder go (left in an output, or planted)
    are replaced, never followed: the places they point at stay untouched."""
    output = tmp_path / "out"
    output.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "record.json").write_text("keep")
    (output / RECORD).symlink_to(outside / "record.json")
    (output / DONE_DIR).symlink_to(outside)
    repack(source, output, max_shard_bytes=40 * KB, overwrite=True)
    assert tree_bytes(output) == reference
    assert sorted(os.listdir(outside)) == ["record.json"]
    assert (outside / "record.json").read_text() == "keep"


def test_a_refused_run_leaves_a_directory_it_did_not_make(source: Path, tmp_path: Path):
    """Refusals (here: an output holding another checkpoint) change nothing, and a directory that
    existed before stays even when it is empty after a failed run."""
    output = tmp_path / "out"
    output.mkdir()
    (output / "notes.txt").write_text("mine")
    with pytest.raises(NormalizeError):
        repack(source, output)
    assert os.listdir(output) == ["notes.txt"]
    (output / "notes.txt").unlink()

    def interrupt(_n: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        repack(source, output, max_shard_bytes=40 * KB, progress=interrupt)
    assert output.is_dir()
    assert os.listdir(output) == []


#: Runs the command line with a file-size limit: a write past it fails (EFBIG), as a full disk would.
LIMITED_CLI = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))
from normalize_core.cli import main
sys.argv[0] = "normalize"
main()
"""


def test_a_failed_run_removes_only_the_files_it_created(source: Path, tmp_path: Path):
    """An --overwrite run over an earlier output fails while copying the aux files, after its
    shards are in place: its shards, the aux files it added and its record go; the user's files and
    the earlier run's files stay (only its index goes, as it would name replaced shards)."""
    (source / "big.bin").write_bytes(bytes(100_000))  # sorted after assets/, over the size limit
    output = tmp_path / "out"
    repack(source, output, max_shard_bytes=400 * KB)
    (output / "notes.txt").write_text("mine")
    (output / "assets").rename(output / "kept-assets")
    before = set(os.listdir(output))

    failed = subprocess.run(
        [sys.executable, "-c", LIMITED_CLI, *repack_command(source, output, "--overwrite")[3:]],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )

    assert failed.returncode == 2, failed.stderr
    assert "File too large" in failed.stderr and "big.bin" in failed.stderr
    assert set(os.listdir(output)) == before - {INDEX}
    assert (output / "notes.txt").read_text() == "mine"
    assert (output / "kept-assets" / "vocab.txt").exists()
