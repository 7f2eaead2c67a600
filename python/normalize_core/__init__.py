"""model-normalize: safetensors checkpoints that transformers, vLLM and SGLang load as-is.

The index tooling (headers, indexes, plans, writers) comes from the Rust extension; the
functions below drive it. Importing this package does not import torch, and neither does
``to_fp8`` on the CPU (the Rust kernel quantizes); ``quantize_block_fp8``, which takes torch
tensors, imports it when first used.

>>> import normalize_core
>>> ckpt = normalize_core.Checkpoint.open("path/to/checkpoint")   # doctest: +SKIP
>>> plan = normalize_core.plan_shards(ckpt, max_shard_bytes=4 << 30)   # doctest: +SKIP
>>> normalize_core.check("path/to/fp8-checkpoint", tp=(1, 2, 4, 8)).loads_at()   # doctest: +SKIP
[1, 2, 4]
"""

from normalize_core._core import (
    Checkpoint,
    NormalizeError,
    OutputPlan,
    OutputTensor,
    PlanBuilder,
    ShardHeader,
    ShardPlan,
    ShardWriter,
    TensorEntry,
    TensorGroup,
    TensorView,
    __version__,
    plan_shards,
    read_header,
)
from normalize_core.check import CheckReport, check
from normalize_core.diff import CheckpointDiff, TensorConflict, diff
from normalize_core.fp8.convert import Fp8Plan, Fp8Result, plan_fp8, to_fp8, write_fp8
from normalize_core.fp8.rules import Decision, HeuristicRules, PatternRules, ReferenceRules, with_skip_patterns
from normalize_core.kinds import Dtype, Layout, Naming, ScaleDtype, ScaleFormat, Severity, ShardKind
from normalize_core.merge import MergePlan, MergeResult, merge, plan_merge
from normalize_core.place import (
    PlacementError,
    PlacementPlan,
    PlacementResult,
    offer_placement,
    place,
    plan_placement,
)
from normalize_core.repack import WriteResult, plan_repack, repack
from normalize_core.report import VerifyReport, inspect_checkpoint, verify_checkpoint
from normalize_core.sizes import parse_size


def __getattr__(name: str):
    # quantize_block_fp8 works on torch tensors: import torch only when it is asked for.
    if name == "quantize_block_fp8":
        from normalize_core.fp8.quantize import quantize_block_fp8

        return quantize_block_fp8
    raise AttributeError(f"module 'normalize_core' has no attribute {name!r}")


__all__ = [
    "CheckReport",
    "Checkpoint",
    "CheckpointDiff",
    "Decision",
    "Dtype",
    "Fp8Plan",
    "Fp8Result",
    "HeuristicRules",
    "Layout",
    "PatternRules",
    "ReferenceRules",
    "MergePlan",
    "MergeResult",
    "Naming",
    "NormalizeError",
    "OutputPlan",
    "OutputTensor",
    "PlacementError",
    "PlacementPlan",
    "PlacementResult",
    "PlanBuilder",
    "ScaleDtype",
    "ScaleFormat",
    "Severity",
    "ShardHeader",
    "ShardKind",
    "ShardPlan",
    "ShardWriter",
    "TensorConflict",
    "TensorEntry",
    "TensorGroup",
    "TensorView",
    "VerifyReport",
    "WriteResult",
    "__version__",
    "check",
    "diff",
    "inspect_checkpoint",
    "merge",
    "offer_placement",
    "parse_size",
    "place",
    "quantize_block_fp8",
    "plan_fp8",
    "plan_merge",
    "plan_placement",
    "plan_repack",
    "plan_shards",
    "read_header",
    "repack",
    "to_fp8",
    "verify_checkpoint",
    "with_skip_patterns",
    "write_fp8",
]
