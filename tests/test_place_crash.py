"""``place`` killed at every step: the destination is always the old checkpoint, the new one, or
one that refuses to load (no config.json), never FP8 weights beside a bf16 config or the reverse,
and never an index naming a missing or half-written shard. A later placement clears what the
killed one left (only leftovers of processes that no longer run) and says so."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from builders import INDEX, read_output_bytes
from normalize_core import place, repack, to_fp8
from normalize_core.cli import app
from normalize_core.place import KILL_AT_STEP_ENV
from normalize_core.sample import write_sample_checkpoint
from normalize_core.sizes import MIB

#: Places STAGING into DEST through the library, as ``normalize place --yes`` does.
PLACE = "import sys; from normalize_core import place; place(sys.argv[1], sys.argv[2], overwrite=True, remove_stale={})"


def leftovers(directory: Path) -> list[str]:
    """Names a placement uses while it runs, anywhere below ``directory``."""
    return sorted(p.name for p in directory.rglob(".*") if ".partial-place-" in p.name or ".previous-place-" in p.name)


def place_killed_at(staging: Path, dest: Path, step: int, remove_stale: bool) -> int:
    """Runs a placement in a child process that kills itself before its ``step``-th change to
    ``dest``; returns its exit status (``-SIGKILL`` when the kill point was reached)."""
    env = dict(os.environ, **{KILL_AT_STEP_ENV: str(step)})
    command = [sys.executable, "-c", PLACE.format(remove_stale), str(staging), str(dest)]
    return subprocess.run(command, env=env, capture_output=True, timeout=60).returncode


class Checkpoints:
    """A bf16 checkpoint (indexed, standard names) and its to-fp8 output, as (config, tensors)."""

    def __init__(self, source: Path, staging: Path):
        self.source, self.staging = source, staging
        self.old = self.read(source)
        self.new = self.read(staging)
        assert self.old[0] != self.new[0] and "quantization_config" in self.new[0]

    @staticmethod
    def read(directory: Path) -> tuple[dict, dict]:
        return json.loads((directory / "config.json").read_text()), read_output_bytes(directory)

    def state(self, dest: Path) -> str:
        """``old``, ``new`` or ``refused`` (no config.json: no engine loads it); fails on anything else.
        Whatever the state, an index present names only complete shards holding what it says."""
        if not (dest / "config.json").exists():
            if (dest / INDEX).exists():
                assert read_output_bytes(dest) in (self.old[1], self.new[1]), "an index naming a mix of shards"
            return "refused"
        assert (dest / INDEX).exists(), "a loadable config.json beside no index"
        seen = self.read(dest)  # every indexed shard complete and holding what the index says
        if seen == self.old:
            return "old"
        assert seen == self.new, "config.json and the weights the index names do not belong together"
        return "new"


@pytest.fixture(scope="module")
def bf16_and_fp8(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Checkpoints]:
    """Per scenario: a bf16 source in several standard shards and an FP8 staging output whose shard
    names differ from the source's (``renamed``) or are the same ones (``same_names``)."""
    root = tmp_path_factory.mktemp("place-crash")
    engine = write_sample_checkpoint(root / "engine")
    source = root / "bf16"
    repack(engine, source, max_shard_bytes=MIB)
    assert len(list(source.glob("model-*.safetensors"))) > 1
    renamed, same_names = root / "fp8-one-shard", root / "fp8-same-names"
    to_fp8(source, renamed, device="cpu", repack=True, max_shard_bytes=64 * MIB)
    to_fp8(source, same_names, device="cpu", repack=False)
    assert sorted(p.name for p in same_names.glob("*.safetensors")) == sorted(
        p.name for p in source.glob("*.safetensors")
    )
    return {"renamed": Checkpoints(source, renamed), "same_names": Checkpoints(source, same_names)}


@pytest.mark.parametrize(("scenario", "remove_stale"), [("renamed", True), ("same_names", False)])
def test_every_kill_point_leaves_a_consistent_destination(
    bf16_and_fp8: dict[str, Checkpoints], tmp_path: Path, scenario: str, remove_stale: bool
) -> None:
    pair = bf16_and_fp8[scenario]
    states = []
    for step in range(1, 40):
        dest = tmp_path / f"dest-{step}"
        shutil.copytree(pair.source, dest)
        status = place_killed_at(pair.staging, dest, step, remove_stale)
        if status == 0:
            break
        assert status == -signal.SIGKILL, f"step {step}: exit status {status}"
        states.append(pair.state(dest))
        had_leftovers = bool(leftovers(dest))
        result = place(pair.staging, dest, overwrite=True, remove_stale=remove_stale)
        assert pair.state(dest) == "new", f"placing again after a kill at step {step} finishes the job"
        assert leftovers(dest) == [], f"step {step}: placing again removes what the killed run left"
        assert bool(result.leftovers_removed) == had_leftovers
    else:
        pytest.fail("the placement never ran to its end")
    assert pair.state(dest) == "new"
    assert leftovers(dest) == []
    assert len(states) >= 5, "the kill points were reached"
    assert states[0] == "old" and states[-1] != "old", states
    # Once the destination leaves the old state it never returns to it: a crash never rolls back
    # half of a switch.
    first_change = next(i for i, s in enumerate(states) if s != "old")
    assert "old" not in states[first_change:], states
    if scenario == "same_names" or remove_stale:
        assert "refused" in states, "config.json is set aside while the switch needs more than one rename"


def test_a_later_placement_removes_only_leftovers_of_dead_runs(
    bf16_and_fp8: dict[str, Checkpoints], tmp_path: Path
) -> None:
    pair = bf16_and_fp8["renamed"]
    dest = tmp_path / "dest"
    shutil.copytree(pair.source, dest)
    # A run killed while copying its first shard (step 1 is that copy; 2 is the next one).
    assert place_killed_at(pair.staging, dest, 2, remove_stale=False) == -signal.SIGKILL
    dead = leftovers(dest)
    assert dead and all(".partial-place-" in name for name in dead)
    assert pair.state(dest) == "old"
    # A run that is still going (a live process holds the pid in its name) must keep its copy.
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as live:
        try:
            live_copy = dest / f".model-00001-of-00001.safetensors.partial-place-{live.pid}"
            live_copy.write_bytes(b"still being written")
            result = CliRunner().invoke(app, ["place", str(pair.staging), str(dest), "--yes"])
            assert result.exit_code == 0, result.output
            assert pair.state(dest) == "new"
            assert leftovers(dest) == [live_copy.name], "a live run's temporary copy is not touched"
            assert live_copy.read_bytes() == b"still being written"
            assert "Removed what an interrupted placement had left: " + ", ".join(dead) in result.stdout
        finally:
            live.kill()
