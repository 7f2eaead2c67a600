"""to-fp8 then to-bf16, read back by transformers: a tiny Qwen3-MoE saved with ``save_pretrained``,
converted to block FP8 and back on the CPU, loads with ``from_pretrained`` as a plain bf16 model (no
quantization config left), and its logits equal exactly those of the same model whose quantized weights
this test replaced by its own quantize-dequantize."""

from __future__ import annotations

import json
import shutil

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from bf16_util import reference_quantize_dequantize
from builders import read_tensors, tiny_model
from normalize_core import to_bf16, to_fp8


def test_round_trip_loads_as_bf16_with_the_reference_logits(tmp_path):
    model = tiny_model("Qwen3Moe", 7, like_trained=True, vocab_size=384, moe_intermediate_size=192)
    model.save_pretrained(tmp_path / "bf16", max_shard_size="1MB")
    # Experts of 192 rows (1.5 blocks) are kept by default as vLLM cannot load them; quantize them
    # anyway, for their edge tiles.
    to_fp8(tmp_path / "bf16", tmp_path / "fp8", device="cpu", allow_unloadable=True)
    to_bf16(tmp_path / "fp8", tmp_path / "back", device="cpu")

    quantized = {n[: -len("_scale_inv")] for n in read_tensors(tmp_path / "fp8") if n.endswith("_scale_inv")}
    source = read_tensors(tmp_path / "bf16")
    assert any(".experts." in n for n in quantized) and any("self_attn" in n for n in quantized)
    reference = {n: reference_quantize_dequantize(t) if n in quantized else t for n, t in source.items()}
    (tmp_path / "reference").mkdir()
    save_file(reference, tmp_path / "reference" / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(tmp_path / "bf16" / "config.json", tmp_path / "reference" / "config.json")

    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert "quantization_config" not in config
    assert config == json.loads((tmp_path / "bf16" / "config.json").read_text())

    ids = torch.tensor([[1, 17, 42, 300, 7, 99, 256, 3, 383, 64]])
    with torch.no_grad():
        back = AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
        expected = AutoModelForCausalLM.from_pretrained(tmp_path / "reference").eval()
        assert getattr(back.config, "quantization_config", None) is None
        assert all(p.dtype == torch.bfloat16 for p in back.parameters())
        back_logits, expected_logits = back(ids).logits, expected(ids).logits
        original_logits = model(ids).logits
    assert torch.equal(back_logits, expected_logits)
    assert not torch.equal(back_logits, original_logits), "the quantization is visible, so the check means something"
