"""Where dequantization runs: the Rust kernel on the CPU (no torch), or torch on a GPU.

Both load an FP8 weight and its scale (``load(name)``, called one weight ahead on a helper thread)
and turn them into the output tensor's bytes for the shard writer (``dequantize(loaded, weight)``).
"""

from __future__ import annotations

import math
import os

from normalize_core._core import Checkpoint, dequantize_fp8_blocks
from normalize_core.bf16.formats import Fp8Weight
from normalize_core.fp8.quantizers import CPU, gpu_present

#: ``--dtype`` names → safetensors dtype names.
OUTPUT_DTYPE_NAMES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
_OUTPUT_SIZES = {"BF16": 2, "F16": 2, "F32": 4}


def dequantizer_for(device: str, checkpoint: Checkpoint, block_size: int, dtype: str):
    """The dequantizer for ``device`` ("auto", "cpu", "cuda", "cuda:N") writing ``dtype``
    ("bfloat16", "float16" or "float32")."""
    if device == "auto":
        device = "cuda" if gpu_present() else CPU
    if device == CPU:
        return KernelDequantizer(checkpoint, block_size, dtype)
    return TorchDequantizer(checkpoint, block_size, dtype, device)


class KernelDequantizer:
    """Dequantizes on the CPU with the Rust kernel, reading the source's mapped pages directly."""

    device = CPU

    def __init__(self, checkpoint: Checkpoint, block_size: int, dtype: str):
        self.checkpoint = checkpoint
        self.block_size = block_size
        self.out_dtype = OUTPUT_DTYPE_NAMES[dtype]
        self.threads = os.cpu_count() or 1
        # The output buffer is reused from tensor to tensor (grown when needed): a fresh one
        # would cost a page fault and a zeroing per page of every output byte.
        self._out = bytearray()

    def load(self, weight: Fp8Weight):
        """Zero-copy views of the weight's and its scale's bytes, their pages read in now."""
        view = self.checkpoint.view
        return view(weight.name, populate=True), view(weight.scale.name, populate=True)

    def dequantize(self, loaded, weight: Fp8Weight) -> memoryview:
        """The output bytes, valid until the next call (the buffer is reused)."""
        q, scale = loaded
        layout = weight.layout
        size = math.prod(layout.shape) * _OUTPUT_SIZES[self.out_dtype]
        if len(self._out) < size:
            self._out = bytearray(size)
        out = memoryview(self._out)[:size]
        dequantize_fp8_blocks(
            weight.name,
            q,
            scale,
            weight.scale.dtype,
            layout.batch,
            layout.rows,
            layout.cols,
            out,
            self.out_dtype,
            block_rows=self.block_size,
            block_cols=self.block_size,
            threads=self.threads,
        )
        return out


class TorchDequantizer:
    """Dequantizes with torch's arithmetic on ``device`` (meant for GPUs): the source bytes are
    copied to page-locked memory on the read-ahead thread and moved to the device without
    blocking; results come back as host bytes."""

    def __init__(self, checkpoint: Checkpoint, block_size: int, dtype: str, device: str):
        import torch

        self.torch = torch
        resolved = torch.device(device)
        if resolved.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but torch sees no CUDA device")
        self.target = resolved
        self.device = str(resolved)
        self.checkpoint = checkpoint
        self.block_size = block_size
        self.dtype = getattr(torch, dtype)
        self.dtypes = {
            "F8_E4M3": torch.float8_e4m3fn,
            "F32": torch.float32,
            "BF16": torch.bfloat16,
            "F16": torch.float16,
            "F8_E8M0": torch.float8_e8m0fnu,
        }

    def _to_device(self, name: str):
        import numpy

        from normalize_core.fp8.quantize import as_byte_array

        entry = self.checkpoint.tensor(name)
        pinned = self.torch.empty(entry.shape, dtype=self.dtypes[entry.dtype], pin_memory=self.target.type == "cuda")
        if entry.nbytes:
            as_byte_array(pinned)[:] = numpy.frombuffer(self.checkpoint.view(name, populate=True), dtype=numpy.uint8)
        return pinned.to(self.target, non_blocking=True)

    def load(self, weight: Fp8Weight):
        """The weight and its scale on the device (the copies may still be in flight)."""
        return self._to_device(weight.name), self._to_device(weight.scale.name)

    def dequantize(self, loaded, weight: Fp8Weight):
        """The output bytes (a host copy of the device's result)."""
        from normalize_core.bf16.dequantize import dequantize_block_fp8
        from normalize_core.fp8.quantize import as_byte_array

        q, scale = loaded
        y = dequantize_block_fp8(
            q,
            scale,
            block_size=self.block_size,
            dtype=self.dtype,
            split_halves=weight.layout.split_halves,
            name=weight.name,
            backend="torch",
        )
        return as_byte_array(y.cpu())
