"""Per-block FP8 dequantization of tensors, bit for bit against the independent numpy reference in
``bf16_util``: the Rust kernel, the torch formulation on the CPU (the GPU path's arithmetic) and, when a
device is present, on CUDA; random FP8 codes with float32, bfloat16, float16, power-of-two and e8m0
scales, odd shapes, 3-D experts, fused halves, other block sizes, all three output dtypes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bf16_util import (
    bfloat16_bits,
    dequantize_reference,
    e4m3fn_values,
    fp8_tensor,
    output_bytes,
    random_codes,
    random_scales,
)
from normalize_core import NormalizeError
from normalize_core._core import dequantize_fp8_blocks
from normalize_core.bf16.dequantize import dequantize_block_fp8
from normalize_core.kinds import Dtype

SHAPES = [
    ((300, 200), False),
    ((128, 256), False),
    ((1, 1), False),
    ((129, 257), False),
    ((3, 200, 130), False),
    ((2, 384, 256), True),  # a fused gate_up_proj quantized half by half (halves of 192 rows)
]
SCALE_KINDS = ["float32", "bfloat16", "float16", "pow2", "e8m0"]
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
BACKENDS = ["kernel", "torch"]


def scale_shape(shape: tuple[int, ...], split_halves: bool, block: int | tuple[int, int] = 128) -> tuple[int, ...]:
    block_rows, block_cols = (block, block) if isinstance(block, int) else block
    *leading, rows, cols = shape
    halves = 2 if split_halves else 1
    return (*leading, halves * math.ceil(rows // halves / block_rows), math.ceil(cols / block_cols))


def test_the_reference_decodes_and_rounds_as_torch_does():
    """The reference itself, checked once against torch's own conversions."""
    codes = np.arange(256, dtype=np.uint8)
    finite = (codes & 0x7F) != 0x7F
    torch_values = torch.from_numpy(codes).view(torch.float8_e4m3fn).float().numpy()
    assert np.array_equal(e4m3fn_values(codes)[finite].view(np.uint32), torch_values[finite].view(np.uint32))
    assert np.isnan(e4m3fn_values(codes)[~finite]).all()
    values = np.random.default_rng(0).standard_normal(10_000).astype(np.float32)
    ties = np.array([1 + 2**-8, 1 + 3 * 2**-8, -(2 + 2**-7)], dtype=np.float32)
    for x in (values, ties):
        want = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        assert np.array_equal(bfloat16_bits(x), want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale_kind", SCALE_KINDS)
@pytest.mark.parametrize(("shape", "split_halves"), SHAPES, ids=lambda v: str(v))
def test_matches_the_numpy_reference_bit_for_bit(shape, split_halves, scale_kind, dtype, backend):
    seed = math.prod(shape) + len(scale_kind)
    codes = random_codes(shape, seed)
    stored, values = random_scales(scale_shape(shape, split_halves), scale_kind, seed)
    y = dequantize_block_fp8(fp8_tensor(codes), stored, dtype=DTYPES[dtype], split_halves=split_halves, backend=backend)
    assert y.shape == shape and y.dtype == DTYPES[dtype]
    assert np.array_equal(output_bytes(y), dequantize_reference(codes, values, dtype, split_halves=split_halves))


@pytest.mark.parametrize("backend", BACKENDS)
def test_products_halfway_between_two_bfloat16_round_to_the_even_one(backend):
    # Scales (1 + k·2^-8)·2^e put q·s exactly halfway between two bfloat16 values for most codes.
    shape = (256, 256)
    codes = random_codes(shape, 7)
    k = np.array([[1, 3], [5, 7]], dtype=np.float32)
    values = ((1 + k * 2.0**-8) * np.array([[2.0**-3, 1.0], [2.0**-6, 2.0**-1]])).astype(np.float32)
    want = dequantize_reference(codes, values, "bfloat16")
    y = dequantize_block_fp8(fp8_tensor(codes), torch.from_numpy(values), backend=backend)
    assert np.array_equal(output_bytes(y), want)
    products = e4m3fn_values(codes[:128, :128]).astype(np.float64) * values[0, 0]
    assert (products.view(np.uint64) & ((1 << 45) - 1) == 1 << 44).sum() > 1000, "ties are exercised"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block", [32, 64, 100, (64, 128), (128, 32)], ids=str)
def test_other_block_sizes(block, backend):
    shape = (3, 150, 210)
    seed = hash(block) % 1000
    codes = random_codes(shape, seed)
    stored, values = random_scales(scale_shape(shape, False, block), "bfloat16", seed)
    y = dequantize_block_fp8(fp8_tensor(codes), stored, block_size=block, backend=backend)
    assert np.array_equal(output_bytes(y), dequantize_reference(codes, values, "bfloat16", block=block))


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_results_are_refused(backend):
    codes = random_codes((200, 300), 1)
    stored, _ = random_scales((2, 3), "float32", 1)
    nan_code = codes.copy()
    nan_code[150, 7] = 0xFF
    infinite_scale = stored.clone()
    infinite_scale[1, 2] = float("inf")
    overflowing = stored.clone()
    overflowing[0, 0] = 1000.0  # 448 * 1000 > 65504
    codes[0, 0] = 0x7E  # 448
    cases = [
        (nan_code, stored, torch.bfloat16),
        (codes, infinite_scale, torch.bfloat16),
        (codes, overflowing, torch.float16),
    ]
    for q, s, dtype in cases:
        with pytest.raises(NormalizeError, match=r"tensor 'w': dequantizes to NaN or Inf") as raised:
            dequantize_block_fp8(fp8_tensor(q), s, dtype=dtype, name="w", backend=backend)
        assert raised.value.kind == "invalid_quantize_input" and raised.value.tensor == "w"
    assert dequantize_block_fp8(fp8_tensor(codes), overflowing, backend=backend).dtype == torch.bfloat16


def test_bad_arguments_are_value_errors():
    q = fp8_tensor(random_codes((200, 130), 0))
    s = torch.ones(2, 2)
    with pytest.raises(ValueError, match=r"scale has shape \[2, 3\], expected \[2, 2\]"):
        dequantize_block_fp8(q, torch.ones(2, 3))
    with pytest.raises(ValueError, match="expected torch.float8_e4m3fn"):
        dequantize_block_fp8(q.view(torch.uint8), s)
    with pytest.raises(ValueError, match="scale is torch.int32"):
        dequantize_block_fp8(q, s.int())
    with pytest.raises(ValueError, match="cannot dequantize to torch.float64"):
        dequantize_block_fp8(q, s, dtype=torch.float64)
    with pytest.raises(ValueError, match="2 or more dimensions"):
        dequantize_block_fp8(q.reshape(-1), s)
    with pytest.raises(ValueError, match="cannot split 201 rows"):
        dequantize_block_fp8(fp8_tensor(random_codes((1, 201, 8), 0)), s, split_halves=True)
    with pytest.raises(ValueError, match="backend must be"):
        dequantize_block_fp8(q, s, backend="gpu")


def test_the_binding_checks_dtype_names_and_buffers():
    q = np.zeros(16, dtype=np.uint8)
    s = np.ones(1, dtype=np.float32).view(np.uint8)
    out = np.zeros(32, dtype=np.uint8)
    dequantize_fp8_blocks("t", q, s, "F32", 1, 4, 4, out, "BF16")
    with pytest.raises(ValueError, match=r"cannot read scales of dtype F64; expected F32, BF16, F16 or F8_E8M0"):
        dequantize_fp8_blocks("t", q, s, "F64", 1, 4, 4, out, "BF16")
    with pytest.raises(ValueError, match=r"cannot dequantize to dtype I8; expected BF16, F16 or F32"):
        dequantize_fp8_blocks("t", q, s, "F32", 1, 4, 4, out, Dtype.I8)
    with pytest.raises(ValueError, match=r"'bf16' is not a valid Dtype; expected one of: 'BOOL'"):
        dequantize_fp8_blocks("t", q, s, "F32", 1, 4, 4, out, "bf16")
    with pytest.raises(ValueError, match="read-only"):
        dequantize_fp8_blocks("t", q, s, "F32", 1, 4, 4, bytes(32), "BF16")
    with pytest.raises(ValueError, match="overlap"):
        dequantize_fp8_blocks("t", out[:16], s, "F32", 1, 4, 4, out, "BF16")
    with pytest.raises(NormalizeError, match="output has 32 bytes, 16 elements of F32 need 64"):
        dequantize_fp8_blocks("t", q, s, "F32", 1, 4, 4, out, "F32")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale_kind", SCALE_KINDS)
def test_cuda_gives_the_kernel_bytes(scale_kind, dtype):
    for shape, split_halves in SHAPES:
        codes = random_codes(shape, 3)
        stored, values = random_scales(scale_shape(shape, split_halves), scale_kind, 3)
        on_gpu = dequantize_block_fp8(
            fp8_tensor(codes).cuda(), stored.cuda(), dtype=DTYPES[dtype], split_halves=split_halves
        )
        on_cpu = dequantize_block_fp8(fp8_tensor(codes), stored, dtype=DTYPES[dtype], split_halves=split_halves)
        assert np.array_equal(output_bytes(on_gpu.cpu()), output_bytes(on_cpu))
        want = dequantize_reference(codes, values, dtype, split_halves=split_halves)
        assert np.array_equal(output_bytes(on_cpu), want)
