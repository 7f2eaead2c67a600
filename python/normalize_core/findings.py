"""What the checking commands report: findings, each a ``(severity, message)`` pair.

``Severity.ERROR`` fails a check (a loader fails or reads the wrong data); ``Severity.WARNING``
does not. ``inspect``, ``verify`` and ``check`` list them the same way and fail on the same ones.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from normalize_core.kinds import Severity

#: ``(severity, message)``; the severity is a ``Severity`` value.
Finding = tuple[str, str]


def has_errors(findings: Iterable[Finding]) -> bool:
    """Whether any finding is an error."""
    return any(severity == Severity.ERROR for severity, _ in findings)


def findings_as_json(findings: Iterable[Finding]) -> list[dict[str, Any]]:
    """``[{"severity", "message"}]``, in order: how ``--json`` prints findings."""
    return [{"severity": severity, "message": message} for severity, message in findings]
