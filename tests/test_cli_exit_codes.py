"""One exit-status table for every command: 0 done (all checks hold), 1 checked and found problems,
2 usage or input error, always with one ``error:`` line and never a traceback. The cases the
issue found are run as real processes; the rest in-process through the same entry point."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cli_util import invoke, one_error_line, run_normalize
from normalize_core import repack
from normalize_core.sample import write_sample_checkpoint
from normalize_core.sizes import MIB


@pytest.fixture(scope="module")
def engine_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in sample (engine-named shards, no index), written once: no test changes it."""
    return write_sample_checkpoint(tmp_path_factory.mktemp("exit-codes") / "engine")


@pytest.fixture(scope="module")
def standard_checkpoint(engine_checkpoint: Path) -> Path:
    """The built-in sample repacked into standard shards with an index: every check holds."""
    output = engine_checkpoint.parent / "standard"
    repack(engine_checkpoint, output, max_shard_bytes=MIB)
    return output


#: Usage errors, each with the words its one line must contain. ``{src}`` is a valid checkpoint.
USAGE_ERRORS = {
    "shard size inf": (["repack", "-s", "{src}", "-o", "{out}", "--shard-size-gb", "inf"], "finite"),
    "shard size 1e30": (["repack", "-s", "{src}", "-o", "{out}", "--shard-size-gb", "1e30"], "at most 1 EiB"),
    "shard size nan": (["repack", "-s", "{src}", "-o", "{out}", "--shard-size-gb", "nan"], "finite"),
    "shard size 0": (["repack", "-s", "{src}", "-o", "{out}", "--shard-size-gb", "0"], "at least 1 byte"),
    "size string too big": (["repack", "-s", "{src}", "-o", "{out}", "--max-shard-size", "9" * 30 + "TB"], "1 EiB"),
    "two size options": (
        ["repack", "-s", "{src}", "-o", "{out}", "--shard-size-gb", "1", "--max-shard-size", "1GB"],
        "not both",
    ),
    "device tpu": (["to-fp8", "-s", "{src}", "-o", "{out}", "--device", "tpu"], "auto, cpu, cuda or cuda:N"),
    "device cuda:abc": (["to-fp8", "-s", "{src}", "-o", "{out}", "--device", "cuda:abc"], "'cuda:abc'"),
    "device empty": (["to-fp8", "-s", "{src}", "-o", "{out}", "--device", ""], "auto, cpu, cuda or cuda:N"),
    "bad scale format": (["to-fp8", "-s", "{src}", "-o", "{out}", "--scale-fmt", "e5m2"], "float or ue8m0"),
    "demo into a file": (["demo", "{file}"], "not a directory"),
    "demo where nothing can be made": (["demo", "/proc/normalize-demo"], "/proc/normalize-demo"),
    "missing option": (["repack", "-s", "{src}"], "--output"),
    "unknown option": (["repack", "--sorce", "{src}"], "--sorce"),
    "missing argument": (["inspect"], "Missing argument 'directory'"),
    "extra argument": (["verify", "{src}", "{src}"], "unexpected extra argument"),
    "merge without --out": (["merge", "--base", "{src}", "--extra", "{src}"], "--out"),
    "place without a destination": (["place", "{src}"], "Missing argument 'dest'"),
    "unknown command": (["repak"], "repak"),
    "bad --jobs": (["repack", "-s", "{src}", "-o", "{out}", "--jobs", "0"], "--jobs"),
}


#: The cases issue 7 found printing tracebacks or Python internals; these run as real processes.
TRACEBACKS_BEFORE = [
    "shard size inf",
    "shard size 1e30",
    "shard size nan",
    "device tpu",
    "device cuda:abc",
    "device empty",
    "demo into a file",
    "demo where nothing can be made",
]


def usage_error(case: str, standard_checkpoint: Path, tmp_path: Path, run) -> None:
    template, words = USAGE_ERRORS[case]
    file = tmp_path / "a-file"
    file.write_text("not a directory")
    args = [a.format(src=standard_checkpoint, out=tmp_path / "out", file=file) for a in template]
    result = run(*args)
    assert result.returncode == 2, result.stderr
    line = one_error_line(result)
    assert words in line
    assert "Errno" not in line and "float NaN" not in line, "no Python internals"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", USAGE_ERRORS, ids=list(USAGE_ERRORS))
def test_usage_errors_are_one_line_and_exit_2(case: str, standard_checkpoint: Path, tmp_path: Path) -> None:
    usage_error(case, standard_checkpoint, tmp_path, invoke)


@pytest.mark.parametrize("case", TRACEBACKS_BEFORE)
def test_former_tracebacks_as_real_processes(case: str, standard_checkpoint: Path, tmp_path: Path) -> None:
    usage_error(case, standard_checkpoint, tmp_path, run_normalize)


#: Paths that do not exist, for every command that reads one.
MISSING_INPUT = {
    "inspect": ["inspect", "{missing}"],
    "verify": ["verify", "{missing}"],
    "diff": ["diff", "{missing}", "{src}"],
    "repack": ["repack", "-s", "{missing}", "-o", "{out}"],
    "to-fp8": ["to-fp8", "-s", "{missing}", "-o", "{out}"],
    "merge": ["merge", "--base", "{src}", "--extra", "{missing}", "--out", "{out}", "--yes"],
    "place": ["place", "{missing}", "{out}"],
}


@pytest.mark.parametrize("command", MISSING_INPUT)
def test_a_missing_input_is_one_line_and_exit_2_for_every_command(
    command: str, standard_checkpoint: Path, tmp_path: Path
) -> None:
    missing = tmp_path / "nonexistent"
    args = [a.format(src=standard_checkpoint, out=tmp_path / "out", missing=missing) for a in MISSING_INPUT[command]]
    result = run_normalize(*args) if command in ("inspect", "verify") else invoke(*args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert str(missing) in one_error_line(result)
    assert result.stdout == "", "nothing but the error line"
    assert not (tmp_path / "out").exists()


def test_checks_that_hold_exit_0(standard_checkpoint: Path) -> None:
    for args in (["verify", str(standard_checkpoint)], ["inspect", str(standard_checkpoint)]):
        result = invoke(*args)
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stderr == ""


def test_inspect_exits_1_when_it_reports_an_error(engine_checkpoint: Path) -> None:
    """Engine-named shards without an index: inspect describes them, reports the error and exits 1
    (as verify does), with or without --json."""
    result = run_normalize("inspect", str(engine_checkpoint))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "error: 3 shard files but no model.safetensors.index.json" in result.stdout
    assert "21 tensors" in result.stdout, "the description comes first"
    as_json = invoke("inspect", str(engine_checkpoint), "--json")
    assert as_json.returncode == 1
    assert [p["severity"] for p in json.loads(as_json.stdout)["problems"]] == ["error"]
    verified = invoke("verify", str(engine_checkpoint))
    assert verified.returncode == 1


def test_checking_commands_exit_1_for_a_checkpoint_that_does_not_parse(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    for command in ("verify", "inspect"):
        result = invoke(command, str(broken))
        assert result.returncode == 1, (command, result.stdout, result.stderr)
        assert "header is not valid safetensors JSON" in result.stdout
        assert "Traceback" not in result.stderr


def test_diff_exits_0_when_checkpoints_differ(standard_checkpoint: Path, engine_checkpoint: Path) -> None:
    result = invoke("diff", str(standard_checkpoint), str(engine_checkpoint))
    assert result.returncode == 0, result.stderr


def test_the_table_is_in_the_help_and_the_readme() -> None:
    result = invoke("--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "Exit status: 0 done (all checks hold); 1 checked and found problems" in text
    assert "2 usage or input error" in text
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "| 0 | done" in readme and "| 1 | checked and found problems" in readme and "| 2 | usage" in readme


def test_no_command_prints_the_help_and_exits_2() -> None:
    result = invoke()
    assert result.returncode == 2
    assert "Commands:" in result.stderr and result.stdout == ""


def test_a_prompt_left_without_an_answer_is_one_line_and_exit_2(tmp_path: Path, monkeypatch) -> None:
    """End of input at a prompt (click's Abort) used to end in a traceback: the handler looked the
    exception up where typer's vendored click does not define it."""
    monkeypatch.setattr("normalize_core.cli.placement.terminal_attached", lambda: True)
    source = write_sample_checkpoint(tmp_path / "engine")
    result = invoke("repack", "-s", str(source), "-o", str(tmp_path / "out"))
    assert result.returncode == 2, result.stdout
    assert one_error_line(result) == "error: aborted: no answer to the question"


@pytest.mark.parametrize(
    ("command", "status"),
    [
        (["diff", "{standard}", "{engine}", "--json"], 0),
        (["inspect", "{engine}"], 1),
        (["inspect", "{missing}"], 2),
    ],
)
def test_the_console_entry_point_keeps_every_status_and_every_line(
    command: list[str], status: int, standard_checkpoint: Path, engine_checkpoint: Path, tmp_path: Path
) -> None:
    """``run`` (the console script, ``python -m normalize_core``) ends the process without the
    interpreter's teardown: the status and all the output, block-buffered on a pipe, must still
    come out as ``main`` gives them in-process."""
    paths = {"standard": standard_checkpoint, "engine": engine_checkpoint, "missing": tmp_path / "missing"}
    args = [arg.format(**paths) for arg in command]
    buffered = {name: value for name, value in os.environ.items() if name != "PYTHONUNBUFFERED"}
    child, in_process = run_normalize(*args, env=buffered), invoke(*args)
    assert child.returncode == in_process.returncode == status, child.stderr
    assert child.stdout == in_process.stdout and child.stdout.count("\n") >= (1 if status < 2 else 0)
    assert child.stderr == in_process.stderr
