"""Distributed runs: ranks started by torchrun (``python -m torch.distributed.run``, the thin venv has
no ``torchrun`` script) or by hand with the same environment (``--distributed``) split one plan and
write exactly what one process writes; a failing rank stops every rank before the index; a killed
rank leaves a run that finishes with ``--resume`` on any number of ranks; a repack never touches
CUDA. Everything runs on the CPU over gloo."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cli_util import run_normalize
from normalize_core import NormalizeError, merge, repack, to_fp8
from normalize_core.distributed import SOLO, assign_shards, device_for_rank, kernel_threads, run_everywhere
from output_util import (
    INDEX,
    RECORD,
    TIMEOUT,
    llama_tensors,
    marked_done,
    tree_bytes,
    wait_for,
    write_engine_checkpoint,
    write_indexed_checkpoint,
)

KB = 1000
#: ``python -m normalize_core`` with test instruments (CUDA calls recorded, a rank's file size capped).
RANK_WRAPPER = Path(__file__).with_name("rank_wrapper.py")


def torchrun(ranks: int, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc-per-node RANKS ARGS``."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, env=env)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(ranks: int, args: list[str]) -> list[subprocess.Popen]:
    """Ranks of one run started by hand, as another launcher would (``--distributed`` and the
    torchrun environment variables)."""
    port = free_port()
    processes = []
    for rank in range(ranks):
        env = dict(os.environ)
        env.update(
            RANK=str(rank),
            WORLD_SIZE=str(ranks),
            LOCAL_RANK=str(rank),
            LOCAL_WORLD_SIZE=str(ranks),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        command = [sys.executable, "-m", "normalize_core", *args, "--distributed"]
        processes.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return processes


def finish(processes: list[subprocess.Popen]) -> list[tuple[int, str]]:
    """(exit status, stderr) of every rank; none may hang."""
    results = []
    for process in processes:
        _, stderr = process.communicate(timeout=TIMEOUT)
        results.append((process.returncode, stderr))
    return results


@pytest.fixture
def engine_source(tmp_path: Path) -> Path:
    return write_engine_checkpoint(tmp_path / "engine", llama_tensors(8))


def test_torchrun_to_fp8_with_more_shards_than_ranks_matches_one_process(engine_source: Path, tmp_path: Path):
    to_fp8(engine_source, tmp_path / "single", max_shard_bytes=20 * KB)
    output = tmp_path / "ranks"
    result = torchrun(
        2, "-m", "normalize_core", "to-fp8", "-s", str(engine_source), "-o", str(output), "--max-shard-size", "20KB"
    )
    assert result.returncode == 0, result.stderr
    assert len([n for n in os.listdir(output) if n.endswith(".safetensors")]) > 10
    assert tree_bytes(output) == tree_bytes(tmp_path / "single")
    assert result.stdout.count("Wrote ") == 1  # rank 0 alone reports


def test_torchrun_to_fp8_with_fewer_shards_than_ranks_matches_one_process(tmp_path: Path):
    source = write_indexed_checkpoint(tmp_path / "standard", llama_tensors(4), files=2)
    to_fp8(source, tmp_path / "single")
    output = tmp_path / "ranks"
    result = torchrun(3, "-m", "normalize_core", "to-fp8", "-s", str(source), "-o", str(output))
    assert result.returncode == 0, result.stderr
    assert sorted(n for n in os.listdir(output) if n.endswith(".safetensors")) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    assert tree_bytes(output) == tree_bytes(tmp_path / "single")


def test_torchrun_repack_never_initializes_cuda(engine_source: Path, tmp_path: Path):
    calls = tmp_path / "cuda-calls"
    env = {**os.environ, "CUDA_CALLS": str(calls)}
    repack(engine_source, tmp_path / "single", max_shard_bytes=40 * KB)
    output = tmp_path / "ranks"
    args = ["repack", "-s", str(engine_source), "-o", str(output), "--max-shard-size", "40KB"]
    result = torchrun(2, str(RANK_WRAPPER), *args, env=env)
    assert result.returncode == 0, result.stderr
    assert tree_bytes(output) == tree_bytes(tmp_path / "single")
    assert not calls.exists(), calls.read_text()

    # The guard sees CUDA being asked for: to-fp8 on a GPU device records the call.
    guarded = subprocess.run(
        [sys.executable, str(RANK_WRAPPER), "to-fp8", "-s", str(engine_source), "-o", str(tmp_path / "gpu")]
        + ["--device", "cuda", "-q"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=env,
    )
    assert "is_available" in calls.read_text(), guarded.stderr


def test_ranks_started_by_hand_merge_like_one_process(tmp_path: Path):
    tensors = llama_tensors(4)
    base = write_indexed_checkpoint(tmp_path / "base", tensors, files=3)
    extra_tensors = tensors | {f"mtp.{i}.weight": torch.full((64, 64), float(i)).bfloat16() for i in range(6)}
    extra = write_engine_checkpoint(tmp_path / "extra", extra_tensors, files=2)
    merge(base, extra, tmp_path / "single", max_shard_bytes=10 * KB)
    output = tmp_path / "ranks"
    args = ["merge", "-b", str(base), "-e", str(extra), "-o", str(output), "--max-shard-size", "10KB", "--yes"]
    results = finish(start_ranks(2, args))
    assert [code for code, _ in results] == [0, 0], results
    assert tree_bytes(output) == tree_bytes(tmp_path / "single")


def test_a_rank_that_fails_stops_every_rank_before_the_index(engine_source: Path, tmp_path: Path):
    """Under torchrun, rank 1 cannot write a file over 20 KB (as on a full disk): the run exits
    non-zero, no index is written, rank 0 names rank 1 and its shard, and what the run wrote is
    removed again."""
    output, logs = tmp_path / "out", tmp_path / "logs"
    args = ["repack", "-s", str(engine_source), "-o", str(output), "--max-shard-size", "40KB", "-q"]
    separate_logs = ["--log-dir", str(logs), "--redirects", "2"]  # each rank's stderr in a file of its own
    result = torchrun(2, *separate_logs, str(RANK_WRAPPER), *args, env={**os.environ, "FILE_SIZE_LIMIT": "1:20000"})
    assert result.returncode != 0
    [lead] = next(logs.rglob("0/stderr.log")).read_text().splitlines()
    assert lead.startswith(f"error: rank 1: {output}/model-") and lead.endswith("File too large (os error 27)")
    [own] = next(logs.rglob("1/stderr.log")).read_text().splitlines()
    assert own.startswith(f"error: {output}/model-") and own.endswith("File too large (os error 27)")
    assert not output.exists()


def test_a_killed_rank_leaves_a_run_that_resumes_on_another_number_of_ranks(engine_source: Path, tmp_path: Path):
    to_fp8(engine_source, tmp_path / "single", max_shard_bytes=20 * KB)
    output = tmp_path / "out"
    args = ["to-fp8", "-s", str(engine_source), "-o", str(output), "--max-shard-size", "20KB", "-q"]
    ranks = start_ranks(2, args)
    try:
        assert wait_for(output / RECORD, ranks[1])
        while not marked_done(output):
            assert ranks[1].poll() is None
            time.sleep(0.0005)
        ranks[1].send_signal(signal.SIGKILL)
    finally:
        results = finish(ranks)
    assert results[1][0] == -signal.SIGKILL
    assert results[0][0] == 2
    [line] = results[0][1].splitlines()
    assert "rank 0: lost contact with the other ranks" in line and "--resume" in line
    assert (output / RECORD).exists() and not (output / INDEX).exists()
    done = marked_done(output)

    resumed = torchrun(3, "-m", "normalize_core", *args[:-1], "--resume")

    assert resumed.returncode == 0, resumed.stderr
    assert f"Kept {done} shard{'s' if done > 1 else ''} an interrupted run had finished" in resumed.stdout
    assert tree_bytes(output) == tree_bytes(tmp_path / "single")


class FakeGroup:
    """A rank of a pretend run whose other ranks' step outcomes are given."""

    def __init__(self, rank: int, others: list):
        self.rank, self.world_size = rank, len(others) + 1
        self.local_rank, self.local_world_size = rank, self.world_size
        self.others = others

    def all_gather(self, value):
        gathered = list(self.others)
        gathered.insert(self.rank, value)
        return gathered

    def broadcast(self, value):
        return value


def shard_failure(rank_file: str):
    return ("io", f"/out/{rank_file}: File too large (os error 27)", f"/out/{rank_file}", None)


def test_rank_0_names_every_failed_rank_and_its_shard():
    with pytest.raises(NormalizeError) as raised:
        run_everywhere(FakeGroup(0, [None, shard_failure("model-00002-of-00004.safetensors")]), lambda: "fine")
    assert str(raised.value) == "rank 2: /out/model-00002-of-00004.safetensors: File too large (os error 27)"
    assert raised.value.kind == "io" and raised.value.file == "/out/model-00002-of-00004.safetensors"

    def own_failure():
        raise ValueError("bad option")

    with pytest.raises(NormalizeError) as raised:
        run_everywhere(FakeGroup(0, [shard_failure("model-00003-of-00004.safetensors")]), own_failure)
    assert str(raised.value) == (
        "2 of 2 ranks failed: rank 0: bad option; rank 1: /out/model-00003-of-00004.safetensors: File too large "
        "(os error 27)"
    )


def test_other_ranks_raise_their_own_failure_or_stop_quietly():
    with pytest.raises(NormalizeError) as raised:
        run_everywhere(FakeGroup(1, [shard_failure("model-00001-of-00002.safetensors")]), lambda: "fine")
    assert raised.value.kind == "peer_failed"

    def own_failure():
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        run_everywhere(FakeGroup(1, [None]), own_failure)
    assert run_everywhere(FakeGroup(1, [None, None]), lambda: "fine") == "fine"


def test_shards_are_assigned_whole_balanced_and_the_same_everywhere():
    sizes = [50, 10, 40, 10, 30, 20, 20]
    assigned = assign_shards(sizes, list(range(7)), 3)
    assert assigned == assign_shards(sizes, list(range(7)), 3)
    assert sorted(i for shards in assigned for i in shards) == list(range(7))
    loads = [sum(sizes[i] for i in shards) for shards in assigned]
    assert max(loads) - min(loads) <= max(sizes)
    assert all(shards == sorted(shards) for shards in assigned)
    assert assign_shards([5, 5], [1], 3) == [[1], [], []]


def test_devices_and_cores_per_rank():
    assert device_for_rank("auto", SOLO) == "auto"
    assert device_for_rank("cuda:3", FakeGroup(1, [None])) == "cuda:3"
    assert device_for_rank("cpu", FakeGroup(1, [None])) == "cpu"
    cores = os.cpu_count() or 1
    assert kernel_threads(1, SOLO) == cores
    assert kernel_threads(2, FakeGroup(0, [None])) == max(1, cores // 4)


def test_distributed_without_its_environment_is_one_line(engine_source: Path, tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    args = ["repack", "-s", str(engine_source), "-o", str(tmp_path / "out"), "--distributed"]
    result = run_normalize(*args, env=env, timeout=TIMEOUT)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "error: --distributed needs RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the environment (torchrun sets "
        "them; so does python -m torch.distributed.run)"
    ]
    assert not (tmp_path / "out").exists()


def test_distributed_without_torch_is_one_line(engine_source: Path, tmp_path: Path):
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "torch.py").write_text("raise ImportError('torch is blocked in this test')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(blocker), os.environ.get("PYTHONPATH")]))}
    env.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    args = ["repack", "-s", str(engine_source), "-o", str(tmp_path / "out"), "--distributed"]
    result = run_normalize(*args, env=env, timeout=TIMEOUT)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "error: --distributed coordinates the ranks with torch.distributed, and torch is not installed "
        "(pip install 'model-normalize[gpu]')"
    ]


def test_a_distributed_merge_never_asks(tmp_path: Path):
    base = write_indexed_checkpoint(tmp_path / "base", llama_tensors(2), files=1)
    args = ["merge", "-b", str(base), "-e", str(base), "-o", str(tmp_path / "out"), "--distributed"]
    result = run_normalize(*args, timeout=TIMEOUT)
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["error: a distributed merge never asks for confirmation; pass --yes"]
