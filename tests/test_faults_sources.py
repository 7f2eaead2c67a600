"""Sources that misbehave while a command runs, each in a real subprocess with a timeout: a refused tensor
while a copy is in flight (once a deadlock), a shard truncated mid-run (once a SIGBUS), a FIFO, directory,
device or dangling link where a shard or aux file should be (once a hang or a silent drop), and a shard
rewritten in place (once undetected). Every one must end in one line and exit 2, with nothing half-written
left behind and never a hang or a signal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from builders import INDEX, save_engine_checkpoint, save_standard_checkpoint, standard_shard_name
from normalize_core import Checkpoint, NormalizeError
from normalize_core._core import plan_shards

SHARDS = [standard_shard_name(i, 3) for i in range(1, 4)]

CLI = "import sys\n{prelude}\nfrom normalize_core.cli import main\nsys.exit(main())"


def normalize(args: list[str], *, prelude: str = "", timeout: float = 60) -> subprocess.CompletedProcess:
    """Runs ``normalize ARGS`` in a fresh interpreter, after ``prelude`` (a test hook); raises on a hang."""
    command = [sys.executable, "-c", CLI.format(prelude=prelude), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def standard_checkpoint(directory: Path, *, inf_in_shard_2: bool = False) -> Path:
    """Three indexed shards, each two 256×256 bf16 projections (quantized by to-fp8) and a 4 MiB norm
    vector (copied). With ``inf_in_shard_2``, shard 2's first projection holds an Inf."""
    g = torch.Generator().manual_seed(0)
    shards = []
    for i in range(3):
        p = f"model.layers.{i}"
        shards.append(
            {
                f"{p}.self_attn.q_proj.weight": (torch.randn(256, 256, generator=g) * 0.05).bfloat16(),
                f"{p}.self_attn.o_proj.weight": (torch.randn(256, 256, generator=g) * 0.05).bfloat16(),
                f"{p}.input_layernorm.weight": torch.rand(2 << 20, generator=g).bfloat16(),
            }
        )
    if inf_in_shard_2:
        shards[1]["model.layers.1.self_attn.q_proj.weight"][3, 5] = float("inf")
    save_standard_checkpoint(directory, shards)
    (directory / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return directory


def unindexed_checkpoint(directory: Path) -> Path:
    """Three engine-named shards (no index) of 15 small tensors each, and a config."""
    g = torch.Generator().manual_seed(1)
    files = {
        f"model-rank{rank}.safetensors": {
            f"model.layers.{rank}.w{j}": torch.randn(16, 16, generator=g).bfloat16() for j in range(15)
        }
        for rank in range(3)
    }
    save_engine_checkpoint(directory, files)
    (directory / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return directory


def temporary_files(root: Path) -> list[Path]:
    """This tool's temporary files (``.<name>.partial-<pid>``) anywhere under ``root``."""
    return list(root.rglob(".*.partial-*"))


def assert_failed_cleanly(result: subprocess.CompletedProcess, output: Path, *needles: str) -> str:
    """Exit 2, one ``error:`` line holding every needle, no signal, no index, no temporary file."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not (output / INDEX).exists()
    assert not temporary_files(output.parent)
    return lines[0]


def test_a_refused_tensor_while_a_copy_is_in_flight_never_hangs(tmp_path: Path):
    """Item 7.2: quantizing shard 2's first tensor fails while its norm is being copied; aborting that
    shard used to deadlock (abort waited for a lock with the GIL held, the copy waited for the GIL)."""
    source = standard_checkpoint(tmp_path / "src", inf_in_shard_2=True)
    for run in range(5):
        output = tmp_path / f"out{run}"
        result = normalize(["to-fp8", "-s", str(source), "-o", str(output), "--device", "cpu", "-q"], timeout=30)
        assert_failed_cleanly(result, output, "model.layers.1.self_attn.q_proj.weight", "NaN or Inf")
        assert not output.exists()


def before_first_quantize(action: str) -> str:
    """A prelude (test hook) that wraps the CPU quantizer to run ``action`` (Python statements that
    see ``self``, the quantizer, and ``layout``) once, just before the first tensor is quantized."""
    body = textwrap.indent(textwrap.dedent(action).strip(), " " * 8)
    return f"""
import os
from normalize_core.fp8 import quantizers
original = quantizers.KernelQuantizer.quantize
def quantize(self, source, layout):
    if not getattr(quantize, "done", False):
        quantize.done = True
{body}
    return original(self, source, layout)
quantizers.KernelQuantizer.quantize = quantize
"""


#: Cuts the first quantized tensor's source file down to its length prefix: everything the run reads
#: from that file afterwards is gone.
TRUNCATE_ITS_SOURCE = "os.truncate(self.checkpoint.dir / self.checkpoint.tensor(layout.name).file, 8)"


def test_a_source_truncated_mid_run_is_an_error_not_a_signal(tmp_path: Path):
    """Item 7.3: the loaded tensor used to be a mapping of the source, so truncating the file killed the
    process with SIGBUS. Now reads are positional into owned memory, and the shrink is reported."""
    source = standard_checkpoint(tmp_path / "src")
    output = tmp_path / "out"

    result = normalize(
        ["to-fp8", "-s", str(source), "-o", str(output), "--device", "cpu", "-q"],
        prelude=before_first_quantize(TRUNCATE_ITS_SOURCE),
    )

    assert result.returncode >= 0, f"killed by signal {-result.returncode}"
    assert_failed_cleanly(result, output, str(source / SHARDS[0]), "changed while being read")
    assert not output.exists()


#: Rewrites the bytes of shard 1's copied norm in place (same size): the shard being written would mix
#: bytes from two versions of the file.
REWRITE_A_COPIED_TENSOR = """
entry = self.checkpoint.tensor("model.layers.0.input_layernorm.weight")
with open(self.checkpoint.dir / entry.file, "r+b") as f:
    f.seek(entry.file_offset)
    f.write(bytes(64))
"""


def test_a_source_rewritten_in_place_mid_run_fails_and_writes_no_index(tmp_path: Path):
    """Item 7.11 (the Python-driven write path of to-fp8)."""
    source = standard_checkpoint(tmp_path / "src")
    output = tmp_path / "out"

    result = normalize(
        ["to-fp8", "-s", str(source), "-o", str(output), "--device", "cpu", "-q"],
        prelude=before_first_quantize(REWRITE_A_COPIED_TENSOR),
    )

    assert_failed_cleanly(result, output, str(source / SHARDS[0]), "changed while being read")
    assert not output.exists()


def test_a_shard_writer_refuses_to_commit_after_its_source_changed(tmp_path: Path):
    """Item 7.11 through the binding: copied, then the source rewritten (same size), then finish."""
    source = unindexed_checkpoint(tmp_path / "src")
    checkpoint = Checkpoint.open(source)
    plan = plan_shards(checkpoint, 1 << 30)
    output = tmp_path / "out"
    output.mkdir()
    writer = plan.open_shard(0, output)
    writer.copy_sources()
    victim = source / "model-rank1.safetensors"
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    with open(victim, "r+b") as f:
        f.write(data)

    with pytest.raises(NormalizeError) as raised:
        writer.finish()

    assert raised.value.kind == "source_changed"
    assert raised.value.file == str(victim)
    assert list(output.iterdir()) == []


def test_a_view_of_a_source_changed_since_opening_is_refused(tmp_path: Path):
    """Reading a tensor checks the file is still the one the checkpoint opened."""
    source = unindexed_checkpoint(tmp_path / "src")
    checkpoint = Checkpoint.open(source)
    victim = source / "model-rank0.safetensors"
    os.truncate(victim, victim.stat().st_size - 2)

    with pytest.raises(NormalizeError) as raised:
        checkpoint.view("model.layers.0.w14")

    assert raised.value.kind == "source_changed"
    assert str(raised.value) == (
        f"{victim}: changed while being read (it was {victim.stat().st_size + 2} bytes, now "
        f"{victim.stat().st_size}); rerun once nothing writes to it"
    )


def test_read_into_fills_a_callers_buffer_with_the_tensors_bytes(tmp_path: Path):
    source = unindexed_checkpoint(tmp_path / "src")
    checkpoint = Checkpoint.open(source)
    name = "model.layers.2.w3"
    buffer = bytearray(checkpoint.tensor(name).nbytes)

    checkpoint.read_into(name, buffer)

    assert bytes(buffer) == bytes(checkpoint.view(name))
    with pytest.raises(ValueError, match="has 3 bytes; the tensor has 512"):
        checkpoint.read_into(name, bytearray(3))
    with pytest.raises(ValueError, match="writable"):
        checkpoint.read_into(name, bytes(512))


def fifo(path: Path) -> None:
    os.mkfifo(path)


def directory(path: Path) -> None:
    path.mkdir()


def dangling_symlink(path: Path) -> None:
    path.symlink_to(path.parent / "gone.safetensors")


def symlink_to_dev_zero(path: Path) -> None:
    path.symlink_to("/dev/zero")


NOT_REGULAR = {
    "a FIFO": fifo,
    "a directory": directory,
    "a dangling symlink": dangling_symlink,
    "a character device": symlink_to_dev_zero,
}


@pytest.mark.parametrize("what", NOT_REGULAR)
def test_an_engine_named_shard_that_is_not_a_regular_file_is_an_error(tmp_path: Path, what: str):
    """Item 7.5: such a shard used to be skipped silently (exit 0 with a third of the tensors missing)."""
    source = unindexed_checkpoint(tmp_path / "src")
    victim = source / "model-rank1.safetensors"
    victim.unlink()
    NOT_REGULAR[what](victim)
    output = tmp_path / "out"

    result = normalize(["repack", "-s", str(source), "-o", str(output), "-q"])

    assert_failed_cleanly(result, output, f"{victim}: is {what}, not a regular file")
    assert not output.exists()


@pytest.mark.parametrize("what", ["a FIFO", "a dangling symlink"])
def test_an_indexed_shard_that_is_not_a_regular_file_is_named_as_such(tmp_path: Path, what: str):
    """Item 7.5 for an index: the error says what the file is, not that it does not exist."""
    source = standard_checkpoint(tmp_path / "src")
    victim = source / SHARDS[2]
    victim.unlink()
    NOT_REGULAR[what](victim)
    output = tmp_path / "out"

    result = normalize(["repack", "-s", str(source), "-o", str(output), "-q"])

    assert_failed_cleanly(result, output, f"{victim}: is {what}, not a regular file")


def test_symlinked_shards_like_an_hf_cache_snapshot_are_read(tmp_path: Path):
    """A symlink to a regular file is a valid shard (every file of an HF cache snapshot is one)."""
    blobs = tmp_path / "repo" / "blobs"
    unindexed_checkpoint(blobs)
    snapshot = tmp_path / "repo" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    for name in ("config.json", *(f"model-rank{r}.safetensors" for r in range(3))):
        (snapshot / name).symlink_to(Path("../../blobs") / name)

    result = normalize(["repack", "-s", str(snapshot), "-o", str(tmp_path / "out"), "-q"])

    assert result.returncode == 0, result.stderr
    assert len(Checkpoint.open(tmp_path / "out")) == 45
    assert not (tmp_path / "out" / "config.json").is_symlink()
    assert (tmp_path / "out" / "config.json").read_text() == (blobs / "config.json").read_text()


def test_a_fifo_aux_file_is_an_error_not_a_hang(tmp_path: Path):
    """Item 7.4: a FIFO named tokenizer.json used to block repack forever (opened for reading, no writer)."""
    source = unindexed_checkpoint(tmp_path / "src")
    os.mkfifo(source / "tokenizer.json")
    output = tmp_path / "out"

    result = normalize(["repack", "-s", str(source), "-o", str(output), "-q"], timeout=30)

    assert_failed_cleanly(result, output, f"{source / 'tokenizer.json'}: is a FIFO, not a regular file")
    assert not output.exists()
