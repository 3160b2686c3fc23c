"""Report mail to the sender: what happened to the fax, in plain words first, details after.

Pure: builds an EmailMessage (text + HTML, an inline thumbnail of the first page, optionally the
sent PDF) from a job, its message, attempts and history. The layout lives in template files
(jinja2, gateway/mail/templates/, each overridable by a file of the same name in
REPORT_TEMPLATE_DIR; see templating.py); the phrases go through gettext, so both can be
translated. Text that came in by mail reaches headers only through `gateway.sanitise.one_line` and
the HTML only through the HTML templates' autoescaping.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage, MIMEPart
from email.utils import make_msgid
from pathlib import Path
from typing import Any

import jinja2

from gateway.constants import REPORT_HEADER
from gateway.jobs.outbound_states import Job, State
from gateway.mail.headers import reply_headers
from gateway.mail.outgoing import MAIL_POLICY, Rendered, render
from gateway.mail.phrases import _
from gateway.mail.report_mime import ReportContent, write_report
from gateway.phone import format_number
from gateway.sanitise import one_line
from gateway.signalwire import errors
from gateway.store.rows import Attempt, Event, Message
from gateway.templating import environment

STATUS_WORDS: dict[str, str] = {
    "delivered": _("delivered"),
    "received": _("delivered"),
    "busy": _("not delivered: the line was busy"),
    "no-answer": _("not delivered: no answer"),
    "failed": _("not delivered: the transmission failed"),
    "canceled": _("not delivered: the fax was canceled"),
}

# Advice keyed by fragments of the T.30 result texts SignalWire passes through (spandsp wording).
ADVICE: tuple[tuple[str, str], ...] = (
    (errors.DROPPED_TROUBLE, _("The call ended early. This often means the number is a voice "
                              "line or the fax machine hung up; check the number.")),
    (errors.RESOLUTION_TROUBLE, _("The receiving machine cannot take this "
                                           "resolution; send again with [standard] in the "
                                           "subject.")),
    (errors.NO_FAX_ANSWERED, _("No fax machine answered; check that the number is a "
                                        "fax number and that the machine is on.")),
    ("no answer", _("Nobody answered; the fax machine may be off or out of paper.")),
)


@dataclass(frozen=True)
class Templates:
    """Template files: the operator's folder first, then the packaged defaults."""

    folder: Path | None = None

    def get(self, name: str) -> jinja2.Template:
        # Compiled once per process; an operator's edit applies to the next report.
        return environment(self.folder).get_template(name)


def _advice(job: Job) -> str | None:
    text = (job.error_message or "").lower()
    for fragment, advice in ADVICE:
        if fragment in text:
            return advice
    if job.fax_status == "busy":
        return _("The line was busy; try again later.")
    if job.fax_status == "no-answer":
        return _("Nobody answered; check the number and that the fax machine is on.")
    return None


_STATUS_IN_DETAIL = re.compile(r"\bstatus=([a-z-]+)")
_ATTEMPT_IN_DETAIL = re.compile(r"^attempt (\d+)\b")


def history_line(event: Event, message: Message) -> str | None:
    """An event of the job's history as the sender would say it, or None for the gateway's
    own bookkeeping (uploads, lookups, progress, retries of its own steps). The operator's
    `faxgw job` keeps the internal words; a report does not quote them."""
    kind, detail = event.kind, event.detail or ""
    if kind == "received":
        if detail.startswith("resend of job"):
            return _("sent again at the operator's request")
        return _("your mail was received (%s)") % _pages(message.pages)
    if kind == "submitting":
        n = _ATTEMPT_IN_DETAIL.match(detail)
        return _("attempt %s: dialing") % n.group(1) if n else _("dialing")
    if kind == "final":
        status = _STATUS_IN_DETAIL.search(detail)
        word = status.group(1) if status else ""
        return STATUS_WORDS.get(word, _("the fax service reported: %s") % (word or "-"))
    if kind == "retry" and _ATTEMPT_IN_DETAIL.match(detail):
        return _("waiting to try again")
    if kind == "given-up":
        return _("not sent: ") + one_line(detail, 300)
    if kind == "canceled":
        return _("canceled by the operator")
    if kind == "cancel":
        return _("canceled by the operator while queued at the fax service")
    if kind == "reported":
        return _("report sent")
    if kind == "report-again":
        return _("report sent again at the operator's request")
    if kind == "resent":
        return _("sent again as a new fax at the operator's request")
    return None


def _status_words(job: Job) -> str:
    """The report's Status line: what became of the fax, not the last line's signal of an
    earlier attempt (a canceled fax that had been busy once is canceled, not busy)."""
    if job.failure_reason:
        return _("canceled") if job.fax_status == "canceled" else _("not sent")
    return job.fax_status or job.state.value


def outcome(job: Job) -> tuple[bool, str]:
    """(delivered?, the outcome in a few words) for the subject line and the first sentence."""
    if job.state is State.GIVEN_UP or (job.state is State.REPORTED and job.failure_reason):
        return False, _("not sent: ") + (job.failure_reason or _("the gateway gave up"))
    status = job.fax_status or "unknown"
    return status in ("delivered", "received"), STATUS_WORDS.get(status, f"status {status}")


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _pages(n: int | None) -> str:
    if n is None:
        return "-"
    return _("1 page") if n == 1 else _("%d pages") % n


def subject_line(job: Job, number: str | None = None) -> str:
    """`number`: the destination as format_number wrote it, when the caller has it."""
    ok, words = outcome(job)
    number = number or format_number(job.to_number)
    if ok:
        return _("Fax to %s delivered, %s") % (number, _pages(job.pages_sent or job.pages or 0))
    tries = _(" after %d attempts") % job.attempt if job.attempt > 1 else ""
    return one_line(_("Fax to %s %s%s") % (number, words, tries), 200)


def _attempt_result(attempt: Attempt) -> str:
    if attempt.status is None:
        return _("no result yet")
    text = STATUS_WORDS.get(attempt.status, attempt.status)
    if attempt.error_message:
        text += f" ({one_line(attempt.error_message, 200)})"
    return text


def _new_message(from_addr: str, to: str, subject: str, now: float, msgid: str,
                 original: Message) -> EmailMessage:
    mail = EmailMessage(policy=MAIL_POLICY)  # headers unfolded up to 998 characters
    for name, value in reply_headers(from_addr, to, subject, now, msgid, original):
        mail[name] = value
    return mail


def report_msgid(job: Job, from_addr: str, hostname: str) -> str:
    """The report's Message-ID: the job's and the report's number (`Job.report_n`), at the
    domain of NOTIFY_FROM, which every node of a cluster shares (not the node's own name). A
    report mailed again after a crash between the relay's 250 and the record of it, by this
    node or another, carries the same one, so mail clients show one message."""
    domain = from_addr.rpartition("@")[2].strip("<> ") or hostname or "faxgw.invalid"
    number = f".{job.report_n}" if job.report_n else ""
    return f"<faxgw-report.{job.id}{number}@{domain}>"


def report_content(job: Job, message: Message, events: Sequence[Event],
                   attempts: Sequence[Attempt] = (), *, from_addr: str, hostname: str,
                   now: float | None = None, templates: Templates = Templates(),
                   thumbnail_png: bytes | None = None,
                   pdf: bytes | None = None) -> ReportContent:
    now = time.time() if now is None else now
    ok, words = outcome(job)
    number = format_number(job.to_number)
    # Advice about the line only when the line was the trouble: not for a fax the gateway gave
    # up or the operator canceled.
    advice = _advice(job) if not ok and not job.failure_reason else None
    if ok and message.notes and "could not be printed" in message.notes:
        # Delivered, but not all of it legibly: say so up front, not only under "Not faxed".
        advice = _("Some characters of your text could not be printed and were faxed as '?' "
                   "(see \"Not faxed\" below).")
    values = {
        "headline": _("Your fax to %s was %s.") % (number, words),
        "destination": number,
        "subject": one_line(message.subject or _("(none)"), 200),
        "documents": one_line(message.filenames or "-", 300),
        "not_faxed": one_line(message.notes or "-", 600),
        "pages": _pages(job.pages_sent if ok and job.pages_sent else job.pages),
        "status": _status_words(job),
        "duration": f"{job.duration_s} s" if job.duration_s is not None else "-",
        "error": (one_line(job.error_message or "", 300)
                  + (f" (code {job.error_code})" if job.error_code else "")) or "-",
        "attempt_count": str(job.attempt),
        "fax_id": job.fax_sid or "-",
        "job_id": job.id,
        "received": _when(message.created_at),
        "finished": _when(job.updated_at),
        "history": "\n".join(f"  {_when(e.at)}  {line}" for e in events
                             if (line := history_line(e, message)) is not None),
    }
    rows: list[dict[str, Any]] = [
        {"n": a.n, "started": _when(a.started_at), "quality": a.quality,
         "result": _attempt_result(a)} for a in attempts]
    text = templates.get("report.txt").render(values, advice=advice, attempts=rows)
    subject = subject_line(job, number)
    headers = reply_headers(from_addr, message.report_to or "", subject, now,
                             report_msgid(job, from_addr, hostname), message)
    headers += [("X-Faxgw-Job", job.id), (REPORT_HEADER, job.id),
                ("X-Faxgw-Status", job.fax_status or job.state.value)]
    thumb_cid = make_msgid(domain=hostname or "faxgw.invalid") if thumbnail_png else None
    page = templates.get("report.html").render(
        values, subject_line=subject, colour="#1a7f37" if ok else "#b42318", advice=advice,
        thumbnail_cid=thumb_cid[1:-1] if thumb_cid else None, thumbnail_alt=_("first page"),
        attempts=rows)
    return ReportContent(headers, text, page, thumbnail_png, thumb_cid, pdf,
                         f"fax-{job.id}.pdf")


def build_report(job: Job, message: Message, events: Sequence[Event],
                 attempts: Sequence[Attempt] = (), *, from_addr: str, hostname: str,
                 now: float | None = None, templates: Templates = Templates(),
                 thumbnail_png: bytes | None = None, pdf: bytes | None = None) -> EmailMessage:
    return report_message(report_content(job, message, events, attempts, from_addr=from_addr,
                                         hostname=hostname, now=now, templates=templates,
                                         thumbnail_png=thumbnail_png, pdf=pdf))


def report_message(content: ReportContent) -> EmailMessage:
    """The report as an EmailMessage (tests, and any report report_mime.py does not write)."""
    report = EmailMessage(policy=MAIL_POLICY)
    for name, value in content.headers:
        report[name] = value
    _fill_report(report, content)
    return report


def _fill_report(report: MIMEPart, content: ReportContent) -> None:
    """The report's body (text, HTML, first-page picture, PDF) in `report`: the whole mail,
    or the part people read of a DSN (gateway/mail/dsn.py)."""
    report.set_content(content.text)
    report.add_alternative(content.html, subtype="html")
    if content.thumbnail_png and content.thumbnail_cid:
        html_part = list(report.iter_parts())[-1]
        html_part.add_related(content.thumbnail_png, maintype="image", subtype="png",
                              disposition="inline", cid=content.thumbnail_cid,
                              filename="first-page.png")
    if content.pdf is not None:
        report.add_attachment(content.pdf, maintype="application", subtype="pdf",
                              filename=content.pdf_name)


def render_final_report(job: Job, message: Message, events: Sequence[Event],
                        attempts: Sequence[Attempt], *, from_addr: str, hostname: str, now: float,
                        template_dir: Path | None, thumbnail: bool, attach_pdf: bool,
                        bcc: Sequence[str], fax_domain: str = "") -> Rendered:
    """The whole report, thumbnail and serialisation included: CPU work that runs in a
    document worker process, off the event loop. A report goes out without its thumbnail or
    PDF rather than not at all. A recipient that asked for DSNs (NOTIFY) gets it inside a
    multipart/report (gateway/mail/dsn.py)."""
    pdf: bytes | None = None
    document = Path(message.document_path)
    if attach_pdf:
        try:
            pdf = document.read_bytes()
        except OSError:
            pdf = None
    thumb = None
    if thumbnail and (pdf is not None or (not attach_pdf and document.is_file())):
        from gateway.documents.convert import ConvertError
        from gateway.documents.thumbnails import first_page_png

        try:  # from the file when it is not attached: PDFium reads only page 1
            thumb = first_page_png(pdf if pdf is not None else document, 300)
        except ConvertError:
            thumb = None
    content = report_content(job, message, events, attempts, from_addr=from_addr,
                             hostname=hostname, now=now, templates=Templates(template_dir),
                             thumbnail_png=thumb, pdf=pdf if attach_pdf else None)
    if job.dsn_notify is not None:
        from gateway.mail.dsn import dsn_recipient, dsn_report  # it builds on this module

        human = MIMEPart(policy=MAIL_POLICY)
        _fill_report(human, content)
        to = dsn_recipient(message, fax_domain) or ""  # MAIL FROM, not the From: header
        headers = [(name, to if name == "To" else value) for name, value in content.headers]
        return render(dsn_report(headers, human, job, message, hostname=hostname,
                                 fax_domain=fax_domain, delivered=outcome(job)[0]), bcc)
    data = write_report(content)  # straight to bytes: the email package cost ~8 ms a report
    if data is None:  # what only the email package does (an address that is not ASCII)
        return render(report_message(content), bcc)
    return Rendered(data, (message.report_to or "", *bcc))


def build_receipt(job: Job, message: Message, *, from_addr: str, hostname: str, now: float,
                  templates: Templates = Templates()) -> EmailMessage:
    """The optional "accepted" receipt sent at intake (REPORT_ACCEPTED)."""
    number = format_number(job.to_number)
    subject = _("Fax to %s accepted, %s") % (number, _pages(job.pages))
    receipt = _new_message(from_addr, message.report_to or "", subject, now,
                           f"<faxgw-accepted.{job.id}@{hostname}>" if hostname else make_msgid(),
                           message)
    receipt["X-Faxgw-Job"] = job.id
    receipt[REPORT_HEADER] = job.id
    receipt.set_content(templates.get("accepted.txt").render(
        destination=number, pages=_pages(job.pages), job_id=job.id))
    return receipt


def build_refusal(*, to: str, numbers: Sequence[str], reason: str, subject: str,
                  original_msgid: str | None, from_addr: str, hostname: str, now: float,
                  templates: Templates = Templates()) -> EmailMessage:
    """Why a mail could not be faxed, for an authorised sender (e.g. the person at a scanner,
    who never sees the SMTP reply)."""
    destinations = ", ".join(format_number(n) for n in numbers)
    original = Message(id="", created_at=now, envelope_from=None, header_from=None,
                       report_to=to, subject=subject, message_id_header=original_msgid,
                       references_header=None, peer=None, document_path="", document_bytes=0,
                       document_sha256="", pages=0, filenames=None)
    refusal = _new_message(from_addr, to, one_line(
        _("Fax to %s not sent: %s") % (destinations, reason), 200), now,
        make_msgid(domain=hostname or None), original)
    refusal[REPORT_HEADER] = "refusal"
    refusal.set_content(templates.get("refused.txt").render(
        destinations=destinations, reason=reason, subject=subject or _("(none)")))
    return refusal
