"""``python tests/cuda_guard.py ARGS`` runs ``python -m normalize_core ARGS`` with a recorder on every
``torch.cuda`` entry point that initializes or queries CUDA: each call appends the rank, the
function and the calling stack to the file named by ``$CUDA_CALLS``. (Torch's own C++ code reaches
CUDA through ``torch.cuda._lazy_init``, which is recorded too.) Used by test_distributed.py."""

import os
import runpy
import traceback

import torch

ENTRY_POINTS = ("_lazy_init", "init", "is_available", "device_count", "set_device", "current_device", "synchronize")


def recorded(name: str, original):
    def record(*args, **kwargs):
        with open(os.environ["CUDA_CALLS"], "a") as log:
            stack = "".join(traceback.format_stack(limit=10))
            log.write(f"rank {os.environ.get('RANK', '-')}: torch.cuda.{name}\n{stack}\n")
        return original(*args, **kwargs)

    return record


for name in ENTRY_POINTS:
    setattr(torch.cuda, name, recorded(name, getattr(torch.cuda, name)))
runpy.run_module("normalize_core", run_name="__main__", alter_sys=True)
