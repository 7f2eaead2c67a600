"""Per-block FP8 quantization of torch tensors.

The arithmetic (bit-exact with vLLM/DeepGEMM ``per_block_cast_to_fp8``), per
``block × block`` tile, edge tiles covering what is left:

    amax = max(max|x|, 1e-4)  (float32)       s = amax / 448
    ue8m0:    s = 2^ceil(log2 s)              bfloat16 scales: s rounded up to a bfloat16
    q = float8_e4m3fn(round_nearest_even(clamp(x * (1/s), -448, 448)))

``s`` is stored as ``<name>_scale_inv`` (dequantization is ``x ≈ q * s``). All-zero tiles give
zeros. Rounding up (ue8m0, bfloat16) is done on the bits, so it is exact on every device.

CPU tensors go through the Rust kernel (one read of the input, all cores, no temporaries);
other devices (CUDA) use the torch formulation below, which produces the same bytes.
"""

from __future__ import annotations

import os

import torch

from normalize_core._core import quantize_fp8_blocks
from normalize_core.errors import normalize_error
from normalize_core.fp8.layout import DEFAULT_BLOCK_SIZE, tiling
from normalize_core.kinds import Dtype, ScaleDtype, ScaleFormat

E4M3_MAX = 448.0
AMAX_FLOOR = 1e-4
#: The torch dtype of each quantizable safetensors dtype.
TORCH_SOURCE_DTYPES = {Dtype.BF16: torch.bfloat16, Dtype.F16: torch.float16, Dtype.F32: torch.float32}
#: The torch dtype of each way of storing scales.
TORCH_SCALE_DTYPES = {ScaleDtype.FLOAT32: torch.float32, ScaleDtype.BFLOAT16: torch.bfloat16}
_DTYPE_OF_TORCH = {torch_dtype: dtype for dtype, torch_dtype in TORCH_SOURCE_DTYPES.items()}
_SCALE_DTYPE_OF_TORCH = {torch_dtype: scale for scale, torch_dtype in TORCH_SCALE_DTYPES.items()}

#: Elements per torch step on non-CPU devices: bounds the float32 temporaries to ~1 GiB.
_TORCH_CHUNK_ELEMENTS = 1 << 26


def quantize_block_fp8(
    tensor: torch.Tensor,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    scale_fmt: ScaleFormat | str = ScaleFormat.FLOAT,
    scale_dtype: torch.dtype = torch.float32,
    split_halves: bool = False,
    name: str = "tensor",
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantizes a bf16/fp16/fp32 tensor of 2 or more dims to ``(fp8, scale)`` on its device.

    ``[N, K]`` gives scale ``[ceil(N/b), ceil(K/b)]``; ``[E, N, K]`` gives ``[E, ceil(N/b),
    ceil(K/b)]`` (one matrix per expert). With ``split_halves`` a fused ``[E, 2I, H]``
    projection is quantized as ``2E`` matrices of ``[I, H]`` and its scale is ``[E,
    2*ceil(I/b), ceil(H/b)]``. Raises ``NormalizeError`` naming ``name`` on NaN or Inf input.

    ``backend``: ``"auto"`` (the Rust kernel for CPU tensors, torch otherwise), ``"kernel"`` or
    ``"torch"``; both give the same bytes.
    """
    if tensor.dtype not in _DTYPE_OF_TORCH:
        raise ValueError(f"{name}: cannot quantize {tensor.dtype}; expected bfloat16, float16 or float32")
    if tensor.dim() < 2:
        raise ValueError(f"{name}: only tensors of 2 or more dimensions are quantized, got {list(tensor.shape)}")
    scale_fmt = ScaleFormat(scale_fmt)
    if scale_dtype not in _SCALE_DTYPE_OF_TORCH:
        raise ValueError(f"scale_dtype must be torch.float32 or torch.bfloat16, not {scale_dtype}")
    try:
        batch, rows, cols, scale_shape = tiling(tensor.shape, block_size, split_halves=split_halves)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    matrices = tensor.reshape(batch, rows, cols)
    if backend not in ("auto", "kernel", "torch"):
        raise ValueError(f"backend must be auto, kernel or torch, not {backend!r}")
    on_cpu = tensor.device.type == "cpu"
    if backend == "kernel" and not on_cpu:
        raise ValueError(f"{name}: the kernel backend quantizes CPU tensors only, not {tensor.device}")
    if backend == "kernel" or (backend == "auto" and on_cpu):
        fp8, scale = _quantize_with_kernel(matrices, block_size, scale_fmt, scale_dtype, name)
    else:
        fp8, scale = _quantize_with_torch(matrices, block_size, scale_fmt, scale_dtype, name)
    return fp8.view(tensor.shape), scale.view(scale_shape)


def _quantize_with_kernel(
    matrices: torch.Tensor, block: int, scale_fmt: ScaleFormat, scale_dtype: torch.dtype, name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    batch, rows, cols = matrices.shape
    source = matrices.contiguous()
    fp8 = torch.empty((batch, rows, cols), dtype=torch.float8_e4m3fn)
    scale = torch.empty(tiling(matrices.shape, block).scale_shape, dtype=scale_dtype)
    quantize_fp8_blocks(
        name,
        as_byte_array(source),
        _DTYPE_OF_TORCH[source.dtype],
        batch,
        rows,
        cols,
        as_byte_array(fp8),
        as_byte_array(scale),
        block=block,
        scale_fmt=scale_fmt,
        scale_dtype=_SCALE_DTYPE_OF_TORCH[scale_dtype],
        threads=os.cpu_count() or 1,
    )
    return fp8, scale


def as_byte_array(tensor: torch.Tensor):
    """A zero-copy uint8 numpy view of a contiguous CPU tensor (any dtype), for the Rust side."""
    return tensor.reshape(-1).view(torch.uint8).numpy()


def _quantize_with_torch(
    matrices: torch.Tensor, block: int, scale_fmt: ScaleFormat, scale_dtype: torch.dtype, name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    batch, rows, cols = matrices.shape
    _, tiles_r, tiles_c = tiling(matrices.shape, block).scale_shape
    fp8 = torch.empty((batch, rows, cols), dtype=torch.float8_e4m3fn, device=matrices.device)
    scale = torch.empty((batch, tiles_r, tiles_c), dtype=torch.float32, device=matrices.device)
    stripe_elements = block * tiles_c * block
    stripes_per_step = max(1, _TORCH_CHUNK_ELEMENTS // stripe_elements)
    nonfinite = torch.zeros((), dtype=torch.bool, device=matrices.device)
    for b in range(batch):
        for first in range(0, tiles_r, stripes_per_step):
            last = min(tiles_r, first + stripes_per_step)
            r0, r1 = first * block, min(rows, last * block)
            q, s, bad = _quantize_rows(matrices[b, r0:r1], block, scale_fmt, scale_dtype)
            fp8[b, r0:r1] = q
            scale[b, first:last] = s
            nonfinite |= bad
    if bool(nonfinite):
        raise normalize_error(
            "invalid_quantize_input", f"tensor '{name}': contains NaN or Inf; refusing to quantize it", tensor=name
        )
    return fp8, scale.to(scale_dtype)


def _quantize_rows(x: torch.Tensor, block: int, scale_fmt: ScaleFormat, scale_dtype: torch.dtype):
    """One horizontal slab of whole tile rows (the last may be partial): ``(q, s, any non-finite)``."""
    rows, cols = x.shape
    tiles_r, tiles_c = tiling(x.shape, block).scale_shape
    padded = x
    if rows % block or cols % block:
        padded = x.new_zeros((tiles_r * block, tiles_c * block))
        padded[:rows, :cols] = x
    tiles = padded.view(tiles_r, block, tiles_c, block)
    amax = tiles.abs().amax(dim=(1, 3)).float()
    nonfinite = ~torch.isfinite(amax).all()
    s = amax.clamp(min=AMAX_FLOOR) / E4M3_MAX
    if scale_fmt == ScaleFormat.UE8M0:
        s = round_up_to_power_of_two(s)
    if scale_dtype == torch.bfloat16:
        s = round_up_to_bfloat16(s)
    inverse = 1.0 / s
    q = (tiles.float() * inverse[:, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q.view(tiles_r * block, tiles_c * block)[:rows, :cols], s, nonfinite


def round_up_to_power_of_two(s: torch.Tensor) -> torch.Tensor:
    """``2^ceil(log2 s)`` for positive float32 ``s``, exact (on the bits, not through log2)."""
    bits = s.view(torch.int32)
    exponent = (bits >> 23) + ((bits & 0x7FFFFF) != 0).to(torch.int32)
    return (exponent << 23).view(torch.float32)


def round_up_to_bfloat16(s: torch.Tensor) -> torch.Tensor:
    """The smallest bfloat16 not below positive float32 ``s`` (still as float32)."""
    return ((s.view(torch.int32) + 0xFFFF) & -0x10000).view(torch.float32)
