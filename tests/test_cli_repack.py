"""``normalize repack|inspect|verify`` as real processes: they run where importing torch fails, size
options mean what they say, and a write that fails half-way (file-size limit hit, a source shard
shrinking after planning) exits non-zero leaving no index, no shard and no temporary file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from builders import INDEX, expected_bytes, save_engine_checkpoint
from normalize_core import NormalizeError
from normalize_core.cli import app
from normalize_core.repack import plan_repack, write_repack
from repack_util import assert_standard_output, leftover_partials, shard_files

#: Runs the CLI's entry point with the arguments that follow; ``PRELUDE`` may set limits first.
CLI = "import sys\n{prelude}\nfrom normalize_core.cli import main\nsys.exit(main())"

#: A ``torch`` module that records the attempt and fails, placed first on ``PYTHONPATH``.
TORCH_BLOCKER = """\
import os
with open(os.environ["TORCH_IMPORT_MARKER"], "a") as marker:
    marker.write("torch was imported\\n")
raise ImportError("torch is blocked in this test")
"""


def run_cli(args: list[str], *, prelude: str = "", env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", CLI.format(prelude=prelude), *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)


def model_tensors() -> dict[str, torch.Tensor]:
    """Twelve 8 KB bf16 matrices and their f32 norms."""
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i in range(12):
        tensors[f"model.layers.{i}.mlp.weight"] = torch.randn(64, 64, generator=g).bfloat16()
        tensors[f"model.layers.{i}.norm.weight"] = torch.rand(64, generator=g)
    return tensors


@pytest.fixture
def engine_source(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    tensors = model_tensors()
    names = list(tensors)
    files = {f"model-rank{r}.safetensors": {n: tensors[n] for n in names[r * 8 : r * 8 + 8]} for r in range(3)}
    source = save_engine_checkpoint(tmp_path / "engine", files)
    (source / "config.json").write_text('{"model_type": "llama"}')
    return source, tensors


@pytest.fixture
def no_torch_env(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """An environment where ``import torch`` fails and leaves a marker file."""
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "torch.py").write_text(TORCH_BLOCKER)
    marker = tmp_path / "torch-imported"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(blocker), env.get("PYTHONPATH")]))
    env["TORCH_IMPORT_MARKER"] = str(marker)
    return env, marker


def test_the_torch_blocker_works(no_torch_env):
    env, marker = no_torch_env
    probe = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, text=True, env=env)
    assert probe.returncode != 0
    assert "torch is blocked in this test" in probe.stderr
    assert marker.exists()


def test_repack_inspect_and_verify_run_without_torch(engine_source, no_torch_env, tmp_path: Path):
    source, tensors = engine_source
    env, marker = no_torch_env
    output = tmp_path / "out"

    repacked = run_cli(["repack", "-s", str(source), "-o", str(output), "--max-shard-size", "20KB", "-q"], env=env)
    assert repacked.returncode == 0, repacked.stderr
    assert "Wrote" in repacked.stdout
    inspected = run_cli(["inspect", str(output), "--json"], env=env)
    assert inspected.returncode == 0, inspected.stderr
    verified = run_cli(["verify", str(output)], env=env)
    assert verified.returncode == 0, verified.stdout + verified.stderr

    assert not marker.exists(), marker.read_text()
    info = json.loads(inspected.stdout)
    assert info["naming"] == "standard"
    assert info["tensors"] == len(tensors)
    assert info["problems"] == []
    assert_standard_output(output, expected_bytes(tensors), 20_000)


def test_verify_exits_1_on_a_broken_output_without_torch(engine_source, no_torch_env, tmp_path: Path):
    source, _ = engine_source
    env, marker = no_torch_env
    output = tmp_path / "out"
    assert run_cli(["repack", "-s", str(source), "-o", str(output), "-q"], env=env).returncode == 0
    index = json.loads((output / INDEX).read_text())
    index["metadata"]["total_size"] += 1
    (output / INDEX).write_text(json.dumps(index))
    verified = run_cli(["verify", str(output)], env=env)
    assert verified.returncode == 1
    assert "total_size" in verified.stdout
    assert not marker.exists()


def test_size_options_are_decimal_and_binary(engine_source, tmp_path: Path):
    source, tensors = engine_source
    runner = CliRunner()
    decimal = runner.invoke(app, ["repack", "-s", str(source), "-o", str(tmp_path / "dec"), "--max-shard-size", "20KB"])
    assert decimal.exit_code == 0, decimal.output
    assert_standard_output(tmp_path / "dec", expected_bytes(tensors), 20_000)
    binary = runner.invoke(app, ["repack", "-s", str(source), "-o", str(tmp_path / "bin"), "--shard-size-gb", "2e-5"])
    assert binary.exit_code == 0, binary.output
    assert_standard_output(tmp_path / "bin", expected_bytes(tensors), int(2e-5 * 2**30))
    sizes = [(tmp_path / "dec" / n).stat().st_size for n in shard_files(tmp_path / "dec") if n != INDEX]
    assert max(sizes) > 20_000 - 8_400  # shards are filled, not split needlessly


def test_shard_files_the_index_does_not_reference_are_reported(tmp_path: Path):
    """A stale shard beside an index is left out, and the CLI says so instead of dropping it silently."""
    source = save_engine_checkpoint(tmp_path / "src", {"model-00001-of-00001.safetensors": {"a": torch.ones(2)}})
    (source / INDEX).write_text(json.dumps({"weight_map": {"a": "model-00001-of-00001.safetensors"}}))
    save_engine_checkpoint(source, {"model-00001-of-00002.safetensors": {"old": torch.zeros(2)}})
    result = CliRunner().invoke(app, ["repack", "-s", str(source), "-o", str(tmp_path / "out"), "-q"])
    assert result.exit_code == 0, result.output
    assert "model-00001-of-00002.safetensors" in result.stdout
    assert "not referenced by the index" in result.stdout


def test_both_size_options_is_a_usage_error(engine_source, tmp_path: Path):
    source, _ = engine_source
    args = ["repack", "-s", str(source), "-o", str(tmp_path / "out"), "--max-shard-size", "5GB", "--shard-size-gb", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert not (tmp_path / "out").exists()


def test_dry_run_prints_the_plan_and_writes_nothing(engine_source, tmp_path: Path):
    source, tensors = engine_source
    result = CliRunner().invoke(
        app, ["repack", "-s", str(source), "-o", str(tmp_path / "out"), "--max-shard-size", "20KB", "--dry-run"]
    )
    assert result.exit_code == 0, result.output
    assert "model-00001-of-" in result.stdout
    assert f"{len(tensors)} tensors" in result.stdout
    assert not (tmp_path / "out").exists()


def test_jobs_do_not_change_the_bytes(engine_source, tmp_path: Path):
    source, _ = engine_source
    runner = CliRunner()
    for jobs in ("1", "3"):
        args = ["repack", "-s", str(source), "-o", str(tmp_path / jobs), "--max-shard-size", "20KB", "-j", jobs, "-q"]
        assert runner.invoke(app, args).exit_code == 0
    names = shard_files(tmp_path / "1")
    assert names == shard_files(tmp_path / "3")
    for name in names:
        assert (tmp_path / "1" / name).read_bytes() == (tmp_path / "3" / name).read_bytes(), name


#: Lets writes past the limit fail with EFBIG instead of killing the process with SIGXFSZ.
FILE_SIZE_LIMIT = (
    "import resource, signal\n"
    "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
    "resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))"
)


def big_last_tensor_source(tmp_path: Path) -> Path:
    """Shards of ~40 KB each, then (smaller elements come last in the file) one 300 KB tensor that gets
    a shard of its own."""
    tensors = {f"small.{i}": torch.full((10_000,), i, dtype=torch.int32) for i in range(4)}
    tensors["big"] = torch.ones(300_000, dtype=torch.int8)
    return save_engine_checkpoint(tmp_path / "engine", {"model-rank0.safetensors": tensors})


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_hitting_the_file_size_limit_leaves_nothing(tmp_path: Path, jobs: str):
    source = big_last_tensor_source(tmp_path)
    output = tmp_path / "out"
    result = run_cli(
        ["repack", "-s", str(source), "-o", str(output), "--max-shard-size", "45KB", "-j", jobs, "-q"],
        prelude=FILE_SIZE_LIMIT.format(limit=200_000),
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert "File too large" in result.stderr
    assert "model-00005-of-00005.safetensors" in result.stderr
    assert not output.exists()


def test_a_failed_overwrite_keeps_user_files_and_leaves_no_index(tmp_path: Path):
    """Over an earlier run's output: its index goes first (it would point at replaced shards), the
    failed run's shards go again, user files stay."""
    source = big_last_tensor_source(tmp_path)
    output = tmp_path / "out"
    assert run_cli(["repack", "-s", str(source), "-o", str(output), "-q"]).returncode == 0
    (output / "notes.txt").write_text("mine")
    result = run_cli(
        ["repack", "-s", str(source), "-o", str(output), "--max-shard-size", "45KB", "--overwrite", "-q"],
        prelude=FILE_SIZE_LIMIT.format(limit=200_000),
    )
    assert result.returncode == 2, result.stderr
    left = sorted(os.listdir(output))
    assert INDEX not in left
    assert "notes.txt" in left
    assert not [name for name in left if name.endswith("-of-00005.safetensors")]
    assert not leftover_partials(output)


def test_a_source_shrinking_after_planning_fails_cleanly(engine_source, tmp_path: Path):
    source, _ = engine_source
    checkpoint, plan = plan_repack(source, 20_000)
    victim = source / "model-rank2.safetensors"
    os.truncate(victim, victim.stat().st_size - 100)
    output = tmp_path / "out"

    with pytest.raises(NormalizeError) as raised:
        write_repack(checkpoint, plan, output, jobs=1)

    assert raised.value.kind == "source_changed"
    assert raised.value.file == str(victim)
    assert not output.exists()


def test_a_failure_after_other_shards_completed_removes_them(engine_source, tmp_path: Path):
    """With one job, shards before the broken one are complete when it fails; they go again."""
    source, _ = engine_source
    checkpoint, plan = plan_repack(source, 20_000)
    assert len(plan.shards) > 3
    victim = source / "model-rank2.safetensors"
    os.truncate(victim, victim.stat().st_size - 100)
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("x")

    with pytest.raises(NormalizeError):
        write_repack(checkpoint, plan, output, jobs=1, overwrite=True)

    assert sorted(os.listdir(output)) == ["keep.txt"]
    assert not leftover_partials(output)


def test_an_aux_file_failing_after_the_shards_were_written_leaves_nothing(engine_source, tmp_path: Path):
    """Aux files are copied once every shard is in place; a FIFO among them fails the run then, and the
    shards already written must go with the directory created for them."""
    source, _ = engine_source
    os.mkfifo(source / "tokenizer.model")
    output = tmp_path / "out"

    result = run_cli(["repack", "-s", str(source), "-o", str(output), "--max-shard-size", "20KB", "-q"])

    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        f"error: {source / 'tokenizer.model'}: is a FIFO, not a regular file; only regular files (or symlinks "
        "to them) are read"
    ]
    assert not output.exists()


@pytest.fixture
def bracketed_source(tmp_path: Path) -> Path:
    """A checkpoint in a directory named like rich markup, holding a tensor named like a closing tag."""
    source = tmp_path / "ckpt[red]"
    source.mkdir()
    header = json.dumps({"w[/]": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 1]}}).encode()
    header += b" " * (-len(header) % 8)
    (source / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0")
    return source


def test_repack_error_line_shows_names_verbatim(bracketed_source: Path, tmp_path: Path):
    result = run_cli(["repack", "-s", str(bracketed_source), "-o", str(tmp_path / "out"), "-q"])
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        f"error: {bracketed_source / 'model.safetensors'}: tensor 'w[/]': unknown dtype 'Q9'"
    ]


def test_verify_finding_shows_names_verbatim(bracketed_source: Path):
    result = run_cli(["verify", str(bracketed_source)], env={**os.environ, "COLUMNS": "1000"})
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert f"{bracketed_source / 'model.safetensors'}: tensor 'w[/]': unknown dtype 'Q9'" in result.stdout


def test_an_interrupted_write_leaves_nothing(engine_source, tmp_path: Path):
    """An exception from the progress callback (how Ctrl-C reaches the writer) fails the write: it
    propagates, and no shard, finished or half-written, is left."""
    source, _ = engine_source
    checkpoint, plan = plan_repack(source, 20_000)
    output = tmp_path / "out"

    class Interrupted(Exception):
        pass

    def interrupt(_bytes: int) -> None:
        raise Interrupted

    with pytest.raises(Interrupted):
        write_repack(checkpoint, plan, output, jobs=2, progress=interrupt)

    assert not output.exists()
