"""The one FP8 geometry (``normalize_core.fp8.layout``): every number the planner, the dry run,
the quantizers and the format checks use comes from it, so they cannot disagree."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from builders import moe_tensors, write_checkpoint
from normalize_core import plan_fp8
from normalize_core.fp8.contract import block_scale_shapes
from normalize_core.fp8.layout import (
    FP8_DTYPES,
    QUANTIZABLE_DTYPES,
    SCALE_TENSOR_DTYPES,
    quantized_layout,
    tiling,
)
from normalize_core.fp8.quantize import TORCH_SCALE_DTYPES, TORCH_SOURCE_DTYPES, quantize_block_fp8
from normalize_core.fp8.rules import summarize
from normalize_core.kinds import Dtype, ScaleDtype


@pytest.fixture(scope="module")
def moe_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small MoE model (fused experts whose halves are not whole blocks included), read only here."""
    return write_checkpoint(tmp_path_factory.mktemp("geometry") / "src", moe_tensors(), layout="engine")


@pytest.mark.parametrize("scale_dtype", list(ScaleDtype))
@pytest.mark.parametrize("block_size", [128, 64, 100, 32, 7])
def test_dry_run_rows_add_up_to_the_planned_output(moe_checkpoint: Path, block_size: int, scale_dtype: ScaleDtype):
    """Issue 11's second bug: with block 64 the rows summed to other savings than the total said."""
    dry = plan_fp8(moe_checkpoint, block_size=block_size, scale_dtype=scale_dtype, build_plan=False)
    sizes = {t.name: t.nbytes for t in dry.entries}
    rows = summarize(dry.decisions, sizes, dry.layouts)
    assert sum(row["bytes"] for row in rows) == dry.checkpoint.total_size
    assert sum(row["bytes_saved"] for row in rows) == dry.checkpoint.total_size - dry.output_bytes
    planned = plan_fp8(moe_checkpoint, block_size=block_size, scale_dtype=scale_dtype)
    assert planned.plan.total_size == dry.output_bytes, "the dry run's total is what the writer will write"


def test_a_layout_matches_what_the_quantizer_returns() -> None:
    """Shapes, byte counts and the half-by-half split, against ``quantize_block_fp8``'s real output."""
    generator = torch.Generator().manual_seed(0)
    cases = [
        ("a.q_proj.weight", (300, 257), 128),
        ("a.experts.down_proj", (3, 200, 136), 64),
        ("a.experts.gate_up_proj", (3, 384, 256), 128),  # halves of 192 rows: split
        ("a.experts.gate_up_proj", (2, 512, 256), 128),  # halves of 256 rows: whole blocks
        ("a.other_proj", (3, 384, 256), 128),  # only gate_up_proj is split
    ]
    for name, shape, block in cases:
        for scale_dtype in ScaleDtype:
            layout = quantized_layout(name, shape, block, scale_dtype)
            x = torch.randn(shape, generator=generator).to(torch.bfloat16)
            q, s = quantize_block_fp8(
                x, block_size=block, scale_dtype=TORCH_SCALE_DTYPES[scale_dtype], split_halves=layout.split_halves
            )
            assert tuple(s.shape) == layout.scale_shape, (name, shape)
            assert q.numel() * q.element_size() == layout.elements
            assert s.numel() * s.element_size() == layout.scale_nbytes
            assert layout.nbytes == layout.elements + layout.scale_nbytes
            assert layout.scale_tensor_dtype == {torch.float32: "F32", torch.bfloat16: "BF16"}[s.dtype]
    assert quantized_layout("a.experts.gate_up_proj", (3, 384, 256)).split_halves
    assert not quantized_layout("a.experts.gate_up_proj", (2, 512, 256)).split_halves


def test_the_format_check_accepts_exactly_the_shapes_to_fp8_writes() -> None:
    for name, shape in [("w", [300, 257]), ("e.gate_up_proj", [3, 384, 256]), ("e.down_proj", [3, 256, 192])]:
        layout = quantized_layout(name, shape, 128)
        assert list(layout.scale_shape) in block_scale_shapes(shape, (128, 128))
    # A non-square block from a config: rows and columns tiled separately.
    assert block_scale_shapes([300, 257], (128, 64)) == [[3, 5]]
    assert tiling([4, 300, 257], (128, 64)).scale_shape == (4, 3, 5)
    assert block_scale_shapes([3, 384, 256], (128, 128)) == [[3, 3, 2], [3, 4, 2]]


def test_dtype_sets_cover_what_their_names_say() -> None:
    assert {Dtype.F8_E4M3, Dtype.F8_E5M2, Dtype.F8_E8M0, Dtype.F8_E4M3FNUZ, Dtype.F8_E5M2FNUZ} == FP8_DTYPES
    assert set(TORCH_SOURCE_DTYPES) == QUANTIZABLE_DTYPES == {Dtype.BF16, Dtype.F16, Dtype.F32}
    assert set(SCALE_TENSOR_DTYPES) == set(TORCH_SCALE_DTYPES) == set(ScaleDtype)


def test_a_weight_and_its_scale_are_planned_into_one_shard(moe_checkpoint: Path) -> None:
    fp8 = plan_fp8(moe_checkpoint, block_size=64, scale_dtype="bfloat16", max_shard_bytes=100_000)
    shard_of = {name: shard.file_name for shard in fp8.plan.shards for name in shard.provided}
    assert len(fp8.plan.shards) > 1
    assert set(shard_of) == set(fp8.layouts) | {layout.scale_name for layout in fp8.layouts.values()}
    assert all(shard_of[layout.name] == shard_of[layout.scale_name] for layout in fp8.layouts.values())
