"""Benchmark: ``normalize to-bf16`` (CPU path) against a straightforward torch dequantization.

Builds a synthetic block-FP8 MoE checkpoint (default ≈2.2 GiB of FP8 weights and float32
``_scale_inv`` scales, bf16 embeddings and norms, standard-named ~512 MiB shards, each weight beside
its scale), then alternates, in one run, ``normalize to-bf16 --device cpu`` and a straightforward
version written here (``safetensors.torch.load_file`` per shard, ``q.float() * s`` with the scale
expanded to every element, ``save_file``), each in its own process, each followed by ``sync``,
deleting the output between runs. Prints medians, the throughput ratio and each one's peak RSS
(``wait4``; see ``harness.py``).

Targets (issue #9): ours ≥ 3× the straightforward version's throughput; our peak RSS ≤ 3× the
largest tensor (source or output) + 300 MiB. The GPU path and its bytes are measured by
``benches/gpu.sh`` on a machine with CUDA.

    python benches/to_bf16.py [--size 2.2] [--rounds 3] [--workdir DIR]
    python benches/to_bf16.py --size 0.05 --rounds 1     # a quick check
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from harness import (
    GIB,
    HIDDEN,
    MOE_INTERMEDIATE,
    VOCAB,
    add_write_source_option,
    compare_with_straightforward,
    is_quantized,
    moe_shapes,
    save_standard_checkpoint,
)

EXPERTS = 64

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
    """A block-FP8 MoE checkpoint (``harness.moe_shapes``, the tensors to-fp8 quantizes as FP8 with
    their scales) with about ``size_gib`` GiB of tensors; returns the largest tensor's bytes in the
    source or the bf16 output."""
    import torch

    hidden, moe = HIDDEN, MOE_INTERMEDIATE
    fp8_per_layer = 2 * hidden * hidden + 2 * (hidden // 4) * hidden + EXPERTS * 3 * moe * hidden
    layers = max(1, round((size_gib * GIB - 2 * 2 * VOCAB * hidden) / fp8_per_layer))
    shapes = moe_shapes(layers, EXPERTS)
    generator = torch.Generator().manual_seed(0)

    def tensors(name: str, shape: tuple[int, ...]) -> dict:
        if not is_quantized(name, shape):
            return {name: (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)}
        codes = torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8)
        codes[(codes & 0x7F) == 0x7F] ^= 1  # no NaN codes
        scale_shape = tuple(-(-d // 128) for d in shape)
        return {
            name: codes.view(torch.float8_e4m3fn),
            name + "_scale_inv": torch.rand(scale_shape, generator=generator) * 1e-3,
        }

    quantization = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    config = {"model_type": "qwen3_moe", "quantization_config": quantization}
    save_standard_checkpoint(directory, (tensors(name, shape) for name, shape in shapes.items()), config)
    return 2 * max(math.prod(shape) for shape in shapes.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=float, default=2.2, help="GiB of source tensors (FP8 weights, scales, bf16)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    add_write_source_option(parser)
    args = parser.parse_args()

    if args.write_source:
        print(write_source(args.write_source, args.size))
        return
    compare_with_straightforward(
        "to-bf16",
        STRAIGHTFORWARD,
        [sys.executable, __file__, "--size", str(args.size), "--write-source"],
        rounds=args.rounds,
        workdir=args.workdir,
    )


if __name__ == "__main__":
    main()
