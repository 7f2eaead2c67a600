"""Every third-party package the tests and benches import is declared in pyproject's extras, so the
README's install command alone gives a machine everything the test suite needs (CI installs into a
fresh virtual environment; a package installed by hand must never be what makes it pass)."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: Import names that differ from their distribution names.
DISTRIBUTION_OF = {"yaml": "pyyaml"}


def imported_top_level_modules(paths: list[Path]) -> set[str]:
    modules: set[str] = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    return modules


def declared_distributions(*extras: str) -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in extras:
        requirements += project["optional-dependencies"][extra]
    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}


def third_party(modules: set[str], local: set[str]) -> set[str]:
    return {m for m in modules if m not in sys.stdlib_module_names and m not in local and m != "normalize_core"}


def test_test_and_bench_imports_are_in_the_test_extras() -> None:
    files = sorted((ROOT / "tests").rglob("*.py")) + sorted((ROOT / "benches").rglob("*.py"))
    local = {p.stem for p in files}
    needed = {DISTRIBUTION_OF.get(m, m) for m in third_party(imported_top_level_modules(files), local)}
    missing = needed - declared_distributions("test")
    assert not missing, f"imported by tests/benches but not in the test extras: {sorted(missing)}"


def test_library_imports_are_dependencies_or_lazy_extras() -> None:
    files = sorted((ROOT / "python" / "normalize_core").rglob("*.py"))
    needed = {DISTRIBUTION_OF.get(m, m) for m in third_party(imported_top_level_modules(files), set())}
    missing = needed - declared_distributions("gpu", "test")
    assert not missing, f"imported by the package but declared nowhere: {sorted(missing)}"
