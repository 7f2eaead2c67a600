"""``normalize diff`` / ``normalize_core.diff``: counts and lists from headers alone, on real files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from builders import make_tensors, write_checkpoint
from normalize_core import Checkpoint, NormalizeError, diff
from normalize_core.cli import app
from normalize_core.diff import changed_aux_files

BASE_SPEC = {
    "embed.weight": (torch.bfloat16, (16, 8)),
    "layer.0.q.weight": (torch.bfloat16, (8, 8)),
    "layer.0.k.weight": (torch.bfloat16, (4, 8)),
    "norm.weight": (torch.float32, (8,)),
    "lm_head.weight": (torch.bfloat16, (16, 8)),
}
EXTRA_SPEC = {
    "layer.0.q.weight": (torch.bfloat16, (8, 8)),  # same dtype and shape: plain overlap
    "layer.0.k.weight": (torch.float8_e4m3fn, (4, 8)),  # dtype conflict
    "lm_head.weight": (torch.bfloat16, (32, 8)),  # shape conflict
    "mtp.0.proj.weight": (torch.bfloat16, (8, 16)),  # extra-only
    "layer.0.k.weight_scale_inv": (torch.float32, (1, 1)),  # extra-only
}


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    base = write_checkpoint(tmp_path / "base", make_tensors(BASE_SPEC, seed=1), layout="indexed", files=2)
    extra = write_checkpoint(tmp_path / "extra", make_tensors(EXTRA_SPEC, seed=2), layout="engine", files=2)
    return base, extra


def test_counts_lists_and_conflicts(pair: tuple[Path, Path]) -> None:
    base, extra = pair
    d = diff(base, extra)
    assert (d.base_count, d.extra_count) == (5, 5)
    assert sorted(d.extra_only) == ["layer.0.k.weight_scale_inv", "mtp.0.proj.weight"]
    assert d.extra_only_bytes == 8 * 16 * 2 + 4
    assert d.overlap == ["layer.0.k.weight", "layer.0.q.weight", "lm_head.weight"]
    assert d.base_only_count == 2
    conflicts = {c.name: c for c in d.conflicts}
    assert list(conflicts) == ["layer.0.k.weight", "lm_head.weight"]
    k = conflicts["layer.0.k.weight"]
    assert (k.base_dtype, k.extra_dtype, k.base_shape, k.extra_shape) == ("BF16", "F8_E4M3", [4, 8], [4, 8])
    head = conflicts["lm_head.weight"]
    assert (head.base_shape, head.extra_shape) == ([16, 8], [32, 8])
    assert "F8_E4M3 [4, 8] in extra" in k.describe()


def test_extra_only_keeps_extra_order(tmp_path: Path) -> None:
    """A merge writes extra-only tensors in the extra's own order (source-contiguous copies)."""
    spec = {f"t.{i}": (torch.float32, (2,)) for i in (3, 1, 2)}
    base = write_checkpoint(tmp_path / "base", make_tensors({"x": (torch.float32, (1,))}, 0), layout="single")
    extra = write_checkpoint(tmp_path / "extra", make_tensors(spec, 0), layout="single")
    d = diff(base, extra)
    in_file_order = [t.name for t in sorted(Checkpoint.open(extra).tensors, key=lambda t: t.file_offset)]
    assert d.extra_only == in_file_order
    assert d.as_dict()["extra_only"] == ["t.1", "t.2", "t.3"]


def test_identical_checkpoints(tmp_path: Path) -> None:
    tensors = make_tensors(BASE_SPEC, seed=1)
    a = write_checkpoint(tmp_path / "a", tensors, layout="indexed", files=3)
    b = write_checkpoint(tmp_path / "b", tensors, layout="single")
    d = diff(a, b)
    assert d.extra_only == [] and d.conflicts == [] and d.extra_only_bytes == 0
    assert d.overlap == sorted(BASE_SPEC)


def test_cli_json(pair: tuple[Path, Path]) -> None:
    base, extra = pair
    result = CliRunner().invoke(app, ["diff", str(base), str(extra), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["extra_only"] == ["layer.0.k.weight_scale_inv", "mtp.0.proj.weight"]
    assert data["overlap"] == ["layer.0.k.weight", "layer.0.q.weight", "lm_head.weight"]
    assert data["conflicts"] == ["layer.0.k.weight", "lm_head.weight"]
    assert (data["base_count"], data["extra_count"], data["extra_only_bytes"]) == (5, 5, 260)


def test_cli_human_output_shows_conflicts(pair: tuple[Path, Path]) -> None:
    base, extra = pair
    result = CliRunner().invoke(app, ["diff", str(base), str(extra)])
    assert result.exit_code == 0, result.output
    assert "only in extra: 2" in result.stdout
    assert "+ mtp.0.proj.weight  BF16 [8, 16]" in result.stdout
    assert "! lm_head.weight: BF16 [16, 8] in base, BF16 [32, 8] in extra" in result.stdout
    assert "base's are kept" in result.stdout


def test_cli_bad_input_is_one_line_error(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    base, _ = pair
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    result = CliRunner().invoke(app, ["diff", str(base), str(broken)])
    assert result.exit_code == 2
    assert result.stderr.startswith("error:") and "Traceback" not in result.output
    with pytest.raises(NormalizeError):
        diff(base, broken)


def test_changed_aux_files(tmp_path: Path) -> None:
    a = tmp_path / "a"
    b = tmp_path / "b"
    for d, config in ((a, '{"x": 1}'), (b, '{"x": 2}')):
        (d / "sub").mkdir(parents=True)
        (d / "config.json").write_text(config)
        (d / "tokenizer.json").write_text("same")
        (d / "sub" / "same.txt").write_text("same")
        (d / ".hidden").write_text(config)
        (d / "w.safetensors").write_text(config)
    (a / "sub" / "new.txt").write_text("only in a")
    (a / "preprocessor_config.json").write_text("{}")
    assert changed_aux_files(a, b) == {
        "config.json": "differs",
        "preprocessor_config.json": "new",
        "sub/new.txt": "new",
    }
    assert changed_aux_files(a, tmp_path / "missing")["tokenizer.json"] == "new"


def test_cli_prints_names_and_paths_verbatim(tmp_path: Path) -> None:
    """Tensor names and paths may contain rich markup characters; they must print as they are."""
    base = write_checkpoint(tmp_path / "[red]base", make_tensors({"w[/]": (torch.float32, (2,))}, 1), layout="single")
    extra_spec = {"w[/]": (torch.float16, (2,)), "[bold]x": (torch.float32, (1,))}
    extra = write_checkpoint(tmp_path / "extra", make_tensors(extra_spec, 2), layout="single")
    result = CliRunner().invoke(app, ["diff", str(base), str(extra)])
    assert result.exit_code == 0, result.output
    assert f"base   {base}:" in result.stdout
    assert "+ [bold]x  F32 [1]" in result.stdout
    assert "! w[/]: F32 [2] in base, F16 [2] in extra" in result.stdout
