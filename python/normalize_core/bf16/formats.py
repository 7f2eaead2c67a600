"""Which block-FP8 form a checkpoint is in, and which scale belongs to which weight.

Two forms exist in the wild, told apart by ``config.json``:

- ``quant_method: "fp8"`` with ``weight_block_size`` (DeepSeek-V3/R1, Kimi-K2, Qwen3-FP8, MiniMax-M2,
  and ``to-fp8``'s output): each ``float8_e4m3fn`` weight ``<name>`` has ``<name>_scale_inv``.
- ``quant_method: "compressed-tensors"``, ``format: "float-quantized"`` with ``config_groups.*.weights``
  of ``strategy: "block"`` and a ``block_structure`` (llm-compressor's FP8_BLOCK): each
  ``<module>.weight`` has ``<module>.weight_scale``.

In both the scale is a multiplier (``x ≈ q · s``) laid out per tile as ``fp8/layout.py`` says; the
matching below checks every weight has its scale of that shape, and every scale its weight, from
headers alone. Activation scales (``<module>.input_scale``, static activation schemes) mean nothing
without FP8 weights and are dropped. No torch.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from normalize_core._core import TensorEntry
from normalize_core.errors import normalize_error
from normalize_core.fp8.layout import (
    FP8_WEIGHT_DTYPE,
    SCALE_SUFFIX,
    Tiling,
    halves_need_splitting,
    is_fp8_weight,
    is_scale_name,
    tiling,
)
from normalize_core.kinds import Dtype

#: Scale dtypes the kernel reads: float32 and bfloat16 in real releases; float16 and e8m0 (powers
#: of two) for completeness.
SCALE_DTYPES = (Dtype.F32, Dtype.BF16, Dtype.F16, Dtype.F8_E8M0)
#: llm-compressor's scale name for ``<module>.weight``.
WEIGHT_SCALE_SUFFIX = ".weight_scale"
#: Activation scales of static activation schemes.
INPUT_SCALE_SUFFIX = ".input_scale"
#: Zero points of asymmetric schemes (never FP8 block; refused rather than kept or dropped).
ZERO_POINT_SUFFIX = "_zero_point"
#: The config keys a quantization config is found under (transformers reads the first; older
#: compressed-tensors checkpoints wrote the second). Both are removed from the output.
CONFIG_KEYS = ("quantization_config", "compression_config")

SUPPORTED = (
    "to-bf16 reads block FP8: quant_method 'fp8' with weight_block_size, or compressed-tensors "
    "'float-quantized' with strategy 'block'"
)


@dataclass(frozen=True)
class BlockFp8Format:
    """A recognised block-FP8 form: how scales are named and the tile that shares one scale."""

    #: ``"fp8"`` (``<name>_scale_inv``) or ``"compressed-tensors"`` (``<module>.weight_scale``).
    method: str
    #: ``(rows, cols)`` of a tile (``weight_block_size`` / ``block_structure``).
    block: tuple[int, int]

    @property
    def scale_suffix(self) -> str:
        """How this form's scale names end."""
        return SCALE_SUFFIX if self.method == "fp8" else WEIGHT_SCALE_SUFFIX

    def scale_name(self, weight: str) -> str | None:
        """The scale tensor's name for FP8 weight ``weight`` (None: this form cannot scale it)."""
        if self.method == "fp8":
            return weight + SCALE_SUFFIX
        if weight.endswith(".weight"):
            return weight[: -len(".weight")] + WEIGHT_SCALE_SUFFIX
        return None

    def weight_name(self, scale: str) -> str:
        """The weight a scale named by this form belongs to."""
        if self.method == "fp8":
            return scale[: -len(SCALE_SUFFIX)]
        return scale[: -len(WEIGHT_SCALE_SUFFIX)] + ".weight"

    def describe(self) -> str:
        """One line for humans: method, block and scale naming."""
        naming = "<name>_scale_inv" if self.method == "fp8" else "<module>.weight_scale"
        return f"{self.method} block FP8, {self.block[0]}x{self.block[1]} blocks, scales {naming}"


def _unknown(message: str, config_path: Path) -> Exception:
    return normalize_error("unknown_quantization", f"{config_path}: {message}; {SUPPORTED}", file=str(config_path))


def _block(block: Any, where: str, config_path: Path) -> tuple[int, int]:
    """A ``[rows, cols]`` block size from the config."""
    if not (
        isinstance(block, Sequence)
        and not isinstance(block, str)
        and len(block) == 2
        and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)
    ):
        raise _unknown(f"{where} is {json.dumps(block)}, not two positive integers", config_path)
    return block[0], block[1]


def recognise_format(config: dict[str, Any] | None, config_path: Path) -> BlockFp8Format:
    """The block-FP8 form ``config`` declares. Raises ``NormalizeError`` (kind
    ``unknown_quantization``) for no config, no quantization config, or any other scheme."""
    if config is None:
        raise _unknown("does not exist, so the quantization format and block size are unknown", config_path)
    key = next((k for k in CONFIG_KEYS if isinstance(config.get(k), dict)), None)
    if key is None:
        raise _unknown("no quantization_config: not a quantized checkpoint, or its format is unknown", config_path)
    qconfig = config[key]
    method = qconfig.get("quant_method")
    if method == "fp8":
        if "weight_block_size" not in qconfig or qconfig["weight_block_size"] is None:
            raise _unknown("quant_method 'fp8' without weight_block_size is per-tensor FP8, not block FP8", config_path)
        if qconfig.get("fmt", "e4m3") != "e4m3":
            raise _unknown(f"{key}.fmt is {qconfig['fmt']!r}; block FP8 weights are e4m3", config_path)
        return BlockFp8Format("fp8", _block(qconfig["weight_block_size"], f"{key}.weight_block_size", config_path))
    if method == "compressed-tensors" or (method is None and "config_groups" in qconfig):
        return BlockFp8Format("compressed-tensors", _compressed_tensors_block(qconfig, key, config_path))
    raise _unknown(f"{key}.quant_method is {json.dumps(method)}", config_path)


def _compressed_tensors_block(qconfig: dict[str, Any], key: str, config_path: Path) -> tuple[int, int]:
    """The one block every config group of an llm-compressor FP8_BLOCK config uses."""
    groups = qconfig.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise _unknown(f"{key} is compressed-tensors without config_groups", config_path)
    blocks = set()
    for group_name, group in groups.items():
        where = f"{key}.config_groups.{group_name}"
        weights = group.get("weights") if isinstance(group, dict) else None
        if not isinstance(weights, dict):
            raise _unknown(f"{where} has no weights scheme", config_path)
        group_format = group.get("format") or qconfig.get("format")
        scheme = (weights.get("type"), weights.get("num_bits"), weights.get("strategy"))
        if group_format != "float-quantized" or scheme != ("float", 8, "block"):
            raise _unknown(
                f"{where} is format {json.dumps(group_format)}, weights type {json.dumps(scheme[0])}, "
                f"num_bits {json.dumps(scheme[1])}, strategy {json.dumps(scheme[2])}",
                config_path,
            )
        if weights.get("symmetric") is False:
            raise _unknown(f"{where}.weights is asymmetric (zero points)", config_path)
        blocks.add(_block(weights.get("block_structure"), f"{where}.weights.block_structure", config_path))
    if len(blocks) > 1:
        found = ", ".join(f"{r}x{c}" for r, c in sorted(blocks))
        raise _unknown(f"{key}.config_groups use different block sizes ({found})", config_path)
    return blocks.pop()


@dataclass(frozen=True)
class Fp8Weight:
    """One FP8 weight to dequantize, its scale tensor, and the tiling both follow."""

    name: str
    shape: tuple[int, ...]
    scale: TensorEntry
    #: The weight as ``batch`` matrices of ``rows × cols`` and the scale shape that tiling gives.
    tiling: Tiling
    #: A fused ``gate_up_proj`` quantized half by half (its halves are not whole blocks).
    split_halves: bool


@dataclass
class TensorRoles:
    """Every source tensor's fate: dequantized (with its scale), copied, or dropped."""

    #: FP8 weights, in checkpoint order.
    weights: dict[str, Fp8Weight]
    #: Scale tensors consumed by ``weights``.
    scales: list[str]
    #: Activation scales of the scheme, dropped.
    activation_scales: list[str]


def _malformed(kind: str, directory: Path, entry: TensorEntry, message: str) -> Exception:
    path = str(directory / entry.file)
    return normalize_error(kind, f"{path}: {message}", file=path, tensor=entry.name)


def assign_roles(entries: list[TensorEntry], fmt: BlockFp8Format, directory: Path) -> TensorRoles:
    """Pairs every FP8 weight with its scale (``directory`` holds the shards; messages name them).
    Raises ``NormalizeError`` for an FP8 weight without a scale (kind ``missing_scale``), a scale
    without an FP8 weight (``orphan_scale``), a scale of the wrong shape or dtype (``bad_scale``), an
    FP8 weight this form does not tile (``unsupported_fp8``), or zero points (``unknown_quantization``).
    Headers only."""
    by_name = {entry.name: entry for entry in entries}
    weights: dict[str, Fp8Weight] = {}
    for entry in entries:
        if is_fp8_weight(entry.name, entry.dtype):
            weights[entry.name] = _pair(entry, by_name, fmt, directory)
    scales = [weight.scale.name for weight in weights.values()]
    consumed = set(scales)
    activation_scales = []
    for entry in entries:
        name = entry.name
        if name.endswith(ZERO_POINT_SUFFIX):
            raise _malformed(
                "unknown_quantization",
                directory,
                entry,
                f"tensor '{name}' is a zero point of an asymmetric scheme; {SUPPORTED}",
            )
        if name.endswith(INPUT_SCALE_SUFFIX):
            activation_scales.append(name)
        elif is_scale_name(name) and name not in consumed:
            raise _malformed("orphan_scale", directory, entry, _orphan_message(entry, by_name, fmt))
    return TensorRoles(weights, scales, activation_scales)


def _pair(weight: TensorEntry, by_name: dict[str, TensorEntry], fmt: BlockFp8Format, directory: Path) -> Fp8Weight:
    name = weight.name
    if weight.dtype != FP8_WEIGHT_DTYPE:
        message = f"tensor '{name}' is {weight.dtype}; block FP8 weights are F8_E4M3"
        raise _malformed("unsupported_fp8", directory, weight, message)
    if len(weight.shape) not in (2, 3):
        message = f"tensor '{name}' is FP8 of shape {weight.shape}; block FP8 weights are 2-D or 3-D"
        raise _malformed("unsupported_fp8", directory, weight, message)
    scale_name = fmt.scale_name(name)
    scale = by_name.get(scale_name) if scale_name else None
    if scale is None:
        other = next((n for n in _scale_names_of_either_form(name) if n != scale_name and n in by_name), None)
        hint = f" (it has '{other}', which {fmt.method} checkpoints do not use)" if other else ""
        expected = f"'{scale_name}'" if scale_name else f"a scale ({fmt.method} scales only '<module>.weight' tensors)"
        message = f"tensor '{name}' is FP8 but has no {expected}{hint}; refusing to keep FP8 bytes in a bf16 checkpoint"
        raise _malformed("missing_scale", directory, weight, message)
    # As fp8/layout.py's quantized_layout decides for to-fp8's own output, for any block.
    split = name.endswith("gate_up_proj") and halves_need_splitting(weight.shape, fmt.block)
    tiles = tiling(weight.shape, fmt.block, split_halves=split)
    if scale.dtype not in SCALE_DTYPES:
        message = f"scale '{scale.name}' is {scale.dtype}, not one of {', '.join(SCALE_DTYPES)}"
        raise _malformed("bad_scale", directory, scale, message)
    if tuple(scale.shape) != tiles.scale_shape:
        message = (
            f"scale '{scale.name}' has shape {scale.shape}, but {name} of shape {weight.shape} in "
            f"{fmt.block[0]}x{fmt.block[1]} blocks needs {list(tiles.scale_shape)}"
        )
        raise _malformed("bad_scale", directory, scale, message)
    return Fp8Weight(name, tuple(weight.shape), scale, tiles, split)


def _scale_names_of_either_form(weight: str) -> list[str]:
    names = [weight + SCALE_SUFFIX]
    if weight.endswith(".weight"):
        names.append(weight[: -len(".weight")] + WEIGHT_SCALE_SUFFIX)
    return names


def _orphan_message(scale: TensorEntry, by_name: dict[str, TensorEntry], fmt: BlockFp8Format) -> str:
    if not scale.name.endswith(fmt.scale_suffix):
        return f"scale '{scale.name}' is not named as {fmt.method} checkpoints name scales (*{fmt.scale_suffix})"
    weight = by_name.get(fmt.weight_name(scale.name))
    if weight is None:
        return f"scale '{scale.name}' has no weight '{fmt.weight_name(scale.name)}'"
    return f"scale '{scale.name}' belongs to '{weight.name}', which is {weight.dtype}, not FP8"
