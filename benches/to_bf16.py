"""Benchmark: ``normalize to-bf16`` (CPU path) against a straightforward torch dequantization.

Builds a synthetic block-FP8 MoE checkpoint (default ≈2.2 GiB of FP8 weights and float32
``_scale_inv`` scales, bf16 embeddings and norms, standard-named ~512 MiB shards, each weight beside
its scale), then alternates, in one run, ``normalize to-bf16 --device cpu`` and a straightforward
version written here (``safetensors.torch.load_file`` per shard, ``q.float() * s`` with the scale
expanded to every element, ``save_file``), each in its own process, each followed by ``sync``,
deleting the output between runs. Prints medians, the throughput ratio and each one's peak RSS
(``wait4``).

Targets (issue #9): ours ≥ 3× the straightforward version's throughput; our peak RSS ≤ 3× the
largest tensor (source or output) + 300 MiB. The GPU path and its bytes are measured by
``benches/gpu.sh`` on a machine with CUDA.

    python benches/to_bf16.py [--size 2.2] [--rounds 3] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from to_fp8 import MIB, source_bytes, timed

STRAIGHTFORWARD = r"""
import json, sys
from pathlib import Path
import torch
from safetensors.torch import load_file, save_file

source, output = Path(sys.argv[1]), Path(sys.argv[2])
output.mkdir()
index = json.loads((source / "model.safetensors.index.json").read_text())
weight_map, total = {}, 0
for shard in sorted(set(index["weight_map"].values())):
    tensors = load_file(source / shard)
    out = {}
    for name, t in tensors.items():
        if name.endswith("_scale_inv"):
            continue
        scale = tensors.get(name + "_scale_inv")
        if scale is None:
            out[name] = t
            continue
        rows, cols = t.shape
        expanded = scale.repeat_interleave(128, 0)[:rows].repeat_interleave(128, 1)[:, :cols]
        out[name] = (t.float() * expanded).to(torch.bfloat16)
    save_file(out, output / shard, metadata={"format": "pt"})
    weight_map |= {name: shard for name in out}
    total += sum(t.nbytes for t in out.values())
index = {"metadata": {"total_size": total}, "weight_map": weight_map}
(output / "model.safetensors.index.json").write_text(json.dumps(index))
config = json.loads((source / "config.json").read_text())
config.pop("quantization_config")
(output / "config.json").write_text(json.dumps(config))
"""


def write_source(directory: Path, size_gib: float) -> int:
    """A block-FP8 MoE checkpoint with about ``size_gib`` GiB of tensors; returns the largest tensor's
    bytes in the source or the bf16 output."""
    import torch
    from safetensors.torch import save_file

    hidden, moe, experts, vocab = 2048, 768, 64, 32000
    fp8_per_layer = 2 * hidden * hidden + 2 * (hidden // 4) * hidden + experts * 3 * moe * hidden
    layers = max(1, round((size_gib * (1 << 30) - 2 * 2 * vocab * hidden) / fp8_per_layer))
    expert = {"gate_proj": (moe, hidden), "up_proj": (moe, hidden), "down_proj": (hidden, moe)}
    shapes: dict[str, tuple[tuple[int, ...], bool]] = {"model.embed_tokens.weight": ((vocab, hidden), False)}
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes |= {
            f"{p}.input_layernorm.weight": ((hidden,), False),
            f"{p}.self_attn.q_proj.weight": ((hidden, hidden), True),
            f"{p}.self_attn.k_proj.weight": ((hidden // 4, hidden), True),
            f"{p}.self_attn.v_proj.weight": ((hidden // 4, hidden), True),
            f"{p}.self_attn.o_proj.weight": ((hidden, hidden), True),
            f"{p}.post_attention_layernorm.weight": ((hidden,), False),
            f"{p}.mlp.gate.weight": ((experts, hidden), False),
        }
        for e in range(experts):
            for projection, shape in expert.items():
                shapes[f"{p}.mlp.experts.{e}.{projection}.weight"] = (shape, True)
    shapes |= {"model.norm.weight": ((hidden,), False), "lm_head.weight": ((vocab, hidden), False)}
    directory.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = largest = 0
    for name, (shape, fp8) in shapes.items():
        if fp8:
            codes = torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8)
            codes[(codes & 0x7F) == 0x7F] ^= 1  # no NaN codes
            scale_shape = tuple(-(-d // 128) for d in shape)
            tensors = {name: codes.view(torch.float8_e4m3fn), name + "_scale_inv": torch.rand(scale_shape) * 1e-3}
            largest = max(largest, 2 * codes.numel())
        else:
            tensors = {name: (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)}
            largest = max(largest, tensors[name].nbytes)
        nbytes = sum(t.nbytes for t in tensors.values())
        if size + nbytes > 512 * MIB and shards[-1]:
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
    quantization = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    (directory / "config.json").write_text(json.dumps({"model_type": "qwen3_moe", "quantization_config": quantization}))
    return largest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=float, default=2.2, help="GiB of source tensors (FP8 weights, scales, bf16)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--write-source", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.write_source:
        print(write_source(args.write_source, args.size))
        return
    workdir = Path(tempfile.mkdtemp(prefix="bench-bf16-", dir=args.workdir))
    try:
        source = workdir / "source"
        # In a child process: this process stays small, and a child's peak RSS includes its parent's
        # pages at fork time.
        writer = [sys.executable, __file__, "--write-source", str(source), "--size", str(args.size)]
        largest = int(subprocess.check_output(writer))
        total = source_bytes(source)
        print(f"source: {total / (1 << 30):.2f} GiB, largest tensor (source or output) {largest / MIB:.0f} MiB")
        normalize = [sys.executable, "-m", "normalize_core", "to-bf16", "-s", str(source), "--device", "cpu", "-q"]
        variants = {
            "normalize to-bf16 (cpu)": lambda out: normalize + ["-o", str(out)],
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
        ours, theirs = medians["normalize to-bf16 (cpu)"], medians["straightforward torch"]
        print("\nvariant                     median s   source GiB/s   peak RSS MiB")
        for name in variants:
            speed = total / medians[name] / (1 << 30)
            print(f"{name:26s} {medians[name]:9.2f} {speed:14.2f} {peaks[name] / MIB:14.0f}")
        budget = 3 * largest + 300 * MIB
        print(f"\nthroughput ratio ours / straightforward: {theirs / ours:.2f}x (target >= 3x)")
        print(
            f"our peak RSS {peaks['normalize to-bf16 (cpu)'] / MIB:.0f} MiB vs budget 3 x largest tensor + 300 MiB "
            f"= {budget / MIB:.0f} MiB"
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
