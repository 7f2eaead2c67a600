"""``check``: at which tensor-parallel sizes vLLM or SGLang will load a checkpoint, before any GPU is involved.

From headers and ``config.json`` only (no tensor data, no torch): the engine model (``engines``) classifies
every linear layer the way the engine builds it and applies the engine's load-time checks at each TP size;
the format checks (``fp8.contract``) add the problems that fail a load at any size: missing or misshapen
``_scale_inv`` scales, orphan scales, a missing ``weight_block_size``, skip-list entries naming nothing or an
FP8 module, fused groups of mixed precision, MTP layers the config does not declare, a stale
``quantization_config``.

A block-FP8 checkpoint is checked as it is. An unquantized one is checked as ``to-fp8`` would write it with
its default decisions (layers that would not load at TP 1 kept unquantized), so a failure at a larger TP
size says which layers ``to-fp8 --tp N`` would keep.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from normalize_core._core import Checkpoint, TensorEntry
from normalize_core.config_file import quantization_config_of, read_config
from normalize_core.engines import Engine, LayerKind, Parallelism, RuleBook, architecture_of, engine_layers
from normalize_core.engines.architecture import mtp_findings
from normalize_core.engines.loadability import keep_unloadable, kept_layers
from normalize_core.engines.verdicts import TpVerdict, block_size_of, tp_verdict
from normalize_core.errors import normalize_error
from normalize_core.findings import Finding, findings_as_json, has_errors
from normalize_core.fp8.contract import fp8_findings
from normalize_core.fp8.layout import DEFAULT_BLOCK_SIZE, FP8_DTYPES, FP8_WEIGHT_DTYPE
from normalize_core.fp8.rules import HeuristicRules, decide_all

DEFAULT_TP = (1, 2, 4, 8)


@dataclass
class CheckReport:
    """What ``check`` found: a verdict per TP size, format findings and notes on how it was checked."""

    path: Path
    engine: str
    expert_parallel: bool
    #: ``architectures[0]`` of config.json (or ``unknown``) and the modeled family, if any.
    architecture: str
    family: str | None
    #: ``"fp8"``: the checkpoint's own FP8 weights; ``"bf16"``: what ``to-fp8`` would write from it.
    checked: str
    block_size: tuple[int, int]
    tensors: int
    verdicts: list[TpVerdict]
    #: ``(severity, message)``: errors fail the check at every TP size, warnings do not.
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: Unquantized sources: ``{layer: why}`` for the layers ``to-fp8`` keeps so its output loads at TP 1.
    kept_to_load: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Every requested TP size loads and no finding is an error."""
        return all(v.loads for v in self.verdicts) and not has_errors(self.findings)

    def loads_at(self) -> list[int]:
        """The requested TP sizes that load (ignoring format errors, which fail all of them)."""
        return [v.tp for v in self.verdicts if v.loads]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (what ``normalize check --json`` prints)."""
        return {
            "path": str(self.path),
            "ok": self.ok,
            "engine": self.engine,
            "expert_parallel": self.expert_parallel,
            "architecture": self.architecture,
            "family": self.family,
            "checked": self.checked,
            "block_size": list(self.block_size),
            "tensors": self.tensors,
            "tp": [v.as_dict() for v in self.verdicts],
            "findings": findings_as_json(self.findings),
            "notes": self.notes,
            "kept_to_load": self.kept_to_load,
        }


def tp_sizes(values: Iterable[int]) -> tuple[int, ...]:
    """Positive TP sizes, each once, in the order given; ``ValueError`` otherwise."""
    sizes: list[int] = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"TP sizes must be positive integers, not {value!r}")
        if value not in sizes:
            sizes.append(value)
    if not sizes:
        raise ValueError("give at least one TP size")
    return tuple(sizes)


def check(
    path: str | os.PathLike,
    tp: Iterable[int] = DEFAULT_TP,
    engine: str = "vllm",
    expert_parallel: bool = False,
) -> CheckReport:
    """Checks that ``engine`` (``"vllm"`` or ``"sglang"``) loads the checkpoint at each TP size in ``tp``
    (with ``expert_parallel``, MoE experts are spread over the ranks instead of split).

    Raises ``NormalizeError`` for a checkpoint that cannot be read or is quantized with another scheme,
    ``ValueError`` for bad arguments.
    """
    sizes = tp_sizes(tp)
    engine_kind = _engine(engine)
    directory = Path(path)
    checkpoint = Checkpoint.open(directory)
    config = read_config(directory)
    config = config if isinstance(config, dict) else None
    entries = checkpoint.tensors
    as_written = _as_written(directory, config, entries)
    findings = fp8_findings(checkpoint, config, read_scales=False, entries=entries)
    architecture = architecture_of(config)
    layers = engine_layers(as_written.weights, architecture)
    findings += mtp_findings(architecture, (e.name for e in entries))
    book = RuleBook()
    parallel = [Parallelism(t, expert_parallel, engine_kind, as_written.block) for t in sizes]
    return CheckReport(
        path=directory,
        engine=engine_kind.value,
        expert_parallel=expert_parallel,
        architecture=architecture.name,
        family=architecture.family,
        checked=as_written.checked,
        block_size=as_written.block,
        tensors=len(entries),
        verdicts=[tp_verdict(layers, p, book) for p in parallel],
        findings=findings,
        notes=as_written.notes + _classification_notes(architecture, config, layers),
        kept_to_load=as_written.kept,
    )


def _engine(engine: str) -> Engine:
    try:
        return Engine(engine)
    except ValueError:
        raise ValueError(f"engine must be vllm or sglang, not {engine!r}") from None


class _Checked(NamedTuple):
    """The weights as the engine will load them: ``(name, shape, is FP8)``, the block size, what was
    checked (``CheckReport.checked``), the layers to-fp8 keeps to load, and how it was checked."""

    weights: Iterable[tuple[str, list[int], bool]]
    block: tuple[int, int]
    checked: str
    kept: dict[str, str]
    notes: list[str]


def _as_written(directory: Path, config: dict[str, Any] | None, entries: list[TensorEntry]) -> _Checked:
    """A block-FP8 checkpoint as it is; an unquantized one as to-fp8 would write it. Raises
    ``NormalizeError`` for another quantization method."""
    method = quantization_config_of(config).get("quant_method")
    if method not in (None, "fp8"):
        raise normalize_error(
            "unsupported_quantization",
            f"{directory}: quant_method {method!r} is not block FP8; check models block-FP8 (quant_method 'fp8') "
            "and unquantized checkpoints",
            file=str(directory),
        )
    if method == "fp8" or any(entry.dtype in FP8_DTYPES for entry in entries):
        weights = ((e.name, e.shape, e.dtype == FP8_WEIGHT_DTYPE) for e in entries)
        return _Checked(weights, block_size_of(config), "fp8", {}, [])
    weights, kept = _as_to_fp8_writes(entries, config)
    note = "unquantized checkpoint: checked as `normalize to-fp8` would write it (default rules, 128x128 blocks)"
    return _Checked(weights, (DEFAULT_BLOCK_SIZE, DEFAULT_BLOCK_SIZE), "bf16", kept, [note])


def _as_to_fp8_writes(
    entries: list[TensorEntry], config: dict[str, Any] | None
) -> tuple[list[tuple[str, list[int], bool]], dict[str, str]]:
    """``(name, shape, becomes FP8)`` under to-fp8's default decisions, and the layers kept to load at TP 1."""
    decisions = decide_all(((e.name, e.dtype, e.shape) for e in entries), HeuristicRules())
    decisions = keep_unloadable(entries, decisions, config, (1,))
    kept = {layer: decision.problem for layer, decision in kept_layers(decisions).items()}
    weights = [(e.name, e.shape, d.quantize) for e, d in zip(entries, decisions, strict=True)]
    return weights, kept


def _classification_notes(architecture, config: dict[str, Any] | None, layers) -> list[str]:
    notes = []
    if config is None:
        notes.append("no readable config.json: head counts unknown, sizes read from the weights' shapes")
    elif architecture.family is None:
        notes.append(f"architecture {architecture.name} is not modeled: layers classified by their module names")
    guessed_qkv = [layer for layer in layers if layer.kind is LayerKind.QKV and layer.heads is None and layer.fp8]
    if guessed_qkv:
        notes.append(
            f"{len(guessed_qkv)} q/k/v layers (e.g. {guessed_qkv[0].name}) checked as evenly split merged layers: "
            "config.json's head counts do not explain their shapes"
        )
    unknown = [layer for layer in layers if layer.kind is LayerKind.UNCLASSIFIED and layer.fp8]
    if unknown:
        notes.append(
            f"{len(unknown)} FP8 layers of no known kind (e.g. {unknown[0].name}) checked as both column- and "
            "row-parallel"
        )
    return notes
