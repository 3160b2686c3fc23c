"""One sanitiser for text that came from outside (mail headers, callbacks, error messages)
before it goes into a header, a log line, a report field, an SMTP reply or a terminal.

Everything that puts foreign text on one line uses `one_line`; there is no second copy.
"""

from __future__ import annotations

import re

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def one_line(s: str, max_len: int = 200, *, ascii_only: bool = False) -> str:
    """Make outside text safe for a header or any one-line field.

    Removes control characters (CR/LF would inject headers; escape sequences would drive a
    terminal), bidi overrides (they can disguise a file name), and lone surrogates left by
    undecodable bytes; collapses whitespace; cuts to `max_len` characters, ending in "..." when
    cut. `ascii_only` (an SMTP reply line) replaces anything else with "?".
    """
    text = _SURROGATE.sub("\ufffd", s)
    text = _CONTROL.sub(" ", text)
    text = " ".join(text.split())
    if len(text) > max_len:
        text = text[: max(0, max_len - 3)].rstrip() + "..." if max_len >= 4 else text[:max_len]
    if ascii_only:
        text = text.encode("ascii", "replace").decode("ascii")
    return text


def exception_line(exc: BaseException) -> str:
    """An exception as a short line for the log: its type and the first line of its message
    (a driver's message may run to lines), at most 200 characters of it."""
    text = str(exc).strip()
    first = text.splitlines()[0][:200] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


# The name the MIME parser and its callers have always used.
sanitize_header_text = one_line
