"""Turn whatever a mail carries into the one fax-ready PDF SignalWire takes.

Pure and CPU-bound: intake runs `prepare` in a child process with time and memory limits
(cpu.py). Documents are merged in the order they appear: PDFs normalised (fitted, portrait,
forms flattened), images one per page, text attachments and bodies as pages, office files via
LibreOffice when installed; an optional cover page goes first.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import replace
from email.message import Message
from typing import Any

from gateway.documents.convert import (
    ConvertError,
    Limits,
    cover_page,
    image_to_pdf,
    merge_pdfs,
    normalize_pdf,
    text_to_pdf,
)
from gateway.documents.mime import ParsedMail, Part, parse_mail, read_message_file
from gateway.documents.model import DocOptions, Document, DocumentError, MessageOptions, Prepared
from gateway.documents.office import office_to_pdf
from gateway.sanitise import one_line

__all__ = ["DocOptions", "Document", "DocumentError", "MessageOptions", "Prepared", "prepare",
           "build_document", "message_options", "is_boilerplate"]

log = logging.getLogger(__name__)

IMAGE_KINDS = frozenset({"tiff", "jpeg", "png", "gif"})
OFFICE_EXTENSIONS = (".docx", ".doc", ".odt", ".rtf", ".xlsx", ".xls", ".ods", ".pptx", ".ppt",
                     ".odp")
BODY_POLICIES = ("auto", "always", "never")
# Inline images smaller than this are signature logos and icons, not documents.
MIN_INLINE_IMAGE_BYTES = 20_000

# What scanners and copiers put in the body: never worth a page of its own.
_BOILERPLATE = re.compile(
    r"(please open the attached|was scanned and sent|scanned (image|document|file)|"
    r"scan to e-?mail|sent from (my|a|the) (xerox|ricoh|canon|sharp|kyocera|brother|konica|"
    r"hp|lexmark|epson|toshiba|samsung|device|scanner|printer|multifunction)|"
    r"device name|device model|number of images|attachment file type|"
    r"this e-?mail was sent from|scanned from|image data has been attached|"
    r"document was scanned)", re.IGNORECASE)


_TAG = re.compile(r"\[\s*(standard|fine|superfine|cover|nocover|body|nobody)\s*\]", re.I)


def message_options(msg: Message, subject: str, defaults: DocOptions) -> MessageOptions:
    """Options a sender may set per message; headers win over subject tags.

    Subject tags: [standard] [fine] [superfine] [cover] [nocover] [body] [nobody].
    Headers: X-Fax-Quality, X-Fax-Cover (yes/no), X-Fax-Body (auto/always/never).
    """
    quality, cover, body = defaults.quality, defaults.cover, defaults.body
    for tag in _TAG.findall(subject):
        tag = tag.lower()
        if tag in ("standard", "fine", "superfine"):
            quality = tag
        elif tag in ("cover", "nocover"):
            cover = tag == "cover"
        else:
            body = "always" if tag == "body" else "never"
    header_quality = str(msg.get("X-Fax-Quality", "")).strip().lower()
    if header_quality in ("standard", "fine", "superfine"):
        quality = header_quality
    header_cover = str(msg.get("X-Fax-Cover", "")).strip().lower()
    if header_cover in ("yes", "no", "true", "false", "1", "0", "on", "off"):
        cover = header_cover in ("yes", "true", "1", "on")
    header_body = str(msg.get("X-Fax-Body", "")).strip().lower()
    if header_body in BODY_POLICIES:
        body = header_body
    clean = " ".join(_TAG.sub(" ", subject).split())
    return MessageOptions(quality=quality, cover=cover, body=body, subject=clean)


def is_boilerplate(text: str | None) -> bool:
    """True for an empty body, a signature only, or the canned text of a scanner."""
    if not text:
        return True
    body = text.split("\n-- \n", 1)[0]  # drop the signature
    words = re.findall(r"\w+", body)
    if len(words) < 3:
        return True
    return bool(_BOILERPLATE.search(body)) and len(words) < 120


def _label(part: Part) -> str:
    name = part.filename or f"attachment {part.index} ({part.content_type})"
    return "".join(c if c.isprintable() else "?" for c in name)[:80]


def _is_office(part: Part) -> bool:
    name = (part.filename or "").lower()
    if name.endswith(OFFICE_EXTENSIONS):
        return True
    return part.kind == "zip" and (b"[Content_Types].xml" in part.data[:4096]
                                   or b"mimetypeapplication/vnd.oasis" in part.data[:4096])


def _faxable(part: Part) -> bool:
    if part.kind in IMAGE_KINDS and part.inline and len(part.data) < MIN_INLINE_IMAGE_BYTES:
        return False  # a logo in an HTML signature
    return part.kind in ("pdf", "text", *IMAGE_KINDS) or (
        part.kind in ("zip", "ole") and _is_office(part))


def _convert(part: Part, opts: DocOptions, limits: Limits) -> tuple[bytes, int]:
    label = _label(part)
    if part.kind == "pdf":
        return normalize_pdf(part.data, label, opts.paper, limits)
    if part.kind in IMAGE_KINDS:
        return image_to_pdf(part.data, label, opts.paper, limits)
    if part.kind == "text":
        return text_to_pdf(part.data.decode("utf-8", "replace"), opts.paper, limits, title=label)
    pdf = office_to_pdf(part.data, label, opts.office_timeout_s)
    return normalize_pdf(pdf, label, opts.paper, limits)


def build_document(parsed: ParsedMail, opts: DocOptions, msg_opts: MessageOptions, *,
                   recipients: Sequence[str], sender: str, date: str) -> Document:
    """Every faxable part in order, the body where the policy says, a cover if asked for.

    Every conversion error becomes a DocumentError (a 554 and a refusal mail), whichever part
    it came from: the mail's own text as much as an attachment.
    """
    try:
        return _build(parsed, opts, msg_opts, recipients=recipients, sender=sender, date=date)
    except ConvertError as exc:
        raise DocumentError(str(exc)) from exc


def _undrawable_note(texts: list[str]) -> str | None:
    """The report line for characters no shipped font can draw (faxed as '?')."""
    if not texts:
        return None  # nothing typeset (PDFs and images only): fonts.py is not even imported
    from gateway.documents import fonts

    missing: dict[str, None] = {}
    for text in texts:
        missing.update(dict.fromkeys(fonts.undrawable(text)))
    if not missing:
        return None
    shown = " ".join(f"{c} (U+{ord(c):04X})" for c in list(missing)[:10])
    more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
    return (f"{len(missing)} character(s) could not be printed and were faxed as '?': "
            f"{shown}{more}")


def _build(parsed: ParsedMail, opts: DocOptions, msg_opts: MessageOptions, *,
           recipients: Sequence[str], sender: str, date: str) -> Document:
    limits = Limits(max_pages=opts.max_pages, max_image_pixels=opts.max_image_pixels)
    documents = [p for p in parsed.parts if _faxable(p)]
    notes = list(parsed.notes)
    for part in parsed.parts:
        if not part.data:
            continue  # mime.py has noted it as empty; "not a document we can fax" would contradict
        if not _faxable(part) and not (part.inline and part.kind in IMAGE_KINDS):
            if part.kind == "tnef":
                notes.append(f"{_label(part)} is an Outlook winmail.dat; ask the sender's mail "
                             "program to send attachments as normal files")
            elif part.kind in ("zip", "ole"):
                notes.append(f"{_label(part)} is not a document this gateway can fax")
            else:
                notes.append(f"{_label(part)} ({part.content_type}) is not a document this "
                             "gateway can fax; skipped")
    skipped = [p for p in parsed.parts if not p.inline and not _faxable(p)]
    # auto: the body is the fax only when the mail carried nothing else. A covering note beside
    # an attachment we cannot read (winmail.dat, a zip) must not pass for the document.
    use_body = msg_opts.body == "always" or (
        msg_opts.body == "auto" and not documents and not skipped
        and not is_boilerplate(parsed.text_body))
    pdfs: list[bytes] = []
    names: list[str] = []
    drawn: list[str] = []  # text typeset by us, checked for characters no font has
    pages = 0
    if use_body and parsed.text_body and parsed.text_body.strip():
        try:
            data, n = text_to_pdf(parsed.text_body, opts.paper, limits,
                                  title=msg_opts.subject or None)
        except ConvertError as exc:  # e.g. a body over the length limit: 554, not a crash
            raise DocumentError(str(exc)) from exc
        pdfs.append(data)
        names.append("message text")
        drawn += [parsed.text_body, msg_opts.subject]
        pages += n
    for part in documents:
        data, n = _convert(part, opts, limits)
        if part.kind == "text":
            drawn.append(part.data.decode("utf-8", "replace"))
        pdfs.append(data)
        names.append(_label(part))
        pages += n
        if pages > opts.max_pages:
            raise DocumentError(f"The document has more than {opts.max_pages} pages; this "
                                f"gateway sends at most {opts.max_pages} pages per fax")
    if not pdfs:
        raise DocumentError(_nothing_to_fax(parsed, notes))
    if msg_opts.cover:
        note = parsed.text_body if (parsed.text_body and not use_body
                                    and not is_boilerplate(parsed.text_body)) else None
        pdfs.insert(0, cover_page(to=", ".join(recipients), sender=sender,
                                  subject=msg_opts.subject, pages=pages + 1, date=date,
                                  note=note[:2000] if note else None, paper=opts.paper))
        drawn += [msg_opts.subject, sender, note[:2000] if note else ""]
        pages += 1
    missing = _undrawable_note(drawn)
    if missing:
        notes.append(missing)
    data = pdfs[0] if len(pdfs) == 1 else merge_pdfs(pdfs)
    return Document(data, pages, tuple(names), tuple(notes))


def _nothing_to_fax(parsed: ParsedMail, notes: list[str]) -> str:
    found = ", ".join(_label(p) for p in parsed.parts if not p.inline)[:200]
    reason = "; ".join(notes)[:300]
    text = "No document to fax found in the message"
    if found:
        text += f" (found: {found})"
    if reason:
        text += f": {reason}"
    return text + "; attach a PDF, TIFF or image, or write the text in the message body"


def _mail_date(msg: Any) -> str:
    try:
        return one_line(str(msg.get("Date", "") or ""), 60)
    except Exception:  # noqa: BLE001 - a malformed header is no date, not a refusal
        return ""


def prepare(path: str, opts: DocOptions, recipients: Sequence[str], envelope_from: str,
            date: str, pdf_path: str | None = None) -> Prepared:
    """The mail as received (a file the SMTP edge wrote as DATA arrived) to parsed mail,
    per-message options and the document. Runs in a child process: it is handed the path, not
    the bytes, so a large scan is neither held by the daemon nor pickled across to the worker.
    With `pdf_path`, the PDF is written there and fsync'ed (a new file) rather than returned."""
    msg = read_message_file(path)
    parsed = parse_mail(msg)
    msg_opts = message_options(msg, parsed.subject, opts)
    # The cover page shows when the sender sent it (the mail's Date:), not when it arrived:
    # the same mail sent again renders the same PDF, which is how a resend is recognised.
    date = _mail_date(msg) or date
    del msg  # the encoded mail; the parts hold what is needed, decoded
    sender = parsed.from_addr or envelope_from or "-"
    document = build_document(parsed, opts, msg_opts, recipients=recipients, sender=sender,
                              date=date)
    # The parts' bytes are in the document now; do not ship them back to the parent process.
    slim = replace(parsed, parts=[replace(p, data=b"") for p in parsed.parts])
    if pdf_path is None:
        return Prepared(slim, msg_opts, document)
    fd = os.open(pdf_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    with os.fdopen(fd, "wb") as fh:
        fh.write(document.data)
        fh.flush()
        os.fsync(fh.fileno())
    return Prepared(slim, msg_opts, replace(document, data=b""), pdf_path=pdf_path,
                    pdf_bytes=len(document.data),
                    pdf_sha256=hashlib.sha256(document.data).hexdigest())
