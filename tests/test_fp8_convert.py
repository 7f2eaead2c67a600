"""``to-fp8`` end to end on real files: layouts (auto-repack, --no-repack, --repack, standard and
single-file sources), the bytes written, reference mode, user patterns, ue8m0 and bfloat16 scales,
dry runs, refused inputs and a failing write."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from builders import MOE_AUX_FILES, moe_tensors, read_tensors, write_checkpoint
from normalize_core import NormalizeError, verify_checkpoint
from normalize_core.cli import app
from normalize_core.fp8.convert import plan_fp8, to_fp8
from normalize_core.fp8.quantize import quantize_block_fp8

runner = CliRunner()


def fused_halves(name: str) -> bool:
    return name.endswith("gate_up_proj")


def only_the_ragged_experts_fail_to_load(report) -> bool:
    """``moe_tensors``' experts have intermediate sizes of 200 and 192 rows, which vLLM's fused-MoE loader
    refuses as FP8 (not whole blocks); quantized anyway with ``allow_unloadable``, they are the only errors
    ``verify`` may report."""
    errors = [message for severity, message in report.findings if severity == "error"]
    return bool(errors) and all(
        message.startswith("vLLM cannot load it at TP 1: ") and "experts (fused MoE)" in message for message in errors
    )


@pytest.mark.parametrize("layout", ["engine", "single", "indexed"])
def test_bytes_layout_config_and_verify(tmp_path, layout):
    tensors = moe_tensors()
    source = write_checkpoint(tmp_path / "src", tensors, layout=layout, aux=MOE_AUX_FILES)
    # allow_unloadable: the ragged experts are quantized too, so their tilings are checked byte for byte.
    result = to_fp8(source, tmp_path / "out", device="cpu", max_shard_bytes=300_000, allow_unloadable=True)
    out = tmp_path / "out"
    files = sorted(p.name for p in out.glob("*.safetensors"))
    if layout == "engine":
        assert files == [f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)]
        assert len(files) > 1, "engine names are bin-packed at the shard limit"
        assert result.shards == files, "bin-packed shards are numbered in write order"
    elif layout == "single":
        assert files == ["model.safetensors"]
    else:
        assert files == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert sorted(result.shards) == files, "the result names exactly the shards written"

    written = read_tensors(out)
    quantized = {n[: -len("_scale_inv")] for n in written if n.endswith("_scale_inv")}
    for name, source_tensor in tensors.items():
        if name in quantized:
            q, s = quantize_block_fp8(source_tensor, split_halves=fused_halves(name))
            assert written[name].dtype == torch.float8_e4m3fn
            assert torch.equal(written[name].view(torch.uint8), q.view(torch.uint8)), name
            assert torch.equal(written[name + "_scale_inv"], s), name
        else:
            assert written[name].dtype == source_tensor.dtype
            assert torch.equal(written[name].view(torch.uint8), source_tensor.view(torch.uint8)), name
    assert set(written) == set(tensors) | {n + "_scale_inv" for n in quantized}
    assert written["model.layers.1.mlp.shared.experts.gate_up_proj_scale_inv"].shape == (3, 4, 2)
    assert written["model.layers.1.mlp.shared.experts.down_proj_scale_inv"].shape == (3, 2, 2)

    assert quantized == {n for n in tensors if (".self_attn." in n and n.endswith("proj.weight")) or ".experts." in n}
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in written.values())
    config = json.loads((out / "config.json").read_text())
    assert list(config) == ["model_type", "hidden_size", "quantization_config"]
    skip = set(config["quantization_config"]["modules_to_not_convert"])
    assert skip == {
        "model.embed_tokens",
        "lm_head",
        "model.norm",
        "model.layers.0.input_layernorm",
        "model.layers.1.input_layernorm",
        "model.layers.0.mlp.gate",
        "model.layers.1.mlp.gate",
    }
    assert (out / "tokenizer.json").exists()
    report = verify_checkpoint(out)
    assert only_the_ragged_experts_fail_to_load(report), report.findings


def test_no_repack_keeps_engine_names_and_repack_forces_standard(tmp_path):
    source = write_checkpoint(tmp_path / "src", moe_tensors(), layout="engine", aux=MOE_AUX_FILES)
    to_fp8(source, tmp_path / "kept", device="cpu", repack=False)
    assert sorted(p.name for p in (tmp_path / "kept").glob("*.safetensors")) == sorted(
        p.name for p in source.glob("*.safetensors")
    )
    assert verify_checkpoint(tmp_path / "kept").ok

    standard = write_checkpoint(tmp_path / "std", moe_tensors(), layout="indexed", aux=MOE_AUX_FILES)
    to_fp8(standard, tmp_path / "packed", device="cpu", repack=True, max_shard_bytes=10**9)
    assert [p.name for p in (tmp_path / "packed").glob("*.safetensors")] == ["model-00001-of-00001.safetensors"]


def test_reference_mode_follows_the_reference_names_and_scale_dtype(tmp_path):
    tensors = moe_tensors()
    source = write_checkpoint(tmp_path / "src", tensors, layout="indexed", aux=MOE_AUX_FILES)
    # A reference that quantized only q_proj and o_proj, with bfloat16 scales (as Qwen's releases).
    reference = tmp_path / "ref"
    reference.mkdir()
    chosen = [n for n in tensors if n.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"))]
    ref_tensors = {n: torch.zeros(1, dtype=torch.bfloat16) for n in tensors}
    ref_tensors |= {n + "_scale_inv": torch.ones(1, 1, dtype=torch.bfloat16) for n in chosen}
    save_file(ref_tensors, reference / "model.safetensors")
    to_fp8(source, tmp_path / "out", device="cpu", reference=reference)
    written = read_tensors(tmp_path / "out")
    assert {n for n in written if n.endswith("_scale_inv")} == {n + "_scale_inv" for n in chosen}
    assert all(written[n + "_scale_inv"].dtype == torch.bfloat16 for n in chosen)
    assert verify_checkpoint(tmp_path / "out").ok


def test_patterns_replace_the_heuristic_and_skips_apply_on_top(tmp_path):
    source = write_checkpoint(tmp_path / "src", moe_tensors(), layout="indexed", aux=MOE_AUX_FILES)
    plan = plan_fp8(source, quantize_patterns=[r"\.experts\."], allow_unloadable=True)
    assert set(plan.quantized) == {n for n in moe_tensors() if ".experts." in n}
    plan = plan_fp8(source, skip_patterns=[r"layers\.1\."])
    assert plan.quantized and not any(".layers.1." in n for n in plan.quantized)


def test_splitting_a_fused_group_is_an_error_naming_the_modules(tmp_path):
    source = write_checkpoint(tmp_path / "src", moe_tensors(), layout="indexed", aux=MOE_AUX_FILES)
    with pytest.raises(NormalizeError, match=r"model\.layers\.0\.self_attn\.\{q_proj,k_proj,v_proj\}") as raised:
        plan_fp8(source, skip_patterns=[r"layers\.0\.self_attn\.k_proj"])
    assert raised.value.kind == "split_fused_group"
    with pytest.raises(NormalizeError, match="experts"):
        plan_fp8(source, skip_patterns=[r"layers\.0\.mlp\.experts\.0\.down_proj"], allow_unloadable=True)


def test_ue8m0_scales_are_powers_of_two_and_declared(tmp_path):
    source = write_checkpoint(tmp_path / "src", moe_tensors(), layout="indexed", aux=MOE_AUX_FILES)
    to_fp8(source, tmp_path / "out", device="cpu", scale_fmt="ue8m0")
    written = read_tensors(tmp_path / "out")
    scales = [t for n, t in written.items() if n.endswith("_scale_inv")]
    assert scales and all(bool((torch.log2(s) == torch.round(torch.log2(s))).all()) for s in scales)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"]["scale_fmt"] == "ue8m0"
    assert verify_checkpoint(tmp_path / "out").ok


def test_bfloat16_scales_on_request(tmp_path):
    source = write_checkpoint(tmp_path / "src", moe_tensors(), layout="indexed", aux=MOE_AUX_FILES)
    to_fp8(source, tmp_path / "out", device="cpu", scale_dtype="bfloat16")
    written = read_tensors(tmp_path / "out")
    q, s = quantize_block_fp8(moe_tensors()["model.layers.0.self_attn.q_proj.weight"], scale_dtype=torch.bfloat16)
    assert torch.equal(written["model.layers.0.self_attn.q_proj.weight_scale_inv"], s)
    assert "scale_fmt" not in json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]


def test_dry_run_prints_decisions_and_writes_nothing(tmp_path):
    source = write_checkpoint(tmp_path / "src", moe_tensors(), layout="engine", aux=MOE_AUX_FILES)
    result = runner.invoke(app, ["to-fp8", "-s", str(source), "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    decisions = json.loads(result.stdout)
    assert decisions["quantize"] == sorted(decisions["quantize"])
    assert set(decisions["quantize"]) | set(decisions["keep"]) == set(moe_tensors())
    assert "model.layers.0.mlp.gate.weight" in decisions["keep"]
    table = runner.invoke(app, ["to-fp8", "-s", str(source), "-o", str(tmp_path / "out"), "--dry-run"])
    assert table.exit_code == 0 and "tensors to FP8" in table.stdout
    assert not (tmp_path / "out").exists()


def test_an_fp8_source_is_refused(tmp_path):
    source = write_checkpoint(tmp_path / "src", moe_tensors(), layout="indexed", aux=MOE_AUX_FILES)
    to_fp8(source, tmp_path / "fp8", device="cpu")
    result = runner.invoke(app, ["to-fp8", "-s", str(tmp_path / "fp8"), "-o", str(tmp_path / "again")])
    assert result.exit_code == 2
    assert "already quantized" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "again").exists()


def test_a_failed_write_exits_non_zero_and_leaves_no_index(tmp_path):
    source = write_checkpoint(tmp_path / "src", moe_tensors(), layout="engine", aux=MOE_AUX_FILES)
    out = tmp_path / "out"
    script = textwrap.dedent(
        f"""
        import resource, sys
        from normalize_core.cli import main
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
        sys.argv = ["normalize", "to-fp8", "-s", {str(source)!r}, "-o", {str(out)!r}, "--device", "cpu",
                    "--max-shard-size", "1MB"]
        main()
        """
    )
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert completed.returncode != 0
    assert "File too large" in completed.stderr or "error" in completed.stderr
    assert not (out / "model.safetensors.index.json").exists()
    assert not list(out.glob("*.safetensors")) if out.exists() else True
    assert not [p for p in out.iterdir() if ".partial-" in p.name] if out.exists() else True


def test_cpu_conversion_never_imports_torch(tmp_path):
    source = write_checkpoint(tmp_path / "src", moe_tensors(), layout="engine", aux=MOE_AUX_FILES)
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "torch.py").write_text("raise ImportError('torch must not be imported on the CPU path')\n")
    env = {**os.environ, "PYTHONPATH": f"{blocker}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "normalize_core",
            "to-fp8",
            "-s",
            str(source),
            "-o",
            str(tmp_path / "out"),
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert completed.returncode == 0, completed.stderr
    assert verify_checkpoint(tmp_path / "out").ok


def test_scale_shapes_follow_the_block_size(tmp_path):
    source = write_checkpoint(tmp_path / "src", moe_tensors(), layout="single", aux=MOE_AUX_FILES)
    to_fp8(source, tmp_path / "out", device="cpu", block_size=64, allow_unloadable=True)
    written = read_tensors(tmp_path / "out")
    w = written["model.layers.0.mlp.experts.0.gate_proj.weight"]
    assert list(written["model.layers.0.mlp.experts.0.gate_proj.weight_scale_inv"].shape) == [
        math.ceil(d / 64) for d in w.shape
    ]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"]["weight_block_size"] == [64, 64]
    report = verify_checkpoint(tmp_path / "out")
    assert only_the_ragged_experts_fail_to_load(report), report.findings


def test_torch_quantizer_writes_the_same_bytes_as_the_kernel(tmp_path):
    """The GPU path's loader and torch arithmetic, run on the CPU, produce the kernel's bytes."""
    from normalize_core.fp8.quantizers import KernelQuantizer, TorchQuantizer

    source = write_checkpoint(tmp_path / "src", moe_tensors(), layout="single", aux=MOE_AUX_FILES)
    fp8 = plan_fp8(source, scale_fmt="ue8m0", scale_dtype="bfloat16")
    kernel = KernelQuantizer(fp8.checkpoint, fp8.scale_fmt)
    torch_path = TorchQuantizer(fp8.checkpoint, fp8.scale_fmt, "cpu")
    for name, layout in fp8.layouts.items():
        expected = kernel.quantize(kernel.load(name), layout)
        produced = torch_path.quantize(torch_path.load(name), layout)
        assert bytes(produced[0]) == bytes(expected[0]), name
        assert bytes(produced[1]) == bytes(expected[1]), name
