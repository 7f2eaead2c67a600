"""Where the work runs: how many shards are written at once, and the device that quantizes (``auto``,
``cpu``, ``cuda`` or ``cuda:N``).

One parser serves the command line (``--device``) and the Python API (``to_fp8(device=...)``), so
a value is accepted or refused the same way everywhere, before any work starts. Parsing needs no
torch; whether a GPU is actually there is checked when the quantizer is chosen.
"""

from __future__ import annotations

import os
import re

#: Shards written at the same time unless told otherwise (``--jobs``): writes to one file system gain
#: little past a few streams.
DEFAULT_JOBS = min(4, os.cpu_count() or 1)

#: The GPU when torch sees one, else the CPU.
AUTO = "auto"
#: The Rust kernel, without torch.
CPU = "cpu"
#: torch on a CUDA device (``cuda`` = the current one, ``cuda:N`` = device N).
CUDA = "cuda"

_CUDA_ORDINAL = re.compile(r"cuda:([0-9]+)")


def parse_device(text: str) -> str:
    """The canonical spelling of a device value (``cuda:01`` → ``cuda:1``). Raises ``ValueError``
    naming the allowed values for anything else (``tpu``, ``cuda:abc``, an empty string)."""
    if text in (AUTO, CPU, CUDA):
        return text
    ordinal = _CUDA_ORDINAL.fullmatch(text)
    if ordinal is None:
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N (N a GPU number), not {text!r}")
    return f"{CUDA}:{int(ordinal.group(1))}"


def cuda_ordinal(device: str) -> int | None:
    """N for a parsed ``cuda:N``; None for ``cuda`` (the current device) and the other values."""
    return int(device.split(":")[1]) if device.startswith(f"{CUDA}:") else None


def torch_device(device: str):
    """The ``torch.device`` for a parsed ``cuda`` or ``cuda:N`` (or ``cpu``, to run torch's arithmetic
    there). Imports torch. Raises ``ValueError`` when torch sees no CUDA device or fewer than N + 1."""
    import torch

    resolved = torch.device(device)
    if resolved.type == CUDA:
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if visible == 0:
            raise ValueError(f"device {device!r} requested but torch sees no CUDA device")
        ordinal = cuda_ordinal(device)
        if ordinal is not None and ordinal >= visible:
            raise ValueError(
                f"device {device!r} requested but torch sees only {visible} CUDA "
                f"device{'' if visible == 1 else 's'} (cuda:0 to cuda:{visible - 1})"
            )
    return resolved
