"""Whether one engine layer loads at one tensor-parallel size: the checks vLLM and SGLang run while building it.

Quoted from the engines (vLLM and SGLang share this code):

- ``validate_fp8_block_shape`` (``quantization/utils/fp8_utils.py``), run for every block-FP8 linear layer::

      # Required by row parallel
      if tp_size > 1 and input_size // input_size_per_partition == tp_size
              and input_size_per_partition % block_k != 0: raise ValueError(...)
      # Required by column parallel or enabling merged weights
      is_tp_split = tp_size > 1 and output_size // sum(output_partition_sizes) == tp_size
      is_merged_gemm = len(output_partition_sizes) > 1
      if is_tp_split or is_merged_gemm:
          sizes_to_check = output_partition_sizes
          if not is_tp_split and is_merged_gemm:
              # In case of merged matrices, we allow the last matrix to not be a multiple of block size
              sizes_to_check = output_partition_sizes[:-1]
          ... output_partition_size % block_n != 0: raise ValueError(...)

  A ragged non-last partition that slips through still cannot load its scale: the merged scale has
  ``ceil(sum/128)`` rows, fewer than the partitions' own blocks (vLLM 0.32 on a Qwen3 with
  ``intermediate_size=576``: ``start (5) + length (5) exceeds dimension size (9)``).
- ``Fp8MoEMethod.create_weights`` (``quantization/fp8.py``) for block-FP8 fused experts::

      if intermediate_size_per_partition % block_n != 0: raise ValueError(
          "The output_size of gate's and up's weight = ... is not divisible by weight quantization block_n")
      if tp_size > 1 and intermediate_size_per_partition % block_k != 0: raise ValueError(
          "The input_size of down's weight = ... is not divisible by weight quantization block_k")

  (``tp_size`` is the TP world size, also under expert parallelism). ``intermediate_size_per_partition``
  is ``moe_intermediate_size / tp``, or the whole size under expert parallelism, where experts are spread
  over ranks instead (SGLang's ``FusedMoE`` asserts
  ``num_experts % moe_ep_size == 0``; vLLM's ``determine_expert_map`` gives the remainder to the first ranks).
- Splitting itself (any dtype): ``divide(numerator, denominator)`` asserts divisibility of every split size,
  ``QKVParallelLinear`` splits ``total_num_heads`` and splits KV heads when ``total_num_kv_heads >= tp``
  or replicates them (``tp % total_num_kv_heads == 0``) otherwise; per rank, q/k/v have
  ``heads/tp·head_dim`` and ``max(1, kv_heads/tp)·head_dim`` rows. The gated-delta-net divides
  ``linear_num_key_heads`` and ``linear_num_value_heads`` by TP.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

from normalize_core.engines.layers import EngineLayer, LayerKind
from normalize_core.fp8.layout import DEFAULT_BLOCK_SIZE


class Engine(StrEnum):
    """The serving engine whose loader is modeled."""

    VLLM = "vllm"
    SGLANG = "sglang"

    @property
    def label(self) -> str:
        """The engine's name as its users write it."""
        return {"vllm": "vLLM", "sglang": "SGLang"}[self.value]


@dataclass(frozen=True)
class Parallelism:
    """One way of serving a checkpoint: TP size, expert parallelism, engine, FP8 block size (n, k)."""

    tp: int
    expert_parallel: bool = False
    engine: Engine = Engine.VLLM
    block: tuple[int, int] = (DEFAULT_BLOCK_SIZE, DEFAULT_BLOCK_SIZE)


@dataclass(frozen=True)
class Problem:
    """Why a layer does not load: one line, and whether keeping the layer unquantized would avoid it."""

    message: str
    #: True for FP8 block rules (the layer loads in bf16); False for splits no dtype can fix.
    fp8_only: bool


class RuleBook:
    """Evaluates layers against the rules, remembering verdicts per layer signature (layers repeat)."""

    def __init__(self) -> None:
        self._verdicts: dict[tuple, Problem | None] = {}

    def problem(self, layer: EngineLayer, parallel: Parallelism) -> Problem | None:
        """Why ``layer`` fails to load under ``parallel``, or None when it loads."""
        key = (layer.signature, parallel)
        if key not in self._verdicts:
            self._verdicts[key] = layer_problem(layer, parallel)
        return self._verdicts[key]


def _split(size: int, tp: int, what: str) -> Problem | None:
    if size % tp:
        return Problem(f"{what} {size} is not divisible by TP {tp} (the engine splits it evenly over ranks)", False)
    return None


#: Side of a weight → (which block edge it is split in, the engine's wording of the size).
_SIDES = {"output": ("block_n", "output_partition_size"), "input": ("block_k", "input_size_per_partition")}


def _block(side: str, parallel: Parallelism) -> int:
    """The block edge a side of the weight is tiled in: block_n for rows (output), block_k for columns."""
    return parallel.block[0 if side == "output" else 1]


def _blocks(size: int, how: str, side: str, parallel: Parallelism) -> Problem:
    """``size`` rows (output side) or columns (input side) per partition are not whole blocks."""
    edge, wording = _SIDES[side]
    block = _block(side, parallel)
    return Problem(
        f"{how} = {size} is not a multiple of {edge} {block} ({parallel.engine.label} validate_fp8_block_shape: "
        f'"Weight {wording} = {size} is not divisible by weight quantization {edge} = {block}")',
        True,
    )


def layer_problem(layer: EngineLayer, parallel: Parallelism) -> Problem | None:
    """Why ``layer`` fails to load under ``parallel`` (see the module docstring for the rules), or None."""
    tp = parallel.tp
    for key, count in layer.head_counts:
        if problem := _split(count, tp, key):
            return problem
    kind = layer.kind
    if kind is LayerKind.FUSED_MOE:
        return _fused_moe(layer, parallel)
    if kind is LayerKind.QKV and layer.heads is not None:
        return _qkv(layer, parallel)
    if kind in (LayerKind.MERGED_COLUMN, LayerKind.QKV):
        return _merged_column(layer, parallel)
    if kind is LayerKind.MERGED_REPLICATED:
        return _ragged_partitions(layer, layer.output_sizes, parallel, "replicated merged layer")
    if kind is LayerKind.COLUMN:
        return _split_side(layer.output_sizes[0], "output", parallel, layer.fp8)
    if kind is LayerKind.ROW:
        return _split_side(layer.input_size, "input", parallel, layer.fp8)
    if kind is LayerKind.UNCLASSIFIED and layer.fp8:
        # Not modeled: the layer must pass as column- and as row-parallel to be sure it loads.
        return _split_side(layer.output_sizes[0], "output", parallel, True) or _split_side(
            layer.input_size, "input", parallel, True
        )
    return None


def _split_side(size: int, side: str, parallel: Parallelism, fp8: bool) -> Problem | None:
    """A column-parallel layer's rows (``side="output"``) or a row-parallel layer's columns (``"input"``),
    split over TP ranks: evenly, and into whole blocks when FP8. Nothing is split at TP 1."""
    tp = parallel.tp
    if tp == 1:
        return None
    if problem := _split(size, tp, f"{side} size"):
        return problem
    if fp8 and (size // tp) % _block(side, parallel):
        return _blocks(size // tp, f"{side} partition {size}/{tp}", side, parallel)
    return None


def _ragged_partitions(
    layer: EngineLayer, per_rank: tuple[int, ...], parallel: Parallelism, what: str
) -> Problem | None:
    """At TP 1 (or replicated) only the last partition of a merged layer may be ragged."""
    if not layer.fp8:
        return None
    block_n = parallel.block[0]
    for label, size in zip(layer.partition_labels[:-1], per_rank[:-1], strict=True):
        if size % block_n:
            blocks = sum(math.ceil(s / block_n) for s in per_rank)
            merged = math.ceil(sum(per_rank) / block_n)
            return Problem(
                f"{label} partition of the {what} = {size} rows is not a multiple of block_n {block_n}: only the "
                f"last partition may be ragged ({parallel.engine.label} validate_fp8_block_shape), and the merged "
                f"scale has ceil({sum(per_rank)}/{block_n}) = {merged} rows for {blocks} partition blocks",
                True,
            )
    return None


def _merged_column(layer: EngineLayer, parallel: Parallelism) -> Problem | None:
    tp, block_n = parallel.tp, parallel.block[0]
    if tp == 1:
        return _ragged_partitions(layer, layer.output_sizes, parallel, "merged layer")
    for label, size in zip(layer.partition_labels, layer.output_sizes, strict=True):
        if problem := _split(size, tp, f"{label} partition"):
            return problem
    if layer.fp8:
        for label, size in zip(layer.partition_labels, layer.output_sizes, strict=True):
            if (size // tp) % block_n:
                return _blocks(size // tp, f"{label} partition {size}/{tp}", "output", parallel)
    return None


def _qkv(layer: EngineLayer, parallel: Parallelism) -> Problem | None:
    tp, block_n = parallel.tp, parallel.block[0]
    query_heads, kv_heads, head_dim = layer.heads
    if tp >= kv_heads and tp % kv_heads:
        return Problem(f"num_key_value_heads {kv_heads} cannot be replicated evenly over TP {tp}", False)
    if tp < kv_heads and kv_heads % tp:
        return Problem(f"num_key_value_heads {kv_heads} is not divisible by TP {tp}", False)
    if query_heads % tp:
        return _split(query_heads, tp, "query heads")
    q_rows = query_heads // tp * head_dim
    kv_rows = max(1, kv_heads // tp) * head_dim
    if tp == 1:
        return _ragged_partitions(layer, (q_rows, kv_rows, kv_rows), parallel, "QKV layer")
    if layer.fp8:
        per_rank = (q_rows, kv_rows, kv_rows)
        for label, rows, heads in zip(layer.partition_labels, per_rank, (query_heads, kv_heads, kv_heads), strict=True):
            if rows % block_n:
                how = f"{label} rows per rank ({max(1, heads // tp)} heads x {head_dim})"
                return _blocks(rows, how, "output", parallel)
    return None


def _fused_moe(layer: EngineLayer, parallel: Parallelism) -> Problem | None:
    tp, (block_n, block_k) = parallel.tp, parallel.block
    moe_tp = 1 if parallel.expert_parallel else tp
    if parallel.expert_parallel and parallel.engine is Engine.SGLANG and layer.experts % tp:
        return Problem(
            f"{layer.experts} experts cannot be spread evenly over {tp} expert-parallel ranks "
            "(SGLang FusedMoE asserts num_experts % moe_ep_size == 0)",
            False,
        )
    if problem := _split(layer.intermediate, moe_tp, "expert intermediate size"):
        return problem
    per_partition = layer.intermediate // moe_tp
    how = f"{layer.intermediate}/{moe_tp}" if moe_tp > 1 else f"{layer.intermediate}"
    label = parallel.engine.label
    if layer.fp8 and per_partition % block_n:
        return Problem(
            f"expert intermediate size per partition {how} = {per_partition} is not a multiple of block_n "
            f"{block_n} ({label} Fp8MoEMethod: \"The output_size of gate's and up's weight = {per_partition} "
            f'is not divisible by weight quantization block_n = {block_n}")',
            True,
        )
    if layer.fp8 and tp > 1 and per_partition % block_k:
        return Problem(
            f"expert intermediate size per partition {how} = {per_partition} is not a multiple of block_k "
            f"{block_k} ({label} Fp8MoEMethod: \"The input_size of down's weight = {per_partition} is not "
            f'divisible by weight quantization block_k = {block_k}")',
            True,
        )
    return None
