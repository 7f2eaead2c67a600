"""The FP8 quantizer against an independent reference of vLLM/DeepGEMM's ``per_block_cast_to_fp8``.

The reference is numpy only: tile maxima in float32, ``s = max(amax, 1e-4) / 448``, ue8m0 via
float64 ``log2`` and ``ceil``, ``q = round(clamp(x * (1/s)))`` to the nearest of the 253 finite
e4m3fn values (ties to the even code), found by search in a table built from the format's
definition. Both the Rust kernel (CPU) and the torch formulation (the GPU path, run here on the
CPU) must match it bit for bit.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from normalize_core.fp8 import quantize as quantize_module
from normalize_core.fp8.quantize import quantize_block_fp8


def e4m3fn_table() -> tuple[np.ndarray, np.ndarray]:
    """All non-negative finite e4m3fn values (ascending) and their codes, from the definition."""
    values, codes = [], []
    for code in range(0x7F):  # 0x7f is NaN
        exponent, mantissa = code >> 3, code & 7
        value = mantissa * 2.0**-9 if exponent == 0 else (1 + mantissa / 8) * 2.0 ** (exponent - 7)
        values.append(value)
        codes.append(code)
    return np.array(values, dtype=np.float64), np.array(codes, dtype=np.uint8)


E4M3_VALUES, E4M3_CODES = e4m3fn_table()


def round_to_e4m3fn(x: np.ndarray) -> np.ndarray:
    """Nearest e4m3fn code of each float32 in [-448, 448], ties to the even code."""
    magnitude = np.abs(x.astype(np.float64))
    upper = np.clip(np.searchsorted(E4M3_VALUES, magnitude), 1, len(E4M3_VALUES) - 1)
    lower = upper - 1
    below, above = E4M3_VALUES[lower], E4M3_VALUES[upper]
    pick_upper = (magnitude - below > above - magnitude) | (
        (magnitude - below == above - magnitude) & (E4M3_CODES[upper] % 2 == 0)
    )
    exact = magnitude == E4M3_VALUES[np.minimum(upper, len(E4M3_VALUES) - 1)]
    index = np.where(exact | pick_upper, upper, lower)
    codes = E4M3_CODES[index]
    return np.where(np.signbit(x), codes | 0x80, codes).astype(np.uint8)


def reference_quantize(x: np.ndarray, block: int, ue8m0: bool, bf16_scales: bool) -> tuple[np.ndarray, np.ndarray]:
    """The reference on one float32 matrix: ``(codes [N, K] uint8, scales [ceil(N/b), ceil(K/b)] float32)``."""
    rows, cols = x.shape
    tiles_r, tiles_c = math.ceil(rows / block), math.ceil(cols / block)
    codes = np.zeros((rows, cols), dtype=np.uint8)
    scales = np.zeros((tiles_r, tiles_c), dtype=np.float32)
    for i in range(tiles_r):
        for j in range(tiles_c):
            tile = x[i * block : (i + 1) * block, j * block : (j + 1) * block]
            amax = np.float32(max(np.abs(tile).max(), np.float32(1e-4)))
            s = np.float32(amax / np.float32(448.0))
            if ue8m0:
                s = np.float32(2.0 ** math.ceil(math.log2(float(s))))
            if bf16_scales:
                bits = np.array([s], dtype=np.float32).view(np.uint32)
                if bits[0] & 0xFFFF:
                    bits = (bits & np.uint32(0xFFFF0000)) + np.uint32(0x10000)
                s = bits.view(np.float32)[0]
            scales[i, j] = s
            scaled = np.clip(tile * (np.float32(1.0) / s), -448.0, 448.0).astype(np.float32)
            codes[i * block : (i + 1) * block, j * block : (j + 1) * block] = round_to_e4m3fn(scaled)
    return codes, scales


def as_float32_numpy(t: torch.Tensor) -> np.ndarray:
    return t.float().numpy()


def check_against_reference(x: torch.Tensor, *, block=128, scale_fmt="float", scale_dtype=torch.float32):
    """Quantizes ``x`` with both implementations, compares each to the reference, returns the kernel's."""
    ue8m0, bf16 = scale_fmt == "ue8m0", scale_dtype == torch.bfloat16
    matrices = x.reshape(-1, x.shape[-2], x.shape[-1])
    expected = [reference_quantize(as_float32_numpy(m), block, ue8m0, bf16) for m in matrices]
    expected_codes = np.stack([c for c, _ in expected]).reshape(x.shape)
    expected_scales = np.stack([s for _, s in expected])
    kernel = quantize_block_fp8(x, block_size=block, scale_fmt=scale_fmt, scale_dtype=scale_dtype)
    torch_path = quantize_module._quantize_with_torch(matrices, block, scale_fmt, scale_dtype, "x")
    for implementation, (q, s) in (("kernel", kernel), ("torch", torch_path)):
        assert q.dtype == torch.float8_e4m3fn and s.dtype == scale_dtype
        codes = q.view(torch.uint8).reshape(x.shape).numpy()
        mismatched = np.argwhere(codes != expected_codes)
        assert mismatched.size == 0, f"{implementation}: {len(mismatched)} codes differ, first at {mismatched[0]}"
        np.testing.assert_array_equal(s.float().reshape(expected_scales.shape).numpy(), expected_scales)
    return kernel


DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(256, 384), (300, 257), (1, 130), (129, 1)])
def test_random_matrices_match_the_reference(dtype, shape):
    generator = torch.Generator().manual_seed(hash((shape, str(dtype))) % 2**31)
    x = (torch.randn(shape, generator=generator) * torch.rand(shape[-1], generator=generator) * 4).to(dtype)
    check_against_reference(x)


@pytest.mark.parametrize("scale_fmt", ["float", "ue8m0"])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_scale_formats_match_the_reference(scale_fmt, scale_dtype):
    generator = torch.Generator().manual_seed(7)
    x = (torch.randn(200, 300, generator=generator) * 3).to(torch.bfloat16)
    _, s = check_against_reference(x, scale_fmt=scale_fmt, scale_dtype=scale_dtype)
    bits = s.float().view(torch.int32)
    if scale_fmt == "ue8m0":
        assert bool(((bits & 0x7FFFFF) == 0).all()), "every ue8m0 scale is a power of two"
    if scale_dtype == torch.bfloat16:
        assert bool(((bits & 0xFFFF) == 0).all())


def test_all_zero_blocks_give_zeros_not_nan():
    x = torch.zeros(256, 256, dtype=torch.bfloat16)
    x[200:, 200:] = torch.randn(56, 56).to(torch.bfloat16)
    q, s = check_against_reference(x)
    assert bool((q[:128].view(torch.uint8) == 0).all())
    assert not bool(torch.isnan(q.float()).any())
    assert s[0, 0].item() == pytest.approx(1e-4 / 448)


def test_tiny_and_huge_values():
    tiny = torch.full((128, 256), 1e-30, dtype=torch.float32)
    tiny[:, 128:] = torch.linspace(-1e-38, 1e-38, 128 * 128).view(128, 128)
    huge = (torch.rand(128, 128, generator=torch.Generator().manual_seed(1)) * 2 - 1) * 3e38
    halfmax = torch.full((64, 64), 65504.0, dtype=torch.float16)
    for x in (tiny, huge, halfmax):
        q, s = check_against_reference(x)
        assert bool(torch.isfinite(q.float()).all()) and bool(torch.isfinite(s).all())


@pytest.mark.parametrize("dtype", DTYPES)
def test_3d_experts_are_quantized_per_expert(dtype):
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(3, 200, 136, generator=generator)
    x[1] *= 1000  # one loud expert must not change the others' scales
    x = x.to(dtype)
    q, s = check_against_reference(x)
    assert s.shape == (3, 2, 2)
    alone, alone_scale = quantize_block_fp8(x[0].clone())
    assert torch.equal(q[0].view(torch.uint8), alone.view(torch.uint8))
    assert torch.equal(s[0], alone_scale)


def test_fused_gate_up_halves_get_whole_blocks_each():
    generator = torch.Generator().manual_seed(5)
    experts, half, hidden = 2, 192, 256  # 192 rows per half: not a whole number of 128-row blocks
    x = torch.randn(experts, 2 * half, hidden, generator=generator).to(torch.bfloat16)
    q, s = quantize_block_fp8(x, split_halves=True, name="mlp.experts.gate_up_proj")
    assert q.shape == x.shape and s.shape == (experts, 4, 2)
    for e in range(experts):
        for h in range(2):
            part = x[e, h * half : (h + 1) * half].contiguous()
            q_part, s_part = quantize_block_fp8(part)
            assert torch.equal(q[e, h * half : (h + 1) * half].view(torch.uint8), q_part.view(torch.uint8))
            assert torch.equal(s[e, 2 * h : 2 * h + 2], s_part)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantized_values_are_within_e4m3_rounding_error(dtype):
    generator = torch.Generator().manual_seed(11)
    x = (torch.randn(384, 512, generator=generator) * torch.logspace(-3, 3, 512)).to(dtype)
    q, s = quantize_block_fp8(x)
    scale = s.repeat_interleave(128, 0).repeat_interleave(128, 1)[: x.shape[0], : x.shape[1]]
    dequantized = q.float() * scale
    exact = x.float()
    # Half a unit in the last place: 2^-4 relative for normal e4m3 values, 2^-10·s absolute below.
    bound = torch.maximum(exact.abs() * 2.0**-4, scale * 2.0**-10) * (1 + 1e-6)
    assert bool(((dequantized - exact).abs() <= bound).all())
    assert bool(torch.isfinite(dequantized).all())


def test_nan_or_inf_input_is_refused_with_the_tensor_named():
    from normalize_core import NormalizeError

    x = torch.randn(256, 256, dtype=torch.bfloat16)
    x[130, 3] = float("inf")
    with pytest.raises(NormalizeError, match="'layers.0.w'.*NaN or Inf") as raised:
        quantize_block_fp8(x, name="layers.0.w")
    assert raised.value.tensor == "layers.0.w"
    with pytest.raises(NormalizeError, match="NaN or Inf"):
        quantize_module._quantize_with_torch(x.view(1, 256, 256), 128, "float", torch.float32, "w")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_bytes_equal_cpu_bytes():
    generator = torch.Generator().manual_seed(13)
    for shape in [(1000, 777), (4, 256, 384)]:
        x = (torch.randn(shape, generator=generator) * 5).to(torch.bfloat16)
        for scale_fmt in ("float", "ue8m0"):
            cpu_q, cpu_s = quantize_block_fp8(x, scale_fmt=scale_fmt)
            gpu_q, gpu_s = quantize_block_fp8(x.cuda(), scale_fmt=scale_fmt)
            assert torch.equal(cpu_q.view(torch.uint8), gpu_q.cpu().view(torch.uint8))
            assert torch.equal(cpu_s, gpu_s.cpu())
