"""Checks of an output directory against HF's sharded layout, for the repack tests.

Outputs are read with ``safetensors.safe_open`` (see ``builders``) plus an independent header
parser, so a round trip compares the tool against the reference implementation, not against itself.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from pathlib import Path

from builders import HEADER_DTYPES, INDEX, TensorBytes, read_output_bytes
from normalize_core import Checkpoint, verify_checkpoint

#: Every torch dtype that ``safetensors.torch`` saves: all safetensors dtypes except the two F6 formats.
TORCH_DTYPES = list(HEADER_DTYPES)
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


def read_raw_header(path: Path) -> tuple[int, dict]:
    """``(N, header JSON)`` of a safetensors file, parsed with the standard library only."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return length, json.loads(f.read(length))


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
