"""``--jobs`` for to-fp8: shards quantized in parallel give the same bytes, each job holds one
quantizer (its buffers: memory stays a few tensors per job) and a share of the cores, and a
failure in one job stops the others without leaving anything behind or hanging."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import normalize_core.fp8.convert as convert
from normalize_core import NormalizeError, to_fp8
from normalize_core.errors import normalize_error
from normalize_core.fp8.quantizers import KernelQuantizer
from output_util import (
    llama_tensors,
    normalize_command,
    outcome,
    tree_bytes,
    wait_gone,
    write_engine_checkpoint,
    write_indexed_checkpoint,
)

KB = 1000


@pytest.fixture
def source(tmp_path: Path) -> Path:
    return write_engine_checkpoint(tmp_path / "engine", llama_tensors(8))


@pytest.fixture
def counted_quantizers(monkeypatch) -> list:
    """Every quantizer to-fp8 makes, in order."""
    made = []
    original = convert.quantizer_for

    def counting(device, fp8, threads=None):
        quantizer = original(device, fp8, threads=threads)
        made.append(quantizer)
        return quantizer

    monkeypatch.setattr(convert, "quantizer_for", counting)
    return made


@pytest.mark.parametrize("jobs", [2, 3])
def test_parallel_shards_give_the_same_bytes(source: Path, tmp_path: Path, jobs: int, counted_quantizers):
    to_fp8(source, tmp_path / "one", device="cpu", max_shard_bytes=20 * KB)
    counted_quantizers.clear()
    result = to_fp8(source, tmp_path / "many", device="cpu", max_shard_bytes=20 * KB, jobs=jobs)
    assert len(result.shards) > jobs
    assert tree_bytes(tmp_path / "many") == tree_bytes(tmp_path / "one")
    assert 1 <= len(counted_quantizers) <= jobs
    assert all(q.threads == max(1, (os.cpu_count() or 1) // jobs) for q in counted_quantizers)


def test_a_failing_job_stops_the_others_and_leaves_nothing(source: Path, tmp_path: Path, monkeypatch):
    calls = 0
    original = KernelQuantizer.quantize

    def failing(self, tensor, layout):
        nonlocal calls
        calls += 1
        if calls == 5:
            raise normalize_error("invalid_quantize_input", f"tensor '{layout.name}': injected")
        return original(self, tensor, layout)

    monkeypatch.setattr(KernelQuantizer, "quantize", failing)
    output = tmp_path / "out"
    with pytest.raises(NormalizeError, match="injected"):
        to_fp8(source, output, device="cpu", max_shard_bytes=20 * KB, jobs=3)
    assert not output.exists()


def test_an_inf_in_a_later_shard_fails_every_time_without_hanging(tmp_path: Path, forkserver):
    """The kernel refuses a non-finite weight while the shard's copies still run on their thread:
    the run ends at once with one line, and leaves nothing (twelve tries, one and three jobs)."""
    tensors = llama_tensors(6)
    tensors["model.layers.3.mlp.down_proj.weight"][0, 0] = float("inf")
    source = write_indexed_checkpoint(tmp_path / "standard", tensors, files=3)
    for trial in range(12):
        output, log = tmp_path / f"out-{trial}", tmp_path / f"log-{trial}"
        jobs = "1" if trial % 2 else "3"
        pid = forkserver.start(
            normalize_command("to-fp8", "-s", source, "-o", output, "--device", "cpu", "-j", jobs, "-q"), log
        )
        wait_gone(pid, limit=60)
        code, stderr = outcome(log)
        assert code == 2, stderr
        [line] = stderr.splitlines()
        assert "model.layers.3.mlp.down_proj.weight" in line
        assert not output.exists()


def test_interrupted_parallel_jobs_leave_nothing(source: Path, tmp_path: Path):
    class Interrupted(Exception):
        pass

    def interrupt(_n: int, items: int = 0) -> None:
        if items:
            raise Interrupted

    output = tmp_path / "out"
    with pytest.raises(Interrupted):
        to_fp8(source, output, device="cpu", max_shard_bytes=20 * KB, jobs=2, progress=interrupt)
    assert not output.exists()


def test_jobs_on_the_command_line(source: Path, tmp_path: Path, forkserver):
    to_fp8(source, tmp_path / "one", device="cpu", max_shard_bytes=20 * KB)
    log = tmp_path / "log"
    output = tmp_path / "out"
    pid = forkserver.start(
        normalize_command("to-fp8", "-s", source, "-o", output, "--max-shard-size", "20KB", "--jobs", "2", "-q"), log
    )
    wait_gone(pid)
    assert outcome(log) == (0, "")
    assert tree_bytes(output) == tree_bytes(tmp_path / "one")
