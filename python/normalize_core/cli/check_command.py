"""``check``: the TP sizes at which vLLM or SGLang load a checkpoint, and why the others fail. No torch."""

import json
from pathlib import Path
from typing import Annotated

import typer

from normalize_core.cli.application import PROBLEMS_FOUND, app, fail
from normalize_core.cli.console import print_finding, say, write_line
from normalize_core.words import plural


def parse_tp_sizes(values: list[str] | None, default: tuple[int, ...]) -> tuple[int, ...]:
    """``--tp 1,2 --tp 8`` → ``(1, 2, 8)``; ``typer.Exit`` after one error line for anything else."""
    if not values:
        return default
    sizes = []
    for value in values:
        for part in value.split(","):
            part = part.strip()
            if not part.isdigit() or int(part) < 1:
                raise fail(f"--tp {value!r}: TP sizes are positive integers, e.g. --tp 1,2,4,8")
            sizes.append(int(part))
    return tuple(dict.fromkeys(sizes))


def print_layer_reasons(reasons: dict[str, str], indent: str = "  ") -> None:
    """``{layer: why}`` as one line per name pattern and reason (``model.layers.N.mlp.experts (94 layers)``)."""
    from normalize_core.fp8.rules import name_pattern

    patterns: dict[tuple[str, str], list[str]] = {}
    for layer, why in reasons.items():
        patterns.setdefault((name_pattern(layer), why), []).append(layer)
    for (pattern, why), layers in patterns.items():
        label = layers[0] if len(layers) == 1 else f"{pattern} ({len(layers)} layers)"
        say(f"{indent}{label}: {why}")


def _summary(report) -> str:
    loads = [str(v.tp) for v in report.verdicts if v.loads]
    fails = [str(v.tp) for v in report.verdicts if not v.loads]
    parts = []
    if loads:
        parts.append(f"loads at TP {', '.join(loads)}")
    if fails:
        parts.append(f"fails at TP {', '.join(fails)}")
    errors = sum(1 for severity, _ in report.findings if severity == "error")
    if errors:
        parts.append(f"{plural(errors, 'format error')} fail every TP size")
    return "; ".join(parts)


@app.command("check", short_help="Predict whether vLLM or SGLang load it at each TP size.")
def check_command(
    directory: Annotated[Path, typer.Argument(help="Checkpoint directory (block-FP8, or unquantized).")],
    tp: Annotated[
        list[str] | None,
        typer.Option(
            "--tp", metavar="N[,N...]", help="TP sizes to check (repeatable or a comma list; default 1,2,4,8)."
        ),
    ] = None,
    ep: Annotated[
        bool, typer.Option("--ep", help="Expert parallelism: MoE experts spread over the ranks, not split.")
    ] = False,
    engine: Annotated[
        str, typer.Option("--engine", metavar="vllm|sglang", help="Engine whose loader to model.")
    ] = "vllm",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Predict whether vLLM or SGLang loads a checkpoint at each tensor-parallel size, from headers only.

    Every linear layer is classified as the engine builds it (merged q/k/v and gate/up, column-, row-
    parallel, replicated, fused MoE) and checked against the engine's load-time rules: FP8 block sizes
    per partition (validate_fp8_block_shape, the fused-MoE intermediate size), even splits of heads.
    Format checks: every FP8 weight has a <name>_scale_inv of ceil(N/128) x ceil(K/128), no orphan
    scales, weight_block_size present, modules_to_not_convert naming real, unquantized modules, fused
    groups of one precision, MTP layers as config.json declares, no stale quantization_config.
    An unquantized checkpoint is checked as `normalize to-fp8` would write it.

    Exit status: 0 when every requested TP size loads, 1 when one does not (or a format check fails),
    2 for a checkpoint that cannot be read or bad options.
    """
    from normalize_core._core import NormalizeError
    from normalize_core.check import DEFAULT_TP, check

    sizes = parse_tp_sizes(tp, DEFAULT_TP)
    if engine not in ("vllm", "sglang"):
        raise fail(f"--engine {engine!r}: give vllm or sglang")
    try:
        report = check(directory, tp=sizes, engine=engine, expert_parallel=ep)
    except (NormalizeError, ValueError) as e:
        raise fail(str(e)) from None
    if as_json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print_check_report(report)
    if not report.ok:
        raise typer.Exit(PROBLEMS_FOUND)


def print_check_report(report) -> None:
    """A ``CheckReport`` for humans: a verdict per TP size with its failures, the format findings,
    the layers to-fp8 would keep, how it was checked, and the outcome."""
    engine_label = "SGLang" if report.engine == "sglang" else "vLLM"
    what = "block FP8" if report.checked == "fp8" else "unquantized, as to-fp8 would write it"
    family = report.family or "not modeled"
    parallel = f"{engine_label} with EP" if report.expert_parallel else engine_label
    write_line((str(report.path), "bold"), f"  ({report.architecture}: {family}; {what}; {parallel})")
    for verdict in report.verdicts:
        if verdict.loads:
            write_line((f"TP {verdict.tp}:", "green"), " loads")
            continue
        write_line((f"TP {verdict.tp}:", "bold red"), " fails")
        for failure in verdict.failures:
            say(f"  {failure.line()}")
    for severity, message in report.findings:
        print_finding(severity, message)
    if report.kept_to_load:
        say("to-fp8 keeps these layers unquantized so the output loads at TP 1:")
        print_layer_reasons(report.kept_to_load)
    for note in report.notes:
        write_line(("note:", "dim"), f" {note}")
    write_line(("OK", "green") if report.ok else ("FAILED", "red"), f" {_summary(report)}")
