"""Benchmark ``normalize repack`` against ``cp -r`` and a straightforward safetensors+torch repack.

Generates (once, then reused) an engine-named bf16 checkpoint of ``--size-gb`` GiB, then runs in
alternation, ``--rounds`` times: ``cp -r``, ``normalize repack`` and the straightforward version
written below (load each tensor with ``safe_open``, collect a shard's worth, ``save_file``). Every
variant runs as its own process and is followed by ``sync`` inside its timing (``normalize`` also
fsyncs each shard itself); its output is deleted before the next run. Prints the median times,
throughput, the ratios against the targets, and each variant's peak RSS (measured by GNU time).

The page cache is warm: the source was just written or read, and dropping caches needs root.

    python benches/repack.py                          # 4.5 GiB checkpoint, 4 GiB shards, 3 rounds
    python benches/repack.py --size-gb 0.3 --rounds 1 # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

GIB = 1 << 30
MIB = 1 << 20

#: Layout of the generated model (bf16): a Llama-like shape with grouped-query attention.
HIDDEN = 2048
KV = 512
INTERMEDIATE = 8192
VOCAB = 32000
RANKS = 4
DTYPE_BYTES = 2

#: Targets of the repack issue.
MIN_RATIO_TO_CP = 0.9
MIN_RATIO_TO_NAIVE = 2.0
MAX_RSS_MIB = 100

#: Measures each run's peak RSS (``%M``, KiB).
GNU_TIME = "/usr/bin/time"

#: Runs the installed CLI with this interpreter.
NORMALIZE = [sys.executable, "-c", "from normalize_core.cli import run; run()"]


def model_shapes(size_bytes: int) -> list[tuple[str, list[int]]]:
    """Embedding, as many decoder layers as it takes to reach ``size_bytes``, then norm and lm_head."""
    shapes: list[tuple[str, list[int]]] = [("model.embed_tokens.weight", [VOCAB, HIDDEN])]
    total = 2 * VOCAB * HIDDEN * DTYPE_BYTES
    layer = 0
    while total < size_bytes:
        p = f"model.layers.{layer}"
        block = [
            (f"{p}.input_layernorm.weight", [HIDDEN]),
            (f"{p}.self_attn.q_proj.weight", [HIDDEN, HIDDEN]),
            (f"{p}.self_attn.k_proj.weight", [KV, HIDDEN]),
            (f"{p}.self_attn.v_proj.weight", [KV, HIDDEN]),
            (f"{p}.self_attn.o_proj.weight", [HIDDEN, HIDDEN]),
            (f"{p}.post_attention_layernorm.weight", [HIDDEN]),
            (f"{p}.mlp.gate_proj.weight", [INTERMEDIATE, HIDDEN]),
            (f"{p}.mlp.up_proj.weight", [INTERMEDIATE, HIDDEN]),
            (f"{p}.mlp.down_proj.weight", [HIDDEN, INTERMEDIATE]),
        ]
        shapes += block
        total += sum(nbytes(shape) for _, shape in block)
        layer += 1
    shapes += [("model.norm.weight", [HIDDEN]), ("lm_head.weight", [VOCAB, HIDDEN])]
    return shapes


def nbytes(shape: list[int]) -> int:
    count = 1
    for d in shape:
        count *= d
    return count * DTYPE_BYTES


def write_shard(path: Path, tensors: list[tuple[str, list[int]]], noise: bytes) -> None:
    """Writes a bf16 safetensors file, streaming the data from a rotating window over ``noise``."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in tensors:
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + nbytes(shape)]}
        offset += nbytes(shape)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    window = len(noise) // 2
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for i, (_, shape) in enumerate(tensors):
            remaining = nbytes(shape)
            start = (i * 4099) % window
            while remaining:
                piece = min(remaining, window)
                f.write(noise[start : start + piece])
                remaining -= piece
        f.flush()
        os.fsync(f.fileno())


def generate_checkpoint(source: Path, size_bytes: int) -> int:
    """Writes the engine-named checkpoint (``RANKS`` files of about equal size) plus a config;
    returns its tensor bytes. Reuses an existing one generated with the same parameters."""
    shapes = model_shapes(size_bytes)
    total = sum(nbytes(shape) for _, shape in shapes)
    spec = json.loads(json.dumps({"shapes": shapes, "ranks": RANKS}))
    spec_file = source.with_name(source.name + ".spec.json")
    if source.is_dir() and spec_file.exists() and json.loads(spec_file.read_text()) == spec:
        print(f"reusing {source} ({total / GIB:.2f} GiB)")
        return total
    shutil.rmtree(source, ignore_errors=True)
    spec_file.unlink(missing_ok=True)
    source.mkdir(parents=True)
    print(f"generating {source} ({total / GIB:.2f} GiB in {RANKS} engine-named files) ...", flush=True)
    noise = os.urandom(32 * MIB)
    per_rank: list[list[tuple[str, list[int]]]] = [[] for _ in range(RANKS)]
    done = 0
    for name, shape in shapes:
        per_rank[min(RANKS - 1, done * RANKS // total)].append((name, shape))
        done += nbytes(shape)
    for rank, tensors in enumerate(per_rank):
        write_shard(source / f"model-language-{rank + 1:04d}-fused-save_rank{rank}.safetensors", tensors, noise)
    config = {"architectures": ["LlamaForCausalLM"], "hidden_size": HIDDEN, "torch_dtype": "bfloat16"}
    (source / "config.json").write_text(json.dumps(config, indent=2))
    spec_file.write_text(json.dumps(spec))
    return total


def natural_key(name: str) -> list[object]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def naive_repack(source: Path, output: Path, max_shard_bytes: int) -> None:
    """The straightforward version: load tensors with safetensors+torch, collect up to a shard's
    worth in memory, ``save_file`` it; name the shards and write the index at the end."""
    import torch  # noqa: F401 - the straightforward version is a torch program
    from safetensors import safe_open
    from safetensors.torch import save_file

    output.mkdir(parents=True)
    written: list[tuple[Path, list[str]]] = []
    shard: dict = {}
    shard_bytes = 0
    total_size = 0

    def flush() -> None:
        nonlocal shard, shard_bytes
        path = output / f"shard-{len(written)}.tmp"
        save_file(shard, path, metadata={"format": "pt"})
        written.append((path, list(shard)))
        shard, shard_bytes = {}, 0

    files = sorted((p for p in source.iterdir() if p.suffix == ".safetensors"), key=lambda p: natural_key(p.name))
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                size = tensor.numel() * tensor.element_size()
                if shard and shard_bytes + size > max_shard_bytes:
                    flush()
                shard[name] = tensor
                shard_bytes += size
                total_size += size
    if shard:
        flush()
    weight_map = {}
    for i, (path, names) in enumerate(written, start=1):
        final = f"model-{i:05d}-of-{len(written):05d}.safetensors"
        path.rename(output / final)
        weight_map |= dict.fromkeys(names, final)
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (output / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    for entry in source.iterdir():
        if entry.is_file() and not entry.name.endswith(".safetensors"):
            shutil.copy2(entry, output / entry.name)


@dataclass
class Variant:
    """One way of producing the output, with its measurements."""

    name: str
    command: list[str]
    seconds: list[float] = field(default_factory=list)
    peak_rss_kib: list[int] = field(default_factory=list)

    def run(self, output: Path, rss_file: Path) -> None:
        """Runs the command under GNU time (whose small process forks it, so the peak RSS is the
        command's own, not inherited from this Python process), then ``sync``."""
        started = time.perf_counter()
        process = subprocess.run([GNU_TIME, "-f", "%M", "-o", str(rss_file), *self.command], stdout=subprocess.DEVNULL)
        os.sync()
        self.seconds.append(time.perf_counter() - started)
        if process.returncode != 0:
            raise SystemExit(f"{self.name} failed with exit status {process.returncode}: {' '.join(self.command)}")
        if not output.exists():
            raise SystemExit(f"{self.name} wrote nothing to {output}")
        self.peak_rss_kib.append(int(rss_file.read_text().split()[-1]))

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def peak_rss_mib(self) -> float:
        return max(self.peak_rss_kib) / 1024


def verdict(ok: bool) -> str:
    return "meets target" if ok else "MISSES target"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=4.5, help="checkpoint size in GiB (default 4.5)")
    parser.add_argument("--shard-gb", type=float, default=4.0, help="output shard limit in GiB (default 4)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each variant (default 3)")
    parser.add_argument(
        "--workdir", type=Path, default=Path(__file__).resolve().parent.parent / "bench-data", help="scratch space"
    )
    worker_args = ("SOURCE", "OUTPUT", "MAX_SHARD_BYTES")
    parser.add_argument("--naive-worker", nargs=3, metavar=worker_args, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.naive_worker:
        source, output, limit = args.naive_worker
        naive_repack(Path(source), Path(output), int(limit))
        return

    if not os.access(GNU_TIME, os.X_OK):
        raise SystemExit(f"{GNU_TIME} (GNU time) is needed to measure peak RSS")
    workdir: Path = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    source, output = workdir / "engine-checkpoint", workdir / "output"
    size_bytes = int(args.size_gb * GIB)
    free = shutil.disk_usage(workdir).free
    if free < 2.2 * size_bytes:
        raise SystemExit(f"{workdir}: {free / GIB:.1f} GiB free, need about {2.2 * size_bytes / GIB:.1f} GiB")
    total = generate_checkpoint(source, size_bytes)
    shard_bytes = int(args.shard_gb * GIB)
    shutil.rmtree(output, ignore_errors=True)

    variants = [
        Variant("cp -r", ["cp", "-r", str(source), str(output)]),
        Variant(
            "normalize repack",
            [*NORMALIZE, "repack", "-s", str(source), "-o", str(output), "--shard-size-gb", str(args.shard_gb), "-q"],
        ),
        Variant(
            "safetensors+torch",
            [sys.executable, __file__, "--naive-worker", str(source), str(output), str(shard_bytes)],
        ),
    ]
    print(
        f"{args.rounds} rounds of {', '.join(v.name for v in variants)}; {total / GIB:.2f} GiB of tensors, "
        f"{args.shard_gb:g} GiB shards, each run followed by sync; warm page cache"
    )
    started = time.perf_counter()
    subprocess.run([*NORMALIZE, "--version"], stdout=subprocess.DEVNULL, check=True)
    print(f"normalize CLI start-up alone: {time.perf_counter() - started:.2f} s (included in its times)")
    for round_number in range(1, args.rounds + 1):
        for variant in variants:
            variant.run(output, workdir / "peak-rss.txt")
            print(f"  round {round_number}: {variant.name:<18} {variant.seconds[-1]:7.2f} s", flush=True)
            if variant.name == "normalize repack" and round_number == 1:
                check = subprocess.run([*NORMALIZE, "verify", str(output)], capture_output=True, text=True)
                if check.returncode != 0:
                    raise SystemExit(f"normalize verify failed on the output:\n{check.stdout}{check.stderr}")
            shutil.rmtree(output)
            os.sync()

    print()
    print(f"{'variant':<20}{'median s':>10}{'GiB/s':>9}{'peak RSS MiB':>15}")
    for variant in variants:
        rate = total / GIB / variant.median
        print(f"{variant.name:<20}{variant.median:>10.2f}{rate:>9.2f}{variant.peak_rss_mib:>15.1f}")
    cp, ours, naive = variants
    to_cp = cp.median / ours.median
    to_naive = naive.median / ours.median
    print()
    print(
        f"normalize / cp throughput:     {to_cp:5.2f}x  "
        f"(target >= {MIN_RATIO_TO_CP}x: {verdict(to_cp >= MIN_RATIO_TO_CP)})"
    )
    print(
        f"normalize / naive throughput:  {to_naive:5.2f}x  "
        f"(target >= {MIN_RATIO_TO_NAIVE}x: {verdict(to_naive >= MIN_RATIO_TO_NAIVE)})"
    )
    print(
        f"normalize peak RSS:            {ours.peak_rss_mib:5.1f} MiB "
        f"(target <= {MAX_RSS_MIB} MiB: {verdict(ours.peak_rss_mib <= MAX_RSS_MIB)})"
    )
    print(f"source kept for reruns: {source}")


if __name__ == "__main__":
    main()
