"""What the conversion benchmarks (``to_fp8.py``, ``to_bf16.py``) share: a synthetic MoE source saved
in standard shards, and a run of ``normalize COMMAND --device cpu`` against a straightforward torch
version of the same job, alternated in one run, each in its own process and followed by ``sync``,
with medians, the throughput ratio and each one's peak RSS (``wait4``)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

MIB = 1 << 20
GIB = 1 << 30
#: Shard size of the generated sources.
SOURCE_SHARD_BYTES = 512 * MIB
#: Sizes of the generated MoE model: hidden size, expert intermediate size, vocabulary.
HIDDEN, MOE_INTERMEDIATE, VOCAB = 2048, 768, 32000


def moe_shapes(layers: int, experts: int) -> dict[str, tuple[int, ...]]:
    """Tensor name → shape of a Qwen3-MoE-like model (~0.6 GiB of bf16 per layer of 64 experts),
    in the order an engine saves them."""
    hidden, moe = HIDDEN, MOE_INTERMEDIATE
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes |= {
            f"{p}.input_layernorm.weight": (hidden,),
            f"{p}.self_attn.q_proj.weight": (hidden, hidden),
            f"{p}.self_attn.k_proj.weight": (hidden // 4, hidden),
            f"{p}.self_attn.v_proj.weight": (hidden // 4, hidden),
            f"{p}.self_attn.o_proj.weight": (hidden, hidden),
            f"{p}.post_attention_layernorm.weight": (hidden,),
            f"{p}.mlp.gate.weight": (experts, hidden),
        }
        for e in range(experts):
            shapes |= {
                f"{p}.mlp.experts.{e}.gate_proj.weight": (moe, hidden),
                f"{p}.mlp.experts.{e}.up_proj.weight": (moe, hidden),
                f"{p}.mlp.experts.{e}.down_proj.weight": (hidden, moe),
            }
    shapes |= {"model.norm.weight": (hidden,), "lm_head.weight": (VOCAB, hidden)}
    return shapes


def is_quantized(name: str, shape: tuple[int, ...]) -> bool:
    """Whether to-fp8's rules quantize this tensor of ``moe_shapes``: the attention and expert
    matrices (not the embedding, the router or ``lm_head``)."""
    return len(shape) == 2 and not name.endswith(("embed_tokens.weight", "mlp.gate.weight", "lm_head.weight"))


def add_write_source_option(parser: argparse.ArgumentParser) -> None:
    """``--write-source DIR``: only write the bench's source checkpoint into ``DIR`` (printing its
    largest tensor's bytes) and exit. ``compare_with_straightforward`` writes its source so, in a
    child process, and ``gpu.sh`` to get a source of its own."""
    parser.add_argument(
        "--write-source",
        type=Path,
        metavar="DIR",
        help="only write the source checkpoint into DIR (printing its largest tensor's bytes), then exit",
    )


def save_standard_checkpoint(directory: Path, groups: Iterable[dict], config: dict) -> None:
    """Saves tensor ``groups`` (a weight with its scale stays in one shard) in order into standard
    shards of about ``SOURCE_SHARD_BYTES`` with ``safetensors.torch.save_file``, then the index and
    ``config``."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True)
    shards: list[dict] = [{}]
    size = 0
    for tensors in groups:
        nbytes = sum(t.nbytes for t in tensors.values())
        if size + nbytes > SOURCE_SHARD_BYTES and shards[-1]:
            shards.append({})
            size = 0
        shards[-1] |= tensors
        size += nbytes
    weight_map = {}
    for i, tensors in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, directory / file, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(tensors, file)
    index = {"metadata": {"total_size": sum(t.nbytes for s in shards for t in s.values())}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    (directory / "config.json").write_text(json.dumps(config))


def timed(command: list[str], stdout=None) -> tuple[float, int]:
    """Runs ``command`` then ``sync``; returns (seconds, the command's peak RSS in bytes)."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=stdout)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"{command[:3]} failed with exit code {process.returncode}")
    os.sync()
    return time.perf_counter() - started, usage.ru_maxrss * 1024


def source_bytes(directory: Path) -> int:
    """Bytes of the ``*.safetensors`` files of ``directory``."""
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def compare_with_straightforward(
    command: str,
    straightforward: str,
    write_source: list[str],
    *,
    rounds: int,
    workdir: Path | None,
    after: Callable[[Path, Path, int], None] | None = None,
) -> None:
    """Writes the source by running ``write_source + [SOURCE]`` (a child process: this one stays
    small, and a child's peak RSS includes its parent's pages at fork time; it prints the largest
    tensor's bytes), then alternates ``rounds`` times ``normalize COMMAND --device cpu`` and the
    ``straightforward`` program (``python -c PROGRAM SOURCE OUTPUT``), and prints the comparison.
    ``after(source, workdir, total)`` runs extra measurements before the scratch space goes."""
    workdir = Path(tempfile.mkdtemp(prefix=f"bench-{command}-", dir=workdir))
    try:
        source = workdir / "source"
        largest = int(subprocess.check_output([*write_source, str(source)]))
        total = source_bytes(source)
        print(f"source: {total / GIB:.2f} GiB, largest tensor (source or output) {largest / MIB:.0f} MiB")
        ours = f"normalize {command} (cpu)"
        normalize = [sys.executable, "-m", "normalize_core", command, "-s", str(source), "--device", "cpu", "-q"]
        variants = {
            ours: lambda out: [*normalize, "-o", str(out)],
            "straightforward torch": lambda out: [sys.executable, "-c", straightforward, str(source), str(out)],
        }
        results: dict[str, list[tuple[float, int]]] = {name: [] for name in variants}
        for round_index in range(rounds):
            for name, variant in variants.items():
                out = workdir / "out"
                results[name].append(timed(variant(out)))
                shutil.rmtree(out)
                seconds, rss = results[name][-1]
                print(f"round {round_index + 1}: {name:26s} {seconds:7.2f} s  peak RSS {rss / MIB:7.0f} MiB")
        print_comparison(results, total, largest, ours, "straightforward torch")
        if after is not None:
            after(source, workdir, total)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def print_comparison(
    results: dict[str, list[tuple[float, int]]], total: int, largest: int, ours: str, theirs: str
) -> None:
    """Medians, source throughput and peak RSS per variant; the throughput ratio against the target
    (ours ≥ 3× theirs) and our peak RSS against its budget (3× the largest tensor + 300 MiB)."""
    medians = {name: statistics.median(s for s, _ in runs) for name, runs in results.items()}
    peaks = {name: max(r for _, r in runs) for name, runs in results.items()}
    print("\nvariant                     median s   source GiB/s   peak RSS MiB")
    for name in results:
        speed = total / medians[name] / GIB
        print(f"{name:26s} {medians[name]:9.2f} {speed:14.2f} {peaks[name] / MIB:14.0f}")
    budget = 3 * largest + 300 * MIB
    print(f"\nthroughput ratio ours / straightforward: {medians[theirs] / medians[ours]:.2f}x (target >= 3x)")
    print(f"our peak RSS {peaks[ours] / MIB:.0f} MiB vs budget 3 x largest tensor + 300 MiB = {budget / MIB:.0f} MiB")
