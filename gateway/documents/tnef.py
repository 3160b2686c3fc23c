"""Outlook's winmail.dat (TNEF, application/ms-tnef): the files packed inside it.

Outlook in "Rich Text" mode, and Exchange when it sends to a recipient it believes is Outlook,
wraps the attachments in one TNEF stream. tnefparse decodes the format (attribute records, the
MAPI property lists, codepages, embedded messages); this module only turns its result into
(file name, bytes) pairs under our limits, and its failures into one plain-words reason.
Runs in the document workers (with their time and memory limits), like the rest of mime.py.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from tnefparse import TNEF
from tnefparse.properties import MAPI_ATTACH_CONTENT_ID

from gateway.sanitise import one_line

__all__ = ["TnefError", "TnefFile", "extract"]

# tnefparse logs oddities of each file (a checksum off, an unknown attribute) at WARNING.
logging.getLogger("tnefparse").setLevel(logging.ERROR)

MAX_FILES = 50


class TnefError(ValueError):
    """The winmail.dat cannot be read; ``str(err)`` says why in plain words."""


@dataclass(frozen=True)
class TnefFile:
    name: str | None
    data: bytes
    content_id: bool = False  # shown in place in the message text (a logo), not attached


def _name(attachment: object) -> str | None:
    try:
        name = attachment.long_filename()  # type: ignore[attr-defined]
    except (UnicodeDecodeError, AttributeError, ValueError):
        name = None
    if isinstance(name, bytes):
        name = name.decode("latin-1")
    if not isinstance(name, str):
        return None
    name = one_line(name.replace("\x00", ""), 255)
    return name or None


def _has_content_id(attachment: object) -> bool:
    return any(getattr(p, "name", None) == MAPI_ATTACH_CONTENT_ID
               for p in getattr(attachment, "mapi_attrs", ()))


def extract(data: bytes) -> tuple[list[TnefFile], bool]:
    """The files in a TNEF stream, in order (at most MAX_FILES), and whether it also holds a
    message body (the text Outlook typed in Rich Text, which the mail's own body repeats)."""
    try:
        tnef = TNEF(data, do_checksum=False)
    except Exception as exc:  # noqa: BLE001 - a parser over hostile bytes: any error is "unreadable"
        raise TnefError(f"the winmail.dat (TNEF) attachment is damaged and cannot be read "
                        f"({type(exc).__name__})") from exc
    files = [TnefFile(_name(a), bytes(a.data), _has_content_id(a))
             for a in tnef.attachments[:MAX_FILES]
             if isinstance(getattr(a, "data", None), (bytes, bytearray)) and a.data]
    return files, tnef.has_body()
