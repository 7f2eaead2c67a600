"""The block-FP8 geometry, in one place: which dtypes are FP8, how a tensor is tiled, what a
quantized tensor becomes and how many bytes it takes.

A quantized weight keeps its shape as ``float8_e4m3fn``; its ``<name>_scale_inv`` holds one scale
per ``block × block`` tile of each matrix. A 2-D ``[N, K]`` weight is one matrix; a 3-D ``[E, D0,
D1]`` fused-experts tensor is ``E`` matrices. A fused ``gate_up_proj`` is split in two halves
along dim 1 by vLLM, scale included, so when a half is not a whole number of blocks each half is
quantized as a matrix of its own. Planning, quantizing, the dry-run summary and the format checks
all read their numbers from here.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

from normalize_core.kinds import Dtype, ScaleDtype

#: Suffix of a block-FP8 weight's scale tensor (vLLM drops any other spelling).
SCALE_SUFFIX = "_scale_inv"
#: Name endings of scale tensors in any FP8 scheme: block (``_scale_inv``), per-channel and
#: compressed-tensors (``weight_scale``), static activation scales (``input_scale``).
SCALE_SUFFIXES = (SCALE_SUFFIX, "weight_scale", "input_scale")
#: Edge of the square tiles that share one scale, unless the caller says otherwise.
DEFAULT_BLOCK_SIZE = 128
#: The dtype of a quantized weight.
FP8_WEIGHT_DTYPE = Dtype.F8_E4M3
#: Every 8-bit float dtype: a tensor of one of these is already quantized (or is a scale).
FP8_DTYPES = frozenset(dtype for dtype in Dtype if dtype.startswith("F8_"))
#: The dtypes a tensor must have to be quantized.
QUANTIZABLE_DTYPES = frozenset({Dtype.BF16, Dtype.F16, Dtype.F32})
#: Wider floats: a module whose weight is one of these, and stays so, is "not converted".
FLOATING_DTYPES = frozenset({Dtype.BF16, Dtype.F16, Dtype.F32, Dtype.F64})
#: The safetensors dtype of each way of storing scales.
SCALE_TENSOR_DTYPES = {ScaleDtype.FLOAT32: Dtype.F32, ScaleDtype.BFLOAT16: Dtype.BF16}
_SCALE_ITEMSIZE = {ScaleDtype.FLOAT32: 4, ScaleDtype.BFLOAT16: 2}

#: A tile edge (square tiles) or ``(rows, cols)`` of a tile.
Block = int | tuple[int, int]


def is_scale_name(name: str) -> bool:
    """Whether ``name`` names a scale tensor of some FP8 scheme."""
    return name.endswith(SCALE_SUFFIXES)


def is_fp8_weight(name: str, dtype: str) -> bool:
    """Whether a tensor is a quantized weight of some FP8 scheme: 8-bit floats, not a scale."""
    return dtype in FP8_DTYPES and not is_scale_name(name)


def marks_quantization(name: str, dtype: str) -> bool:
    """Whether a tensor shows its checkpoint is quantized: 8-bit floats, or a scale's name."""
    return dtype in FP8_DTYPES or is_scale_name(name)


def scale_dtype_of(dtype: str | None) -> ScaleDtype | None:
    """The ``ScaleDtype`` of scale tensors stored as safetensors ``dtype`` (None for other dtypes)."""
    return next((scale for scale, stored in SCALE_TENSOR_DTYPES.items() if stored == dtype), None)


class Tiling(NamedTuple):
    """A tensor seen as ``batch`` contiguous matrices of ``rows × cols``, and its scale shape."""

    batch: int
    rows: int
    cols: int
    scale_shape: tuple[int, ...]


def tiling(shape: Sequence[int], block: Block, *, split_halves: bool = False) -> Tiling:
    """How a tensor of ``shape`` (at least 2-D) is tiled: one scale per tile of each matrix over
    the last two dims. With ``split_halves`` each matrix is cut in two halves along its rows, each
    tiled on its own (the scale keeps the tensor's leading dims, with both halves' tile rows)."""
    block_rows, block_cols = (block, block) if isinstance(block, int) else block
    return _tiling(tuple(shape), block_rows, block_cols, split_halves)


@functools.lru_cache(maxsize=4096)
def _tiling(shape: tuple[int, ...], block_rows: int, block_cols: int, split_halves: bool) -> Tiling:
    # Shapes repeat across layers and experts: 150k tensors take a few hundred distinct tilings.
    if len(shape) < 2:
        raise ValueError(f"only tensors of 2 or more dimensions are quantized, got shape {list(shape)}")
    *leading, rows, cols = shape
    batch, halves = math.prod(leading), 1
    if split_halves:
        if rows % 2:
            raise ValueError(f"cannot split {rows} rows into halves")
        batch, rows, halves = 2 * batch, rows // 2, 2
    scale_shape = (*leading, halves * math.ceil(rows / block_rows), math.ceil(cols / block_cols))
    return Tiling(batch, rows, cols, scale_shape)


def halves_need_splitting(shape: Sequence[int], block: Block) -> bool:
    """Whether a fused ``[E, 2I, H]`` projection's halves are not whole blocks of rows, so that
    each half must be quantized as a matrix of its own."""
    block_rows = block if isinstance(block, int) else block[0]
    return len(shape) == 3 and shape[1] % 2 == 0 and (shape[1] // 2) % block_rows != 0


class QuantizedLayout(NamedTuple):
    """How one source tensor is quantized and what it becomes."""

    name: str
    shape: tuple[int, ...]
    #: The tensor seen as ``batch`` contiguous matrices of ``rows × cols``.
    batch: int
    rows: int
    cols: int
    block: int
    scale_name: str
    scale_shape: tuple[int, ...]
    scale_dtype: ScaleDtype
    #: True when a fused gate_up projection is quantized half by half.
    split_halves: bool

    @property
    def elements(self) -> int:
        """Elements of the tensor, which is also the bytes of its FP8 weight."""
        return self.batch * self.rows * self.cols

    @property
    def scale_tensor_dtype(self) -> Dtype:
        """The safetensors dtype of the scale tensor."""
        return SCALE_TENSOR_DTYPES[self.scale_dtype]

    @property
    def scale_nbytes(self) -> int:
        """Bytes of the scale tensor."""
        return math.prod(self.scale_shape) * _SCALE_ITEMSIZE[self.scale_dtype]

    @property
    def nbytes(self) -> int:
        """Bytes the tensor takes once quantized: the FP8 weight plus its scales."""
        return self.elements + self.scale_nbytes


def quantized_layout(
    name: str, shape: Sequence[int], block: int = DEFAULT_BLOCK_SIZE, scale_dtype: ScaleDtype = ScaleDtype.FLOAT32
) -> QuantizedLayout:
    """The layout of ``name`` (shape ``shape``, at least 2-D) quantized in ``block × block`` tiles
    with ``scale_dtype`` scales; a fused ``gate_up_proj`` whose halves are not whole blocks is
    quantized half by half."""
    shape = tuple(shape)
    if len(shape) < 2:
        raise ValueError(f"{name}: only tensors of 2 or more dimensions are quantized, got shape {list(shape)}")
    split = name.endswith("gate_up_proj") and halves_need_splitting(shape, block)
    batch, rows, cols, scale_shape = tiling(shape, block, split_halves=split)
    return QuantizedLayout(name, shape, batch, rows, cols, block, name + SCALE_SUFFIX, scale_shape, scale_dtype, split)
