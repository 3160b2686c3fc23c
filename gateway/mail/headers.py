"""The header fields every mail the gateway writes to a sender starts with (a report, a DSN,
a delay notice): From, To, Subject, Date, Message-ID, Auto-Submitted, and the thread's
In-Reply-To and References when the sender's mail had a usable Message-ID."""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import format_datetime

from gateway.store.rows import Message


def _is_msgid(value: str) -> bool:
    return (value.startswith("<") and value.endswith(">") and len(value) <= 250
            and not any(c.isspace() for c in value))


def reply_headers(from_addr: str, to: str, subject: str, now: float, msgid: str,
                  original: Message) -> list[tuple[str, str]]:
    """The header fields every mail to a sender starts with, in order."""
    headers = [("From", from_addr), ("To", to), ("Subject", subject),
               ("Date", format_datetime(datetime.fromtimestamp(now, UTC))),
               ("Message-ID", msgid),
               ("Auto-Submitted", "auto-replied")]  # RFC 3834: auto-responders must not answer
    if original.message_id_header and _is_msgid(original.message_id_header):
        refs = [r for r in (original.references_header or "").split() if _is_msgid(r)][-10:]
        headers += [("In-Reply-To", original.message_id_header),
                    ("References", " ".join([*refs, original.message_id_header]))]
    return headers
