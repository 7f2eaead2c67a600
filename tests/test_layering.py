"""The library is not the user interface: nothing outside ``normalize_core.cli`` imports typer or
rich, ``import normalize_core`` imports almost nothing, and ``normalize --help`` needs neither rich
nor torch. (How fast that is, is measured by ``benches/startup.py``, not asserted here.)"""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path

import normalize_core
from normalize_core.cli.application import COMMAND_MODULES
from normalize_core.sample import write_sample_checkpoint

PACKAGE = Path(normalize_core.__file__).resolve().parent
#: The command line: the only place that may import typer and rich.
CLI = PACKAGE / "cli"
UI_PACKAGES = ("typer", "rich", "click")
#: Modules whose import needs torch (they work on torch tensors).
TORCH_MODULES = {"normalize_core.fp8.quantize"}


def modules_after(code: str) -> set[str]:
    """Top-level names of the modules a fresh interpreter holds after running ``code``."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return set(json.loads(result.stdout.splitlines()[-1]))


def library_modules() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.is_relative_to(CLI) or path.name == "__main__.py":
            continue
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def imported_names(path: Path) -> set[str]:
    """Every module an ``import`` statement in ``path`` names, at any depth (lazy imports too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_no_library_module_imports_typer_or_rich_anywhere() -> None:
    offenders = {
        path.relative_to(PACKAGE).as_posix(): sorted(n for n in imported_names(path) if n.split(".")[0] in UI_PACKAGES)
        for path in PACKAGE.rglob("*.py")
        if not path.is_relative_to(CLI)
    }
    assert {path: names for path, names in offenders.items() if names} == {}


def test_no_library_module_pulls_in_typer_or_rich() -> None:
    modules = [m for m in library_modules() if m not in TORCH_MODULES]
    assert "normalize_core.place" in modules and "normalize_core.merge" in modules
    loaded = modules_after("\n".join(f"import {m}" for m in modules))
    assert {m for m in loaded if m.split(".")[0] in UI_PACKAGES} == set()


def test_importing_the_package_imports_nearly_nothing() -> None:
    loaded = modules_after("import normalize_core")
    ours = {m for m in loaded if m.startswith("normalize_core")}
    assert ours == {"normalize_core"}, "every submodule, the extension too, is imported when first used"
    assert {m for m in loaded if m.split(".")[0] in (*UI_PACKAGES, "torch", "numpy")} == set()


def test_public_names_resolve_lazily_to_their_objects() -> None:
    for name in normalize_core.__all__:
        if name != "quantize_block_fp8":  # needs torch; resolved in the torch tests
            assert getattr(normalize_core, name) is not None, name
    importlib.import_module("normalize_core.diff")  # binds the submodule on the package
    assert callable(normalize_core.diff), "the function keeps its name next to its module"


def modules_after_command(*args: str) -> set[str]:
    """Modules loaded after ``normalize ARGS`` ran in a fresh interpreter, off a terminal."""
    return modules_after(
        f"from normalize_core.cli import app\ntry:\n    app({list(args)!r})\nexcept SystemExit:\n    pass"
    )


#: Library modules a command imports in its body when it runs: building the command line (``--help``, or
#: dispatching to another command) must not pay for them.
WRITE_MACHINERY = {
    "normalize_core.output",
    "normalize_core.repack",
    "normalize_core.merge",
    "normalize_core.distributed",
    "normalize_core.fp8.convert",
    "normalize_core.bf16.convert",
}


def test_help_needs_neither_rich_nor_torch() -> None:
    loaded = modules_after_command("--help")
    assert {m for m in loaded if m.split(".")[0] in ("rich", "torch", "numpy", "pydantic")} == set()
    assert loaded & WRITE_MACHINERY == set(), "command modules import the library inside their bodies"


def test_inspect_diff_verify_off_a_terminal_need_neither_rich_nor_torch(tmp_path: Path) -> None:
    """rich styles lines and draws progress bars on a terminal only; off one it is not imported."""
    sample = str(write_sample_checkpoint(tmp_path / "sample"))
    for args in (["inspect", sample], ["diff", sample, sample], ["verify", sample]):
        loaded = modules_after_command(*args)
        assert "normalize_core.diff" in loaded or "normalize_core.report" in loaded, "the command ran"
        assert {m for m in loaded if m.split(".")[0] in ("rich", "torch", "numpy")} == set(), args


def modules_after_main(*args: str) -> set[str]:
    """Modules loaded after the console script ran ``normalize ARGS`` in a fresh interpreter."""
    return modules_after(
        f"import sys\nsys.argv = ['normalize', *{list(args)!r}]\nfrom normalize_core.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass"
    )


COMMAND_MODULE_NAMES = {f"normalize_core.cli.{module}" for module in COMMAND_MODULES.values()}


def test_a_run_declares_only_the_command_it_names(tmp_path: Path) -> None:
    sample = str(write_sample_checkpoint(tmp_path / "sample"))
    for args, module in ((["inspect", sample], "checkpoint_commands"), (["diff", sample, sample], "merge_commands")):
        loaded = modules_after_main(*args)
        assert loaded & COMMAND_MODULE_NAMES == {f"normalize_core.cli.{module}"}, args
    for args in (["--help"], ["--help", "inspect"], []):
        assert modules_after_main(*args) >= COMMAND_MODULE_NAMES, f"{args}: the help lists every command"
    assert modules_after_main("inspekt") >= COMMAND_MODULE_NAMES, "a misspelt command gets a suggestion"


def test_every_command_is_in_the_registry_and_help_lists_them_in_its_order() -> None:
    from typer.main import get_command

    from normalize_core.cli import app

    group = get_command(app)
    assert sorted(group.commands) == sorted(COMMAND_MODULES), "a new command must be added to COMMAND_MODULES"
    assert group.list_commands(None) == list(COMMAND_MODULES)
    for name, module in COMMAND_MODULES.items():
        assert group.commands[name].callback.__module__ == f"normalize_core.cli.{module}", name
