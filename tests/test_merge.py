"""``normalize merge`` / ``normalize_core.merge``: base ∪ (extra − base), read back with safetensors."""

from __future__ import annotations

import filecmp
import importlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from builders import (
    INDEX,
    expected_bytes,
    make_tensors,
    read_output_bytes,
    shard_names,
    snapshot,
    write_checkpoint,
    write_tiny_shard,
)
from normalize_core import Checkpoint, NormalizeError, merge, plan_merge, verify_checkpoint
from normalize_core.cli import app
from normalize_core.merge import write_merge

BASE_SPEC = {f"model.layers.{i}.mlp.weight": (torch.bfloat16, (32, 16)) for i in range(6)} | {
    "model.norm.weight": (torch.float32, (16,)),
    "lm_head.weight": (torch.bfloat16, (64, 16)),
}
EXTRA_SPEC = {
    "lm_head.weight": (torch.float32, (64, 16)),  # conflict: base's must win
    "model.layers.0.mlp.weight": (torch.bfloat16, (32, 16)),  # overlap, other bytes: base's must win
    **{f"model.mtp.{i}.proj.weight": (torch.bfloat16, (32, 32)) for i in range(5)},
    "model.mtp.0.norm.weight": (torch.float32, (32,)),
}
EXTRA_ONLY = [n for n in EXTRA_SPEC if n not in BASE_SPEC]
BASE_AUX = {"config.json": '{"model_type": "llama"}', "tokenizer.json": "{}"}
EXTRA_AUX = {"config.json": '{"model_type": "llama_mtp"}', "tokenizer.json": "{}", "vision/preprocessor.json": "{}"}


def make_pair(tmp_path: Path, base_layout: str = "indexed", extra_layout: str = "indexed"):
    base_tensors = make_tensors(BASE_SPEC, seed=1)
    extra_tensors = make_tensors(EXTRA_SPEC, seed=2)
    base = write_checkpoint(tmp_path / "base", base_tensors, layout=base_layout, files=3, aux=BASE_AUX)
    extra = write_checkpoint(tmp_path / "extra", extra_tensors, layout=extra_layout, files=2, aux=EXTRA_AUX)
    want = expected_bytes(base_tensors) | {n: v for n, v in expected_bytes(extra_tensors).items() if n in EXTRA_ONLY}
    return base, extra, want


@pytest.mark.parametrize(
    ("base_layout", "extra_layout"),
    [("indexed", "indexed"), ("single", "engine"), ("engine", "single")],
)
def test_merge_reads_back_as_base_plus_extra_only(tmp_path: Path, base_layout: str, extra_layout: str) -> None:
    base, extra, want = make_pair(tmp_path, base_layout, extra_layout)
    before = snapshot(base), snapshot(extra)
    out = tmp_path / "out"
    result = merge(base, extra, out, max_shard_bytes=2500)

    assert read_output_bytes(out) == want
    base_files = sorted(Checkpoint.open(base).files)
    # Base shards first, in the order of their names, byte for byte, under standard names; then the new shards.
    n = len(result.written.shards)
    assert shard_names(out) == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert (result.base_shards, result.new_shards) == (len(base_files), n - len(base_files))
    for i, source in enumerate(base_files, start=1):
        assert filecmp.cmp(base / source, out / f"model-{i:05d}-of-{n:05d}.safetensors", shallow=False)
    index = json.loads((out / INDEX).read_text())
    assert index["metadata"]["total_size"] == sum(len(b) for _, _, b in want.values())
    assert verify_checkpoint(out).ok
    assert before == (snapshot(base), snapshot(extra)), "sources must never be written"


def test_new_shards_respect_the_limit(tmp_path: Path) -> None:
    base, extra, _ = make_pair(tmp_path)
    planned = plan_merge(base, extra, max_shard_bytes=2500)
    new = planned.plan.shards[planned.base_shards :]
    assert [s.kind for s in planned.plan.shards] == ["whole_file"] * planned.base_shards + ["assembled"] * len(new)
    # 2 KiB tensors: at most one per 2500-byte shard, with the small norm packed alongside one.
    assert all(s.file_len <= 2500 for s in new)
    assert len(new) == 5
    assert sorted(name for s in new for name in s.tensor_names) == sorted(EXTRA_ONLY)


def test_aux_files_come_from_base_only(tmp_path: Path) -> None:
    base, extra, _ = make_pair(tmp_path)
    result = merge(base, extra, tmp_path / "out")
    out = tmp_path / "out"
    assert (out / "config.json").read_text() == BASE_AUX["config.json"]
    assert not (out / "vision").exists()
    assert result.written.aux_files == ["config.json", "tokenizer.json"]
    assert result.extra_aux_left_out == {"config.json": "differs", "vision/preprocessor.json": "new"}


def test_hardlink_shares_inodes(tmp_path: Path) -> None:
    base, extra, want = make_pair(tmp_path)
    out = tmp_path / "out"
    result = merge(base, extra, out, hardlink=True)
    assert (result.linked, result.link_fallbacks) == (3, [])
    for i, source in enumerate(sorted(Checkpoint.open(base).files), start=1):
        name = f"model-{i:05d}-of-{len(result.written.shards):05d}.safetensors"
        assert (out / name).stat().st_ino == (base / source).stat().st_ino
    assert read_output_bytes(out) == want


def test_hardlink_never_links_a_base_shard_replaced_after_planning(tmp_path: Path) -> None:
    """A link shares the file it links: a base shard swapped for other bytes (same size, same
    name) between planning and writing must fail the merge, not land in the output."""
    base, extra, _ = make_pair(tmp_path)
    planned = plan_merge(base, extra)
    victim = base / planned.base.files[0]
    replacement = bytearray(victim.read_bytes())
    replacement[-1] ^= 0xFF
    (tmp_path / "replacement").write_bytes(replacement)
    os.replace(tmp_path / "replacement", victim)
    out = tmp_path / "out"
    with pytest.raises(NormalizeError) as raised:
        write_merge(planned, out, hardlink=True)
    assert raised.value.kind == "source_changed" and str(victim) in str(raised.value)
    assert not out.exists(), "a failed merge into a new directory leaves nothing behind"


@pytest.fixture
def out_elsewhere(tmp_path: Path) -> Iterator[Path]:
    """An output path on another file system than ``tmp_path`` (tmpfs /dev/shm), removed after the
    test; the test is skipped where there is none."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK) and shm.stat().st_dev != tmp_path.stat().st_dev):
        pytest.skip("no second file system (/dev/shm) to link across")
    with tempfile.TemporaryDirectory(dir=shm) as scratch:
        yield Path(scratch) / "out"


def test_hardlink_falls_back_to_copy_across_file_systems(tmp_path: Path, out_elsewhere: Path) -> None:
    base, extra, want = make_pair(tmp_path)
    result = merge(base, extra, out_elsewhere, hardlink=True)
    assert result.linked == 0
    assert len(result.link_fallbacks) == 3
    assert all("cross-device" in reason.lower() for _, reason in result.link_fallbacks)
    assert read_output_bytes(out_elsewhere) == want
    assert verify_checkpoint(out_elsewhere).ok


@pytest.mark.parametrize("where", ["base", "extra", "inside_base", "parent"])
def test_refuses_output_that_is_or_nests_with_a_source(tmp_path: Path, where: str) -> None:
    base, extra, _ = make_pair(tmp_path)
    out = {"base": base, "extra": extra, "inside_base": base / "merged", "parent": tmp_path}[where]
    before = snapshot(tmp_path)
    with pytest.raises(NormalizeError) as raised:
        merge(base, extra, out)
    assert raised.value.kind in {"output_is_source", "output_inside_source", "source_inside_output"}
    assert snapshot(tmp_path) == before


def test_failed_merge_leaves_no_index_and_no_shards(tmp_path: Path) -> None:
    base, extra, _ = make_pair(tmp_path)
    planned = plan_merge(base, extra, max_shard_bytes=2500)
    # The extra shrinks between planning and writing: the copy of its tensors must fail.
    victim = extra / Checkpoint.open(extra).files[-1]
    os.truncate(victim, victim.stat().st_size - 512)
    out = tmp_path / "out"
    with pytest.raises(NormalizeError):
        write_merge(planned, out)
    assert not out.exists(), "a failed merge into a new directory leaves nothing behind"


def test_plan_is_linear_in_tensor_count(tmp_path: Path) -> None:
    """The script this replaces re-read a header per tensor; 20,000 tensors must plan in well
    under a second of header work."""
    names = [f"t.{i}" for i in range(20_000)]
    for directory, tensors in (("base", names), ("extra", [*names, "new"])):
        (tmp_path / directory).mkdir()
        write_tiny_shard(tmp_path / directory / "model.safetensors", tensors)
    started = time.perf_counter()
    planned = plan_merge(tmp_path / "base", tmp_path / "extra")
    assert time.perf_counter() - started < 10.0  # ~0.5 s here; generous for shared CI machines
    assert planned.diff.extra_only == ["new"]


def test_base_shards_keep_their_order_whatever_the_index_lists_first(tmp_path: Path) -> None:
    """transformers writes the weight_map sorted by tensor name; here the first name lives in the
    last shard, which merge once re-emitted as model-00001."""
    spec = {f"model.layers.{i}.mlp.weight": (torch.bfloat16, (16, 16)) for i in range(3)}
    spec |= {f"model.layers.{i}.norm.weight": (torch.float32, (16,)) for i in range(4)}
    spec |= {"lm_head.weight": (torch.bfloat16, (16, 16))}  # the last shard holds it
    base = write_checkpoint(tmp_path / "base", make_tensors(spec, 1), files=4)
    assert Checkpoint.open(base).files[0] == "model-00004-of-00004.safetensors", "the index lists shard 4 first"
    extra = write_checkpoint(tmp_path / "extra", make_tensors({"mtp.weight": (torch.bfloat16, (8, 8))}, 2), files=1)
    out = tmp_path / "out"
    merge(base, extra, out)
    for i in range(1, 5):
        assert filecmp.cmp(base / f"model-{i:05d}-of-00004.safetensors", out / f"model-{i:05d}-of-00005.safetensors")
    engine = write_checkpoint(tmp_path / "engine", make_tensors(spec, 1), layout="engine", files=2)
    renamed = {"model-language-0001-fused-save_rank0.safetensors": "rank2.safetensors"}
    renamed["model-language-0002-fused-save_rank1.safetensors"] = "rank10.safetensors"
    for old, new in renamed.items():
        (engine / old).rename(engine / new)
    merge(engine, extra, tmp_path / "out-engine")
    assert filecmp.cmp(engine / "rank2.safetensors", tmp_path / "out-engine" / "model-00001-of-00003.safetensors")
    assert filecmp.cmp(engine / "rank10.safetensors", tmp_path / "out-engine" / "model-00002-of-00003.safetensors")


def fp8_version(tensors: dict[str, torch.Tensor], quantize: list[str]) -> dict[str, torch.Tensor]:
    """``tensors`` with the named weights in float8_e4m3fn, each with its float32 ``_scale_inv``."""
    out = {}
    for name, tensor in tensors.items():
        if name in quantize:
            out[name] = tensor.float().clamp(-448, 448).to(torch.float8_e4m3fn)
            out[f"{name}_scale_inv"] = torch.ones(1, 1)
        else:
            out[name] = tensor
    return out


QUANTIZED = [f"model.layers.{i}.mlp.weight" for i in range(6)]


@pytest.mark.parametrize("quantized", ["extra", "base"])
def test_refuses_to_merge_quantized_with_unquantized(tmp_path: Path, quantized: str) -> None:
    """A bf16 base and its FP8 version (or the reverse): the merge would write one side's weights
    with the other's scales as orphans, and no quantization_config."""
    bf16 = make_tensors(BASE_SPEC, seed=1)
    fp8 = fp8_version(bf16, QUANTIZED)
    base_tensors, extra_tensors = (bf16, fp8) if quantized == "extra" else (fp8, bf16)
    base = write_checkpoint(tmp_path / "base", base_tensors, files=2, aux=BASE_AUX)
    extra = write_checkpoint(tmp_path / "extra", extra_tensors, files=2, aux=BASE_AUX)
    out = tmp_path / "out"
    before = snapshot(tmp_path)
    with pytest.raises(NormalizeError) as refused:
        merge(base, extra, out)
    assert refused.value.kind == "mixed_quantization"
    assert f"{quantized} is quantized" in str(refused.value) and "--allow-mixed" in str(refused.value)
    assert snapshot(tmp_path) == before
    args = ["merge", "--base", str(base), "--extra", str(extra), "--out", str(out), "--yes"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and "--allow-mixed" in result.stderr
    assert not out.exists()
    allowed = CliRunner().invoke(app, [*args, "--allow-mixed"])
    assert allowed.exit_code == 0, allowed.output
    assert "warning: " in allowed.stdout and "merging anyway" in allowed.stdout
    assert set(read_output_bytes(out)) == set(base_tensors) | set(extra_tensors), "told to, it merges as before"


def test_refuses_scales_of_base_weights_even_when_both_are_quantized(tmp_path: Path) -> None:
    bf16 = make_tensors(BASE_SPEC, seed=1)
    base = write_checkpoint(tmp_path / "base", fp8_version(bf16, QUANTIZED[:3]), files=2)
    extra = write_checkpoint(tmp_path / "extra", fp8_version(bf16, QUANTIZED), files=2)
    with pytest.raises(NormalizeError) as refused:
        plan_merge(base, extra)
    assert refused.value.kind == "mixed_quantization"
    assert "'model.layers.3.mlp.weight_scale_inv'" in str(refused.value)
    planned = plan_merge(base, extra, allow_mixed=True)
    assert planned.mixed_quantization is not None


def test_quantized_checkpoints_merge_when_extra_brings_its_own_scaled_weights(tmp_path: Path) -> None:
    """An FP8 base and an FP8 extra whose extra-only weights come with their scales (MTP layers)."""
    base_tensors = fp8_version(make_tensors(BASE_SPEC, seed=1), QUANTIZED)
    extra_tensors = fp8_version(make_tensors(EXTRA_SPEC, seed=2), [f"model.mtp.{i}.proj.weight" for i in range(5)])
    base = write_checkpoint(tmp_path / "base", base_tensors, files=2)
    extra = write_checkpoint(tmp_path / "extra", extra_tensors, files=2)
    result = merge(base, extra, tmp_path / "out")
    assert "model.mtp.0.proj.weight_scale_inv" in read_output_bytes(tmp_path / "out")
    assert result.new_shards == 1


# --- the command ---------------------------------------------------------------------------


def test_cli_refuses_without_terminal_or_yes(tmp_path: Path) -> None:
    base, extra, _ = make_pair(tmp_path)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["merge", "--base", str(base), "--extra", str(extra), "--out", str(out)])
    assert result.exit_code == 2
    assert "pass --yes" in result.stderr
    assert "only in extra: 6" in result.stdout, "the diff summary comes first"
    assert not out.exists()


def test_cli_yes_merges_and_reports(tmp_path: Path) -> None:
    base, extra, want = make_pair(tmp_path)
    out = tmp_path / "out"
    args = ["merge", "--base", str(base), "--extra", str(extra), "--out", str(out), "--yes", "--shard-size-gb", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert read_output_bytes(out) == want
    assert len(shard_names(out)) == 4
    assert "lm_head.weight: BF16 [64, 16] in base, F32 [64, 16] in extra" in result.stdout
    assert "vision/preprocessor.json  (only in extra)" in result.stdout
    assert "config.json  (differs from base)" in result.stdout
    assert "4 shards (3 from base, 1 new)" in result.stdout


def test_cli_dry_run_writes_nothing(tmp_path: Path) -> None:
    base, extra, _ = make_pair(tmp_path)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app, ["merge", "--base", str(base), "--extra", str(extra), "--out", str(out), "--dry-run"]
    )
    assert result.exit_code == 0, result.output
    assert "Shard plan" in result.stdout
    assert not out.exists()


@pytest.mark.parametrize(("answer", "written"), [("y\n", True), ("n\n", False)])
def test_cli_asks_on_a_terminal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, answer: str, written: bool) -> None:
    monkeypatch.setattr(importlib.import_module("normalize_core.cli.placement"), "terminal_attached", lambda: True)
    base, extra, _ = make_pair(tmp_path)
    out = tmp_path / "out"
    args = ["merge", "--base", str(base), "--extra", str(extra), "--out", str(out), "--hardlink"]
    result = CliRunner().invoke(app, args, input=answer)
    assert "Write the merged checkpoint to" in result.stdout
    assert result.exit_code == 0, result.output  # declining is an answer, not an error: nothing is written
    assert ("Nothing written." in result.stdout) != written
    assert (out / INDEX).exists() == written
    if written:
        assert "Hard-linked 3 base shards" in result.stdout


def test_cli_says_when_links_fell_back(tmp_path: Path, out_elsewhere: Path) -> None:
    base, extra, _ = make_pair(tmp_path)
    args = ["merge", "--base", str(base), "--extra", str(extra), "--out", str(out_elsewhere), "--hardlink", "--yes"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "Could not hard-link 3 base shards" in result.stdout
    assert "copied them instead" in result.stdout


def test_cli_refuses_nested_output_in_one_line(tmp_path: Path) -> None:
    base, extra, _ = make_pair(tmp_path)
    result = CliRunner().invoke(
        app, ["merge", "--base", str(base), "--extra", str(extra), "--out", str(base / "m"), "--yes"]
    )
    assert result.exit_code == 2
    assert result.stderr.startswith("error:") and "inside" in result.stderr


def test_non_empty_output_needs_overwrite(tmp_path: Path) -> None:
    base, extra, want = make_pair(tmp_path)
    out = tmp_path / "out"
    merge(base, extra, out, max_shard_bytes=2500)  # 8 shards
    with pytest.raises(NormalizeError) as refused:
        merge(base, extra, out)
    assert refused.value.kind == "output_not_empty"
    result = merge(base, extra, out, overwrite=True)  # 4 shards: the earlier run's are stale
    assert len(shard_names(out)) == 4 and len(result.written.removed_stale) == 8
    assert read_output_bytes(out) == want
