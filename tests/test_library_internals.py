"""No private interface of the standard library or of pypdf is used by gateway/.

aiosmtpd's internals are fenced in gateway/smtp/aiosmtpd_compat.py (tests/test_smtp_hooks.py);
the stdlib's `email._header_value_parser` and pypdf's `_root_object` / `_add_object` are not
used at all: a new Python or pypdf may change them without notice."""

from __future__ import annotations

import ast
from pathlib import Path

import gateway

PRIVATE_MODULES = {"email._header_value_parser", "email._parseaddr", "email._policybase"}
PRIVATE_PYPDF = {"_root_object", "_add_object", "_objects", "_get_indirect_object"}


def _modules() -> list[tuple[Path, ast.Module]]:
    root = Path(gateway.__file__).parent
    return [(p, ast.parse(p.read_text(encoding="utf-8"))) for p in sorted(root.rglob("*.py"))]


def test_no_private_email_module_is_imported() -> None:
    for path, tree in _modules():
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert name not in PRIVATE_MODULES, f"{path}: imports {name}"


def test_no_private_pypdf_attribute_is_used() -> None:
    for path, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                assert node.attr not in PRIVATE_PYPDF, f"{path}:{node.lineno}: .{node.attr}"
