"""Which tensors become per-block FP8 and which stay as they are.

Three sources of decisions, each a ``decide(name, dtype, shape) -> Decision``:

- ``HeuristicRules`` (default): quantize the large matmul weights, keep everything else. It reproduces the
  decisions of the published block-FP8 releases (DeepSeek-V3, Kimi-K2, MiniMax-M2.7, Qwen3-8B/30B/235B-FP8,
  Qwen3-Next-80B-FP8, Qwen3.5-FP8's skip list); ``tests/test_fp8_rules.py`` holds it to them.
- ``PatternRules`` (``-p/--quantize-pattern``): quantize exactly the eligible tensors a regex matches.
- ``ReferenceRules`` (``--reference DIR``): quantize what an existing FP8 checkpoint quantized.

``with_skip_patterns`` (``--skip-pattern``) keeps matching tensors on top of any of them. A tensor is only
ever quantized when ``ineligible_reason`` has nothing against it. No torch: torch-free commands use this.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from normalize_core._core import INDEX_FILE, TensorEntry, read_header, read_index
from normalize_core.fp8.groups import is_fused_expert_param
from normalize_core.fp8.layout import FP8_DTYPES, QUANTIZABLE_DTYPES, SCALE_SUFFIX, QuantizedLayout
from normalize_core.kinds import Dtype

_NOT_FLOATING = frozenset(
    {Dtype.BOOL, Dtype.U8, Dtype.I8, Dtype.I16, Dtype.U16, Dtype.I32, Dtype.U32, Dtype.I64, Dtype.U64}
)

#: A whole numeric name segment (a layer or expert index), as in ``layers.12.`` or ``experts.7``.
_NUMBER_SEGMENT = re.compile(r"\.\d+(?=\.|$)")


@dataclass(frozen=True, slots=True)
class Decision:
    """Whether the source tensor ``name`` becomes FP8, and a short human-readable why."""

    name: str
    quantize: bool
    reason: str


class Rules(Protocol):
    """Anything that decides per tensor: the three rule kinds and their ``with_skip_patterns`` wrapper."""

    def decide(self, name: str, dtype: str, shape: Sequence[int]) -> Decision: ...


def ineligible_reason(name: str, dtype: str, shape: Sequence[int]) -> str | None:
    """Why this tensor can never be quantized, or None when it can: a 2-D BF16/F16/F32 tensor named
    ``*.weight`` (a Linear's weight), or a 3-D fused-expert parameter (``...experts.gate_up_proj`` /
    ``...experts.down_proj``). No rule, pattern or reference overrides this."""
    if dtype in FP8_DTYPES:
        return "already FP8"
    if dtype in _NOT_FLOATING:
        return "not floating"
    if dtype not in QUANTIZABLE_DTYPES:
        return f"dtype {dtype}"
    if name.endswith(".bias"):
        return "bias"
    if len(shape) < 2:
        return "1-D" if len(shape) == 1 else "scalar"
    if is_fused_expert_param(name):
        return None if len(shape) == 3 else f"fused experts are {len(shape)}-D, not 3-D"
    if not name.endswith(".weight"):
        return "not a weight"
    if len(shape) > 2:
        # Convolutions and the like: engines load block-FP8 only into Linear layers and fused experts.
        return f"{len(shape)}-D weight (not a Linear)"
    return None


#: The built-in KEEP table: an eligible tensor whose name matches one of these regexes (``re.search``) stays
#: as it is, with that reason; every other eligible tensor is a matmul weight and becomes FP8. The first
#: match gives the reason. Names are matched whole-segment, so ``gate_proj`` is not the router ``gate``.
HEURISTIC_KEEP_RULES: tuple[tuple[str, str], ...] = (
    # Whole encoder towers of multimodal models, projectors included (Qwen3.5-FP8 keeps every model.visual.*).
    (
        r"(?:^|\.)(?:visual|vision_tower|vision_model|vision_encoder|multi_modal_projector|mm_projector)\.",
        "vision tower",
    ),
    # Output heads, including DeepSeek's MTP head ``model.layers.61.shared_head.head`` (its own vocab projection).
    (r"(?:^|\.)(?:lm_head|shared_head\.head)\.weight$", "lm_head"),
    # Token/position embeddings: embed_tokens (also DeepSeek MTP's model.layers.61.embed_tokens), pos_embed, wte, ...
    (r"(?:^|\.)(?:[^.]*embed[^.]*|wte|wpe)\.weight$", "embedding"),
    # Norms that are not 1-D (every norm seen so far is 1-D and ineligible anyway).
    (r"(?:^|\.)[^.]*norm[^.]*\.weight$", "norm"),
    # MoE routers (mlp.gate, block_sparse_moe.gate, gpt-oss/Llama-4 router) and Qwen's shared-expert gate:
    # small and precision-sensitive; every real release keeps them.
    (r"(?:^|\.)(?:gate|router|shared_expert_gate)\.weight$", "router"),
    # DeepSeek-V3.2's sparse-attention indexer scores heads through weights_proj, which vLLM and SGLang build
    # unquantized (quant_config=None) while its wq_b and wk are FP8.
    (r"(?:^|\.)indexer\.weights_proj\.weight$", "indexer head weights"),
    # MTP blocks' fusion of embedding and hidden state: DeepSeek/GLM eh_proj, Qwen3-Next/3.5 mtp.fc.
    (r"(?:^|\.)(?:eh_proj|mtp\.fc)\.weight$", "MTP fusion projection"),
    # Gated-delta-net control paths: the causal conv1d and the tiny per-head a/b (beta, decay) projections.
    (r"(?:^|\.)(?:conv1d|in_proj_a|in_proj_b|in_proj_ba)\.weight$", "linear-attention control"),
)


class HeuristicRules:
    """Quantize every eligible tensor except those the ``keep_rules`` table (default
    ``HEURISTIC_KEEP_RULES``) names: "quantize the large matmul weights, keep everything else"."""

    def __init__(self, keep_rules: Sequence[tuple[str, str]] = HEURISTIC_KEEP_RULES):
        self.keep_rules = tuple(keep_rules)
        self._compiled = tuple((re.compile(pattern), reason) for pattern, reason in self.keep_rules)
        # Most eligible tensors match no row: one search of all rows at once settles them.
        self._any_row = re.compile("|".join(f"(?:{pattern})" for pattern, _ in self.keep_rules))
        # The built-in table never looks at layer or expert numbers (a test holds it to that), so
        # its verdict is remembered per name pattern: 150k tensors take a few hundred patterns.
        self._verdicts: dict[tuple[str, str, int], tuple[bool, str]] | None = (
            {} if self.keep_rules == HEURISTIC_KEEP_RULES else None
        )

    def decide(self, name: str, dtype: str, shape: Sequence[int]) -> Decision:
        """Keep with the ineligibility or the first matching table row's reason; otherwise quantize."""
        if self._verdicts is None:
            return Decision(name, *self._verdict(name, dtype, shape))
        key = (_NUMBER_SEGMENT.sub(".N", name), dtype, len(shape))
        verdict = self._verdicts.get(key)
        if verdict is None:
            verdict = self._verdicts[key] = self._verdict(name, dtype, shape)
        return Decision(name, *verdict)

    def _verdict(self, name: str, dtype: str, shape: Sequence[int]) -> tuple[bool, str]:
        if reason := ineligible_reason(name, dtype, shape):
            return False, reason
        if not self._any_row.search(name):
            return True, "matmul weight"
        for pattern, reason in self._compiled:
            if pattern.search(name):
                return False, reason
        return True, "matmul weight"


def _compile(patterns: Sequence[str], option: str) -> list[re.Pattern[str]]:
    """User regexes, or ``ValueError`` naming the option and the bad pattern."""
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as e:
            raise ValueError(f"invalid {option} {pattern!r}: {e}") from None
    return compiled


class PatternRules:
    """``-p/--quantize-pattern``, in place of the heuristic: quantize iff eligible and some pattern
    ``re.search``-matches the name. Raises ``ValueError`` for no patterns or an invalid regex."""

    def __init__(self, quantize_patterns: Sequence[str]):
        if not quantize_patterns:
            raise ValueError("give at least one --quantize-pattern")
        self.quantize_patterns = tuple(quantize_patterns)
        self._compiled = _compile(self.quantize_patterns, "--quantize-pattern")

    def decide(self, name: str, dtype: str, shape: Sequence[int]) -> Decision:
        """Quantize with the first matching pattern as the reason; keep when none matches."""
        if reason := ineligible_reason(name, dtype, shape):
            return Decision(name, False, reason)
        for pattern in self._compiled:
            if pattern.search(name):
                return Decision(name, True, f"matched --quantize-pattern {pattern.pattern!r}")
        return Decision(name, False, "no --quantize-pattern matched")


class ReferenceRules:
    """``--reference DIR``: quantize iff eligible and the reference checkpoint has ``<name>_scale_inv``.

    ``scale_dtype`` is the dtype of the reference's scale tensors (``"F32"`` or ``"BF16"`` in real
    releases) when a header holding one was readable, else None."""

    def __init__(self, reference_names: Iterable[str], scale_dtype: str | None = None):
        self.names = frozenset(reference_names)
        self.scale_dtype = scale_dtype

    @classmethod
    def from_dir(cls, path: str | Path) -> ReferenceRules:
        """Reads the names from ``model.safetensors.index.json`` when present (its shards need not exist; those
        that do are read for ``scale_dtype``), otherwise from the headers of ``*.safetensors``. Reads no tensor
        data. Raises ``ValueError`` for a directory without either, a reference without any ``*_scale_inv``
        tensor, or scale tensors of two dtypes; ``NormalizeError`` for a malformed index (checked as every index
        is: tensors listed once, shards plain file names) or a bad header."""
        root = Path(path)
        if not root.is_dir():
            raise ValueError(f"--reference {root}: not a directory")
        index_path = root / INDEX_FILE
        scale_dtypes: set[str] = set()
        if index_path.is_file():
            weight_map, _ = read_index(index_path)
            names: Iterable[str] = weight_map
            shards_with_scales = sorted({shard for name, shard in weight_map.items() if name.endswith(SCALE_SUFFIX)})
            for shard in shards_with_scales:
                if (root / shard).is_file():
                    scale_dtypes |= _scale_dtypes(read_header(root / shard).tensors)
        else:
            shard_paths = sorted(root.glob("*.safetensors"))
            if not shard_paths:
                raise ValueError(f"--reference {root}: no {INDEX_FILE} and no *.safetensors")
            seen: dict[str, str] = {}
            for shard_path in shard_paths:
                tensors = read_header(shard_path).tensors
                for tensor in tensors:
                    if tensor.name in seen:
                        raise ValueError(
                            f"--reference {root}: {tensor.name} is in both {seen[tensor.name]} and {shard_path.name}"
                        )
                    seen[tensor.name] = shard_path.name
                scale_dtypes |= _scale_dtypes(tensors)
            names = seen
        if not any(name.endswith(SCALE_SUFFIX) for name in names):
            raise ValueError(
                f"--reference {root}: no *{SCALE_SUFFIX} tensors, so it is not a block-FP8 checkpoint "
                "(per-channel FP8 stores *.weight_scale, which this scheme does not use)"
            )
        if len(scale_dtypes) > 1:
            raise ValueError(f"--reference {root}: scale tensors of several dtypes: {sorted(map(str, scale_dtypes))}")
        return cls(names, next(iter(scale_dtypes), None))

    def decide(self, name: str, dtype: str, shape: Sequence[int]) -> Decision:
        """Quantize where the reference has this weight's scale; say whether a kept weight is in it at all."""
        if reason := ineligible_reason(name, dtype, shape):
            return Decision(name, False, reason)
        if f"{name}{SCALE_SUFFIX}" in self.names:
            return Decision(name, True, "reference has scale")
        return Decision(name, False, "reference has no scale" if name in self.names else "not in reference")

    def compare(self, source_names: Iterable[str]) -> tuple[list[str], list[str]]:
        """``(only in source, only in reference)``, sorted, over tensors named like weights (``*.weight`` and
        fused-expert parameters); scale tensors are not weights. Non-empty lists mean the reference is another
        layout or model, and its decisions for those names say nothing."""
        source = {name for name in source_names if _is_weight_name(name)}
        reference = {name for name in self.names if _is_weight_name(name)}
        return sorted(source - reference), sorted(reference - source)


def _scale_dtypes(tensors: Iterable[TensorEntry]) -> set[str]:
    return {tensor.dtype for tensor in tensors if tensor.name.endswith(SCALE_SUFFIX)}


def _is_weight_name(name: str) -> bool:
    return name.endswith(".weight") or is_fused_expert_param(name)


class SkipPatternRules:
    """``rules`` with ``--skip-pattern`` on top: a tensor they would quantize stays as it is when a skip
    pattern ``re.search``-matches its name. ``rules`` stays reachable (e.g. for ``scale_dtype``)."""

    def __init__(self, rules: Rules, skip_patterns: Sequence[str]):
        self.rules = rules
        self.skip_patterns = tuple(skip_patterns)
        self._compiled = _compile(self.skip_patterns, "--skip-pattern")

    def decide(self, name: str, dtype: str, shape: Sequence[int]) -> Decision:
        """The inner decision, unless it quantizes a name a skip pattern matches."""
        decision = self.rules.decide(name, dtype, shape)
        if decision.quantize:
            for pattern in self._compiled:
                if pattern.search(name):
                    return Decision(name, False, f"matched --skip-pattern {pattern.pattern!r}")
        return decision


def with_skip_patterns(rules: Rules, skip_patterns: Sequence[str]) -> Rules:
    """``rules`` plus ``--skip-pattern`` regexes (``rules`` itself when there are none). Raises ``ValueError``
    for an invalid regex."""
    return SkipPatternRules(rules, skip_patterns) if skip_patterns else rules


def decide_all(entries: Iterable[tuple[str, str, Sequence[int]]], rules: Rules) -> list[Decision]:
    """One decision per ``(name, dtype, shape)``, in order."""
    return [rules.decide(name, dtype, shape) for name, dtype, shape in entries]


_DIGIT_RUN = re.compile(r"\d+")


def name_pattern(name: str) -> str:
    """``model.layers.12.mlp.experts.7.w1.weight`` → ``model.layers.N.mlp.experts.N.wN.weight``."""
    return _DIGIT_RUN.sub("N", name)


def summarize(
    decisions: Iterable[Decision], sizes: Mapping[str, int], layouts: Mapping[str, QuantizedLayout]
) -> list[dict]:
    """Decisions grouped by name pattern (digit runs → ``N``) and outcome, in order of first appearance:
    ``{"pattern", "quantize", "reason", "count", "bytes", "bytes_saved"}``. ``sizes`` are source bytes per
    name, ``layouts`` the layout of each quantized tensor (``Fp8Plan.layouts``): a quantized tensor saves its
    source bytes less its FP8 weight and scale, so the rows add up to the plan's ``output_bytes``."""
    rows: dict[tuple[str, bool, str], dict] = {}
    for decision in decisions:
        key = (name_pattern(decision.name), decision.quantize, decision.reason)
        row = rows.setdefault(
            key,
            {"pattern": key[0], "quantize": key[1], "reason": key[2], "count": 0, "bytes": 0, "bytes_saved": 0},
        )
        size = sizes[decision.name]
        row["count"] += 1
        row["bytes"] += size
        if decision.quantize:
            row["bytes_saved"] += size - layouts[decision.name].nbytes
    return list(rows.values())
