"""RFC 3461's values, shared by the ESMTP parameters a client sends (gateway/smtp/esmtp_params.py)
and the delivery status notifications the gateway writes (gateway/mail/dsn.py): xtext, as ENVID
and ORCPT travel, and what a recipient's NOTIFY asks for."""

from __future__ import annotations

import re

_XTEXT_HEX = re.compile(r"\+([0-9A-F]{2})")


def xtext_decode(value: str) -> str | None:
    """RFC 3461 4: "+" and two upper-case hex digits stand for one character; every other
    character is printable ASCII other than "+" and "=". None when it is not xtext."""
    if any(not ("!" <= c <= "~") or c == "=" for c in value):
        return None
    if "+" in value and _XTEXT_HEX.sub("", value).count("+"):
        return None
    decoded = _XTEXT_HEX.sub(lambda m: chr(int(m.group(1), 16)), value)
    # Printable only: the value is written into report headers (no CR, LF or NUL).
    return decoded if decoded.isascii() and decoded.isprintable() else None


def xtext_encode(value: str) -> str:
    return "".join(c if "!" <= c <= "~" and c not in "+=" else f"+{ord(c):02X}"
                   for c in value)


def wants(notify: str | None, what: str) -> bool:
    """Whether a recipient's NOTIFY asks for `what` (SUCCESS, FAILURE or DELAY)."""
    return notify is not None and what in notify.split(",")
