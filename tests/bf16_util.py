"""Helpers for the to-bf16 tests: an independent numpy reference of the dequantization, random block-FP8
tensors, an independent reference quantize-dequantize, and block-FP8 checkpoints in both scale forms.

Nothing here calls the code under test: the reference decodes e4m3fn and rounds to bfloat16 from their
definitions in float64, and rounds to float16 with numpy's own conversion.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from builders import engine_shard_name, save_engine_checkpoint, save_standard_checkpoint

BLOCK = 128

#: quantization_config of a DeepSeek-style release (as Kimi-K2's config.json has it).
FP8_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}


def compressed_tensors_config(block: int = BLOCK, static_activations: bool = False) -> dict:
    """An llm-compressor FP8_BLOCK ``quantization_config`` (model_free_ptq's layout)."""
    activations = (
        {"num_bits": 8, "type": "float", "strategy": "tensor", "symmetric": True, "dynamic": False}
        if static_activations
        else {"num_bits": 8, "type": "float", "strategy": "group", "group_size": 128, "dynamic": True}
    )
    return {
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {
                    "num_bits": 8,
                    "type": "float",
                    "strategy": "block",
                    "block_structure": [block, block],
                    "symmetric": True,
                    "dynamic": False,
                },
                "input_activations": activations,
                "format": "float-quantized",
            }
        },
        "format": "float-quantized",
        "ignore": ["lm_head"],
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
    }


# --- the independent reference ---------------------------------------------------------------------------


def e4m3fn_values(codes: np.ndarray) -> np.ndarray:
    """float32 values of e4m3fn codes, from the format's definition (0x7f/0xff are NaN)."""
    codes = codes.astype(np.int64)
    exponent, mantissa = (codes >> 3) & 0xF, codes & 7
    magnitude = np.where(exponent == 0, mantissa * 2.0**-9, (1 + mantissa / 8) * 2.0 ** (exponent - 7))
    magnitude = np.where((codes & 0x7F) == 0x7F, np.nan, magnitude)
    return np.where(codes & 0x80, -magnitude, magnitude).astype(np.float32)


def bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """float32 ``values`` rounded to the nearest bfloat16 (ties to the even code), as uint16 bits:
    of the two bfloat16 neighbours, the one nearer in exact (float64) arithmetic."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    below = bits >> 16
    above = below + 1
    exact = values.astype(np.float64)
    below_value = (below << 16).astype(np.uint32).view(np.float32).astype(np.float64)
    above_value = (above << 16).astype(np.uint32).view(np.float32).astype(np.float64)
    to_below, to_above = np.abs(exact - below_value), np.abs(above_value - exact)
    up = (to_above < to_below) | ((to_above == to_below) & (below % 2 == 1))
    return np.where(up, above, below).astype(np.uint16)


def dequantize_reference(
    codes: np.ndarray, scales: np.ndarray, dtype: str, block: int | tuple[int, int] = BLOCK, split_halves: bool = False
) -> np.ndarray:
    """``dtype(float32(q) * float32(s))`` element by element as raw output bytes (uint8), ``s`` the scale
    of the element's ``block`` (an edge or ``(rows, cols)``) tile; ``scales`` are float32 values shaped as
    the checkpoint stores them."""
    block_rows, block_cols = (block, block) if isinstance(block, int) else block
    rows, cols = codes.shape[-2:]
    if split_halves:
        rows //= 2
    matrices = codes.reshape(-1, rows, cols)
    per_matrix = scales.reshape(matrices.shape[0], math.ceil(rows / block_rows), math.ceil(cols / block_cols))
    expanded = np.repeat(np.repeat(per_matrix, block_rows, axis=1), block_cols, axis=2)[:, :rows, :cols]
    products = (e4m3fn_values(matrices) * expanded).astype(np.float32)
    if dtype == "bfloat16":
        out = bfloat16_bits(products)
    elif dtype == "float16":
        out = products.astype(np.float16)
    else:
        out = products
    return np.ascontiguousarray(out).view(np.uint8).reshape(-1)


def random_codes(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Random e4m3fn codes, every finite code possible (no NaN)."""
    codes = np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)
    codes[(codes & 0x7F) == 0x7F] &= 0xFE
    return codes


def random_scales(shape: tuple[int, ...], kind: str, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """``(stored scale tensor, its float32 values)`` for ``kind``: float32, bfloat16, float16, pow2
    (float32 powers of two, ue8m0) or e8m0 (``float8_e8m0fnu``)."""
    rng = np.random.default_rng(seed)
    if kind == "e8m0":
        exponents = rng.integers(100, 130, size=shape, dtype=np.uint8)
        values = np.ldexp(1.0, exponents.astype(np.int64) - 127).astype(np.float32)
        return torch.from_numpy(exponents).view(torch.float8_e8m0fnu), values
    if kind == "pow2":
        values = np.ldexp(1.0, rng.integers(-20, -2, size=shape)).astype(np.float32)
        return torch.from_numpy(values), values
    values = np.exp(rng.uniform(np.log(1e-5), np.log(0.05), size=shape)).astype(np.float32)
    if kind == "float32":
        return torch.from_numpy(values), values
    stored = torch.from_numpy(values).to(getattr(torch, kind))
    return stored, stored.float().numpy()


def fp8_tensor(codes: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(codes).view(torch.float8_e4m3fn)


def output_bytes(tensor: torch.Tensor) -> np.ndarray:
    """A written tensor's raw bytes."""
    return tensor.contiguous().view(torch.uint8).numpy().reshape(-1)


def reference_quantize_dequantize(
    x: torch.Tensor, split_halves: bool = False, scale_fmt: str = "float", scale_dtype: str = "float32"
) -> torch.Tensor:
    """The DESIGN §2 quantization of a bf16 tensor (per 128×128 tile, per expert, per half when split),
    then ``bf16(float32(q) * float32(s))``; written here independently of the code under test."""
    *leading, rows, cols = x.shape
    if split_halves:
        rows //= 2
    matrices = x.reshape(-1, rows, cols).float()
    out = torch.empty_like(matrices)
    for m in range(matrices.shape[0]):
        for i in range(0, rows, BLOCK):
            for j in range(0, cols, BLOCK):
                tile = matrices[m, i : i + BLOCK, j : j + BLOCK]
                s = torch.clamp(tile.abs().amax(), min=1e-4) / 448.0
                if scale_fmt == "ue8m0":
                    mantissa, exponent = math.frexp(s.item())
                    s = torch.tensor(s.item() if mantissa == 0.5 else 2.0**exponent, dtype=torch.float32)
                if scale_dtype == "bfloat16":
                    bits = int(s.view(torch.int32))
                    if bits & 0xFFFF:
                        bits = (bits & ~0xFFFF) + 0x10000
                    s = torch.tensor(bits, dtype=torch.int32).view(torch.float32)
                q = (tile * (1.0 / s)).clamp(-448, 448).to(torch.float8_e4m3fn)
                out[m, i : i + BLOCK, j : j + BLOCK] = q.float() * s
    return out.to(torch.bfloat16).reshape(x.shape)


# --- checkpoints ------------------------------------------------------------------------------------------


def write_checkpoint(
    directory: Path, shards: list[dict[str, torch.Tensor]], config: dict | None, layout: str = "standard"
) -> Path:
    """Writes ``shards`` as standard-named files with an index (``standard``), engine-named files
    without (``engine``) or one ``model.safetensors`` (``single``), plus ``config.json`` (when given)
    and a tokenizer file."""
    if layout == "standard":
        save_standard_checkpoint(directory, shards)
    elif layout == "engine":
        save_engine_checkpoint(directory, {engine_shard_name(i): tensors for i, tensors in enumerate(shards)})
    else:
        save_engine_checkpoint(directory, {"model.safetensors": {n: t for shard in shards for n, t in shard.items()}})
    if config is not None:
        (directory / "config.json").write_text(json.dumps(config, indent=2))
    (directory / "tokenizer.json").write_text("{}")
    return directory
