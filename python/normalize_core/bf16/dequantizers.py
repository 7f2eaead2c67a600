"""Where dequantization runs: the Rust kernel on the CPU (no torch), or torch on a GPU.

Both prepare an FP8 weight and its scale (``load(weight)``, called one weight ahead on a helper
thread: the kernel asks for their bytes from disk, torch reads them into page-locked memory) and turn
them into the output tensor's bytes for the shard writer (``dequantize(loaded, weight)``).
"""

from __future__ import annotations

import importlib.util
import os

from normalize_core._core import Checkpoint, dequantize_fp8_tensor
from normalize_core.bf16.formats import Fp8Weight
from normalize_core.devices import AUTO, CPU, CUDA, parse_device, torch_device
from normalize_core.fp8.quantizers import gpu_present
from normalize_core.kinds import Dtype

#: ``--dtype`` names → safetensors dtypes.
OUTPUT_DTYPE_NAMES = {"bfloat16": Dtype.BF16, "float16": Dtype.F16, "float32": Dtype.F32}
_OUTPUT_SIZES = {Dtype.BF16: 2, Dtype.F16: 2, Dtype.F32: 4}


def dequantizer_for(
    device: str, checkpoint: Checkpoint, block: tuple[int, int], dtype: str, threads: int | None = None
):
    """The dequantizer for ``device`` ("auto", "cpu", "cuda", "cuda:N") writing ``dtype``
    ("bfloat16", "float16" or "float32") from scales of ``(rows, cols)`` tiles; on the CPU the
    kernel uses ``threads`` threads (default: every core). Raises ``ValueError`` for any other
    device, or a GPU that torch does not see."""
    device = parse_device(device)
    if device == AUTO:
        device = CUDA if gpu_present() else CPU
    if device == CPU:
        return KernelDequantizer(checkpoint, block, dtype, threads)
    if importlib.util.find_spec("torch") is None:
        raise ValueError(f"device {device!r} needs torch, which is not installed (pip install 'model-normalize[gpu]')")
    return TorchDequantizer(checkpoint, block, dtype, device)


class KernelDequantizer:
    """Dequantizes on the CPU with the Rust kernel, which reads each FP8 weight and its scale
    straight from their files, stripe by stripe, into small per-thread buffers: no copy of the
    whole tensors, and no mapping (a source truncated meanwhile is an error, never a SIGBUS)."""

    device = CPU

    def __init__(self, checkpoint: Checkpoint, block: tuple[int, int], dtype: str, threads: int | None = None):
        self.checkpoint = checkpoint
        self.block = block
        self.out_dtype = OUTPUT_DTYPE_NAMES[dtype]
        self.threads = threads or os.cpu_count() or 1
        # The output buffer is reused from tensor to tensor (grown when needed): a fresh one would
        # cost a page fault and a zeroing per page.
        self._out = bytearray()

    def load(self, weight: Fp8Weight) -> tuple[str, str]:
        """Asks the kernel to start reading the weight and its scale from disk, so that cold bytes
        arrive while the weight before it is dequantized (``load`` runs one weight ahead); returns
        their names, which is what ``dequantize`` reads."""
        names = (weight.name, weight.scale.name)
        self.checkpoint.prefetch(list(names))
        return names

    def dequantize(self, loaded: tuple[str, str], weight: Fp8Weight) -> memoryview:
        """The output bytes of the weight and scale ``loaded`` names, tiled as ``weight``; valid
        until the next call (the buffer is reused)."""
        name, scale_name = loaded
        tiles = weight.tiling
        size = tiles.batch * tiles.rows * tiles.cols * _OUTPUT_SIZES[self.out_dtype]
        if len(self._out) < size:
            self._out = bytearray(size)
        out = memoryview(self._out)[:size]
        dequantize_fp8_tensor(
            self.checkpoint,
            name,
            scale_name,
            tiles.batch,
            tiles.rows,
            tiles.cols,
            out,
            self.out_dtype,
            block_rows=self.block[0],
            block_cols=self.block[1],
            threads=self.threads,
        )
        return out


class TorchDequantizer:
    """Dequantizes with torch's arithmetic on ``device`` (meant for GPUs): the source bytes are
    read into page-locked memory on the read-ahead thread and moved to the device without
    blocking; results come back as host bytes."""

    def __init__(self, checkpoint: Checkpoint, block: tuple[int, int], dtype: str, device: str):
        import torch

        self.torch = torch
        self.target = torch_device(device)
        self.device = str(self.target)
        self.checkpoint = checkpoint
        self.block = block
        self.dtype = getattr(torch, dtype)
        self.dtypes = {
            Dtype.F8_E4M3: torch.float8_e4m3fn,
            Dtype.F32: torch.float32,
            Dtype.BF16: torch.bfloat16,
            Dtype.F16: torch.float16,
            Dtype.F8_E8M0: torch.float8_e8m0fnu,
        }

    def _to_device(self, name: str):
        from normalize_core.fp8.quantize import as_byte_array

        entry = self.checkpoint.tensor(name)
        pinned = self.torch.empty(entry.shape, dtype=self.dtypes[entry.dtype], pin_memory=self.target.type == "cuda")
        if entry.nbytes:
            self.checkpoint.read_into(name, as_byte_array(pinned))
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
            block_size=self.block,
            dtype=self.dtype,
            split_halves=weight.split_halves,
            name=weight.name,
            backend="torch",
        )
        return as_byte_array(y.cpu())
