"""The quantize-or-keep rules (``normalize_core.fp8.rules``) and fused groups (``normalize_core.fp8.groups``),
held to the decisions of real published block-FP8 checkpoints.

Real data: ``tests/fixtures/realdata/*.patterns.json.gz``, built by ``make_fixtures.py`` next to them from the
project's real-data folder (tensor lists of the actual releases; provenance in that script and in each
fixture's ``provenance`` field). Each holds a model's source tensors grouped by name pattern (number segments → ``N``),
with one real example name, ndim, source dtype and whether the release quantized it; the generator refuses a
pattern whose real tensors disagree, so one decision per pattern stands for all of its tensors.

- FP8 releases (DeepSeek-V3, Kimi-K2-Instruct, MiniMax-M2.7, Qwen3-8B/30B-A3B/235B-A22B-FP8,
  Qwen3-Next-80B-A3B-FP8): a weight is quantized iff the release has ``<name>_scale_inv``.
- Qwen3.5: no FP8 tensor list is published; the truth is the official Qwen3.5-122B-A10B-FP8
  ``modules_to_not_convert``, applied by pattern to the real bf16 Qwen3.5-35B-A3B list (fused 3-D experts) and
  to two real REAP indexes (per-expert weights).
- GLM-4.5-FP8 is left out of parity: it is per-channel FP8 (``weight_scale`` of shape ``[out, 1]``), another
  scheme with other choices (it quantizes the MTP head ``shared_head.head``, which block-FP8 DeepSeek-V3 keeps).
  It still takes part in the fused-group check, which is about engines, not schemes.
"""

from __future__ import annotations

import gzip
import json
import math
import subprocess
import sys
from collections import Counter
from functools import cache
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from normalize_core import NormalizeError
from normalize_core.fp8.groups import fused_group, module_of, split_fused_groups
from normalize_core.fp8.layout import quantized_layout
from normalize_core.fp8.rules import (
    HEURISTIC_KEEP_RULES,
    Decision,
    HeuristicRules,
    PatternRules,
    ReferenceRules,
    decide_all,
    ineligible_reason,
    summarize,
    with_skip_patterns,
)

FIXTURES = Path(__file__).parent / "fixtures" / "realdata"

#: Fixture stem → real source tensors it covers (the generator's counts, pinned so a regenerated fixture that
#: lost tensors fails here).
BLOCK_FP8_RELEASES = {
    "deepseek_v3": 46183,
    "kimi_k2_instruct": 70036,
    "minimax_m2.7": 48239,
    "qwen3_8b_fp8": 399,
    "qwen3_30b_a3b_thinking_2507_fp8": 18867,
    "qwen3_235b_a22b_instruct_2507_fp8": 36945,
    "qwen3_next_80b_a3b_instruct_fp8": 75944,
}
QWEN35_BY_SKIP_LIST = {
    "qwen3.5_35b_a3b_bf16": 1811,
    "qwen3.5_18b_reap_a3b_bf16": 15973,
    "qwen3.5_25b_reap_a3b_bf16": 22213,
}
PARITY = BLOCK_FP8_RELEASES | QWEN35_BY_SKIP_LIST


@cache
def load_fixture(stem: str) -> dict:
    return json.loads(gzip.decompress((FIXTURES / f"{stem}.patterns.json.gz").read_bytes()))


def shape_of(ndim: int) -> list[int]:
    """Rules look at the number of dimensions only; sizes are irrelevant."""
    return [256] * ndim


def instances(pattern: str, example: str) -> list[str]:
    """The real example and the pattern with other layer/expert indices, which must decide alike."""
    return [example] + [".".join(index if s == "N" else s for s in pattern.split(".")) for index in ("0", "61", "383")]


# --- parity with real releases ---------------------------------------------------------------------------------


@pytest.mark.parametrize("stem", PARITY)
def test_heuristic_reproduces_real_release(stem: str) -> None:
    fixture = load_fixture(stem)
    assert fixture["tensors"] == PARITY[stem] == sum(p["count"] for p in fixture["patterns"].values())
    rules = HeuristicRules()
    wrong = []
    for pattern, info in fixture["patterns"].items():
        for name in instances(pattern, info["example"]):
            decision = rules.decide(name, info["dtype"], shape_of(info["ndim"]))
            if decision.quantize != info["quantized"]:
                wrong.append(f"{name} ({info['count']} tensors): release {info['quantized']}, rules {decision}")
    assert not wrong, "\n".join(wrong)


def test_parity_covers_both_decisions_and_every_keep_reason() -> None:
    """The parity set is not one-sided: it quantizes and keeps, and exercises each table row it can."""
    rules = HeuristicRules()
    reasons = set()
    quantized = kept = 0
    for stem in PARITY:
        for info in load_fixture(stem)["patterns"].values():
            decision = rules.decide(info["example"], info["dtype"], shape_of(info["ndim"]))
            reasons.add(decision.reason)
            quantized += info["count"] * decision.quantize
            kept += info["count"] * (not decision.quantize)
    assert quantized > 300_000 and kept > 3_000
    # Every real norm is 1-D, so eligibility keeps it first; DeepSeek-V3.2 has no tensor list in the real data.
    # Unit tests below cover both rows.
    assert {reason for _, reason in HEURISTIC_KEEP_RULES} - reasons == {"norm", "indexer head weights"}
    assert {"matmul weight", "1-D", "bias"} <= reasons


def test_qwen35_fused_experts_are_quantized_and_gated_delta_net_controls_kept() -> None:
    patterns = load_fixture("qwen3.5_35b_a3b_bf16")["patterns"]
    rules = HeuristicRules()
    expected = {
        "model.language_model.layers.N.mlp.experts.gate_up_proj": (True, "matmul weight"),
        "model.language_model.layers.N.mlp.experts.down_proj": (True, "matmul weight"),
        "model.language_model.layers.N.linear_attn.in_proj_qkv.weight": (True, "matmul weight"),
        "model.language_model.layers.N.linear_attn.conv1d.weight": (False, "3-D weight (not a Linear)"),
        "model.language_model.layers.N.linear_attn.in_proj_a.weight": (False, "linear-attention control"),
        "model.visual.patch_embed.proj.weight": (False, "5-D weight (not a Linear)"),
        "model.visual.blocks.N.attn.qkv.weight": (False, "vision tower"),
        "mtp.fc.weight": (False, "MTP fusion projection"),
        "mtp.layers.N.mlp.experts.N.gate_proj.weight": (True, "matmul weight"),
    }
    for pattern, (quantize, reason) in expected.items():
        info = patterns[pattern]
        assert info["quantized"] is quantize
        decision = rules.decide(info["example"], info["dtype"], shape_of(info["ndim"]))
        assert (decision.quantize, decision.reason) == (quantize, reason)


def test_glm45_per_channel_release_differs_only_in_the_mtp_head() -> None:
    """Why GLM-4.5-FP8 is not a parity target: its per-channel scheme also quantizes shared_head.head."""
    fixture = load_fixture("glm_4.5_fp8")
    assert fixture["scheme"] == "per-channel"
    rules = HeuristicRules()
    differing = {
        pattern
        for pattern, info in fixture["patterns"].items()
        if rules.decide(info["example"], info["dtype"], shape_of(info["ndim"])).quantize != info["quantized"]
    }
    assert differing == {"model.layers.N.shared_head.head.weight"}


@pytest.mark.parametrize(("stem", "dtype"), [("deepseek_v3", "F32"), ("qwen3_8b_fp8", "BF16")])
def test_real_releases_differ_in_scale_dtype(stem: str, dtype: str) -> None:
    assert load_fixture(stem)["scale_dtype"] == dtype


# --- fused groups in real releases -----------------------------------------------------------------------------


@pytest.mark.parametrize("stem", [*PARITY, "glm_4.5_fp8"])
def test_real_releases_never_split_a_fused_group(stem: str) -> None:
    patterns = load_fixture(stem)["patterns"]
    quantized = [module_of(p) for p, info in patterns.items() if info["quantized"] and module_of(p)]
    kept = [module_of(p) for p, info in patterns.items() if not info["quantized"] and module_of(p)]
    assert split_fused_groups(quantized, kept) == []
    # Not vacuous: every model has attention or MLP siblings and (except dense Qwen3-8B) experts.
    groups = {fused_group(m) for m in quantized} - {None}
    assert len(groups) >= 2
    assert stem == "qwen3_8b_fp8" or any(g.endswith("experts.*") for g in groups)


def test_real_kimi_index_never_splits_a_fused_group() -> None:
    """The same on real (not generalised) names: the first 2000 entries of Kimi-K2-Instruct's FP8 index."""
    names = list(kimi_trimmed_weight_map())
    source = [n for n in names if not n.endswith("_scale_inv")]
    quantized = [module_of(n) for n in source if f"{n}_scale_inv" in names]
    kept = [module_of(n) for n in source if f"{n}_scale_inv" not in names and module_of(n)]
    assert len(quantized) == 994
    assert split_fused_groups(quantized, kept) == []


def test_fused_group_keys() -> None:
    attention = "model.layers.3.self_attn"
    assert fused_group(f"{attention}.q_proj") == fused_group(f"{attention}.v_proj")
    assert fused_group(f"{attention}.o_proj") is None
    mla = "model.layers.0.self_attn"
    assert fused_group(f"{mla}.q_a_proj") == fused_group(f"{mla}.kv_a_proj_with_mqa") != fused_group(f"{mla}.q_b_proj")
    gdn = "model.language_model.layers.0.linear_attn"
    assert fused_group(f"{gdn}.in_proj_qkv") == fused_group(f"{gdn}.in_proj_z")
    assert fused_group(f"{gdn}.in_proj_a") == fused_group(f"{gdn}.in_proj_b") != fused_group(f"{gdn}.in_proj_z")
    # Every expert of one layer, per-expert or fused, is one group; other layers and shared experts are not.
    moe = "model.layers.5.mlp"
    assert fused_group(f"{moe}.experts.0.gate_proj") == fused_group(f"{moe}.experts.255.down_proj")
    assert fused_group(f"{moe}.experts") == fused_group(f"{moe}.experts.0.gate_proj") == f"{moe}.experts.*"
    assert fused_group(f"{moe}.experts.0.gate_proj") != fused_group("model.layers.6.mlp.experts.0.gate_proj")
    assert fused_group(f"{moe}.shared_experts.gate_proj") == fused_group(f"{moe}.shared_experts.up_proj")
    assert not fused_group(f"{moe}.shared_experts.gate_proj").endswith("experts.*")
    minimax = "model.layers.0.block_sparse_moe.experts.3"
    assert fused_group(f"{minimax}.w1") == fused_group(f"{minimax}.w2") == "model.layers.0.block_sparse_moe.experts.*"
    assert fused_group("model.layers.0.mlp.gate") is None


def test_split_fused_groups_reports_each_split() -> None:
    attention = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    experts = [f"model.layers.1.mlp.experts.{e}.up_proj" for e in range(3)]
    problems = split_fused_groups(
        [*attention, *experts], ["model.layers.0.self_attn.k_proj", "model.layers.1.mlp.experts.7.up_proj"]
    )
    assert len(problems) == 2
    assert "model.layers.0.self_attn.{q_proj,k_proj,v_proj}" in problems[0]
    assert "model.layers.1.mlp.experts.*" in problems[1] and "(3 quantized, 1 kept)" in problems[1]


def test_module_of() -> None:
    assert module_of("model.layers.0.mlp.down_proj.weight") == "model.layers.0.mlp.down_proj"
    assert module_of("model.layers.0.mlp.experts.gate_up_proj") == "model.layers.0.mlp.experts"
    assert module_of("model.layers.0.self_attn.q_proj.bias") is None
    assert module_of("model.layers.0.linear_attn.A_log") is None


def test_rules_and_groups_import_no_torch() -> None:
    """Torch-free commands (inspect, verify, planning) import these modules."""
    code = "import sys, normalize_core.fp8.rules, normalize_core.fp8.groups; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# --- eligibility ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "dtype", "shape", "reason"),
    [
        ("model.layers.0.mlp.down_proj.weight", "BF16", [4096, 12288], None),
        ("model.layers.0.mlp.down_proj.weight", "F16", [4096, 12288], None),
        ("model.layers.0.block_sparse_moe.gate.weight", "F32", [256, 3072], None),  # MiniMax's F32 router
        ("model.layers.0.mlp.experts.gate_up_proj", "BF16", [256, 1024, 2048], None),
        ("model.layers.0.mlp.experts.down_proj", "BF16", [256, 2048, 512], None),
        ("model.layers.0.mlp.experts.down_proj", "BF16", [2048, 512], "fused experts are 2-D, not 3-D"),
        ("model.layers.0.mlp.down_proj.weight", "F8_E4M3", [4096, 12288], "already FP8"),
        ("model.layers.0.mlp.down_proj.weight", "F8_E5M2", [4096, 12288], "already FP8"),
        ("model.layers.0.mlp.down_proj.weight_scale_inv", "F32", [32, 96], "not a weight"),
        ("model.layers.0.mlp.down_proj.weight", "I32", [4096, 12288], "not floating"),
        ("model.layers.0.mlp.down_proj.weight", "BOOL", [4096, 12288], "not floating"),
        ("model.layers.0.mlp.down_proj.weight", "F64", [4096, 12288], "dtype F64"),
        ("model.layers.0.self_attn.q_proj.bias", "BF16", [4096], "bias"),
        ("model.layers.0.input_layernorm.weight", "BF16", [4096], "1-D"),
        ("model.layers.0.linear_attn.A_log", "F32", [32], "1-D"),
        ("model.layers.0.self_attn.rotary_emb.inv_freq", "BF16", [56], "1-D"),
        ("model.layers.0.mlp.gate.e_score_correction_bias", "F32", [256], "1-D"),
        ("model.layers.0.attn.scale", "F32", [], "scalar"),
        ("model.layers.0.mlp.gate_up_proj", "BF16", [1024, 2048], "not a weight"),  # a 2-D fused param not experts
    ],
)
def test_ineligible_reason(name: str, dtype: str, shape: list[int], reason: str | None) -> None:
    assert ineligible_reason(name, dtype, shape) == reason


# --- the heuristic table on names beyond the parity set ---------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "shape", "quantize", "reason"),
    [
        # gate_proj / up_proj are matmuls, the router is the exact segment "gate".
        ("model.layers.0.mlp.gate_proj.weight", [12288, 4096], True, "matmul weight"),
        ("model.layers.0.mlp.gate_up_proj.weight", [24576, 4096], True, "matmul weight"),
        ("model.layers.0.mlp.gate.weight", [128, 4096], False, "router"),
        ("model.layers.0.mlp.router.weight", [128, 2880], False, "router"),
        ("model.layers.0.mlp.shared_expert_gate.weight", [1, 2048], False, "router"),
        # Qwen3-VL (real names from its bf16 list): the whole visual tower, deepstack mergers included.
        ("model.visual.deepstack_merger_list.0.linear_fc1.weight", [4608, 4608], False, "vision tower"),
        ("model.visual.blocks.0.attn.qkv.weight", [3456, 1152], False, "vision tower"),
        ("model.visual.pos_embed.weight", [2304, 1152], False, "vision tower"),
        ("model.language_model.layers.0.mlp.experts.gate_up_proj", [128, 2048, 1536], True, "matmul weight"),
        ("vision_tower.encoder.layers.0.mlp.fc1.weight", [4304, 1152], False, "vision tower"),
        ("multi_modal_projector.linear_1.weight", [4096, 1152], False, "vision tower"),
        ("transformer.wte.weight", [50257, 768], False, "embedding"),
        ("model.layers.61.embed_tokens.weight", [129280, 7168], False, "embedding"),
        ("model.layers.61.shared_head.head.weight", [129280, 7168], False, "lm_head"),
        ("model.layers.61.eh_proj.weight", [7168, 14336], False, "MTP fusion projection"),
        ("model.layers.0.self_attn.norm_proj.weight", [4096, 4096], False, "norm"),
        # DeepSeek-V3.2 indexer: wq_b and wk are FP8 in engines, weights_proj is not.
        ("model.layers.0.self_attn.indexer.weights_proj.weight", [64, 7168], False, "indexer head weights"),
        ("model.layers.0.self_attn.indexer.wq_b.weight", [8192, 1536], True, "matmul weight"),
        ("model.layers.0.self_attn.indexer.wk.weight", [128, 7168], True, "matmul weight"),
        # Mamba-style in_proj is a large matmul; only the gated-delta-net a/b/ba projections are controls.
        ("backbone.layers.0.mixer.in_proj.weight", [8192, 2048], True, "matmul weight"),
        ("backbone.layers.0.mixer.conv1d.weight", [4096, 1, 4], False, "3-D weight (not a Linear)"),
        ("model.layers.0.linear_attn.conv1d.weight", [4096, 4], False, "linear-attention control"),
        ("model.layers.0.linear_attn.in_proj_ba.weight", [64, 2048], False, "linear-attention control"),
    ],
)
def test_heuristic_table(name: str, shape: list[int], quantize: bool, reason: str) -> None:
    assert HeuristicRules().decide(name, "BF16", shape) == Decision(name, quantize, reason)


def test_heuristic_table_is_replaceable() -> None:
    rules = HeuristicRules(keep_rules=[(r"\.o_proj\.", "kept output projection")])
    assert rules.decide("x.o_proj.weight", "BF16", [8, 8]) == Decision(
        "x.o_proj.weight", False, "kept output projection"
    )
    assert rules.decide("lm_head.weight", "BF16", [8, 8]).quantize
    assert rules.decide("a.norm.weight", "BF16", [8]).reason == "1-D"


# --- pattern and skip rules -------------------------------------------------------------------------------------


def test_pattern_rules_quantize_exactly_the_eligible_matches() -> None:
    rules = PatternRules([r"experts\.\d+\.", r"self_attn\.(q|k|v)_proj"])
    assert rules.decide("m.layers.1.mlp.experts.3.w1.weight", "BF16", [8, 8]) == Decision(
        "m.layers.1.mlp.experts.3.w1.weight", True, r"matched --quantize-pattern 'experts\\.\\d+\\.'"
    )
    assert rules.decide("m.layers.1.self_attn.k_proj.weight", "F32", [8, 8]).quantize
    # Replaces the heuristic entirely: an unmatched matmul stays, a matched router is quantized.
    assert rules.decide("m.layers.1.self_attn.o_proj.weight", "BF16", [8, 8]) == Decision(
        "m.layers.1.self_attn.o_proj.weight", False, "no --quantize-pattern matched"
    )
    assert PatternRules(["gate"]).decide("m.mlp.gate.weight", "BF16", [8, 8]).quantize
    # ...but never an ineligible tensor.
    assert rules.decide("m.layers.1.self_attn.q_proj.bias", "BF16", [8]) == Decision(
        "m.layers.1.self_attn.q_proj.bias", False, "bias"
    )
    assert rules.decide("m.layers.1.mlp.experts.3.w1.weight", "F8_E4M3", [8, 8]).reason == "already FP8"


def test_pattern_rules_reject_bad_input() -> None:
    with pytest.raises(ValueError, match=r"invalid --quantize-pattern '\(unclosed'"):
        PatternRules(["ok", "(unclosed"])
    with pytest.raises(ValueError, match="at least one"):
        PatternRules([])


def test_skip_patterns_keep_matches_on_top_of_any_rules() -> None:
    heuristic = with_skip_patterns(HeuristicRules(), [r"layers\.0\.", r"\.o_proj\."])
    assert heuristic.decide("model.layers.0.mlp.down_proj.weight", "BF16", [8, 8]) == Decision(
        "model.layers.0.mlp.down_proj.weight", False, r"matched --skip-pattern 'layers\\.0\\.'"
    )
    assert heuristic.decide("model.layers.1.self_attn.o_proj.weight", "BF16", [8, 8]).reason == (
        r"matched --skip-pattern '\\.o_proj\\.'"
    )
    assert heuristic.decide("model.layers.1.mlp.down_proj.weight", "BF16", [8, 8]).quantize
    # A tensor kept anyway keeps its own, more basic reason.
    assert heuristic.decide("model.layers.0.input_layernorm.weight", "BF16", [8]).reason == "1-D"
    assert heuristic.decide("model.layers.0.mlp.gate.weight", "BF16", [8, 8]).reason == "router"

    patterns = with_skip_patterns(PatternRules(["proj"]), ["down"])
    assert patterns.decide("x.up_proj.weight", "BF16", [8, 8]).quantize
    assert not patterns.decide("x.down_proj.weight", "BF16", [8, 8]).quantize


def test_no_skip_patterns_leave_the_rules_as_they_are() -> None:
    rules = HeuristicRules()
    assert with_skip_patterns(rules, []) is rules
    with pytest.raises(ValueError, match=r"invalid --skip-pattern '\['"):
        with_skip_patterns(rules, ["["])


def test_decide_all_keeps_order() -> None:
    entries = [
        ("model.norm.weight", "BF16", [8]),
        ("model.layers.0.mlp.up_proj.weight", "BF16", [8, 8]),
        ("lm_head.weight", "BF16", [16, 8]),
    ]
    decisions = decide_all(entries, HeuristicRules())
    assert [(d.name, d.quantize) for d in decisions] == [(n, n.endswith("up_proj.weight")) for n, _, _ in entries]


# --- reference rules --------------------------------------------------------------------------------------------


@cache
def kimi_trimmed_weight_map() -> dict[str, str]:
    return json.loads(gzip.decompress((FIXTURES / "kimi_k2_instruct_fp8_trimmed.index.json.gz").read_bytes()))[
        "weight_map"
    ]


def test_reference_rules_from_a_real_index_without_shards(tmp_path: Path) -> None:
    """Kimi-K2-Instruct's real FP8 index (first 2000 entries) as --reference: decisions follow its scales and
    agree with the heuristic; no shard exists, so no scale dtype is known."""
    index = gzip.decompress((FIXTURES / "kimi_k2_instruct_fp8_trimmed.index.json.gz").read_bytes())
    (tmp_path / "model.safetensors.index.json").write_bytes(index)
    reference = ReferenceRules.from_dir(tmp_path)
    assert reference.scale_dtype is None

    patterns = load_fixture("kimi_k2_instruct")["patterns"]
    names = kimi_trimmed_weight_map()
    source = [n for n in names if not n.endswith("_scale_inv")]
    heuristic = HeuristicRules()
    reasons: Counter[str] = Counter()
    for name in source:
        info = patterns[".".join("N" if s.isdigit() else s for s in name.split("."))]
        decision = reference.decide(name, info["dtype"], shape_of(info["ndim"]))
        assert decision.quantize == (f"{name}_scale_inv" in names) == info["quantized"]
        assert decision.quantize == heuristic.decide(name, info["dtype"], shape_of(info["ndim"])).quantize
        reasons[decision.reason] += 1
    # Kept: norms, e_score_correction_bias, inv_freq (1-D), embed_tokens and the router (no scale).
    assert reasons == {"reference has scale": 994, "1-D": 10, "reference has no scale": 2}

    assert reference.compare(source) == ([], [])
    extra = "model.layers.2.mlp.experts.0.gate_proj.weight"
    assert reference.compare([*source[:-1], extra]) == ([extra], [source[-1]])
    assert reference.decide(extra, "BF16", [2048, 7168]) == Decision(extra, False, "not in reference")
    assert reference.decide("model.layers.1.mlp.gate.weight", "BF16", [384, 7168]) == Decision(
        "model.layers.1.mlp.gate.weight", False, "reference has no scale"
    )


def write_fp8_shard(path: Path, names: dict[str, str], scale_dtype: torch.dtype) -> None:
    """A tiny real safetensors file: ``names`` maps each tensor to "fp8" (plus its scale) or "keep"."""
    tensors = {}
    for name, kind in names.items():
        if kind == "fp8":
            tensors[name] = torch.zeros(256, 128, dtype=torch.float8_e4m3fn)
            tensors[f"{name}_scale_inv"] = torch.ones(2, 1, dtype=scale_dtype)
        else:
            tensors[name] = torch.zeros(4, 128, dtype=torch.bfloat16)
    save_file(tensors, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize(("torch_dtype", "dtype"), [(torch.float32, "F32"), (torch.bfloat16, "BF16")])
def test_reference_rules_from_headers_only(tmp_path: Path, torch_dtype: torch.dtype, dtype: str) -> None:
    first = {"m.layers.0.q_proj.weight": "fp8", "m.layers.0.gate.weight": "keep"}
    write_fp8_shard(tmp_path / "a.safetensors", first, torch_dtype)
    write_fp8_shard(
        tmp_path / "b.safetensors", {"m.layers.1.q_proj.weight": "fp8", "lm_head.weight": "keep"}, torch_dtype
    )
    reference = ReferenceRules.from_dir(tmp_path)
    assert reference.scale_dtype == dtype
    assert reference.decide("m.layers.1.q_proj.weight", "BF16", [256, 128]) == Decision(
        "m.layers.1.q_proj.weight", True, "reference has scale"
    )
    assert not reference.decide("m.layers.0.gate.weight", "BF16", [4, 128]).quantize
    # The reference's scale does not make an ineligible source tensor quantizable.
    assert reference.decide("m.layers.1.q_proj.weight", "F8_E4M3", [256, 128]).reason == "already FP8"
    assert reference.compare(["m.layers.0.q_proj.weight", "m.layers.0.gate.weight", "m.layers.2.q_proj.weight"]) == (
        ["m.layers.2.q_proj.weight"],
        ["lm_head.weight", "m.layers.1.q_proj.weight"],
    )


def test_reference_index_reads_the_shards_that_exist_for_scale_dtype(tmp_path: Path) -> None:
    write_fp8_shard(tmp_path / "model-00002-of-00002.safetensors", {"m.layers.1.q_proj.weight": "fp8"}, torch.bfloat16)
    weight_map = {
        "m.layers.0.q_proj.weight": "model-00001-of-00002.safetensors",  # listed, absent: fine
        "m.layers.0.q_proj.weight_scale_inv": "model-00001-of-00002.safetensors",
        "m.layers.1.q_proj.weight": "model-00002-of-00002.safetensors",
        "m.layers.1.q_proj.weight_scale_inv": "model-00002-of-00002.safetensors",
    }
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    reference = ReferenceRules.from_dir(tmp_path)
    assert reference.scale_dtype == "BF16"
    assert reference.decide("m.layers.0.q_proj.weight", "BF16", [256, 128]).quantize


def test_reference_rules_reject_what_is_not_a_block_fp8_reference(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a directory"):
        ReferenceRules.from_dir(tmp_path / "missing")
    with pytest.raises(ValueError, match="no model.safetensors.index.json and no"):
        ReferenceRules.from_dir(tmp_path)

    save_file({"a.weight": torch.zeros(4, 4, dtype=torch.bfloat16)}, str(tmp_path / "bf16.safetensors"))
    with pytest.raises(ValueError, match="not a block-FP8 checkpoint"):
        ReferenceRules.from_dir(tmp_path)

    twice = tmp_path / "twice"
    twice.mkdir()
    write_fp8_shard(twice / "a.safetensors", {"x.weight": "fp8"}, torch.float32)
    write_fp8_shard(twice / "b.safetensors", {"x.weight": "fp8"}, torch.float32)
    with pytest.raises(ValueError, match=r"x\.weight(_scale_inv)? is in both a\.safetensors and b\.safetensors"):
        ReferenceRules.from_dir(twice)

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    write_fp8_shard(mixed / "a.safetensors", {"x.weight": "fp8"}, torch.float32)
    write_fp8_shard(mixed / "b.safetensors", {"y.weight": "fp8"}, torch.bfloat16)
    with pytest.raises(ValueError, match=r"several dtypes: \['BF16', 'F32'\]"):
        ReferenceRules.from_dir(mixed)

    # A reference index is checked by the core's index reader, as every index is.
    for bad_index, kind, message in [
        ("{", "invalid_index", "invalid index: EOF while parsing"),
        ('{"metadata": {}}', "invalid_index", "invalid index: missing field `weight_map`"),
        ('{"weight_map": {"x.weight_scale_inv": "../x.safetensors"}}', "unsafe_shard_name", "not a plain file name"),
        ('{"weight_map": {"x.weight_scale_inv": 3}}', "invalid_index", "is 3, not a file name"),
        ('{"weight_map": {"x.weight_scale_inv": "a", "x.weight_scale_inv": "b"}}', "invalid_index", "listed twice"),
    ]:
        indexed = tmp_path / "indexed"
        indexed.mkdir(exist_ok=True)
        (indexed / "model.safetensors.index.json").write_text(bad_index)
        with pytest.raises(NormalizeError, match=message) as raised:
            ReferenceRules.from_dir(indexed)
        assert (raised.value.kind, raised.value.file) == (kind, str(indexed / "model.safetensors.index.json"))


# --- summary ----------------------------------------------------------------------------------------------------


def test_summarize_groups_by_pattern_and_counts_bytes() -> None:
    entries = [
        ("model.layers.0.self_attn.q_proj.weight", "BF16", [256, 512]),
        ("model.layers.0.input_layernorm.weight", "BF16", [512]),
        ("model.layers.1.self_attn.q_proj.weight", "BF16", [256, 512]),
        ("model.layers.1.input_layernorm.weight", "BF16", [512]),
        ("model.layers.1.mlp.experts.gate_up_proj", "BF16", [4, 300, 512]),
        ("model.layers.1.mlp.gate.weight", "F32", [4, 512]),
        ("lm_head.weight", "BF16", [1000, 512]),
    ]
    itemsize = {"BF16": 2, "F32": 4}
    sizes = {name: math.prod(shape) * itemsize[dtype] for name, dtype, shape in entries}
    shapes = {name: shape for name, _, shape in entries}
    rules = with_skip_patterns(HeuristicRules(), ["layers\\.1\\.self_attn"])
    decisions = decide_all(entries, rules)
    layouts = {d.name: quantized_layout(d.name, shapes[d.name]) for d in decisions if d.quantize}
    rows = summarize(decisions, sizes, layouts)

    q_proj = 256 * 512 * 2
    assert rows == [
        {
            "pattern": "model.layers.N.self_attn.q_proj.weight",
            "quantize": True,
            "reason": "matmul weight",
            "count": 1,
            "bytes": q_proj,
            # Half of a bf16 weight, less its 2x4 float32 scale.
            "bytes_saved": q_proj // 2 - 2 * 4 * 4,
        },
        {
            "pattern": "model.layers.N.input_layernorm.weight",
            "quantize": False,
            "reason": "1-D",
            "count": 2,
            "bytes": 2 * 512 * 2,
            "bytes_saved": 0,
        },
        {
            "pattern": "model.layers.N.self_attn.q_proj.weight",
            "quantize": False,
            "reason": "matched --skip-pattern 'layers\\\\.1\\\\.self_attn'",
            "count": 1,
            "bytes": q_proj,
            "bytes_saved": 0,
        },
        {
            "pattern": "model.layers.N.mlp.experts.gate_up_proj",
            "quantize": True,
            "reason": "matmul weight",
            "count": 1,
            "bytes": 4 * 300 * 512 * 2,
            # Its halves (150 rows) are not whole blocks, so each is tiled on its own, as to-fp8 writes it:
            # per expert 2 x ceil(150/128) x ceil(512/128) = 4 x 4 scales.
            "bytes_saved": 4 * 300 * 512 - 4 * 4 * 4 * 4,
        },
        {
            "pattern": "model.layers.N.mlp.gate.weight",
            "quantize": False,
            "reason": "router",
            "count": 1,
            "bytes": 4 * 512 * 4,
            "bytes_saved": 0,
        },
        {
            "pattern": "lm_head.weight",
            "quantize": False,
            "reason": "lm_head",
            "count": 1,
            "bytes": 1000 * 512 * 2,
            "bytes_saved": 0,
        },
    ]


def test_summarize_an_f32_weight_saves_three_quarters() -> None:
    name = "model.layers.0.mlp.down_proj.weight"
    layouts = {name: quantized_layout(name, [128, 128])}
    rows = summarize([Decision(name, True, "matmul weight")], {name: 128 * 128 * 4}, layouts)
    assert rows[0]["bytes_saved"] == 128 * 128 * 3 - 4
