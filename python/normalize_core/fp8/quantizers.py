"""Where quantization runs: the Rust kernel on the CPU (no torch), or torch on a GPU.

Both prepare a source tensor (``load(name)``, called one tensor ahead on a helper thread: the kernel
asks for its bytes from disk, torch reads them into page-locked memory) and turn it into ``(fp8
bytes, scale bytes)`` buffers for the shard writer (``quantize(source, layout)``).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from normalize_core._core import Checkpoint, quantize_fp8_tensor
from normalize_core.devices import AUTO, CPU, CUDA, parse_device, torch_device
from normalize_core.fp8.layout import QuantizedLayout
from normalize_core.kinds import ScaleFormat


def gpu_present() -> bool:
    """Whether torch is installed and sees a GPU. Checks the NVIDIA device node first, so a CPU-only
    machine never pays for importing torch."""
    if importlib.util.find_spec("torch") is None or not Path("/dev/nvidiactl").exists():
        return False
    import torch

    return torch.cuda.is_available()


def quantizer_for(device: str, fp8, threads: int | None = None) -> KernelQuantizer | TorchQuantizer:
    """The quantizer for ``device`` ("auto", "cpu", "cuda", "cuda:N") and a plan made by ``plan_fp8``;
    on the CPU the kernel uses ``threads`` threads (default: every core). Raises ``ValueError`` for
    any other value, or a GPU that torch does not see."""
    device = parse_device(device)
    if device == AUTO:
        device = CUDA if gpu_present() else CPU
    if device == CPU:
        return KernelQuantizer(fp8.checkpoint, fp8.scale_fmt, threads)
    if importlib.util.find_spec("torch") is None:
        raise ValueError(f"device {device!r} needs torch, which is not installed (pip install 'model-normalize[gpu]')")
    return TorchQuantizer(fp8.checkpoint, fp8.scale_fmt, device)


class KernelQuantizer:
    """Quantizes on the CPU with the Rust kernel, which reads each source tensor straight from its
    file, stripe by stripe, into small per-thread buffers: no copy of the whole tensor, and no
    mapping (a source truncated meanwhile is an error, never a SIGBUS). Tiles and scale dtype come
    from each tensor's ``QuantizedLayout``."""

    device = CPU

    def __init__(self, checkpoint: Checkpoint, scale_fmt: ScaleFormat, threads: int | None = None):
        self.checkpoint = checkpoint
        self.scale_fmt = scale_fmt
        self.threads = threads or os.cpu_count() or 1
        # Output buffers are reused from tensor to tensor (grown when needed): fresh ones would
        # cost a page fault and a zeroing per page of every output byte.
        self._fp8 = bytearray()
        self._scale = bytearray()

    def load(self, name: str) -> str:
        """Asks the kernel to start reading the tensor from disk, so that cold bytes arrive while
        the tensor before it is quantized (``load`` runs one tensor ahead); returns the name,
        which is what ``quantize`` reads."""
        self.checkpoint.prefetch([name])
        return name

    def quantize(self, source: str, layout: QuantizedLayout) -> tuple[memoryview, memoryview]:
        """``(fp8 bytes, scale bytes)`` of source tensor ``source``, valid until the next call (the
        buffers are reused)."""
        if len(self._fp8) < layout.elements:
            self._fp8 = bytearray(layout.elements)
        if len(self._scale) < layout.scale_nbytes:
            self._scale = bytearray(layout.scale_nbytes)
        fp8 = memoryview(self._fp8)[: layout.elements]
        scale = memoryview(self._scale)[: layout.scale_nbytes]
        quantize_fp8_tensor(
            self.checkpoint,
            source,
            layout.batch,
            layout.rows,
            layout.cols,
            fp8,
            scale,
            block=layout.block,
            scale_fmt=self.scale_fmt,
            scale_dtype=layout.scale_dtype,
            threads=self.threads,
        )
        return fp8, scale


class TorchQuantizer:
    """Quantizes with torch's arithmetic on ``device`` (meant for GPUs): the source is read into
    page-locked memory on the read-ahead thread and moved to the device without blocking;
    results come back as host bytes."""

    def __init__(self, checkpoint: Checkpoint, scale_fmt: ScaleFormat, device: str):
        import torch

        self.torch = torch
        self.target = torch_device(device)
        self.device = str(self.target)
        if self.target.type == CUDA and self.target.index is not None:
            # Page-locked buffers and streams belong to the current device: make it this one.
            torch.cuda.set_device(self.target)
        self.checkpoint = checkpoint
        self.scale_fmt = scale_fmt

    def load(self, name: str):
        from normalize_core.fp8.quantize import TORCH_SOURCE_DTYPES, as_byte_array

        entry = self.checkpoint.tensor(name)
        dtype = TORCH_SOURCE_DTYPES[entry.dtype]
        # Page-locked host memory lets the copy to the GPU run without blocking this thread.
        pinned = self.torch.empty(entry.shape, dtype=dtype, pin_memory=self.target.type == "cuda")
        if entry.nbytes:
            self.checkpoint.read_into(name, as_byte_array(pinned))
        return pinned.to(self.target, non_blocking=True)

    def quantize(self, source, layout: QuantizedLayout):
        from normalize_core.fp8.quantize import TORCH_SCALE_DTYPES, as_byte_array, quantize_block_fp8

        q, s = quantize_block_fp8(
            source,
            block_size=layout.block,
            scale_fmt=self.scale_fmt,
            scale_dtype=TORCH_SCALE_DTYPES[layout.scale_dtype],
            split_halves=layout.split_halves,
            name=layout.name,
            backend="torch",
        )
        return as_byte_array(q.cpu()), as_byte_array(s.cpu())
