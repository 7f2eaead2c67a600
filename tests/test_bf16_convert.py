"""``to-bf16`` end to end on real files: both scale forms, a weight whose scale sits in another shard,
3-D experts and fused halves, float32/bfloat16/power-of-two scales, every output dtype, the layouts
(kept, bin-packed, --repack/--no-repack), config.json and the index, the round trip through to-fp8,
to-fp8 accepting the output, dry runs, the GPU path's arithmetic on the CPU, and no torch on the CPU."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from bf16_util import (
    FP8_CONFIG,
    compressed_tensors_config,
    dequantize_reference,
    fp8_tensor,
    output_bytes,
    random_codes,
    random_scales,
    reference_quantize_dequantize,
    write_checkpoint,
)
from builders import engine_shard_name, read_tensors
from cli_util import run_normalize
from normalize_core import plan_bf16, to_bf16, to_fp8, verify_checkpoint
from normalize_core.cli import app

runner = CliRunner()

SOURCE_CONFIG = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": 256}


def rand(shape, seed, dtype=torch.bfloat16) -> torch.Tensor:
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.05).to(dtype)


class Release:
    """A small DeepSeek-style block-FP8 release in two shards, built from random codes and scales (so
    only the numpy reference says what its weights dequantize to)."""

    #: FP8 weights: shape, fused halves, shard (0 or 1) of the weight, shard of its scale.
    FP8 = {
        "model.layers.0.self_attn.q_proj.weight": ((300, 256), False, 0, 1),  # scale in the other shard
        "model.layers.0.self_attn.o_proj.weight": ((256, 200), False, 0, 0),
        "model.layers.0.mlp.experts.gate_up_proj": ((3, 384, 256), True, 1, 1),  # halves of 192 rows
        "model.layers.0.mlp.experts.down_proj": ((3, 256, 192), False, 1, 1),
        "model.layers.0.mlp.shared_experts.up_proj.weight": ((129, 1), False, 1, 1),
    }

    def __init__(self, scale_kind: str = "float32", seed: int = 0):
        self.shards: list[dict[str, torch.Tensor]] = [
            {
                "model.embed_tokens.weight": rand((300, 256), seed),
                "model.layers.0.input_layernorm.weight": rand((256,), seed + 1),
                "model.layers.0.mlp.gate.weight": rand((4, 256), seed + 2),
                "model.layers.0.mlp.gate.e_score_correction_bias": rand((4,), seed + 3, torch.float32),
            },
            {"model.norm.weight": rand((256,), seed + 4), "lm_head.weight": rand((300, 256), seed + 5)},
        ]
        self.expected: dict[str, tuple[np.ndarray, np.ndarray, bool]] = {}
        for i, (name, (shape, halves, weight_shard, scale_shard)) in enumerate(self.FP8.items()):
            codes = random_codes(shape, seed + 10 + i)
            scale, values = random_scales(scale_shape(shape, halves), scale_kind, seed + 20 + i)
            self.shards[weight_shard][name] = fp8_tensor(codes)
            self.shards[scale_shard][name + "_scale_inv"] = scale
            self.expected[name] = (codes, values, halves)
        self.config = {**SOURCE_CONFIG, "quantization_config": dict(FP8_CONFIG), "torch_dtype": "bfloat16"}
        if scale_kind == "pow2":
            self.config["quantization_config"]["scale_fmt"] = "ue8m0"

    def write(self, directory: Path, layout: str = "standard") -> Path:
        return write_checkpoint(directory, self.shards, self.config, layout)

    def kept(self) -> dict[str, torch.Tensor]:
        return {n: t for shard in self.shards for n, t in shard.items() if not n.endswith("_scale_inv")}


def scale_shape(shape, halves, block=128):
    *leading, rows, cols = shape
    parts = 2 if halves else 1
    return (*leading, parts * -(-rows // parts // block), -(-cols // block))


def check_dequantized(written: dict[str, torch.Tensor], release: Release, dtype: str = "bfloat16") -> None:
    """Every FP8 weight equals the numpy reference bit for bit; every other tensor is the source's."""
    assert set(written) == set(release.kept()), "scales removed, nothing else"
    for name, tensor in release.kept().items():
        if name in release.expected:
            codes, values, halves = release.expected[name]
            assert written[name].dtype == getattr(torch, dtype) and tuple(written[name].shape) == codes.shape
            assert np.array_equal(output_bytes(written[name]), dequantize_reference(codes, values, dtype, 128, halves))
        else:
            assert written[name].dtype == tensor.dtype
            assert np.array_equal(output_bytes(written[name]), output_bytes(tensor)), name


@pytest.mark.parametrize("scale_kind", ["float32", "bfloat16", "pow2"])
@pytest.mark.parametrize("layout", ["standard", "engine", "single"])
def test_release_dequantized_bit_for_bit(tmp_path, layout, scale_kind):
    release = Release(scale_kind)
    source = release.write(tmp_path / "src", layout)
    result = to_bf16(source, tmp_path / "out", device="cpu", max_shard_bytes=200_000)
    out = tmp_path / "out"

    files = sorted(p.name for p in out.glob("*.safetensors"))
    if layout == "standard":
        assert files == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    elif layout == "single":
        assert files == ["model.safetensors"]
    else:
        assert len(files) > 2
        assert files == [f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, 1 + len(files))]
    written = read_tensors(out)
    check_dequantized(written, release)
    if layout == "standard":
        # The weight stays in its own shard even though its scale sat in the other one.
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert index["weight_map"]["model.layers.0.self_attn.q_proj.weight"] == "model-00001-of-00002.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in written.values())
    assert result.bytes_after == index["metadata"]["total_size"]
    assert result.dequantized == 5 and result.dropped_scales == 5 and result.copied == 6

    config = json.loads((out / "config.json").read_text())
    assert list(config) == ["architectures", "model_type", "hidden_size", "torch_dtype"]
    assert config == {**SOURCE_CONFIG, "torch_dtype": "bfloat16"}
    assert (out / "tokenizer.json").read_text() == "{}"
    report = verify_checkpoint(out)
    assert report.ok, report.findings


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_other_output_dtypes_and_the_config_load_dtype(tmp_path, dtype):
    release = Release("bfloat16")
    source = release.write(tmp_path / "src")
    to_bf16(source, tmp_path / "out", device="cpu", dtype=dtype)
    check_dequantized(read_tensors(tmp_path / "out"), release, dtype)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert list(config) == ["architectures", "model_type", "hidden_size", "torch_dtype"]
    assert config["torch_dtype"] == dtype


@pytest.mark.parametrize("config_key", ["quantization_config", "compression_config"])
def test_compressed_tensors_weight_scale_form(tmp_path, config_key):
    """llm-compressor's FP8_BLOCK: ``<module>.weight_scale`` (bf16) and static ``input_scale`` tensors."""
    tensors = {"model.norm.weight": rand((256,), 1), "lm_head.weight": rand((300, 256), 2)}
    expected = {}
    for i, (module, shape) in enumerate(
        [("model.layers.0.self_attn.q_proj", (300, 256)), ("model.layers.0.mlp.down_proj", (256, 200))]
    ):
        codes = random_codes(shape, i)
        scale, values = random_scales(scale_shape(shape, False), "bfloat16", i)
        tensors |= {
            f"{module}.weight": fp8_tensor(codes),
            f"{module}.weight_scale": scale,
            f"{module}.input_scale": torch.tensor([0.02]),
        }
        expected[f"{module}.weight"] = (codes, values)
    config = {**SOURCE_CONFIG, config_key: compressed_tensors_config(static_activations=True)}
    source = write_checkpoint(tmp_path / "src", [tensors], config)

    result = runner.invoke(app, ["to-bf16", "-s", str(source), "-o", str(tmp_path / "out"), "-q"])
    assert result.exit_code == 0, result.output
    assert "2 activation scales (*.input_scale" in result.stdout and "dropped" in result.stdout
    written = read_tensors(tmp_path / "out")
    assert set(written) == {"model.norm.weight", "lm_head.weight", *expected}
    for name, (codes, values) in expected.items():
        assert np.array_equal(output_bytes(written[name]), dequantize_reference(codes, values, "bfloat16"))
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == SOURCE_CONFIG
    assert verify_checkpoint(tmp_path / "out").ok


def moe_source(directory: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A bf16 checkpoint with odd shapes, per-expert weights and fused 3-D experts."""
    tensors = {
        "model.embed_tokens.weight": rand((300, 256), 0),
        "model.layers.0.input_layernorm.weight": rand((256,), 1),
        "model.layers.0.self_attn.q_proj.weight": rand((300, 256), 2),
        "model.layers.0.self_attn.k_proj.weight": rand((130, 256), 3),
        "model.layers.0.self_attn.v_proj.weight": rand((130, 256), 4),
        "model.layers.0.self_attn.o_proj.weight": rand((256, 300), 5),
        "model.layers.0.mlp.gate.weight": rand((4, 256), 6),
        "model.layers.0.mlp.experts.0.gate_proj.weight": rand((200, 256), 7),
        "model.layers.0.mlp.experts.0.up_proj.weight": rand((200, 256), 8),
        "model.layers.0.mlp.experts.0.down_proj.weight": rand((256, 200), 9),
        "model.layers.1.mlp.experts.gate_up_proj": rand((3, 384, 256), 10),
        "model.layers.1.mlp.experts.down_proj": rand((3, 256, 192), 11),
        "lm_head.weight": rand((300, 256), 12),
    }
    names = list(tensors)
    shards = [{n: tensors[n] for n in names[:6]}, {n: tensors[n] for n in names[6:]}]
    return write_checkpoint(directory, shards, {"model_type": "qwen3_moe", "hidden_size": 256}), tensors


@pytest.mark.parametrize(
    ("scale_fmt", "scale_dtype"), [("float", "float32"), ("ue8m0", "float32"), ("float", "bfloat16")]
)
def test_round_trip_equals_the_reference_quantize_dequantize(tmp_path, scale_fmt, scale_dtype):
    source, tensors = moe_source(tmp_path / "src")
    # The ragged shapes are the point here (edge tiles), not whether vLLM would load them as FP8.
    options = {"scale_fmt": scale_fmt, "scale_dtype": scale_dtype, "allow_unloadable": True}
    to_fp8(source, tmp_path / "fp8", device="cpu", **options)
    fp8_names = {n[: -len("_scale_inv")] for n in read_tensors(tmp_path / "fp8") if n.endswith("_scale_inv")}
    assert len(fp8_names) == 9
    to_bf16(tmp_path / "fp8", tmp_path / "bf16", device="cpu")
    written = read_tensors(tmp_path / "bf16")
    assert set(written) == set(tensors)
    for name, tensor in tensors.items():
        want = (
            reference_quantize_dequantize(tensor, name.endswith("gate_up_proj"), scale_fmt, scale_dtype)
            if name in fp8_names
            else tensor
        )
        assert written[name].dtype == torch.bfloat16
        assert np.array_equal(output_bytes(written[name]), output_bytes(want)), name
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert config == {"model_type": "qwen3_moe", "hidden_size": 256}


def test_the_output_is_a_to_fp8_source(tmp_path):
    source = Release().write(tmp_path / "src")
    to_bf16(source, tmp_path / "bf16", device="cpu")
    result = to_fp8(tmp_path / "bf16", tmp_path / "fp8", device="cpu")
    assert result.quantized > 0
    assert verify_checkpoint(tmp_path / "fp8").ok
    assert json.loads((tmp_path / "fp8" / "config.json").read_text())["quantization_config"]["quant_method"] == "fp8"


def test_repack_options(tmp_path):
    release = Release()
    engine = release.write(tmp_path / "engine", "engine")
    to_bf16(engine, tmp_path / "kept", device="cpu", repack=False)
    kept = sorted(p.name for p in (tmp_path / "kept").glob("*.safetensors"))
    assert kept == [engine_shard_name(0), engine_shard_name(1)]
    check_dequantized(read_tensors(tmp_path / "kept"), release)
    standard = release.write(tmp_path / "standard")
    to_bf16(standard, tmp_path / "packed", device="cpu", repack=True, max_shard_bytes=10**9)
    assert [p.name for p in (tmp_path / "packed").glob("*.safetensors")] == ["model-00001-of-00001.safetensors"]
    result = runner.invoke(app, ["to-bf16", "-s", str(standard), "-o", str(tmp_path / "x"), "--repack", "--no-repack"])
    assert result.exit_code == 2 and not (tmp_path / "x").exists()


def test_dry_run_plans_from_headers_and_writes_nothing(tmp_path):
    release = Release()
    source = release.write(tmp_path / "src")
    result = runner.invoke(app, ["to-bf16", "-s", str(source), "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["format"] == "fp8" and summary["block_size"] == [128, 128] and summary["dtype"] == "bfloat16"
    assert summary["dequantize"] == sorted(release.FP8)
    assert summary["drop_scales"] == sorted(n + "_scale_inv" for n in release.FP8)
    assert set(summary["copy"]) == set(release.kept()) - set(release.FP8)
    assert summary["shards"] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    bf16_bytes = sum(2 * np.prod(shape) for shape, *_ in release.FP8.values())
    copied_bytes = sum(t.nbytes for n, t in release.kept().items() if n not in release.FP8)
    assert summary["total_size"] == bf16_bytes + copied_bytes
    table = runner.invoke(app, ["to-bf16", "-s", str(source), "-o", str(tmp_path / "out"), "--dry-run"])
    assert table.exit_code == 0 and "FP8 weights → bfloat16" in table.stdout and "scales removed" in table.stdout
    assert not (tmp_path / "out").exists()


def test_torch_dequantizer_writes_the_kernel_bytes(tmp_path):
    """The GPU path's loader and torch arithmetic, run on the CPU, produce the kernel's bytes."""
    from normalize_core.bf16.dequantizers import KernelDequantizer, TorchDequantizer

    bf16 = plan_bf16(Release("bfloat16").write(tmp_path / "src"))
    for dtype in ("bfloat16", "float16", "float32"):
        kernel = KernelDequantizer(bf16.checkpoint, (128, 128), dtype)
        torch_path = TorchDequantizer(bf16.checkpoint, (128, 128), dtype, "cpu")
        for name, weight in bf16.roles.weights.items():
            expected = bytes(kernel.dequantize(kernel.load(weight), weight))
            assert bytes(torch_path.dequantize(torch_path.load(weight), weight)) == expected, (dtype, name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_output_is_byte_identical_to_the_cpu_output(tmp_path):
    source = Release("bfloat16").write(tmp_path / "src")
    to_bf16(source, tmp_path / "cpu", device="cpu")
    result = to_bf16(source, tmp_path / "gpu", device="cuda")
    assert result.device.startswith("cuda")
    for path in (tmp_path / "cpu").iterdir():
        assert (tmp_path / "gpu" / path.name).read_bytes() == path.read_bytes(), path.name


def test_cpu_conversion_never_imports_torch(tmp_path):
    source = Release().write(tmp_path / "src", "engine")
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "torch.py").write_text("raise ImportError('torch must not be imported on the CPU path')\n")
    env = {**os.environ, "PYTHONPATH": f"{blocker}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    args = ["to-bf16", "-s", str(source), "-o", str(tmp_path / "out")]
    for extra in (["--dry-run"], ["--device", "cpu"]):
        completed = run_normalize(*args, *extra, env=env, timeout=120)
        assert completed.returncode == 0, completed.stderr
    assert verify_checkpoint(tmp_path / "out").ok


def test_refused_outputs_and_devices_leave_nothing(tmp_path):
    source = Release().write(tmp_path / "src")
    before = sorted(p.name for p in source.iterdir())
    for output in (source, source / "inside"):
        result = runner.invoke(app, ["to-bf16", "-s", str(source), "-o", str(output)])
        assert result.exit_code == 2 and "source" in result.stderr, result.output
    if not torch.cuda.is_available():
        result = runner.invoke(app, ["to-bf16", "-s", str(source), "-o", str(tmp_path / "out"), "--device", "cuda"])
        assert result.exit_code == 2 and "torch sees no CUDA device" in result.stderr
        assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in source.iterdir()) == before
    result = runner.invoke(app, ["to-bf16", "-s", str(source), "-o", str(tmp_path / "out"), "--dtype", "float64"])
    assert result.exit_code == 2 and "--dtype must be bfloat16, float16 or float32" in result.stderr


def test_a_shard_of_nothing_but_scales_leaves_no_gap_in_the_names(tmp_path):
    weight = "model.layers.0.mlp.down_proj.weight"
    codes = random_codes((256, 256), 0)
    shards = [
        {"model.norm.weight": rand((256,), 0)},
        {weight: fp8_tensor(codes)},
        {weight + "_scale_inv": torch.full((2, 2), 0.5)},
    ]
    source = write_checkpoint(tmp_path / "src", shards, {"quantization_config": FP8_CONFIG})
    result = to_bf16(source, tmp_path / "out", device="cpu")
    assert result.shards == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    written = read_tensors(tmp_path / "out")
    want = dequantize_reference(codes, np.full((2, 2), 0.5, np.float32), "bfloat16")
    assert np.array_equal(output_bytes(written[weight]), want)
    assert verify_checkpoint(tmp_path / "out").ok


def test_a_block_size_that_is_not_square_comes_from_the_config(tmp_path):
    weight = "model.layers.0.self_attn.o_proj.weight"
    codes = random_codes((200, 300), 3)
    stored, values = random_scales((4, 3), "float32", 3)  # 64-row by 128-column tiles
    config = {"quantization_config": {**FP8_CONFIG, "weight_block_size": [64, 128]}}
    source = write_checkpoint(tmp_path / "src", [{weight: fp8_tensor(codes), weight + "_scale_inv": stored}], config)
    assert plan_bf16(source).summary()["block_size"] == [64, 128]
    to_bf16(source, tmp_path / "out", device="cpu")
    want = dequantize_reference(codes, values, "bfloat16", (64, 128))
    assert np.array_equal(output_bytes(read_tensors(tmp_path / "out")[weight]), want)


def test_a_non_empty_output_needs_overwrite(tmp_path):
    source = Release().write(tmp_path / "src")
    command = ["to-bf16", "-s", str(source), "-o", str(tmp_path / "out"), "--device", "cpu", "-q"]
    assert runner.invoke(app, command).exit_code == 0
    first = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    refused = runner.invoke(app, command)
    assert refused.exit_code == 2 and "--overwrite" in refused.stderr
    assert runner.invoke(app, [*command, "--overwrite"]).exit_code == 0
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == first
