"""Output shapes of a quantized tensor: the FP8 weight keeps the source shape, its
``<name>_scale_inv`` has one scale per ``block × block`` tile of each matrix.

A 2-D ``[N, K]`` weight is one matrix; a 3-D ``[E, D0, D1]`` fused-experts tensor is ``E``
matrices. A fused ``gate_up_proj`` is split in two halves along dim 1 by vLLM, scale included,
so when a half is not a whole number of blocks each half is quantized as a matrix of its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SCALE_SUFFIX = "_scale_inv"


@dataclass(frozen=True)
class QuantizedLayout:
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
    shape = tuple(int(d) for d in shape)
    if len(shape) < 2:
        raise ValueError(f"{name}: only tensors of 2 or more dimensions are quantized, got shape {list(shape)}")
    *leading, rows, cols = shape
    batch = math.prod(leading)
    split = len(shape) == 3 and name.endswith("gate_up_proj") and rows % 2 == 0 and (rows // 2) % block != 0
    if split:
        half = rows // 2
        scale_shape = (*leading, 2 * math.ceil(half / block), math.ceil(cols / block))
        return QuantizedLayout(name, shape, 2 * batch, half, cols, name + SCALE_SUFFIX, scale_shape, True)
    scale_shape = (*leading, math.ceil(rows / block), math.ceil(cols / block))
    return QuantizedLayout(name, shape, batch, rows, cols, name + SCALE_SUFFIX, scale_shape, False)
