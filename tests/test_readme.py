"""The README's Python example runs as written, on the built-in sample checkpoint."""

from __future__ import annotations

import re
from pathlib import Path

from normalize_core.sample import write_sample_checkpoint

README = Path(__file__).resolve().parents[1] / "README.md"


def test_python_api_example_runs(tmp_path, monkeypatch, capsys):
    example = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    write_sample_checkpoint("sample")
    exec(compile(example, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "unindexed" in printed and "tensors quantized" in printed
    assert (tmp_path / "sample-fp8" / "model.safetensors.index.json").exists()


def test_quick_start_commands_match_ci():
    ci = (README.parent / ".ci" / "run").read_text()
    test_command = re.search(r'TEST_COMMAND="(.*)"', ci).group(1)
    assert test_command in README.read_text()
    assert "python3 -m pip install . && normalize demo" in README.read_text()
