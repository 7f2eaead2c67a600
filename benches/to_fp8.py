"""Benchmark: ``normalize to-fp8`` (CPU path) against a straightforward torch conversion.

Builds a synthetic bf16 MoE checkpoint (default ≈2.6 GiB in standard-named shards), then
alternates, in one run, ``normalize to-fp8 --device cpu`` and a straightforward version written
here (``safetensors.torch.load_file`` per shard, per-block quantization with plain torch ops,
``save_file``), each in its own process, each followed by ``sync``, deleting the output between
runs. Prints medians, the throughput ratio and each one's peak RSS (``wait4``; see ``harness.py``).

Targets (issue #3): ours ≥ 3× the straightforward version's throughput; our peak RSS ≤ 3× the
largest tensor + 300 MiB. With ``--gpu`` (on a machine with CUDA), also runs the GPU path once
and reports GB/s against the time to just read the source.

    python benches/to_fp8.py [--layers 4] [--rounds 3] [--workdir DIR] [--gpu]
    python benches/to_fp8.py --layers 1 --experts 8 --rounds 1     # a quick check
    python benches/to_fp8.py --layers 4 --write-source DIR         # only the source (gpu.sh)
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
from pathlib import Path

from harness import (
    MIB,
    add_write_source_option,
    compare_with_straightforward,
    moe_shapes,
    save_standard_checkpoint,
    timed,
)

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
    """A bf16 MoE checkpoint (``harness.moe_shapes``) in ~512 MiB standard shards; returns the
    largest tensor's bytes."""
    import torch

    shapes = moe_shapes(layers, experts)
    generator = torch.Generator().manual_seed(0)
    tensors = (
        {name: (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)} for name, shape in shapes.items()
    )
    save_standard_checkpoint(directory, tensors, {"model_type": "qwen3_moe"})
    return 2 * max(math.prod(shape) for shape in shapes.values())


def gpu_path(source: Path, workdir: Path, total: int) -> None:
    """``--gpu``: the GPU path once, against the time to just read the source."""
    read = timed(["cat", *map(str, sorted(source.glob("*.safetensors")))], stdout=subprocess.DEVNULL)[0]
    command = [sys.executable, "-m", "normalize_core", "to-fp8", "-s", str(source), "--device", "cuda", "-q"]
    seconds, rss = timed([*command, "-o", str(workdir / "gpu")])
    print(
        f"GPU path: {total / seconds / 1e9:.2f} GB/s ({seconds:.2f} s); reading the source alone: "
        f"{total / read / 1e9:.2f} GB/s; peak RSS {rss / MIB:.0f} MiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4, help="MoE layers (64 experts each, ~0.6 GiB per layer)")
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--gpu", action="store_true", help="also run the GPU path once (needs CUDA)")
    add_write_source_option(parser)
    args = parser.parse_args()

    if args.write_source:
        print(write_source(args.write_source, args.layers, args.experts))
        return
    compare_with_straightforward(
        "to-fp8",
        STRAIGHTFORWARD,
        [sys.executable, __file__, "--layers", str(args.layers), "--experts", str(args.experts), "--write-source"],
        rounds=args.rounds,
        workdir=args.workdir,
        after=gpu_path if args.gpu else None,
    )


if __name__ == "__main__":
    main()
