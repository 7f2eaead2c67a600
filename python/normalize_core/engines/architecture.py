"""What ``config.json`` tells the engine model: the architecture, head counts and the MTP layers.

Multimodal configs (Qwen3.5) keep the language model's sizes under ``text_config``; those win over the
top level. Every size is optional: a checkpoint without ``config.json`` is still checked, from shapes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from normalize_core.kinds import Severity

#: Architectures whose engine layout (which modules vLLM and SGLang merge, split or replicate) was read
#: from the engines' model files: Qwen3 (``qwen3.py``/``qwen2.py``), Qwen3-MoE, Qwen3-Next (``qwen3_next.py``),
#: Qwen3.5 (``qwen3_5.py``), DeepSeek-V2/V3 and Kimi-K2 (``deepseek_v2.py``), MiniMax-M2 (``minimax_m2.py``),
#: and the Llama layout those Qwen files share (``llama.py``: ``qkv_proj``, ``gate_up_proj``, row ``o_proj``
#: and ``down_proj``), also used by Mistral and Qwen2.
KNOWN_ARCHITECTURES = {
    "LlamaForCausalLM": "Llama",
    "MistralForCausalLM": "Mistral",
    "Qwen2ForCausalLM": "Qwen2",
    "Qwen2MoeForCausalLM": "Qwen2-MoE",
    "Qwen3ForCausalLM": "Qwen3",
    "Qwen3MoeForCausalLM": "Qwen3-MoE",
    "Qwen3NextForCausalLM": "Qwen3-Next",
    "Qwen3_5ForCausalLM": "Qwen3.5",
    "Qwen3_5ForConditionalGeneration": "Qwen3.5",
    "Qwen3_5MoeForCausalLM": "Qwen3.5-MoE",
    "Qwen3_5MoeForConditionalGeneration": "Qwen3.5-MoE",
    "DeepseekV2ForCausalLM": "DeepSeek-V2",
    "DeepseekV3ForCausalLM": "DeepSeek-V3",
    "DeepseekV32ForCausalLM": "DeepSeek-V3.2",
    "MiniMaxM2ForCausalLM": "MiniMax-M2",
}


def _int(config: Mapping[str, Any], *keys: str) -> int | None:
    """The first of ``keys`` that holds a positive integer."""
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _count(config: Mapping[str, Any], *keys: str) -> int | None:
    """Like ``_int`` but 0 counts (``num_nextn_predict_layers: 0``)."""
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


@dataclass(frozen=True)
class Architecture:
    """The sizes of ``config.json`` that decide how an engine splits the layers (None: not in the config)."""

    #: ``architectures[0]``, else ``model_type``, else ``"unknown"``.
    name: str
    #: The modeled family (``KNOWN_ARCHITECTURES``), or None: then layers are classified by name only.
    family: str | None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    #: Gated-delta-net (Qwen3-Next, Qwen3.5) heads and head sizes.
    linear_key_heads: int | None = None
    linear_value_heads: int | None = None
    linear_key_head_dim: int | None = None
    linear_value_head_dim: int | None = None
    num_hidden_layers: int | None = None
    #: ``num_nextn_predict_layers`` (DeepSeek, layers after the last decoder layer) or
    #: ``mtp_num_hidden_layers`` (Qwen3.5, ``mtp.layers.N``); None when the config has neither.
    mtp_layers: int | None = None
    mtp_key: str | None = None

    @property
    def linear_key_dim(self) -> int | None:
        """Rows of each of q and k in a gated-delta-net's fused projection."""
        if self.linear_key_heads and self.linear_key_head_dim:
            return self.linear_key_heads * self.linear_key_head_dim
        return None

    @property
    def linear_value_dim(self) -> int | None:
        """Rows of each of v and z in a gated-delta-net's fused projection."""
        if self.linear_value_heads and self.linear_value_head_dim:
            return self.linear_value_heads * self.linear_value_head_dim
        return None


def architecture_of(config: Mapping[str, Any] | None) -> Architecture:
    """The ``Architecture`` of a parsed ``config.json`` (or of none at all)."""
    if not isinstance(config, Mapping):
        return Architecture(name="unknown", family=None)
    text = config.get("text_config")
    sizes: Mapping[str, Any] = {**config, **text} if isinstance(text, Mapping) else config
    architectures = config.get("architectures")
    name = architectures[0] if isinstance(architectures, list) and architectures else None
    if not isinstance(name, str):
        model_type = config.get("model_type")
        name = model_type if isinstance(model_type, str) else "unknown"
    heads = _int(sizes, "num_attention_heads")
    hidden = _int(sizes, "hidden_size")
    head_dim = _int(sizes, "head_dim") or (hidden // heads if hidden and heads and hidden % heads == 0 else None)
    mtp_key = next((k for k in ("num_nextn_predict_layers", "mtp_num_hidden_layers") if k in sizes), None)
    return Architecture(
        name=name,
        family=KNOWN_ARCHITECTURES.get(name),
        num_attention_heads=heads,
        num_key_value_heads=_int(sizes, "num_key_value_heads") or heads,
        head_dim=head_dim,
        linear_key_heads=_int(sizes, "linear_num_key_heads"),
        linear_value_heads=_int(sizes, "linear_num_value_heads"),
        linear_key_head_dim=_int(sizes, "linear_key_head_dim"),
        linear_value_head_dim=_int(sizes, "linear_value_head_dim"),
        num_hidden_layers=_int(sizes, "num_hidden_layers"),
        mtp_layers=_count(sizes, mtp_key) if mtp_key else None,
        mtp_key=mtp_key,
    )


def _layer_numbers(names: Iterable[str], prefix: str) -> set[int]:
    """The numbers ``N`` of ``<prefix>N.…`` names."""
    start = len(prefix)
    heads = {name[start : name.find(".", start)] for name in names if name.startswith(prefix)}
    return {int(head) for head in heads if head.isdigit()}


def mtp_findings(architecture: Architecture, names: Iterable[str]) -> list[tuple[str, str]]:
    """``(severity, message)`` where the checkpoint's MTP layers and the config's count disagree.

    DeepSeek-style MTP layers are ``model.layers.N`` with ``N >= num_hidden_layers``; vLLM's
    ``deepseek_v2.py`` skips such a weight only when ``get_spec_layer_idx_from_weight_name`` places it
    inside ``num_nextn_predict_layers``, and any other one has no parameter to load into: the load fails,
    so a layer beyond the declared ones is an error. Qwen-style ``mtp.layers.N`` are skipped by the main
    model whatever their number. Fewer MTP layers than declared load for plain serving but not for MTP
    speculative decoding: a warning.
    """
    names = list(names)
    findings: list[tuple[str, str]] = []
    declared = architecture.mtp_layers
    layers = architecture.num_hidden_layers
    after_last = sorted(n for n in _layer_numbers(names, "model.layers.") if layers is not None and n >= layers)
    qwen_style = _layer_numbers(names, "mtp.layers.")
    if after_last:
        beyond = [n for n in after_last if n >= layers + (declared or 0)]
        if beyond:
            findings.append(
                (
                    Severity.ERROR,
                    f"model.layers.{beyond[0]} is beyond num_hidden_layers {layers} + "
                    f"{architecture.mtp_key or 'num_nextn_predict_layers'} {declared or 0}: "
                    "engines have no layer to load it into",
                )
            )
    present = len(after_last) + len(qwen_style)
    if declared is not None and present < declared:
        findings.append(
            (
                Severity.WARNING,
                f"config.json declares {declared} MTP layers ({architecture.mtp_key}) but the checkpoint holds "
                f"{present}: serving loads, MTP speculative decoding does not",
            )
        )
    elif declared is not None and len(qwen_style) > declared:
        findings.append(
            (
                Severity.WARNING,
                f"the checkpoint has {len(qwen_style)} mtp.layers but {architecture.mtp_key} is {declared}; "
                "engines load only the declared ones",
            )
        )
    return findings
