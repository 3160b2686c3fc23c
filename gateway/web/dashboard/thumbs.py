"""The first-page picture, rendered in a document worker process (called through
`gateway.documents.pool.call`, so the daemon never imports PDFium itself)."""

from __future__ import annotations

from pathlib import Path

THUMB_WIDTH_PX = 360


def render_first_page(path: str, width_px: int = THUMB_WIDTH_PX) -> bytes:
    """A grayscale PNG of page 1 of the PDF at `path`; ConvertError if it cannot be drawn."""
    from gateway.documents.thumbnails import first_page_png

    return first_page_png(Path(path).read_bytes(), width_px)


def render_first_page_of(pdf: bytes, width_px: int = THUMB_WIDTH_PX) -> bytes:
    """The same from the PDF's bytes (a received fax, fetched from SignalWire, is not kept in
    a file)."""
    from gateway.documents.thumbnails import first_page_png

    return first_page_png(pdf, width_px)
