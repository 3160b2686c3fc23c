"""Inbound routing: which mail addresses get the faxes that arrive on which number.

`INBOUND_ROUTES="+13103383454=frontdesk@example.com,billing@example.com;*=office@example.com"`:
entries separated by `;`, each an E.164 number (or `*`, every other number of the project), `=`,
and one or more comma-separated addresses. `INBOUND_ROUTES_FILE` holds the same entries one per
line (blank lines and `#` comments allowed), for installations with many numbers. Pure: parsing
raises `RouteError` naming the variable and the entry, and config.py turns that into exit 78.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

WILDCARD = "*"
_E164 = re.compile(r"\+[1-9][0-9]{6,14}")
# Deliberately plain: one local part, one domain, no display names, nothing a header could
# be injected with.
_ADDRESS = re.compile(r"[^@\s<>,;\"()\[\]\\]{1,64}@[A-Za-z0-9.-]{1,253}")
MAX_ROUTES = 10_000
MAX_RECIPIENTS_PER_ROUTE = 50


class RouteError(ValueError):
    """One bad entry; `str()` names where it came from and what is wrong with it."""


@dataclass(frozen=True)
class Routes:
    """Number (E.164, or `*`) -> recipient addresses, in the order written."""

    table: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def __str__(self) -> str:
        """In INBOUND_ROUTES syntax (for `faxgw run --check`)."""
        return ";".join(f"{n}={','.join(a)}" for n, a in self.table)

    @property
    def enabled(self) -> bool:
        return bool(self.table)

    def recipients(self, to_number: str | None) -> tuple[str, ...]:
        """Who gets a fax that came in on `to_number`; () when the number has no route."""
        mapping = dict(self.table)
        if to_number and to_number in mapping:
            return mapping[to_number]
        return mapping.get(WILDCARD, ())

    @property
    def numbers(self) -> tuple[str, ...]:
        """The numbers named explicitly (the reconciler lists these)."""
        return tuple(n for n, _ in self.table if n != WILDCARD)

    @property
    def has_wildcard(self) -> bool:
        return any(n == WILDCARD for n, _ in self.table)


def parse_entry(entry: str, where: str) -> tuple[str, tuple[str, ...]]:
    number, sep, addresses = entry.partition("=")
    number = number.strip()
    shown = entry.strip()[:120]
    if not sep:
        raise RouteError(f"{where}: {shown!r} is not NUMBER=ADDRESS[,ADDRESS...]")
    if number != WILDCARD and not _E164.fullmatch(number):
        raise RouteError(f"{where}: {shown!r}: {number!r} is not an E.164 number "
                         "(+ and country code, e.g. +13103383454) or *")
    items = [a.strip() for a in addresses.split(",") if a.strip()]
    if not items:
        raise RouteError(f"{where}: {shown!r} names no mail address")
    if len(items) > MAX_RECIPIENTS_PER_ROUTE:
        raise RouteError(f"{where}: {shown!r} has more than {MAX_RECIPIENTS_PER_ROUTE} "
                         "addresses")
    for item in items:
        if not _ADDRESS.fullmatch(item) or "." not in item.rpartition("@")[2].strip("."):
            raise RouteError(f"{where}: {shown!r}: {item!r} is not a mail address")
    return number, tuple(dict.fromkeys(items))


def _merge(entries: Iterable[tuple[str, tuple[str, ...]]], where: str) -> list[
        tuple[str, tuple[str, ...]]]:
    merged: dict[str, tuple[str, ...]] = {}
    for number, addresses in entries:
        if number in merged:
            raise RouteError(f"{where}: {number} is routed twice")
        merged[number] = addresses
        if len(merged) > MAX_ROUTES:
            raise RouteError(f"{where}: more than {MAX_ROUTES} routes")
    return list(merged.items())


def parse_routes(text: str | None, variable: str = "INBOUND_ROUTES") -> Routes:
    if not text or not text.strip():
        return Routes()
    entries = [parse_entry(e, variable) for e in text.split(";") if e.strip()]
    return Routes(tuple(_merge(entries, variable)))


def parse_routes_file(path: Path, variable: str = "INBOUND_ROUTES_FILE") -> Routes:
    """One `NUMBER=ADDRESS[,ADDRESS...]` per line; `#` starts a comment."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RouteError(f"{variable}: {path} cannot be read: {exc}") from exc
    entries = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if line:
            entries.append(parse_entry(line, f"{variable} {path} line {n}"))
    return Routes(tuple(_merge(entries, f"{variable} {path}")))


def combine(a: Routes, b: Routes) -> Routes:
    """The variable and the file together; a number in both is an error (which one wins?)."""
    return Routes(tuple(_merge([*a.table, *b.table], "INBOUND_ROUTES / INBOUND_ROUTES_FILE")))


def is_blocked(caller: str | None, blocked: Iterable[str]) -> bool:
    """Caller-id block list: exact numbers or prefixes (`+1900`); `anonymous` blocks calls
    with no usable caller id."""
    caller = (caller or "").strip()
    for entry in blocked:
        if entry.lower() == "anonymous":
            if not _E164.fullmatch(caller):
                return True
        elif caller.startswith(entry):
            return True
    return False
