"""Output shapes of a quantized tensor: the FP8 weight keeps the source shape, its
``<name>_scale_inv`` has one scale per ``block × block`` tile of each matrix.

A 2-D ``[N, K]`` weight is one matrix; a 3-D ``[E, D0, D1]`` fused-experts tensor is ``E``
matrices. A fused ``gate_up_proj`` is split in two halves along dim 1 by vLLM, scale included,
so when a half is not a whole number of blocks each half is quantized as a matrix of its own.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

SCALE_SUFFIX = "_scale_inv"


class QuantizedLayout(NamedTuple):
    """How one source tensor is quantized and what it becomes."""

    name: str
    shape: tuple[int, ...]
    #: The tensor seen as ``batch`` contiguous matrices of ``rows × cols``.
    batch: int
    rows: int
    cols: int
    scale_name: str
    scale_shape: tuple[int, ...]
    #: True when a fused gate_up projection is quantized half by half.
    split_halves: bool


def quantized_layout(name: str, shape: tuple[int, ...] | list[int], block: int) -> QuantizedLayout:
    """The layout of ``name`` (shape ``shape``, at least 2-D) quantized in ``block × block`` tiles."""
    shape = tuple(shape)
    if len(shape) < 2:
        raise ValueError(f"{name}: only tensors of 2 or more dimensions are quantized, got shape {list(shape)}")
    batch, rows, cols, scale_shape, split = _tiling(shape, name.endswith("gate_up_proj"), block)
    return QuantizedLayout(name, shape, batch, rows, cols, name + SCALE_SUFFIX, scale_shape, split)


@functools.lru_cache(maxsize=4096)
def _tiling(shape: tuple[int, ...], gate_up: bool, block: int) -> tuple[int, int, int, tuple[int, ...], bool]:
    """``(batch, rows, cols, scale shape, split halves)``; shapes repeat across layers and experts."""
    *leading, rows, cols = shape
    batch = math.prod(leading)
    if len(shape) == 3 and gate_up and rows % 2 == 0 and (rows // 2) % block != 0:
        half = rows // 2
        return 2 * batch, half, cols, (*leading, 2 * math.ceil(half / block), math.ceil(cols / block)), True
    return batch, rows, cols, (*leading, math.ceil(rows / block), math.ceil(cols / block)), False


def quantized_bytes(name: str, shape: tuple[int, ...] | list[int], block: int, scale_size: int) -> int:
    """Bytes ``name`` takes once quantized: one per element plus its scales."""
    _, _, _, scale_shape, _ = _tiling(tuple(shape), name.endswith("gate_up_proj"), block)
    return math.prod(shape) + math.prod(scale_shape) * scale_size
