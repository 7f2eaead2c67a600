"""Benchmark: ``normalize verify`` on a header-only stand-in of a real FP8 release.

Default: Qwen3-Next-80B-A3B-Instruct-FP8, 151,479 tensors (75,535 of them block scales) in their real names,
dtypes and shapes (from ``tests/fixtures/realdata``). The stand-in's data sections are holes, so every scale
reads as zero and verify reports each one; ``--scales ones`` first writes 1.0 into every scale tensor, as a
real release would hold valid scales, so that every value of every scale is checked. Times ``verify_checkpoint``
in this process and the ``normalize verify`` command in its own process (start-up included), and prints medians.

    python benches/verify.py                                  # Qwen3-Next, zero scales, 3 rounds
    python benches/verify.py --scales ones                    # every scale valid: every value checked
    python benches/verify.py --model qwen3_8b_fp8 --rounds 1  # a small one
"""

from __future__ import annotations

import argparse
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from normalize_core import Checkpoint  # noqa: E402
from normalize_core.report import verify_checkpoint  # noqa: E402
from standins import build_standin, load_standin  # noqa: E402

ONE = {"F32": struct.pack("<f", 1.0), "BF16": struct.pack("<f", 1.0)[2:]}


def fill_scales_with_ones(source: Path) -> int:
    """Writes 1.0 into every ``*_scale_inv`` tensor of the stand-in; returns the bytes written."""
    checkpoint = Checkpoint.open(source)
    written = 0
    descriptors: dict[str, int] = {}
    try:
        for tensor in checkpoint.tensors:
            if tensor.name.endswith("_scale_inv"):
                if tensor.file not in descriptors:
                    descriptors[tensor.file] = os.open(source / tensor.file, os.O_WRONLY)
                data = ONE[tensor.dtype] * (tensor.nbytes // len(ONE[tensor.dtype]))
                written += os.pwrite(descriptors[tensor.file], data, tensor.file_offset)
    finally:
        for fd in descriptors.values():
            os.close(fd)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--model", default="qwen3_next_80b_a3b_instruct_fp8", help="stand-in stem")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--scales", choices=("zeros", "ones"), default="zeros", help="what the scale tensors hold")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-verify-") as root:
        started = time.perf_counter()
        source = build_standin(args.model, Path(root) / args.model)
        filled = fill_scales_with_ones(source) if args.scales == "ones" else 0
        print(
            f"{load_standin(args.model)['model']}: {load_standin(args.model)['tensor_count']} tensors, "
            f"scales {args.scales} ({filled / 2**20:.1f} MiB written), "
            f"stand-in made in {time.perf_counter() - started:.1f} s"
        )
        api, cli = [], []
        for _ in range(args.rounds):
            started = time.perf_counter()
            report = verify_checkpoint(source)
            api.append(time.perf_counter() - started)
            started = time.perf_counter()
            subprocess.run(
                [sys.executable, "-m", "normalize_core", "verify", str(source), "--json"],
                capture_output=True,
                check=False,
            )
            cli.append(time.perf_counter() - started)
        errors = sum(severity == "error" for severity, _ in report.findings)
        print(f"verify: {'ok' if report.ok else 'FAILED'}, {errors} errors")
        for label, times in (("verify_checkpoint():", api), ("normalize verify:", cli)):
            runs = ", ".join(f"{t:.2f}" for t in times)
            print(f"{label:<20} median {statistics.median(times):.2f} s  (runs: {runs})")


if __name__ == "__main__":
    main()
