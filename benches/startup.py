"""Benchmark: how long ``normalize`` takes to start, and merge against ``cp`` + ``sync``.

Start-up: wall time (fastest and median of ``--runs`` runs) of a bare ``python -c pass``,
``import normalize_core``, ``normalize --help``, ``normalize inspect`` and ``normalize diff`` (the
``normalize`` console script, as users run it) on the built-in sample checkpoint (2.75 MiB, so the
figures are start-up, not work), each against the 0.15 s target; then the largest imports of
``inspect`` as ``python -X importtime`` sees them.

Merge: a base of ``--merge-gb`` GiB and an extra adding a few tensors (``benches/merge.py``
builds them), ``normalize merge --yes`` against ``cp -r`` of the same bytes followed by ``sync``
(the merge fsyncs every shard), medians of ``--rounds`` rounds (a 0.2 s run varies by a tenth
from one run to the next), warm page cache.

The package's bytecode is compiled first, as ``pip install`` does for an installed package: an
editable install under ``PYTHONDONTWRITEBYTECODE=1`` would otherwise compile every module of
``normalize_core`` again on each run, a cost no installed copy pays.

    python benches/startup.py                 # 15 runs each, 0.25 GiB merge, 9 rounds
    python benches/startup.py --quick         # 5 runs each, 0.05 GiB merge, 1 round
"""

from __future__ import annotations

import argparse
import compileall
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from merge import GIB, NORMALIZE, build, fresh, timed

import normalize_core
from normalize_core.sample import write_sample_checkpoint

#: What ``--help``, ``inspect`` and ``diff`` should start in.
TARGET_SECONDS = 0.15
#: The merge may take this many times as long as ``cp`` + ``sync`` of the same bytes.
MERGE_TARGET_RATIO = 1.2


def wall_times(command: list[str], runs: int) -> list[float]:
    """Seconds each of ``runs`` runs of ``command`` takes (it must exit 0 or 1: inspect of the
    engine-named sample reports a problem, which is what it is for)."""
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        status = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
        times.append(time.perf_counter() - started)
        if status not in (0, 1):
            raise SystemExit(f"{' '.join(command)} exited {status}")
    return times


def largest_imports(command: list[str], count: int) -> list[tuple[float, str]]:
    """The ``count`` top-level imports of ``command`` that take longest, cumulative, in seconds."""
    result = subprocess.run([sys.executable, "-X", "importtime", *command], capture_output=True, text=True)
    rows = []
    for line in result.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = line.split("|")
        if not name.startswith("  ") and cumulative.strip().isdigit():  # a top-level import
            rows.append((int(cumulative) / 1e6, name.strip()))
    return sorted(rows, reverse=True)[:count]


def startup(workdir: Path, runs: int) -> None:
    sample = write_sample_checkpoint(workdir / "sample")
    other = write_sample_checkpoint(workdir / "other", seed=1)
    commands = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "import normalize_core": [sys.executable, "-c", "import normalize_core"],
        "normalize --help": [*NORMALIZE, "--help"],
        "normalize inspect": [*NORMALIZE, "inspect", str(sample)],
        "normalize diff": [*NORMALIZE, "diff", str(sample), str(other)],
    }
    print(f"start-up, {runs} runs each (fastest / median, wall):")
    for label, command in commands.items():
        times = wall_times(command, runs)
        fastest, median = min(times), statistics.median(times)
        verdict = f"{median / TARGET_SECONDS:5.2f}x the {TARGET_SECONDS} s target" if label.startswith("norm") else ""
        print(f"  {label:22s} {fastest:6.3f} s / {median:6.3f} s  {verdict}")
    print("largest imports of `normalize inspect` (cumulative, one run):")
    for seconds, name in largest_imports(["-m", "normalize_core", "inspect", str(sample)], 6):
        print(f"  {seconds:6.3f} s  {name}")


def merge_against_cp(workdir: Path, merge_gb: float, rounds: int) -> None:
    tensors = max(64, int(merge_gb * 2000))
    base, extra, extra_only_file = build(workdir, merge_gb, tensors, 50, shard_gb=max(merge_gb / 4, 0.01))
    written = sum(f.stat().st_size for f in base.iterdir()) + (extra / extra_only_file).stat().st_size
    out = workdir / "out"
    merge = [*NORMALIZE, "merge", "--base", str(base), "--extra", str(extra)]
    merge += ["--out", str(out), "--yes", "-q"]
    cp = f"cp -r {base} {out} && cp {extra / extra_only_file} {out}/ && sync"
    cp_runs, merge_runs = [], []
    for _ in range(rounds):
        fresh(out)
        cp_runs.append(timed(["sh", "-c", cp]))
        fresh(out)
        merge_runs.append(timed(merge))
    cp_median, merge_median = statistics.median(cp_runs), statistics.median(merge_runs)
    print(f"merge of {written / GIB:.2f} GiB ({tensors} base tensors), medians of {rounds} rounds:")
    print(f"  cp + sync  {cp_median:6.3f} s")
    ratio = merge_median / cp_median
    print(f"  merge      {merge_median:6.3f} s  {ratio:5.2f}x cp + sync (target ≤ {MERGE_TARGET_RATIO}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=None, help="runs per start-up figure (default 15; --quick 5)")
    parser.add_argument("--merge-gb", type=float, default=None, help="merge base size in GiB (default 0.25)")
    parser.add_argument("--rounds", type=int, default=None, help="merge rounds (default 9; --quick 1)")
    parser.add_argument("--quick", action="store_true", help="small and few: checks the script runs")
    parser.add_argument("--workdir", type=Path, default=None, help="where to build (default: a temp dir in /tmp)")
    args = parser.parse_args()
    runs = args.runs or (5 if args.quick else 15)
    merge_gb = args.merge_gb or (0.05 if args.quick else 0.25)
    rounds = args.rounds or (1 if args.quick else 9)

    compileall.compile_dir(Path(normalize_core.__file__).parent, quiet=1)
    workdir = Path(tempfile.mkdtemp(prefix="startup-bench-", dir=args.workdir))
    try:
        startup(workdir, runs)
        merge_against_cp(workdir, merge_gb, rounds)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
