"""One writer per output directory: an exclusive, non-blocking ``flock`` on ``.normalize-lock``
inside it.

A second run into the same directory fails at once, naming the first run's pid and host (written
into the lock file). The kernel releases the lock when its holder dies, kill -9 included, so a
leftover lock file never blocks the next run. The file is removed when the run ends, while the
lock is still held; a run that opened it just before then finds, once it holds the lock, that the
path now names another file (or none) and starts over, so two runs never both believe they hold it.

Where the file system has no working ``flock`` (some NFS or Lustre mounts), the run goes on
unlocked after an ``OutputLockWarning``: nothing then keeps a second run out.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import stat
import time
import warnings
from pathlib import Path

from normalize_core.errors import normalize_error
from normalize_core.processes import process_runs, this_process

LOCK_FILE = ".normalize-lock"
#: ``flock`` errors that mean "not supported here", not "held by someone else".
UNSUPPORTED = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.EBADF})
#: Attempts when the lock file keeps being replaced under us (a finishing run removes it).
ATTEMPTS = 20
#: Reads of the holder's entry (5 ms apart) before giving up on naming it.
HOLDER_READS = 40


class OutputLockWarning(UserWarning):
    """The output directory could not be locked; the run goes on without exclusion."""


class OutputLock:
    """The held lock of one output directory (see the module docstring)."""

    def __init__(self, path: Path, fd: int, held: bool):
        self.path = path
        self.fd = fd
        #: False when the file system refused ``flock`` and the run goes on unlocked.
        self.held = held

    @classmethod
    def acquire(cls, directory: Path, command: str) -> OutputLock:
        """Locks ``directory`` (which must exist) for a run of ``command``. Raises
        ``NormalizeError`` (kind ``output_locked``) at once when another run holds it."""
        path = directory / LOCK_FILE
        for _ in range(ATTEMPTS):
            fd = _open_lock_file(path)
            try:
                held = _try_flock(fd, directory)
                if _still_names(path, fd):
                    # Written over the old entry, then cut to length: never empty to a reader.
                    entry = _owner(command).encode()
                    os.pwrite(fd, entry, 0)
                    os.ftruncate(fd, len(entry))
                    return cls(path, fd, held)
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        raise normalize_error(
            "output_locked", f"{directory}: its lock file keeps being replaced; is another run starting and stopping?"
        )

    def release(self) -> None:
        """Removes the lock file (still holding the lock) and releases the lock."""
        if self.fd < 0:
            return
        if _still_names(self.path, self.fd):
            self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = -1


def _open_lock_file(path: Path) -> int:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as e:
        reason = "is a symbolic link; nothing is written through one" if e.errno == errno.ELOOP else e.strerror
        raise normalize_error("io", f"{path}: {reason}", file=str(path)) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise normalize_error("io", f"{path}: not a regular file", file=str(path))
    return fd


def _try_flock(fd: int, directory: Path) -> bool:
    """True once locked; False (after a warning) where the file system cannot lock."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        raise normalize_error(
            "output_locked",
            f"{directory}: another run is writing into it ({_holder(fd)}); wait for it to end or stop it",
            file=str(directory),
        ) from None
    except OSError as e:
        if e.errno not in UNSUPPORTED:
            raise normalize_error("io", f"{directory / LOCK_FILE}: {e.strerror}", file=str(directory)) from None
        warnings.warn(
            f"{directory}: cannot lock it ({e.strerror}; the file system has no working flock): nothing keeps "
            "another run from writing into it at the same time; start only one",
            OutputLockWarning,
            stacklevel=4,
        )
        return False


def _still_names(path: Path, fd: int) -> bool:
    """Whether ``path`` is still the file open as ``fd`` (a finishing run may have removed it)."""
    try:
        now = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (now.st_dev, now.st_ino) == (opened.st_dev, opened.st_ino)


def _owner(command: str) -> str:
    return json.dumps(this_process() | {"command": command})


def _holder(fd: int) -> str:
    """``normalize repack, pid 1234 on host, since ...`` from the lock file. The holder writes it
    just after locking, over what an earlier (killed) holder left: a reader waits a moment for an
    entry that names a live process (on another host it cannot tell, and believes it)."""
    for _ in range(HOLDER_READS):
        try:
            owner = json.loads(os.pread(fd, 4096, 0))
            described = f"normalize {owner['command']}, pid {owner['pid']} on {owner['host']}, since {owner['started']}"
            if owner["host"] != os.uname().nodename or process_runs(int(owner["pid"])):
                return described
        except (OSError, ValueError, KeyError, TypeError):
            pass
        time.sleep(0.005)
    return "its pid is not known yet"
