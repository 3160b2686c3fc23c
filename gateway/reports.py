"""Report mail to the sender: what happened to the fax, in plain words first, details after.

Pure: builds an EmailMessage from a job, its message and its history. Text that came in by mail
(subject, names) only ever goes through `sanitize_header_text` into headers, so it cannot inject
headers; the body is plain text.
"""

from __future__ import annotations

import time
from email import policy
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from datetime import datetime, timezone
from typing import Sequence

from .jobs import Job, State
from .mime import sanitize_header_text
from .phone import format_number
from .store import Attempt, Event, Message

STATUS_WORDS: dict[str, str] = {
    "delivered": "delivered",
    "received": "delivered",
    "busy": "not delivered: the line was busy",
    "no-answer": "not delivered: no answer",
    "failed": "not delivered: the transmission failed",
    "canceled": "not delivered: the fax was canceled",
}

# Advice keyed by fragments of the T.30 result texts SignalWire passes through (spandsp wording).
ADVICE: tuple[tuple[str, str], ...] = (
    ("dropped prematurely", "The call ended early. This often means the number is a voice line "
                            "or the fax machine hung up; check the number."),
    ("cannot receive at the resolution", "The receiving machine cannot take this resolution; "
                                         "send again with [standard] in the subject."),
    ("timed out waiting for initial", "No fax machine answered; check that the number is a fax "
                                      "number and that the machine is on."),
    ("no answer", "Nobody answered; the fax machine may be off or out of paper."),
)


def _advice(job: Job) -> str | None:
    text = (job.error_message or "").lower()
    for fragment, advice in ADVICE:
        if fragment in text:
            return advice
    if job.fax_status == "busy":
        return "The line was busy; try again later."
    if job.fax_status == "no-answer":
        return "Nobody answered; check the number and that the fax machine is on."
    return None


def outcome(job: Job) -> tuple[bool, str]:
    """(delivered?, the outcome in a few words) for the subject line and the first sentence."""
    if job.state is State.FAILED or (job.state is State.REPORTED and job.failure_reason):
        return False, "not sent: " + (job.failure_reason or "the gateway gave up")
    status = job.fax_status or "unknown"
    return status in ("delivered", "received"), STATUS_WORDS.get(status, f"status {status}")


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def subject_line(job: Job) -> str:
    ok, words = outcome(job)
    number = format_number(job.to_number)
    if ok:
        pages = job.pages_sent or job.pages or 0
        return f"Fax to {number} delivered, {pages} page{'s' if pages != 1 else ''}"
    tries = f" after {job.attempt} attempts" if job.attempt > 1 else ""
    return sanitize_header_text(f"Fax to {number} {words}{tries}", 200)


def build_report(job: Job, message: Message, events: Sequence[Event],
                 attempts: Sequence[Attempt] = (), *, from_addr: str, hostname: str,
                 now: float | None = None) -> EmailMessage:
    now = time.time() if now is None else now
    ok, words = outcome(job)
    number = format_number(job.to_number)
    pages = job.pages_sent if ok and job.pages_sent else job.pages
    lines = [
        f"Your fax to {number} was {words}.",
        "",
    ]
    advice = _advice(job)
    if advice and not ok:
        lines += [advice, ""]
    lines += [
        "Details",
        f"  Destination:   {number}",
        f"  Subject:       {sanitize_header_text(message.subject or '(none)', 200)}",
        f"  Documents:     {sanitize_header_text(message.filenames or '-', 300)}",
        f"  Pages:         {pages if pages is not None else '-'}",
        f"  Status:        {job.fax_status or job.state.value}",
    ]
    if job.duration_s is not None:
        lines.append(f"  Duration:      {job.duration_s} s")
    if job.error_message or job.error_code:
        lines.append(f"  Error:         {sanitize_header_text(job.error_message or '-', 300)}"
                     + (f" (code {job.error_code})" if job.error_code else ""))
    lines += [
        f"  Attempts:      {job.attempt}",
        *[f"    {a.n}. {_when(a.started_at)}  {a.quality:<9}  {_attempt_result(a)}"
          for a in attempts],
        f"  Fax id:        {job.fax_sid or '-'}",
        f"  Job id:        {job.id}",
        f"  Received:      {_when(message.created_at)}",
        f"  Finished:      {_when(job.updated_at)}",
        "",
        "History",
    ]
    lines += [f"  {_when(e.at)}  {e.kind}: {sanitize_header_text(e.detail or '', 300)}"
              for e in events]
    lines += ["", "-- ", "faxgw email-to-fax gateway"]

    # Headers unfolded up to RFC 5322's hard limit: Python folds a long Subject before its
    # first word, which clients show as a leading space.
    report = EmailMessage(policy=policy.default.clone(max_line_length=998))
    report["From"] = from_addr
    report["To"] = message.report_to or ""
    report["Subject"] = subject_line(job)
    report["Date"] = format_datetime(datetime.fromtimestamp(now, timezone.utc))
    # Stable id: a report re-sent after a crash is recognisably the same report.
    report["Message-ID"] = f"<faxgw-report.{job.id}@{hostname}>" if hostname else make_msgid()
    report["Auto-Submitted"] = "auto-replied"  # RFC 3834: auto-responders must not answer it
    report["X-Faxgw-Job"] = job.id
    report["X-Faxgw-Status"] = job.fax_status or job.state.value
    original = message.message_id_header
    if original and _is_msgid(original):
        report["In-Reply-To"] = original
        refs = [r for r in (message.references_header or "").split() if _is_msgid(r)][-10:]
        report["References"] = " ".join([*refs, original])
    report.set_content("\n".join(lines) + "\n")
    return report


def _attempt_result(attempt: Attempt) -> str:
    if attempt.status is None:
        return "no result yet"
    text = STATUS_WORDS.get(attempt.status, attempt.status)
    if attempt.error_message:
        text += f" ({sanitize_header_text(attempt.error_message, 200)})"
    return text


def _is_msgid(value: str) -> bool:
    return (value.startswith("<") and value.endswith(">") and len(value) <= 250
            and not any(c.isspace() for c in value))
