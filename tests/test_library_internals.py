"""No private interface of the standard library or of pypdf is used by gateway/; the few
aiosmtplib internals the report relay leans on are pinned by their source.

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


# aiosmtplib's pieces the report relay (gateway/mail/sender.py `_mail`, `_rcpt`, `_data`) does
# itself or calls directly, to write a rendered report to DATA as it is: sha256 (first 16 hex
# digits) of their source in aiosmtplib 5.1.3. A change fails here on purpose: read the new
# source against sender.py (the replies, the errors, the dot-stuffing), then update the digest.
AIOSMTPLIB_PINNED = {
    "SMTP.data": "ac54fc47aec81b08",
    "SMTP.mail": "aa44c3d243b35260",
    "SMTP.rcpt": "00b4c28151b6c900",
    "SMTPProtocol.execute_data_command": "a55f9634add2db08",
    "SMTPProtocol.write": "4b11ce8fce2f2f16",
    "SMTPProtocol.read_response": "0b9d810b358b1b0b",
    "normalize_message_line_endings": "b2996d67955888e8",
    "quote_address": "9f59e28fbb07142b",
}


def test_the_aiosmtplib_internals_the_relay_leans_on_are_unchanged() -> None:
    import hashlib
    import inspect

    import aiosmtplib
    from aiosmtplib import email as smtplib_email
    from aiosmtplib import protocol

    found = {
        "SMTP.data": aiosmtplib.SMTP.data, "SMTP.mail": aiosmtplib.SMTP.mail,
        "SMTP.rcpt": aiosmtplib.SMTP.rcpt,
        "SMTPProtocol.execute_data_command": protocol.SMTPProtocol.execute_data_command,
        "SMTPProtocol.write": protocol.SMTPProtocol.write,
        "SMTPProtocol.read_response": protocol.SMTPProtocol.read_response,
        "normalize_message_line_endings": protocol.normalize_message_line_endings,
        "quote_address": smtplib_email.quote_address,
    }
    for name, obj in found.items():
        digest = hashlib.sha256(inspect.getsource(obj).encode()).hexdigest()[:16]
        assert digest == AIOSMTPLIB_PINNED[name], (
            f"aiosmtplib {aiosmtplib.__version__} changed {name}: check gateway/mail/sender.py "
            "(_mail, _rcpt, _data) against it, then update AIOSMTPLIB_PINNED")
    assert protocol.PERIOD_REGEX.pattern == rb"(?m)^\."
