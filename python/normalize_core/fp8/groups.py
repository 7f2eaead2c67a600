"""Module names and fused groups: how engines see a checkpoint's tensors.

vLLM, SGLang and transformers decide "quantized or not" per *module* (a tensor name without
``.weight``), and fuse some modules into one layer (q/k/v, gate/up, all experts of a MoE layer),
which must therefore share one precision.
"""

from __future__ import annotations

from collections.abc import Iterable

from normalize_core.engines.layers import MERGED_LAYERS

#: 3-D parameters of a fused-experts module (``...mlp.experts.gate_up_proj`` is ``[E, 2I, H]``).
FUSED_EXPERT_PARAMS = ("gate_up_proj", "down_proj")

#: Sibling modules an engine loads into one fused layer (``engines.layers`` says which layer).
FUSED_SIBLINGS = tuple(parts for _, parts in MERGED_LAYERS.values())

#: Each sibling's group label suffix, e.g. ``k_proj`` → ``{q_proj,k_proj,v_proj}``.
_SIBLING_LABEL = {member: "{" + ",".join(siblings) + "}" for siblings in FUSED_SIBLINGS for member in siblings}


def is_fused_expert_param(name: str) -> bool:
    """``...experts.gate_up_proj`` / ``...experts.down_proj`` (no ``.weight``)."""
    head, _, last = name.rpartition(".")
    return last in FUSED_EXPERT_PARAMS and (head == "experts" or head.endswith(".experts"))


def module_of(tensor: str) -> str | None:
    """The module whose weight ``tensor`` is: ``a.b.weight`` → ``a.b``; a fused expert parameter →
    its ``experts`` module; anything else (biases, ``A_log``, buffers) → None."""
    if tensor.endswith(".weight"):
        return tensor[: -len(".weight")]
    if is_fused_expert_param(tensor):
        return tensor.rpartition(".")[0]
    return None


def fused_group(module: str) -> str | None:
    """A key shared by all modules an engine fuses with ``module``, or None."""
    dotted = f".{module}."
    experts = dotted.find(".experts.")
    if experts >= 0:
        return f"{dotted[1 : experts + len('.experts')]}.*"
    head, _, last = module.rpartition(".")
    label = _SIBLING_LABEL.get(last)
    return None if label is None else f"{head}.{label}"


def split_fused_groups(quantized: Iterable[str], kept: Iterable[str]) -> list[str]:
    """Descriptions of fused groups that have both quantized and kept modules (each an error)."""
    members: dict[str, tuple[list[str], list[str]]] = {}
    for index, modules in enumerate((quantized, kept)):
        for module in modules:
            group = fused_group(module)
            if group is not None:
                members.setdefault(group, ([], []))[index].append(module)
    problems = []
    for group, (q, k) in sorted(members.items()):
        if q and k:
            problems.append(
                f"{group}: engines load these modules as one layer, but {sorted(q)[0]} would be FP8 "
                f"and {sorted(k)[0]} not ({len(q)} quantized, {len(k)} kept)"
            )
    return problems
