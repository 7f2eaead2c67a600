"""Helpers for the tests of the output lifecycle (locks, run records, resume, distributed runs):
small many-shard checkpoints written with the ``safetensors`` library, runs of the real command
line as subprocesses, and byte-for-byte pictures of directories."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import torch

from builders import INDEX, write_checkpoint

RECORD = ".normalize-run.json"
DONE_DIR = ".normalize-run.done"
LOCK = ".normalize-lock"
#: Every subprocess of these tests is killed after this long: a hang fails the test, never the suite.
TIMEOUT = 120
AUX = {
    "config.json": '{"model_type": "llama", "hidden_size": 128}',
    "tokenizer.json": "{}",
    "assets/vocab.txt": "a\nb\n",
}


def llama_tensors(layers: int, size: int = 128, seed: int = 0) -> dict[str, torch.Tensor]:
    """``layers`` layers of two bf16 ``size``×``size`` projections (quantized by to-fp8) and an f32
    norm (kept), plus an embedding."""
    g = torch.Generator().manual_seed(seed)
    tensors = {"model.embed_tokens.weight": torch.randn(64, size, generator=g).bfloat16()}
    for i in range(layers):
        tensors[f"model.layers.{i}.mlp.down_proj.weight"] = torch.randn(size, size, generator=g).bfloat16()
        tensors[f"model.layers.{i}.self_attn.o_proj.weight"] = torch.randn(size, size, generator=g).bfloat16()
        tensors[f"model.layers.{i}.input_layernorm.weight"] = torch.rand(size, generator=g)
    return tensors


def write_engine_checkpoint(directory: Path, tensors: dict[str, torch.Tensor], files: int = 3) -> Path:
    """Engine-named shards (no index) plus config, tokenizer and a sub-folder of aux files."""
    return write_checkpoint(directory, tensors, layout="engine", files=files, aux=AUX)


def write_indexed_checkpoint(directory: Path, tensors: dict[str, torch.Tensor], files: int) -> Path:
    """Standard shards and an index, the way transformers writes them, plus the aux files."""
    return write_checkpoint(directory, tensors, layout="indexed", files=files, aux=AUX)


def tree_bytes(directory: Path) -> dict[str, bytes]:
    """Every file below ``directory``, hidden ones included: relative path → bytes. Equal
    pictures mean byte-identical directories with the same files."""
    found = {}
    for root, _dirs, files in os.walk(directory):
        for name in files:
            path = Path(root) / name
            found[path.relative_to(directory).as_posix()] = path.read_bytes()
    return found


def marked_done(output: Path) -> int:
    """How many shards the unfinished run in ``output`` has marked done (a marker being written
    when its writer was killed is a temporary file, and does not count)."""
    try:
        return len([name for name in os.listdir(output / DONE_DIR) if not name.startswith(".")])
    except FileNotFoundError:
        return 0


def shard_is_complete(path: Path) -> bool:
    """Whether ``path`` is a whole safetensors file: as long as its header says."""
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            return False
        (length,) = struct.unpack("<Q", prefix)
        try:
            header = json.loads(f.read(length))
        except ValueError:
            return False
    header.pop("__metadata__", None)
    end = max((entry["data_offsets"][1] for entry in header.values()), default=0)
    return path.stat().st_size == 8 + length + end


def assert_index_names_only_complete_shards(output: Path) -> None:
    """If ``output`` has an index, every shard it names is there in full."""
    index = output / INDEX
    if not index.exists():
        return
    weight_map = json.loads(index.read_text())["weight_map"]
    for shard in sorted(set(weight_map.values())):
        assert shard_is_complete(output / shard), f"the index names {shard}, which is missing or short"


def normalize_command(*args: str) -> list[str]:
    """``python -m normalize_core ARGS`` (the command line users run)."""
    return [sys.executable, "-m", "normalize_core", *map(str, args)]


def run(command: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, env=env)


def wait_for(path: Path, process: subprocess.Popen, limit: float = TIMEOUT) -> bool:
    """Polls until ``path`` exists (True) or ``process`` has ended (False)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if path.exists():
            return True
        if process.poll() is not None:
            return path.exists()
        time.sleep(0.0005)
    raise AssertionError(f"{path} did not appear within {limit} s")


#: The fork server's program: imports the command line once, then for each JSON request read from
#: stdin (``{"argv": [...], "log": path or null}``) forks a child that runs ``normalize ARGV`` and
#: prints the child's pid. A child writes its stderr to ``LOG.err`` and, unless killed, its exit
#: status to ``LOG.code``. Children are reaped by the kernel.
FORKSERVER = """
import json, os, signal, sys
import normalize_core.cli
signal.signal(signal.SIGCHLD, signal.SIG_IGN)
for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        null = os.open(os.devnull, os.O_RDWR)
        log = request["log"]
        err = os.open(log + ".err", os.O_WRONLY | os.O_CREAT | os.O_TRUNC) if log else null
        for fd, target in ((0, null), (1, null), (2, err)):
            os.dup2(target, fd)
        sys.argv = ["normalize", *request["argv"]]
        try:
            normalize_core.cli.main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            code = 1
        sys.stderr.flush()
        if log:
            with open(log + ".code", "w") as f:
                f.write(str(code))
        os._exit(code)
    print(pid, flush=True)
"""


class Forkserver:
    """Starts command-line runs as children of one warm interpreter: a kill test starts dozens of
    runs, and a fresh interpreter's start-up (0.5 s and more on a busy machine) would dominate, and
    two runs meant to race start within a millisecond of each other. Each run is still its own
    process, killed with a real SIGKILL."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", FORKSERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )

    def start(self, command: list[str], log: Path | None = None) -> int:
        """Starts ``normalize ARGS`` (``command`` as ``normalize_command`` builds it); returns the pid.
        With ``log``, the run's stderr goes to ``LOG.err`` and its exit status to ``LOG.code``."""
        assert command[:3] == [sys.executable, "-m", "normalize_core"], command
        request = {"argv": command[3:], "log": None if log is None else str(log)}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return int(self.process.stdout.readline())

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=TIMEOUT)


def outcome(log: Path) -> tuple[int | None, str]:
    """(exit status or None if killed, stderr) of a run started with ``log``."""
    code = log.with_name(log.name + ".code")
    return (int(code.read_text()) if code.exists() else None), log.with_name(log.name + ".err").read_text()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_for_pid(path: Path, pid: int, limit: float = TIMEOUT) -> bool:
    """Polls until ``path`` exists (True) or process ``pid`` has ended (False)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if path.exists():
            return True
        if not alive(pid):
            return path.exists()
        time.sleep(0.0005)
    raise AssertionError(f"{path} did not appear within {limit} s")


def wait_gone(pid: int, limit: float = TIMEOUT) -> None:
    deadline = time.monotonic() + limit
    while alive(pid):
        assert time.monotonic() < deadline, f"process {pid} still runs after {limit} s"
        time.sleep(0.0005)
