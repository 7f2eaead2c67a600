"""Helpers for the repack tests: build checkpoints with the ``safetensors`` library, read outputs back
with it, and check an output directory against HF's sharded layout.

Source checkpoints are written by ``safetensors.torch.save_file`` (or ``safetensors.numpy``), never by
this project, and outputs are read with ``safetensors.safe_open`` plus an independent header parser,
so a round trip compares the tool against the reference implementation, not against itself.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from normalize_core import Checkpoint, verify_checkpoint

#: Every torch dtype that ``safetensors.torch`` saves: all of DESIGN §2 except the two F6 formats.
TORCH_DTYPES = [
    torch.bool,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.uint16,
    torch.float16,
    torch.bfloat16,
    torch.int32,
    torch.uint32,
    torch.float32,
    torch.float64,
    torch.int64,
    torch.uint64,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.float8_e8m0fnu,
    torch.float8_e4m3fnuz,
    torch.float8_e5m2fnuz,
    torch.complex64,
    torch.float4_e2m1fn_x2,
]
INDEX = "model.safetensors.index.json"
STANDARD_SHARD = re.compile(r"^model-(\d{5})-of-(\d{5})\.safetensors$")

#: Bytes per element of each header dtype (sub-byte formats count whole bytes of their packing).
ITEMSIZE = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,
    "F8_E4M3FNUZ": 1,
    "F8_E5M2FNUZ": 1,
    "F4": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
    "C64": 8,
}

TensorBytes = dict[str, tuple[str, list[int], bytes]]
"""Tensor name → (header dtype, shape, raw little-endian bytes)."""


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The bytes safetensors stores for ``tensor`` (C order, native little-endian)."""
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """A tensor of ``dtype`` filled with random bit patterns (bools stay 0/1)."""
    numel = math.prod(shape)
    probe = torch.empty(0, dtype=dtype)
    raw = torch.randint(0, 256, (numel * probe.element_size(),), dtype=torch.uint8, generator=generator)
    if dtype == torch.bool:
        raw &= 1
    return raw.view(dtype).reshape(shape)


def save_engine_checkpoint(directory: Path, files: dict[str, dict[str, torch.Tensor]]) -> Path:
    """Writes each ``{file name: tensors}`` with ``safetensors.torch.save_file``; no index."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, tensors in files.items():
        save_file(tensors, directory / name, metadata={"format": "pt"})
    return directory


def save_standard_checkpoint(directory: Path, shards: list[dict[str, torch.Tensor]]) -> Path:
    """Writes ``model-{i:05d}-of-{n:05d}.safetensors`` shards and an index the way transformers does."""
    directory.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    total_size = 0
    for i, tensors in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, directory / name, metadata={"format": "pt"})
        for key, tensor in tensors.items():
            weight_map[key] = name
            total_size += tensor.numel() * tensor.element_size()
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / INDEX).write_text(json.dumps(index, indent=2))
    return directory


def expected_bytes(tensors: dict[str, torch.Tensor]) -> TensorBytes:
    """What a reader must find for each of ``tensors`` after a lossless round trip."""
    return {name: (header_dtype(t), header_shape(t), tensor_bytes(t)) for name, t in tensors.items()}


def header_shape(tensor: torch.Tensor) -> list[int]:
    """The shape ``save_file`` writes: a ``float4_e2m1fn_x2`` element is two F4 values."""
    shape = list(tensor.shape)
    if tensor.dtype == torch.float4_e2m1fn_x2:
        shape[-1] *= 2
    return shape


def header_dtype(tensor: torch.Tensor) -> str:
    """The safetensors dtype string of a torch tensor, as ``save_file`` writes it."""
    names = {
        torch.bool: "BOOL",
        torch.uint8: "U8",
        torch.int8: "I8",
        torch.int16: "I16",
        torch.uint16: "U16",
        torch.float16: "F16",
        torch.bfloat16: "BF16",
        torch.int32: "I32",
        torch.uint32: "U32",
        torch.float32: "F32",
        torch.float64: "F64",
        torch.int64: "I64",
        torch.uint64: "U64",
        torch.float8_e4m3fn: "F8_E4M3",
        torch.float8_e5m2: "F8_E5M2",
        torch.float8_e8m0fnu: "F8_E8M0",
        torch.float8_e4m3fnuz: "F8_E4M3FNUZ",
        torch.float8_e5m2fnuz: "F8_E5M2FNUZ",
        torch.complex64: "C64",
        torch.float4_e2m1fn_x2: "F4",
    }
    return names[tensor.dtype]


def read_raw_header(path: Path) -> tuple[int, dict]:
    """``(N, header JSON)`` of a safetensors file, parsed with the standard library only."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return length, json.loads(f.read(length))


def read_output_bytes(directory: Path) -> TensorBytes:
    """Every tensor of a standard-layout directory, read through its index with ``safe_open``."""
    weight_map = json.loads((directory / INDEX).read_text())["weight_map"]
    found: TensorBytes = {}
    for shard in sorted(set(weight_map.values())):
        with safe_open(directory / shard, framework="pt") as f:
            assert f.metadata() == {"format": "pt"}, shard
            for name in f.keys():
                assert weight_map[name] == shard, f"{name} is in {shard}, the index says {weight_map[name]}"
                view = f.get_slice(name)
                found[name] = (view.get_dtype(), view.get_shape(), tensor_bytes(f.get_tensor(name)))
    return found


def assert_standard_output(output: Path, expected: TensorBytes, max_shard_bytes: int) -> dict:
    """Checks ``output`` is a complete, loadable HF sharded checkpoint holding exactly ``expected``.

    Shards are named ``model-{i:05d}-of-{n:05d}``, 1..n, each at most ``max_shard_bytes`` unless it
    holds a single tensor; headers are padded to 8 bytes, say ``format: pt`` and keep every tensor
    aligned to its element size; the index lists every tensor once, keys sorted, with the right
    ``total_size`` and ``total_parameters``; every tensor reads back byte for byte; the structural checks
    find nothing and ``verify`` passes (unless FP8 tensors bring in the FP8 contract); no temporary file
    is left. Returns the index.
    """
    index = json.loads((output / INDEX).read_text())
    weight_map = index["weight_map"]
    assert list(weight_map) == sorted(weight_map)
    assert set(weight_map) == set(expected)

    shards = sorted(name for name in os.listdir(output) if name.endswith(".safetensors"))
    assert shards == sorted(set(weight_map.values()))
    numbers = [STANDARD_SHARD.match(name) for name in shards]
    assert all(numbers), shards
    assert [(int(m[1]), int(m[2])) for m in numbers] == [(i, len(shards)) for i in range(1, len(shards) + 1)]

    for shard in shards:
        length, header = read_raw_header(output / shard)
        assert length % 8 == 0
        assert header.pop("__metadata__") == {"format": "pt"}
        size = (output / shard).stat().st_size
        assert size <= max_shard_bytes or len(header) == 1, f"{shard}: {size} bytes over {max_shard_bytes}"
        for name, entry in header.items():
            assert (8 + length + entry["data_offsets"][0]) % ITEMSIZE[entry["dtype"]] == 0, name

    assert read_output_bytes(output) == expected
    assert index["metadata"]["total_size"] == sum(len(data) for _, _, data in expected.values())
    assert index["metadata"]["total_parameters"] == sum(math.prod(shape) for _, shape, _ in expected.values())
    assert Checkpoint.open(output).problems() == []
    if not any(dtype == "F8_E4M3" for dtype, _, _ in expected.values()):
        # With float8_e4m3fn tensors, verify also holds them to the block-FP8 contract (scales,
        # quantization_config), which arbitrary test tensors do not meet.
        report = verify_checkpoint(output)
        assert report.ok, report.findings
        assert report.findings == []
    assert not leftover_partials(output)
    return index


def leftover_partials(directory: Path) -> list[str]:
    """Temporary files (``.<name>.partial-<pid>``) anywhere under ``directory``."""
    return [str(p) for p in directory.rglob(".*.partial-*")]


def shard_files(directory: Path) -> list[str]:
    """``*.safetensors`` and index files directly in ``directory`` (empty when it does not exist)."""
    if not directory.exists():
        return []
    return sorted(n for n in os.listdir(directory) if n.endswith((".safetensors", ".safetensors.index.json")))
