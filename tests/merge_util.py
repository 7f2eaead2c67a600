"""Helpers for the diff, merge and placement tests: tiny real checkpoints written with the
``safetensors`` library in each layout, read back through ``safe_open``, and snapshots that prove
a directory was left alone."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

INDEX = "model.safetensors.index.json"


def make_tensors(spec: dict[str, tuple[torch.dtype, tuple[int, ...]]], seed: int) -> dict[str, torch.Tensor]:
    """Random tensors of the given dtypes and shapes (different seeds give different bytes)."""
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=generator).to(dtype) for name, (dtype, shape) in spec.items()}


def write_checkpoint(
    directory: Path,
    tensors: dict[str, torch.Tensor],
    *,
    layout: str = "indexed",
    files: int = 2,
    aux: dict[str, str] | None = None,
) -> Path:
    """Writes ``tensors`` in order as ``layout``: ``"indexed"`` (``files`` standard-named shards
    plus an index), ``"single"`` (one ``model.safetensors``) or ``"engine"`` (``files``
    engine-named shards, no index). ``aux`` maps relative paths to text for non-tensor files."""
    directory.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    if layout == "single":
        save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    else:
        chunks = [names[i::files] for i in range(files)]
        weight_map = {}
        for i, chunk in enumerate(chunks):
            if layout == "indexed":
                file_name = f"model-{i + 1:05d}-of-{files:05d}.safetensors"
            else:
                file_name = f"model-language-{i + 1:04d}-fused-save_rank{i}.safetensors"
            save_file({n: tensors[n] for n in chunk}, directory / file_name, metadata={"format": "pt"})
            weight_map |= {n: file_name for n in chunk}
        if layout == "indexed":
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (directory / INDEX).write_text(json.dumps(index, indent=2))
    for relative, text in (aux or {}).items():
        (directory / relative).parent.mkdir(parents=True, exist_ok=True)
        (directory / relative).write_text(text)
    return directory


def write_tiny_shard(path: Path, names: list[str]) -> None:
    """One safetensors file of 4-byte F32 tensors, written directly (the library takes seconds
    for tens of thousands of tensors)."""
    header = {"__metadata__": {"format": "pt"}}
    header |= {name: {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]} for i, name in enumerate(names)}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + bytes(4 * len(names)))


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The raw little-endian bytes of a tensor, whatever its dtype."""
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def read_back(directory: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...], bytes]]:
    """Every tensor of a checkpoint written by this tool (index + shards), read with the
    safetensors library: name → (dtype, shape, bytes)."""
    weight_map = json.loads((directory / INDEX).read_text())["weight_map"]
    out = {}
    for file_name in sorted(set(weight_map.values())):
        with safe_open(directory / file_name, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                assert weight_map[name] == file_name, f"{name} is in {file_name}, index says {weight_map[name]}"
                tensor = f.get_tensor(name)
                out[name] = (tensor.dtype, tuple(tensor.shape), tensor_bytes(tensor))
    assert set(out) == set(weight_map), "index and shards disagree"
    return out


def expected(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[torch.dtype, tuple[int, ...], bytes]]:
    """``read_back``'s view of in-memory tensors."""
    return {name: (t.dtype, tuple(t.shape), tensor_bytes(t)) for name, t in tensors.items()}


def snapshot(directory: Path) -> dict[str, tuple[int, int, str]]:
    """Every entry below ``directory`` (hidden ones too): relative path → (inode, size, sha256).
    Equal snapshots mean nothing was added, removed, moved or changed."""
    entries = {}
    for root, dirs, files in os.walk(directory):
        for name in dirs + files:
            path = Path(root) / name
            stat = path.stat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
            entries[path.relative_to(directory).as_posix()] = (stat.st_ino, stat.st_size, digest)
    return entries


def shard_names(directory: Path) -> list[str]:
    """The ``*.safetensors`` files of a directory, sorted."""
    return sorted(p.name for p in directory.glob("*.safetensors"))
