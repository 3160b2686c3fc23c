"""The plain data that crosses between the daemon and its document workers.

Kept apart from document.py so the daemon can use these types (and catch DocumentError) without
importing the PDF and image libraries: only the worker processes load those.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.documents.mime import ParsedMail


class DocumentError(ValueError):
    """The mail holds nothing that can be faxed; the text is shown to the sender as is."""


@dataclass(frozen=True)
class DocOptions:
    """The operator's defaults (from Settings) for turning mail into a fax."""

    paper: str = "letter"
    body: str = "auto"
    cover: bool = False
    quality: str = "fine"
    max_pages: int = 200
    max_image_pixels: int = 60_000_000
    office_timeout_s: float = 60.0


@dataclass(frozen=True)
class MessageOptions:
    """Per-message choices from the subject (`[fine]`, `[cover]`, ...) and X-Fax-* headers."""

    quality: str
    cover: bool
    body: str
    subject: str  # without the option tags


@dataclass(frozen=True)
class Document:
    data: bytes
    pages: int
    filenames: tuple[str, ...]
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Prepared:
    parsed: ParsedMail
    options: MessageOptions
    document: Document
    # Set when the worker wrote the PDF to a file (fsync'ed) instead of returning its bytes
    # (document.data is then empty): the daemon never holds a large document.
    pdf_path: str | None = None
    pdf_bytes: int = 0
    pdf_sha256: str = ""
