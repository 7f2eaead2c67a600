"""Benchmark: ``normalize check`` on a header-only stand-in of a real release.

Default: Qwen3-Next-80B-A3B-Instruct-FP8, 151,479 tensors in its real names, dtypes and shapes (from
``tests/fixtures/realdata``; data sections are holes, so the files take a few MB). Issue #8's target: under
3 s for 150k tensors. Times, for ``--rounds`` rounds, ``check()`` in this process and the
``normalize check`` command in its own process (start-up included), and prints medians.

    python benches/check.py                                  # Qwen3-Next, TP 1,2,4,8,16,32, 3 rounds
    python benches/check.py --model qwen3_8b_fp8 --rounds 1  # a small one
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from normalize_core import check  # noqa: E402
from standins import build_standin, load_standin  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--model", default="qwen3_next_80b_a3b_instruct_fp8", help="stand-in stem")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tp", default="1,2,4,8,16,32")
    args = parser.parse_args()
    tp = [int(t) for t in args.tp.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-check-") as root:
        started = time.perf_counter()
        source = build_standin(args.model, Path(root) / args.model)
        print(
            f"{load_standin(args.model)['model']}: {load_standin(args.model)['tensor_count']} tensors, "
            f"stand-in written in {time.perf_counter() - started:.1f} s"
        )
        api, cli = [], []
        for _ in range(args.rounds):
            started = time.perf_counter()
            report = check(source, tp=tp)
            api.append(time.perf_counter() - started)
            started = time.perf_counter()
            subprocess.run(
                [sys.executable, "-m", "normalize_core", "check", str(source), "--tp", args.tp, "--json"],
                capture_output=True,
                check=False,
            )
            cli.append(time.perf_counter() - started)
        print(f"loads at TP {report.loads_at()} of {tp}")
        print(f"check():          median {statistics.median(api):.2f} s  (runs: {', '.join(f'{t:.2f}' for t in api)})")
        print(f"normalize check:  median {statistics.median(cli):.2f} s  (runs: {', '.join(f'{t:.2f}' for t in cli)})")


if __name__ == "__main__":
    main()
