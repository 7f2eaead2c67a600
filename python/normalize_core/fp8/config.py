"""The ``quantization_config`` block of ``config.json`` and the skip list inside it.

``modules_to_not_convert`` holds exactly the modules whose weight stays unquantized: full
names without ``.weight``, every kept Linear (routers, ``lm_head``, …) included, never a module
whose weight is FP8 (vLLM matches these names exactly and would read FP8 bytes as bf16).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from normalize_core.config_file import load_config, write_config
from normalize_core.errors import normalize_error
from normalize_core.fp8.groups import module_of, split_fused_groups
from normalize_core.fp8.layout import FLOATING_DTYPES
from normalize_core.kinds import ScaleFormat


def module_sets(quantized: Iterable[str], kept: Iterable[str], dtypes: Mapping[str, str]) -> tuple[set[str], set[str]]:
    """``(modules whose weight becomes FP8, modules whose floating weight stays)`` from tensor names."""
    fp8 = {m for name in quantized if (m := module_of(name))}
    stays = {m for name in kept if dtypes[name] in FLOATING_DTYPES and (m := module_of(name))} - fp8
    return fp8, stays


def check_fused_groups(fp8_modules: set[str], kept_modules: set[str]) -> None:
    """Raises ``NormalizeError`` when modules an engine fuses into one layer would differ in precision."""
    problems = split_fused_groups(fp8_modules, kept_modules)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise normalize_error(
            "split_fused_group",
            f"{problems[0]}{more}; quantize or keep the whole group (adjust --quantize-pattern / --skip-pattern)",
        )


def fp8_quantization_config(
    modules_to_not_convert: list[str], *, block_size: int, scale_fmt: ScaleFormat
) -> dict[str, Any]:
    """The block written to ``config.json``. ``scale_fmt`` appears only for ue8m0 (power-of-two
    scales); ``ignored_layers`` mirrors the skip list for older vLLM."""
    config: dict[str, Any] = {
        "quant_method": "fp8",
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "weight_block_size": [block_size, block_size],
    }
    if scale_fmt == ScaleFormat.UE8M0:
        config["scale_fmt"] = ScaleFormat.UE8M0.value
    config["modules_to_not_convert"] = list(modules_to_not_convert)
    config["ignored_layers"] = list(modules_to_not_convert)
    return config


def write_quantized_config(source_config: Path, output_config: Path, quantization_config: dict[str, Any]) -> bool:
    """Writes ``output_config`` (atomically) as ``source_config`` plus ``quantization_config``, every
    other key and its order kept. Returns False, writing nothing, when the source has no config.json;
    raises ``NormalizeError`` when it is not a JSON object, or not a regular file (see ``config_file``)."""
    config = load_config(source_config)
    if config is None:
        return False
    config["quantization_config"] = quantization_config
    write_config(output_config, config)
    return True
