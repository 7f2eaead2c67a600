"""Benchmark: ``normalize merge`` against ``cp`` of the same bytes.

Builds a base checkpoint of ``--base-gb`` GiB in ``--tensors`` tensors (standard shards plus
index, sizes varying around the mean) and an engine-named extra checkpoint holding some of base's
tensors (in float32, so they conflict) plus ``--extra-tensors`` tensors base lacks, stored
in a file of their own. Then, for ``--rounds`` rounds, alternates:

- ``cp``: ``cp -r base out`` plus ``cp`` of extra's extra-only file, then ``sync`` (the same bytes
  the merge writes; the merge fsyncs every shard);
- ``merge``: ``normalize merge --base --extra --out --yes`` (copies in the kernel);
- ``merge --hardlink``: the same with base's shards hard-linked.

Each run writes a fresh output; page cache is warm for all (nothing here may drop caches). Prints
medians, ratios against ``cp``, and the command's own start-up time (included in its figures).

    python benches/merge.py                       # 2 GiB, 18,867 tensors, 3 rounds
    python benches/merge.py --base-gb 0.2 --tensors 2000 --rounds 1
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GIB = 1 << 30
#: The command users run: the ``normalize`` console script beside this Python; ``python -m
#: normalize_core`` (12 ms more, for runpy) only where no script is installed.
SCRIPT = Path(sys.executable).with_name("normalize")
NORMALIZE = [str(SCRIPT)] if SCRIPT.is_file() else [sys.executable, "-m", "normalize_core"]
#: Random bytes repeated to fill tensors: incompressible and fast to produce.
FILL_BLOCK = os.urandom(16 << 20)
INDEX = "model.safetensors.index.json"


def write_shard(path: Path, tensors: list[tuple[str, str, int]]) -> None:
    """One safetensors file of ``(name, dtype, nbytes)`` tensors (1-D), contiguous, in order."""
    itemsize = {"BF16": 2, "F32": 4}
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, nbytes in tensors:
        header[name] = {"dtype": dtype, "shape": [nbytes // itemsize[dtype]], "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        remaining = offset
        while remaining:
            chunk = FILL_BLOCK[: min(remaining, len(FILL_BLOCK))]
            f.write(chunk)
            remaining -= len(chunk)


def tensor_sizes(total: int, count: int, rng: random.Random) -> list[int]:
    """``count`` even sizes (multiples of 4 bytes) between 0.25x and 1.75x the mean, summing to ~``total``."""
    mean = total / count
    return [max(4, int(mean * rng.uniform(0.25, 1.75)) // 4 * 4) for _ in range(count)]


def build(workdir: Path, base_gb: float, tensors: int, extra_tensors: int, shard_gb: float) -> tuple[Path, Path, str]:
    """Writes base and extra; returns their paths and the name of extra's extra-only file."""
    rng = random.Random(0)
    base, extra = workdir / "base", workdir / "extra"
    base.mkdir()
    extra.mkdir()
    sizes = tensor_sizes(int(base_gb * GIB), tensors, rng)
    names = [f"model.layers.{i // 64}.experts.{i % 64}.weight" for i in range(tensors)]
    shards: list[list[tuple[str, str, int]]] = [[]]
    used = 0
    for name, size in zip(names, sizes, strict=True):
        if used + size > shard_gb * GIB and shards[-1]:
            shards.append([])
            used = 0
        shards[-1].append((name, "BF16", size))
        used += size
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file_name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_shard(base / file_name, shard)
        weight_map |= {name: file_name for name, _, _ in shard}
    index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
    (base / INDEX).write_text(json.dumps(index))
    (base / "config.json").write_text('{"model_type": "bench"}')
    # Extra: a few of base's tensors in float32 (conflicts, dropped by the merge; not FP8, which
    # merge refuses to mix with a bf16 base) ...
    overlap = [(name, "F32", size) for name, size in zip(names[:50], sizes[:50], strict=True)]
    write_shard(extra / "model-extra-0001-fused-save_rank0.safetensors", overlap)
    # ... and the tensors base lacks (an MTP block), in a file of their own.
    extra_sizes = tensor_sizes(max(int(0.02 * base_gb * GIB), 4 * extra_tensors), extra_tensors, rng)
    only = [(f"model.mtp.{i}.weight", "BF16", size) for i, size in enumerate(extra_sizes)]
    extra_only_file = "model-extra-0002-fused-save_rank1.safetensors"
    write_shard(extra / extra_only_file, only)
    return base, extra, extra_only_file


def timed(command: list[str]) -> float:
    """Seconds one command takes (it must succeed)."""
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def fresh(path: Path) -> Path:
    """Removes ``path`` and flushes that removal, so the next timed run starts clean."""
    shutil.rmtree(path, ignore_errors=True)
    subprocess.run(["sync"], check=True)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-gb", type=float, default=2.0, help="base checkpoint size in GiB (default 2)")
    parser.add_argument("--tensors", type=int, default=18_867, help="tensors in base (default 18,867)")
    parser.add_argument("--extra-tensors", type=int, default=200, help="tensors only extra holds (default 200)")
    parser.add_argument("--shard-gb", type=float, default=0.5, help="base shard size in GiB (default 0.5)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of cp / merge / merge --hardlink (default 3)")
    parser.add_argument("--workdir", type=Path, default=None, help="where to build (default: a temp dir in /tmp)")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="merge-bench-", dir=args.workdir))
    try:
        print(f"building base ({args.base_gb} GiB, {args.tensors} tensors) and extra in {workdir} ...", flush=True)
        base, extra, extra_only_file = build(workdir, args.base_gb, args.tensors, args.extra_tensors, args.shard_gb)
        written = sum(f.stat().st_size for f in base.iterdir()) + (extra / extra_only_file).stat().st_size
        out = workdir / "out"
        merge = [*NORMALIZE, "merge", "--base", str(base), "--extra", str(extra), "--out", str(out), "--yes", "-q"]
        runs: dict[str, list[float]] = {"cp": [], "merge": [], "merge --hardlink": []}
        for round_no in range(1, args.rounds + 1):
            fresh(out)
            cp = f"cp -r {base} {out} && cp {extra / extra_only_file} {out}/ && sync"
            runs["cp"].append(timed(["sh", "-c", cp]))
            fresh(out)
            runs["merge"].append(timed(merge))
            fresh(out)
            runs["merge --hardlink"].append(timed([*merge, "--hardlink"]))
            shown = ", ".join(f"{k} {v[-1]:.2f} s" for k, v in runs.items())
            print(f"round {round_no}: {shown}", flush=True)
        startup = statistics.median(timed([*NORMALIZE, "--version"]) for _ in range(3))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    cp_median = statistics.median(runs["cp"])
    print(f"\n{written / GIB:.2f} GiB written per run, {args.tensors} base tensors, {args.rounds} rounds (medians):")
    for label, seconds in runs.items():
        median = statistics.median(seconds)
        print(f"  {label:18s} {median:7.3f} s  {median / cp_median:5.2f}x cp  ({written / GIB / median:6.2f} GiB/s)")
    print(f"  (normalize start-up, included above: {startup:.3f} s)")


if __name__ == "__main__":
    main()
