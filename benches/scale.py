"""Benchmark: to-fp8 over several processes, several jobs, and the cost of ``--resume`` (issue #10).

Builds a synthetic bf16 checkpoint (default 2 GiB in 16 standard-named shards, so the output keeps
16 shards to split), then measures, each run in its own process(es) and followed by ``sync``, the
output deleted between runs:

- ``normalize to-fp8 --device cpu`` (one process, the kernel on every core);
- the same under ``python -m torch.distributed.run --standalone --nproc-per-node 2`` (two ranks
  over gloo, each on half the cores; includes two torch imports and the rendezvous);
- ``--jobs 2`` (one process, two shards at a time, each on half the cores);
- resume at 50 %: a run killed (SIGKILL) once half its shards are marked done, then ``--resume``
  timed against a full run.

After one untimed run (the source written back and in the page cache), prints the median of
``--rounds`` runs of each: wall time, user CPU time (the work: every process the run started) and
system CPU time (page cache and writeback, which swing by 2x on a shared VM disk), and the
ratios to the one-process run.

    python benches/scale.py [--size-gib 2] [--rounds 3] [--workdir DIR]
    python benches/scale.py --size-gib 0.05 --rounds 1      # a quick check
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from normalize_core.run_record import DONE_DIR

GIB = 1 << 30
SHARDS = 16


def write_source(directory: Path, size_gib: float) -> int:
    """``SHARDS`` standard shards of square bf16 projections (and one norm each) holding about
    ``size_gib`` GiB; returns the checkpoint's bytes."""
    import json

    import torch
    from safetensors.torch import save_file

    edge = 2048 if size_gib >= 1 else 512
    per_tensor = edge * edge * 2
    count = max(SHARDS, round(size_gib * GIB / per_tensor))
    directory.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for shard in range(SHARDS):
        file_name = f"model-{shard + 1:05d}-of-{SHARDS:05d}.safetensors"
        tensors = {}
        for i in range(shard, count, SHARDS):
            tensors[f"model.layers.{i}.mlp.down_proj.weight"] = torch.randn(edge, edge, generator=generator).bfloat16()
            tensors[f"model.layers.{i}.post_attention_layernorm.weight"] = torch.ones(edge)
        save_file(tensors, directory / file_name, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(tensors, file_name)
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    (directory / "config.json").write_text('{"model_type": "llama"}')
    return total


def to_fp8(source: Path, output: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "normalize_core", "to-fp8", "-s", str(source), "-o", str(output), "-q", *extra]


def torchrun(ranks: int, command: list[str]) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    return [*launcher, *command[1:]]


def children_cpu() -> tuple[float, float]:
    """(user, system) CPU seconds of every child process waited for so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime, usage.ru_stime


def timed(command: list[str], output: Path) -> tuple[float, float, float]:
    """(wall, user, system) seconds for ``command`` and a ``sync``; the output is removed afterwards."""
    started, (user, system) = time.perf_counter(), children_cpu()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["sync"], check=True)
    wall, (user_after, system_after) = time.perf_counter() - started, children_cpu()
    shutil.rmtree(output)
    return wall, user_after - user, system_after - system


def marked_done(output: Path) -> int:
    """Shards the run has marked finished (a marker still being written has a hidden name)."""
    markers = output / DONE_DIR
    return sum(not name.startswith(".") for name in os.listdir(markers)) if markers.exists() else 0


def resume_at_half(command: list[str], output: Path) -> tuple[float, float, float]:
    """Kills ``command`` once half the shards are marked done, then times ``--resume`` and a sync."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    while process.poll() is None:
        if marked_done(output) >= SHARDS // 2:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.001)
    process.wait()
    if process.returncode == 0:
        raise SystemExit("the run finished before half its shards were marked done: use a larger --size-gib")
    subprocess.run(["sync"], check=True)
    return timed([*command, "--resume"], output)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gib", type=float, default=2.0, help="checkpoint size (default 2)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None, help="where to build it (default: a temporary dir)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="normalize-scale-", dir=args.workdir))
    try:
        source, output = work / "source", work / "out"
        size = write_source(source, args.size_gib)
        one = to_fp8(source, output, "--device", "cpu")
        # The source's dirty pages written back, and its pages read once: every run starts alike.
        subprocess.run(["sync"], check=True)
        timed(one, output)
        runs = {
            "1 process": one,
            "torchrun, 2 ranks": torchrun(2, one),
            "--jobs 2": [*one, "--jobs", "2"],
        }
        times: dict[str, list[tuple[float, float, float]]] = {name: [] for name in [*runs, "resume at 50 %"]}
        for _ in range(args.rounds):
            for name, command in runs.items():
                times[name].append(timed(command, output))
            times["resume at 50 %"].append(resume_at_half(one, output))
        print(f"to-fp8 of {size / GIB:.2f} GiB in {SHARDS} shards, {os.cpu_count()} cores, {args.rounds} rounds")
        medians = {name: [statistics.median(c) for c in zip(*samples, strict=True)] for name, samples in times.items()}
        base_wall, base_user, _ = medians["1 process"]
        for name, (wall, user, system) in medians.items():
            print(
                f"  {name:<18} {wall:6.2f} s wall  {size / wall / GIB:5.2f} GiB/s  ×{base_wall / wall:.2f} vs 1 process"
                f"  | CPU {user:5.2f} s user ×{base_user / user:.2f}, {system:5.2f} s system"
            )
        wall, user, _ = medians["resume at 50 %"]
        print(
            f"  finishing a run killed at 50 % takes {wall / base_wall:.0%} of a full run's wall time, "
            f"{user / base_user:.0%} of its user CPU time"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
