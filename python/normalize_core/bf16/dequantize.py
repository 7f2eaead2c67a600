"""Per-block FP8 dequantization of torch tensors.

The arithmetic (DESIGN §2), per element, ``s`` the scale of its ``block × block`` tile (edge tiles
cover what is left):

    y = dtype(float32(q) * float32(s))      (round to nearest, ties to even, when narrowing)

as the DeepSeek reference kernel and transformers' CPU dequantization compute it. Every stored scale
dtype (float32, bfloat16, float16, float8_e8m0fnu) is exact in float32. A NaN or infinite result
(an FP8 NaN code, a non-finite scale, a value beyond float16's range) is refused.

CPU tensors go through the Rust kernel (all cores, no temporaries); other devices (CUDA) use the torch
formulation below, which produces the same bytes.
"""

from __future__ import annotations

import math
import os

import torch

from normalize_core._core import dequantize_fp8_blocks
from normalize_core.errors import normalize_error
from normalize_core.fp8.layout import DEFAULT_BLOCK_SIZE, Block, tiling
from normalize_core.fp8.quantize import as_byte_array
from normalize_core.kinds import Dtype

OUTPUT_DTYPES = {torch.bfloat16: Dtype.BF16, torch.float16: Dtype.F16, torch.float32: Dtype.F32}
SCALE_DTYPES = {
    torch.float32: Dtype.F32,
    torch.bfloat16: Dtype.BF16,
    torch.float16: Dtype.F16,
    torch.float8_e8m0fnu: Dtype.F8_E8M0,
}

#: Elements per torch step on non-CPU devices: bounds the float32 temporaries to ~1 GiB.
_TORCH_CHUNK_ELEMENTS = 1 << 26


def dequantize_block_fp8(
    q: torch.Tensor,
    scale: torch.Tensor,
    *,
    block_size: Block = DEFAULT_BLOCK_SIZE,
    dtype: torch.dtype = torch.bfloat16,
    split_halves: bool = False,
    name: str = "tensor",
    backend: str = "auto",
) -> torch.Tensor:
    """Dequantizes a ``float8_e4m3fn`` tensor of 2 or more dims with its per-block ``scale`` (a
    multiplier: ``_scale_inv`` or compressed-tensors' ``weight_scale``) to ``dtype`` on its device.

    ``block_size`` is a tile edge or ``(rows, cols)``. ``[N, K]`` takes scale ``[ceil(N/b),
    ceil(K/b)]``; ``[E, N, K]`` takes ``[E, ceil(N/b), ceil(K/b)]`` (one matrix per expert); with
    ``split_halves`` a fused ``[E, 2I, H]`` projection quantized half by half takes ``[E,
    2*ceil(I/b), ceil(H/b)]``. Raises ``ValueError`` for other shapes or dtypes, ``NormalizeError``
    naming ``name`` when a result is NaN or infinite.

    ``backend``: ``"auto"`` (the Rust kernel for CPU tensors, torch otherwise), ``"kernel"`` or
    ``"torch"``; both give the same bytes.
    """
    if q.dtype != torch.float8_e4m3fn:
        raise ValueError(f"{name}: cannot dequantize {q.dtype}; expected torch.float8_e4m3fn")
    if scale.dtype not in SCALE_DTYPES:
        raise ValueError(f"{name}: scale is {scale.dtype}; expected one of {', '.join(map(str, SCALE_DTYPES))}")
    if dtype not in OUTPUT_DTYPES:
        raise ValueError(f"{name}: cannot dequantize to {dtype}; expected bfloat16, float16 or float32")
    block = (block_size, block_size) if isinstance(block_size, int) else tuple(block_size)
    if len(block) != 2 or min(block) <= 0:
        raise ValueError(f"block size must be positive, as one edge or (rows, cols), not {block_size!r}")
    if backend not in ("auto", "kernel", "torch"):
        raise ValueError(f"backend must be auto, kernel or torch, not {backend!r}")
    try:
        batch, rows, cols, expected = tiling(q.shape, block, split_halves=split_halves)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    if tuple(scale.shape) != expected:
        raise ValueError(
            f"{name}: scale has shape {list(scale.shape)}, expected {list(expected)} for {list(q.shape)} "
            f"in {block[0]}x{block[1]} blocks"
        )
    if scale.device != q.device:
        raise ValueError(f"{name}: weight is on {q.device} but its scale on {scale.device}")
    matrices = q.reshape(batch, rows, cols)
    scales = scale.reshape(batch, math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    on_cpu = q.device.type == "cpu"
    if backend == "kernel" and not on_cpu:
        raise ValueError(f"{name}: the kernel backend dequantizes CPU tensors only, not {q.device}")
    if backend == "kernel" or (backend == "auto" and on_cpu):
        out = _dequantize_with_kernel(matrices, scales, block, dtype, name)
    else:
        out = _dequantize_with_torch(matrices, scales, block, dtype, name)
    return out.view(q.shape)


def _dequantize_with_kernel(
    matrices: torch.Tensor, scales: torch.Tensor, block: tuple[int, int], dtype: torch.dtype, name: str
) -> torch.Tensor:
    batch, rows, cols = matrices.shape
    q, s = matrices.contiguous(), scales.contiguous()
    out = torch.empty((batch, rows, cols), dtype=dtype)
    dequantize_fp8_blocks(
        name,
        as_byte_array(q),
        as_byte_array(s),
        SCALE_DTYPES[s.dtype],
        batch,
        rows,
        cols,
        as_byte_array(out),
        OUTPUT_DTYPES[dtype],
        block_rows=block[0],
        block_cols=block[1],
        threads=os.cpu_count() or 1,
    )
    return out


def _dequantize_with_torch(
    matrices: torch.Tensor, scales: torch.Tensor, block: tuple[int, int], dtype: torch.dtype, name: str
) -> torch.Tensor:
    batch, rows, cols = matrices.shape
    block_rows, block_cols = block
    tiles_r = scales.shape[1]
    out = torch.empty((batch, rows, cols), dtype=dtype, device=matrices.device)
    multipliers = scale_values(scales)
    stripes_per_step = max(1, _TORCH_CHUNK_ELEMENTS // (block_rows * max(cols, 1)))
    non_finite = torch.zeros((), dtype=torch.bool, device=matrices.device)
    for b in range(batch):
        for first in range(0, tiles_r, stripes_per_step):
            last = min(tiles_r, first + stripes_per_step)
            r0, r1 = first * block_rows, min(rows, last * block_rows)
            # Each scale repeated over its tile's rows and columns, cut to the matrix's edge.
            expanded = multipliers[b, first:last].repeat_interleave(block_rows, dim=0)[: r1 - r0]
            expanded = expanded.repeat_interleave(block_cols, dim=1)[:, :cols]
            y = (matrices[b, r0:r1].to(torch.float32) * expanded).to(dtype)
            out[b, r0:r1] = y
            non_finite |= ~torch.isfinite(y).all()
    if bool(non_finite):
        raise normalize_error(
            "invalid_quantize_input",
            f"tensor '{name}': dequantizes to NaN or Inf: the weight holds an FP8 NaN code, a scale is not "
            f"finite, or a value exceeds the range of {dtype}",
            tensor=name,
        )
    return out


def scale_values(scales: torch.Tensor) -> torch.Tensor:
    """Stored scales as float32 (exact). e8m0 is decoded on its bits, the same on every device:
    ``2^(e - 127)``, 0 → 2^-127 (a float32 subnormal), 255 → NaN."""
    if scales.dtype != torch.float8_e8m0fnu:
        return scales.to(torch.float32)
    exponents = scales.view(torch.uint8).to(torch.int32)
    bits = torch.where(exponents == 0, 0x0040_0000, exponents << 23)
    return torch.where(exponents == 255, 0x7FC0_0000, bits).view(torch.float32)
