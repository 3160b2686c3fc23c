"""Mail for a received fax: one message per recipient, the PDF attached, page 1 as a picture.

Pure apart from the first-page rendering, and run in a document worker process
(`render_received`), because the thumbnail and the serialisation of a large PDF are CPU work.
Each recipient's mail has a Message-ID derived from the fax and the address (and NOTIFY_FROM's
domain, not the node's name), so a mail repeated after a crash (relay accepted, commit lost), by
whichever node, is recognisable as the same mail, and an outbox file of the same name is
replaced rather than added.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid, parseaddr

from gateway.mail.outgoing import MAIL_POLICY, Rendered, render
from gateway.mail.phrases import _
from gateway.phone import NumberError, format_number
from gateway.sanitise import one_line
from gateway.store.inbound import InboundFax
from gateway.templating import environment

# T.30 texts that mean a voice call (or a hang-up before any page) on a fax line, not a fax
# that failed: nobody routed is told about these (Kazoo skips results 0 and 49 likewise).
NOISE_FRAGMENTS = ("dropped prematurely", "timed out waiting for initial communication",
                   "no fax tone", "call was hung up", "disconnected before")


def is_noise(status: str | None, error_message: str | None, pages: int | None) -> bool:
    """A failed reception with no page and a "nobody was faxing" message."""
    if status == "received" or (pages or 0) > 0:
        return False
    text = (error_message or "").lower()
    return any(fragment in text for fragment in NOISE_FRAGMENTS) or not text


def _caller(number: str | None) -> str:
    if not number:
        return _("an unknown caller")
    try:
        return format_number(number)
    except NumberError:
        return one_line(number, 60) or _("an unknown caller")


def _pages(n: int | None) -> str:
    if not n:
        return _("no pages")
    return _("1 page") if n == 1 else _("%d pages") % n


def _when(ts: float | None) -> datetime:
    return datetime.fromtimestamp(ts or 0, UTC)


def subject_for(fax: InboundFax) -> str:
    caller = _caller(fax.from_number)
    if fax.fax_status == "received":
        return one_line(_("Fax from %s, %s") % (caller, _pages(fax.num_pages)), 200)
    reason = one_line(fax.error_message or fax.fax_status or "failed", 120)
    return one_line(_("Fax from %s not received: %s") % (caller, reason), 200)


def attachment_name(fax: InboundFax) -> str:
    """`fax-<caller digits>-<YYYYmmdd-HHMMSS>.pdf`: unique enough and meaningful in a folder."""
    digits = "".join(c for c in (fax.from_number or "") if c.isdigit())[:15] or "unknown"
    return f"fax-{digits}-{_when(fax.completed_at).strftime('%Y%m%d-%H%M%S')}.pdf"


def id_domain(from_addr: str) -> str:
    """The right side of a received fax's Message-ID: NOTIFY_FROM's domain, which every gateway
    sharing a database has alike, never a node's own name (SMTP_HOSTNAME defaults to the host's),
    so the mail a node that took the fax over sends again is the same message."""
    domain = parseaddr(from_addr)[1].rpartition("@")[2].lower()
    domain = "".join(c for c in domain if c.isalnum() or c in ".-")[:200]
    return domain or "faxgw.invalid"


def message_id_for(fax_sid: str, recipient: str, hostname: str) -> str:
    tag = hashlib.sha256(f"{fax_sid}\0{recipient.lower()}".encode()).hexdigest()[:16]
    safe_sid = "".join(c for c in fax_sid if c.isalnum() or c == "-")[:64]
    return f"<inbound.{safe_sid}.{tag}@{hostname or 'faxgw.invalid'}>"


def outbox_name(fax_sid: str, recipient: str) -> str:
    tag = hashlib.sha256(f"{fax_sid}\0{recipient.lower()}".encode()).hexdigest()[:12]
    safe_sid = "".join(c for c in fax_sid if c.isalnum() or c == "-")[:64]
    return f"inbound-{safe_sid}-{tag}"


@dataclass(frozen=True)
class MailPart:
    recipient: str
    message_id: str
    outbox_name: str
    rendered: Rendered


def _lines(fax: InboundFax, attached: bool) -> list[tuple[str, str]]:
    rows = [
        (_("From"), _caller(fax.from_number)),
        (_("Station id"), one_line(fax.remote_station_id or "-", 60)),
        (_("Received on"), _caller(fax.to_number)),
        (_("Time"), _when(fax.completed_at).strftime("%Y-%m-%d %H:%M:%S UTC")),
        (_("Pages"), str(fax.num_pages or 0)),
    ]
    if fax.fax_status != "received":
        rows.append((_("Status"), one_line(fax.fax_status or "-", 40)))
        rows.append((_("Error"), one_line(
            f"{fax.error_message or '-'}" + (f" (code {fax.error_code})" if fax.error_code
                                             else ""), 300)))
    rows.append((_("Fax id"), one_line(fax.fax_sid, 80)))
    return rows


def build_received(fax: InboundFax, recipient: str, *, from_addr: str, hostname: str,
                   pdf: bytes | None, thumbnail_png: bytes | None, attach: bool,
                   admin_copy: bool = False) -> EmailMessage:
    mail = EmailMessage(policy=MAIL_POLICY)
    mail["From"] = from_addr
    mail["To"] = recipient
    mail["Subject"] = subject_for(fax)
    mail["Date"] = format_datetime(_when(fax.completed_at))
    mail["Message-ID"] = message_id_for(fax.fax_sid, recipient, id_domain(from_addr))
    mail["Auto-Submitted"] = "auto-generated"
    mail["X-Fax-Sid"] = one_line(fax.fax_sid, 80)
    rows = _lines(fax, attach and pdf is not None)
    if fax.fax_status == "received":
        lead = _("A fax from %s arrived on %s: %s.") % (_caller(fax.from_number),
                                                      _caller(fax.to_number),
                                                      _pages(fax.num_pages))
        if pdf is None or not attach:
            lead += " " + _("The document is not attached (the gateway is set to leave it "
                            "out); ask the administrator for it.")
        else:
            lead += " " + _("The document is attached as %s.") % attachment_name(fax)
    else:
        lead = _("A fax call from %s on %s did not bring a document.") % (
            _caller(fax.from_number), _caller(fax.to_number))
        if admin_copy:
            lead += " " + _("You get this as the gateway's administrator.")
    width = max(len(k) for k, _v in rows) + 2
    text = lead + "\n\n" + "\n".join(f"{k + ':':<{width}}{v}" for k, v in rows) + "\n"
    mail.set_content(text)
    thumb_cid = make_msgid(domain=hostname or "faxgw.invalid") if thumbnail_png else None
    # The packaged template only (REPORT_TEMPLATE_DIR is for the mails to senders), escaped.
    page = environment(None).get_template("received.html").render(
        lead=lead, rows=rows, thumbnail_cid=thumb_cid[1:-1] if thumb_cid else None,
        thumbnail_alt=_("first page"))
    mail.add_alternative(page, subtype="html")
    if thumbnail_png and thumb_cid:
        html_part = list(mail.iter_parts())[1]
        # Shown in the HTML (cid:), so inline: mail programs list an `attachment` part as a
        # second file beside the PDF.
        html_part.add_related(thumbnail_png, maintype="image", subtype="png", cid=thumb_cid,
                              filename="page-1.png", disposition="inline")
    if attach and pdf is not None:
        mail.add_attachment(pdf, maintype="application", subtype="pdf",
                            filename=attachment_name(fax))
    return mail


def render_received(fax: InboundFax, recipients: list[tuple[str, bool]], pdf: bytes | None, *,
                    from_addr: str, hostname: str, attach: bool, thumbnail: bool
                    ) -> list[MailPart]:
    """Every pending recipient's mail, ready for the wire (runs in a document worker).

    `recipients` pairs an address with whether it gets the mail as the administrator. With
    `attach` off neither the PDF nor its picture goes out (sensitive documents).
    """
    thumb = None
    if pdf is not None and attach and thumbnail:
        from gateway.documents.convert import ConvertError
        from gateway.documents.thumbnails import first_page_png

        try:
            thumb = first_page_png(pdf, 300)
        except ConvertError:
            thumb = None  # a mail without its picture rather than no mail
    parts = []
    for recipient, admin in recipients:
        mail = build_received(fax, recipient, from_addr=from_addr, hostname=hostname, pdf=pdf,
                              thumbnail_png=thumb, attach=attach, admin_copy=admin)
        parts.append(MailPart(recipient, str(mail["Message-ID"]),
                              outbox_name(fax.fax_sid, recipient), render(mail)))
    return parts


def render_given_up(fax: InboundFax, admin: str, reason: str, mailed: list[str], *,
                    from_addr: str, hostname: str) -> MailPart:
    """The administrator's alert for a received fax the gateway gave up on (the relay or
    SignalWire down past GIVE_UP_HOURS, a media URL refused, a document neither PDF nor TIFF):
    without it the fax would be lost with only a log line. Small and cheap: built on the loop.
    Its Message-ID and outbox name are derived from the fax, so a repeat is recognisable."""
    tag = f"given-up\0{admin}"
    mail = EmailMessage(policy=MAIL_POLICY)
    mail["From"] = from_addr
    mail["To"] = admin
    mail["Subject"] = one_line(_("Fax from %s not delivered: %s") % (
        _caller(fax.from_number), one_line(reason, 120)), 200)
    mail["Date"] = format_datetime(datetime.now(UTC))
    mail["Message-ID"] = message_id_for(fax.fax_sid, tag, id_domain(from_addr))
    mail["Auto-Submitted"] = "auto-generated"
    mail["X-Fax-Sid"] = one_line(fax.fax_sid, 80)
    wanted = [r for r in fax.recipient_list]
    missing = [r for r in wanted if r not in mailed]
    rows = _lines(fax, False) + [
        (_("Reason"), one_line(reason, 300)),
        (_("Mailed to"), one_line(", ".join(mailed) or "-", 500)),
        (_("Not mailed to"), one_line(", ".join(missing) or "-", 500)),
    ]
    lead = _("The gateway gave up delivering a fax from %s on %s by mail: %s. Deliver it by "
             "hand: it is in SignalWire's dashboard under this fax id, unless it was deleted "
             "there.") % (_caller(fax.from_number), _caller(fax.to_number), one_line(reason, 300))
    width = max(len(k) for k, _v in rows) + 2
    mail.set_content(lead + "\n\n" + "\n".join(f"{k + ':':<{width}}{v}" for k, v in rows)
                     + "\n")
    return MailPart(admin, str(mail["Message-ID"]), outbox_name(fax.fax_sid, tag), render(mail))


def tiff_to_pdf(data: bytes, paper: str, max_pages: int) -> tuple[bytes | None, int, str]:
    """A received TIFF as a PDF (runs in a document worker): (PDF, pages, ""), or (None, 0,
    why) when it cannot be converted; said in words, so the daemon never imports the
    converter to read its exception."""
    from gateway.documents.convert import ConvertError, Limits, image_to_pdf

    try:
        pdf, pages = image_to_pdf(data, "received fax", paper, Limits(max_pages=max_pages))
    except ConvertError as exc:
        return None, 0, str(exc)
    return pdf, pages, ""
