"""The typer app, the options commands share, and the exit-status convention of every command.

Exit status, for every command:

- 0: done; for the checking commands (``verify``, ``inspect``, ``check``), every check holds;
- 1: checked and found problems (an ``error:`` finding of ``verify``, ``inspect`` or ``check``);
- 2: usage or input error: a bad option, a path that cannot be read or written, a checkpoint
  another command cannot use, a refused output. One ``error: ...`` line on stderr, never a
  traceback (tracebacks are for bugs).

Command modules import only what declaring their options needs; the library and rich are
imported inside the command bodies, so ``normalize --help`` starts fast. They do not use
``from __future__ import annotations``: typer would evaluate every annotation string again when
it builds the command line, half of that build's time.
"""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from normalize_core.cli.console import print_finding, say

#: Every command, in the order ``normalize --help`` lists them, and the module that declares it.
COMMAND_MODULES = {
    "repack": "checkpoint_commands",
    "to-fp8": "fp8_command",
    "to-bf16": "bf16_command",
    "merge": "merge_commands",
    "check": "check_command",
    "diff": "merge_commands",
    "place": "merge_commands",
    "inspect": "checkpoint_commands",
    "verify": "checkpoint_commands",
    "demo": "checkpoint_commands",
}

#: Exit status: done, every check holds.
OK = 0
#: Exit status: checked and found problems.
PROBLEMS_FOUND = 1
#: Exit status: usage or input error (one line on stderr).
USER_ERROR = 2

#: click's exception types as typer ships them (vendored inside typer in recent releases, the
#: click package in older ones): usage errors are caught here rather than printed in a box.
_click_exceptions = importlib.import_module(typer.BadParameter.__module__)


def print_error(message: str) -> None:
    """``error: message`` on stderr, as one line whatever the message holds (line breaks become
    spaces; everything else, such as a path's own spacing, stays verbatim)."""
    print_finding("error", re.sub(r"\s*\n\s*", " ", message.strip()), err=True)


def fail(message: str) -> typer.Exit:
    """Prints ``error: message`` on stderr as one line and returns the exit to raise."""
    print_error(message)
    return typer.Exit(USER_ERROR)


def failed(error: Exception) -> typer.Exit:
    """``fail(str(error))``, except on a rank of a distributed run that stopped because another rank
    failed: it exits as quietly as it can, rank 0 prints why."""
    if getattr(error, "kind", None) == "peer_failed":
        return typer.Exit(USER_ERROR)
    return fail(str(error))


def print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """``warnings.showwarning`` for the command line: one ``warning:`` line on stderr."""
    print_finding("warning", str(message), err=True)


class NormalizeGroup(TyperGroup):
    """The ``normalize`` command group: runs a command and turns every way it can end into an
    exit status and, for errors, one ``error:`` line (see the module docstring)."""

    def list_commands(self, ctx) -> list[str]:
        return sorted(super().list_commands(ctx), key=list(COMMAND_MODULES).index)

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra: Any):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            status = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _click_exceptions.UsageError as e:
            command = e.ctx.command_path if e.ctx is not None else "normalize"
            print_error(f"{e.format_message().rstrip('.')} (see: {command} --help)")
            status = USER_ERROR
        except typer.Abort:  # typer's own class: its vendored click has none in ``exceptions``
            print_error("aborted: no answer to the question")
            status = USER_ERROR
        except Exception as e:
            from normalize_core._core import NormalizeError

            if not isinstance(e, NormalizeError | OSError):
                raise
            print_error(describe_error(e))
            status = USER_ERROR
        sys.exit(status or OK)


def describe_error(error: BaseException) -> str:
    """An error as one line: ``file: what went wrong`` for file-system errors."""
    if isinstance(error, OSError) and error.strerror:
        return f"{error.filename}: {error.strerror}" if error.filename else error.strerror
    return str(error)


app = typer.Typer(
    name="normalize",
    cls=NormalizeGroup,
    help="Turn a training engine's safetensors checkpoint into one that transformers, vLLM and "
    "SGLang load as-is: re-shard it, convert it to per-block FP8, merge checkpoints.\n\n"
    "Exit status: 0 done (all checks hold); 1 checked and found problems (verify, inspect, check); "
    "2 usage or input error (one 'error:' line on stderr).",
    invoke_without_command=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain help: flags without a value placeholder, and no rich import for --help.
    rich_markup_mode=None,
)


def shard_limit(shard_size_gb: float | None, max_shard_size: str | None) -> int:
    """Bytes per shard from ``--shard-size-gb`` (GiB) or ``--max-shard-size`` (``5GB``, ``4GiB``)."""
    from normalize_core.sizes import gib_to_bytes, parse_size

    if shard_size_gb is not None and max_shard_size is not None:
        raise typer.BadParameter("give --shard-size-gb or --max-shard-size, not both")
    try:
        if max_shard_size is not None:
            return parse_size(max_shard_size)
        return gib_to_bytes(4.0 if shard_size_gb is None else shard_size_gb)
    except ValueError as e:
        hint = "--max-shard-size" if max_shard_size is not None else "--shard-size-gb"
        raise typer.BadParameter(str(e), param_hint=hint) from None


def check_write_mode(overwrite: bool, resume: bool) -> None:
    """``--overwrite`` and ``--resume`` exclude each other."""
    if overwrite and resume:
        raise typer.BadParameter("give --overwrite or --resume, not both")


def repack_choice(repack: bool, no_repack: bool) -> bool | None:
    """``--repack`` / ``--no-repack`` as the conversions' ``repack``: True, False, or None when
    neither is given (the source's layout decides)."""
    if no_repack and repack:
        raise typer.BadParameter("give --repack or --no-repack, not both")
    return True if repack else (False if no_repack else None)


def check_dry_run_options(output: Path | None, dry_run: bool, as_json: bool) -> None:
    """A conversion needs ``--output`` unless it is a ``--dry-run``, and ``--json`` only goes with one."""
    if output is None and not dry_run:
        raise typer.BadParameter("--output is required unless --dry-run")
    if as_json and not dry_run:
        raise typer.BadParameter("--json goes with --dry-run")


def checked_device(value: str) -> str:
    """``--device``: checked by the library's parser (the one ``to_fp8`` uses) before any work."""
    from normalize_core.devices import parse_device

    try:
        return parse_device(value)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None


SourceOpt = Annotated[Path, typer.Option("--source", "-s", help="Checkpoint directory to read (never written).")]
OutputOpt = Annotated[
    Path, typer.Option("--output", "-o", help="Directory to write (created; must be empty unless --overwrite).")
]
#: ``--output`` of the conversions, which a ``--dry-run`` does not need.
OptionalOutputOpt = Annotated[
    Path | None,
    typer.Option("--output", "-o", help="Directory to write (created; must be empty unless --overwrite)."),
]
NoRepackOpt = Annotated[
    bool, typer.Option("--no-repack", help="Keep the source's shard files even when their names are not standard.")
]
RepackOpt = Annotated[
    bool, typer.Option("--repack", help="Bin-pack into model-{i:05d}-of-{n:05d} shards even for standard sources.")
]
ShardGbOpt = Annotated[
    float | None,
    typer.Option("--shard-size-gb", help="Largest shard in GiB (default 4; fractions allowed: 0.25 = 256 MiB)."),
]
MaxShardOpt = Annotated[
    str | None,
    typer.Option("--max-shard-size", help="Largest shard as a size string: 5GB (decimal, like HF) or 4GiB."),
]
JobsOpt = Annotated[int, typer.Option("--jobs", "-j", min=1, help="Shards written at the same time.")]
#: ``--jobs`` of the conversions, whose jobs compute on the CPU (one by default: the kernel already
#: spreads one tensor over every core).
ConversionJobsOpt = Annotated[
    int,
    typer.Option("--jobs", "-j", min=1, help="Shards converted at the same time on the CPU (they share the cores)."),
]
OverwriteOpt = Annotated[
    bool, typer.Option("--overwrite", help="Write into a non-empty output, replacing only files this tool writes.")
]
#: Set to 1 to run as one rank of a distributed run, as ``--distributed`` does; ``python -m
#: normalize_core`` sets it when torchrun started it.
DISTRIBUTED_ENV = "NORMALIZE_DISTRIBUTED"
ResumeOpt = Annotated[
    bool,
    typer.Option(
        "--resume",
        help="Finish an interrupted run into the output: its finished shards are checked against the plan and "
        "kept, the rest written. Refused when the command, an option or a source changed. A new or empty output "
        "starts fresh; a run with --resume that fails keeps what it finished for the next --resume.",
    ),
]
DistributedOpt = Annotated[
    bool,
    typer.Option(
        "--distributed",
        envvar=DISTRIBUTED_ENV,
        help="Run as one rank of a distributed run: every rank plans, the shards are split between ranks by bytes, "
        "rank 0 writes the index. Reads RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK as torchrun sets "
        "them (python -m normalize_core under torchrun turns this on by itself). Never asks: --place only.",
    ),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]
DeviceOpt = Annotated[
    str,
    typer.Option(
        "--device",
        metavar="auto|cpu|cuda[:N]",
        callback=checked_device,
        help="Where to compute: auto (a GPU when torch sees one), cpu (no torch needed), cuda or cuda:N.",
    ),
]
PlaceOpt = Annotated[
    str | None,
    typer.Option(
        "--place",
        metavar="keep|source|DIR",
        help="Where the written weights go afterwards: 'keep' (stay at --output), 'source' (copied into "
        "--source, replacing its weights) or a directory to copy them to (./keep for a folder named keep). "
        "Copies, never moves; --output stays intact. Default: ask on a terminal, keep otherwise.",
    ),
]
YesOpt = Annotated[
    bool,
    typer.Option("--yes", "-y", help="Confirm without asking, e.g. overwriting the files placing would replace."),
]


def version_callback(value: bool) -> None:
    if value:
        from normalize_core._core import __version__

        say(f"normalize {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    ctx: typer.Context,
    version: Annotated[
        bool, typer.Option("--version", callback=version_callback, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """Global options."""
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help(), err=True)
        raise typer.Exit(USER_ERROR)
