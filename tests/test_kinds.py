"""Typed values across the binding and the Python API (``normalize_core.kinds``).

Every argument that takes one of a fixed set of values refuses any other with a ``ValueError``
naming the allowed ones, before anything is written; values the binding returns are members of
the ``StrEnum``s, which still compare, hash and serialize as their strings.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from builders import make_tensors, write_checkpoint
from normalize_core import Checkpoint, PlanBuilder, plan_fp8, plan_shards, to_fp8
from normalize_core._core import quantize_fp8_blocks
from normalize_core.fp8.quantize import quantize_block_fp8
from normalize_core.kinds import Dtype, Layout, Naming, ScaleDtype, ScaleFormat, Severity, ShardKind

ALLOWED_SCALE_FORMATS = ("float", "ue8m0")
ALLOWED_SCALE_DTYPES = ("float32", "bfloat16")


@pytest.fixture(scope="module")
def engine_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three engine-named shards of bf16 weights, written once: no test here writes to it."""
    spec = {f"model.layers.{i}.mlp.down_proj.weight": (torch.bfloat16, (64, 128)) for i in range(3)}
    directory = tmp_path_factory.mktemp("kinds") / "engine"
    return write_checkpoint(directory, make_tensors(spec, 0), layout="engine", files=3)


def kernel_call(**override) -> Callable[[Path, Path], object]:
    """``quantize_fp8_blocks`` on a 1×2 bf16 matrix, with one argument replaced."""

    def call(_source: Path, _output: Path) -> object:
        arguments = {"dtype": "BF16", "scale_fmt": "float", "scale_dtype": "float32"} | override
        return quantize_fp8_blocks(
            "t", bytearray(4), arguments.pop("dtype"), 1, 1, 2, bytearray(2), bytearray(4), **arguments
        )

    return call


#: (which argument, a call passing it a bad value, the values the error must name).
BAD_ARGUMENTS = [
    (
        "to_fp8 scale_fmt",
        lambda source, output: to_fp8(source, output, device="cpu", scale_fmt="UE8M0"),
        ALLOWED_SCALE_FORMATS,
    ),
    (
        "to_fp8 scale_dtype",
        lambda source, output: to_fp8(source, output, device="cpu", scale_dtype="fp32"),
        ALLOWED_SCALE_DTYPES,
    ),
    ("plan_fp8 scale_fmt", lambda source, _: plan_fp8(source, scale_fmt="e8m0"), ALLOWED_SCALE_FORMATS),
    ("plan_fp8 scale_dtype", lambda source, _: plan_fp8(source, scale_dtype="float16"), ALLOWED_SCALE_DTYPES),
    (
        "quantize_block_fp8 scale_fmt",
        lambda *_: quantize_block_fp8(torch.ones(2, 2, dtype=torch.bfloat16), scale_fmt="UE8M0"),
        ALLOWED_SCALE_FORMATS,
    ),
    (
        "quantize_block_fp8 backend",
        lambda *_: quantize_block_fp8(torch.ones(2, 2, dtype=torch.bfloat16), backend="cuda"),
        ("auto", "kernel", "torch"),
    ),
    ("quantize_fp8_blocks dtype", kernel_call(dtype="bf16"), ("BF16", "F16", "F32")),
    ("quantize_fp8_blocks integer dtype", kernel_call(dtype="I8"), ("BF16", "F16", "F32")),
    ("quantize_fp8_blocks scale_fmt", kernel_call(scale_fmt="UE8M0"), ALLOWED_SCALE_FORMATS),
    ("quantize_fp8_blocks scale_dtype", kernel_call(scale_dtype=torch.float32), ALLOWED_SCALE_DTYPES),
    (
        "PlanBuilder.provided dtype",
        lambda source, _: PlanBuilder([Checkpoint.open(source)]).provided("x", "bf16", [2]),
        ("BF16", "F8_E4M3", "F32"),
    ),
    (
        "PlanBuilder.finish naming",
        lambda source, _: PlanBuilder([Checkpoint.open(source)]).finish("Standard"),
        ("standard", "source"),
    ),
]


@pytest.mark.parametrize(("call", "allowed"), [case[1:] for case in BAD_ARGUMENTS], ids=[c[0] for c in BAD_ARGUMENTS])
def test_a_bad_value_is_refused_naming_the_allowed_ones(engine_checkpoint: Path, tmp_path: Path, call, allowed):
    output = tmp_path / "out"
    with pytest.raises(ValueError) as raised:
        call(engine_checkpoint, output)
    message = str(raised.value)
    assert all(value in message for value in allowed), message
    assert not output.exists(), "nothing is written for a refused argument"


def test_members_and_their_strings_are_both_accepted(engine_checkpoint: Path) -> None:
    checkpoint = Checkpoint.open(engine_checkpoint)
    for naming in (Naming.SOURCE, "source"):
        builder = PlanBuilder([checkpoint])
        builder.whole_file(checkpoint.files[0])
        assert builder.finish(naming).shards[0].file_name == checkpoint.files[0]
    for dtype in (Dtype.F8_E4M3, "F8_E4M3"):
        assert PlanBuilder([checkpoint]).provided("x", dtype, [2, 3]).nbytes == 6
    for scale_fmt, scale_dtype in ((ScaleFormat.UE8M0, ScaleDtype.BFLOAT16), ("ue8m0", "bfloat16")):
        fp8 = plan_fp8(engine_checkpoint, scale_fmt=scale_fmt, scale_dtype=scale_dtype, build_plan=False)
        assert (fp8.scale_fmt, fp8.scale_dtype) == (ScaleFormat.UE8M0, ScaleDtype.BFLOAT16)
        assert fp8.quantization_config["scale_fmt"] == "ue8m0"


def test_the_binding_returns_members_that_behave_as_strings(engine_checkpoint: Path) -> None:
    checkpoint = Checkpoint.open(engine_checkpoint)
    assert checkpoint.layout is Layout.UNINDEXED and checkpoint.layout == "unindexed"
    entry = checkpoint.tensors[0]
    assert entry.dtype is Dtype.BF16 and entry.dtype == "BF16" and entry.dtype in {"BF16"}
    assert list(checkpoint.dtypes) == [Dtype.BF16] and checkpoint.dtypes["BF16"] == checkpoint.total_size
    severities = [severity for severity, _ in checkpoint.problems()]
    assert severities and all(type(severity) is Severity for severity in severities)
    plan = plan_shards(checkpoint, max_shard_bytes=1 << 30)
    assert [shard.kind for shard in plan.shards] == [ShardKind.ASSEMBLED]
    assert type(plan.shards[0].kind) is ShardKind
    provided = PlanBuilder([checkpoint]).provided("x", "F32", [1])
    assert provided.dtype is Dtype.F32
    assert json.loads(json.dumps({"dtype": entry.dtype, "layout": checkpoint.layout})) == {
        "dtype": "BF16",
        "layout": "unindexed",
    }
    assert f"{entry.dtype}/{checkpoint.layout}" == "BF16/unindexed"


def test_a_python_enum_that_disagrees_with_the_binding_is_reported(engine_checkpoint: Path) -> None:
    """Both sides must list the same values: the first use of a drifted enum says which differ."""
    script = f"""
import normalize_core.kinds as kinds
class Severity(kinds.Kind):
    ERROR = "error"
    FATAL = "fatal"
kinds.Severity = Severity
from normalize_core import Checkpoint
try:
    Checkpoint.open({str(engine_checkpoint)!r}).problems()
except RuntimeError as e:
    print(e)
"""
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == (
        "normalize_core.kinds.Severity and the binding disagree: "
        'only in Python ["fatal"], only in the binding ["warning"]'
    )


@pytest.mark.parametrize("kind", [Naming, Layout, Dtype, ScaleFormat, ScaleDtype, ShardKind, Severity])
def test_every_kind_is_a_str_enum_whose_error_names_its_values(kind) -> None:
    assert all(isinstance(member, str) and member == member.value for member in kind)
    assert kind(next(iter(kind)).value) is next(iter(kind))
    with pytest.raises(ValueError, match=f"is not a valid {kind.__name__}; expected one of: ") as raised:
        kind("no such value")
    assert all(repr(member.value) in str(raised.value) for member in kind)
