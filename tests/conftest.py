"""Shared fixtures. Checkpoint builders and readers are in ``builders.py``; output-layout checks for the
repack tests in ``repack_util.py``."""

from __future__ import annotations

from pathlib import Path

import pytest

from normalize_core.sample import write_sample_checkpoint


@pytest.fixture
def engine_checkpoint(tmp_path: Path) -> Path:
    """The built-in sample: three engine-named bf16 shards plus config and tokenizer files."""
    return write_sample_checkpoint(tmp_path / "engine")


@pytest.fixture(scope="module")
def forkserver():
    """Starts command-line runs quickly, each its own process (see ``output_util.Forkserver``)."""
    from output_util import Forkserver

    server = Forkserver()
    yield server
    server.close()
