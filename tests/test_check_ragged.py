"""The issue's reproduction: a tiny Qwen3 made by transformers with ``intermediate_size=576`` (4.5 blocks).

vLLM fuses ``gate_proj`` and ``up_proj`` into one merged column layer whose scale has ceil(1152/128) = 9 rows
while each half carries ceil(576/128) = 5, and refuses to load it (``start (5) + length (5) exceeds dimension
size (9)``). By default to-fp8 keeps that MLP (gate, up and down) in bf16 and says why, and the output passes
``check`` and ``verify`` and loads in transformers; with ``--allow-unloadable`` the MLP is quantized and
``check`` reports the merged-column failure at TP 1."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, Qwen3ForCausalLM

from builders import tiny_model
from cli_util import run_normalize

MLP = ("gate_proj", "up_proj", "down_proj")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def run(*args: str) -> subprocess.CompletedProcess:
    """The CLI in its own process; a wide COLUMNS so that no line of the reports is wrapped."""
    return run_normalize(*args, env={**os.environ, "COLUMNS": "1000"}, timeout=300)


@pytest.fixture(scope="module")
def ragged_qwen3(tmp_path_factory) -> tuple[Path, Qwen3ForCausalLM]:
    model = tiny_model("Qwen3", 0, intermediate_size=576)
    source = tmp_path_factory.mktemp("ragged") / "qwen3-576"
    model.save_pretrained(source)
    return source, model


def read_back(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in directory.glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            tensors |= {name: f.get_tensor(name) for name in f.keys()}
    return tensors


def test_to_fp8_keeps_the_ragged_mlp_by_default_and_says_why(ragged_qwen3, tmp_path):
    source, model = ragged_qwen3
    out = tmp_path / "fp8"
    converted = run("to-fp8", "-s", str(source), "-o", str(out), "--device", "cpu", "--place", "keep", "-q")
    assert converted.returncode == 0, converted.stderr
    lines = converted.stdout.splitlines()
    assert "Kept 4 layers unquantized so vLLM can load the output (--allow-unloadable quantizes them anyway):" in lines
    assert (
        "  model.layers.N.mlp.gate_up_proj (2 layers): TP 1: gate_proj partition of the merged layer = 576 rows is "
        "not a multiple of block_n 128: only the last partition may be ragged (vLLM validate_fp8_block_shape), and "
        "the merged scale has ceil(1152/128) = 9 rows for 10 partition blocks"
    ) in lines
    assert any(
        line.startswith("  model.layers.N.mlp.down_proj (2 layers): TP 1: it reads the output of") for line in lines
    )

    written, original = read_back(out), read_back(source)
    for layer in range(2):
        for module in MLP:
            name = f"model.layers.{layer}.mlp.{module}.weight"
            assert written[name].dtype == torch.bfloat16 and torch.equal(written[name], original[name])
            assert f"{name}_scale_inv" not in written
        for module in ATTENTION:
            name = f"model.layers.{layer}.self_attn.{module}.weight"
            assert written[name].dtype == torch.float8_e4m3fn and f"{name}_scale_inv" in written
    skip = json.loads((out / "config.json").read_text())["quantization_config"]["modules_to_not_convert"]
    assert {f"model.layers.{i}.mlp.{m}" for i in range(2) for m in MLP} <= set(skip)

    assert run("check", str(out), "--tp", "1,2").returncode == 0
    verified = run("verify", str(out))
    assert verified.returncode == 0, verified.stdout

    # transformers loads it (dequantizing the FP8 attention on the CPU) and computes what the bf16 model does.
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    tokens = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = loaded(tokens).logits.float(), model(tokens).logits.float()
    assert torch.nn.functional.cosine_similarity(ours.flatten(), theirs.flatten(), dim=0) > 0.99


def test_allow_unloadable_quantizes_it_and_check_reports_the_merged_column_failure(ragged_qwen3, tmp_path):
    source, _ = ragged_qwen3
    out = tmp_path / "fp8"
    converted = run(
        "to-fp8", "-s", str(source), "-o", str(out), "--device", "cpu", "--place", "keep", "-q", "--allow-unloadable"
    )
    assert converted.returncode == 0, converted.stderr
    assert "Kept" not in converted.stdout
    assert read_back(out)["model.layers.0.mlp.gate_proj.weight"].dtype == torch.float8_e4m3fn

    checked = run("check", str(out), "--tp", "1")
    assert checked.returncode == 1
    assert checked.stdout.splitlines()[1:3] == [
        "TP 1: fails",
        "  model.layers.0.mlp.gate_up_proj (merged column-parallel): gate_proj partition of the merged layer = 576 "
        "rows is not a multiple of block_n 128: only the last partition may be ragged (vLLM "
        "validate_fp8_block_shape), and the merged scale has ceil(1152/128) = 9 rows for 10 partition blocks "
        "(2 layers alike)",
    ]
    verified = run("verify", str(out))
    assert verified.returncode == 1
    assert any(
        line.startswith("error: vLLM cannot load it at TP 1: model.layers.0.mlp.gate_up_proj")
        for line in verified.stdout.splitlines()
    )


def test_the_source_is_checked_as_to_fp8_writes_it(ragged_qwen3):
    source, _ = ragged_qwen3
    checked = run("check", str(source), "--tp", "1", "--json")
    assert checked.returncode == 0, checked.stdout
    report = json.loads(checked.stdout)
    assert report["checked"] == "bf16" and report["ok"]
    assert set(report["kept_to_load"]) == {
        "model.layers.0.mlp.gate_up_proj",
        "model.layers.0.mlp.down_proj",
        "model.layers.1.mlp.gate_up_proj",
        "model.layers.1.mlp.down_proj",
    }


def test_tp_option_needs_no_allow_unloadable_and_is_validated(ragged_qwen3, tmp_path):
    source, _ = ragged_qwen3
    both = run("to-fp8", "-s", str(source), "--dry-run", "--tp", "2", "--allow-unloadable")
    assert both.returncode == 2 and both.stderr.strip() == "error: give --tp or --allow-unloadable, not both"
    bad = run("to-fp8", "-s", str(source), "--dry-run", "--tp", "two")
    assert bad.returncode == 2 and "TP sizes are positive integers" in bad.stderr
    # 2 query heads split over 2 ranks: 128 rows each, whole blocks, so --tp 2 keeps nothing more.
    dry = json.loads(run("to-fp8", "-s", str(source), "--dry-run", "--json", "--tp", "2").stdout)
    assert set(dry["kept_to_load"]) == {
        f"model.layers.{i}.mlp.{m}" for i in range(2) for m in ("gate_up_proj", "down_proj")
    }
