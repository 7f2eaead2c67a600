"""Checkpoints for the tests, written and read back with the ``safetensors`` library (never with
this project), so a test compares the tool against the reference implementation, not against itself.

- Models: ``make_tensors`` (random values of given dtypes and shapes), ``random_tensor`` (random bit
  patterns of any dtype), ``moe_tensors`` (a small MoE-shaped model), ``tiny_model`` (a small
  transformers model to ``save_pretrained`` and load back).
- Layouts: ``save_engine_checkpoint`` / ``save_standard_checkpoint`` write explicit shards;
  ``write_checkpoint`` splits a state dict into an indexed, single-file or engine-named checkpoint;
  ``write_tiny_shard`` writes tens of thousands of tiny tensors fast.
- Reading: ``read_tensors`` and ``read_output_bytes`` read every tensor through the index with
  ``safe_open``; ``expected_bytes`` is what the latter must find for in-memory tensors.
- ``snapshot`` proves a directory was left alone.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """A tensor of ``dtype`` filled with random bit patterns (bools stay 0/1)."""
    numel = math.prod(shape)
    probe = torch.empty(0, dtype=dtype)
    raw = torch.randint(0, 256, (numel * probe.element_size(),), dtype=torch.uint8, generator=generator)
    if dtype == torch.bool:
        raw &= 1
    return raw.view(dtype).reshape(shape)


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


#: The sizes of ``tiny_model``: two layers, two query heads and one KV head of 128 (whole 128-blocks
#: everywhere), untied embeddings.
TINY_MODEL_SIZES: dict[str, Any] = {
    "vocab_size": 512,
    "hidden_size": 256,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 128,
    "max_position_embeddings": 128,
    "tie_word_embeddings": False,
}
#: What a tiny MoE adds: four experts, two per token, in every layer.
TINY_MOE_SIZES: dict[str, Any] = {
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
}


def tiny_model(
    architecture: str, seed: int, *, dtype: torch.dtype = torch.bfloat16, like_trained: bool = False, **sizes: Any
):
    """A random transformers ``{architecture}ForCausalLM`` (``"Qwen3"``, ``"Qwen3Moe"``, ``"Llama"``)
    of ``TINY_MODEL_SIZES`` (and ``TINY_MOE_SIZES`` for an MoE) with ``sizes`` overriding them, in
    ``dtype`` and eval mode. ``like_trained`` spreads the weights like a trained LLM's: a residual
    stream (embeddings, ``lm_head``) large against each block's update, small matrices and biases,
    norms near 1. In a fully random network any perturbation is amplified chaotically, so that
    quantization error would swamp what a logits comparison is meant to see."""
    import transformers

    config_class = getattr(transformers, f"{architecture}Config")
    model_class = getattr(transformers, f"{architecture}ForCausalLM")
    defaults = TINY_MODEL_SIZES | (TINY_MOE_SIZES if architecture.endswith("Moe") else {})
    config = config_class(**(defaults | sizes))
    torch.manual_seed(seed)
    model = model_class(config)
    if like_trained:
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "embed_tokens" in name or "lm_head" in name:
                    parameter.normal_(0.0, 1.0)
                elif parameter.dim() >= 2:
                    parameter.normal_(0.0, 0.05)
                elif name.endswith(".bias"):
                    parameter.normal_(0.0, 0.1)
                else:
                    parameter.uniform_(0.5, 1.5)
    return model.to(dtype).eval()


def engine_shard_name(i: int) -> str:
    """The ``i``-th (from 0) shard name of an engine-named checkpoint."""
    return f"model-language-{i + 1:04d}-fused-save_rank{i}.safetensors"


def standard_shard_name(i: int, n: int) -> str:
    """The ``i``-th (from 1) of ``n`` shard names of HF's sharded layout."""
    return f"model-{i:05d}-of-{n:05d}.safetensors"


def save_engine_checkpoint(directory: Path, files: dict[str, dict[str, torch.Tensor]]) -> Path:
    """Writes each ``{file name: tensors}`` with ``safetensors.torch.save_file``; no index."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, tensors in files.items():
        save_file(tensors, directory / name, metadata={"format": "pt"})
    return directory


def save_standard_checkpoint(directory: Path, shards: list[dict[str, torch.Tensor]]) -> Path:
    """Writes ``model-{i:05d}-of-{n:05d}.safetensors`` shards and an index the way transformers
    does (sorted keys, ``total_size``)."""
    files = {standard_shard_name(i, len(shards)): tensors for i, tensors in enumerate(shards, start=1)}
    save_engine_checkpoint(directory, files)
    weight_map = {name: file_name for file_name, tensors in files.items() for name in tensors}
    total_size = sum(t.numel() * t.element_size() for tensors in shards for t in tensors.values())
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / INDEX).write_text(json.dumps(index, indent=2))
    return directory


def write_checkpoint(
    directory: Path,
    tensors: dict[str, torch.Tensor],
    *,
    layout: str = "indexed",
    files: int = 2,
    aux: dict[str, str] | None = None,
) -> Path:
    """Writes ``tensors`` in order as ``layout``: ``"indexed"`` (``files`` standard-named shards
    plus an index), ``"single"`` (one ``model.safetensors``) or ``"engine"`` (``files``
    engine-named shards, no index). Each shard holds a consecutive run of tensors. ``aux`` maps
    relative paths to text for non-tensor files."""
    names = list(tensors)
    step = -(-len(names) // files)
    chunks = [{n: tensors[n] for n in names[i * step : (i + 1) * step]} for i in range(files)]
    if layout == "single":
        save_engine_checkpoint(directory, {"model.safetensors": tensors})
    elif layout == "indexed":
        save_standard_checkpoint(directory, chunks)
    else:
        save_engine_checkpoint(directory, {engine_shard_name(i): chunk for i, chunk in enumerate(chunks)})
    for relative, text in (aux or {}).items():
        (directory / relative).parent.mkdir(parents=True, exist_ok=True)
        (directory / relative).write_text(text)
    return directory


def write_tiny_shard(path: Path, names: list[str]) -> None:
    """One safetensors file of 4-byte F32 tensors, written directly (the library takes seconds
    for tens of thousands of tensors)."""
    header = {"__metadata__": {"format": "pt"}}
    header |= {name: {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]} for i, name in enumerate(names)}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + bytes(4 * len(names)))


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The raw little-endian bytes of a tensor, whatever its dtype (C order)."""
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


#: The safetensors dtype string of each torch dtype, as ``save_file`` writes it.
HEADER_DTYPES = {
    torch.bool: "BOOL",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int16: "I16",
    torch.uint16: "U16",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int32: "I32",
    torch.uint32: "U32",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.uint64: "U64",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.float8_e8m0fnu: "F8_E8M0",
    torch.float8_e4m3fnuz: "F8_E4M3FNUZ",
    torch.float8_e5m2fnuz: "F8_E5M2FNUZ",
    torch.complex64: "C64",
    torch.float4_e2m1fn_x2: "F4",
}

TensorBytes = dict[str, tuple[str, list[int], bytes]]
"""Tensor name → (header dtype, header shape, raw little-endian bytes)."""


def header_dtype(tensor: torch.Tensor) -> str:
    """The safetensors dtype string of a torch tensor, as ``save_file`` writes it."""
    return HEADER_DTYPES[tensor.dtype]


def header_shape(tensor: torch.Tensor) -> list[int]:
    """The shape ``save_file`` writes: a ``float4_e2m1fn_x2`` element is two F4 values."""
    shape = list(tensor.shape)
    if tensor.dtype == torch.float4_e2m1fn_x2:
        shape[-1] *= 2
    return shape


def expected_bytes(tensors: dict[str, torch.Tensor]) -> TensorBytes:
    """What ``read_output_bytes`` must find for each of ``tensors`` after a lossless write."""
    return {name: (header_dtype(t), header_shape(t), tensor_bytes(t)) for name, t in tensors.items()}


def through_index(directory: Path) -> Iterator[tuple[str, Any]]:
    """``(tensor name, its shard opened with safe_open)`` for every tensor of a checkpoint with an
    index, shard by shard. Checks that every shard says ``format: pt`` and holds exactly the
    tensors the index assigns to it."""
    weight_map = json.loads((directory / INDEX).read_text())["weight_map"]
    found = set()
    for file_name in sorted(set(weight_map.values())):
        with safe_open(directory / file_name, framework="pt") as f:
            assert f.metadata() == {"format": "pt"}, file_name
            for name in f.keys():
                assert weight_map[name] == file_name, f"{name} is in {file_name}, the index says {weight_map[name]}"
                found.add(name)
                yield name, f
    assert found == set(weight_map), "index and shards disagree"


def read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint with an index (see ``through_index``)."""
    return {name: f.get_tensor(name) for name, f in through_index(directory)}


def read_output_bytes(directory: Path) -> TensorBytes:
    """Every tensor of a checkpoint with an index as (header dtype, header shape, bytes)."""
    found: TensorBytes = {}
    for name, f in through_index(directory):
        view = f.get_slice(name)
        found[name] = (view.get_dtype(), view.get_shape(), tensor_bytes(f.get_tensor(name)))
    return found


def snapshot(directory: Path) -> dict[str, tuple[int, int, str]]:
    """Every entry below ``directory`` (hidden ones too): relative path → (inode, size, sha256).
    Equal snapshots mean nothing was added, removed, moved or changed."""
    entries = {}
    for root, dirs, files in os.walk(directory):
        for name in dirs + files:
            path = Path(root) / name
            stat = path.stat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
            entries[path.relative_to(directory).as_posix()] = (stat.st_ino, stat.st_size, digest)
    return entries


def shard_names(directory: Path) -> list[str]:
    """The ``*.safetensors`` files of a directory, sorted."""
    return sorted(p.name for p in directory.glob("*.safetensors"))
