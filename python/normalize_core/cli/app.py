"""The typer app, shared options and the one-line error convention of every command."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.text import Text

from normalize_core import __version__
from normalize_core._core import NormalizeError
from normalize_core.distributed import DISTRIBUTED_ENV
from normalize_core.progress import stderr
from normalize_core.sizes import gib_to_bytes, parse_size

app = typer.Typer(
    name="normalize",
    help="Turn a training engine's safetensors checkpoint into one that transformers, vLLM and "
    "SGLang load as-is: re-shard it, convert it to per-block FP8, merge checkpoints.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
#: Markup is off: messages carry user paths and tensor names; styles are applied with ``Text``.
stdout = Console(markup=False, highlight=False)

#: Exit status for user errors (bad input, refused output): one line on stderr, no traceback.
USER_ERROR = 2


def labelled(label: str, message: str, style: str) -> Text:
    """``label: message`` with the label styled and the message verbatim (paths and tensor names can
    hold brackets, so nothing the user named is ever read as markup)."""
    return Text.assemble((f"{label}:", style), " ", message)


def finding(severity: str, message: str) -> Text:
    """An ``error:`` or ``warning:`` line."""
    return labelled(severity, message, "bold red" if severity == "error" else "yellow")


def fail(message: str) -> typer.Exit:
    """Prints ``error: message`` on stderr as one line and returns the exit to raise."""
    stderr.print(finding("error", message), soft_wrap=True)
    return typer.Exit(USER_ERROR)


def failed(error: NormalizeError) -> typer.Exit:
    """``fail(str(error))``, except on a rank of a distributed run that stopped because another rank
    failed: it exits as quietly as it can, rank 0 prints why."""
    if error.kind == "peer_failed":
        return typer.Exit(USER_ERROR)
    return fail(str(error))


def print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """``warnings.showwarning`` for the command line: one ``warning:`` line."""
    stderr.print(finding("warning", str(message)), soft_wrap=True)


def shard_limit(shard_size_gb: float | None, max_shard_size: str | None) -> int:
    """Bytes per shard from ``--shard-size-gb`` (GiB) or ``--max-shard-size`` (``5GB``, ``4GiB``)."""
    if shard_size_gb is not None and max_shard_size is not None:
        raise typer.BadParameter("give --shard-size-gb or --max-shard-size, not both")
    try:
        if max_shard_size is not None:
            return parse_size(max_shard_size)
        return gib_to_bytes(4.0 if shard_size_gb is None else shard_size_gb)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None


SourceOpt = Annotated[Path, typer.Option("--source", "-s", help="Checkpoint directory to read (never written).")]
OutputOpt = Annotated[
    Path, typer.Option("--output", "-o", help="Directory to write (created; must be empty unless --overwrite).")
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
OverwriteOpt = Annotated[
    bool, typer.Option("--overwrite", help="Write into a non-empty output, replacing only files this tool writes.")
]
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
        stdout.print(f"normalize {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[
        bool, typer.Option("--version", callback=version_callback, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """Global options."""
