"""Writing shards whose plan holds provided tensors (bytes the caller computes), ``jobs`` shards at a
time: for each shard the kernel copies its copied tensors on a helper thread while a filler writes
the provided ones. ``ComputedTensors`` is the filler of commands that compute each provided tensor
from one source tensor at a time (to-fp8 quantizes, to-bf16 dequantizes)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed, wait
from pathlib import Path
from typing import Protocol

from normalize_core._core import Checkpoint, OutputPlan, ShardPlan, ShardWriter, sync_dir

#: ``advance(n_bytes, items=0)``: progress of a write (``items``: e.g. tensors quantized).
Advance = Callable[..., None]
#: ``fill(writer, shard, advance)``: writes every provided tensor of shard ``shard`` (an index
#: into the plan) with ``writer.write``, reporting progress through ``advance``. Called on a worker
#: thread while the kernel copies the shard's other tensors, up to ``jobs`` shards at a time.
ShardFiller = Callable[[ShardWriter, int, Advance], None]


class Converter(Protocol):
    """Turns one source tensor into output tensors (e.g. an FP8 weight and its scale)."""

    #: Where it computes ("cpu", "cuda:0").
    device: str

    def load(self, name: str) -> object:
        """Source tensor ``name``, ready to convert (called one tensor ahead, on another thread)."""
        ...

    def convert(self, loaded: object, name: str) -> Sequence[tuple[str, object]]:
        """``(output tensor, bytes buffer)`` pairs computed from source tensor ``name``; the
        buffers may be reused by the next call."""
        ...


class _Stopped(Exception):
    """A shard job stops because another one failed."""


def write_filled_shards(
    plan: OutputPlan,
    output: Path,
    shards: Sequence[int],
    fill: ShardFiller,
    jobs: int,
    advance: Advance,
    on_done: Callable[[int], None],
) -> None:
    """Writes shards ``shards``, ``jobs`` at a time, calling ``on_done(shard)`` (on the job's
    thread) once each is in place. The first failure stops the other jobs and is raised."""
    stop = threading.Event()

    def checked(n: int, items: int = 0) -> None:
        if stop.is_set():
            raise _Stopped
        advance(n, items)

    jobs = max(1, min(jobs, len(shards)))
    with (
        ThreadPoolExecutor(jobs, thread_name_prefix="normalize-copy") as copier,
        ThreadPoolExecutor(jobs, thread_name_prefix="normalize-shard") as pool,
    ):
        futures = [pool.submit(write_filled_shard, plan, output, i, fill, copier, checked, on_done) for i in shards]
        try:
            for future in as_completed(futures):
                future.result()
        except BaseException:
            stop.set()
            for future in futures:
                future.cancel()
            raise


def write_filled_shard(
    plan: OutputPlan,
    output: Path,
    shard: int,
    fill: ShardFiller,
    copier: ThreadPoolExecutor,
    advance: Advance,
    on_done: Callable[[int], None],
) -> None:
    """One shard of ``write_filled_shards``. The copy is always over before the writer is
    finished or discarded (a writer is never dropped while the kernel still writes into it)."""
    writer = plan.open_shard(shard, output)
    failed = threading.Event()

    def copy_progress(n: int) -> None:
        if failed.is_set():
            raise _Stopped
        advance(n)

    try:
        copying = copier.submit(writer.copy_sources, copy_progress)
        try:
            fill(writer, shard, advance)
        except BaseException:
            failed.set()
            raise
        finally:
            wait([copying])
        copying.result()
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    sync_dir(output)
    on_done(shard)


class ComputedTensors:
    """A ``ShardFiller`` for provided tensors computed from one source tensor at a time.

    ``inputs[shard]`` lists the source tensors shard ``shard``'s provided tensors come from, in
    data order; ``new_converter()`` makes a ``Converter``; ``source_bytes(name)`` is the progress a
    source tensor is worth (``advance(source_bytes(name), 1)`` once it is written). Each job takes
    a converter of its own and hands it back when its shard is done (converters reuse buffers), so
    there are never more converters than jobs, and memory stays a few tensors per job. The first
    converter is made at once: a device that cannot be used fails here, before anything is written.
    """

    def __init__(
        self,
        inputs: Sequence[Sequence[str]],
        new_converter: Callable[[], Converter],
        source_bytes: Callable[[str], int],
    ):
        self.inputs = inputs
        self.new_converter = new_converter
        self.source_bytes = source_bytes
        self.idle = [new_converter()]
        #: Where the converters compute.
        self.device = self.idle[0].device
        self.lock = threading.Lock()

    def __call__(self, writer: ShardWriter, shard: int, advance: Advance) -> None:
        converter = self._take()
        try:
            # Closed at once on a failure too: its pending load must end before the converter
            # (whose buffers it fills) serves another job.
            with contextlib.closing(read_ahead(self.inputs[shard], converter.load)) as loaded:
                for name, tensor in loaded:
                    for output_name, data in converter.convert(tensor, name):
                        writer.write(output_name, data)
                    del tensor
                    advance(self.source_bytes(name), 1)
        finally:
            with self.lock:
                self.idle.append(converter)

    def _take(self) -> Converter:
        with self.lock:
            if self.idle:
                return self.idle.pop()
        return self.new_converter()

    def shard_work(self, shards: Sequence[ShardPlan], checkpoint: Checkpoint) -> list[tuple[int, int]]:
        """Per shard, the progress it reports in all (the source bytes of its copied tensors and
        of its inputs) and the number of its inputs: ``write_output``'s ``shard_work``."""
        work = []
        for shard, inputs in zip(shards, self.inputs, strict=True):
            provided = set(shard.provided)
            copied = sum(checkpoint.tensor(name).nbytes for name in shard.tensor_names if name not in provided)
            work.append((copied + sum(self.source_bytes(name) for name in inputs), len(inputs)))
        return work


def read_ahead(names: Sequence[str], load: Callable[[str], object]) -> Iterator[tuple[str, object]]:
    """Yields ``(name, load(name))`` in order, loading the next one on a helper thread while the
    caller works on the current one."""
    with ThreadPoolExecutor(1, thread_name_prefix="normalize-read") as reader:
        pending = reader.submit(load, names[0]) if names else None
        for i, name in enumerate(names):
            current = pending.result()
            pending = reader.submit(load, names[i + 1]) if i + 1 < len(names) else None
            yield name, current
