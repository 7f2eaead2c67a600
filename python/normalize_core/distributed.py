"""Runs over many processes: ranks started by torchrun (or any launcher that sets the same
environment) split one deterministic plan between them.

Every rank plans the same run on its own; ``torch.distributed`` with the gloo backend carries the
coordination (a fingerprint, lists of shard indices, results: small Python objects, never
tensors), so CPU-only nodes work as well as GPU ones, and a repack never touches a GPU.

``joined(enabled)`` yields the group this process belongs to: ``SOLO`` (one process, every
collective a no-op) or a ``TorchGroup``. ``run_everywhere(group, work)`` runs one step on every
rank and raises on all of them when it failed on any, so that no rank waits for one that gave up.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from normalize_core._core import NormalizeError
from normalize_core.errors import normalize_error

#: What every rank's environment must name (torchrun sets all of them).
REQUIRED_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
#: How long ranks wait to find each other at the start.
JOIN_TIMEOUT_S = 10 * 60
#: How long a rank that finished its shards waits for the slowest one: ranks hold byte-balanced
#: shares, and a rank that dies closes its connections, which ends the wait at once.
WAIT_TIMEOUT_S = 24 * 3600

T = TypeVar("T")


class Group(Protocol):
    """The processes of one run and the collectives between them (rank 0 leads)."""

    rank: int
    world_size: int
    #: This process's index among the ranks on its node, and how many ranks the node runs.
    local_rank: int
    local_world_size: int

    def broadcast(self, value: T) -> T:
        """Rank 0's ``value``, on every rank."""
        ...

    def all_gather(self, value: T) -> list[T]:
        """Every rank's ``value``, in rank order, on every rank."""
        ...


@dataclass(frozen=True)
class Solo:
    """A run of one process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    def broadcast(self, value: T) -> T:
        return value

    def all_gather(self, value: T) -> list[T]:
        return [value]


SOLO = Solo()


class TorchGroup:
    """One rank of a run coordinated through a gloo process group."""

    def __init__(self, dist, group) -> None:
        self.dist = dist
        self.group = group
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))

    def broadcast(self, value: T) -> T:
        box = [value]
        self._collective(lambda: self.dist.broadcast_object_list(box, src=0, group=self.group))
        return box[0]

    def all_gather(self, value: T) -> list[T]:
        gathered: list[Any] = [None] * self.world_size
        self._collective(lambda: self.dist.all_gather_object(gathered, value, group=self.group))
        return gathered

    def _collective(self, call: Callable[[], None]) -> None:
        try:
            call()
        except (RuntimeError, OSError) as e:
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise normalize_error(
                "rank_lost",
                f"rank {self.rank}: lost contact with the other ranks ({reason}); no index was written, "
                "so the run can be finished with --resume",
            ) from None


def launched_by_torchrun() -> bool:
    """Whether this process is a worker started by torchrun."""
    return "TORCHELASTIC_RUN_ID" in os.environ and "RANK" in os.environ


@contextmanager
def joined(enabled: bool) -> Iterator[Group]:
    """The group of this run: ``SOLO`` unless ``enabled``, else the ranks named by the
    environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``, and ``LOCAL_RANK``,
    ``LOCAL_WORLD_SIZE`` for devices), joined over gloo for the duration of the block."""
    if not enabled:
        yield SOLO
        return
    missing = [name for name in REQUIRED_ENV if name not in os.environ]
    if missing:
        raise normalize_error(
            "distributed_environment",
            f"--distributed needs {', '.join(missing)} in the environment (torchrun sets them; "
            "so does python -m torch.distributed.run)",
        )
    from datetime import timedelta

    try:
        import torch.distributed as dist
    except ImportError:
        raise normalize_error(
            "distributed_needs_torch",
            "--distributed coordinates the ranks with torch.distributed, and torch is not installed "
            "(pip install 'model-normalize[gpu]')",
        ) from None

    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("gloo", timeout=timedelta(seconds=JOIN_TIMEOUT_S))
    # A group of our own: the waits need a longer timeout than joining, and a caller's default
    # group may use a backend (NCCL) that carries no Python objects between CPUs.
    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=WAIT_TIMEOUT_S))
    try:
        yield TorchGroup(dist, group)
    finally:
        if owned:
            dist.destroy_process_group()


def run_everywhere(group: Group, work: Callable[[], T]) -> T:
    """Runs ``work`` on this rank and returns its result once every rank's step succeeded.

    When it fails anywhere, it raises everywhere: a rank whose own step failed raises its own
    error, rank 0 raises one error naming every failed rank and its message, and the other
    ranks raise a ``peer_failed`` error (commands exit quietly on it: rank 0 tells).
    """
    if group.world_size == 1:
        return work()
    try:
        result, failure = work(), None
    except Exception as e:  # noqa: BLE001 - handed to the other ranks, then raised again below
        result, failure = None, e
    outcomes = group.all_gather(None if failure is None else _describe(failure))
    failed = [(rank, outcome) for rank, outcome in enumerate(outcomes) if outcome is not None]
    if not failed:
        return result
    if failure is not None and (group.rank != 0 or not isinstance(failure, (NormalizeError, ValueError, OSError))):
        raise failure
    if group.rank == 0:
        raise _ranks_failed(failed, group.world_size) from failure
    raise normalize_error("peer_failed", f"rank {group.rank}: stopped because another rank failed (rank 0 reports it)")


def _describe(failure: Exception) -> tuple[str, str, str | None, str | None]:
    """``(kind, message, file, tensor)`` of a failure, to send to rank 0."""
    if isinstance(failure, NormalizeError):
        return failure.kind, str(failure), failure.file, failure.tensor
    return type(failure).__name__, str(failure) or type(failure).__name__, None, None


def _ranks_failed(failed: Sequence[tuple[int, tuple[str, str, str | None, str | None]]], world_size: int):
    kind, _, file, tensor = failed[0][1]
    messages = "; ".join(f"rank {rank}: {message}" for rank, (_, message, _, _) in failed)
    prefix = "" if len(failed) == 1 else f"{len(failed)} of {world_size} ranks failed: "
    return normalize_error(kind, prefix + messages, file=file, tensor=tensor)


def assign_shards(sizes: Sequence[int], pending: Sequence[int], world_size: int) -> list[list[int]]:
    """Whole shards for each rank, balanced by bytes and the same on every rank: largest first,
    each to the rank with the fewest bytes so far (the lowest such rank); each list in plan order."""
    loads = [0] * world_size
    assigned: list[list[int]] = [[] for _ in range(world_size)]
    for shard in sorted(pending, key=lambda i: (-sizes[i], i)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        assigned[rank].append(shard)
        loads[rank] += sizes[shard]
    return [sorted(shards) for shards in assigned]


def device_for_rank(device: str, group: Group) -> str:
    """The device a rank quantizes on: ``auto`` and ``cuda`` become ``cuda:LOCAL_RANK`` (modulo
    the node's GPUs) in a distributed run, ``auto`` the CPU where torch sees no GPU; an explicit
    ``cpu`` or ``cuda:N`` stays."""
    from normalize_core.devices import AUTO, CPU, CUDA

    if group.world_size == 1 or device not in (AUTO, CUDA):
        return device
    from normalize_core.fp8.quantizers import gpu_present

    if device == AUTO and not gpu_present():
        return CPU
    import torch

    return f"{CUDA}:{group.local_rank % max(1, torch.cuda.device_count())}"


def kernel_threads(jobs: int, group: Group) -> int:
    """Threads for each CPU quantization job: the node's cores shared between its ranks' jobs."""
    return max(1, (os.cpu_count() or 1) // (max(1, jobs) * group.local_world_size))
