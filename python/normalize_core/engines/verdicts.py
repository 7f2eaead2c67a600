"""Per TP size: does every layer load, and if not, which layers fail and why (grouped by reason); and the
engine checks ``verify`` runs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from normalize_core._core import TensorEntry
from normalize_core.config_file import quantization_config_of
from normalize_core.engines.architecture import architecture_of, mtp_findings
from normalize_core.engines.layers import EngineLayer, engine_layers
from normalize_core.engines.tp_rules import Parallelism, RuleBook
from normalize_core.fp8.layout import DEFAULT_BLOCK_SIZE, FP8_WEIGHT_DTYPE
from normalize_core.kinds import Severity


@dataclass(frozen=True)
class LayerFailure:
    """The first layer that fails for one reason, and how many fail for the same reason."""

    layer: str
    kind: str
    problem: str
    layers: int

    def line(self) -> str:
        """``model.layers.0.mlp.experts (fused MoE): …; 94 layers alike``."""
        alike = f" ({self.layers} layers alike)" if self.layers > 1 else ""
        return f"{self.layer} ({self.kind}): {self.problem}{alike}"


@dataclass(frozen=True)
class TpVerdict:
    """Whether the checkpoint loads at one TP size, with the failures in layer order."""

    tp: int
    failures: tuple[LayerFailure, ...]

    @property
    def loads(self) -> bool:
        """No layer fails at this TP size."""
        return not self.failures

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: ``{"tp", "loads", "failures": [{"layer", "kind", "problem", "layers"}]}``."""
        return {
            "tp": self.tp,
            "loads": self.loads,
            "failures": [
                {"layer": f.layer, "kind": f.kind, "problem": f.problem, "layers": f.layers} for f in self.failures
            ],
        }


def tp_verdict(layers: Sequence[EngineLayer], parallel: Parallelism, book: RuleBook) -> TpVerdict:
    """Evaluates every layer at ``parallel``; failures with the same message are counted under the first."""
    first: dict[str, tuple[EngineLayer, int]] = {}
    for layer in layers:
        problem = book.problem(layer, parallel)
        if problem is not None:
            seen = first.get(problem.message)
            first[problem.message] = (seen[0], seen[1] + 1) if seen else (layer, 1)
    failures = tuple(
        LayerFailure(layer.name, str(layer.kind), message, count) for message, (layer, count) in first.items()
    )
    return TpVerdict(parallel.tp, failures)


def block_size_of(config: dict[str, Any] | None) -> tuple[int, int]:
    """``quantization_config.weight_block_size`` as ``(block_n, block_k)``, else 128 x 128."""
    block = quantization_config_of(config).get("weight_block_size")
    if isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block):
        return block[0], block[1]
    return DEFAULT_BLOCK_SIZE, DEFAULT_BLOCK_SIZE


def engine_findings(entries: Sequence[TensorEntry], config: dict[str, Any] | None) -> list[tuple[str, str]]:
    """``verify``'s engine checks: MTP layers against the config, and for an FP8 checkpoint an error per
    reason vLLM refuses to load it at TP 1."""
    architecture = architecture_of(config)
    findings = mtp_findings(architecture, [entry.name for entry in entries])
    if not any(entry.dtype == FP8_WEIGHT_DTYPE for entry in entries):
        return findings
    weights = ((entry.name, entry.shape, entry.dtype == FP8_WEIGHT_DTYPE) for entry in entries)
    layers = engine_layers(weights, architecture)
    verdict = tp_verdict(layers, Parallelism(1, block=block_size_of(config)), RuleBook())
    return findings + [
        (Severity.ERROR, f"vLLM cannot load it at TP 1: {failure.line()}") for failure in verdict.failures
    ]
