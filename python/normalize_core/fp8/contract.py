"""The on-disk contract of block-FP8 checkpoints, checked from headers and ``config.json``.

What vLLM, SGLang and transformers need: each ``float8_e4m3fn`` weight has a float32 or
bfloat16 ``<name>_scale_inv`` of ``ceil(N/b) × ceil(K/b)`` blocks (per expert for 3-D), a
``quantization_config`` with ``quant_method: fp8`` and ``activation_scheme``, a skip list that
never names a module whose weight is FP8, fused groups of one precision, and ``scale_fmt:
ue8m0`` only with power-of-two scales. No torch; scale tensors are read, weights are not.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from normalize_core._core import Checkpoint, TensorEntry
from normalize_core.config_file import quantization_config_of
from normalize_core.engines.verdicts import block_size_of
from normalize_core.findings import Finding
from normalize_core.fp8.groups import module_of, split_fused_groups
from normalize_core.fp8.layout import (
    FLOATING_DTYPES,
    FP8_WEIGHT_DTYPE,
    SCALE_SUFFIX,
    SCALE_TENSOR_DTYPES,
    halves_need_splitting,
    tiling,
)
from normalize_core.kinds import Severity
from normalize_core.words import plural


def block_scale_shapes(shape: list[int], block: tuple[int, int]) -> list[list[int]]:
    """Scale shapes an engine accepts for a weight: per-block over the last two dims, and for a
    fused ``[E, 2I, H]`` projection whose halves are not whole blocks, per half."""
    shapes = [list(tiling(shape, block).scale_shape)]
    if halves_need_splitting(shape, block):
        shapes.append(list(tiling(shape, block, split_halves=True).scale_shape))
    return shapes


def _block_scale_finding(
    weight: TensorEntry, tensors: dict[str, TensorEntry], block: tuple[int, int]
) -> tuple[str, str] | None:
    """What the headers say is wrong with an FP8 weight's ``_scale_inv`` (absent, of a dtype or shape
    engines refuse), or None when its values are worth reading."""
    scale = tensors.get(f"{weight.name}{SCALE_SUFFIX}")
    if scale is None:
        other = next((n for n in (f"{weight.name}_scale", f"{weight.name[:-7]}.weight_scale") if n in tensors), None)
        hint = f"; it has {other}, which block-FP8 loaders ignore" if other else ""
        return (Severity.ERROR, f"{weight.name} is FP8 but has no {weight.name}{SCALE_SUFFIX}{hint}")
    if scale.dtype not in SCALE_TENSOR_DTYPES.values():
        return (Severity.ERROR, f"{scale.name} is {scale.dtype}; engines expect F32 or BF16 scales")
    if scale.shape not in block_scale_shapes(weight.shape, block):
        return (
            Severity.ERROR,
            f"{scale.name} has shape {scale.shape}, expected {block_scale_shapes(weight.shape, block)[0]} "
            f"for {weight.shape} in {block[0]}x{block[1]} blocks",
        )
    return None


def orphan_scale_findings(tensors: dict[str, Any]) -> list[tuple[str, str]]:
    """Errors for ``<name>_scale_inv`` tensors whose ``<name>`` is missing or not FP8: the engine builds that
    layer unquantized, has no scale parameter to load them into and fails (or, with the tensor missing,
    loads nothing for it)."""
    missing, not_fp8 = [], []
    for name, scale in tensors.items():
        if name.endswith(SCALE_SUFFIX):
            weight = tensors.get(name[: -len(SCALE_SUFFIX)])
            if weight is None:
                missing.append(scale.name)
            elif weight.dtype != FP8_WEIGHT_DTYPE:
                not_fp8.append((scale.name, weight))
    findings = []
    if missing:
        findings.append(
            (
                Severity.ERROR,
                f"orphan scales: {plural(len(missing), 'scale tensor')} for weights absent from this checkpoint, "
                f"e.g. {missing[0]}",
            )
        )
    if not_fp8:
        scale, weight = not_fp8[0]
        findings.append(
            (
                Severity.ERROR,
                f"orphan scales: {plural(len(not_fp8), 'scale tensor')} for weights that are not FP8, e.g. {scale} for "
                f"{weight.name} ({weight.dtype}); engines have no parameter to load them into",
            )
        )
    return findings


def unknown_skip_entries(skip: list[str], tensors: dict[str, Any]) -> list[str]:
    """``modules_to_not_convert`` entries that name nothing in the checkpoint: not a tensor, not a module
    (a tensor name's dotted prefix) and not the trailing name of one (``gate`` for every router, as
    MiniMax-M2 writes it; transformers matches entries as substrings)."""
    # Most entries name a module with a weight, or a tensor: settled without listing every module.
    unsettled = [e for e in skip if e not in tensors and f"{e}.weight" not in tensors and f"{e}.bias" not in tensors]
    if not unsettled:
        return []
    modules = set(tensors)
    level = {name.rpartition(".")[0] for name in tensors}
    while level:
        modules |= level
        level = {module.rpartition(".")[0] for module in level} - modules - {""}
    unknown = {entry for entry in unsettled if entry not in modules}
    if unknown:
        unknown -= {module.rpartition(".")[2] for module in modules}
    if unknown:
        # Trailing names of several segments (``mlp.gate``): every suffix of every module, looked up.
        for module in modules:
            at = module.find(".")
            while at >= 0 and unknown:
                unknown.discard(module[at + 1 :])
                at = module.find(".", at + 1)
    return [entry for entry in skip if entry in unknown]


def fp8_findings(
    checkpoint: Checkpoint,
    config: dict[str, Any] | None,
    *,
    read_scales: bool = True,
    entries: Sequence[TensorEntry] | None = None,
) -> list[Finding]:
    """``(severity, message)`` for every way this checkpoint breaks the block-FP8 contract.
    Empty for checkpoints without FP8 weights, scale tensors and an FP8 ``quantization_config``.
    With ``read_scales=False`` only headers are read (scale values are not checked); ``entries`` are
    ``checkpoint.tensors`` when the caller already has them."""
    qconfig = quantization_config_of(config)
    is_fp8_config = qconfig.get("quant_method") == "fp8"
    tensors = {t.name: t for t in (checkpoint.tensors if entries is None else entries)}
    fp8 = [t for t in tensors.values() if t.dtype == FP8_WEIGHT_DTYPE]
    findings = orphan_scale_findings(tensors)
    if not fp8:
        if is_fp8_config:
            findings.append(
                (
                    Severity.ERROR,
                    "config.json has an FP8 quantization_config but no weight is FP8: engines would read the "
                    "unquantized weights as FP8 (a stale quantization_config)",
                )
            )
        return findings
    block = block_size_of(config)
    block_scheme = bool(qconfig.get("weight_block_size")) or any(f"{t.name}{SCALE_SUFFIX}" in tensors for t in fp8)
    findings += _scheme_findings(qconfig, block, block_scheme, tensors, fp8)
    if block_scheme:
        ue8m0 = qconfig.get("scale_fmt") == "ue8m0"
        findings += _block_scale_findings(checkpoint, tensors, fp8, block, ue8m0, read_scales)
    if not is_fp8_config:
        findings.append(
            (Severity.ERROR, "FP8 weights but config.json has no quantization_config with quant_method 'fp8'")
        )
        return findings
    return findings + _config_findings(qconfig, tensors, fp8)


def _scheme_findings(
    qconfig: dict[str, Any],
    block: tuple[int, int],
    block_scheme: bool,
    tensors: dict[str, TensorEntry],
    fp8: list[TensorEntry],
) -> list[Finding]:
    """Whether ``weight_block_size`` says what the scales are: block scales need it, and per-tensor or
    per-channel FP8 (``<name>_scale``) needs a scale for every weight."""
    findings = []
    if qconfig.get("weight_block_size") not in (None, list(block)):
        found = qconfig["weight_block_size"]
        findings.append((Severity.ERROR, f"weight_block_size {found!r} is not [block_n, block_k]"))
    if block_scheme and qconfig.get("quant_method") == "fp8" and not qconfig.get("weight_block_size"):
        findings.append(
            (
                Severity.ERROR,
                "quantization_config has no weight_block_size, but the FP8 weights have block scales "
                f"(*{SCALE_SUFFIX}): engines would load them as per-tensor FP8",
            )
        )
    elif not block_scheme:
        # Per-tensor and per-channel FP8 name the scale <name>_scale (``….weight_scale``).
        unscaled = [t.name for t in fp8 if f"{t.name}_scale" not in tensors]
        if unscaled:
            message = f"{plural(len(unscaled), 'FP8 weight')} without any scale tensor, e.g. {unscaled[0]}"
            findings.append((Severity.ERROR, message))
    return findings


def _block_scale_findings(
    checkpoint: Checkpoint,
    tensors: dict[str, TensorEntry],
    fp8: list[TensorEntry],
    block: tuple[int, int],
    ue8m0: bool,
    read_scales: bool,
) -> list[Finding]:
    """Each FP8 weight's ``_scale_inv``: present, of a dtype and shape engines take, and (with
    ``read_scales``) holding finite positive values, powers of two under ``ue8m0``."""
    findings = []
    checked = [(f"{w.name}{SCALE_SUFFIX}", _block_scale_finding(w, tensors, block)) for w in fp8]
    readable = [scale for scale, finding in checked if finding is None] if read_scales else []
    # One call reads every scale: a large MoE checkpoint has tens of thousands of them.
    values = dict(zip(readable, checkpoint.scale_properties(readable), strict=True))
    for scale, finding in checked:
        found = values.get(scale)
        if finding is not None:
            findings.append(finding)
        elif found is None:
            continue  # values not read (read_scales=False)
        elif not found.finite_positive:
            findings.append((Severity.ERROR, f"{scale} holds a zero, negative, NaN or infinite scale"))
        elif ue8m0 and not found.powers_of_two:
            findings.append(
                (
                    Severity.ERROR,
                    f"scale_fmt is ue8m0 but {scale} has scales that are not powers of two "
                    "(transformers would round them and corrupt the weights)",
                )
            )
    return findings


def _config_findings(qconfig: dict[str, Any], tensors: dict[str, TensorEntry], fp8: list[TensorEntry]) -> list[Finding]:
    """An FP8 ``quantization_config`` against the weights: ``activation_scheme`` present, a skip list
    naming real modules, none of them FP8, every unquantized 2-D weight in it, fused groups of one
    precision."""
    findings = []
    if qconfig.get("activation_scheme") is None:
        findings.append((Severity.ERROR, "quantization_config lacks activation_scheme (vLLM and SGLang require it)"))
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
        findings.append((Severity.ERROR, f"{module} is listed in modules_to_not_convert but its weight is FP8"))
    if unknown := unknown_skip_entries(list(skip), tensors):
        findings.append(
            (
                Severity.ERROR,
                f"modules_to_not_convert: {plural(len(unknown), 'entry', 'entries')} naming no module of this "
                f"checkpoint, e.g. {unknown[0]!r} (written for another layout? the modules meant are then not skipped)",
            )
        )
    unlisted = sorted(
        m
        for m in kept_modules - set(skip)
        if len(tensors[f"{m}.weight"].shape if f"{m}.weight" in tensors else []) >= 2
    )
    if unlisted:
        findings.append(
            (
                Severity.WARNING,
                f"{len(unlisted)} unquantized 2-D weights are not in modules_to_not_convert "
                f"(an engine may expect FP8 there), e.g. {unlisted[0]}",
            )
        )
    for problem in split_fused_groups(fp8_modules, kept_modules):
        findings.append((Severity.ERROR, problem))
    return findings
