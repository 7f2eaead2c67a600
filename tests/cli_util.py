"""Running ``normalize`` as a real process, the way a user or a script does."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from normalize_core.cli import app


def run_normalize(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess:
    """``normalize ARGS`` (``python -m normalize_core``) in a child process, in ``env`` (default:
    this one's), killed after ``timeout`` seconds; stdout and stderr are pipes, not a terminal."""
    command = [sys.executable, "-m", "normalize_core", *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def invoke(*args: str) -> subprocess.CompletedProcess:
    """``normalize ARGS`` run in this process (fast; the same entry point, output not a terminal),
    reported like ``run_normalize``."""
    result = CliRunner().invoke(app, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return subprocess.CompletedProcess(list(args), result.exit_code, result.stdout, result.stderr)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The single ``error: ...`` line a failed command printed on stderr (asserts there is exactly
    one, and no traceback anywhere)."""
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]
