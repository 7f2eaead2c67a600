"""The values of block-FP8 scale tensors: ``Checkpoint.scale_properties`` (Rust, every scale of a checkpoint in
one call) against an independent numpy reference on files written with torch, and the findings verify, inspect
and check report from them, in F32 and BF16: zero, negative, NaN, infinite, subnormal, non-power-of-two scales
under ``scale_fmt: ue8m0``, and the zero scales of a header-only stand-in (its data is a hole)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from normalize_core import Checkpoint, NormalizeError, check, inspect_checkpoint, verify_checkpoint
from standins import build_standin, load_standin
from test_check_format import run

TINY = float(np.finfo(np.float32).tiny)

#: Values a scale can hold, the special ones included.
SPECIAL = [1.0, 0.5, 2.0**-20, 2.0**100, 0.75, 3.0, 0.0, -0.0, -1.0, -0.75, math.nan, math.inf, -math.inf]
SPECIAL += [TINY, TINY / 2, 1e-45, float(np.finfo(np.float32).max)]


def reference(values: np.ndarray) -> tuple[bool, bool]:
    """``(finite_positive, powers_of_two)`` by float arithmetic: every value finite and above zero; every value
    2^k of the normal range (``frexp`` mantissa exactly 0.5, at least the smallest normal float32)."""
    values = values.astype(np.float64)
    finite_positive = bool(np.all(np.isfinite(values) & (values > 0)))
    mantissas, _ = np.frexp(values)
    powers = finite_positive and bool(np.all((mantissas == 0.5) & (values >= TINY)))
    return finite_positive, powers


def stored(values: list[float], dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).to(dtype)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.lists(st.one_of(st.sampled_from(SPECIAL), st.floats(width=32)), max_size=9),
        min_size=1,
        max_size=6,
    ),
    st.lists(st.sampled_from([torch.float32, torch.bfloat16]), min_size=6, max_size=6),
)
def test_scale_properties_match_a_float_reference(tmp_path_factory, scales, dtypes):
    directory = tmp_path_factory.mktemp("scales")
    tensors = {f"s{i}": stored(values, dtypes[i]) for i, values in enumerate(scales)}
    save_file(tensors, directory / "model.safetensors")
    checkpoint = Checkpoint.open(directory)
    names = list(reversed(tensors))
    found = checkpoint.scale_properties(names)
    assert [(p.finite_positive, p.powers_of_two) for p in found] == [
        reference(tensors[name].float().numpy()) for name in names
    ]


def test_scale_properties_refuse_unknown_names_and_other_dtypes(tmp_path):
    save_file({"s": torch.ones(2), "i": torch.ones(2, dtype=torch.int32)}, tmp_path / "model.safetensors")
    checkpoint = Checkpoint.open(tmp_path)
    assert checkpoint.scale_properties([]) == []
    with pytest.raises(KeyError):
        checkpoint.scale_properties(["s", "missing"])
    with pytest.raises(ValueError, match="'i' is I32; scale tensors are F32 or BF16"):
        checkpoint.scale_properties(["i"])


def test_a_shard_truncated_after_opening_is_a_clear_error(tmp_path):
    save_file({"s": torch.ones(64)}, tmp_path / "model.safetensors")
    checkpoint = Checkpoint.open(tmp_path)
    with open(tmp_path / "model.safetensors", "r+b") as f:
        f.truncate(100)
    with pytest.raises(NormalizeError) as raised:
        checkpoint.scale_properties(["s"])
    assert raised.value.kind == "source_changed"


QUANTIZATION = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}

WEIGHT = "model.layers.0.mlp.down_proj.weight"
SCALE = f"{WEIGHT}_scale_inv"
NOT_POSITIVE = f"{SCALE} holds a zero, negative, NaN or infinite scale"
NOT_POWERS = (
    f"scale_fmt is ue8m0 but {SCALE} has scales that are not powers of two "
    "(transformers would round them and corrupt the weights)"
)


def one_fp8_weight(directory: Path, scales: list[float], dtype: torch.dtype, ue8m0: bool) -> Path:
    """One FP8 weight of 256 x 256 whose 2 x 2 block scales hold ``scales``, in a checkpoint with ``config.json``."""
    weight = torch.full((256, 256), 0.5).to(torch.float8_e4m3fn)
    directory.mkdir()
    save_file({WEIGHT: weight, SCALE: stored(scales, dtype).reshape(2, 2)}, directory / "model.safetensors")
    quantization = {**QUANTIZATION, **({"scale_fmt": "ue8m0"} if ue8m0 else {})}
    config = {"architectures": ["Qwen3ForCausalLM"], "hidden_size": 256, "quantization_config": quantization}
    (directory / "config.json").write_text(json.dumps(config))
    return directory


CASES = {
    "ones": ([1.0, 1.0, 1.0, 1.0], False, []),
    "powers of two under ue8m0": ([1.0, 0.5, 2.0**-20, 8.0], True, []),
    "a zero": ([1.0, 0.0, 1.0, 1.0], False, [NOT_POSITIVE]),
    "a negative zero": ([1.0, -0.0, 1.0, 1.0], False, [NOT_POSITIVE]),
    "a negative power of two under ue8m0": ([1.0, -2.0, 1.0, 1.0], True, [NOT_POSITIVE]),
    "a NaN": ([1.0, 1.0, math.nan, 1.0], False, [NOT_POSITIVE]),
    "an infinity": ([math.inf, 1.0, 1.0, 1.0], False, [NOT_POSITIVE]),
    "a zero under ue8m0 is reported once": ([0.75, 0.0, 1.0, 1.0], True, [NOT_POSITIVE]),
    "a subnormal is a usable scale": ([TINY / 2, 1.0, 1.0, 1.0], False, []),
    "a subnormal is not ue8m0": ([TINY / 2, 1.0, 1.0, 1.0], True, [NOT_POWERS]),
    "0.75 is a usable scale": ([0.75, 1.0, 1.0, 1.0], False, []),
    "0.75 is not ue8m0": ([0.75, 1.0, 1.0, 1.0], True, [NOT_POWERS]),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["F32", "BF16"])
@pytest.mark.parametrize("case", CASES)
def test_verify_and_inspect_report_bad_scale_values(tmp_path, case, dtype):
    scales, ue8m0, expected = CASES[case]
    if dtype == torch.bfloat16 and case.startswith("a subnormal"):
        scales = [2.0**-130 if s == TINY / 2 else s for s in scales]  # a bfloat16 subnormal
    source = one_fp8_weight(tmp_path / "ckpt", scales, dtype, ue8m0)
    lines = (NOT_POSITIVE, NOT_POWERS)
    verified = [m for s, m in verify_checkpoint(source).findings if m in lines]
    assert verified == expected and all(("error", m) in verify_checkpoint(source).findings for m in expected)
    inspected = [p["message"] for p in inspect_checkpoint(source)["problems"] if p["message"] in lines]
    assert inspected == expected
    # check reads headers only: no scale values.
    assert [m for _, m in check(source, tp=(1,)).findings if m in lines] == []


def test_the_cli_reports_a_nan_scale_as_one_error_line(tmp_path):
    source = one_fp8_weight(tmp_path / "ckpt", [1.0, math.nan, 1.0, 1.0], torch.bfloat16, ue8m0=False)
    completed = run("verify", str(source))
    assert completed.returncode == 1, completed.stderr
    assert f"error: {NOT_POSITIVE}" in completed.stdout.splitlines()


def test_the_zero_scales_of_a_header_only_stand_in_are_each_reported(tmp_path):
    """The stand-in's data is a hole: every scale reads as zero, and verify says so for each of them."""
    stem = "qwen3_8b_fp8"
    source = build_standin(stem, tmp_path / stem)
    scales = [t.name for t in Checkpoint.open(source).tensors if t.name.endswith("_scale_inv")]
    assert len(scales) > 200 and load_standin(stem)["tensor_count"] > len(scales)
    report = verify_checkpoint(source)
    zero = [m.split()[0] for _, m in report.findings if m.endswith("holds a zero, negative, NaN or infinite scale")]
    assert sorted(zero) == sorted(scales)
    assert not report.ok
