"""Turn the documents found in a mail into the one PDF SignalWire takes (pure, CPU-bound: callers
run it off the event loop)."""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from typing import Sequence

from pypdf import PdfReader, PdfWriter
from pypdf.errors import PdfReadError, PyPdfError

from .mime import Part

log = logging.getLogger(__name__)


class DocumentError(ValueError):
    """The mail holds nothing that can be faxed; the text is shown to the sender as is."""


@dataclass(frozen=True)
class Document:
    data: bytes
    pages: int
    filenames: tuple[str, ...]


def _label(part: Part) -> str:
    name = part.filename or f"part {part.index} ({part.content_type})"
    return "".join(c if c.isprintable() else "?" for c in name)[:80]


def _open_pdf(part: Part) -> PdfReader:
    try:
        reader = PdfReader(io.BytesIO(part.data), strict=False)
        if reader.is_encrypted:
            # An owner-password-only PDF opens with the empty user password; anything else is
            # unreadable by us and by SignalWire.
            if not reader.decrypt(""):
                raise DocumentError(f"{_label(part)} is password-protected; send it without a "
                                    "password")
        if len(reader.pages) == 0:
            raise DocumentError(f"{_label(part)} has no pages")
        return reader
    except DocumentError:
        raise
    except (PdfReadError, PyPdfError, ValueError, KeyError, TypeError, OSError,
            RecursionError) as exc:
        log.info("unreadable PDF %s: %s", _label(part), type(exc).__name__)
        raise DocumentError(f"{_label(part)} is not a readable PDF") from exc


def build_document(parts: Sequence[Part], max_pages: int) -> Document:
    """Merge every PDF attachment, in the order they appear, into one PDF."""
    pdfs = [p for p in parts if p.kind == "pdf"]
    if not pdfs:
        others = ", ".join(_label(p) for p in parts if not p.inline)[:200]
        found = f" (found: {others})" if others else ""
        raise DocumentError(f"No PDF document found in the message{found}; attach the document "
                            "as a PDF file")
    readers = [(_open_pdf(p), p) for p in pdfs]
    pages = sum(len(r.pages) for r, _ in readers)
    if pages > max_pages:
        raise DocumentError(f"The document has {pages} pages; this gateway sends at most "
                            f"{max_pages} pages per fax")
    names = tuple(_label(p) for p in pdfs)
    if len(readers) == 1 and not readers[0][0].is_encrypted:
        return Document(pdfs[0].data, pages, names)  # send the sender's bytes untouched
    writer = PdfWriter()
    for reader, _ in readers:
        writer.append(reader)
    out = io.BytesIO()
    writer.write(out)
    return Document(out.getvalue(), pages, names)
