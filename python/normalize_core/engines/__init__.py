"""A model of how vLLM and SGLang load a checkpoint's linear layers, and at which TP sizes they can.

- ``architecture``: the sizes ``config.json`` gives (heads, head size, gated-delta-net heads, MTP layers).
- ``layers``: which checkpoint weights an engine merges into one layer and how it splits each layer.
- ``tp_rules``: the checks the engines run while building a layer (``validate_fp8_block_shape``, the fused
  MoE block checks, even splits), quoted in that module.
- ``loadability``: the decisions ``to-fp8`` takes by default so that its output loads.

No torch; headers and ``config.json`` only.
"""

from normalize_core.engines.architecture import Architecture, architecture_of, mtp_findings
from normalize_core.engines.layers import EngineLayer, LayerKind, engine_layers
from normalize_core.engines.tp_rules import Engine, Parallelism, Problem, RuleBook, layer_problem

__all__ = [
    "Architecture",
    "Engine",
    "EngineLayer",
    "LayerKind",
    "Parallelism",
    "Problem",
    "RuleBook",
    "architecture_of",
    "engine_layers",
    "layer_problem",
    "mtp_findings",
]
