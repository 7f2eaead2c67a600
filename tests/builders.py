"""Checkpoints for the tests, built and read back with the ``safetensors`` library (never with this
project), so a test compares the tool against the reference implementation, not against itself.

Models: ``make_tensors`` (random tensors of given dtypes and shapes) and ``moe_tensors`` (a small
MoE-shaped bf16 model with attention, per-expert and fused experts, router and norms). Layouts:
``write_checkpoint`` writes any state dict as an indexed, single-file or engine-named checkpoint.
Reading: ``read_tensors`` / ``read_back`` go through the index with ``safe_open``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

INDEX = "model.safetensors.index.json"

#: The config and tokenizer files that go with ``moe_tensors``.
MOE_AUX_FILES = {
    "config.json": json.dumps({"model_type": "qwen3_moe", "hidden_size": 256}, indent=2),
    "tokenizer.json": "{}",
}


def make_tensors(spec: dict[str, tuple[torch.dtype, tuple[int, ...]]], seed: int) -> dict[str, torch.Tensor]:
    """Random tensors of the given dtypes and shapes (different seeds give different bytes)."""
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=generator).to(dtype) for name, (dtype, shape) in spec.items()}


def moe_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    """A small bf16 MoE-shaped state dict: attention (an f32 ``o_proj``), per-expert weights (an f16
    one), fused 3-D experts whose ``gate_up_proj`` halves (192 rows) are not whole 128-blocks, a
    router, norms, embeddings and ``lm_head``."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, dtype=torch.bfloat16):
        return (torch.randn(*shape, generator=g) * 0.05).to(dtype)

    tensors = {"model.embed_tokens.weight": rand(300, 256)}
    for i in range(2):
        p = f"model.layers.{i}"
        tensors |= {
            f"{p}.input_layernorm.weight": rand(256),
            f"{p}.self_attn.q_proj.weight": rand(256, 256),
            f"{p}.self_attn.q_proj.bias": rand(256),
            f"{p}.self_attn.k_proj.weight": rand(128, 256),
            f"{p}.self_attn.v_proj.weight": rand(128, 256),
            f"{p}.self_attn.o_proj.weight": rand(256, 256, dtype=torch.float32),
            f"{p}.mlp.gate.weight": rand(4, 256),
            f"{p}.mlp.experts.0.gate_proj.weight": rand(200, 256, dtype=torch.float16),
            f"{p}.mlp.experts.0.up_proj.weight": rand(200, 256),
            f"{p}.mlp.experts.0.down_proj.weight": rand(256, 200),
        }
    tensors |= {
        "model.layers.1.mlp.shared.experts.gate_up_proj": rand(3, 384, 256),
        "model.layers.1.mlp.shared.experts.down_proj": rand(3, 256, 192),
        "model.norm.weight": rand(256),
        "lm_head.weight": rand(300, 256),
    }
    return tensors


def engine_shard_name(i: int) -> str:
    """The ``i``-th (from 0) shard name of an engine-named checkpoint."""
    return f"model-language-{i + 1:04d}-fused-save_rank{i}.safetensors"


def write_checkpoint(
    directory: Path,
    tensors: dict[str, torch.Tensor],
    *,
    layout: str = "indexed",
    files: int = 2,
    aux: dict[str, str] | None = None,
) -> Path:
    """Writes ``tensors`` in order as ``layout``: ``"indexed"`` (``files`` standard-named shards
    plus an index, as transformers writes it), ``"single"`` (one ``model.safetensors``) or
    ``"engine"`` (``files`` engine-named shards, no index). Each shard holds a consecutive run of
    tensors. ``aux`` maps relative paths to text for non-tensor files."""
    directory.mkdir(parents=True, exist_ok=True)
    if layout == "single":
        save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    else:
        names = list(tensors)
        step = -(-len(names) // files)
        weight_map = {}
        for i in range(files):
            chunk = names[i * step : (i + 1) * step]
            file_name = f"model-{i + 1:05d}-of-{files:05d}.safetensors" if layout == "indexed" else engine_shard_name(i)
            save_file({n: tensors[n] for n in chunk}, directory / file_name, metadata={"format": "pt"})
            weight_map |= dict.fromkeys(chunk, file_name)
        if layout == "indexed":
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (directory / INDEX).write_text(json.dumps(index, indent=2))
    for relative, text in (aux or {}).items():
        (directory / relative).parent.mkdir(parents=True, exist_ok=True)
        (directory / relative).write_text(text)
    return directory


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The raw little-endian bytes of a tensor, whatever its dtype (C order)."""
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint with an index, read with ``safe_open``. Checks that each shard
    holds exactly the tensors the index assigns to it."""
    weight_map = json.loads((directory / INDEX).read_text())["weight_map"]
    out = {}
    for file_name in sorted(set(weight_map.values())):
        with safe_open(directory / file_name, framework="pt") as f:
            for name in f.keys():
                assert weight_map[name] == file_name, f"{name} is in {file_name}, index says {weight_map[name]}"
                out[name] = f.get_tensor(name)
    assert set(out) == set(weight_map), "index and shards disagree"
    return out
