"""The package's layers: every import of a gateway module points down the order below, and no
modules import each other in a circle (docs/architecture.md draws the same order).

The imports are read from the source with `ast` (nothing is imported), including imports inside
functions: a late import is still a dependency. Run it alone with
`python -m pytest tests/test_layers.py -q`; a failure names each import that points up (file, line,
both layers) and each circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

GATEWAY = Path(__file__).resolve().parents[1] / "gateway"

# Bottom to top. A module may import from its own layer or any layer listed before it. A module
# belongs to the layer of the longest prefix that names it ("gateway" itself names only the
# package's __init__.py, so a new package must be given a layer here).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    # Plain values and helpers that import nothing of ours above them. SignalWire's table of
    # fax error codes sits here because the job model decides retries from it.
    ("foundation", ("gateway", "gateway.constants", "gateway.defaults", "gateway.sanitise",
                    "gateway.templating",
                    "gateway.phone", "gateway.signalwire.errors")),
    ("rules", ("gateway.rules",)),
    ("settings", ("gateway.config", "gateway.users")),
    ("job model", ("gateway.jobs",)),
    # The spool directory's files, and documents made from them (MIME, conversion to PDF).
    ("files and documents", ("gateway.spool", "gateway.documents")),
    ("store", ("gateway.store",)),
    ("runtime", ("gateway.runtime",)),
    ("clients", ("gateway.mail", "gateway.signalwire", "gateway.media_store", "gateway.sandbox")),
    ("smtp", ("gateway.smtp",)),
    ("outbound", ("gateway.outbound",)),
    ("inbound", ("gateway.inbound",)),
    ("web", ("gateway.web",)),
    ("daemon", ("gateway.daemon",)),
    ("command line", ("gateway.commands", "gateway.cli", "gateway.__main__")),
]

# Imports the order cannot express yet. Each names why and who removes it.
KNOWN: dict[tuple[str, str], str] = {
}


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(GATEWAY.rglob("*.py")):
        parts = list(path.relative_to(GATEWAY.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _owner(name: str) -> str | None:
    """The module that `name` (a module or a name inside one) is defined in."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str) -> list[tuple[str, int]]:
    """(imported module, line) for every gateway import in `module`, late imports included."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            # `from gateway.x import y` imports the module gateway.x.y when there is one.
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
                     for a in node.names]
        else:
            continue
        for name in names:
            if name == "gateway" or name.startswith("gateway."):
                target = _owner(name)
                if target and target != module:
                    found.append((target, node.lineno))
    return sorted(set(found))


def layer_of(module: str) -> int:
    best, best_len = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            inside = module.startswith(prefix + ".") and prefix != "gateway"
            if (module == prefix or inside) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best


def _edges() -> dict[str, set[str]]:
    return {m: {t for t, _ in imports_of(m) if (m, t) not in KNOWN} for m in MODULES}


def test_every_module_has_a_layer() -> None:
    for module in MODULES:
        layer_of(module)


def test_imports_point_down() -> None:
    upward: list[str] = []
    for module in MODULES:
        for target, line in imports_of(module):
            if (module, target) in KNOWN:
                continue
            if layer_of(target) > layer_of(module):
                upward.append(f"{MODULES[module].relative_to(GATEWAY.parent)}:{line} {module} "
                              f"({LAYERS[layer_of(module)][0]}) imports {target} "
                              f"({LAYERS[layer_of(target)][0]})")
    assert not upward, "imports that point up the layers:\n" + "\n".join(upward)


def _circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's, without recursion)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles = []
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        circles.append(sorted(component))
    return circles


def test_no_import_cycles() -> None:
    circles = _circles(_edges())
    assert not circles, "modules that import each other in a circle:\n" + "\n".join(
        " <-> ".join(c) for c in circles)


def test_the_checks_see_what_they_should() -> None:
    """The reader finds real imports (so an empty result means no import, not a blind parser)."""
    assert any(
        t == "gateway.jobs.outbound_states" for t, _ in imports_of("gateway.store.rows"))
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _circles({"a": {"b"}, "b": set()}) == []
    assert layer_of("gateway.signalwire.errors") < layer_of("gateway.jobs.outbound_states")
    assert layer_of("gateway.signalwire.client") > layer_of("gateway.store.base")
    with pytest.raises(AssertionError, match="in no layer"):
        layer_of("gateway.somewhere_new")
