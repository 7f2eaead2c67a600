"""The on-disk contract of block-FP8 checkpoints, checked from headers and ``config.json``.

What vLLM, SGLang and transformers need: each ``float8_e4m3fn`` weight has a float32 or
bfloat16 ``<name>_scale_inv`` of ``ceil(N/b) × ceil(K/b)`` blocks (per expert for 3-D), a
``quantization_config`` with ``quant_method: fp8`` and ``activation_scheme``, a skip list that
never names a module whose weight is FP8, fused groups of one precision, and ``scale_fmt:
ue8m0`` only with power-of-two scales. No torch; scale tensors are read, weights are not.
"""

from __future__ import annotations

import math
from array import array
from typing import Any

from normalize_core._core import Checkpoint
from normalize_core.fp8.config import FLOATING_DTYPES
from normalize_core.fp8.groups import module_of, split_fused_groups
from normalize_core.fp8.layout import (
    DEFAULT_BLOCK_SIZE,
    FP8_WEIGHT_DTYPE,
    SCALE_SUFFIX,
    SCALE_TENSOR_DTYPES,
    halves_need_splitting,
    tiling,
)


def block_scale_shapes(shape: list[int], block: tuple[int, int]) -> list[list[int]]:
    """Scale shapes an engine accepts for a weight: per-block over the last two dims, and for a
    fused ``[E, 2I, H]`` projection whose halves are not whole blocks, per half."""
    shapes = [list(tiling(shape, block).scale_shape)]
    if halves_need_splitting(shape, block):
        shapes.append(list(tiling(shape, block, split_halves=True).scale_shape))
    return shapes


def _read_array(checkpoint: Checkpoint, name: str, typecode: str) -> array:
    """A tensor's bytes as an ``array`` of ``typecode`` (little-endian, as this machine)."""
    values = array(typecode)
    values.frombytes(memoryview(checkpoint.view(name)))
    return values


def _scales_are_powers_of_two(checkpoint: Checkpoint, name: str, dtype: str) -> bool:
    if dtype == "F32":
        return all(bits & 0x7FFFFF == 0 for bits in _read_array(checkpoint, name, "I"))
    return all(bits & 0x7F == 0 for bits in _read_array(checkpoint, name, "H"))


def _scale_values_ok(checkpoint: Checkpoint, name: str, dtype: str) -> bool:
    """Every scale finite and positive."""
    if dtype == "F32":
        values = _read_array(checkpoint, name, "f")
    else:
        # bfloat16 is the top half of a float32.
        values = array("f")
        values.frombytes(b"".join(b"\0\0" + h.to_bytes(2, "little") for h in _read_array(checkpoint, name, "H")))
    return all(v > 0 and math.isfinite(v) for v in values)


def fp8_findings(checkpoint: Checkpoint, config: dict[str, Any] | None) -> list[tuple[str, str]]:
    """``(severity, message)`` for every way this checkpoint breaks the block-FP8 contract.
    Empty for checkpoints without FP8 weights and without an FP8 ``quantization_config``."""
    qconfig = (config or {}).get("quantization_config") or {}
    is_fp8_config = qconfig.get("quant_method") == "fp8"
    tensors = {t.name: t for t in checkpoint.tensors}
    fp8 = [t for t in tensors.values() if t.dtype == FP8_WEIGHT_DTYPE]
    if not fp8 and not is_fp8_config:
        return []
    findings: list[tuple[str, str]] = []
    block_size = qconfig.get("weight_block_size") or [DEFAULT_BLOCK_SIZE, DEFAULT_BLOCK_SIZE]
    block = (int(block_size[0]), int(block_size[1]))
    block_scheme = bool(qconfig.get("weight_block_size")) or any(f"{t.name}{SCALE_SUFFIX}" in tensors for t in fp8)
    ue8m0 = qconfig.get("scale_fmt") == "ue8m0"

    if block_scheme:
        for weight in fp8:
            scale = tensors.get(f"{weight.name}{SCALE_SUFFIX}")
            if scale is None:
                other = next(
                    (n for n in (f"{weight.name}_scale", f"{weight.name[:-7]}.weight_scale") if n in tensors), None
                )
                hint = f"; it has {other}, which block-FP8 loaders ignore" if other else ""
                findings.append(("error", f"{weight.name} is FP8 but has no {weight.name}{SCALE_SUFFIX}{hint}"))
                continue
            if scale.dtype not in SCALE_TENSOR_DTYPES.values():
                findings.append(("error", f"{scale.name} is {scale.dtype}; engines expect F32 or BF16 scales"))
                continue
            if scale.shape not in block_scale_shapes(weight.shape, block):
                findings.append(
                    (
                        "error",
                        f"{scale.name} has shape {scale.shape}, expected {block_scale_shapes(weight.shape, block)[0]} "
                        f"for {weight.shape} in {block[0]}x{block[1]} blocks",
                    )
                )
                continue
            if not _scale_values_ok(checkpoint, scale.name, scale.dtype):
                findings.append(("error", f"{scale.name} holds a zero, negative, NaN or infinite scale"))
            elif ue8m0 and not _scales_are_powers_of_two(checkpoint, scale.name, scale.dtype):
                findings.append(
                    (
                        "error",
                        f"scale_fmt is ue8m0 but {scale.name} has scales that are not powers of two "
                        "(transformers would round them and corrupt the weights)",
                    )
                )

    if fp8 and not is_fp8_config:
        findings.append(("error", "FP8 weights but config.json has no quantization_config with quant_method 'fp8'"))
        return findings
    if not is_fp8_config:
        return findings
    if qconfig.get("activation_scheme") is None:
        findings.append(("error", "quantization_config lacks activation_scheme (vLLM and SGLang require it)"))
    fp8_modules = {m for t in fp8 if (m := module_of(t.name))}
    kept_modules = {
        m
        for t in tensors.values()
        if t.dtype in FLOATING_DTYPES
        and not t.name.endswith(SCALE_SUFFIX)
        and (m := module_of(t.name))
        and m not in fp8_modules
    }
    skip = qconfig.get("modules_to_not_convert")
    if skip is None:
        skip = qconfig.get("ignored_layers") or []
    for module in sorted(set(skip) & fp8_modules):
        findings.append(("error", f"{module} is listed in modules_to_not_convert but its weight is FP8"))
    unlisted = sorted(
        m
        for m in kept_modules - set(skip)
        if len(tensors[f"{m}.weight"].shape if f"{m}.weight" in tensors else []) >= 2
    )
    if unlisted:
        findings.append(
            (
                "warning",
                f"{len(unlisted)} unquantized 2-D weights are not in modules_to_not_convert "
                f"(an engine may expect FP8 there), e.g. {unlisted[0]}",
            )
        )
    for problem in split_fused_groups(fp8_modules, kept_modules):
        findings.append(("error", problem))
    return findings
