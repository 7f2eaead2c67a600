"""Header-only stand-ins of real checkpoints, built from ``tests/fixtures/realdata/*.standin.json.gz``.

Each shard is a valid safetensors file whose header lists the real tensors (name, dtype, shape, offsets) and
whose data section is a hole (``truncate``): the files claim hundreds of GB and take a few MB of disk. Only
header-reading code (``check``, ``inspect``, planning) may run on them; tensor bytes read back as zeros.
"""

from __future__ import annotations

import gzip
import itertools
import json
import math
import os
import struct
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).parent / "fixtures" / "realdata"

ITEMSIZE = {"BF16": 2, "F16": 2, "F32": 4, "F8_E4M3": 1, "I64": 8, "I32": 4}

#: Shard data limit of the stand-ins (they are sparse, so only the file count matters).
SHARD_BYTES = 50 << 30


@cache
def load_standin(stem: str) -> dict[str, Any]:
    """The committed description of one real checkpoint (see ``make_standins.py``)."""
    return json.loads(gzip.decompress((FIXTURES / f"{stem}.standin.json.gz").read_bytes()))


def expand_runs(runs: str) -> list[int]:
    """``"0-2,4"`` → ``[0, 1, 2, 4]``."""
    numbers: list[int] = []
    for part in runs.split(","):
        first, _, last = part.partition("-")
        numbers.extend(range(int(first), int(last or first) + 1))
    return numbers


def standin_tensors(stem: str) -> Iterator[tuple[str, str, list[int]]]:
    """``(name, dtype, shape)`` of every real tensor, pattern by pattern (a header's order does not matter)."""
    for row in load_standin(stem)["tensors"]:
        axes = [expand_runs(runs) for runs in row["indices"]]
        for numbers in itertools.product(*axes):
            yield row["pattern"].format(*numbers), row["dtype"], row["shape"]


def write_header_only_shard(path: Path, tensors: list[tuple[str, str, list[int]]]) -> None:
    """A safetensors file with ``tensors`` in order and its data section left as a hole."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape in tensors:
        size = math.prod(shape) * ITEMSIZE[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
    os.truncate(path, 8 + len(encoded) + offset)


def write_standin(
    directory: Path,
    tensors: Iterator[tuple[str, str, list[int]]],
    config: dict[str, Any] | None,
    shard_bytes: int = SHARD_BYTES,
) -> Path:
    """A standard sharded checkpoint (index, ``model-i-of-n`` shards, ``config.json``) holding ``tensors``."""
    directory.mkdir(parents=True)
    shards: list[list[tuple[str, str, list[int]]]] = [[]]
    filled = 0
    for tensor in tensors:
        size = math.prod(tensor[2]) * ITEMSIZE[tensor[1]]
        if shards[-1] and filled + size > shard_bytes:
            shards.append([])
            filled = 0
        shards[-1].append(tensor)
        filled += size
    weight_map = {}
    total = 0
    for i, shard in enumerate(shards, 1):
        file_name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_header_only_shard(directory / file_name, shard)
        for name, dtype, shape in shard:
            weight_map[name] = file_name
            total += math.prod(shape) * ITEMSIZE[dtype]
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    if config is not None:
        (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory


def build_standin(stem: str, directory: Path) -> Path:
    """The header-only stand-in of the real checkpoint ``stem`` in ``directory`` (created)."""
    return write_standin(directory, standin_tensors(stem), load_standin(stem)["config"])
