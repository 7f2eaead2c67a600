"""``inspect`` and ``verify``: what a checkpoint holds and whether engines will load it.

Both read headers, the index and ``config.json`` only (plus FP8 scale tensors, which are
small); neither imports torch.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from normalize_core._core import Checkpoint, NormalizeError, list_aux_files
from normalize_core.config_file import read_config
from normalize_core.engines.verdicts import engine_findings
from normalize_core.findings import Finding, findings_as_json, has_errors
from normalize_core.fp8.contract import fp8_findings
from normalize_core.fp8.layout import SCALE_SUFFIX, is_fp8_weight
from normalize_core.kinds import Layout, Severity


def naming_style(checkpoint: Checkpoint) -> str:
    """``standard`` (HF names + index), ``single_file``, ``indexed_custom`` (index, other names)
    or ``engine`` (several shards, no index)."""
    if checkpoint.has_standard_names:
        return "standard"
    return {Layout.SINGLE_FILE: "single_file", Layout.INDEXED: "indexed_custom"}.get(checkpoint.layout, "engine")


def quantization_summary(checkpoint: Checkpoint, config: dict[str, Any] | None) -> dict[str, Any]:
    """Counts FP8 weights (FP8 tensors that are not scales) and their block scales, and names the scheme."""
    names = set(checkpoint.names())
    fp8 = [t for t in checkpoint.tensors if is_fp8_weight(t.name, t.dtype)]
    block_scaled = [t for t in fp8 if t.name + SCALE_SUFFIX in names]
    scale_dtypes = Counter(checkpoint.tensor(t.name + SCALE_SUFFIX).dtype for t in block_scaled)
    if not fp8:
        scheme = "none"
    elif len(block_scaled) == len(fp8):
        scheme = "fp8_block"
    else:
        scheme = "fp8_other"
    summary: dict[str, Any] = {
        "scheme": scheme,
        "fp8_tensors": len(fp8),
        "block_scaled": len(block_scaled),
        "scale_dtypes": dict(scale_dtypes),
    }
    if config and "quantization_config" in config:
        summary["config"] = config["quantization_config"]
    return summary


def inspect_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON-ready description: layout, naming, shards, dtypes, quantization, aux files, problems."""
    directory = Path(path)
    checkpoint = Checkpoint.open(directory)
    per_file: dict[str, list[int]] = {name: [0, 0] for name in checkpoint.files}
    dtypes: dict[str, dict[str, int]] = {}
    for t in checkpoint.tensors:
        per_file[t.file][0] += 1
        per_file[t.file][1] += t.nbytes
        entry = dtypes.setdefault(t.dtype, {"tensors": 0, "bytes": 0})
        entry["tensors"] += 1
        entry["bytes"] += t.nbytes
    config = read_config(directory)
    problems = findings_as_json([*checkpoint.problems(), *fp8_findings(checkpoint, config)])
    return {
        "path": str(directory),
        "layout": checkpoint.layout,
        "naming": naming_style(checkpoint),
        "tensors": len(checkpoint),
        "total_size": checkpoint.total_size,
        "total_parameters": checkpoint.total_parameters,
        "shards": [{"file": f, "tensors": n, "bytes": b} for f, (n, b) in per_file.items()],
        "dtypes": dtypes,
        "quantization": quantization_summary(checkpoint, config),
        "aux_files": list_aux_files(directory),
        "unreferenced_files": checkpoint.unreferenced_files,
        "problems": problems,
    }


@dataclass
class VerifyReport:
    """Outcome of ``verify``: ``ok`` unless some finding is an error."""

    path: Path
    ok: bool
    tensors: int = 0
    shards: int = 0
    findings: list[Finding] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (what ``normalize verify --json`` prints)."""
        return {
            "path": str(self.path),
            "ok": self.ok,
            "tensors": self.tensors,
            "shards": self.shards,
            "findings": findings_as_json(self.findings),
        }


def verify_checkpoint(path: str | os.PathLike) -> VerifyReport:
    """Checks headers, index ↔ shard consistency, ``total_size``, stray or missing tensors, and
    MTP layers against ``config.json``, and for FP8 checkpoints the scale tensors, ``quantization_config``
    and that vLLM loads them at TP 1."""
    directory = Path(path)
    try:
        checkpoint = Checkpoint.open(directory)
    except NormalizeError as e:
        return VerifyReport(directory, ok=False, findings=[(Severity.ERROR, str(e))])
    findings = list(checkpoint.problems())
    config = read_config(directory)
    findings += fp8_findings(checkpoint, config)
    findings += engine_findings(checkpoint.tensors, config)
    return VerifyReport(directory, not has_errors(findings), len(checkpoint), len(checkpoint.files), findings)
