"""Delivery status notifications (RFC 3461/3464) for recipients that asked with NOTIFY.

Pure: builds the `multipart/report; report-type=delivery-status` an ERP (SAP's SMTP fax, for
one) reads to mark a fax sent or failed by itself: first the report people read (the usual
text, HTML and first-page picture), then `message/delivery-status`, then what RET asked for of
the original mail (its headers, or the whole mail when it was kept). Built with the email
package's public API (EmailMessage, MIMEPart); mail without NOTIFY keeps the usual report.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from email import message_from_string
from email import policy as email_policy
from email.message import EmailMessage, MIMEPart
from email.utils import format_datetime
from typing import cast

from gateway.constants import REPORT_HEADER
from gateway.jobs.outbound_states import Job
from gateway.mail.dsn_values import wants, xtext_encode
from gateway.mail.headers import reply_headers
from gateway.mail.loop_guard import in_domain
from gateway.mail.outgoing import MAIL_POLICY
from gateway.mail.phrases import _
from gateway.phone import format_number
from gateway.sanitise import one_line
from gateway.signalwire import errors
from gateway.store.rows import Message

__all__ = ["asked", "delay_notice", "delivery_status", "dsn_recipient", "dsn_report",
           "report_recipient", "status_of"]


def dsn_recipient(message: Message, fax_domain: str) -> str | None:
    """Where a DSN goes: the envelope return path, MAIL FROM (RFC 3461 6.2, RFC 3464 2), never
    the From: header, which the sender writes freely (with RET=FULL a DSN to it would carry up
    to a MiB of the sender's own mail to any address). None for the null sender <> and for an
    address in the fax domain (the DSN would be faxed)."""
    addr = (message.envelope_from or "").strip().removeprefix("<").removesuffix(">").strip()
    if "@" not in addr or any(c in addr for c in "\r\n<>,; \t"):
        return None
    if fax_domain and in_domain(addr, fax_domain):
        return None
    return addr


def report_recipient(job: Job, message: Message, fax_domain: str) -> str | None:
    """Who gets the job's report: a recipient that asked for DSNs (NOTIFY) gets one at the
    envelope sender; the usual report goes where intake decided (From:, else MAIL FROM)."""
    if job.dsn_notify is None:
        return message.report_to
    return dsn_recipient(message, fax_domain)


def asked(job: Job, delivered: bool) -> bool:
    """Whether this recipient's NOTIFY asks for a report of this outcome (no NOTIFY: the usual
    report, always)."""
    if job.dsn_notify is None:
        return True
    return wants(job.dsn_notify, "SUCCESS" if delivered else "FAILURE")


def status_of(job: Job, delivered: bool, delayed: bool = False) -> tuple[str, str, str | None]:
    """(Action, Status, Diagnostic-Code) for the job's outcome (RFC 3464 2.3, RFC 3463 codes).

    Delivered is 2.0.0. A fax that cannot ever go (a number or document SignalWire refuses)
    is 5.x.x; busy, no answer and line trouble are 4.4.x, also when the gateway stopped
    retrying them. The diagnostic carries SignalWire's error code and message."""
    if delivered:
        return "delivered", "2.0.0", None
    code, text = job.error_code, job.error_message
    status = job.fax_status
    if code in (str(errors.BAD_TO), str(errors.BAD_TO_2)):
        smtp_status = "5.1.1"      # bad destination
    elif code in (str(errors.FROM_NOT_OWNED), str(errors.BAD_FROM),
                  str(errors.FROM_CANNOT_FAX)):
        smtp_status = "5.7.1"      # not allowed from this caller number
    elif errors.never_retry(code):
        smtp_status = "5.6.0"      # the document cannot be faxed
    elif status in ("busy", "no-answer"):
        smtp_status = "4.4.1"      # no answer from the far end
    elif status == "failed":
        smtp_status = "4.4.2"      # the transmission broke off
    elif status == "canceled":
        smtp_status = "5.0.0"
    else:
        smtp_status = "4.4.7"      # the gateway gave up (time, outage)
    detail = " ".join(p for p in (code, text) if p) or status or job.failure_reason or ""
    if job.failure_reason and job.failure_reason not in detail:
        detail = f"{detail}; {job.failure_reason}" if detail else job.failure_reason
    diagnostic = f"X-SignalWire; {one_line(detail, 400, ascii_only=True)}" if detail else None
    return ("delayed" if delayed else "failed"), smtp_status, diagnostic


def _date(ts: float) -> str:
    return format_datetime(datetime.fromtimestamp(ts, UTC))


def delivery_status(job: Job, message: Message, *, hostname: str, fax_domain: str,
                    delivered: bool, delayed: bool = False,
                    retry_until: float | None = None) -> MIMEPart:
    """The `message/delivery-status` part: the per-message fields, then this recipient's."""
    per_message = EmailMessage(policy=MAIL_POLICY)
    per_message["Reporting-MTA"] = f"dns; {hostname or 'faxgw.invalid'}"
    if message.dsn_envid:
        per_message["Original-Envelope-Id"] = xtext_encode(message.dsn_envid)
    per_message["Arrival-Date"] = _date(message.created_at)
    recipient = EmailMessage(policy=MAIL_POLICY)
    if job.dsn_orcpt:
        addr_type, _sep, address = job.dsn_orcpt.partition(";")
        recipient["Original-Recipient"] = f"{addr_type}; {xtext_encode(address)}"
    recipient["Final-Recipient"] = f"rfc822; {job.to_number}@{fax_domain or 'fax.invalid'}"
    action, status, diagnostic = status_of(job, delivered, delayed)
    recipient["Action"] = action
    recipient["Status"] = status
    if diagnostic:
        recipient["Diagnostic-Code"] = diagnostic
    recipient["Last-Attempt-Date"] = _date(job.updated_at)
    if delayed and retry_until is not None:
        recipient["Will-Retry-Until"] = _date(retry_until)
    part = MIMEPart(policy=MAIL_POLICY)
    part["Content-Type"] = "message/delivery-status"
    part.set_payload([per_message, recipient])
    return part


def _returned(message: Message) -> MIMEPart | None:
    """RET=FULL: the original mail when it was kept (within its bound); otherwise, and for
    RET=HDRS or no RET, its header block."""
    part = MIMEPart(policy=MAIL_POLICY)
    if message.dsn_ret == "FULL" and message.dsn_full:
        part.set_content(message_from_string(message.dsn_full, policy=email_policy.compat32))
        return part
    if message.dsn_headers:
        part.set_content(message.dsn_headers, subtype="rfc822-headers")
        return part
    return None


def dsn_report(headers: Sequence[tuple[str, str]], human: MIMEPart, job: Job,
               message: Message, *, hostname: str, fax_domain: str, delivered: bool,
               delayed: bool = False, retry_until: float | None = None) -> EmailMessage:
    """The whole `multipart/report` (RFC 6522): `headers` as the usual report's, `human` the
    report people read."""
    report = EmailMessage(policy=MAIL_POLICY)
    for name, value in headers:
        report[name] = value
    report["MIME-Version"] = "1.0"
    report.add_header("Content-Type", "multipart/report", report_type="delivery-status")
    # typeshed's MIMEPart.attach takes only the report's own class (EmailMessage); the stdlib
    # attaches any part, and these stay MIMEParts (no MIME-Version header of their own).
    report.attach(cast(EmailMessage, human))
    report.attach(cast(EmailMessage, delivery_status(
        job, message, hostname=hostname, fax_domain=fax_domain, delivered=delivered,
        delayed=delayed, retry_until=retry_until)))
    if (returned := _returned(message)) is not None:
        report.attach(cast(EmailMessage, returned))
    return report


def delay_notice(job: Job, message: Message, *, from_addr: str, hostname: str,
                 fax_domain: str, now: float, retry_at: float, why: str,
                 retry_until: float | None) -> EmailMessage:
    """NOTIFY=DELAY: the fax was put back for another attempt (busy, no answer, line trouble).

    Its Message-ID names the job and the attempt: one notice per retry, recognisably the
    same if it ever went twice."""
    number = format_number(job.to_number)
    subject = one_line(_("Fax to %s delayed: %s; trying again") % (number, why), 200)
    headers = reply_headers(from_addr, dsn_recipient(message, fax_domain) or "", subject, now,
                             f"<faxgw-delay.{job.id}.{job.attempt}@{hostname or 'faxgw.invalid'}>",
                             message)
    headers += [("X-Faxgw-Job", job.id), (REPORT_HEADER, job.id),
                ("X-Faxgw-Status", "delayed")]
    human = MIMEPart(policy=MAIL_POLICY)
    human.set_content(_(
        "Your fax to %(number)s has not been sent yet: attempt %(attempt)d was not delivered "
        "(%(why)s).\n"
        "The gateway tries again at %(when)s. You will get a report when the fax is sent or "
        "the gateway gives up.\n\nJob: %(job)s\n") % {
            "number": number, "attempt": job.attempt, "why": why, "job": job.id,
            "when": datetime.fromtimestamp(retry_at, UTC).strftime(
                "%Y-%m-%d %H:%M:%S UTC")})
    return dsn_report(headers, human, job, message, hostname=hostname, fax_domain=fax_domain,
                      delivered=False, delayed=True, retry_until=retry_until)
