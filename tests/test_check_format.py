"""The format checks of ``normalize check`` and ``verify`` (issue 8 point 2, issue 7 item 14): each problem built
as a small real checkpoint (safetensors files written with torch), reported in one line, failing both commands
with exit status 1; a correct checkpoint passes; unreadable input and bad options exit 2 with one line."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from builders import write_checkpoint
from cli_util import run_normalize
from normalize_core import check, verify_checkpoint

HIDDEN, INTERMEDIATE = 256, 512

CONFIG = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "hidden_size": HIDDEN,
    "intermediate_size": INTERMEDIATE,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 128,
    "num_hidden_layers": 1,
}

QUANTIZATION = {
    "quant_method": "fp8",
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "weight_block_size": [128, 128],
    "modules_to_not_convert": ["lm_head", "model.embed_tokens"],
}

LINEARS = {
    "model.layers.0.self_attn.q_proj.weight": [256, HIDDEN],
    "model.layers.0.self_attn.k_proj.weight": [128, HIDDEN],
    "model.layers.0.self_attn.v_proj.weight": [128, HIDDEN],
    "model.layers.0.self_attn.o_proj.weight": [HIDDEN, 256],
    "model.layers.0.mlp.gate_proj.weight": [INTERMEDIATE, HIDDEN],
    "model.layers.0.mlp.up_proj.weight": [INTERMEDIATE, HIDDEN],
    "model.layers.0.mlp.down_proj.weight": [HIDDEN, INTERMEDIATE],
}


def fp8_weight(shape: list[int]) -> dict[str, torch.Tensor]:
    """An FP8 weight and a valid ``_scale_inv`` (ones) of ceil(N/128) x ceil(K/128)."""
    scale = [-(-d // 128) for d in shape]
    return {"weight": torch.full(shape, 0.5).to(torch.float8_e4m3fn), "scale": torch.ones(scale)}


def fp8_tensors() -> dict[str, torch.Tensor]:
    """A one-layer Qwen3 in block FP8, as to-fp8 writes it."""
    tensors = {
        "model.embed_tokens.weight": torch.zeros(512, HIDDEN, dtype=torch.bfloat16),
        "lm_head.weight": torch.zeros(512, HIDDEN, dtype=torch.bfloat16),
        "model.layers.0.input_layernorm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16),
    }
    for name, shape in LINEARS.items():
        made = fp8_weight(shape)
        tensors[name] = made["weight"]
        tensors[f"{name}_scale_inv"] = made["scale"]
    return tensors


def write(directory: Path, tensors: dict[str, torch.Tensor], config: dict | None, shards: int = 1) -> Path:
    """``tensors`` in ``shards`` standard shards with an index (a consecutive run each), and ``config``."""
    aux = {"config.json": json.dumps(config)} if config is not None else None
    return write_checkpoint(directory, tensors, layout="indexed", files=shards, aux=aux)


def fp8_checkpoint(directory: Path, change: Callable[[dict, dict], None] = lambda t, c: None, shards: int = 1):
    tensors = fp8_tensors()
    config = {**CONFIG, "quantization_config": json.loads(json.dumps(QUANTIZATION))}
    change(tensors, config)
    return write(directory, tensors, config, shards)


def run(*args: str) -> subprocess.CompletedProcess:
    """The CLI in its own process; a wide COLUMNS so that no line of the reports is wrapped."""
    return run_normalize(*args, env={**os.environ, "COLUMNS": "1000"}, timeout=120)


def drop_down_scale(tensors, config):
    del tensors["model.layers.0.mlp.down_proj.weight_scale_inv"]


def misshapen_scale(tensors, config):
    tensors["model.layers.0.mlp.down_proj.weight_scale_inv"] = torch.ones(1, 1)


def orphan_scale(tensors, config):
    tensors["model.layers.0.mlp.extra_proj.weight_scale_inv"] = torch.ones(1, 1)


def no_quantization_config(tensors, config):
    del config["quantization_config"]


def no_block_size(tensors, config):
    del config["quantization_config"]["weight_block_size"]


def malformed_block_size(tensors, config):
    config["quantization_config"]["weight_block_size"] = [128]


def skip_names_nothing(tensors, config):
    config["quantization_config"]["modules_to_not_convert"].append("model.layers.0.mlp.gate_projection")


def skip_names_fp8_module(tensors, config):
    config["quantization_config"]["modules_to_not_convert"].append("model.layers.0.self_attn.q_proj")


def kv_split(tensors, config):
    name = "model.layers.0.self_attn.k_proj.weight"
    tensors[name] = torch.zeros(128, HIDDEN, dtype=torch.bfloat16)
    del tensors[f"{name}_scale_inv"]
    config["quantization_config"]["modules_to_not_convert"].append("model.layers.0.self_attn.k_proj")


def experts_split(tensors, config):
    for expert in range(2):
        for role, shape in (("gate_proj", [128, HIDDEN]), ("up_proj", [128, HIDDEN]), ("down_proj", [HIDDEN, 128])):
            name = f"model.layers.0.mlp.experts.{expert}.{role}.weight"
            if expert == 0:
                made = fp8_weight(shape)
                tensors[name], tensors[f"{name}_scale_inv"] = made["weight"], made["scale"]
            else:
                tensors[name] = torch.zeros(shape, dtype=torch.bfloat16)
                config["quantization_config"]["modules_to_not_convert"].append(name.removesuffix(".weight"))


def undeclared_mtp_layer(tensors, config):
    config["num_nextn_predict_layers"] = 0
    made = fp8_weight([HIDDEN, INTERMEDIATE])
    tensors["model.layers.1.mlp.down_proj.weight"] = made["weight"]
    tensors["model.layers.1.mlp.down_proj.weight_scale_inv"] = made["scale"]


def unscaled_per_tensor(tensors, config):
    for name in [n for n in tensors if n.endswith("_scale_inv")]:
        del tensors[name]
    del config["quantization_config"]["weight_block_size"]


#: Problem → (how to make it, the line check and verify print).
PROBLEMS = {
    "FP8 weight without its scale": (
        drop_down_scale,
        "model.layers.0.mlp.down_proj.weight is FP8 but has no model.layers.0.mlp.down_proj.weight_scale_inv",
    ),
    "scale of the wrong shape": (
        misshapen_scale,
        "model.layers.0.mlp.down_proj.weight_scale_inv has shape [1, 1], expected [2, 4] for [256, 512] "
        "in 128x128 blocks",
    ),
    "orphan scale": (
        orphan_scale,
        "orphan scales: 1 scale tensor for weights absent from this checkpoint, "
        "e.g. model.layers.0.mlp.extra_proj.weight_scale_inv",
    ),
    "FP8 without quantization_config": (
        no_quantization_config,
        "FP8 weights but config.json has no quantization_config with quant_method 'fp8'",
    ),
    "no weight_block_size": (
        no_block_size,
        "quantization_config has no weight_block_size, but the FP8 weights have block scales (*_scale_inv): "
        "engines would load them as per-tensor FP8",
    ),
    "malformed weight_block_size": (malformed_block_size, "weight_block_size [128] is not [block_n, block_k]"),
    "skip list names nothing": (
        skip_names_nothing,
        "modules_to_not_convert: 1 entry naming no module of this checkpoint, e.g. "
        "'model.layers.0.mlp.gate_projection'",
    ),
    "skip list names an FP8 module": (
        skip_names_fp8_module,
        "model.layers.0.self_attn.q_proj is listed in modules_to_not_convert but its weight is FP8",
    ),
    "q/k/v of two precisions": (
        kv_split,
        "model.layers.0.self_attn.{q_proj,k_proj,v_proj}: engines load these modules as one layer, but "
        "model.layers.0.self_attn.q_proj would be FP8 and model.layers.0.self_attn.k_proj not",
    ),
    "experts of two precisions": (
        experts_split,
        "model.layers.0.mlp.experts.*: engines load these modules as one layer, but "
        "model.layers.0.mlp.experts.0.down_proj would be FP8 and model.layers.0.mlp.experts.1.down_proj not",
    ),
    "MTP layer the config does not declare": (
        undeclared_mtp_layer,
        "model.layers.1 is beyond num_hidden_layers 1 + num_nextn_predict_layers 0: "
        "engines have no layer to load it into",
    ),
    "FP8 weights without any scale": (
        unscaled_per_tensor,
        "7 FP8 weights without any scale tensor, e.g. model.layers.0.mlp.down_proj.weight",
    ),
}


def test_a_correct_checkpoint_passes_and_scales_may_sit_in_any_shard(tmp_path):
    def scales_last(tensors, config):
        for name in [n for n in tensors if n.endswith("_scale_inv")]:
            tensors[name] = tensors.pop(name)

    source = fp8_checkpoint(tmp_path / "ok", scales_last, shards=2)
    index = json.loads((source / "model.safetensors.index.json").read_text())["weight_map"]
    assert index["model.layers.0.self_attn.q_proj.weight"] != index["model.layers.0.self_attn.q_proj.weight_scale_inv"]
    report = check(source, tp=(1, 2))
    assert report.ok and report.findings == [] and report.loads_at() == [1, 2]
    assert verify_checkpoint(source).findings == []
    completed = run("check", str(source), "--tp", "1,2")
    assert completed.returncode == 0 and completed.stdout.splitlines()[-1] == "OK loads at TP 1, 2"


@pytest.mark.parametrize("problem", PROBLEMS)
def test_each_format_problem_is_one_error_line_in_check_and_verify(tmp_path, problem):
    change, line = PROBLEMS[problem]
    source = fp8_checkpoint(tmp_path / "ckpt", change)
    report = check(source, tp=(1,))
    errors = [message for severity, message in report.findings if severity == "error"]
    assert any(message.startswith(line) for message in errors), errors
    assert not report.ok
    completed = run("check", str(source), "--tp", "1")
    assert completed.returncode == 1, completed.stderr
    assert any(out.startswith(f"error: {line}") for out in completed.stdout.splitlines()), completed.stdout
    verified = run("verify", str(source))
    assert verified.returncode == 1
    assert any(out.startswith(f"error: {line}") for out in verified.stdout.splitlines()), verified.stdout


def test_bf16_weights_with_orphan_scales_and_no_quantization_config_fail_verify(tmp_path):
    """A bf16 base merged with an FP8 extra: the base's bf16 weights won, the extra's scales came along and no
    quantization_config was written (issue 7 item 14). Built here as that merge's output is."""
    tensors = fp8_tensors()
    for name in LINEARS:
        tensors[name] = torch.zeros(LINEARS[name], dtype=torch.bfloat16)
    source = write(tmp_path / "merged", tensors, CONFIG)
    report = verify_checkpoint(source)
    assert not report.ok
    assert report.findings == [
        (
            "error",
            "orphan scales: 7 scale tensors for weights that are not FP8, e.g. "
            "model.layers.0.mlp.down_proj.weight_scale_inv for model.layers.0.mlp.down_proj.weight (BF16); "
            "engines have no parameter to load them into",
        )
    ]
    assert run("verify", str(source)).returncode == 1
    assert run("check", str(source), "--tp", "1").returncode == 1


def test_a_stale_quantization_config_on_a_bf16_checkpoint(tmp_path):
    tensors = {name: torch.zeros(shape, dtype=torch.bfloat16) for name, shape in LINEARS.items()}
    source = write(tmp_path / "bf16", tensors, {**CONFIG, "quantization_config": QUANTIZATION})
    line = (
        "config.json has an FP8 quantization_config but no weight is FP8: engines would read the unquantized "
        "weights as FP8 (a stale quantization_config)"
    )
    assert ("error", line) in check(source, tp=(1,)).findings
    assert ("error", line) in verify_checkpoint(source).findings


@pytest.mark.parametrize("config_text", ["[1, 2]", '{"quantization_config": "fp8"}', "not json"])
def test_a_config_of_the_wrong_shape_is_a_finding_not_a_crash(tmp_path, config_text):
    source = fp8_checkpoint(tmp_path / "ckpt")
    (source / "config.json").write_text(config_text)
    line = "FP8 weights but config.json has no quantization_config with quant_method 'fp8'"
    assert ("error", line) in check(source, tp=(1,)).findings
    for command in ("check", "verify"):
        completed = run(command, str(source))
        assert completed.returncode == 1 and f"error: {line}" in completed.stdout.splitlines(), completed.stderr


def test_a_bf16_checkpoint_is_checked_as_to_fp8_would_write_it(tmp_path):
    tensors = {name: torch.zeros(shape, dtype=torch.bfloat16) for name, shape in LINEARS.items()}
    source = write(tmp_path / "bf16", tensors, CONFIG)
    report = check(source, tp=(1, 2, 4))
    assert report.checked == "bf16" and report.findings == []
    # 2 query heads do not split over 4 ranks.
    assert report.loads_at() == [1, 2]
    assert "num_attention_heads 2 is not divisible by TP 4" in report.verdicts[2].failures[0].problem
    assert json.loads(run("check", str(source), "--json", "--tp", "2").stdout)["checked"] == "bf16"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tp", "0"], "error: --tp '0': TP sizes are positive integers, e.g. --tp 1,2,4,8"),
        (["--tp", "2,x"], "error: --tp '2,x': TP sizes are positive integers, e.g. --tp 1,2,4,8"),
        (["--engine", "tgi"], "error: --engine 'tgi': give vllm or sglang"),
    ],
)
def test_bad_options_exit_2_with_one_line(tmp_path, args, message):
    source = fp8_checkpoint(tmp_path / "ok")
    completed = run("check", str(source), *args)
    assert completed.returncode == 2 and completed.stderr.strip() == message and "Traceback" not in completed.stderr


def test_unreadable_or_foreign_checkpoints_exit_2_with_one_line(tmp_path):
    missing = run("check", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1
    assert missing.stderr.startswith("error: ")

    def compressed_tensors(tensors, config):
        config["quantization_config"]["quant_method"] = "compressed-tensors"

    foreign = fp8_checkpoint(tmp_path / "ct", compressed_tensors)
    completed = run("check", str(foreign))
    assert completed.returncode == 2
    assert completed.stderr.strip() == (
        f"error: {foreign}: quant_method 'compressed-tensors' is not block FP8; check models block-FP8 "
        "(quant_method 'fp8') and unquantized checkpoints"
    )
