"""``repack`` keeps every dtype the safetensors format defines byte for byte, 0-d and empty tensors included,
keeps every offset aligned to its element size, and reads engine shards in natural order (``rank2``
before ``rank10``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from builders import INDEX, expected_bytes, random_tensor, save_engine_checkpoint
from normalize_core import repack, verify_checkpoint
from normalize_core.sample import write_safetensors
from repack_util import TORCH_DTYPES, assert_standard_output, read_raw_header


def dtype_zoo() -> dict[str, torch.Tensor]:
    """For every dtype a 2-D tensor with an odd element count, a 0-d tensor and an empty tensor,
    named so that neither name order nor source order matches element-size order."""
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for dtype in TORCH_DTYPES:
        name = str(dtype).removeprefix("torch.")
        tensors[f"{name}.matrix"] = random_tensor(dtype, (3, 5), generator)
        # A 0-d float4_e2m1fn_x2 would be half a byte in safetensors' unpacked shape: not storable.
        scalar_shape = (1,) if dtype == torch.float4_e2m1fn_x2 else ()
        tensors[f"{name}.scalar"] = random_tensor(dtype, scalar_shape, generator)
        tensors[f"{name}.empty"] = random_tensor(dtype, (0, 4), generator)
    return tensors


@pytest.mark.parametrize("limit", [1 << 20, 64, 1])
def test_every_torch_dtype_round_trips(tmp_path: Path, limit: int):
    tensors = dtype_zoo()
    names = list(tensors)
    files = {f"rank{r}.safetensors": {n: tensors[n] for n in names[r::3]} for r in range(3)}
    source = save_engine_checkpoint(tmp_path / "engine", files)
    repack(source, tmp_path / "out", max_shard_bytes=limit)
    index = assert_standard_output(tmp_path / "out", expected_bytes(tensors), limit)
    for name, tensor in tensors.items():
        with safe_open(tmp_path / "out" / index["weight_map"][name], "pt") as f:
            read = f.get_tensor(name)
        assert read.dtype == tensor.dtype, name
        assert read.shape == tensor.shape, name


def test_one_shard_puts_larger_elements_first(tmp_path: Path):
    """All dtypes in one shard: offsets non-decreasing in element size order reversed, each aligned."""
    tensors = dtype_zoo()
    source = save_engine_checkpoint(tmp_path / "engine", {"model.safetensors": tensors})
    repack(source, tmp_path / "out", max_shard_bytes=1 << 20)
    length, header = read_raw_header(tmp_path / "out" / "model-00001-of-00001.safetensors")
    header.pop("__metadata__")
    by_offset = sorted(header.items(), key=lambda item: item[1]["data_offsets"])
    sizes = [torch.empty(0, dtype=tensors[name].dtype).element_size() for name, _ in by_offset]
    assert sizes == sorted(sizes, reverse=True)


def raw_tensor_bytes(path: Path, name: str) -> bytes:
    """A tensor's bytes located through a header parsed with the standard library."""
    length, header = read_raw_header(path)
    begin, end = header[name]["data_offsets"]
    with open(path, "rb") as f:
        f.seek(8 + length + begin)
        return f.read(end - begin)


def test_formats_torch_cannot_make_round_trip(tmp_path: Path):
    """F6_E2M3 and F6_E3M2 (written by hand: 4 elements in 3 bytes) beside F4 and F8_E8M0."""
    entries = [
        ("f6_e2m3", "F6_E2M3", [2, 4], bytes(range(6))),
        ("f6_e3m2", "F6_E3M2", [4], b"\xfa\xfb\xfc"),
        ("f6_empty", "F6_E2M3", [0], b""),
        ("f4", "F4", [6], b"\x12\x34\x56"),
        ("e8m0", "F8_E8M0", [], b"\x7f"),
    ]
    source = tmp_path / "single"
    source.mkdir()
    write_safetensors(source / "model.safetensors", entries)
    repack(source, tmp_path / "out", max_shard_bytes=1)
    weight_map = json.loads((tmp_path / "out" / INDEX).read_text())["weight_map"]
    assert sorted(weight_map) == sorted(name for name, *_ in entries)
    for name, dtype, shape, data in entries:
        shard = tmp_path / "out" / weight_map[name]
        with safe_open(shard, "pt") as f:
            assert f.get_slice(name).get_dtype() == dtype
            assert f.get_slice(name).get_shape() == shape
        assert raw_tensor_bytes(shard, name) == data, name


def test_engine_shards_are_read_in_natural_order(tmp_path: Path):
    """``rank2`` comes before ``rank10`` (plain string order would put it after)."""
    ranks = [10, 2, 1, 11, 3]
    files = {
        f"model-language-fused-save_rank{r}.safetensors": {f"layer.{r}.weight": torch.full((4,), r, dtype=torch.int32)}
        for r in ranks
    }
    source = save_engine_checkpoint(tmp_path / "engine", files)
    tensors = {name: t for part in files.values() for name, t in part.items()}

    repack(source, tmp_path / "one", max_shard_bytes=1 << 20)
    _, header = read_raw_header(tmp_path / "one" / "model-00001-of-00001.safetensors")
    header.pop("__metadata__")
    in_data_order = sorted(header, key=lambda name: header[name]["data_offsets"])
    assert in_data_order == [f"layer.{r}.weight" for r in sorted(ranks)]

    repack(source, tmp_path / "many", max_shard_bytes=1)
    weight_map = json.loads((tmp_path / "many" / INDEX).read_text())["weight_map"]
    shard_numbers = [int(weight_map[f"layer.{r}.weight"][6:11]) for r in sorted(ranks)]
    assert shard_numbers == [1, 2, 3, 4, 5]
    assert_standard_output(tmp_path / "many", expected_bytes(tensors), 1)


def test_misaligned_source_offsets_come_out_aligned(tmp_path: Path):
    """A hand-written source whose F64/F32/BF16 tensors sit at odd offsets (valid safetensors, but
    loaders must copy them) is repacked with every tensor at a multiple of its element size."""
    entries = [
        ("bytes", "U8", [3], b"\x01\x02\x03"),
        ("word", "F32", [1], b"\x00\x00\x80\x3f"),
        ("half", "BF16", [1], b"\x80\x3f"),
        ("double", "F64", [2], bytes(range(16))),
        ("flag", "BOOL", [], b"\x01"),
    ]
    source = tmp_path / "single"
    source.mkdir()
    write_safetensors(source / "model.safetensors", entries)
    assert any("not aligned" in message for _, message in verify_checkpoint(source).findings)

    repack(source, tmp_path / "out", max_shard_bytes=1 << 20)

    expected = {name: (dtype, shape, data) for name, dtype, shape, data in entries}
    assert_standard_output(tmp_path / "out", expected, 1 << 20)
    _, header = read_raw_header(tmp_path / "out" / "model-00001-of-00001.safetensors")
    header.pop("__metadata__")
    assert sorted(header, key=lambda name: header[name]["data_offsets"]) == ["double", "word", "half", "bytes", "flag"]
