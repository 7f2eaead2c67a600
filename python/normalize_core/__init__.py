"""model-normalize: safetensors checkpoints that transformers, vLLM and SGLang load as-is.

The index tooling (headers, indexes, plans, writers) comes from the Rust extension; the
functions below drive it. Importing this package does not import torch; ``to_fp8`` and
``quantize_block_fp8`` do, when first used.

>>> import normalize_core
>>> ckpt = normalize_core.Checkpoint.open("path/to/checkpoint")   # doctest: +SKIP
>>> plan = normalize_core.plan_shards(ckpt, max_shard_bytes=4 << 30)   # doctest: +SKIP
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
from normalize_core.diff import CheckpointDiff, TensorConflict, diff
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

__all__ = [
    "Checkpoint",
    "CheckpointDiff",
    "MergePlan",
    "MergeResult",
    "NormalizeError",
    "OutputPlan",
    "OutputTensor",
    "PlacementError",
    "PlacementPlan",
    "PlacementResult",
    "PlanBuilder",
    "ShardHeader",
    "ShardPlan",
    "ShardWriter",
    "TensorConflict",
    "TensorEntry",
    "TensorGroup",
    "TensorView",
    "VerifyReport",
    "WriteResult",
    "__version__",
    "diff",
    "inspect_checkpoint",
    "merge",
    "offer_placement",
    "parse_size",
    "place",
    "plan_merge",
    "plan_placement",
    "plan_repack",
    "plan_shards",
    "read_header",
    "repack",
    "verify_checkpoint",
]
