"""The core's index reader, atomic writes and digests, as the binding exposes them to Python code."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from normalize_core import NormalizeError
from normalize_core._core import INDEX_FILE, read_index, sha256_hex, sync_dir, temp_path_for, write_atomically
from normalize_core.fp8.config import write_quantized_config


def test_read_index_keeps_file_order_and_total_size(tmp_path: Path) -> None:
    path = tmp_path / INDEX_FILE
    weight_map = {"z.weight": "b.safetensors", "a.weight": "a.safetensors"}
    path.write_text(json.dumps({"metadata": {"total_size": 12}, "weight_map": weight_map}))
    read_map, total_size = read_index(path)
    assert list(read_map.items()) == list(weight_map.items())
    assert total_size == 12
    path.write_text(json.dumps({"weight_map": weight_map}))
    assert read_index(path)[1] is None
    assert INDEX_FILE == "model.safetensors.index.json"


@pytest.mark.parametrize(
    ("weight_map", "kind"),
    [
        ('{"t": "/abs.safetensors"}', "unsafe_shard_name"),
        ('{"t": "sub/x.safetensors"}', "unsafe_shard_name"),
        ('{"t": "a", "t": "b"}', "invalid_index"),
        ('{"t": null}', "invalid_index"),
    ],
)
def test_read_index_refuses_what_no_index_may_hold(tmp_path: Path, weight_map: str, kind: str) -> None:
    path = tmp_path / INDEX_FILE
    path.write_text(f'{{"weight_map": {weight_map}}}')
    with pytest.raises(NormalizeError) as raised:
        read_index(path)
    assert (raised.value.kind, raised.value.file) == (kind, str(path))


def test_write_atomically_replaces_the_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    dest = tmp_path / "config.json"
    dest.write_text("old")
    write_atomically(dest, b"new bytes")
    assert dest.read_bytes() == b"new bytes"
    assert os.listdir(tmp_path) == ["config.json"]
    assert temp_path_for(dest) == tmp_path / f".config.json.partial-{os.getpid()}"


def test_write_atomically_into_a_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(NormalizeError) as raised:
        write_atomically(tmp_path / "missing" / "config.json", b"{}")
    assert raised.value.kind == "io" and raised.value.file == str(tmp_path / "missing" / "config.json")
    with pytest.raises(NormalizeError):
        sync_dir(tmp_path / "missing")
    sync_dir(tmp_path)


def test_the_quantized_config_is_written_atomically(tmp_path: Path) -> None:
    source = tmp_path / "source.json"
    source.write_text('{"model_type": "llama", "hidden_size": 8}')
    output = tmp_path / "out" / "config.json"
    output.parent.mkdir()
    assert write_quantized_config(source, output, {"quant_method": "fp8"})
    assert json.loads(output.read_text()) == {
        "model_type": "llama",
        "hidden_size": 8,
        "quantization_config": {"quant_method": "fp8"},
    }
    assert os.listdir(output.parent) == ["config.json"]


@pytest.mark.parametrize("size", [0, 1, 55, 56, 64, 65, 4096, 1 << 20])
def test_sha256_hex_is_the_standard_sha256(size: int) -> None:
    """Run records written before the digest moved to Rust (hashlib's) stay comparable."""
    data = os.urandom(size)
    assert sha256_hex(data) == hashlib.sha256(data).hexdigest()
