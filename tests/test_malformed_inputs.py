"""Corrupt, hostile and inconsistent inputs: each gives a
``NormalizeError`` whose ``kind``, ``file`` and ``tensor`` say what and where, leaves no output behind
and does not touch the source; the CLI prints one line and exits 2. Also the refused output
directories: the source itself, inside the source, containing the source, non-empty."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from builders import INDEX, snapshot
from normalize_core import NormalizeError, repack
from normalize_core.cli import app


def entry(dtype: str, shape: list[int], begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def write_raw(path: Path, header: dict | str, data: bytes = b"", header_len: int | None = None) -> Path:
    """A safetensors-like file from a header (dict, or JSON text written as is), data bytes and,
    optionally, a lying length prefix."""
    text = header if isinstance(header, str) else json.dumps(header)
    encoded = text.encode()
    encoded += b" " * (-len(encoded) % 8)
    prefix = len(encoded) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", prefix) + encoded + data)
    return path


def valid_header(*names: str) -> dict:
    """Two-byte U8 tensors, contiguous, in the given order."""
    header: dict = {"__metadata__": {"format": "pt"}}
    for i, name in enumerate(names):
        header[name] = entry("U8", [2], 2 * i, 2 * i + 2)
    return header


def write_valid(path: Path, *names: str) -> Path:
    return write_raw(path, valid_header(*names), bytes(range(2 * len(names))))


def write_index(directory: Path, weight_map: dict[str, str] | str) -> None:
    text = weight_map if isinstance(weight_map, str) else json.dumps({"metadata": {}, "weight_map": weight_map})
    (directory / INDEX).write_text(text)


@dataclass
class Malformed:
    """A broken source directory, and what the error must say about it."""

    build: Callable[[Path], None]
    kind: str
    file: str  # path of the named file relative to the source directory
    tensor: str | None


def truncated(src: Path) -> None:
    path = write_valid(src / "rank0.safetensors", "a", "b")
    os.truncate(path, path.stat().st_size - 1)


def header_too_large(src: Path) -> None:
    write_raw(src / "rank0.safetensors", valid_header("a"), b"\0\0", header_len=100_000_001)


def header_past_eof(src: Path) -> None:
    write_raw(src / "rank0.safetensors", valid_header("a"), b"\0\0", header_len=4096)


def duplicate_key(src: Path) -> None:
    text = '{"a":' + json.dumps(entry("U8", [1], 0, 1)) + ',"a":' + json.dumps(entry("U8", [1], 1, 2)) + "}"
    write_raw(src / "rank0.safetensors", text, b"\0\0")


def in_two_engine_shards(src: Path) -> None:
    write_valid(src / "rank0.safetensors", "a", "shared")
    write_valid(src / "rank1.safetensors", "shared", "b")


def indexed(shards: dict[str, tuple[str, ...]], weight_map: dict[str, str] | str) -> Callable[[Path], None]:
    """An indexed checkpoint with valid shards holding the named tensors, and the given index."""

    def build(src: Path) -> None:
        for shard, names in shards.items():
            write_valid(src / shard, *names)
        write_index(src, weight_map)

    return build


def absolute_shard(src: Path) -> None:
    outside = write_valid(src.parent / "outside.safetensors", "a")
    write_index(src, {"a": str(outside)})


S1, S2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"

MALFORMED: dict[str, Malformed] = {
    "truncated file": Malformed(truncated, "offsets_out_of_range", "rank0.safetensors", "b"),
    "shorter than the length prefix": Malformed(
        lambda src: (src / "rank0.safetensors").write_bytes(b"\x10\0\0"), "file_too_short", "rank0.safetensors", None
    ),
    "header length past EOF": Malformed(header_past_eof, "header_past_eof", "rank0.safetensors", None),
    "header over 100 MB": Malformed(header_too_large, "header_too_large", "rank0.safetensors", None),
    "invalid JSON": Malformed(
        lambda src: write_raw(src / "rank0.safetensors", '{"a": {"dtype": '),
        "header_not_json",
        "rank0.safetensors",
        None,
    ),
    "header not an object": Malformed(
        lambda src: write_raw(src / "rank0.safetensors", "[1, 2]"), "header_not_json", "rank0.safetensors", None
    ),
    "metadata value not a string": Malformed(
        lambda src: write_raw(src / "rank0.safetensors", {"__metadata__": {"format": 1}}),
        "header_not_json",
        "rank0.safetensors",
        None,
    ),
    "overlapping offsets": Malformed(
        lambda src: write_raw(
            src / "rank0.safetensors", {"a": entry("U8", [4], 0, 4), "b": entry("U8", [4], 2, 6)}, bytes(6)
        ),
        "overlapping_tensors",
        "rank0.safetensors",
        "b",
    ),
    "gap between tensors": Malformed(
        lambda src: write_raw(
            src / "rank0.safetensors", {"a": entry("U8", [2], 0, 2), "b": entry("U8", [2], 4, 6)}, bytes(6)
        ),
        "gap_before_tensor",
        "rank0.safetensors",
        "b",
    ),
    "offsets near 2**64": Malformed(
        lambda src: write_raw(
            src / "rank0.safetensors",
            {"a": entry("U8", [2], 0, 2), "b": entry("U8", [2], 2**64 - 3, 2**64 - 1)},
            bytes(4),
        ),
        "offsets_out_of_range",
        "rank0.safetensors",
        "b",
    ),
    "shape and offsets claiming a terabyte": Malformed(
        lambda src: write_raw(src / "rank0.safetensors", {"w": entry("U8", [1 << 40], 0, 1 << 40)}, bytes(4)),
        "offsets_out_of_range",
        "rank0.safetensors",
        "w",
    ),
    "offsets out of range": Malformed(
        lambda src: write_raw(
            src / "rank0.safetensors", {"a": entry("U8", [2], 0, 2), "b": entry("U8", [2], 6, 8)}, bytes(4)
        ),
        "offsets_out_of_range",
        "rank0.safetensors",
        "b",
    ),
    "bytes after the last tensor": Malformed(
        lambda src: write_raw(src / "rank0.safetensors", valid_header("a"), bytes(3)),
        "trailing_bytes",
        "rank0.safetensors",
        None,
    ),
    "size differs from shape × dtype": Malformed(
        lambda src: write_raw(src / "rank0.safetensors", {"w": entry("F32", [2, 2], 0, 8)}, bytes(8)),
        "size_mismatch",
        "rank0.safetensors",
        "w",
    ),
    "unknown dtype": Malformed(
        lambda src: write_raw(src / "rank0.safetensors", {"w": entry("F128", [1], 0, 16)}, bytes(16)),
        "unknown_dtype",
        "rank0.safetensors",
        "w",
    ),
    "negative dimension": Malformed(
        lambda src: write_raw(src / "rank0.safetensors", {"w": entry("U8", [-1], 0, 1)}, bytes(1)),
        "invalid_tensor_entry",
        "rank0.safetensors",
        "w",
    ),
    "overflowing shape": Malformed(
        lambda src: write_raw(src / "rank0.safetensors", {"w": entry("U8", [2**63, 4], 0, 1)}, bytes(1)),
        "invalid_tensor_entry",
        "rank0.safetensors",
        "w",
    ),
    "offsets begin after they end": Malformed(
        lambda src: write_raw(src / "rank0.safetensors", {"w": entry("U8", [0], 2, 1)}, bytes(2)),
        "invalid_tensor_entry",
        "rank0.safetensors",
        "w",
    ),
    "tensor twice in one header": Malformed(duplicate_key, "duplicate_in_header", "rank0.safetensors", "a"),
    "tensor in two engine shards": Malformed(in_two_engine_shards, "duplicate_tensor", "rank1.safetensors", "shared"),
    "weight_map with ..": Malformed(
        indexed({S1: ("a",)}, {"a": "../model-00001-of-00002.safetensors"}), "unsafe_shard_name", INDEX, "a"
    ),
    "weight_map with a path separator": Malformed(
        indexed({S1: ("a",)}, {"a": f"sub/{S1}"}), "unsafe_shard_name", INDEX, "a"
    ),
    "weight_map with an absolute path": Malformed(absolute_shard, "unsafe_shard_name", INDEX, "a"),
    "missing shard": Malformed(indexed({S1: ("a",)}, {"a": S1, "b": S2}), "missing_shard", INDEX, "b"),
    "tensor in two indexed shards": Malformed(
        indexed({S1: ("a", "b"), S2: ("b", "c")}, {"a": S1, "b": S1, "c": S2}), "duplicate_tensor", S2, "b"
    ),
    "index entry absent from its shard": Malformed(
        indexed({S1: ("a",), S2: ("c",)}, {"a": S1, "b": S1, "c": S2}), "missing_from_shard", S1, "b"
    ),
    "index names the wrong shard": Malformed(
        indexed({S1: ("a",), S2: ("c",)}, {"a": S2, "c": S2}), "missing_from_shard", S2, "a"
    ),
    "tensor in a shard but not in the index": Malformed(
        indexed({S1: ("a", "stray"), S2: ("c",)}, {"a": S1, "c": S2}), "not_in_index", S1, "stray"
    ),
    "index not JSON": Malformed(indexed({S1: ("a",)}, "{not json"), "invalid_index", INDEX, None),
    "index lists a tensor twice": Malformed(
        indexed({S1: ("a",)}, f'{{"weight_map": {{"a": "{S1}", "a": "{S1}"}}}}'), "invalid_index", INDEX, None
    ),
    "no safetensors at all": Malformed(lambda src: (src / "config.json").write_text("{}"), "no_safetensors", "", None),
    "no tensors in any shard": Malformed(
        lambda src: write_raw(src / "rank0.safetensors", {"__metadata__": {"format": "pt"}}),
        "empty_checkpoint",
        "",
        None,
    ),
}


@pytest.fixture(params=list(MALFORMED), ids=list(MALFORMED))
def malformed(request, tmp_path: Path) -> tuple[Path, Malformed]:
    case = MALFORMED[request.param]
    source = tmp_path / "source"
    source.mkdir()
    case.build(source)
    return source, case


def test_there_are_at_least_fifteen_distinct_kinds_of_damage():
    assert len(MALFORMED) >= 15
    assert len({case.kind for case in MALFORMED.values()}) >= 15


def test_malformed_input_raises_naming_file_and_tensor_and_writes_nothing(malformed, tmp_path: Path):
    source, case = malformed
    before = snapshot(source)
    output = tmp_path / "out"

    with pytest.raises(NormalizeError) as raised:
        repack(source, output, max_shard_bytes=1)

    error = raised.value
    expected_file = source / case.file if case.file else source
    assert error.kind == case.kind, str(error)
    assert error.file is not None and Path(error.file) == expected_file
    assert error.tensor == case.tensor
    message = str(error)
    assert str(expected_file) in message
    if case.tensor is not None:
        assert f"'{case.tensor}'" in message
    assert "\n" not in message
    assert not output.exists()
    assert snapshot(source) == before


def test_cli_prints_one_line_and_exits_2(malformed, tmp_path: Path):
    source, case = malformed
    output = tmp_path / "out"
    result = CliRunner().invoke(app, ["repack", "--source", str(source), "--output", str(output), "--quiet"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert str(source / case.file if case.file else source) in lines[0]
    if case.tensor is not None:
        assert f"'{case.tensor}'" in lines[0]
    assert "Traceback" not in result.output
    assert result.stdout == ""
    assert not output.exists()


class TestRefusedOutputs:
    """The output may not be the source, lie inside it, contain it, or hold files already."""

    @pytest.fixture
    def source(self, tmp_path: Path) -> Path:
        source = tmp_path / "models" / "source"
        source.mkdir(parents=True)
        write_valid(source / "model.safetensors", "a", "b")
        (source / "config.json").write_text("{}")
        return source

    def refused(self, source: Path, output: Path, kind: str, **options) -> NormalizeError:
        before = snapshot(source.parent.parent)
        with pytest.raises(NormalizeError) as raised:
            repack(source, output, **options)
        assert raised.value.kind == kind
        assert raised.value.file == str(output)
        assert str(output) in str(raised.value)
        assert snapshot(source.parent.parent) == before
        return raised.value

    def test_output_is_the_source(self, source: Path):
        self.refused(source, source, "output_is_source")
        self.refused(source, source / ".", "output_is_source", overwrite=True)

    def test_output_is_the_source_through_a_symlink(self, source: Path, tmp_path: Path):
        link = tmp_path / "link"
        link.symlink_to(source)
        self.refused(source, link, "output_is_source", overwrite=True)

    def test_output_inside_the_source(self, source: Path):
        self.refused(source, source / "normalized", "output_inside_source")
        assert not (source / "normalized").exists()
        self.refused(source, source / "a" / "b", "output_inside_source")
        assert not (source / "a").exists()

    def test_source_inside_the_output(self, source: Path):
        self.refused(source, source.parent, "source_inside_output", overwrite=True)
        self.refused(source, source.parent.parent, "source_inside_output", overwrite=True)

    def test_non_empty_output_without_overwrite(self, source: Path, tmp_path: Path):
        output = tmp_path / "out"
        output.mkdir()
        (output / "model-00001-of-00001.safetensors").write_bytes(b"old")
        self.refused(source, output, "output_not_empty")
        assert (output / "model-00001-of-00001.safetensors").read_bytes() == b"old"

    def test_output_that_is_a_file(self, source: Path, tmp_path: Path):
        output = tmp_path / "out"
        output.write_text("x")
        with pytest.raises(NormalizeError) as raised:
            repack(source, output)
        assert raised.value.kind == "not_a_directory"
        assert output.read_text() == "x"

    @pytest.mark.parametrize("where", ["same", "inside", "containing"])
    def test_cli_refuses_with_one_line(self, source: Path, where: str):
        output = {"same": source, "inside": source / "out", "containing": source.parent}[where]
        result = CliRunner().invoke(app, ["repack", "-s", str(source), "-o", str(output), "--overwrite", "-q"])
        assert result.exit_code == 2
        assert len(result.stderr.splitlines()) == 1
        assert result.stderr.startswith("error: ")
        assert "Traceback" not in result.output
        assert not (source / "out").exists()
