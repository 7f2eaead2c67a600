"""The linear layers an engine builds from a checkpoint's weights, and how each is split over TP ranks.

vLLM and SGLang do not load checkpoint modules one by one: their model files fuse some of them into one
layer and give every layer a parallel style (read from ``qwen2.py``/``qwen3.py``, ``qwen3_moe.py``,
``qwen3_next.py``, ``qwen3_5.py``, ``deepseek_v2.py``, ``minimax_m2.py`` of both engines):

- ``QKVParallelLinear``: ``q_proj``/``k_proj``/``v_proj`` → ``qkv_proj``, split by heads; KV heads are
  replicated when there are fewer than TP ranks. Qwen3-Next/3.5 gate the attention output, so their
  ``q_proj`` holds ``2 × heads × head_dim`` rows.
- ``MergedColumnParallelLinear``: ``gate_proj``/``up_proj`` → ``gate_up_proj`` (also ``w1``/``w3`` outside
  experts); Qwen3.5's ``in_proj_qkv``/``in_proj_z`` → ``in_proj_qkvz`` with output sizes
  ``[key_dim, key_dim, value_dim, value_dim]`` and ``in_proj_b``/``in_proj_a`` → ``in_proj_ba``.
- MLA (DeepSeek-V2/V3, Kimi-K2): ``q_a_proj``/``kv_a_proj_with_mqa`` → ``fused_qkv_a_proj``, merged but
  replicated (``disable_tp=True``); ``q_b_proj``, ``kv_b_proj`` (and ``q_proj`` without LoRA) column-parallel;
  ``o_proj`` row-parallel; ``kv_a_proj_with_mqa`` alone is replicated.
- Column-parallel: Qwen3-Next's ``in_proj_qkvz`` and ``in_proj_ba`` (one fused output shard each).
- Row-parallel: ``o_proj``, ``down_proj``, ``out_proj``, ``w2``.
- ``FusedMoE``: every expert of one ``…experts`` module (``gate_proj``/``up_proj``/``down_proj``, MiniMax
  ``w1``/``w3``/``w2``, or fused 3-D ``gate_up_proj``/``down_proj``) is one layer, its intermediate size split
  over TP ranks (or whole experts per rank under expert parallelism).
- Replicated: routers (``gate``, ``router``, ``shared_expert_gate``), MTP fusion (``eh_proj``, ``mtp.fc``).
- Vocab-parallel (padded, never refused): ``embed_tokens``, ``lm_head``, ``shared_head.head``.

Any other 2-D weight is *unclassified*: its FP8 blocks are checked both as column- and as row-parallel.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from normalize_core.engines.architecture import Architecture


class LayerKind(StrEnum):
    """How an engine builds and splits one layer."""

    COLUMN = "column-parallel"
    ROW = "row-parallel"
    REPLICATED = "replicated"
    MERGED_COLUMN = "merged column-parallel"
    MERGED_REPLICATED = "merged replicated"
    QKV = "QKV-parallel"
    FUSED_MOE = "fused MoE"
    VOCAB = "vocab-parallel"
    UNCLASSIFIED = "unclassified"


@dataclass(frozen=True, slots=True)
class EngineLayer:
    """One layer as the engine builds it from one or more checkpoint modules."""

    #: The engine's module name, e.g. ``model.layers.0.mlp.gate_up_proj`` or ``model.layers.3.mlp.experts``.
    name: str
    kind: LayerKind
    #: The checkpoint weights (``….weight`` or fused 3-D expert parameters) loaded into it.
    weights: tuple[str, ...]
    #: True when its weights are (or will be) block FP8.
    fp8: bool
    #: Full (unsplit) output sizes of its partitions, in the engine's order, and a label for each.
    output_sizes: tuple[int, ...] = ()
    partition_labels: tuple[str, ...] = ()
    input_size: int = 0
    #: QKV: (query heads, counting the output gate's; KV heads; head size), when the config agrees with shapes.
    heads: tuple[int, int, int] | None = None
    #: Config counts the engine divides by TP for this layer, e.g. ``(("num_attention_heads", 64),)``.
    head_counts: tuple[tuple[str, int], ...] = ()
    #: Fused MoE: experts and the intermediate size of one expert.
    experts: int = 0
    intermediate: int = 0

    @property
    def signature(self) -> tuple:
        """Everything the TP rules look at (not the names), so verdicts can be shared between layers."""
        return (
            self.kind,
            self.fp8,
            self.output_sizes,
            self.partition_labels,
            self.input_size,
            self.heads,
            self.head_counts,
            self.experts,
            self.intermediate,
        )


#: Layers an engine builds from sibling modules: the layer's last name segment → its kind and the
#: siblings' last name segments, in the engine's order.
MERGED_LAYERS: dict[str, tuple[LayerKind, tuple[str, ...]]] = {
    "qkv_proj": (LayerKind.QKV, ("q_proj", "k_proj", "v_proj")),
    "gate_up_proj": (LayerKind.MERGED_COLUMN, ("gate_proj", "up_proj")),
    "w13": (LayerKind.MERGED_COLUMN, ("w1", "w3")),
    "in_proj_qkvz": (LayerKind.MERGED_COLUMN, ("in_proj_qkv", "in_proj_z")),
    "in_proj_ba": (LayerKind.MERGED_COLUMN, ("in_proj_b", "in_proj_a")),
    "fused_qkv_a_proj": (LayerKind.MERGED_REPLICATED, ("q_a_proj", "kv_a_proj_with_mqa")),
}

#: Last name segment → (engine layer name, kind, position) for modules an engine fuses with siblings.
MERGED_ROLES: dict[str, tuple[str, LayerKind, int]] = {
    part: (layer, kind, position)
    for layer, (kind, parts) in MERGED_LAYERS.items()
    for position, part in enumerate(parts)
}

#: Last name segment → kind, for modules an engine loads on their own.
SINGLE_ROLES: dict[str, LayerKind] = {
    "o_proj": LayerKind.ROW,
    "down_proj": LayerKind.ROW,
    "out_proj": LayerKind.ROW,
    "w2": LayerKind.ROW,
    "q_b_proj": LayerKind.COLUMN,
    "kv_b_proj": LayerKind.COLUMN,
    "in_proj_qkvz": LayerKind.COLUMN,
    "in_proj_ba": LayerKind.COLUMN,
    "gate": LayerKind.REPLICATED,
    "router": LayerKind.REPLICATED,
    "shared_expert_gate": LayerKind.REPLICATED,
    "eh_proj": LayerKind.REPLICATED,
    "embed_tokens": LayerKind.VOCAB,
    "lm_head": LayerKind.VOCAB,
}

#: Expert parameters: the gate/up side (w13) and the down side (w2) of a fused MoE layer.
EXPERT_UP_ROLES = frozenset({"gate_proj", "up_proj", "w1", "w3", "gate_up_proj"})
EXPERT_DOWN_ROLES = frozenset({"down_proj", "w2"})


def single_kind(module: str) -> LayerKind:
    """The kind of a module that no sibling joins (``SINGLE_ROLES``, MTP heads, or unclassified)."""
    last = module.rpartition(".")[2]
    if module == "mtp.fc":
        return LayerKind.REPLICATED
    if module.endswith("shared_head.head"):
        return LayerKind.VOCAB
    return SINGLE_ROLES.get(last, LayerKind.UNCLASSIFIED)


def _head_counts(parent: str, architecture: Architecture) -> tuple[tuple[str, int], ...]:
    """Config head counts an engine divides by TP for layers under ``parent``."""
    last = parent.rpartition(".")[2]
    if last == "linear_attn":
        counts = (
            ("linear_num_key_heads", architecture.linear_key_heads),
            ("linear_num_value_heads", architecture.linear_value_heads),
        )
    elif last in ("self_attn", "attn", "attention"):
        counts = (("num_attention_heads", architecture.num_attention_heads),)
    else:
        return ()
    return tuple((key, value) for key, value in counts if value)


class _Experts:
    """Accumulates the experts of one fused MoE module."""

    __slots__ = ("weights", "numbers", "fp8", "shapes")

    def __init__(self) -> None:
        self.weights: list[str] = []
        self.numbers: set[str] = set()
        self.fp8 = False
        #: Role → shape of its first weight; fused 3-D parameters are stored as ``"fused <role>"``.
        self.shapes: dict[str, tuple[int, ...]] = {}

    def add(self, weight: str, role: str, number: str | None, shape: tuple[int, ...], fp8: bool) -> None:
        """One expert weight (``number`` None for a fused 3-D parameter holding every expert)."""
        self.weights.append(weight)
        if number is None:
            role = f"fused {role}"
        else:
            self.numbers.add(number)
        self.fp8 = self.fp8 or fp8
        self.shapes.setdefault(role, shape)

    def layer(self, name: str) -> EngineLayer:
        """The ``FusedMoE`` layer: experts counted, the intermediate size read from the gate/up or down shapes
        (fused ``gate_up_proj`` is ``[E, 2I, H]`` with ``down_proj`` ``[E, H, I]``, or both transposed)."""
        shapes = self.shapes
        fused_up, fused_down = shapes.get("fused gate_up_proj"), shapes.get("fused down_proj")
        up = next((shapes[r] for r in ("gate_proj", "w1", "up_proj", "w3") if r in shapes), None)
        down = next((shapes[r] for r in ("down_proj", "w2") if r in shapes), None)
        if fused_up is not None:
            experts = fused_up[0]
            if fused_down is not None and fused_up[2] == 2 * fused_down[1] != fused_up[1]:
                intermediate = fused_down[1]
            else:
                intermediate = fused_up[1] // 2
        else:
            experts = len(self.numbers) or (fused_down[0] if fused_down else 1)
            if up is not None:
                intermediate = up[0]
            elif down is not None:
                intermediate = down[1]
            else:
                intermediate = fused_down[2] if fused_down else 0
        return EngineLayer(
            name=name,
            kind=LayerKind.FUSED_MOE,
            weights=tuple(self.weights),
            fp8=self.fp8,
            experts=experts,
            intermediate=intermediate,
        )


def engine_layers(weights: Iterable[tuple[str, list[int], bool]], architecture: Architecture) -> list[EngineLayer]:
    """The engine layers of ``(tensor name, shape, is FP8)`` weights, in natural name order (``layers.9``
    before ``layers.10``), whatever order the checkpoint lists them in.

    Only Linear weights take part (2-D ``*.weight`` and 3-D fused expert parameters); norms, biases,
    convolutions and scales do not.
    """
    merged: dict[str, dict[int, tuple[str, tuple[int, ...], bool]]] = {}
    merged_kind: dict[str, LayerKind] = {}
    experts: dict[str, _Experts] = {}
    singles: list[tuple[str, tuple[int, ...], bool]] = []
    for name, shape, fp8 in weights:
        if name.endswith(".weight"):
            if len(shape) != 2:
                continue
            module = name[:-7]
        elif len(shape) == 3 and name.endswith((".experts.gate_up_proj", ".experts.down_proj")):
            module = name
        else:
            continue
        at = module.find(".experts.")
        if at >= 0:
            key = module[: at + 8]
            number, _, role = module[at + 9 :].partition(".")
            if not role:
                number, role = None, number
            if role in EXPERT_UP_ROLES or role in EXPERT_DOWN_ROLES:
                group = experts.get(key)
                if group is None:
                    group = experts[key] = _Experts()
                group.add(name, role, number, tuple(shape), fp8)
                continue
        parent, _, last = module.rpartition(".")
        role_of = MERGED_ROLES.get(last)
        if role_of is None:
            singles.append((name, tuple(shape), fp8))
            continue
        suffix, kind, index = role_of
        key = f"{parent}.{suffix}" if parent else suffix
        merged.setdefault(key, {})[index] = (name, tuple(shape), fp8)
        merged_kind[key] = kind

    layers = [group.layer(key) for key, group in experts.items()]
    for name, shape, fp8 in singles:
        module = name[:-7]
        counts = _head_counts(module.rpartition(".")[0], architecture)
        layers.append(_single(module, name, single_kind(module), shape, fp8, counts))
    for key, parts in merged.items():
        layers.extend(_merged(key, merged_kind[key], parts, architecture))
    layers.sort(key=lambda layer: natural_key(layer.name))
    return layers


def natural_key(name: str) -> list[tuple[int, int, str]]:
    """Sort key of a dotted name that orders number segments by value."""
    return [(0, int(s), "") if s.isdigit() else (1, 0, s) for s in name.split(".")]


def _single(
    module: str,
    weight: str,
    kind: LayerKind,
    shape: tuple[int, ...],
    fp8: bool,
    head_counts: tuple[tuple[str, int], ...],
) -> EngineLayer:
    return EngineLayer(
        name=module,
        kind=kind,
        weights=(weight,),
        fp8=fp8,
        output_sizes=(shape[0],),
        partition_labels=(module.rpartition(".")[2],),
        input_size=shape[1],
        head_counts=head_counts if kind in (LayerKind.COLUMN, LayerKind.ROW) else (),
    )


def _merged(
    key: str,
    kind: LayerKind,
    parts: dict[int, tuple[str, tuple[int, ...], bool]],
    architecture: Architecture,
) -> list[EngineLayer]:
    """One merged layer, or its weights on their own when siblings are missing (MLA's lone ``q_proj`` is
    column-parallel, a lone ``kv_a_proj_with_mqa`` replicated)."""
    parent = key.rpartition(".")[0]
    counts = _head_counts(parent, architecture)
    expected = len(MERGED_LAYERS[key.rpartition(".")[2]][1])
    if len(parts) != expected:
        alone = []
        for weight, shape, fp8 in parts.values():
            module = weight[:-7]
            single = LayerKind.REPLICATED if module.endswith("kv_a_proj_with_mqa") else LayerKind.COLUMN
            alone.append(_single(module, weight, single, shape, fp8, counts))
        return alone
    ordered = [parts[i] for i in range(expected)]
    weights = tuple(weight for weight, _, _ in ordered)
    labels = tuple(weight[:-7].rpartition(".")[2] for weight in weights)
    sizes = tuple(shape[0] for _, shape, _ in ordered)
    heads = None
    if kind is LayerKind.QKV:
        heads = _attention_heads(sizes, architecture)
    elif labels == ("in_proj_qkv", "in_proj_z"):
        k, v = architecture.linear_key_dim, architecture.linear_value_dim
        if k and v and sizes == (2 * k + v, v):
            sizes, labels = (k, k, v, v), ("q", "k", "v", "z")
    return [
        EngineLayer(
            name=key,
            kind=kind,
            weights=weights,
            fp8=any(fp8 for _, _, fp8 in ordered),
            output_sizes=sizes,
            partition_labels=labels,
            input_size=ordered[0][1][1],
            heads=heads,
            head_counts=() if kind is LayerKind.MERGED_REPLICATED else counts,
        )
    ]


def _attention_heads(sizes: tuple[int, ...], architecture: Architecture) -> tuple[int, int, int] | None:
    """(query heads, KV heads, head size) when the config's counts explain the q/k/v rows; the query
    count doubles when ``q_proj`` also carries the output gate (Qwen3-Next, Qwen3.5)."""
    heads, kv_heads, head_dim = (
        architecture.num_attention_heads,
        architecture.num_key_value_heads,
        architecture.head_dim,
    )
    if not (heads and kv_heads and head_dim) or sizes[1] != sizes[2] or sizes[1] != kv_heads * head_dim:
        return None
    for gate in (1, 2):
        if sizes[0] == gate * heads * head_dim:
            return gate * heads, kv_heads, head_dim
    return None
