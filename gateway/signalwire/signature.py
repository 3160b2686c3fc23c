"""The SignalWire (Twilio-compatible) status-callback signature.

SignalWire signs each callback with the project's Signing Key:
``base64(HMAC-SHA1(key, url + name1 + value1 + name2 + value2 ...))`` with the form
parameters sorted by name in byte order. There is no timestamp or nonce, so the signature
only proves origin; callbacks must be idempotent anyway.

Kept pure (no aiohttp) so the gateway's web edge and the simulator share one definition and
the test vectors pin it down.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Iterable, Mapping
from typing import Final, TypeAlias

SIGNATURE_HEADER: Final = "X-SignalWire-Signature"
# SignalWire's SDKs accept the Twilio header name too; a proxy may have kept only that one.
TWILIO_SIGNATURE_HEADER: Final = "X-Twilio-Signature"

# Values are `object` so aiohttp's ``await request.post()`` (a MultiDictProxy whose value type
# also admits bytes and file fields) can be passed as is; urlencoded forms only hold str.
Params: TypeAlias = Mapping[str, object] | Iterable[tuple[str, object]]

_DEFAULT_PORTS: Final = {"http": "80", "https": "443"}


def _pairs(params: Params) -> list[tuple[str, str]]:
    """All (name, value) pairs, keeping repeats.

    ``.items()`` of a MultiDict (what aiohttp's ``request.post()`` returns) yields every
    repeated field, so a Mapping is read through it rather than by key.
    """
    items = params.items() if isinstance(params, Mapping) else params
    return [(str(name), _text(value)) for name, value in items]


def _text(value: object) -> str:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", errors="replace")
    return str(value)


def _payload(url: str, params: Params) -> bytes:
    # Sorting (name, value) tuples orders by name and, for a repeated name, by value, as
    # Twilio's validators do. Python orders str by code point, which is UTF-8 byte order.
    parts = [url]
    for name, value in sorted(_pairs(params)):
        parts.append(name)
        parts.append(value)
    return "".join(parts).encode("utf-8")


def compute_signature(signing_key: str, url: str, params: Params) -> str:
    """Signature SignalWire would send for a POST of ``params`` to ``url``.

    ``url`` must be exactly the StatusCallback URL that was registered (scheme, host, port if
    any, path and query): behind a proxy, the URL SignalWire called, not one rebuilt from the
    request. ``params`` are the decoded form fields.
    """
    digest = hmac.new(signing_key.encode("utf-8"), _payload(url, params), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


def verify_signature(signing_key: str, url: str, params: Params, signature: str | None) -> bool:
    """True if ``signature`` signs ``url`` plus the form ``params``.

    Accepts the URL as given and with the default port added or removed, because what
    SignalWire signed depends on how the URL was written when it was registered. Strict on
    the body: a signature over the bare URL does not pass for a non-empty form (SignalWire's
    newer SDK allows that; it would let a replayed signature carry any body).
    """
    if not signature or not signing_key:
        return False
    given = signature.strip().encode("utf-8")
    pairs = _pairs(params)
    candidates = dict.fromkeys((url, _with_default_port(url), _without_default_port(url)))
    ok = False
    for candidate in candidates:
        expected = compute_signature(signing_key, candidate, pairs).encode("ascii")
        # No early exit: the time taken should not tell which URL form matched.
        ok |= hmac.compare_digest(expected, given)
    return ok


def _split_authority(url: str) -> tuple[str, str, str | None, str, str] | None:
    """Split an http(s) URL into (prefix, host, port, rest, scheme) without re-encoding it.

    ``prefix`` is ``scheme://`` plus any userinfo, ``host`` keeps IPv6 brackets, ``port`` is
    None when absent (an empty port, ``host:``, counts as absent per RFC 3986), ``rest`` is
    path, query and fragment exactly as written. None for anything else, so callers leave
    such URLs untouched. urllib.parse is not used to rebuild because urlunsplit normalises
    (drops an empty ``?``), and the signature is over the exact string.
    """
    scheme, sep, after = url.partition("://")
    if not sep or scheme.lower() not in _DEFAULT_PORTS:
        return None
    end = len(after)
    for delim in "/?#":
        i = after.find(delim)
        if i != -1 and i < end:
            end = i
    authority, rest = after[:end], after[end:]
    userinfo, at, hostport = authority.rpartition("@")
    prefix = scheme + sep + userinfo + at
    if hostport.startswith("["):
        close = hostport.find("]")
        if close == -1:
            return None
        host, tail = hostport[: close + 1], hostport[close + 1 :]
        if tail and not tail.startswith(":"):
            return None
        port = tail[1:] if tail else None
    else:
        host, colon, port_text = hostport.partition(":")
        port = port_text if colon else None
    if not host or (port and not port.isdigit()):
        return None
    return prefix, host, (port or None), rest, scheme.lower()


def _with_default_port(url: str) -> str:
    """``url`` with ``:443`` / ``:80`` added when it names no port; otherwise unchanged."""
    split = _split_authority(url)
    if split is None:
        return url
    prefix, host, port, rest, scheme = split
    if port is not None:
        return url
    return f"{prefix}{host}:{_DEFAULT_PORTS[scheme]}{rest}"


def _without_default_port(url: str) -> str:
    """``url`` with an explicit default port (``:443`` for https, ``:80`` for http) removed."""
    split = _split_authority(url)
    if split is None:
        return url
    prefix, host, port, rest, scheme = split
    if port is None or int(port) != int(_DEFAULT_PORTS[scheme]):
        return url
    return f"{prefix}{host}{rest}"
