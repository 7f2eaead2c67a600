"""The README's Python example runs as written, in a fresh directory and a fresh interpreter, and
its quick start names the commands CI runs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_python_api_example_runs_verbatim_in_an_empty_directory(tmp_path: Path) -> None:
    example = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    result = subprocess.run([sys.executable, "-c", example], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "unindexed" in result.stdout and "tensors quantized" in result.stdout
    assert (tmp_path / "sample-fp8" / "model.safetensors.index.json").exists()


def test_quick_start_commands_match_ci():
    ci = (README.parent / ".ci" / "run").read_text()
    test_command = re.search(r'TEST_COMMAND="(.*)"', ci).group(1)
    assert test_command in README.read_text()
    assert "python3 -m pip install . && normalize demo" in README.read_text()
