"""Where quantization runs: the Rust kernel on the CPU (no torch), or torch on a GPU.

Both load a source tensor (``load(name)``, called one tensor ahead on a helper thread) and turn
it into ``(fp8 bytes, scale bytes)`` buffers for the shard writer (``quantize(source, layout)``).
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

from normalize_core._core import Checkpoint, quantize_fp8_blocks
from normalize_core.fp8.layout import QuantizedLayout

#: ``--device`` spellings that mean "no GPU".
CPU = "cpu"


def gpu_present() -> bool:
    """Whether torch is installed and sees a GPU. Checks the NVIDIA device node first, so a CPU-only
    machine never pays for importing torch."""
    if importlib.util.find_spec("torch") is None or not Path("/dev/nvidiactl").exists():
        return False
    import torch

    return torch.cuda.is_available()


def quantizer_for(device: str, fp8, threads: int | None = None) -> KernelQuantizer | TorchQuantizer:
    """The quantizer for ``device`` ("auto", "cpu", "cuda", "cuda:N") and a plan made by ``plan_fp8``;
    on the CPU the kernel uses ``threads`` threads (default: every core)."""
    if device == "auto":
        device = "cuda" if gpu_present() else CPU
    if device == CPU:
        return KernelQuantizer(fp8.checkpoint, fp8.block_size, fp8.scale_fmt, fp8.scale_dtype, threads)
    return TorchQuantizer(fp8.checkpoint, fp8.block_size, fp8.scale_fmt, fp8.scale_dtype, device)


class KernelQuantizer:
    """Quantizes on the CPU with the Rust kernel, reading the source's mapped pages directly."""

    device = CPU

    def __init__(
        self, checkpoint: Checkpoint, block_size: int, scale_fmt: str, scale_dtype: str, threads: int | None = None
    ):
        self.checkpoint = checkpoint
        self.block_size = block_size
        self.ue8m0 = scale_fmt == "ue8m0"
        self.scale_bf16 = scale_dtype == "bfloat16"
        self.threads = threads or os.cpu_count() or 1
        # Output buffers are reused from tensor to tensor (grown when needed): fresh ones would
        # cost a page fault and a zeroing per page of every output byte.
        self._fp8 = bytearray()
        self._scale = bytearray()

    def load(self, name: str):
        """A zero-copy view of the tensor's bytes, its pages read in now."""
        return self.checkpoint.view(name, populate=True)

    def quantize(self, source, layout: QuantizedLayout) -> tuple[memoryview, memoryview]:
        """``(fp8 bytes, scale bytes)``, valid until the next call (the buffers are reused)."""
        elements = layout.batch * layout.rows * layout.cols
        scale_bytes = math.prod(layout.scale_shape) * (2 if self.scale_bf16 else 4)
        if len(self._fp8) < elements:
            self._fp8 = bytearray(elements)
        if len(self._scale) < scale_bytes:
            self._scale = bytearray(scale_bytes)
        fp8 = memoryview(self._fp8)[:elements]
        scale = memoryview(self._scale)[:scale_bytes]
        quantize_fp8_blocks(
            layout.name,
            source,
            self.checkpoint.tensor(layout.name).dtype,
            layout.batch,
            layout.rows,
            layout.cols,
            fp8,
            scale,
            block=self.block_size,
            ue8m0=self.ue8m0,
            scale_bf16=self.scale_bf16,
            threads=self.threads,
        )
        return fp8, scale


class TorchQuantizer:
    """Quantizes with torch's arithmetic on ``device`` (meant for GPUs): the source is copied to
    page-locked memory on the read-ahead thread and moved to the device without blocking;
    results come back as host bytes."""

    def __init__(self, checkpoint: Checkpoint, block_size: int, scale_fmt: str, scale_dtype: str, device: str):
        import torch

        from normalize_core.fp8.quantize import SCALE_DTYPES

        self.torch = torch
        resolved = torch.device(device)
        if resolved.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but torch sees no CUDA device")
        if resolved.type == "cuda" and resolved.index is not None:
            # Page-locked buffers and streams belong to the current device: make it this one.
            torch.cuda.set_device(resolved)
        self.target = resolved
        self.device = str(resolved)
        self.checkpoint = checkpoint
        self.block_size = block_size
        self.scale_fmt = scale_fmt
        self.scale_dtype = SCALE_DTYPES[scale_dtype]
        self.dtypes = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}

    def load(self, name: str):
        import numpy

        from normalize_core.fp8.quantize import as_byte_array

        entry = self.checkpoint.tensor(name)
        dtype = self.dtypes[entry.dtype]
        # Page-locked host memory lets the copy to the GPU run without blocking this thread.
        pinned = self.torch.empty(entry.shape, dtype=dtype, pin_memory=self.target.type == "cuda")
        if entry.nbytes:
            source = numpy.frombuffer(self.checkpoint.view(name, populate=True), dtype=numpy.uint8)
            as_byte_array(pinned)[:] = source
        return pinned.to(self.target, non_blocking=True)

    def quantize(self, source, layout: QuantizedLayout):
        from normalize_core.fp8.quantize import as_byte_array, quantize_block_fp8

        q, s = quantize_block_fp8(
            source,
            block_size=self.block_size,
            scale_fmt=self.scale_fmt,
            scale_dtype=self.scale_dtype,
            split_halves=layout.split_halves,
            name=layout.name,
            backend="torch",
        )
        return as_byte_array(q.cpu()), as_byte_array(s.cpu())
