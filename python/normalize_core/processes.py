"""This process as the files it leaves name it, and whether the process such a file names still runs.

An output's lock file and run record, and a placement's temporary copies, name the process that
wrote them, so that another run can tell a live owner (refuse, or leave its files alone) from a
killed one (take over, or clean up after it).
"""

from __future__ import annotations

import os
import time
from typing import Any


def this_process() -> dict[str, Any]:
    """``{"pid", "host", "started"}`` of this process, ``started`` being now."""
    return {"pid": os.getpid(), "host": os.uname().nodename, "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}


def process_runs(pid: int) -> bool:
    """Whether a process with this id runs on this machine (this one counts; so does another
    user's, which may not be signalled)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
