"""A report mail written straight to its wire form (CRLF bytes), without the email package.

Building a report with ``EmailMessage`` and serialising it cost about 8 ms of CPU per report
(every header parsed by the header registry, then folded again; a boundary regex compiled per
multipart): the largest single cost of a 100 KB fax. A report's shape is fixed and its text is
our own, so it is written here directly: the same MIME structure ``report_message`` builds
(multipart/alternative of text and HTML, the HTML with its first-page picture in a
multipart/related, the sent PDF beside them in a multipart/mixed). Whatever this does not
handle, it declines (None), and the caller uses ``report_message``: a header value with a
line break, or an address that is not ASCII (that needs SMTPUTF8 or the email package's
encoding), so nothing here is ever a half-right mail.
"""

from __future__ import annotations

import base64
import quopri
import secrets
from dataclasses import dataclass
from email.header import Header
from email.utils import formataddr, parseaddr

CRLF = b"\r\n"
MAX_LINE = 998  # RFC 5322's hard limit, as the EmailMessage policy uses
_ADDRESS_HEADERS = frozenset({"from", "to", "cc", "reply-to", "sender"})


@dataclass(frozen=True)
class ReportContent:
    """A report mail's parts, before they are put together (as an EmailMessage by
    gateway/mail/reports.py, or written straight to the wire by `write_report` below)."""

    headers: list[tuple[str, str]]
    text: str
    html: str
    thumbnail_png: bytes | None
    thumbnail_cid: str | None  # "<...>"
    pdf: bytes | None
    pdf_name: str


def _fold(line: str) -> str:
    """Fold at spaces so that no line exceeds MAX_LINE (References with ten message-ids)."""
    if len(line) <= MAX_LINE:
        return line
    out, current = [], ""
    for word in line.split(" "):
        if current and len(current) + 1 + len(word) > MAX_LINE:
            out.append(current)
            current = " " + word
        else:
            current = f"{current} {word}" if current else word
    out.append(current)
    return "\r\n".join(out)


def header(name: str, value: str) -> bytes | None:
    """One header field, RFC 2047-encoded where it is not ASCII; None when it cannot be
    written here (a line break in the value, an address that is not ASCII)."""
    if "\r" in value or "\n" in value or not name.isascii():
        return None
    if value.isascii():
        return _fold(f"{name}: {value}").encode("ascii") + CRLF
    if name.lower() in _ADDRESS_HEADERS:
        display, addr = parseaddr(value)
        if not addr or not addr.isascii() or "," in value:
            return None
        encoded = formataddr((display, addr), charset="utf-8")
    else:
        encoded = Header(value, "utf-8", header_name=name).encode(linesep="\r\n")
    return f"{name}: {encoded}".encode("ascii") + CRLF


def _boundary() -> str:
    return "===============" + secrets.token_hex(12) + "=="


def _text_body(text: str) -> tuple[str, bytes]:
    """(Content-Transfer-Encoding, body) for our own text: 7bit when it is ASCII in short
    lines, else quoted-printable (readable, and safe through any relay)."""
    lines = text.replace("\r\n", "\n").split("\n")
    if text.isascii() and all(len(line) <= MAX_LINE for line in lines):
        return "7bit", "\r\n".join(lines).encode("ascii") + CRLF  # + the boundary's CRLF
    encoded = quopri.encodestring("\n".join(lines).encode("utf-8"))
    # The line break before the next boundary belongs to the boundary, not to the text.
    return "quoted-printable", encoded.replace(b"\n", CRLF) + CRLF


def _base64_body(data: bytes) -> bytes:
    return base64.encodebytes(data).replace(b"\n", CRLF)


def _text_part(text: str, subtype: str) -> bytes:
    cte, body = _text_body(text)
    return (f'Content-Type: text/{subtype}; charset="utf-8"\r\n'
            f"Content-Transfer-Encoding: {cte}\r\n\r\n").encode("ascii") + body


def _multipart(subtype: str, parts: list[bytes]) -> bytes:
    boundary = _boundary()
    out = [f'Content-Type: multipart/{subtype}; boundary="{boundary}"\r\n\r\n'.encode("ascii")]
    for part in parts:
        out += [f"--{boundary}\r\n".encode("ascii"), part]
    out.append(f"--{boundary}--\r\n".encode("ascii"))
    return b"".join(out)


def _file_part(ctype: str, data: bytes, disposition: str, filename: str,
               content_id: str | None = None) -> bytes | None:
    if not filename.isascii() or '"' in filename or "\\" in filename:
        return None
    head = (f"Content-Type: {ctype}\r\nContent-Transfer-Encoding: base64\r\n"
            f'Content-Disposition: {disposition}; filename="{filename}"\r\n')
    if content_id is not None:
        head += f"Content-ID: {content_id}\r\n"
    return head.encode("ascii") + CRLF + _base64_body(data)


def write_report(content: ReportContent) -> bytes | None:
    """The report as it goes to the relay, or None to leave it to the email package."""
    fields = [header(name, value) for name, value in content.headers]
    if any(f is None for f in fields):
        return None
    body = _multipart("alternative", [_text_part(content.text, "plain"),
                                      _html(content)])
    if content.pdf is not None:
        attachment = _file_part("application/pdf", content.pdf, "attachment",
                                content.pdf_name)
        if attachment is None:
            return None
        body = _multipart("mixed", [body, attachment])
    return b"".join(f for f in fields if f is not None) + b"MIME-Version: 1.0\r\n" + body


def _html(content: ReportContent) -> bytes:
    page = _text_part(content.html, "html")
    if not (content.thumbnail_png and content.thumbnail_cid):
        return page
    picture = _file_part("image/png", content.thumbnail_png, "inline", "first-page.png",
                         content.thumbnail_cid)
    assert picture is not None  # a fixed ASCII name
    return _multipart("related", [page, picture])
