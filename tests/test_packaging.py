"""The installed package holds what the gateway runs, and nothing only tests or the bench use.

Issue 24, item 8: the S3 test server and the test harness lived in gateway/sandbox/ although
only tests/ and bench/ imported them. This walks the import graph of the installed packages
(as pyproject's packages.find selects them) from the `faxgw` entry point and `python -m
gateway`, and fails on a module nothing there reaches: it belongs in testsupport/ (tests and
bench) or should go. Modules loaded by name ("gateway.documents.build:prepare", for the CPU
child process) count as imported.
"""

from __future__ import annotations

import ast
import fnmatch
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOTTED = re.compile(r"^(gateway(?:\.\w+)+)(?::\w+)?$")


def installed_modules() -> dict[str, Path]:
    """Module name -> file, for every .py in the packages pyproject installs."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    modules: dict[str, Path] = {}
    for path in ROOT.rglob("*.py"):
        package = ".".join(path.parent.relative_to(ROOT).parts)
        # setuptools' packages.find matches its include patterns against dotted names
        if package and any(fnmatch.fnmatchcase(package, pattern) for pattern in include):
            modules[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return modules


def imported_by(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The installed modules `name` imports, by import statement or by a dotted string."""
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            match = DOTTED.match(node.value)
            if match:
                found.add(match.group(1))
    reached: set[str] = set()
    for dotted in found:
        parts = dotted.split(".")
        reached.update(prefix for i in range(1, len(parts) + 1)
                       if (prefix := ".".join(parts[:i])) in modules)
    return reached


def test_every_installed_module_is_reached_from_the_entry_points() -> None:
    modules = installed_modules()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    entries = [target.partition(":")[0] for target in pyproject["project"]["scripts"].values()]
    entries.append("gateway.__main__")
    seen: set[str] = set()
    todo = [entry for entry in entries if entry in modules]
    assert todo, f"no entry point found among {entries}"
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(imported_by(name, modules[name], modules) - seen)
    unreached = sorted(set(modules) - seen)
    assert not unreached, ("installed but never imported by the gateway (tests/bench only?): "
                           f"{unreached}")


def test_testsupport_is_not_installed_and_the_gateway_does_not_import_it() -> None:
    modules = installed_modules()
    assert "gateway.cli" in modules
    assert not [name for name in modules if not name.startswith("gateway")]
    importers = [name for name, path in modules.items()
                 if re.search(r"^\s*(from|import)\s+(testsupport|tests|bench)\b",
                              path.read_text(encoding="utf-8"), re.M)]
    assert not importers, f"installed modules importing test-only code: {importers}"


def test_no_test_module_imports_another() -> None:
    """What several test modules share lives in tests/helpers/ or tests/conftest.py: a test
    module imported by another runs its module-level code twice and ties the two together."""
    tests = ROOT / "tests"
    modules = {path.stem for path in tests.glob("test_*.py")}
    importers = []
    for path in sorted(tests.glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                name = (node.module or "").removeprefix("tests.")
                names = [name] if name else [alias.name for alias in node.names]
            elif isinstance(node, ast.Import):
                names = [alias.name.removeprefix("tests.") for alias in node.names]
            else:
                continue
            importers += [f"{path.name}:{node.lineno} imports {n}" for n in names if n in modules]
    assert not importers, importers
