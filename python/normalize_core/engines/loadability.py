"""``to-fp8``'s default: quantize only what the engines can load.

A layer whose FP8 blocks an engine would refuse at one of the requested TP sizes (a merged layer whose
non-last partition is not a whole number of blocks, a fused MoE whose intermediate size per partition is
not a block multiple, a column or row split into ragged blocks; see ``tp_rules``) stays in its source dtype:
all of its weights, so fused groups keep one precision, and for a gate/up pair also the MLP's down
projection, whose input is the same ragged intermediate size. Those modules then land in
``modules_to_not_convert`` like every other kept Linear. Splits that no dtype can fix (heads not divisible
by TP) are left to ``normalize check``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from normalize_core._core import TensorEntry
from normalize_core.engines.architecture import architecture_of
from normalize_core.engines.layers import LayerKind, engine_layers
from normalize_core.engines.tp_rules import Engine, Parallelism, RuleBook
from normalize_core.fp8.layout import DEFAULT_BLOCK_SIZE
from normalize_core.fp8.rules import Decision

#: Gate/up pairs and the down projection that reads their output.
_DOWN_OF = {("gate_proj", "up_proj"): "down_proj", ("w1", "w3"): "w2"}


@dataclass(frozen=True, slots=True)
class KeptToLoad(Decision):
    """A decision the rules made to quantize, turned into "keep" so the engine can load the output."""

    #: The engine layer it is kept for and why (one line), at which TP size.
    layer: str = ""
    problem: str = ""
    tp: int = 1


def _reason(tp: int, engine: Engine) -> str:
    """Short and the same for every layer of a pattern, so dry-run summaries group them."""
    return f"{engine.label} cannot load it as FP8 at TP {tp}"


def keep_unloadable(
    entries: Sequence[TensorEntry],
    decisions: Sequence[Decision],
    config: Mapping[str, Any] | None,
    tp_sizes: Sequence[int] = (1,),
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    engine: Engine = Engine.VLLM,
) -> list[Decision]:
    """``decisions`` with every weight of a layer that would not load as FP8 at one of ``tp_sizes`` kept
    (as a ``KeptToLoad``), in the same order; a copy of ``decisions`` when nothing changes. Raises
    ``ValueError`` for a TP size below 1."""
    if any(tp < 1 for tp in tp_sizes):
        raise ValueError(f"TP sizes must be positive, not {list(tp_sizes)}")
    architecture = architecture_of(config)
    weights = ((entry.name, entry.shape, decision.quantize) for entry, decision in zip(entries, decisions, strict=True))
    layers = engine_layers(weights, architecture)
    book = RuleBook()
    #: Weight → (engine layer it is kept for, why, TP size).
    kept: dict[str, tuple[str, str, int]] = {}
    for layer in layers:
        if not layer.fp8:
            continue
        for tp in tp_sizes:
            problem = book.problem(layer, Parallelism(tp, engine=engine, block=(block_size, block_size)))
            if problem is not None and problem.fp8_only:
                for weight in layer.weights:
                    kept[weight] = (layer.name, problem.message, tp)
                down = _DOWN_OF.get(layer.partition_labels) if layer.kind is LayerKind.MERGED_COLUMN else None
                if down is not None:
                    module = f"{layer.name.rpartition('.')[0]}.{down}"
                    pair = "/".join(layer.partition_labels)
                    why = f"it reads the output of {pair}, kept unquantized, so the MLP keeps one precision"
                    kept.setdefault(f"{module}.weight", (module, why, tp))
                break
    if not kept:
        return list(decisions)
    changed = []
    for decision in decisions:
        hit = kept.get(decision.name) if decision.quantize else None
        if hit is None:
            changed.append(decision)
            continue
        layer, why, tp = hit
        changed.append(KeptToLoad(decision.name, False, _reason(tp, engine), layer=layer, problem=why, tp=tp))
    return changed


def kept_layers(decisions: Sequence[Decision]) -> dict[str, KeptToLoad]:
    """Engine layer → one of its ``KeptToLoad`` decisions, in order: what to report to the user."""
    layers: dict[str, KeptToLoad] = {}
    for decision in decisions:
        if isinstance(decision, KeptToLoad):
            layers.setdefault(decision.layer, decision)
    return layers
