"""The run record: what a run into an output directory is, written there before its first shard,
so that an interrupted run can be finished byte-identically (``--resume``) and any other run is
refused with the reason.

Files (hidden; gone once the index is written):

- ``.normalize-run.json``: the command, the tool's version, every option that changes bytes
  beyond the planned headers, each source file's size, modification time and header digest, and
  each planned shard's file name, size and header digest.
- ``.normalize-run.done/<shard file name>``: one marker per finished shard, written only after
  the shard was fsynced, renamed into place and its directory synced. One file per shard, so the
  ranks of a distributed run never write the same file.

Tensor data is not digested (it would mean reading terabytes): a source whose bytes changed
without its size, header or modification time changing is not noticed.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from normalize_core._core import (
    LEN_PREFIX,
    MAX_HEADER_LEN,
    Checkpoint,
    OutputPlan,
    ShardPlan,
    __version__,
    sha256_hex,
    sync_dir,
    write_atomically,
)
from normalize_core.errors import normalize_error
from normalize_core.processes import this_process

RECORD_FILE = ".normalize-run.json"
DONE_DIR = ".normalize-run.done"
#: Version of the record's own layout.
RECORD_FORMAT = 1


@dataclass(frozen=True)
class RunSpec:
    """What a writing command says about its run: its name, the checkpoints its plan reads (in
    the plan's order; the first one's non-tensor files are copied), and every option that changes
    the bytes written beyond what the planned shard headers already show (to-fp8's scale format,
    for instance). Option values must be JSON values."""

    command: str
    checkpoints: Sequence[Checkpoint]
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RunRecord:
    """A run's identity (everything but ``run_id`` and ``owner``) and who started it."""

    command: str
    version: str
    options: dict[str, Any]
    #: ``[{"dir": str, "files": [{"name", "size", "mtime_ns", "header_sha256"}]}]``.
    sources: list[dict[str, Any]]
    #: ``[{"file", "size", "header_sha256"}]``, in plan order.
    shards: list[dict[str, Any]]
    run_id: str
    #: ``{"pid", "host", "started"}`` of the process that started the run.
    owner: dict[str, Any]

    def identity(self) -> dict[str, Any]:
        """What two runs must share for one to finish the other."""
        return {
            "command": self.command,
            "version": self.version,
            "options": self.options,
            "sources": self.sources,
            "shards": self.shards,
        }

    @property
    def fingerprint(self) -> str:
        """A digest of the identity (what the ranks of a distributed run compare)."""
        canonical = json.dumps(self.identity(), sort_keys=True, separators=(",", ":"))
        return sha256_hex(canonical.encode())

    def to_json(self) -> bytes:
        body = {"record": RECORD_FORMAT, "run_id": self.run_id, "owner": self.owner, **self.identity()}
        return (json.dumps(body, indent=1) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes) -> RunRecord:
        """Raises ValueError on anything but a record of this format."""
        body = json.loads(data)
        if not isinstance(body, dict) or body.get("record") != RECORD_FORMAT:
            raise ValueError(f"not a run record of format {RECORD_FORMAT}")
        try:
            return cls(**{name: body[name] for name in cls.__dataclass_fields__})
        except KeyError as e:
            raise ValueError(f"the record has no {e.args[0]!r}") from None

    def difference(self, now: RunRecord) -> str | None:
        """What makes ``now`` another run than this (unfinished) one, in a few words; None when
        it is the same run."""
        if self.command != now.command:
            return f"the unfinished run is a {self.command}, this is a {now.command}"
        if self.version != now.version:
            return f"the unfinished run was written by normalize {self.version}, this is normalize {now.version}"
        for name in sorted(set(self.options) | set(now.options)):
            was, is_now = self.options.get(name), now.options.get(name)
            if was != is_now:
                return f"option {name} was {was!r} in the unfinished run, now {is_now!r}"
        return _sources_difference(self.sources, now.sources) or _shards_difference(self.shards, now.shards)


def _sources_difference(before: list[dict], now: list[dict]) -> str | None:
    if [s["dir"] for s in before] != [s["dir"] for s in now]:
        return f"its sources were {', '.join(s['dir'] for s in before)}, now {', '.join(s['dir'] for s in now)}"
    for was, is_now in zip(before, now, strict=True):
        files = {f["name"]: f for f in is_now["files"]}
        for old in was["files"]:
            path = Path(was["dir"]) / old["name"]
            new = files.pop(old["name"], None)
            if new is None:
                return f"source file {path} is no longer part of the checkpoint"
            if new["size"] != old["size"]:
                return f"source file {path} changed size ({old['size']} → {new['size']} bytes)"
            if new["header_sha256"] != old["header_sha256"]:
                return f"source file {path} has another header (tensors, dtypes or offsets changed)"
            if new["mtime_ns"] != old["mtime_ns"]:
                return f"source file {path} was modified after the unfinished run started"
        if files:
            return f"source file {Path(was['dir']) / next(iter(files))} is new"
    return None


def _shards_difference(before: list[dict], now: list[dict]) -> str | None:
    if len(before) != len(now):
        return (
            f"the unfinished run planned {len(before)} shards, this one {len(now)} "
            "(another --shard-size-gb or --max-shard-size?)"
        )
    for was, is_now in zip(before, now, strict=True):
        if was["file"] != is_now["file"]:
            return f"the unfinished run planned shard {was['file']} where this one plans {is_now['file']}"
        if was["size"] != is_now["size"]:
            return f"planned shard {was['file']} was {was['size']} bytes, now {is_now['size']}"
        if was["header_sha256"] != is_now["header_sha256"]:
            return f"planned shard {was['file']} has another header (other tensors, dtypes or order)"
    return None


def describe_run(spec: RunSpec, plan: OutputPlan, shards: Sequence[ShardPlan]) -> RunRecord:
    """The record of a run about to write ``plan`` (``shards`` is ``plan.shards``): reads every
    source file's header, and each whole-file shard's."""
    sources = [
        {
            "dir": str(checkpoint.dir.resolve()),
            "files": [{"name": name, **source_identity(checkpoint.dir / name)} for name in checkpoint.files],
        }
        for checkpoint in spec.checkpoints
    ]
    planned = [
        {"file": s.file_name, "size": s.file_len, "header_sha256": sha256_hex(plan.shard_header(i))}
        for i, s in enumerate(shards)
    ]
    return RunRecord(
        spec.command, __version__, dict(spec.options), sources, planned, os.urandom(8).hex(), this_process()
    )


def source_identity(path: Path) -> dict[str, Any]:
    """``{"size", "mtime_ns", "header_sha256"}`` of a safetensors file."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise normalize_error("io", f"{path}: not a regular file", file=str(path))
        return {"size": info.st_size, "mtime_ns": info.st_mtime_ns, "header_sha256": _header_digest(fd, info.st_size)}
    finally:
        os.close(fd)


def _header_digest(fd: int, size: int) -> str:
    """sha256 of the length prefix and header JSON (as far as the file holds them)."""
    prefix = os.pread(fd, LEN_PREFIX, 0)
    header_len = int.from_bytes(prefix, "little") if len(prefix) == LEN_PREFIX else 0
    length = min(header_len, MAX_HEADER_LEN, max(0, size - LEN_PREFIX))
    return sha256_hex(prefix + os.pread(fd, length, LEN_PREFIX))


def read_record(output: Path) -> RunRecord | None:
    """The record of an unfinished run in ``output``, or None. Raises ``NormalizeError`` (kind
    ``invalid_run_record``) for one that cannot be read, or is a symlink or no regular file."""
    path = output / RECORD_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise _unreadable(path, "a symbolic link" if e.errno == errno.ELOOP else e.strerror) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _unreadable(path, "not a regular file")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read()
    finally:
        os.close(fd)
    try:
        return RunRecord.from_json(data)
    except ValueError as e:
        raise _unreadable(path, str(e)) from None


def _unreadable(path: Path, reason: str):
    return normalize_error(
        "invalid_run_record",
        f"{path}: unreadable run record ({reason}); pass --overwrite to start over",
        file=str(path),
    )


def write_record(output: Path, record: RunRecord) -> None:
    """Writes the record (durably), after the marker directory: a record is never without it."""
    ensure_marker_dir(output)
    write_atomically(output / RECORD_FILE, record.to_json())
    sync_dir(output)


def ensure_marker_dir(output: Path) -> None:
    """Creates the marker directory unless it exists (a run killed while discarding its record
    can leave the record alone). Anything else under its name, a symlink above all, goes first:
    nothing is written through a link in the output."""
    markers = output / DONE_DIR
    if markers.is_symlink() or (markers.exists() and not markers.is_dir()):
        markers.unlink()
    markers.mkdir(exist_ok=True)


def discard_record(output: Path) -> None:
    """Removes the markers, then the record (so a crash in between still shows an unfinished run)."""
    remove_entry(output / DONE_DIR)
    (output / RECORD_FILE).unlink(missing_ok=True)
    sync_dir(output)


def remove_entry(path: Path) -> None:
    """Removes a file, a symlink (never what it points at) or a directory tree."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def mark_done(output: Path, record: RunRecord, shard: int) -> None:
    """Records shard ``shard`` as finished; call only once its final name is durable (the writers sync
    the directory after each rename), so a marker never outlives the rename it stands for. It is
    not fsynced: a marker lost or left empty by a crash reads as none (``verified_done``) and costs
    only that shard's rewrite, while a sync per shard costs a journal commit each."""
    marker = json.dumps(_marker(record, shard)).encode()
    write_atomically(output / DONE_DIR / record.shards[shard]["file"], marker, sync=False)


def unmark(output: Path, record: RunRecord, shard: int) -> None:
    (output / DONE_DIR / record.shards[shard]["file"]).unlink(missing_ok=True)


def verified_done(output: Path, record: RunRecord) -> list[int]:
    """The shards marked finished whose files still hold the planned size and header; markers
    of any other shard are removed (those shards are written again)."""
    done = []
    for shard, planned in enumerate(record.shards):
        try:
            marker = json.loads((output / DONE_DIR / planned["file"]).read_bytes())
        except (OSError, ValueError):
            marker = None
        if marker == _marker(record, shard) and _holds_planned_shard(output / planned["file"], planned):
            done.append(shard)
        elif marker is not None:
            unmark(output, record, shard)
    return done


def _marker(record: RunRecord, shard: int) -> dict[str, Any]:
    planned = record.shards[shard]
    return {"run_id": record.run_id, "size": planned["size"], "header_sha256": planned["header_sha256"]}


def _holds_planned_shard(path: Path, planned: dict[str, Any]) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        info = os.fstat(fd)
        return (
            stat.S_ISREG(info.st_mode)
            and info.st_size == planned["size"]
            and _header_digest(fd, info.st_size) == planned["header_sha256"]
        )
    finally:
        os.close(fd)
