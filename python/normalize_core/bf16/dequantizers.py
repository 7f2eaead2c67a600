"""Where dequantization runs: the Rust kernel on the CPU (no torch), or torch on a GPU.

Both load an FP8 weight and its scale (``load(name)``, called one weight ahead on a helper thread)
and turn them into the output tensor's bytes for the shard writer (``dequantize(loaded, weight)``).
"""

from __future__ import annotations

import importlib.util
import os

from normalize_core._core import Checkpoint, dequantize_fp8_blocks
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
    """Dequantizes on the CPU with the Rust kernel."""

    device = CPU

    def __init__(self, checkpoint: Checkpoint, block: tuple[int, int], dtype: str, threads: int | None = None):
        self.checkpoint = checkpoint
        self.block = block
        self.out_dtype = OUTPUT_DTYPE_NAMES[dtype]
        self.threads = threads or os.cpu_count() or 1
        # Buffers are reused from tensor to tensor (grown when needed): fresh ones would cost a
        # page fault and a zeroing per page. Sources come in two slots used in turn: ``load`` runs
        # one weight ahead, filling one slot while the other is being dequantized.
        self._out = bytearray()
        self._sources = [[bytearray(), bytearray()], [bytearray(), bytearray()]]
        self._next_slot = 0

    def _read(self, name: str, buffers: list[bytearray], index: int) -> memoryview:
        nbytes = self.checkpoint.tensor(name).nbytes
        if len(buffers[index]) < nbytes:
            buffers[index] = bytearray(nbytes)
        view = memoryview(buffers[index])[:nbytes]
        self.checkpoint.read_into(name, view)
        return view

    def load(self, weight: Fp8Weight) -> tuple[memoryview, memoryview]:
        """The weight's and its scale's bytes, read now into the next source slot."""
        slot, self._next_slot = self._sources[self._next_slot], 1 - self._next_slot
        return self._read(weight.name, slot, 0), self._read(weight.scale.name, slot, 1)

    def dequantize(self, loaded, weight: Fp8Weight) -> memoryview:
        """The output bytes, valid until the next call (the buffer is reused)."""
        q, scale = loaded
        tiles = weight.tiling
        size = tiles.batch * tiles.rows * tiles.cols * _OUTPUT_SIZES[self.out_dtype]
        if len(self._out) < size:
            self._out = bytearray(size)
        out = memoryview(self._out)[:size]
        dequantize_fp8_blocks(
            weight.name,
            q,
            scale,
            weight.scale.dtype,
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
