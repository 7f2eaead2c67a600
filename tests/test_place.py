"""Placement of a written output: each option, overwrite listing and refusal, stale shards,
terminal and non-terminal behaviour, and never a change to the staging directory."""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path

import pexpect
import pytest
import torch
from typer.testing import CliRunner

from builders import INDEX, engine_shard_name, make_tensors, read_output_bytes, shard_names, snapshot, write_checkpoint
from normalize_core import PlacementError, place, plan_placement, repack
from normalize_core.cli import app
from normalize_core.sizes import MIB

place_module = importlib.import_module("normalize_core.place")
prompts_module = importlib.import_module("normalize_core.cli.placement")

SPEC = {f"layers.{i}.weight": (torch.bfloat16, (64, 64)) for i in range(6)}
#: Shard limit giving two shards of three 8 KiB tensors each.
SHARD = 3 * 64 * 64 * 2 + 4096
ENGINE_SHARDS = [engine_shard_name(i) for i in range(3)]


@pytest.fixture
def engine_checkpoint(tmp_path: Path) -> Path:
    """Three engine-named shards, no index, plus config files (smaller and faster to write than
    the built-in sample)."""
    aux = {"config.json": '{"model_type": "llama"}', "tokenizer_config.json": "{}"}
    return write_checkpoint(tmp_path / "engine", make_tensors(SPEC, 0), layout="engine", files=3, aux=aux)


@pytest.fixture
def staged(engine_checkpoint: Path, tmp_path: Path) -> tuple[Path, Path]:
    """(source, staging): an engine checkpoint and its repack into two shards."""
    staging = tmp_path / "staging"
    repack(engine_checkpoint, staging, max_shard_bytes=SHARD)
    return engine_checkpoint, staging


@pytest.fixture
def fake_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """Prompts are answered from CliRunner's input as if stdin were a terminal."""
    monkeypatch.setattr(prompts_module, "terminal_attached", lambda: True)


def test_place_into_a_new_directory(staged: tuple[Path, Path], tmp_path: Path) -> None:
    _, staging = staged
    before = snapshot(staging)
    dest = tmp_path / "final" / "model"
    result = place(staging, dest)
    assert read_output_bytes(dest) == read_output_bytes(staging)
    assert sorted(os.listdir(dest)) == sorted(os.listdir(staging))
    assert result.replaced == [] and result.stale_left == [] and not result.kept
    assert result.copied[-1] == INDEX, "the index is written last"
    assert snapshot(staging) == before


def test_place_into_source_leaves_stale_shards_by_default(staged: tuple[Path, Path]) -> None:
    source, staging = staged
    before = snapshot(staging)
    result = place(staging, source)
    assert result.replaced == [], "engine names and configs do not collide with the repacked output"
    assert result.stale_left == ENGINE_SHARDS
    assert all((source / name).exists() for name in ENGINE_SHARDS)
    assert read_output_bytes(source) == read_output_bytes(staging)
    assert snapshot(staging) == before


def test_place_into_source_removes_stale_shards_when_asked(staged: tuple[Path, Path]) -> None:
    source, staging = staged
    result = place(staging, source, remove_stale=True)
    assert result.stale_removed == ENGINE_SHARDS and result.stale_left == []
    assert shard_names(source) == shard_names(staging)
    assert read_output_bytes(source) == read_output_bytes(staging)


def test_overwrite_is_listed_and_refused_without_confirmation(tmp_path: Path) -> None:
    source = write_checkpoint(tmp_path / "src", make_tensors(SPEC, 1), files=2, aux={"config.json": "{}"})
    staging = tmp_path / "staging"
    repack(source, staging, max_shard_bytes=SHARD)  # same names, other contents
    plan = plan_placement(staging, source)
    assert plan.replaced == sorted([INDEX, "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"])
    assert plan.stale == []
    before_source, before_staging = snapshot(source), snapshot(staging)
    with pytest.raises(PlacementError) as refused:
        place(staging, source)
    assert refused.value.kind == "placement_needs_confirmation"
    assert snapshot(source) == before_source
    result = place(staging, source, overwrite=True)
    assert result.replaced == plan.replaced
    index = json.loads((source / INDEX).read_text())
    assert set(index["weight_map"].values()) == {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}
    assert read_output_bytes(source) == read_output_bytes(staging)
    assert snapshot(staging) == before_staging


def test_changed_non_tensor_files_travel_with_the_weights(staged: tuple[Path, Path]) -> None:
    """to-fp8 rewrites config.json; placing its weights without it would mislabel them."""
    source, staging = staged
    config = json.loads((staging / "config.json").read_text()) | {"quantization_config": {"quant_method": "fp8"}}
    (staging / "config.json").write_text(json.dumps(config))
    plan = plan_placement(staging, source)
    assert plan.aux_files == {"config.json": "differs"}
    assert plan.replaced == ["config.json"]
    place(staging, source, overwrite=True)
    assert json.loads((source / "config.json").read_text())["quantization_config"] == {"quant_method": "fp8"}


def test_failed_copy_leaves_destination_untouched(
    staged: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source, staging = staged
    before_source, before_staging = snapshot(source), snapshot(staging)
    real_copy = place_module.copy_file
    calls = []

    def failing_copy(src, dst, progress=None):
        calls.append(dst)
        if len(calls) % 2 == 0:  # the second copy of each placement
            raise OSError(28, "No space left on device")
        real_copy(src, dst, progress)

    monkeypatch.setattr(place_module, "copy_file", failing_copy)
    with pytest.raises(PlacementError) as failed:
        place(staging, source, remove_stale=True)
    assert failed.value.kind == "io" and "No space left on device" in str(failed.value)
    assert snapshot(source) == before_source, "no temporary copies, no index, no removed shards"
    assert snapshot(staging) == before_staging
    with pytest.raises(PlacementError):
        place(staging, tmp_path / "new" / "dest")
    assert not (tmp_path / "new" / "dest").exists(), "a destination created for a failed placement is removed"


@pytest.mark.parametrize("where", ["same", "inside"])
def test_refuses_the_staging_directory_itself(staged: tuple[Path, Path], where: str) -> None:
    _, staging = staged
    before = snapshot(staging)
    with pytest.raises(PlacementError):
        place(staging, staging if where == "same" else staging / "final")
    assert snapshot(staging) == before


def test_refuses_a_staging_without_index(engine_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(PlacementError) as refused:
        place(engine_checkpoint, tmp_path / "dest")
    assert refused.value.kind == "placement_without_index"
    assert not (tmp_path / "dest").exists()


# --- `normalize place` -----------------------------------------------------------------------


def test_place_command_off_terminal_needs_yes_to_overwrite(staged: tuple[Path, Path], tmp_path: Path) -> None:
    _, staging = staged
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "model-00001-of-00002.safetensors").write_bytes(b"old")
    before = snapshot(dest)
    refused = CliRunner().invoke(app, ["place", str(staging), str(dest)])
    assert refused.exit_code == 2
    assert "model-00001-of-00002.safetensors" in refused.stdout, "the files to replace are listed"
    assert "would replace 1 file " in refused.stderr and "--yes" in refused.stderr
    assert snapshot(dest) == before
    accepted = CliRunner().invoke(app, ["place", str(staging), str(dest), "--yes"])
    assert accepted.exit_code == 0, accepted.output
    assert read_output_bytes(dest) == read_output_bytes(staging)
    assert f"to {dest}" in accepted.stdout


@pytest.mark.parametrize(("flag", "left"), [([], True), (["--keep-stale"], True), (["--remove-stale"], False)])
def test_place_command_stale_shards(staged: tuple[Path, Path], flag: list[str], left: bool) -> None:
    source, staging = staged
    result = CliRunner().invoke(app, ["place", str(staging), str(source), *flag])
    assert result.exit_code == 0, result.output
    assert "not referenced by the new index" in result.stdout
    assert all((source / name).exists() == left for name in ENGINE_SHARDS)


def test_place_command_warns_about_a_left_model_safetensors(tmp_path: Path) -> None:
    source = write_checkpoint(tmp_path / "src", make_tensors(SPEC, 1), layout="single")
    staging = tmp_path / "staging"
    repack(source, staging, max_shard_bytes=MIB)
    result = CliRunner().invoke(app, ["place", str(staging), str(source)])
    assert result.exit_code == 0, result.output
    assert "transformers loads model.safetensors in preference" in result.stdout


# --- placement after `normalize repack` ------------------------------------------------------


def repack_args(source: Path, output: Path, *extra: str) -> list[str]:
    return ["repack", "--source", str(source), "--output", str(output), "--max-shard-size", str(SHARD), *extra]


def test_repack_off_terminal_keeps_the_output(engine_checkpoint: Path, tmp_path: Path) -> None:
    before = snapshot(engine_checkpoint)
    result = CliRunner().invoke(app, repack_args(engine_checkpoint, tmp_path / "out"))
    assert result.exit_code == 0, result.output
    assert "The output stays at" in result.stdout
    assert snapshot(engine_checkpoint) == before


def test_repack_place_source(engine_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(app, repack_args(engine_checkpoint, out, "--place", "source"))
    assert result.exit_code == 0, result.output
    assert read_output_bytes(engine_checkpoint) == read_output_bytes(out)
    assert all((engine_checkpoint / name).exists() for name in ENGINE_SHARDS), "stale shards stay by default"
    assert (out / INDEX).exists(), "the staging output stays intact"


def test_repack_place_directory(engine_checkpoint: Path, tmp_path: Path) -> None:
    out, final = tmp_path / "out", tmp_path / "final"
    result = CliRunner().invoke(app, repack_args(engine_checkpoint, out, "--place", str(final)))
    assert result.exit_code == 0, result.output
    assert read_output_bytes(final) == read_output_bytes(out)


def test_repack_rejects_a_place_inside_the_output_before_writing(engine_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(app, repack_args(engine_checkpoint, out, "--place", str(out / "final")))
    assert result.exit_code == 2
    assert "inside the output directory" in result.stderr
    assert not out.exists()


def test_repack_place_refuses_unconfirmed_overwrite(tmp_path: Path) -> None:
    source = write_checkpoint(tmp_path / "src", make_tensors(SPEC, 1), files=3)
    before = snapshot(source)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, repack_args(source, out, "--place", "source"))
    assert result.exit_code == 2
    assert "rerun with --yes" in result.stderr and f"normalize place {out}" in result.stderr
    assert snapshot(source) == before
    assert (out / INDEX).exists()
    accepted = CliRunner().invoke(app, ["place", str(out), str(source), "--yes", "--remove-stale"])
    assert accepted.exit_code == 0, accepted.output
    assert read_output_bytes(source) == read_output_bytes(out)


def test_repack_prompt_choose_source_and_remove_stale(
    engine_checkpoint: Path, tmp_path: Path, fake_terminal: None
) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(app, repack_args(engine_checkpoint, out), input="2\ny\n")
    assert result.exit_code == 0, result.output
    assert "copy them into the source directory" in result.stdout
    assert shard_names(engine_checkpoint) == shard_names(out)
    assert f"to {engine_checkpoint}" in result.stdout


def test_repack_prompt_choose_other_directory(engine_checkpoint: Path, tmp_path: Path, fake_terminal: None) -> None:
    out, final = tmp_path / "out", tmp_path / "typed"
    result = CliRunner().invoke(app, repack_args(engine_checkpoint, out), input=f"3\n{final}\n")
    assert result.exit_code == 0, result.output
    assert read_output_bytes(final) == read_output_bytes(out)


def test_repack_prompt_keep(engine_checkpoint: Path, tmp_path: Path, fake_terminal: None) -> None:
    before = snapshot(engine_checkpoint)
    result = CliRunner().invoke(app, repack_args(engine_checkpoint, tmp_path / "out"), input="\n")
    assert result.exit_code == 0, result.output
    assert "The output stays at" in result.stdout
    assert snapshot(engine_checkpoint) == before


def test_repack_prompt_declined_overwrite_keeps_everything(tmp_path: Path, fake_terminal: None) -> None:
    source = write_checkpoint(tmp_path / "src", make_tensors(SPEC, 1), files=3)
    before = snapshot(source)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, repack_args(source, out), input="2\n\n")
    assert result.exit_code == 0, result.output
    assert "would replace" in result.stdout and "Nothing copied" in result.stdout
    assert snapshot(source) == before


# --- a real pseudo-terminal ------------------------------------------------------------------


def spawn(*args: str) -> pexpect.spawn:
    command = [sys.executable, "-c", "from normalize_core.cli import main; main()", *args]
    return pexpect.spawn(command[0], command[1:], encoding="utf-8", timeout=60, dimensions=(40, 200))


def test_pty_place_asks_before_replacing_and_about_stale_shards(tmp_path: Path) -> None:
    source = write_checkpoint(tmp_path / "src", make_tensors(SPEC, 1), files=3)
    staging = tmp_path / "staging"
    repack(source, staging, max_shard_bytes=MIB)
    before = snapshot(staging)
    child = spawn("place", str(staging), str(source))
    child.expect("would replace 1 file:")
    child.expect(r"Replace them\? \[y/N\]")
    child.sendline("y")
    child.expect(r"Remove them\? \(default: leave them\) \[y/N\]")
    child.sendline("")
    child.expect("Left unreferenced shards in place")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert read_output_bytes(source) == read_output_bytes(staging)
    old = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert shard_names(source) == sorted([*old, "model-00001-of-00001.safetensors"]), "stale shards left"
    assert snapshot(staging) == before


def test_pty_repack_offers_the_three_options(engine_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    child = spawn(*repack_args(engine_checkpoint, out))
    child.expect("Where should the new weights")
    child.expect(r"Choice \[1\]")
    child.sendline("3")
    child.expect("Directory")
    child.sendline(str(tmp_path / "typed"))
    child.expect("The staging directory is unchanged")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert read_output_bytes(tmp_path / "typed") == read_output_bytes(out)


# --- placement after the conversions ----------------------------------------------------------


def test_both_conversions_place_their_output_like_repack(tmp_path: Path) -> None:
    """to-fp8 and to-bf16 take the same --place as repack and merge: the written weights are
    copied to the named directory and the staging output stays intact."""
    from normalize_core.sample import write_sample_checkpoint

    source = write_sample_checkpoint(tmp_path / "engine")
    fp8, fp8_final = tmp_path / "fp8", tmp_path / "fp8-final"
    bf16, bf16_final = tmp_path / "bf16", tmp_path / "bf16-final"
    runs = [
        ["to-fp8", "-s", str(source), "-o", str(fp8), "--device", "cpu", "-q", "--place", str(fp8_final)],
        ["to-bf16", "-s", str(fp8), "-o", str(bf16), "--device", "cpu", "-q", "--place", str(bf16_final)],
    ]
    for args, staging, final in zip(runs, (fp8, bf16), (fp8_final, bf16_final), strict=True):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        assert f"to {final}" in result.stdout
        assert read_output_bytes(final) == read_output_bytes(staging)
        assert json.loads((final / "config.json").read_text()) == json.loads((staging / "config.json").read_text())
    assert "quantization_config" not in json.loads((bf16_final / "config.json").read_text())
