"""``normalize check`` on header-only stand-ins of real releases (``tests/fixtures/realdata/*.standin.json.gz``:
every real tensor name, dtype and shape, the real config.json; see ``make_standins.py``), and to-fp8's default
decisions on their unquantized sources.

Expected tables are worked out by hand from the engine rules as the issue quotes them, never from the code:

- Fused MoE (``Fp8MoEMethod``): ``moe_intermediate_size / tp`` must be a multiple of 128.
  Qwen3-30B-A3B 768: TP 2 → 384 yes, TP 4 → 192 no. Qwen3-235B-A22B 1536: TP 4 → 384 yes, TP 8 → 192 no.
  Qwen3-Next-80B / Qwen3.5-35B 512: TP 4 → 128 yes, TP 8 → 64 no. MiniMax-M2.7 1536: as Qwen3-235B.
  DeepSeek-V3 / Kimi-K2 2048: TP 16 → 128 yes, TP 32 → 64 no.
- Dense and shared-expert MLPs (merged column + row, ``validate_fp8_block_shape``): DeepSeek's 18432 / 16 =
  1152 = 9 blocks, / 32 = 576 no; Qwen3-8B's 12288 / 32 = 384 yes; Qwen3-Next's shared expert 512 as its experts.
- Attention (``QKVParallelLinear``): heads must split over TP. Qwen3-8B 32 heads / 8 KV heads of 128: at TP 32
  one query head and a replicated KV head per rank, 128 rows each, load. MiniMax-M2.7's 48 heads do not split
  over 32 ranks; Qwen3-Next's and Qwen3.5's 16 heads (and 16 linear-attention key heads) neither. DeepSeek's 128
  and Kimi's 64 MLA heads split over 32 ranks into whole blocks (q_b 4 x 192 rows, kv_b 4 x 256 rows).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import pytest

from cli_util import run_normalize
from normalize_core import check
from normalize_core.engines.loadability import kept_layers
from normalize_core.fp8.convert import decide, plan_fp8
from normalize_core.fp8.rules import HeuristicRules
from standins import build_standin, load_standin, standin_tensors, write_standin

TP = (1, 2, 4, 8, 16, 32)

#: Model → the TP sizes of ``TP`` at which vLLM loads it (the others fail).
LOADS_AT = {
    "qwen3_8b_fp8": (1, 2, 4, 8, 16, 32),
    "qwen3_30b_a3b_thinking_2507_fp8": (1, 2),
    "qwen3_235b_a22b_instruct_2507_fp8": (1, 2, 4),
    "qwen3_next_80b_a3b_instruct_fp8": (1, 2, 4),
    "deepseek_v3": (1, 2, 4, 8, 16),
    "kimi_k2_instruct": (1, 2, 4, 8, 16),
    "minimax_m2.7": (1, 2, 4),
    "qwen3.5_35b_a3b_bf16": (1, 2, 4),
}

#: Model → (first TP size that fails, a layer that fails there, text of its reason).
FIRST_FAILURE = {
    "qwen3_30b_a3b_thinking_2507_fp8": (4, "model.layers.0.mlp.experts", "768/4 = 192"),
    "qwen3_235b_a22b_instruct_2507_fp8": (8, "model.layers.0.mlp.experts", "1536/8 = 192"),
    "qwen3_next_80b_a3b_instruct_fp8": (8, "model.layers.0.mlp.experts", "512/8 = 64"),
    "deepseek_v3": (32, "model.layers.3.mlp.experts", "2048/32 = 64"),
    "kimi_k2_instruct": (32, "model.layers.1.mlp.experts", "2048/32 = 64"),
    "minimax_m2.7": (8, "model.layers.0.block_sparse_moe.experts", "1536/8 = 192"),
    "qwen3.5_35b_a3b_bf16": (8, "model.language_model.layers.0.mlp.experts", "512/8 = 64"),
}

FP8_RELEASES = [stem for stem in LOADS_AT if not stem.endswith("_bf16")]


@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    """Builds each model's stand-in once per module, on first use."""
    root = tmp_path_factory.mktemp("standins")
    built: dict[str, Path] = {}

    def get(stem: str) -> Path:
        if stem not in built:
            built[stem] = build_standin(stem, root / stem)
        return built[stem]

    return get


@pytest.mark.parametrize("stem", LOADS_AT)
def test_check_predicts_the_engines_tp_table(standins, stem):
    report = check(standins(stem), tp=TP)
    assert report.tensors == load_standin(stem)["tensor_count"]
    assert report.loads_at() == list(LOADS_AT[stem])
    assert report.checked == ("bf16" if stem.endswith("_bf16") else "fp8")
    assert report.family is not None, report.notes
    # Real releases carry no format error (warnings, e.g. routers missing from the skip list, are allowed).
    assert [m for s, m in report.findings if s == "error"] == []
    if stem in FIRST_FAILURE:
        tp, layer, reason = FIRST_FAILURE[stem]
        verdict = next(v for v in report.verdicts if v.tp == tp)
        assert any(f.layer == layer and reason in f.problem and "block_n 128" in f.problem for f in verdict.failures), [
            f.line() for f in verdict.failures
        ]


def test_qwen3_235b_fails_at_tp8_only_on_the_experts_and_loads_with_expert_parallelism(standins):
    report = check(standins("qwen3_235b_a22b_instruct_2507_fp8"), tp=(8,))
    [failure] = report.verdicts[0].failures
    assert (failure.layer, failure.kind, failure.layers) == ("model.layers.0.mlp.experts", "fused MoE", 94)
    assert check(standins("qwen3_235b_a22b_instruct_2507_fp8"), tp=(8,), expert_parallel=True).ok
    # SGLang needs the 128 experts spread evenly: 16 per rank at EP 8.
    source = standins("qwen3_235b_a22b_instruct_2507_fp8")
    completed = run_normalize("check", str(source), "--tp", "8", "--ep", "--engine", "sglang", timeout=120)
    assert completed.returncode == 0, completed.stdout
    assert completed.stdout.splitlines()[0].endswith("(Qwen3MoeForCausalLM: Qwen3-MoE; block FP8; SGLang with EP)")


def test_deepseek_v3_at_tp32_names_the_dense_and_the_expert_layers(standins):
    [verdict] = check(standins("deepseek_v3"), tp=(32,)).verdicts
    failing = {f.layer: f for f in verdict.failures}
    # First dense layers: 18432 / 32 = 576; 58 MoE layers + the MTP layer 61: 2048 / 32 = 64.
    assert "18432/32 = 576" in failing["model.layers.0.mlp.gate_up_proj"].problem
    assert failing["model.layers.3.mlp.experts"].layers == 59
    assert "2048/32 = 64" in failing["model.layers.3.mlp.shared_experts.gate_up_proj"].problem


def test_cli_prints_the_table_and_exits_1_when_a_size_fails(standins):
    source = standins("qwen3_235b_a22b_instruct_2507_fp8")
    completed = run_normalize("check", str(source), "--tp", "1,2", "--tp", "4,8", timeout=120)
    assert completed.returncode == 1, completed.stderr
    lines = completed.stdout.splitlines()
    assert lines[1:5] == ["TP 1: loads", "TP 2: loads", "TP 4: loads", "TP 8: fails"]
    assert lines[5].startswith("  model.layers.0.mlp.experts (fused MoE): expert intermediate size per partition")
    assert lines[-1] == "FAILED loads at TP 1, 2, 4; fails at TP 8"
    ok = run_normalize("check", str(source), "--tp", "4", "--json", timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["tp"] == [{"tp": 4, "loads": True, "failures": []}]


def test_check_reads_the_150k_tensor_stand_in_from_headers(standins):
    """Qwen3-Next-80B-FP8 has 151,479 tensors; its stand-in's data is a hole, so any read of tensor data would
    see zero scales. (The time is measured by ``benches/check.py``, not asserted here.)"""
    source = standins("qwen3_next_80b_a3b_instruct_fp8")
    assert sum(p.stat().st_blocks for p in source.iterdir()) * 512 < 100 << 20
    report = check(source, tp=(4,))
    assert report.tensors == 151_479 and report.ok


class Entry(NamedTuple):
    """What to-fp8's decisions read of a ``TensorEntry``."""

    name: str
    dtype: str
    shape: list[int]


def unquantized_source(stem: str) -> tuple[list[Entry], set[str], dict]:
    """The bf16 checkpoint a release was made from (FP8 weights as BF16, scales dropped), the weights the
    release quantized, and its config.json without the quantization_config."""
    entries, quantized = [], set()
    for name, dtype, shape in standin_tensors(stem):
        if name.endswith("_scale_inv"):
            quantized.add(name.removesuffix("_scale_inv"))
        else:
            entries.append(Entry(name, "BF16" if dtype == "F8_E4M3" else dtype, shape))
    config = {k: v for k, v in load_standin(stem)["config"].items() if k != "quantization_config"}
    return entries, quantized, config


@pytest.mark.parametrize("stem", FP8_RELEASES)
def test_default_decisions_of_real_releases_do_not_change(stem):
    """to-fp8's loadable-by-default decisions (TP 1) quantize exactly what each release quantized."""
    entries, released, config = unquantized_source(stem)
    decisions, _ = decide(entries, HeuristicRules(), loadable_at=(1,), config=config)
    assert {d.name for d in decisions if d.quantize} == released
    assert kept_layers(decisions) == {}


def test_to_fp8_tp8_keeps_the_experts_of_qwen3_235b(tmp_path):
    entries, released, config = unquantized_source("qwen3_235b_a22b_instruct_2507_fp8")
    source = write_standin(tmp_path / "src", ((e.name, e.dtype, e.shape) for e in entries), config)
    plan = plan_fp8(source, build_plan=False, loadable_at=(1, 8))
    experts = {name for name in released if ".mlp.experts." in name}
    assert len(experts) == 94 * 128 * 3
    assert set(plan.quantized) == released - experts
    assert {m for m in plan.quantization_config["modules_to_not_convert"] if ".experts." in m} == {
        name.removesuffix(".weight") for name in experts
    }
    # The unquantized source, checked as to-fp8 writes it by default, fails at TP 8 on those experts.
    report = check(source, tp=(1, 8))
    assert report.checked == "bf16" and report.loads_at() == [1] and report.kept_to_load == {}
    assert report.verdicts[1].failures[0].layer == "model.layers.0.mlp.experts"
