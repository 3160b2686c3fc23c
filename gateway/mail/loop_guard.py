"""Mail that a machine wrote in answer to other mail: bounces, auto-replies, our own reports.

Faxing such mail is never what anyone wanted, and answering it is how mail loops start: a
report mailed to a fax address comes back as a fax job whose report is mailed again, and an
out-of-office reply to a report becomes a fax whose report draws another out-of-office reply.
So it is refused at DATA with ``550 5.7.1`` and never answered by mail (no backscatter).

Mail that systems *generate* on their own (``Auto-Submitted: auto-generated``: an ERP faxing
its invoices) is exactly what this gateway is for, and passes. RFC 3834 section 5 is the
reference for the header; the X- headers are the older conventions still in use.

Pure functions over bytes and header values; no I/O, so they are tested without sockets.
"""

from __future__ import annotations

import re
from email import policy
from email.message import Message
from email.parser import BytesHeaderParser
from email.utils import getaddresses

from gateway.constants import REPORT_HEADER
from gateway.documents.mime import delimiter_lines, header_block

__all__ = ["automatic_mail", "in_domain"]

# How much of a message is looked at: headers of any sane mail fit; top-level part headers are
# looked for up to this far into the body.
_HEADER_BYTES = 256 * 1024
_SCAN_BYTES = 4 * 1024 * 1024
_MAX_PARTS = 100
# Lines starting with the boundary looked at, delimiters or not (this runs on the event loop: a
# 256 KB block of "--boundary x" lines took 25 ms to look through whole).
_MAX_LINES = 1000

_SYSTEM_SENDERS = frozenset({"mailer-daemon", "postmaster"})
_REPLY_VALUES = ("auto-replied", "auto-notified")
_REPORT_TYPES = frozenset({"message/delivery-status", "message/global-delivery-status",
                           "message/disposition-notification",
                           "message/global-disposition-notification"})
_PARSER = BytesHeaderParser(policy=policy.compat32)
_MESSAGE_TYPE = re.compile(rb"message/", re.IGNORECASE)


def in_domain(address: str, domain: str) -> bool:
    """True when `address` is at `domain` or one of its subdomains (case-insensitive): a
    report addressed there would be faxed."""
    at = address.rstrip(">").rpartition("@")[2].strip().rstrip(".").lower()
    domain = domain.strip().rstrip(".").lower()
    return bool(at) and (at == domain or at.endswith("." + domain))


def _local_parts(values: list[str]) -> set[str]:
    return {addr.rpartition("@")[0].lower() or addr.lower()
            for _, addr in getaddresses(values) if addr}


def _header(headers: Message, name: str) -> str:
    return " ".join(str(v) for v in headers.get_all(name, [])).strip().lower()


def _top_level_report_types(content: bytes, headers: Message) -> list[str]:
    """The mail-system report types (_REPORT_TYPES) among the immediate parts of a top-level
    multipart (not of parts nested in them: a bounce forwarded as an attachment on purpose is
    someone's document)."""
    if headers.get_content_maintype() != "multipart":
        return []
    boundary = headers.get_param("boundary")
    if not isinstance(boundary, str) or not boundary or len(boundary) > 200:
        return []
    marker = b"--" + boundary.encode("latin-1", "replace")
    scanned = content[:_SCAN_BYTES]
    types: list[str] = []
    parts = 0
    for _, line_end, closing in delimiter_lines(scanned, marker, max_lines=_MAX_LINES):
        if line_end == -1:
            break
        if closing:
            continue
        parts += 1
        if parts > _MAX_PARTS:
            break
        block = header_block(scanned[line_end + 1:line_end + 1 + 16 * 1024])
        # Every report type is "message/...", and a content type is never encoded: a part
        # whose header block lacks those bytes is none, and is not parsed (a scan's parts).
        if _MESSAGE_TYPE.search(block) is None:
            continue
        kind = _PARSER.parsebytes(block).get_content_type()
        if kind in _REPORT_TYPES:
            types.append(kind)
    return types


def automatic_mail(content: bytes, envelope_from: str | None) -> str | None:
    """Why this mail is automatic mail that must not be faxed, in plain words; None to fax it.

    `envelope_from` is the MAIL FROM address as received ("" for the null sender ``<>``;
    None when unknown).
    """
    headers = _PARSER.parsebytes(header_block(content[:_HEADER_BYTES]))
    if headers.get(REPORT_HEADER) is not None or headers.get("X-Faxgw-Job") is not None:
        return ("this is a report from a fax gateway sent back to a fax number; it is not "
                "faxed, so that reports cannot loop")
    if envelope_from is not None and envelope_from.strip() in ("", "<>"):
        return ("this is a bounce or notification (empty envelope sender <>); automatic mail "
                "is not faxed")
    addresses = [envelope_from or "", *map(str, headers.get_all("From", []))]
    system: list[str] = []
    if any("\\" in a or any(name in a.lower() for name in _SYSTEM_SENDERS) for a in addresses):
        system = sorted(_local_parts(addresses) & _SYSTEM_SENDERS)  # parsed only when it may be
    if system:
        return (f"this mail comes from a mail system ({system[0].upper()}); automatic mail "
                "is not faxed")
    auto = _header(headers, "Auto-Submitted")
    if auto.startswith(_REPLY_VALUES):
        return (f"this is an automatic reply (Auto-Submitted: {auto.split(';')[0][:40]}); "
                "automatic replies are not faxed")
    for name in ("X-Autoreply", "X-Autorespond"):
        value = _header(headers, name)
        if headers.get(name) is not None and value not in ("no", "false", "0"):
            return f"this is an automatic reply ({name}); automatic replies are not faxed"
    if _header(headers, "Precedence") == "auto_reply":
        return ("this is an automatic reply (Precedence: auto_reply); automatic replies are "
                "not faxed")
    if headers.get_content_type() == "multipart/report":
        kind = str(headers.get_param("report-type") or "report")[:40]
        return f"this is a mail system report ({kind}); automatic mail is not faxed"
    report_parts = _top_level_report_types(content, headers)
    if report_parts:
        return (f"this is a mail system report ({report_parts[0]}); automatic mail is not "
                "faxed")
    return None
