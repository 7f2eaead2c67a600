"""Placement's durability steps are the core's (``sync_dir``, which raises ``NormalizeError``): a directory fsync
that fails inside the switch still leaves the destination refusing to load and says so, and one outside it
leaves nothing behind. Placement's own names (``.NAME.partial-place-PID``, ``.config.json.previous-place-PID``)
differ from the core's temporary names on purpose: a writer clearing its output's temporary files must never
take a set-aside config.json, the only copy after a crash, for one."""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import pytest

from builders import INDEX, make_tensors, read_output_bytes, snapshot, write_checkpoint
from normalize_core import NormalizeError, PlacementError, place, repack
from normalize_core._core import remove_temporaries
from normalize_core.errors import normalize_error
from test_place import SHARD, SPEC

place_module = importlib.import_module("normalize_core.place")


@pytest.fixture
def fp8_like(tmp_path: Path) -> tuple[Path, Path]:
    """(source, staging): an engine checkpoint and its repack with a rewritten config.json, as to-fp8 leaves
    it: placing it back switches the weights and config.json together, so config.json is set aside first."""
    aux = {"config.json": '{"model_type": "llama"}', "tokenizer_config.json": "{}"}
    source = write_checkpoint(tmp_path / "engine", make_tensors(SPEC, 0), layout="engine", files=3, aux=aux)
    staging = tmp_path / "staging"
    repack(source, staging, max_shard_bytes=SHARD)
    (staging / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {}}))
    return source, staging


def failing_sync(monkeypatch: pytest.MonkeyPatch, failing_call: int) -> list[Path]:
    """Makes placement's ``failing_call``-th directory fsync fail as the core reports an I/O error; returns
    the directories synced."""
    real_sync = place_module.sync_dir
    calls: list[Path] = []

    def sync_dir(path):
        calls.append(Path(path))
        if len(calls) == failing_call:
            raise normalize_error("io", f"{path}: Input/output error (os error 5)", file=str(path))
        real_sync(path)

    monkeypatch.setattr(place_module, "sync_dir", sync_dir)
    return calls


def test_a_failed_fsync_inside_the_switch_says_config_json_is_set_aside(
    fp8_like: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    source, staging = fp8_like
    calls = failing_sync(monkeypatch, failing_call=2)
    with pytest.raises(PlacementError) as failed:
        place(staging, source, overwrite=True)
    set_aside = f".config.json.previous-place-{os.getpid()}"
    assert failed.value.kind == "io" and failed.value.file == str(calls[1])
    assert str(failed.value) == (
        f"{calls[1]}: Input/output error (os error 5); the placement stopped half-way with config.json set aside "
        f"as {set_aside}, so nothing loads {source}: place again to finish"
    )
    assert not (source / "config.json").exists() and (source / set_aside).exists()
    monkeypatch.undo()
    result = place(staging, source, overwrite=True)
    assert json.loads((source / "config.json").read_text()) == json.loads((staging / "config.json").read_text())
    assert read_output_bytes(source) == read_output_bytes(staging)
    # The set-aside copy stays while the process that made it runs (this one); a later placement removes it.
    assert (source / set_aside).exists() and result.leftovers_removed == []


def test_a_failed_fsync_with_nothing_set_aside_is_the_cores_error_and_leaves_no_index(
    fp8_like: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Into a new directory there is no config.json to set aside: the core's error comes through as it is,
    with no index (nothing names the shards already renamed there) and no temporary copy left."""
    _, staging = fp8_like
    destination = tmp_path / "dest"
    failing_sync(monkeypatch, failing_call=1)
    with pytest.raises(NormalizeError) as failed:
        place(staging, destination)
    assert failed.value.kind == "io" and "Input/output error" in str(failed.value)
    assert not (destination / INDEX).exists()
    assert not [p for p in destination.rglob(".*") if "-place-" in p.name]


def test_a_writer_clearing_its_output_keeps_a_set_aside_config_json(tmp_path: Path) -> None:
    """What the names are for: an ``--overwrite`` or ``--resume`` output's cleanup (``remove_temporaries``, see
    ``output.py``) removes temporary files (a dead placement's copy among them) but never the config.json a
    killed placement set aside."""
    directory = tmp_path / "checkpoint"
    directory.mkdir()
    (directory / ".config.json.previous-place-999999999").write_text("{}")
    (directory / ".model-00001-of-00001.safetensors.partial-place-999999999").write_bytes(b"half")
    (directory / ".tokenizer.json.partial-999999999").write_bytes(b"half")
    before = snapshot(directory)
    remove_temporaries(directory)
    assert sorted(p.name for p in directory.iterdir()) == [".config.json.previous-place-999999999"]
    assert (
        snapshot(directory)[".config.json.previous-place-999999999"] == before[".config.json.previous-place-999999999"]
    )
