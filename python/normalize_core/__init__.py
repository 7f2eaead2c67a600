"""model-normalize: safetensors checkpoints that transformers, vLLM and SGLang load as-is.

The index tooling (headers, indexes, plans, writers) comes from the Rust extension; the
functions below drive it. Every public name is imported from its module when first used, so
``import normalize_core`` costs almost nothing and imports neither torch nor the command-line
packages. ``to_fp8`` and ``to_bf16`` on the CPU never import torch (Rust kernels quantize and
dequantize); ``quantize_block_fp8`` and ``dequantize_block_fp8``, which take torch tensors, import it.

>>> import normalize_core
>>> ckpt = normalize_core.Checkpoint.open("path/to/checkpoint")   # doctest: +SKIP
>>> plan = normalize_core.plan_shards(ckpt, max_shard_bytes=4 << 30)   # doctest: +SKIP
>>> normalize_core.check("path/to/fp8-checkpoint", tp=(1, 2, 4, 8)).loads_at()   # doctest: +SKIP
[1, 2, 4]
"""

from __future__ import annotations

import importlib
import sys
import types

#: Public name → the module that defines it (one line per name: adding an export is one line).
_EXPORTS = {
    "Bf16Plan": "normalize_core.bf16.convert",
    "Bf16Result": "normalize_core.bf16.convert",
    "CheckReport": "normalize_core.check",
    "Checkpoint": "normalize_core._core",
    "CheckpointDiff": "normalize_core.diff",
    "Decision": "normalize_core.fp8.rules",
    "Dtype": "normalize_core.kinds",
    "Fp8Plan": "normalize_core.fp8.convert",
    "Fp8Result": "normalize_core.fp8.convert",
    "HeuristicRules": "normalize_core.fp8.rules",
    "Layout": "normalize_core.kinds",
    "MergePlan": "normalize_core.merge",
    "MergeResult": "normalize_core.merge",
    "Naming": "normalize_core.kinds",
    "NormalizeError": "normalize_core._core",
    "OutputPlan": "normalize_core._core",
    "OutputTensor": "normalize_core._core",
    "PatternRules": "normalize_core.fp8.rules",
    "PlacementError": "normalize_core.place",
    "PlacementPlan": "normalize_core.place",
    "PlacementResult": "normalize_core.place",
    "PlanBuilder": "normalize_core._core",
    "ReferenceRules": "normalize_core.fp8.rules",
    "ScaleDtype": "normalize_core.kinds",
    "ScaleFormat": "normalize_core.kinds",
    "Severity": "normalize_core.kinds",
    "ShardHeader": "normalize_core._core",
    "ShardKind": "normalize_core.kinds",
    "ShardPlan": "normalize_core._core",
    "ShardWriter": "normalize_core._core",
    "TensorConflict": "normalize_core.diff",
    "TensorEntry": "normalize_core._core",
    "TensorGroup": "normalize_core._core",
    "TensorView": "normalize_core._core",
    "VerifyReport": "normalize_core.report",
    "WriteResult": "normalize_core.repack",
    "__version__": "normalize_core._core",
    "check": "normalize_core.check",
    "dequantize_block_fp8": "normalize_core.bf16.dequantize",
    "diff": "normalize_core.diff",
    "inspect_checkpoint": "normalize_core.report",
    "merge": "normalize_core.merge",
    "parse_device": "normalize_core.devices",
    "parse_size": "normalize_core.sizes",
    "place": "normalize_core.place",
    "plan_bf16": "normalize_core.bf16.convert",
    "plan_fp8": "normalize_core.fp8.convert",
    "plan_merge": "normalize_core.merge",
    "plan_placement": "normalize_core.place",
    "plan_repack": "normalize_core.repack",
    "plan_shards": "normalize_core._core",
    "quantize_block_fp8": "normalize_core.fp8.quantize",
    "read_header": "normalize_core._core",
    "repack": "normalize_core.repack",
    "to_bf16": "normalize_core.bf16.convert",
    "to_fp8": "normalize_core.fp8.convert",
    "verify_checkpoint": "normalize_core.report",
    "with_skip_patterns": "normalize_core.fp8.rules",
    "write_bf16": "normalize_core.bf16.convert",
    "write_fp8": "normalize_core.fp8.convert",
    "write_sample_checkpoint": "normalize_core.sample",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'normalize_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


class _Package(types.ModuleType):
    """Importing a submodule binds it as an attribute of this package. Where a public function
    has the module's name (``diff``, ``merge``, ``place``, ``repack``), the function keeps it."""

    def __setattr__(self, name: str, value: object) -> None:
        if isinstance(value, types.ModuleType) and name in _EXPORTS:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
