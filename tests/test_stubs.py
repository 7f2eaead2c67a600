"""``_core.pyi`` matches the compiled module ``normalize_core._core``.

The stub is parsed with ``ast`` and compared with what the module exposes: every public name,
its kind (class, function, constant), every class member (method or attribute), and every
function's and method's parameters (names, order, which have defaults, and literal defaults) as
the binding's ``__text_signature__`` gives them. A failure lists each difference on its own line,
so stubs can be brought up to date after a merge in one pass.
"""

from __future__ import annotations

import ast
import inspect
import sys
from pathlib import Path
from typing import Any

import normalize_core._core as core

STUB = Path(core.__file__).with_name("_core.pyi")

#: Dunder methods that are part of a class's interface (``__repr__`` and friends are not).
PROTOCOL_DUNDERS = {
    "__init__",
    "__len__",
    "__contains__",
    "__iter__",
    "__next__",
    "__getitem__",
    "__call__",
    "__buffer__",
}

#: Before Python 3.12 the buffer protocol is a C slot only, with no ``__buffer__`` to see.
HIDDEN_DUNDERS = {"__buffer__"} if sys.version_info < (3, 12) else set()

#: A default the signature does not spell out (PyO3 writes ``...`` for non-literal defaults).
UNKNOWN = "<unknown>"

Param = tuple[str, bool, Any]
"""``(name, has a default, the default if it is a literal else UNKNOWN)``."""


def stub_params(function: ast.FunctionDef) -> list[Param]:
    """The parameters of a stub function, ``self`` left out."""
    arguments = function.args
    positional = arguments.posonlyargs + arguments.args
    defaults: list[ast.expr | None] = [None] * (len(positional) - len(arguments.defaults)) + list(arguments.defaults)
    pairs = list(zip(positional, defaults, strict=True)) + list(
        zip(arguments.kwonlyargs, arguments.kw_defaults, strict=True)
    )
    params = []
    for argument, default in pairs:
        if argument.arg == "self":
            continue
        if default is None:
            params.append((argument.arg, False, None))
        elif isinstance(default, ast.Constant) and default.value is not Ellipsis:
            params.append((argument.arg, True, default.value))
        else:
            params.append((argument.arg, True, UNKNOWN))
    return params


def runtime_params(obj: Any) -> list[Param] | None:
    """The parameters of a builtin function or method from its text signature (None without one)."""
    try:
        signature = inspect.signature(obj)
    except (ValueError, TypeError):
        return None
    params = []
    for name, parameter in signature.parameters.items():
        if name == "self":
            continue
        if parameter.default is inspect.Parameter.empty:
            params.append((name, False, None))
        elif parameter.default is Ellipsis:
            params.append((name, True, UNKNOWN))
        else:
            params.append((name, True, parameter.default))
    return params


def describe(params: list[Param] | None) -> str:
    if params is None:
        return "(?)"
    shown = [
        name if not has_default else f"{name}={'...' if d is UNKNOWN else repr(d)}" for name, has_default, d in params
    ]
    return "(" + ", ".join(shown) + ")"


def params_differ(stub: list[Param], runtime: list[Param]) -> bool:
    """Names, order or default presence differ, or both spell a literal default and disagree."""
    if [(n, has) for n, has, _ in stub] != [(n, has) for n, has, _ in runtime]:
        return True
    return any(s != r and UNKNOWN not in (s, r) for (_, _, s), (_, _, r) in zip(stub, runtime, strict=True))


class StubClass:
    """A class of the stub: its methods (with parameters) and its attributes (annotated names and
    properties)."""

    def __init__(self, node: ast.ClassDef):
        self.is_exception = any(isinstance(b, ast.Name) and b.id.endswith(("Exception", "Error")) for b in node.bases)
        self.methods: dict[str, list[Param]] = {}
        self.attributes: set[str] = set()
        for item in node.body:
            if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                self.attributes.add(item.target.id)
            elif isinstance(item, ast.FunctionDef):
                if any(isinstance(d, ast.Name) and d.id == "property" for d in item.decorator_list):
                    self.attributes.add(item.name)
                else:
                    self.methods[item.name] = stub_params(item)


def parse_stub() -> tuple[dict[str, StubClass], dict[str, list[Param]], set[str]]:
    """``(classes, functions, constants)`` the stub declares; private aliases and imports left out."""
    classes, functions, constants = {}, {}, set()
    for node in ast.parse(STUB.read_text()).body:
        if isinstance(node, ast.ClassDef):
            classes[node.name] = StubClass(node)
        elif isinstance(node, ast.FunctionDef):
            functions[node.name] = stub_params(node)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            constants.add(node.target.id)
    return classes, functions, constants


def public_names(namespace: dict[str, Any]) -> set[str]:
    return {n for n in namespace if not n.startswith("_") or n in PROTOCOL_DUNDERS or n == "__version__"}


def class_differences(name: str, cls: type, stub: StubClass) -> list[str]:
    """What the stub of class ``name`` gets wrong about ``cls``."""
    problems = []
    members = {n: v for n, v in vars(cls).items() if n in public_names(vars(cls))}
    constructor = runtime_params(cls) if cls.__text_signature__ else None
    if constructor is not None:
        members["__init__"] = cls
    declared = stub.methods.keys() | stub.attributes
    for member in sorted(members.keys() - declared):
        value = members[member]
        if inspect.isdatadescriptor(value):
            problems.append(f"_core.pyi lacks attribute {name}.{member}")
        else:
            params = constructor if member == "__init__" else runtime_params(getattr(cls, member))
            problems.append(f"_core.pyi lacks method {name}.{member}{describe(params)}")
    for member in sorted(declared - members.keys() - HIDDEN_DUNDERS):
        problems.append(f"_core.pyi declares {name}.{member}, which the module's {name} lacks")
    for member in sorted(members.keys() & declared):
        is_attribute = inspect.isdatadescriptor(members[member])
        if is_attribute and member in stub.methods:
            problems.append(f"{name}.{member} is an attribute, but _core.pyi declares a method")
        elif not is_attribute and member in stub.attributes:
            problems.append(f"{name}.{member} is a method, but _core.pyi declares an attribute")
        elif not is_attribute and type(members[member]).__name__ != "wrapper_descriptor":
            # Slot wrappers (__len__, __contains__, ...) take positional arguments CPython names itself.
            runtime = constructor if member == "__init__" else runtime_params(getattr(cls, member))
            if runtime is not None and params_differ(stub.methods[member], runtime):
                problems.append(
                    f"{name}.{member}: the module takes {describe(runtime)}, "
                    f"_core.pyi says {describe(stub.methods[member])}"
                )
    return problems


def stub_differences() -> list[str]:
    """Every way ``_core.pyi`` and the module disagree, one line each."""
    classes, functions, constants = parse_stub()
    declared = classes.keys() | functions.keys() | constants
    exported = public_names(vars(core))
    problems = []
    for name in sorted(exported - declared):
        value = getattr(core, name)
        kind = "class" if isinstance(value, type) else "function" if callable(value) else "constant"
        shown = describe(runtime_params(value)) if kind == "function" else ""
        problems.append(f"_core.pyi lacks {kind} {name}{shown}")
    for name in sorted(declared - exported):
        problems.append(f"_core.pyi declares {name}, which normalize_core._core lacks")
    for name in sorted(exported & declared):
        value = getattr(core, name)
        if isinstance(value, type):
            if name not in classes:
                problems.append(f"{name} is a class, but _core.pyi does not declare it as one")
            elif not classes[name].is_exception:
                problems.extend(class_differences(name, value, classes[name]))
        elif callable(value):
            runtime = runtime_params(value)
            if name not in functions:
                problems.append(f"{name} is a function, but _core.pyi does not declare it as one")
            elif runtime is not None and params_differ(functions[name], runtime):
                problems.append(
                    f"{name}: the module takes {describe(runtime)}, _core.pyi says {describe(functions[name])}"
                )
        elif name not in constants:
            problems.append(f"{name} is a constant, but _core.pyi does not declare it as one")
    return problems


def test_the_stub_matches_the_module() -> None:
    problems = stub_differences()
    assert not problems, "_core.pyi is out of date:\n" + "\n".join(problems)


def test_the_comparison_notices_what_it_must(monkeypatch) -> None:
    """The checker itself: a missing function, a renamed parameter and a stray method are reported."""
    original = STUB.read_text()
    edited = (
        original.replace("def read_header(path: _Path) -> ShardHeader: ...\n", "")
        .replace(
            "def names(self) -> list[str]: ...", "def names(self) -> list[str]: ...\n    def gone(self) -> None: ..."
        )
        .replace("def tensor(self, name: str)", "def tensor(self, tensor_name: str)")
    )
    assert "def read_header" not in edited and "def gone" in edited and "tensor_name" in edited

    class EditedStub:
        @staticmethod
        def read_text() -> str:
            return edited

    monkeypatch.setattr(sys.modules[__name__], "STUB", EditedStub)
    problems = stub_differences()
    assert "_core.pyi lacks function read_header(path)" in problems
    assert "_core.pyi declares Checkpoint.gone, which the module's Checkpoint lacks" in problems
    assert "Checkpoint.tensor: the module takes (name), _core.pyi says (tensor_name)" in problems
