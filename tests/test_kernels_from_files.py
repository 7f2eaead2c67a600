"""The CPU kernels reading their input straight from a checkpoint's file (``quantize_fp8_tensor``,
``dequantize_fp8_tensor``): stripe by stripe, with the bytes of the same kernel on the same tensor in
memory, of torch's arithmetic and of the numpy reference, on tensors whose rows are not a multiple of the
stripe, 3-D experts and a fused gate_up quantized half by half. A source that changes before or while
they read it is one clear error (kind ``source_changed``), never a signal."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from bf16_util import dequantize_reference, fp8_tensor, output_bytes, random_codes, random_scales
from normalize_core import Checkpoint, NormalizeError
from normalize_core._core import dequantize_fp8_tensor, quantize_fp8_tensor
from normalize_core.fp8.layout import quantized_layout, tiling
from normalize_core.fp8.quantize import TORCH_SCALE_DTYPES, quantize_block_fp8
from normalize_core.kinds import ScaleDtype

SINGLE_FILE = "model.safetensors"

#: Source tensors to quantize: rows that are not a multiple of the 128-row stripe (and ragged
#: columns), 3-D experts, and a fused gate_up_proj whose halves (192 rows) are quantized apart.
SOURCES = {
    "model.layers.0.self_attn.q_proj.weight": (torch.bfloat16, (300, 260)),
    "model.layers.0.mlp.experts.down_proj": (torch.float16, (3, 200, 136)),
    "model.layers.0.mlp.experts.gate_up_proj": (torch.float32, (2, 384, 136)),
}
#: FP8 weights to dequantize (the same three geometries) and whether their halves were split.
FP8_WEIGHTS = {
    "model.layers.0.self_attn.q_proj.weight": ((300, 200), False),
    "model.layers.0.mlp.experts.down_proj": ((3, 200, 130), False),
    "model.layers.0.mlp.experts.gate_up_proj": ((2, 384, 256), True),
}
OUT_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}
OUT_SIZES = {"BF16": 2, "F16": 2, "F32": 4}


def save_single_file(directory: Path, tensors: dict[str, torch.Tensor]) -> Checkpoint:
    """``tensors`` as ``directory/model.safetensors`` (a small norm in front, so offsets are not round),
    opened."""
    directory.mkdir()
    tensors = {"model.norm.weight": torch.ones(3, dtype=torch.bfloat16), **tensors}
    save_file(tensors, directory / SINGLE_FILE, metadata={"format": "pt"})
    return Checkpoint.open(directory)


def source_tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    return {
        name: (torch.randn(shape, generator=generator) * torch.rand(shape[-1], generator=generator) * 3).to(dtype)
        for name, (dtype, shape) in SOURCES.items()
    }


def quantized_from_file(checkpoint: Checkpoint, layout, scale_fmt: str, threads: int) -> tuple[bytes, bytes]:
    fp8, scale = bytearray(layout.elements), bytearray(layout.scale_nbytes)
    quantize_fp8_tensor(
        checkpoint,
        layout.name,
        layout.batch,
        layout.rows,
        layout.cols,
        fp8,
        scale,
        block=layout.block,
        scale_fmt=scale_fmt,
        scale_dtype=layout.scale_dtype,
        threads=threads,
    )
    return bytes(fp8), bytes(scale)


@pytest.mark.parametrize(
    ("scale_fmt", "scale_dtype"),
    [("float", ScaleDtype.FLOAT32), ("ue8m0", ScaleDtype.FLOAT32), ("float", ScaleDtype.BFLOAT16)],
)
def test_quantizing_from_the_file_gives_the_bytes_of_the_in_memory_kernel_and_of_torch(
    tmp_path: Path, scale_fmt: str, scale_dtype: ScaleDtype
):
    tensors = source_tensors()
    checkpoint = save_single_file(tmp_path / "src", tensors)
    for name, tensor in tensors.items():
        layout = quantized_layout(name, tensor.shape, 128, scale_dtype)
        assert layout.split_halves == name.endswith("gate_up_proj")
        expected = {}
        for backend in ("kernel", "torch"):
            q, s = quantize_block_fp8(
                tensor,
                scale_fmt=scale_fmt,
                scale_dtype=TORCH_SCALE_DTYPES[scale_dtype],
                split_halves=layout.split_halves,
                backend=backend,
            )
            expected[backend] = (output_bytes(q).tobytes(), output_bytes(s).tobytes())
        assert expected["kernel"] == expected["torch"], name
        for threads in (1, 2, 5):
            assert quantized_from_file(checkpoint, layout, scale_fmt, threads) == expected["torch"], (name, threads)


@pytest.mark.parametrize("scale_kind", ["float32", "bfloat16", "e8m0"])
@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
def test_dequantizing_from_the_file_matches_the_numpy_reference(tmp_path: Path, scale_kind: str, out_dtype: str):
    tensors, values = {}, {}
    for seed, (name, (shape, split_halves)) in enumerate(FP8_WEIGHTS.items()):
        codes = random_codes(shape, seed)
        stored, values[name] = random_scales(
            tiling(shape, 128, split_halves=split_halves).scale_shape, scale_kind, seed
        )
        tensors[name], tensors[name + "_scale_inv"] = fp8_tensor(codes), stored
    checkpoint = save_single_file(tmp_path / "src", tensors)
    for name, (shape, split_halves) in FP8_WEIGHTS.items():
        batch, rows, cols, _ = tiling(shape, 128, split_halves=split_halves)
        codes = tensors[name].view(torch.uint8).numpy()
        want = dequantize_reference(codes, values[name], OUT_DTYPES[out_dtype], split_halves=split_halves)
        for threads in (1, 3):
            out = bytearray(batch * rows * cols * OUT_SIZES[out_dtype])
            dequantize_fp8_tensor(
                checkpoint, name, name + "_scale_inv", batch, rows, cols, out, out_dtype, threads=threads
            )
            assert np.array_equal(np.frombuffer(out, dtype=np.uint8), want), (name, threads)


def test_the_file_entry_points_refuse_what_they_cannot_read(tmp_path: Path):
    weight = "model.layers.0.self_attn.q_proj.weight"
    checkpoint = save_single_file(tmp_path / "src", {weight: torch.zeros(300, 260, dtype=torch.bfloat16)})
    fp8, scale = bytearray(300 * 260), bytearray(3 * 3 * 4)
    quantize_fp8_tensor(checkpoint, weight, 1, 300, 260, fp8, scale)
    with pytest.raises(KeyError, match="model.missing"):
        quantize_fp8_tensor(checkpoint, "model.missing", 1, 300, 260, fp8, scale)
    with pytest.raises(NormalizeError, match="input has 156000 bytes") as raised:
        quantize_fp8_tensor(checkpoint, weight, 1, 150, 260, fp8, scale)
    assert (raised.value.kind, raised.value.tensor) == ("invalid_quantize_input", weight)
    with pytest.raises(ValueError, match="fp8_out buffer is read-only"):
        quantize_fp8_tensor(checkpoint, weight, 1, 300, 260, bytes(fp8), scale)
    shared = memoryview(bytearray(len(fp8) + 8))
    with pytest.raises(ValueError, match="input and output buffers overlap"):
        quantize_fp8_tensor(checkpoint, weight, 1, 300, 260, shared[: len(fp8)], shared[len(fp8) - 4 : len(fp8) + 32])
    with pytest.raises(NormalizeError, match=r"'model.norm.weight': is BF16; only F8_E4M3 weights are dequantized"):
        dequantize_fp8_tensor(checkpoint, "model.norm.weight", weight, 1, 1, 3, bytearray(6), "BF16")
    with pytest.raises(ValueError, match="cannot dequantize to dtype I8"):
        dequantize_fp8_tensor(checkpoint, weight, weight, 1, 300, 260, bytearray(1), "I8")


@pytest.mark.parametrize("change", ["truncated", "rewritten"])
def test_a_source_changed_since_opening_is_refused_before_any_read(tmp_path: Path, change: str):
    tensors = source_tensors()
    checkpoint = save_single_file(tmp_path / "src", tensors)
    path = tmp_path / "src" / SINGLE_FILE
    if change == "truncated":
        path.write_bytes(path.read_bytes()[:-100])
    else:
        data = bytearray(path.read_bytes())
        data[-1] ^= 1
        path.write_bytes(data)
    name = "model.layers.0.mlp.experts.down_proj"
    layout = quantized_layout(name, SOURCES[name][1])
    with pytest.raises(NormalizeError) as raised:
        quantized_from_file(checkpoint, layout, "float", 2)
    assert raised.value.kind == "source_changed"
    assert raised.value.file == str(path)
    detail = "it was modified" if change == "rewritten" else "bytes, now"
    assert str(raised.value).startswith(f"{path}: changed while being read (") and detail in str(raised.value)


#: Opens the checkpoint in ``argv[1]``, starts a thread that truncates or rewrites its file (``argv[3]``)
#: a moment later, and runs one kernel (``argv[2]``) on its 16 MiB tensor ``w`` with one thread, so the
#: change lands while the stripes are being read. Prints the error (exit 3) or ``finished`` (exit 0).
CHANGE_WHILE_READING = textwrap.dedent(
    """
    import os, sys, threading, time
    from normalize_core import Checkpoint, NormalizeError
    from normalize_core._core import dequantize_fp8_tensor, quantize_fp8_tensor

    directory, kernel, change = sys.argv[1:]
    checkpoint = Checkpoint.open(directory)
    entry = checkpoint.tensor("w")
    path = os.path.join(directory, entry.file)
    rows, cols = entry.shape

    def change_the_source():
        time.sleep(0.001)
        if change == "truncate":
            os.truncate(path, entry.file_offset + entry.nbytes // 2)
        else:
            with open(path, "r+b") as f:
                f.seek(entry.file_offset + entry.nbytes - 1)
                f.write(b"x")

    fp8, scales, out = bytearray(rows * cols), bytearray(rows * cols // 4096), bytearray(rows * cols * 2)
    threading.Thread(target=change_the_source).start()
    try:
        if kernel == "quantize":
            quantize_fp8_tensor(checkpoint, "w", 1, rows, cols, fp8, scales)
        else:
            dequantize_fp8_tensor(checkpoint, "w", "w_scale_inv", 1, rows, cols, out, "BF16")
    except NormalizeError as e:
        print(e.kind, e)
        sys.exit(3)
    print("finished")
    """
)


@pytest.mark.parametrize("change", ["truncate", "rewrite"])
@pytest.mark.parametrize("kernel", ["quantize", "dequantize"])
def test_a_source_changed_while_being_read_is_one_clear_error_never_a_signal(tmp_path: Path, kernel: str, change: str):
    """Kernels used to read a mapping of the source, where a truncation is a SIGBUS. Now each stripe is a
    checked positional read: a shrunk file is a short read, a rewrite fails the identity check after the
    tensor. The change lands at some point of the reading; whichever, the outcome is the same error."""
    rows, cols = 4096, 2048
    if kernel == "quantize":
        tensors = {"w": torch.randn(rows, cols, generator=torch.Generator().manual_seed(3)).bfloat16()}
    else:
        tensors = {"w": fp8_tensor(random_codes((rows, cols), 3)), "w_scale_inv": torch.ones(rows // 128, cols // 128)}
    errors = []
    for attempt in range(5):
        directory = tmp_path / f"src{attempt}"
        save_single_file(directory, tensors)
        command = [sys.executable, "-c", CHANGE_WHILE_READING, str(directory), kernel, change]
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert result.returncode in (0, 3), f"exit {result.returncode}: {result.stderr}"
        assert result.stderr == ""
        if result.returncode == 3:
            errors.append(result.stdout.strip())
            break
    assert errors, "the change never landed before the kernel finished"
    line = errors[0]
    assert line.startswith(f"source_changed {directory / SINGLE_FILE}: changed while being read ("), line
    if change == "rewrite":
        assert "it was modified" in line, line
    else:
        assert "it shrank" in line or "bytes, now" in line, line
