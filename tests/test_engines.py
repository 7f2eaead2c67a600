"""The engine model (``normalize_core.engines``) on synthetic weight lists: which layers vLLM/SGLang build, and
whether each loads at a TP size. Every expected verdict below is worked out by hand from the engines' rules as
the issue and DESIGN quote them (``validate_fp8_block_shape``, ``Fp8MoEMethod.create_weights``, the even
splits of ``QKVParallelLinear``), never taken from the code under test."""

from __future__ import annotations

import pytest

from normalize_core.engines import (
    Engine,
    LayerKind,
    Parallelism,
    architecture_of,
    engine_layers,
    layer_problem,
    mtp_findings,
)
from normalize_core.engines.loadability import KeptToLoad, keep_unloadable, kept_layers
from normalize_core.fp8.rules import Decision

QWEN3 = {
    "architectures": ["Qwen3ForCausalLM"],
    "hidden_size": 256,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 128,
}


def dense_layer(prefix: str, intermediate: int, hidden: int = 256, q_rows: int = 512, kv_rows: int = 256):
    """Weights (name, shape) of one Llama/Qwen3-style decoder layer."""
    return [
        (f"{prefix}.self_attn.q_proj.weight", [q_rows, hidden]),
        (f"{prefix}.self_attn.k_proj.weight", [kv_rows, hidden]),
        (f"{prefix}.self_attn.v_proj.weight", [kv_rows, hidden]),
        (f"{prefix}.self_attn.o_proj.weight", [hidden, q_rows]),
        (f"{prefix}.mlp.gate_proj.weight", [intermediate, hidden]),
        (f"{prefix}.mlp.up_proj.weight", [intermediate, hidden]),
        (f"{prefix}.mlp.down_proj.weight", [hidden, intermediate]),
        (f"{prefix}.input_layernorm.weight", [hidden]),
    ]


def layers_of(weights, config, fp8=True):
    return {layer.name: layer for layer in engine_layers(((n, s, fp8) for n, s in weights), architecture_of(config))}


def loads(layer, tp, **kwargs) -> bool:
    return layer_problem(layer, Parallelism(tp, **kwargs)) is None


def test_qwen3_layers_are_merged_and_split_as_vllm_builds_them():
    layers = layers_of(dense_layer("model.layers.0", 512), QWEN3)
    assert set(layers) == {
        "model.layers.0.self_attn.qkv_proj",
        "model.layers.0.self_attn.o_proj",
        "model.layers.0.mlp.gate_up_proj",
        "model.layers.0.mlp.down_proj",
    }
    qkv = layers["model.layers.0.self_attn.qkv_proj"]
    assert qkv.kind is LayerKind.QKV and qkv.heads == (4, 2, 128) and qkv.output_sizes == (512, 256, 256)
    assert layers["model.layers.0.mlp.gate_up_proj"].kind is LayerKind.MERGED_COLUMN
    assert layers["model.layers.0.mlp.gate_up_proj"].weights == (
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.0.mlp.up_proj.weight",
    )
    assert layers["model.layers.0.mlp.down_proj"].kind is LayerKind.ROW
    assert layers["model.layers.0.self_attn.o_proj"].kind is LayerKind.ROW


def test_a_ragged_merged_partition_fails_at_tp1_unless_it_is_the_last():
    gate_up = layers_of(dense_layer("m.layers.0", 576), QWEN3)["m.layers.0.mlp.gate_up_proj"]
    # gate_proj (576 rows, 4.5 blocks) is not the last partition of gate_up_proj: refused even at TP 1.
    problem = layer_problem(gate_up, Parallelism(1))
    assert problem is not None and problem.fp8_only
    assert "gate_proj partition" in problem.message and "576" in problem.message and "block_n 128" in problem.message
    assert "ceil(1152/128) = 9" in problem.message
    # Unquantized, the same layer loads.
    bf16 = layers_of(dense_layer("m.layers.0", 576), QWEN3, fp8=False)["m.layers.0.mlp.gate_up_proj"]
    assert loads(bf16, 1) and loads(bf16, 2)
    # v_proj is the last q/k/v partition: 1 KV head of 64 rows at TP 1 is allowed there, not in k_proj.
    small_heads = {**QWEN3, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 64}
    qkv = layers_of(dense_layer("m.layers.0", 512, q_rows=256, kv_rows=64), small_heads)[
        "m.layers.0.self_attn.qkv_proj"
    ]
    assert qkv.heads == (4, 1, 64)
    assert "k_proj" in layer_problem(qkv, Parallelism(1)).message


def test_row_and_column_layers_are_checked_only_when_split():
    layers = layers_of(dense_layer("m.layers.0", 576), QWEN3)
    down = layers["m.layers.0.mlp.down_proj"]
    # Row-parallel K = 576: no check at TP 1; 288 per rank at TP 2 is not whole blocks; TP 3 splits 192 (no).
    assert loads(down, 1)
    assert "input partition 576/2 = 288" in layer_problem(down, Parallelism(2)).message
    assert not loads(down, 4)
    # 1024 rows of a lone column layer: 512 per rank at TP 2 loads, 128 at TP 8 loads, 64 at TP 16 does not.
    column = layers_of([("m.layers.0.self_attn.kv_b_proj.weight", [1024, 512])], {})["m.layers.0.self_attn.kv_b_proj"]
    assert column.kind is LayerKind.COLUMN
    assert loads(column, 2) and loads(column, 8) and not loads(column, 16)
    assert "output partition 1024/16 = 64" in layer_problem(column, Parallelism(16)).message


def test_qkv_heads_split_and_kv_heads_replicate():
    # Qwen3-235B: 64 query heads, 4 KV heads of 128. TP 8 replicates the KV heads (1 head of 128 rows per rank).
    config = {**QWEN3, "num_attention_heads": 64, "num_key_value_heads": 4}
    qkv = layers_of(dense_layer("m.layers.0", 512, hidden=4096, q_rows=8192, kv_rows=512), config)
    qkv = qkv["m.layers.0.self_attn.qkv_proj"]
    assert all(loads(qkv, tp) for tp in (1, 2, 4, 8, 16, 32, 64))
    # 64 query heads do not split over 128 ranks.
    assert "num_attention_heads 64" in layer_problem(qkv, Parallelism(128)).message
    # 48 query heads split over 6 ranks, but 6 ranks cannot share 4 KV heads evenly.
    config = {**QWEN3, "num_attention_heads": 48, "num_key_value_heads": 4}
    qkv = layers_of(dense_layer("m.layers.0", 512, hidden=4096, q_rows=6144, kv_rows=512), config)
    assert "num_key_value_heads 4" in layer_problem(qkv["m.layers.0.self_attn.qkv_proj"], Parallelism(6)).message
    # head_dim 64, 8 KV heads at TP 8: one 64-row KV head per rank is not a whole block.
    small = {**QWEN3, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64}
    qkv = layers_of(dense_layer("m.layers.0", 512, hidden=2048, q_rows=2048, kv_rows=512), small)
    qkv = qkv["m.layers.0.self_attn.qkv_proj"]
    assert loads(qkv, 4)  # 2 KV heads x 64 = 128 rows per rank
    assert "k_proj rows per rank (1 heads x 64)" in layer_problem(qkv, Parallelism(8)).message


def test_gated_attention_counts_the_output_gate_in_q_proj():
    # Qwen3-Next: q_proj holds 2 x 16 heads x 256 rows (queries and the output gate).
    config = {"architectures": ["Qwen3NextForCausalLM"], "num_attention_heads": 16, "num_key_value_heads": 2}
    config["head_dim"] = 256
    weights = dense_layer("model.layers.3", 512, hidden=2048, q_rows=8192, kv_rows=512)
    qkv = layers_of(weights, config)["model.layers.3.self_attn.qkv_proj"]
    assert qkv.heads == (32, 2, 256)
    assert loads(qkv, 16) and not loads(qkv, 32)  # num_attention_heads 16 is what TP splits


def test_fused_moe_intermediate_size_per_partition():
    experts = [
        (f"model.layers.0.mlp.experts.{e}.{role}.weight", shape)
        for e in range(4)
        for role, shape in (("gate_proj", [1536, 4096]), ("up_proj", [1536, 4096]), ("down_proj", [4096, 1536]))
    ]
    moe = layers_of(experts, {})["model.layers.0.mlp.experts"]
    assert moe.kind is LayerKind.FUSED_MOE and moe.experts == 4 and moe.intermediate == 1536 and len(moe.weights) == 12
    # Qwen3-235B-A22B: 1536 / 8 = 192 is not a multiple of 128; 1536 / 4 = 384 is.
    assert loads(moe, 1) and loads(moe, 2) and loads(moe, 4)
    problem = layer_problem(moe, Parallelism(8))
    assert "1536/8 = 192" in problem.message and "block_n 128" in problem.message and problem.fp8_only
    # Expert parallelism keeps whole experts per rank: the full 1536 is per partition.
    assert loads(moe, 8, expert_parallel=True)
    # SGLang spreads experts evenly or not at all: 4 experts over 8 ranks fail there, not in vLLM.
    assert not loads(moe, 8, expert_parallel=True, engine=Engine.SGLANG)
    assert loads(moe, 4, expert_parallel=True, engine=Engine.SGLANG)


def test_fused_3d_experts_and_minimax_w1_w3_w2():
    fused = [
        ("model.language_model.layers.0.mlp.experts.gate_up_proj", [8, 1024, 2048]),
        ("model.language_model.layers.0.mlp.experts.down_proj", [8, 2048, 512]),
    ]
    moe = layers_of(fused, {})["model.language_model.layers.0.mlp.experts"]
    assert (moe.experts, moe.intermediate) == (8, 512)
    assert loads(moe, 4) and not loads(moe, 8)  # 512 / 8 = 64
    minimax = [
        (f"model.layers.0.block_sparse_moe.experts.{e}.{w}.weight", shape)
        for e in range(2)
        for w, shape in (("w1", [1536, 3072]), ("w3", [1536, 3072]), ("w2", [3072, 1536]))
    ]
    minimax += [("model.layers.0.block_sparse_moe.gate.weight", [2, 3072])]
    layers = layers_of(minimax, {})
    assert layers["model.layers.0.block_sparse_moe.experts"].intermediate == 1536
    assert layers["model.layers.0.block_sparse_moe.gate"].kind is LayerKind.REPLICATED


def test_mla_projections():
    config = {"architectures": ["DeepseekV3ForCausalLM"], "num_attention_heads": 128}
    weights = [
        ("model.layers.0.self_attn.q_a_proj.weight", [1536, 7168]),
        ("model.layers.0.self_attn.kv_a_proj_with_mqa.weight", [576, 7168]),
        ("model.layers.0.self_attn.q_b_proj.weight", [24576, 1536]),
        ("model.layers.0.self_attn.kv_b_proj.weight", [32768, 512]),
        ("model.layers.0.self_attn.o_proj.weight", [7168, 16384]),
    ]
    layers = layers_of(weights, config)
    fused = layers["model.layers.0.self_attn.fused_qkv_a_proj"]
    # Merged but replicated: q_lora_rank 1536 is whole blocks, the last (576) may be ragged, at every TP.
    assert fused.kind is LayerKind.MERGED_REPLICATED and all(loads(fused, tp) for tp in (1, 8, 32))
    assert layers["model.layers.0.self_attn.q_b_proj"].kind is LayerKind.COLUMN
    assert layers["model.layers.0.self_attn.kv_b_proj"].kind is LayerKind.COLUMN
    assert all(loads(layer, 32) for layer in layers.values())  # 4 heads per rank: 768, 1024 and 512 rows
    assert not loads(layers["model.layers.0.self_attn.q_b_proj"], 256)  # 128 heads over 256 ranks
    # A q_lora_rank of 1000 rows is a ragged first partition of the merged, replicated layer.
    ragged = layers_of([(n, [1000, 7168] if "q_a_proj" in n else s) for n, s in weights], config)
    assert not loads(ragged["model.layers.0.self_attn.fused_qkv_a_proj"], 1)
    # DeepSeek-V2-Lite has no q LoRA: q_proj alone is column-parallel, kv_a_proj_with_mqa alone replicated.
    lite = layers_of(
        [
            ("m.layers.0.self_attn.q_proj.weight", [3072, 2048]),
            ("m.layers.0.self_attn.kv_a_proj_with_mqa.weight", [576, 2048]),
        ],
        {},
    )
    assert lite["m.layers.0.self_attn.q_proj"].kind is LayerKind.COLUMN
    assert lite["m.layers.0.self_attn.kv_a_proj_with_mqa"].kind is LayerKind.REPLICATED


def test_qwen35_in_proj_qkv_and_z_are_four_partitions():
    config = {
        "architectures": ["Qwen3_5MoeForConditionalGeneration"],
        "text_config": {
            "linear_num_key_heads": 16,
            "linear_num_value_heads": 32,
            "linear_key_head_dim": 128,
            "linear_value_head_dim": 128,
        },
    }
    weights = [
        ("model.language_model.layers.0.linear_attn.in_proj_qkv.weight", [8192, 2048]),
        ("model.language_model.layers.0.linear_attn.in_proj_z.weight", [4096, 2048]),
        ("model.language_model.layers.0.linear_attn.out_proj.weight", [2048, 4096]),
    ]
    layers = layers_of(weights, config)
    qkvz = layers["model.language_model.layers.0.linear_attn.in_proj_qkvz"]
    assert qkvz.output_sizes == (2048, 2048, 4096, 4096) and qkvz.partition_labels == ("q", "k", "v", "z")
    assert loads(qkvz, 16)  # 128, 128, 256, 256 rows per rank
    assert "linear_num_key_heads 16" in layer_problem(qkvz, Parallelism(32)).message
    assert (
        "linear_num_key_heads 16"
        in layer_problem(layers["model.language_model.layers.0.linear_attn.out_proj"], Parallelism(32)).message
    )


def test_unclassified_fp8_layers_are_checked_both_ways_and_vocab_never_fails():
    layers = layers_of([("model.foo.mixer.weight", [256, 200]), ("lm_head.weight", [1000, 256])], {})
    mixer = layers["model.foo.mixer"]
    assert mixer.kind is LayerKind.UNCLASSIFIED
    assert loads(mixer, 1) and not loads(mixer, 2)  # K 200 / 2 = 100 would fail as row-parallel
    assert layers["lm_head"].kind is LayerKind.VOCAB and loads(layers["lm_head"], 64)


def test_mtp_layers_against_the_config():
    deepseek = architecture_of({"num_hidden_layers": 2, "num_nextn_predict_layers": 1})
    names = ["model.layers.0.mlp.down_proj.weight", "model.layers.1.x.weight", "model.layers.2.eh_proj.weight"]
    assert mtp_findings(deepseek, names) == []
    # A layer beyond the declared ones has nowhere to go.
    undeclared = architecture_of({"num_hidden_layers": 2, "num_nextn_predict_layers": 0})
    [(severity, message)] = mtp_findings(undeclared, names)
    assert severity == "error" and message.startswith("model.layers.2 is beyond num_hidden_layers 2")
    # Declared but absent: serving works, MTP speculative decoding does not.
    [(severity, message)] = mtp_findings(deepseek, names[:2])
    assert severity == "warning" and "declares 1 MTP layers" in message
    qwen35 = architecture_of({"text_config": {"num_hidden_layers": 2, "mtp_num_hidden_layers": 1}})
    assert mtp_findings(qwen35, ["mtp.layers.0.mlp.gate.weight", "model.layers.1.x.weight"]) == []
    assert mtp_findings(qwen35, ["model.layers.1.x.weight"])[0][0] == "warning"


class Entry:
    """The two attributes of a ``TensorEntry`` that ``keep_unloadable`` reads."""

    def __init__(self, name: str, shape: list[int]):
        self.name, self.shape = name, shape


def decisions_for(weights):
    entries = [Entry(n, s) for n, s in weights]
    decisions = [Decision(n, len(s) == 2, "matmul weight" if len(s) == 2 else "1-D") for n, s in weights]
    return entries, decisions


def test_to_fp8_keeps_a_ragged_mlp_whole_and_nothing_else():
    weights = dense_layer("model.layers.0", 576) + dense_layer("model.layers.1", 512)
    entries, decisions = decisions_for(weights)
    decided = keep_unloadable(entries, decisions, QWEN3, (1,))
    kept = {d.name for d in decided if isinstance(d, KeptToLoad)}
    assert kept == {
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
    }
    assert all(not d.quantize and d.reason == "vLLM cannot load it as FP8 at TP 1" for d in decided if d.name in kept)
    assert [d.quantize for d in decided if d.name not in kept] == [d.quantize for d in decisions if d.name not in kept]
    layers = kept_layers(decided)
    assert list(layers) == ["model.layers.0.mlp.gate_up_proj", "model.layers.0.mlp.down_proj"]
    assert "576 rows is not a multiple of block_n 128" in layers["model.layers.0.mlp.gate_up_proj"].problem


def test_to_fp8_tp_sizes_extend_the_rule_and_bad_sizes_are_refused():
    experts = [
        (f"model.layers.0.mlp.experts.{e}.{role}.weight", shape)
        for e in range(2)
        for role, shape in (("gate_proj", [1536, 512]), ("up_proj", [1536, 512]), ("down_proj", [512, 1536]))
    ]
    entries, decisions = decisions_for(experts)
    assert not any(isinstance(d, KeptToLoad) for d in keep_unloadable(entries, decisions, {}, (1, 4)))
    at_8 = keep_unloadable(entries, decisions, {}, (1, 8))
    assert all(isinstance(d, KeptToLoad) and d.tp == 8 and "1536/8 = 192" in d.problem for d in at_8)
    with pytest.raises(ValueError, match="TP sizes must be positive"):
        keep_unloadable(entries, decisions, {}, (0,))
