"""Benchmark: ``normalize to-fp8`` (CPU path) against a straightforward torch conversion.

Builds a synthetic bf16 MoE checkpoint (default ≈2.6 GiB in standard-named shards), then
alternates, in one run, ``normalize to-fp8 --device cpu`` and a straightforward version written
here (``safetensors.torch.load_file`` per shard, per-block quantization with plain torch ops,
``save_file``), each in its own process, each followed by ``sync``, deleting the output between
runs. Prints medians, the throughput ratio and each one's peak RSS (``wait4``).

Targets (issue #3): ours ≥ 3× the straightforward version's throughput; our peak RSS ≤ 3× the
largest tensor + 300 MiB. With ``--gpu`` (on a machine with CUDA), also runs the GPU path once
and reports GB/s against the time to just read the source.

    python benches/to_fp8.py [--layers 4] [--rounds 3] [--workdir DIR] [--gpu]
"""

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
from pathlib import Path

MIB = 1 << 20

STRAIGHTFORWARD = r'''
import json, math, sys
from pathlib import Path
import torch
from safetensors.torch import load_file, save_file
from normalize_core.fp8.rules import HeuristicRules

source, output = Path(sys.argv[1]), Path(sys.argv[2])
output.mkdir()
rules = HeuristicRules()

def quantize(x):
    """Per-block FP8 as commonly written (DeepGEMM's per_block_cast_to_fp8)."""
    m, n = x.shape
    pm, pn = math.ceil(m / 128) * 128, math.ceil(n / 128) * 128
    padded = torch.zeros((pm, pn), dtype=x.dtype)
    padded[:m, :n] = x
    view = padded.view(pm // 128, 128, pn // 128, 128)
    amax = view.abs().float().amax(dim=(1, 3), keepdim=True).clamp(1e-4)
    scale = amax / 448.0
    q = (view * (1.0 / scale)).clamp(-448, 448).to(torch.float8_e4m3fn)
    return q.view(pm, pn)[:m, :n].contiguous(), scale.view(pm // 128, pn // 128)

index = json.loads((source / "model.safetensors.index.json").read_text())
weight_map, total = {}, 0
for shard in sorted(set(index["weight_map"].values())):
    tensors = load_file(source / shard)
    out = {}
    for name, t in tensors.items():
        if rules.decide(name, "BF16", list(t.shape)).quantize:
            out[name], out[name + "_scale_inv"] = quantize(t)
        else:
            out[name] = t
    save_file(out, output / shard, metadata={"format": "pt"})
    weight_map |= {name: shard for name in out}
    total += sum(t.nbytes for t in out.values())
index = {"metadata": {"total_size": total}, "weight_map": weight_map}
(output / "model.safetensors.index.json").write_text(json.dumps(index))
'''


def write_source(directory: Path, layers: int, experts: int) -> int:
    """A bf16 MoE checkpoint in ~512 MiB standard shards; returns the largest tensor's bytes."""
    import torch
    from safetensors.torch import save_file

    hidden, moe, vocab = 2048, 768, 32000
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
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
    shapes |= {"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}
    directory.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, shape in shapes.items():
        tensor = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
        if size + tensor.nbytes > 512 * MIB and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += tensor.nbytes
    weight_map = {}
    for i, tensors in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, directory / file, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(tensors, file)
    index = {"metadata": {"total_size": sum(t.nbytes for s in shards for t in s.values())}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    (directory / "config.json").write_text(json.dumps({"model_type": "qwen3_moe"}))
    return max(t.nbytes for s in shards for t in s.values())


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
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4, help="MoE layers (64 experts each, ~0.6 GiB per layer)")
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--gpu", action="store_true", help="also run the GPU path once (needs CUDA)")
    parser.add_argument("--write-source", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.write_source:
        print(write_source(args.write_source, args.layers, args.experts))
        return
    workdir = Path(tempfile.mkdtemp(prefix="bench-fp8-", dir=args.workdir))
    try:
        source = workdir / "source"
        # In a child process: this process stays small, and a child's peak RSS includes its parent's
        # pages at fork time.
        writer = [sys.executable, __file__, "--write-source", str(source), "--layers", str(args.layers)]
        largest = int(subprocess.check_output(writer + ["--experts", str(args.experts)]))
        total = source_bytes(source)
        print(f"source: {total / (1 << 30):.2f} GiB, largest tensor {largest / MIB:.0f} MiB")
        normalize = [sys.executable, "-m", "normalize_core", "to-fp8", "-s", str(source), "--device", "cpu", "-q"]
        variants = {
            "normalize to-fp8 (cpu)": lambda out: normalize + ["-o", str(out)],
            "straightforward torch": lambda out: [sys.executable, "-c", STRAIGHTFORWARD, str(source), str(out)],
        }
        results: dict[str, list[tuple[float, int]]] = {name: [] for name in variants}
        for round_index in range(args.rounds):
            for name, command in variants.items():
                out = workdir / "out"
                results[name].append(timed(command(out)))
                shutil.rmtree(out)
                seconds, rss = results[name][-1]
                print(f"round {round_index + 1}: {name:26s} {seconds:7.2f} s  peak RSS {rss / MIB:7.0f} MiB")

        medians = {name: statistics.median(s for s, _ in runs) for name, runs in results.items()}
        peaks = {name: max(r for _, r in runs) for name, runs in results.items()}
        ours, theirs = medians["normalize to-fp8 (cpu)"], medians["straightforward torch"]
        print("\nvariant                     median s   GiB/s   peak RSS MiB")
        for name in variants:
            print(f"{name:26s} {medians[name]:9.2f} {total / medians[name] / (1 << 30):7.2f} {peaks[name] / MIB:12.0f}")
        budget = 3 * largest + 300 * MIB
        print(f"\nthroughput ratio ours / straightforward: {theirs / ours:.2f}x (target >= 3x)")
        print(
            f"our peak RSS {peaks['normalize to-fp8 (cpu)'] / MIB:.0f} MiB vs budget 3 x largest tensor + 300 MiB "
            f"= {budget / MIB:.0f} MiB"
        )
        if args.gpu:
            read = timed(["cat", *map(str, sorted(source.glob("*.safetensors")))], stdout=subprocess.DEVNULL)[0]
            gpu_out = workdir / "gpu"
            seconds, rss = timed(normalize[:-3] + ["--device", "cuda", "-q", "-o", str(gpu_out)])
            print(
                f"GPU path: {total / seconds / 1e9:.2f} GB/s ({seconds:.2f} s); reading the source alone: "
                f"{total / read / 1e9:.2f} GB/s; peak RSS {rss / MIB:.0f} MiB"
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
