"""What the commands print off a terminal: whole lines (never folded at 80 columns), counts in
the right number, and flags in ``--help`` without a value placeholder."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import typer

from builders import make_tensors, write_checkpoint
from cli_util import invoke, run_normalize
from normalize_core.cli import app
from normalize_core.sample import write_sample_checkpoint

#: A tensor name far longer than 80 columns, as nested multimodal models have.
LONG_NAME = "model.language_model.layers.0.mlp.experts.gate_up_proj_with_a_very_long_descriptive_suffix.weight"


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_sample_checkpoint(tmp_path_factory.mktemp("output") / "engine")


def test_tables_and_findings_are_not_folded_off_a_terminal(sample: Path) -> None:
    """The to-fp8 dry-run table once printed ``lm_head.weigh`` / ``t`` on two lines."""
    dry_run = run_normalize("to-fp8", "-s", str(sample), "--dry-run")
    assert dry_run.returncode == 0, dry_run.stderr
    rows = [line for line in dry_run.stdout.splitlines() if "lm_head.weight" in line]
    assert len(rows) == 1 and re.search(r"lm_head\.weight\s.*keep\s.*lm_head", rows[0]), dry_run.stdout
    assert any(len(line) > 80 for line in dry_run.stdout.splitlines()), "the table is wider than 80 columns"
    inspected = run_normalize("inspect", str(sample))
    line = "error: 3 shard files but no model.safetensors.index.json; loaders will not find them"
    assert line in inspected.stdout.splitlines()


def test_long_names_and_paths_stay_on_one_line(tmp_path: Path) -> None:
    deep = tmp_path.joinpath(*(["a-directory-with-a-long-name"] * 3))
    spec = {"model.norm.weight": (torch.float32, (4,)), LONG_NAME: (torch.bfloat16, (4, 4))}
    extra = write_checkpoint(deep / "extra", make_tensors(spec, 0), layout="single")
    base = write_checkpoint(
        deep / "base", make_tensors({"model.norm.weight": (torch.float32, (4,))}, 1), layout="single"
    )
    diffed = invoke("diff", str(base), str(extra))
    assert diffed.returncode == 0
    assert f"    + {LONG_NAME}  BF16 [4, 4]  32 B" in diffed.stdout.splitlines()
    assert f"extra  {extra}: 2 tensors" in diffed.stdout.splitlines()
    verified = invoke("verify", str(extra))
    assert f"OK {extra}: 2 tensors in 1 shard file" in verified.stdout.splitlines()


def test_counts_of_one_are_singular(tmp_path: Path) -> None:
    source = write_checkpoint(
        tmp_path / "one", make_tensors({"w": (torch.bfloat16, (4, 4))}, 0), layout="single", aux={"config.json": "{}"}
    )
    repacked = invoke("repack", "-s", str(source), "-o", str(tmp_path / "out"), "-q")
    assert repacked.returncode == 0, repacked.stderr
    assert "Wrote 1 shard (1 tensor, 32 B)" in repacked.stdout
    assert "Copied 1 other file: config.json" in repacked.stdout
    assert "1 shards" not in repacked.stdout and "1 tensors" not in repacked.stdout
    planned = invoke("repack", "-s", str(source), "-o", str(tmp_path / "plan"), "--dry-run")
    assert "1 shard, 1 tensor, total_size 32 bytes" in planned.stdout
    inspected = invoke("inspect", str(tmp_path / "out"))
    assert "1 tensor, 16 parameters, 32 B in 1 shard file" in inspected.stdout
    assert "quantization: none (0 FP8 tensors, 0 with _scale_inv)" in inspected.stdout


def command_names() -> list[str]:
    return sorted(typer.main.get_command(app).commands)


@pytest.mark.parametrize("command", command_names())
def test_flags_show_no_value_placeholder_in_help(command: str) -> None:
    helped = invoke(command, "--help")
    assert helped.returncode == 0, helped.stderr
    assert "<bool>" not in helped.stdout
    flags = [p for p in typer.main.get_command(app).commands[command].params if getattr(p, "is_flag", False)]
    for flag in flags:
        for name in flag.opts:
            # A flag's line names it and goes straight on to its help text, with no placeholder.
            assert re.search(rf"(^|[ ,/]){re.escape(name)}(,| /|  |$)", helped.stdout, re.M), (name, helped.stdout)


def test_the_main_help_lists_every_command_without_a_placeholder() -> None:
    helped = invoke("--help")
    assert "<bool>" not in helped.stdout
    for command in command_names():
        assert re.search(rf"^  {re.escape(command)}\s+\S", helped.stdout, re.M), command
