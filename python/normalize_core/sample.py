"""A small built-in checkpoint with engine-style shard names, for ``normalize demo`` and tests.

Written with the standard library alone (no torch, no numpy): a two-layer Llama-shaped model in
bfloat16 spread over ``model-language-000N-fused-save_rankR.safetensors`` files, plus the config
and tokenizer files a real checkpoint carries.
"""

from __future__ import annotations

import json
import random
import struct
from array import array
from pathlib import Path

HIDDEN = 256
INTERMEDIATE = 512
VOCAB = 512
LAYERS = 2
RANKS = 3


def sample_tensors() -> dict[str, list[int]]:
    """Tensor name → shape of the sample model, in the order an engine would save them."""
    shapes: dict[str, list[int]] = {"model.embed_tokens.weight": [VOCAB, HIDDEN]}
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        shapes |= {
            f"{p}.input_layernorm.weight": [HIDDEN],
            f"{p}.self_attn.q_proj.weight": [HIDDEN, HIDDEN],
            f"{p}.self_attn.k_proj.weight": [HIDDEN // 2, HIDDEN],
            f"{p}.self_attn.v_proj.weight": [HIDDEN // 2, HIDDEN],
            f"{p}.self_attn.o_proj.weight": [HIDDEN, HIDDEN],
            f"{p}.post_attention_layernorm.weight": [HIDDEN],
            f"{p}.mlp.gate_proj.weight": [INTERMEDIATE, HIDDEN],
            f"{p}.mlp.up_proj.weight": [INTERMEDIATE, HIDDEN],
            f"{p}.mlp.down_proj.weight": [HIDDEN, INTERMEDIATE],
        }
    shapes |= {"model.norm.weight": [HIDDEN], "lm_head.weight": [VOCAB, HIDDEN]}
    return shapes


def bf16_bytes(count: int, rng: random.Random, scale: float) -> bytes:
    """``count`` normally distributed bfloat16 values (the top halves of float32s)."""
    as_f32 = array("f", (rng.gauss(0.0, scale) for _ in range(count))).tobytes()
    out = bytearray(2 * count)
    out[0::2] = as_f32[2::4]
    out[1::2] = as_f32[3::4]
    return bytes(out)


def write_safetensors(path: Path, tensors: list[tuple[str, str, list[int], bytes]]) -> None:
    """Writes a safetensors file from ``(name, dtype, shape, data)`` entries, in order."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape, data in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for _, _, _, data in tensors:
            f.write(data)


def write_sample_checkpoint(directory: str | Path, seed: int = 0) -> Path:
    """Writes the sample checkpoint into ``directory`` (created if needed) and returns it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    shapes = sample_tensors()
    names = list(shapes)
    per_rank = -(-len(names) // RANKS)
    for rank in range(RANKS):
        entries = []
        for name in names[rank * per_rank : (rank + 1) * per_rank]:
            shape = shapes[name]
            count = 1
            for d in shape:
                count *= d
            scale = 1.0 if name.endswith("layernorm.weight") or name == "model.norm.weight" else 0.02
            entries.append((name, "BF16", shape, bf16_bytes(count, rng, scale)))
        write_safetensors(directory / f"model-language-000{rank + 1}-fused-save_rank{rank}.safetensors", entries)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": HIDDEN // 4,
        "vocab_size": VOCAB,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (directory / "generation_config.json").write_text(json.dumps({"do_sample": False}, indent=2) + "\n")
    (directory / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 2048}, indent=2) + "\n")
    return directory
