"""``python tests/rank_wrapper.py ARGS`` runs ``python -m normalize_core ARGS`` (as torchrun starts a
script) with instruments the environment asks for, for test_distributed.py:

- ``CUDA_CALLS=PATH``: a recorder on every ``torch.cuda`` entry point that initializes or queries
  CUDA; each call appends the rank, the function and the calling stack to PATH. (Torch's own C++
  code reaches CUDA through ``torch.cuda._lazy_init``, which is recorded too.)
- ``FILE_SIZE_LIMIT=RANK:BYTES``: on that rank, a write past BYTES into any file fails (EFBIG), as
  on a full disk.
"""

import os
import resource
import runpy
import signal
import traceback

CUDA_ENTRY_POINTS = (
    "_lazy_init",
    "init",
    "is_available",
    "device_count",
    "set_device",
    "current_device",
    "synchronize",
)


def recorded(name: str, original, log_path: str):
    def record(*args, **kwargs):
        with open(log_path, "a") as log:
            stack = "".join(traceback.format_stack(limit=10))
            log.write(f"rank {os.environ.get('RANK', '-')}: torch.cuda.{name}\n{stack}\n")
        return original(*args, **kwargs)

    return record


if "CUDA_CALLS" in os.environ:
    import torch

    for name in CUDA_ENTRY_POINTS:
        setattr(torch.cuda, name, recorded(name, getattr(torch.cuda, name), os.environ["CUDA_CALLS"]))
if "FILE_SIZE_LIMIT" in os.environ:
    rank, limit = os.environ["FILE_SIZE_LIMIT"].split(":")
    if os.environ.get("RANK") == rank:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (int(limit), int(limit)))
runpy.run_module("normalize_core", run_name="__main__", alter_sys=True)
