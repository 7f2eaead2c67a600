"""Every source ``to-bf16`` cannot convert faithfully is refused: an FP8 weight without its scale, a scale
without its weight, a scale of the wrong shape or dtype, FP8 that is not block e4m3, and every unknown
or malformed quantization format. Each case runs as a real process (with a timeout): exit status 2, one
``error:`` line naming the tensor or file, no traceback, no output directory left, the source untouched.
The same cases through the API raise ``NormalizeError`` of the stated kind."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from bf16_util import FP8_CONFIG, compressed_tensors_config, fp8_tensor, random_codes, write_checkpoint
from cli_util import run_normalize
from normalize_core import NormalizeError, to_bf16

Tensors = dict[str, torch.Tensor]
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"
O_PROJ = "model.layers.0.self_attn.o_proj.weight"


def valid_tensors() -> Tensors:
    return {
        "model.embed_tokens.weight": torch.zeros(64, 256, dtype=torch.bfloat16),
        "model.norm.weight": torch.ones(256, dtype=torch.bfloat16),
        Q_PROJ: fp8_tensor(random_codes((200, 256), 0)),
        Q_PROJ + "_scale_inv": torch.full((2, 2), 0.01),
        O_PROJ: fp8_tensor(random_codes((256, 200), 1)),
        O_PROJ + "_scale_inv": torch.full((2, 2), 0.01),
    }


def fp8_config(**changes) -> dict:
    return {"model_type": "deepseek_v3", "quantization_config": {**FP8_CONFIG, **changes}}


def compressed_config(**weight_changes) -> dict:
    config = compressed_tensors_config()
    config["config_groups"]["group_0"]["weights"].update(weight_changes)
    return {"model_type": "llama", "quantization_config": config}


def compressed_tensors() -> Tensors:
    tensors = valid_tensors()
    for weight in (Q_PROJ, O_PROJ):
        tensors[weight[: -len(".weight")] + ".weight_scale"] = tensors.pop(weight + "_scale_inv").bfloat16()
    return tensors


@dataclass
class Case:
    """A source made from ``tensors()`` and ``config``, and the error it must end in."""

    tensors: Callable[[], Tensors]
    config: dict | None
    kind: str
    message: str
    #: None: a config.json that is not JSON.
    config_text: str | None = None


def without(name: str) -> Callable[[], Tensors]:
    return lambda: {n: t for n, t in valid_tensors().items() if n != name}


def with_tensors(**extra: torch.Tensor) -> Callable[[], Tensors]:
    return lambda: valid_tensors() | {name.replace("__", "."): t for name, t in extra.items()}


def renamed(old: str, new: str) -> Callable[[], Tensors]:
    return lambda: {(new if n == old else n): t for n, t in valid_tensors().items()}


def nan_code() -> Tensors:
    tensors = valid_tensors()
    codes = random_codes((200, 256), 0)
    codes[199, 255] = 0x7F
    tensors[Q_PROJ] = fp8_tensor(codes)
    return tensors


CASES = {
    "weight without scale": Case(
        without(O_PROJ + "_scale_inv"),
        fp8_config(),
        "missing_scale",
        f"tensor '{O_PROJ}' is FP8 but has no '{O_PROJ}_scale_inv'; refusing to keep FP8 bytes",
    ),
    "weight with the other form's scale": Case(
        renamed(O_PROJ + "_scale_inv", "model.layers.0.self_attn.o_proj.weight_scale"),
        fp8_config(),
        "missing_scale",
        "(it has 'model.layers.0.self_attn.o_proj.weight_scale', which fp8 checkpoints do not use)",
    ),
    "scale without weight": Case(
        with_tensors(model__layers__1__mlp__down_proj__weight_scale_inv=torch.ones(2, 2)),
        fp8_config(),
        "orphan_scale",
        "scale 'model.layers.1.mlp.down_proj.weight_scale_inv' has no weight 'model.layers.1.mlp.down_proj.weight'",
    ),
    "scale of a bf16 weight": Case(
        with_tensors(model__embed_tokens__weight_scale_inv=torch.ones(1, 2)),
        fp8_config(),
        "orphan_scale",
        "belongs to 'model.embed_tokens.weight', which is BF16, not FP8",
    ),
    "scale of the wrong shape": Case(
        with_tensors(**{Q_PROJ.replace(".", "__") + "_scale_inv": torch.ones(2, 3)}),
        fp8_config(),
        "bad_scale",
        f"scale '{Q_PROJ}_scale_inv' has shape [2, 3], but {Q_PROJ} of shape [200, 256] in 128x128 blocks needs [2, 2]",
    ),
    "scale of the wrong dtype": Case(
        with_tensors(**{Q_PROJ.replace(".", "__") + "_scale_inv": torch.ones(2, 2, dtype=torch.int32)}),
        fp8_config(),
        "bad_scale",
        f"scale '{Q_PROJ}_scale_inv' is I32, not one of F32, BF16, F16, F8_E8M0",
    ),
    "1-D FP8 tensor": Case(
        with_tensors(model__layers__0__mlp__gate__bias=fp8_tensor(random_codes((4,), 0))),
        fp8_config(),
        "unsupported_fp8",
        "tensor 'model.layers.0.mlp.gate.bias' is FP8 of shape [4]; block FP8 weights are 2-D or 3-D",
    ),
    "e5m2 weight": Case(
        lambda: valid_tensors() | {Q_PROJ: valid_tensors()[Q_PROJ].view(torch.float8_e5m2)},
        fp8_config(),
        "unsupported_fp8",
        f"tensor '{Q_PROJ}' is F8_E5M2; block FP8 weights are F8_E4M3",
    ),
    "zero point": Case(
        with_tensors(**{Q_PROJ.replace(".", "__") + "_zero_point": torch.zeros(2, 2, dtype=torch.int8)}),
        fp8_config(),
        "unknown_quantization",
        "is a zero point of an asymmetric scheme",
    ),
    "compressed-tensors weight without weight_scale": Case(
        lambda: (
            {n: t for n, t in compressed_tensors().items() if not n.startswith("model.layers.0.self_attn.o_proj.w")}
            | {O_PROJ: fp8_tensor(random_codes((256, 200), 1))}
        ),
        compressed_config(),
        "missing_scale",
        f"tensor '{O_PROJ}' is FP8 but has no 'model.layers.0.self_attn.o_proj.weight_scale'",
    ),
    "compressed-tensors channel strategy": Case(
        compressed_tensors,
        compressed_config(strategy="channel"),
        "unknown_quantization",
        'config_groups.group_0 is format "float-quantized", weights type "float", num_bits 8, strategy "channel"',
    ),
    "compressed-tensors mixed block sizes": Case(
        compressed_tensors,
        {
            "quantization_config": compressed_tensors_config()
            | {
                "config_groups": compressed_tensors_config()["config_groups"]
                | {"group_1": compressed_tensors_config(block=64)["config_groups"]["group_0"]}
            }
        },
        "unknown_quantization",
        "config_groups use different block sizes (64x64, 128x128)",
    ),
    "no config.json": Case(valid_tensors, None, "unknown_quantization", "config.json: does not exist"),
    "config.json not JSON": Case(valid_tensors, None, "invalid_config", "config.json: not valid JSON", "{oops"),
    "no quantization_config": Case(
        valid_tensors, {"model_type": "deepseek_v3"}, "unknown_quantization", "no quantization_config"
    ),
    "unknown quant_method": Case(
        valid_tensors,
        {"quantization_config": {"quant_method": "gptq", "bits": 4}},
        "unknown_quantization",
        'quantization_config.quant_method is "gptq"',
    ),
    "per-tensor fp8": Case(
        valid_tensors,
        {"quantization_config": {"quant_method": "fp8", "activation_scheme": "static"}},
        "unknown_quantization",
        "quant_method 'fp8' without weight_block_size is per-tensor FP8",
    ),
    "block size not two integers": Case(
        valid_tensors,
        fp8_config(weight_block_size=[128]),
        "unknown_quantization",
        "weight_block_size is [128], not two positive integers",
    ),
    "e5m2 fmt": Case(valid_tensors, fp8_config(fmt="e5m2"), "unknown_quantization", "fmt is 'e5m2'"),
    "nothing quantized": Case(
        lambda: {"model.norm.weight": torch.ones(256, dtype=torch.bfloat16)},
        fp8_config(),
        "not_quantized",
        "no tensor is F8_E4M3; nothing to dequantize",
    ),
    "NaN code in a weight": Case(
        nan_code, fp8_config(), "invalid_quantize_input", f"tensor '{Q_PROJ}': dequantizes to NaN"
    ),
}


def digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


@pytest.fixture(params=list(CASES), ids=list(CASES))
def case(request, tmp_path) -> tuple[Case, Path]:
    case = CASES[request.param]
    source = write_checkpoint(tmp_path / "src", [case.tensors()], case.config)
    if case.config_text is not None:
        (source / "config.json").write_text(case.config_text)
    return case, source


def test_refused_in_one_line_with_nothing_written(case, tmp_path):
    case, source = case
    before = digest(source)
    output = tmp_path / "out"
    completed = run_normalize("to-bf16", "-s", str(source), "-o", str(output), "--device", "cpu", timeout=120)
    assert completed.returncode == 2, completed.stderr
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), completed.stderr
    assert case.message in lines[0]
    assert "Traceback" not in completed.stderr
    assert not output.exists()
    assert digest(source) == before


def test_the_api_raises_the_kind(case, tmp_path):
    case, source = case
    with pytest.raises(NormalizeError) as raised:
        to_bf16(source, tmp_path / "out", device="cpu")
    assert raised.value.kind == case.kind
    assert case.message in str(raised.value)
    assert not (tmp_path / "out").exists()
