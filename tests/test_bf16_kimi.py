"""Header-only dry run of ``to-bf16`` on the real Kimi-K2-Instruct FP8 index (its first 2000 tensors, 994
``_scale_inv``), with sparse stand-in shards: headers of the real names, dtypes and shapes (from
Kimi-K2's config.json), data regions left as holes. Every scale must be consumed by its weight and the
planned ``total_size`` must be exactly the bf16 sizes of the weights plus the copied tensors."""

from __future__ import annotations

import gzip
import json
import math
import struct
from pathlib import Path

from cli_util import run_normalize

FIXTURE = Path(__file__).parent / "fixtures" / "realdata" / "kimi_k2_instruct_fp8_trimmed.index.json.gz"

#: From moonshotai/Kimi-K2-Instruct config.json (DeepseekV3ForCausalLM; realdata/SOURCES.md §B).
HIDDEN, INTERMEDIATE, MOE_INTERMEDIATE, EXPERTS, VOCAB = 7168, 18432, 2048, 384, 163840
HEADS, Q_LORA, KV_LORA, NOPE, ROPE, V_HEAD = 64, 1536, 512, 128, 64, 128
KIMI_QUANTIZATION_CONFIG = {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "weight_block_size": [128, 128],
}

#: Name ending → (dtype, shape) of the bf16 tensors and FP8 weights in the index.
SHAPES = {
    "input_layernorm.weight": ("BF16", [HIDDEN]),
    "post_attention_layernorm.weight": ("BF16", [HIDDEN]),
    "kv_a_layernorm.weight": ("BF16", [KV_LORA]),
    "q_a_layernorm.weight": ("BF16", [Q_LORA]),
    "rotary_emb.inv_freq": ("BF16", [ROPE // 2]),
    "embed_tokens.weight": ("BF16", [VOCAB, HIDDEN]),
    "mlp.gate.weight": ("BF16", [EXPERTS, HIDDEN]),
    "mlp.gate.e_score_correction_bias": ("F32", [EXPERTS]),
    "self_attn.q_a_proj.weight": ("F8_E4M3", [Q_LORA, HIDDEN]),
    "self_attn.q_b_proj.weight": ("F8_E4M3", [HEADS * (NOPE + ROPE), Q_LORA]),
    "self_attn.kv_a_proj_with_mqa.weight": ("F8_E4M3", [KV_LORA + ROPE, HIDDEN]),
    "self_attn.kv_b_proj.weight": ("F8_E4M3", [HEADS * (NOPE + V_HEAD), KV_LORA]),
    "self_attn.o_proj.weight": ("F8_E4M3", [HIDDEN, HEADS * V_HEAD]),
}


def tensor_type(name: str) -> tuple[str, list[int]]:
    """The dtype and shape of a tensor of the trimmed Kimi-K2 index."""
    if name.endswith("_scale_inv"):
        _, shape = tensor_type(name[: -len("_scale_inv")])
        return "F32", [math.ceil(d / 128) for d in shape]
    for ending, dtype_shape in SHAPES.items():
        if name.endswith(ending):
            return dtype_shape
    # MLPs: the dense first layer's, and the routed and shared experts' (moe_intermediate_size).
    width = MOE_INTERMEDIATE if "experts." in name else INTERMEDIATE
    projection = name.rsplit(".", 2)[-2]
    shapes = {"gate_proj": [width, HIDDEN], "up_proj": [width, HIDDEN], "down_proj": [HIDDEN, width]}
    return "F8_E4M3", shapes[projection]


ITEMSIZE = {"BF16": 2, "F32": 4, "F8_E4M3": 1}


def write_sparse_shard(path: Path, names: list[str]) -> None:
    """A valid safetensors header for ``names``; the data region is a hole (the file is truncated to
    its full size without writing it)."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        dtype, shape = tensor_type(name)
        size = math.prod(shape) * ITEMSIZE[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        f.truncate(8 + len(text) + offset)


def test_kimi_k2_dry_run_consumes_every_scale_and_plans_bf16_sizes(tmp_path):
    index = json.loads(gzip.decompress(FIXTURE.read_bytes()))
    weight_map: dict[str, str] = index["weight_map"]
    source = tmp_path / "kimi-k2-fp8"
    source.mkdir()
    for shard in sorted(set(weight_map.values())):
        write_sparse_shard(source / shard, [n for n, s in weight_map.items() if s == shard])
    (source / "model.safetensors.index.json").write_text(json.dumps(index))
    config = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "kimi_k2", "hidden_size": HIDDEN}
    (source / "config.json").write_text(json.dumps(config | {"quantization_config": KIMI_QUANTIZATION_CONFIG}))

    completed = run_normalize("to-bf16", "-s", str(source), "--dry-run", "--json", timeout=120)
    assert completed.returncode == 0, completed.stderr
    summary = json.loads(completed.stdout)

    scales = sorted(n for n in weight_map if n.endswith("_scale_inv"))
    assert len(scales) == 994 and len(weight_map) == 2000
    assert summary["format"] == "fp8" and summary["block_size"] == [128, 128]
    assert summary["drop_scales"] == scales, "every _scale_inv consumed"
    assert summary["dequantize"] == sorted(n[: -len("_scale_inv")] for n in scales)
    assert not [n for n in summary["copy"] if n.endswith("_scale_inv")]
    assert len(summary["copy"]) == 2000 - 2 * 994 and summary["drop_activation_scales"] == []
    bf16_weights = sum(2 * math.prod(tensor_type(n)[1]) for n in summary["dequantize"])
    copied = sum(math.prod(tensor_type(n)[1]) * ITEMSIZE[tensor_type(n)[0]] for n in summary["copy"])
    assert summary["total_size"] == bf16_weights + copied
    assert summary["source_total_size"] == sum(
        math.prod(tensor_type(n)[1]) * ITEMSIZE[tensor_type(n)[0]] for n in weight_map
    )
    # Engine-style names (model-2-of-61) are bin-packed into standard 4 GiB shards.
    assert summary["repacked"] and summary["shards"][0] == f"model-00001-of-{len(summary['shards']):05d}.safetensors"
    assert len(summary["shards"]) >= math.ceil(summary["total_size"] / (4 << 30))
