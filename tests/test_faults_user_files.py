"""The small files Python reads itself (``config.json``, aux files merge and place compare) go through the core's
regular-file checks: ``read_regular_file`` and ``files_equal``. A FIFO named ``config.json`` used to hang
to-fp8, verify, inspect and check (opened for reading, no writer); one among the aux files hung merge and
place while they compared it. Each is now one ``error:`` line and exit 2, run as a real process with a
timeout; nothing is left in the output or the destination."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from builders import INDEX, make_tensors, snapshot, write_checkpoint
from cli_util import one_error_line, run_normalize
from normalize_core import NormalizeError, repack, to_fp8
from normalize_core._core import files_equal, read_regular_file
from normalize_core.config_file import CONFIG_MAX_BYTES, read_config
from normalize_core.sizes import MIB
from test_faults_sources import NOT_REGULAR, temporary_files

#: Seconds a command gets: a hang is a failure, not a slow test.
TIMEOUT = 30

SPEC = {f"model.layers.{i}.mlp.down_proj.weight": (torch.bfloat16, (128, 128)) for i in range(4)}
CONFIG = json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"})


def checkpoint(directory: Path, seed: int = 0, config: str | None = CONFIG) -> Path:
    """Four bf16 projections in two indexed standard shards, with ``config.json`` and a tokenizer file."""
    aux = {"tokenizer_config.json": "{}"} | ({"config.json": config} if config is not None else {})
    return write_checkpoint(directory, make_tensors(SPEC, seed), layout="indexed", files=2, aux=aux)


def fifo_config(directory: Path) -> Path:
    """``directory``'s config.json replaced by a FIFO nobody writes to."""
    path = directory / "config.json"
    path.unlink(missing_ok=True)
    os.mkfifo(path)
    return path


def refused(result: subprocess.CompletedProcess, path: Path, what: str = "a FIFO") -> None:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert one_error_line(result) == (
        f"error: {path}: is {what}, not a regular file; only regular files (or symlinks to them) are read"
    )


def test_read_regular_file_reads_small_files_and_refuses_the_rest(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(CONFIG)
    assert read_regular_file(config, CONFIG_MAX_BYTES) == CONFIG.encode()
    link = tmp_path / "link.json"
    link.symlink_to(config.name)
    assert read_regular_file(link, len(CONFIG)) == CONFIG.encode()
    with pytest.raises(NormalizeError) as too_large:
        read_regular_file(config, 10)
    assert too_large.value.kind == "file_too_large" and too_large.value.file == str(config)
    assert str(too_large.value) == (
        f"{config}: is {len(CONFIG)} bytes, over the 10-byte limit for this file; is it the right file?"
    )
    for what, make in NOT_REGULAR.items():
        victim = tmp_path / what.replace(" ", "_")
        make(victim)
        with pytest.raises(NormalizeError) as raised:
            read_regular_file(victim, CONFIG_MAX_BYTES)
        assert raised.value.kind == "not_a_regular_file" and raised.value.file == str(victim)
        assert f"is {what}, not a regular file" in str(raised.value)
    with pytest.raises(NormalizeError) as missing:
        read_regular_file(tmp_path / "missing.json", CONFIG_MAX_BYTES)
    assert missing.value.kind == "io"


def test_files_equal_compares_bytes_and_refuses_a_fifo(tmp_path: Path) -> None:
    payload = os.urandom(3 * MIB + 5)
    (tmp_path / "a").write_bytes(payload)
    (tmp_path / "b").write_bytes(payload)
    (tmp_path / "c").write_bytes(payload[:-1] + bytes([payload[-1] ^ 1]))
    (tmp_path / "d").write_bytes(payload[:-1])
    assert files_equal(tmp_path / "a", tmp_path / "b")
    assert not files_equal(tmp_path / "a", tmp_path / "c")
    assert not files_equal(tmp_path / "a", tmp_path / "d")
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(NormalizeError) as raised:
        files_equal(tmp_path / "a", tmp_path / "fifo")
    assert raised.value.kind == "not_a_regular_file" and raised.value.file == str(tmp_path / "fifo")


def test_read_config_tells_absent_and_not_json_from_not_readable(tmp_path: Path) -> None:
    assert read_config(tmp_path) is None
    (tmp_path / "config.json").write_text("not json")
    assert read_config(tmp_path) is None
    (tmp_path / "config.json").write_bytes(b"\xff\xfe\x00")
    assert read_config(tmp_path) is None
    (tmp_path / "config.json").write_text(CONFIG)
    assert read_config(tmp_path) == json.loads(CONFIG)
    (tmp_path / "config.json").unlink()
    (tmp_path / "config.json").mkdir()
    with pytest.raises(NormalizeError) as raised:
        read_config(tmp_path)
    assert raised.value.kind == "not_a_regular_file"


@pytest.mark.parametrize("command", ["verify", "inspect", "check"])
def test_a_fifo_config_makes_the_checking_commands_exit_2(tmp_path: Path, command: str) -> None:
    source = checkpoint(tmp_path / "src")
    victim = fifo_config(source)
    refused(run_normalize(command, str(source), timeout=TIMEOUT), victim)


@pytest.mark.parametrize("what", ["a directory", "a character device"])
def test_a_config_that_is_no_file_makes_verify_exit_2(tmp_path: Path, what: str) -> None:
    source = checkpoint(tmp_path / "src", config=None)
    NOT_REGULAR[what](source / "config.json")
    refused(run_normalize("verify", str(source), timeout=TIMEOUT), source / "config.json", what)


def test_a_fifo_config_makes_to_fp8_exit_2_before_writing(tmp_path: Path) -> None:
    source = checkpoint(tmp_path / "src")
    victim = fifo_config(source)
    output = tmp_path / "out"
    result = run_normalize("to-fp8", "-s", str(source), "-o", str(output), "--device", "cpu", "-q", timeout=TIMEOUT)
    refused(result, victim)
    assert not output.exists()


def test_a_fifo_config_makes_to_bf16_exit_2_before_writing(tmp_path: Path) -> None:
    """to-bf16 reads config.json first: the quantization scheme and block size come from it."""
    fp8 = tmp_path / "fp8"
    to_fp8(checkpoint(tmp_path / "src"), fp8, device="cpu", allow_unloadable=True)
    victim = fifo_config(fp8)
    output = tmp_path / "out"
    result = run_normalize("to-bf16", "-s", str(fp8), "-o", str(output), "--device", "cpu", "-q", timeout=TIMEOUT)
    refused(result, victim)
    assert not output.exists()


#: Rewrites the config.json at argv[1] into argv[2] as to-fp8 does at the end of a run; prints the error's kind.
WRITE_QUANTIZED_CONFIG = """
import sys
from pathlib import Path
from normalize_core import NormalizeError
from normalize_core.fp8.config import write_quantized_config
try:
    write_quantized_config(Path(sys.argv[1]), Path(sys.argv[2]), {"quant_method": "fp8"})
except NormalizeError as e:
    print(e.kind)
"""


def test_the_config_rewrite_of_to_fp8_refuses_a_fifo(tmp_path: Path) -> None:
    """to-fp8 reads the source's config.json again at the end of a run, to write the output's."""
    victim = fifo_config(checkpoint(tmp_path / "src"))
    command = [sys.executable, "-c", WRITE_QUANTIZED_CONFIG, str(victim), str(tmp_path / "config.json")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT)
    assert (result.returncode, result.stdout) == (0, "not_a_regular_file\n"), result.stderr
    assert not (tmp_path / "config.json").exists()


@pytest.mark.parametrize("fifo_in", ["base", "extra"])
def test_a_fifo_config_in_either_checkpoint_makes_merge_exit_2(tmp_path: Path, fifo_in: str) -> None:
    """merge copies the base's aux files and compares the extra's with them (to list those it leaves out)."""
    base, extra = checkpoint(tmp_path / "base"), checkpoint(tmp_path / "extra", seed=1)
    victim = fifo_config(base if fifo_in == "base" else extra)
    output = tmp_path / "out"
    result = run_normalize(
        "merge", "--base", str(base), "--extra", str(extra), "--out", str(output), "--yes", timeout=TIMEOUT
    )
    refused(result, victim)
    assert not (output / INDEX).exists() and not temporary_files(tmp_path)


@pytest.fixture
def staged(tmp_path: Path) -> tuple[Path, Path]:
    """(destination, staging): a checkpoint and its repack into one shard, each with its own config.json."""
    destination = checkpoint(tmp_path / "dest")
    staging = tmp_path / "staging"
    repack(destination, staging, max_shard_bytes=64 * MIB)
    return destination, staging


@pytest.mark.parametrize("in_destination", [True, False], ids=["compared", "copied"])
def test_a_fifo_aux_file_in_the_staging_makes_place_exit_2(staged: tuple[Path, Path], in_destination: bool) -> None:
    """The staging's FIFO is compared with the destination's file of its name (or, the destination lacking
    one, copied): either way refused, the destination untouched."""
    destination, staging = staged
    victim = staging / "tokenizer_config.json"
    victim.unlink()
    os.mkfifo(victim)
    if not in_destination:
        (destination / victim.name).unlink()
    before = snapshot(destination)
    refused(run_normalize("place", str(staging), str(destination), "--yes", timeout=TIMEOUT), victim)
    assert snapshot(destination) == before
    assert not [p for p in destination.rglob(".*") if "partial" in p.name]


def test_a_fifo_in_the_destination_is_replaced_never_opened(staged: tuple[Path, Path]) -> None:
    """A destination entry that is no regular file counts as lacking: place never opens it, and replaces it
    (after confirmation) with the staging's file."""
    destination, staging = staged
    os.unlink(destination / "tokenizer_config.json")
    os.mkfifo(destination / "tokenizer_config.json")
    result = run_normalize("place", str(staging), str(destination), "--yes", timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert (destination / "tokenizer_config.json").read_text() == "{}"
