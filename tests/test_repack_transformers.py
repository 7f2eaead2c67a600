"""A tiny random Llama saved by transformers' ``save_pretrained(max_shard_size=…)``, repacked with another
shard size, loads back with ``from_pretrained`` and gives identical logits."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file

from builders import INDEX, expected_bytes, tiny_model
from normalize_core import repack
from repack_util import assert_standard_output


def tiny_llama() -> transformers.LlamaForCausalLM:
    """About 115k float32 parameters: several shards at 200 KB."""
    return tiny_model(
        "Llama",
        0,
        dtype=torch.float32,
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=64,
    )


def logits(model_dir: Path, input_ids: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids).logits


def test_save_pretrained_shards_repack_and_load_with_identical_logits(tmp_path: Path):
    saved, repacked = tmp_path / "saved", tmp_path / "repacked"
    model = tiny_llama()
    model.save_pretrained(saved, max_shard_size="200KB")
    saved_shards = sorted(p.name for p in saved.glob("*.safetensors"))
    assert len(saved_shards) >= 3

    limit = 90_000
    result = repack(saved, repacked, max_shard_bytes=limit)

    assert len(result.shards) > len(saved_shards)
    assert "config.json" in result.aux_files
    assert "generation_config.json" in result.aux_files
    source_tensors = {}
    for shard in saved_shards:
        source_tensors |= load_file(saved / shard)
    assert_standard_output(repacked, expected_bytes(source_tensors), limit)
    assert json.loads((repacked / "config.json").read_text()) == json.loads((saved / "config.json").read_text())
    assert set(json.loads((repacked / INDEX).read_text())["weight_map"]) == set(model.state_dict())

    input_ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        in_memory = model(input_ids).logits
    from_saved = logits(saved, input_ids)
    from_repacked = logits(repacked, input_ids)
    assert torch.equal(from_saved, in_memory)
    assert torch.equal(from_repacked, from_saved)
