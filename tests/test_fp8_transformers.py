"""to-fp8 output read back by transformers: a tiny Qwen3-MoE (dims multiples of 128, 4 experts,
with and without q/k/v biases) converted on the CPU and loaded with ``from_pretrained`` (which
dequantizes block FP8 on a machine without a GPU).

Its logits must match, to cosine 0.9999, those of the same model whose weights this test replaced
by its own quantize-dequantize (so transformers reads our bytes exactly as meant), and to 0.998
those of the bf16 model; and the written config must carry the quantization_config engines need.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from builders import tiny_model
from normalize_core.fp8.convert import to_fp8

BLOCK = 128


def tiny_qwen3_moe(attention_bias: bool):
    """Whole 128-blocks everywhere (experts of 128 rows), trained-like weights (see ``tiny_model``):
    doubling every quantized weight moves the logits' cosine to ~0.63, so the checks below see the
    blocks."""
    sizes = {"moe_intermediate_size": 128, "max_position_embeddings": 256, "attention_bias": attention_bias}
    return tiny_model("Qwen3Moe", 1234, like_trained=True, **sizes)


def quantize_dequantize(weight: torch.Tensor) -> torch.Tensor:
    """Per-block FP8 as vLLM/DeepGEMM compute it, written independently of the code under test."""
    rows, cols = weight.shape
    x = weight.float()
    out = torch.empty_like(x)
    for i in range(0, rows, BLOCK):
        for j in range(0, cols, BLOCK):
            tile = x[i : i + BLOCK, j : j + BLOCK]
            scale = max(tile.abs().max().item(), 1e-4) / 448.0
            scale = torch.tensor(scale, dtype=torch.float32)
            q = (tile * (1.0 / scale)).clamp(-448, 448).to(torch.float8_e4m3fn)
            out[i : i + BLOCK, j : j + BLOCK] = q.float() * scale
    return out.to(weight.dtype)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


@pytest.fixture(scope="module", params=[False, True], ids=["no-bias", "qkv-bias"])
def converted(request, tmp_path_factory):
    """(bf16 model, its directory, the to-fp8 output directory)."""
    root = tmp_path_factory.mktemp(f"qwen3moe-{request.param}")
    model = tiny_qwen3_moe(attention_bias=request.param)
    model.save_pretrained(root / "bf16", max_shard_size="1MB")
    to_fp8(root / "bf16", root / "fp8", device="cpu")
    return model, root / "bf16", root / "fp8"


def fp8_weight_names(directory) -> set[str]:
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    return {name[: -len("_scale_inv")] for name in index["weight_map"] if name.endswith("_scale_inv")}


def test_logits_match_reference_quantization_and_bf16(converted):
    model, _, fp8_dir = converted
    ids = torch.tensor([[1, 17, 42, 300, 7, 99, 256, 3, 511, 64]])
    with torch.no_grad():
        bf16_logits = model(ids).logits.float()
        loaded = AutoModelForCausalLM.from_pretrained(fp8_dir, dtype=torch.bfloat16).eval()
        fp8_logits = loaded(ids).logits.float()

        quantized_names = fp8_weight_names(fp8_dir)
        reference = tiny_qwen3_moe(attention_bias=model.config.attention_bias)
        reference.load_state_dict(model.state_dict())
        state = reference.state_dict()
        replaced = 0
        for name in quantized_names:
            expert = name.split(".experts.")
            if len(expert) == 2:
                # transformers fuses per-expert checkpoint weights into [E, ...] parameters.
                index, projection = expert[1].split(".", 1)
                layer = reference.get_submodule(expert[0] + ".experts")
                fused = "gate_up_proj" if projection.startswith(("gate_proj", "up_proj")) else "down_proj"
                parameter = getattr(layer, fused)
                rows = parameter.shape[1] // 2
                part = {"gate_proj.weight": slice(0, rows), "up_proj.weight": slice(rows, 2 * rows)}.get(
                    projection, slice(None)
                )
                parameter.data[int(index), part] = quantize_dequantize(parameter.data[int(index), part])
            else:
                state[name].copy_(quantize_dequantize(state[name]))
            replaced += 1
        assert replaced == len(quantized_names) > 0
        reference_logits = reference(ids).logits.float()

    assert cosine(fp8_logits, reference_logits) >= 0.9999
    assert cosine(fp8_logits, bf16_logits) >= 0.998


def test_config_and_tensors_have_the_engine_contract(converted):
    model, bf16_dir, fp8_dir = converted
    config = json.loads((fp8_dir / "config.json").read_text())
    source_config = json.loads((bf16_dir / "config.json").read_text())
    assert list(config)[: len(source_config)] == list(source_config), "every source key kept, in order"
    qc = config["quantization_config"]
    assert qc["quant_method"] == "fp8" and qc["activation_scheme"] == "dynamic" and qc["fmt"] == "e4m3"
    assert qc["weight_block_size"] == [128, 128]
    assert "scale_fmt" not in qc
    assert qc["ignored_layers"] == qc["modules_to_not_convert"]

    quantized = fp8_weight_names(fp8_dir)
    layers = model.config.num_hidden_layers
    expected_fp8 = {
        f"model.layers.{i}.{part}.weight"
        for i in range(layers)
        for part in ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
        + [f"mlp.experts.{e}.{p}" for e in range(4) for p in ("gate_proj", "up_proj", "down_proj")]
    }
    assert quantized == expected_fp8
    expected_skip = {"lm_head", "model.embed_tokens", "model.norm"} | {
        f"model.layers.{i}.{m}"
        for i in range(layers)
        for m in ("input_layernorm", "post_attention_layernorm", "self_attn.q_norm", "self_attn.k_norm", "mlp.gate")
    }
    assert set(qc["modules_to_not_convert"]) == expected_skip
    assert not {m + ".weight" for m in qc["modules_to_not_convert"]} & quantized

    index = json.loads((fp8_dir / "model.safetensors.index.json").read_text())
    total = 0
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(fp8_dir / shard, "pt") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                total += tensor.numel() * tensor.element_size()
                if name in quantized:
                    assert tensor.dtype == torch.float8_e4m3fn
                    scale = f.get_tensor(name + "_scale_inv")
                    assert scale.dtype == torch.float32
                    assert list(scale.shape) == [math.ceil(d / BLOCK) for d in tensor.shape]
                elif name.endswith(".bias"):
                    assert tensor.dtype == torch.bfloat16
    assert index["metadata"]["total_size"] == total
