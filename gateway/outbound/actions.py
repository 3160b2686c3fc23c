"""What the operator's commands do: list, find, describe, resend, cancel and re-report faxes.

Functions over a `Store` opened synchronously by the CLI (`open_store(settings).open()`),
safe while the daemon runs: every write is one short transaction through the store's guarded
transition (the table in gateway/jobs/outbound_states.py), conditional on the state it was decided
from, so a worker step running at the same moment either wins cleanly or sees the change and
stops.

The daemon's worker picks up what these functions schedule (`next_run_at = now`) at its next
look at the queue, within 30 s at most.

Errors are `AdminError` with a message in plain words, meant to be printed as is.
"""

from __future__ import annotations

import csv
import io
import json
import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from gateway.jobs.outbound_states import (
    ACTIVE_STATES,
    FINISHED,
    REPORT_DUE,
    Job,
    RetryPolicy,
    State,
    retry_decision,
)
from gateway.mail.dsn import report_recipient
from gateway.mail.reports import outcome
from gateway.media_store import new_media_key
from gateway.phone import NumberError, format_number
from gateway.sanitise import one_line
from gateway.signalwire import errors as sw_errors
from gateway.signalwire.client import SignalWireClient, SignalWireError
from gateway.store.base import Store
from gateway.store.rows import Attempt, Event, JobListing, Message, NewJob, UnderWay

MIN_PREFIX_CHARS = 6
JOB_ID_CHARS = 16
CANCELED_BY_OPERATOR = "canceled by the operator"

_HEX = re.compile(r"[0-9a-f]+")
_FAX_SID = re.compile(r"[0-9A-Za-z][0-9A-Za-z-]{15,63}")
FAX_STATUSES = ("queued", "processing", "sending", "delivered", "received", "busy",
                "no-answer", "failed", "canceled")
# `--status` words: "active", a job state, or a fax status. The state words were chosen so that
# none is also a fax status: `given-up` (the gateway gave up) is not `failed` (the fax failed).
STATUS_FILTERS = ("active", *(s.value for s in State), *FAX_STATUSES)
assert len(set(STATUS_FILTERS)) == len(STATUS_FILTERS), "a state word is also a fax status"


class AdminError(Exception):
    """A command that cannot be done, in plain words for the operator."""


class AlreadyResent(AdminError):
    """A resend asked for while another resend of the same mail to the same number is under
    way (a double click on "Yes, resend", two operators, two nodes): `job_id` is that job."""

    def __init__(self, text: str, job_id: str) -> None:
        super().__init__(text)
        self.job_id = job_id


@dataclass(frozen=True)
class JobRow:
    """One job as `faxgw jobs` shows and exports it."""

    id: str
    created: float
    sender: str                # where the report goes (From:, else the envelope sender)
    destination: str           # E.164
    status: str                # state, and the fax status once there is one
    pages: int | None
    attempts: int
    last_event: str
    last_event_at: float | None
    message_id: str
    state: str
    fax_status: str | None
    result: str                # the outcome in the report's words
    envelope_from: str | None
    header_from: str | None
    peer: str | None
    subject: str | None
    filenames: str | None
    pages_sent: int | None
    error: str | None
    fax_sid: str | None
    reported_at: float | None


@dataclass(frozen=True)
class CancelRequest:
    """What `request_cancel` did. `fax_sid` set: the fax is at SignalWire and only SignalWire
    can stop it (`cancel_fax`, then `note_cancel`); otherwise `text` says what was done."""

    job_id: str
    fax_sid: str | None
    text: str




# -- finding a job ------------------------------------------------------------------------------

def resolve_job_id(store: Store, ref: str) -> str:
    """The job a reference names: a job id, a unique prefix of one (at least 6 characters), or
    the SignalWire fax sid of one of its attempts."""
    text = ref.strip()
    lowered = text.lower()
    if _HEX.fullmatch(lowered) and len(lowered) <= JOB_ID_CHARS:
        if len(lowered) < MIN_PREFIX_CHARS:
            raise AdminError(f"give at least {MIN_PREFIX_CHARS} characters of the job id "
                             f"(got {len(lowered)})")
        ids = store.job_ids_by_prefix(lowered)
        if not ids:
            raise AdminError(f"no job with an id starting with {lowered!r} (jobs are deleted "
                             "JOB_RETENTION_DAYS after their report)")
        if len(ids) > 1:
            shown = ", ".join(ids[:4]) + (", ..." if len(ids) > 4 else "")
            raise AdminError(f"{lowered!r} matches several jobs ({shown}); give more characters")
        return ids[0]
    if _FAX_SID.fullmatch(text):
        ids = store.job_ids_by_fax_sid(text)
        if len(ids) == 1:
            return ids[0]
        if ids:
            raise AdminError(f"fax {text} belongs to several jobs: {', '.join(ids)}")
        raise AdminError(f"no job sent a fax with id {text}")
    raise AdminError(f"{one_line(text, 40)!r} is not a job id "
                     f"({JOB_ID_CHARS} hex characters, or at least {MIN_PREFIX_CHARS} of them) "
                     "or a SignalWire fax id")


def _load(store: Store, ref: str) -> Job:
    job = store.job(resolve_job_id(store, ref))
    if job is None:  # deleted between the lookup and the read (pruned)
        raise AdminError(f"job {ref} no longer exists")
    return job


# -- listing ------------------------------------------------------------------------------------

def list_jobs(store: Store, *, status: str | None = None, to: str | None = None,
              sender: str | None = None, since: float | None = None,
              limit: int = 50) -> list[JobRow]:
    """Jobs, newest first. `status`: a job state, a fax status (delivered, busy, ...), or
    "active" (not yet reported); `to`: the number or its last digits, in any notation;
    `sender`: part of the sender's address; `since`: created at or after (epoch seconds)."""
    if status is not None:
        status = status.strip().lower()
        if status not in STATUS_FILTERS:
            raise AdminError(f"unknown status {one_line(status, 30)!r}; use one of: "
                             + ", ".join(STATUS_FILTERS))
    digits = None
    if to is not None:
        digits = "".join(c for c in to if c.isdigit())
        if not digits:
            raise AdminError(f"{one_line(to, 30)!r} has no digits to match a number")
    if limit < 1:
        raise AdminError("the limit must be at least 1")
    states: frozenset[State] | None = None
    fax_status = None
    if status == "active":
        states = ACTIVE_STATES
    elif status in FAX_STATUSES:
        fax_status = status
    elif status is not None and status != State.GIVEN_UP.value:
        states = frozenset({State(status)})
    # given-up: the faxes the gateway never got through, before their report and after it.
    rows = store.job_listing(states=states, fax_status=fax_status, to_digits=digits,
                             sender=(sender or "").strip() or None, since=since, limit=limit,
                             gave_up=status == State.GIVEN_UP.value)
    return [_row(r) for r in rows]


def _row(r: JobListing) -> JobRow:
    job = r.job
    _, words = outcome(job)
    result = words if job.state in FINISHED else "in progress"
    last = "-"
    if r.last_event is not None:
        last = r.last_event.kind + (f": {r.last_event.detail}" if r.last_event.detail else "")
    return JobRow(
        id=job.id, created=job.created_at,
        sender=r.report_to or r.envelope_from or "-",
        destination=job.to_number, status=_status(job), pages=job.pages,
        attempts=job.attempt, last_event=last,
        last_event_at=r.last_event.at if r.last_event else None,
        message_id=job.message_id, state=job.state.value, fax_status=job.fax_status,
        result=result, envelope_from=r.envelope_from, header_from=r.header_from,
        peer=r.peer, subject=r.subject, filenames=r.filenames,
        pages_sent=job.pages_sent, error=_error_text(job), fax_sid=job.fax_sid,
        reported_at=job.reported_at)


def _status(job: Job) -> str:
    if job.failure_reason:
        return f"{job.state.value}/{'canceled' if job.fax_status == 'canceled' else 'not sent'}"
    return f"{job.state.value}/{job.fax_status}" if job.fax_status else job.state.value


def _error_text(job: Job) -> str | None:
    if job.failure_reason:
        return job.failure_reason
    if job.error_message or job.error_code:
        return (job.error_message or "error") + (f" (code {job.error_code})"
                                                  if job.error_code else "")
    return None


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace(
        "+00:00", "Z")


def _clean(text: object, limit: int = 200) -> str:
    """Mail-provided text for a terminal: no control characters (no escape sequences)."""
    if text is None:
        return "-"
    return one_line(str(text), limit) or "-"


_TABLE = (  # header, JobRow -> text, widest
    ("ID", lambda r: r.id, 16),
    ("CREATED (UTC)", lambda r: _when(r.created), 19),
    ("SENDER", lambda r: r.sender, 32),
    ("TO", lambda r: r.destination, 16),
    ("STATUS", lambda r: r.status, 24),
    ("PAGES", lambda r: "-" if r.pages is None else str(r.pages), 5),
    ("TRIES", lambda r: str(r.attempts), 5),
    ("LAST EVENT", lambda r: r.last_event, 60),
)


def format_table(rows: Sequence[JobRow]) -> str:
    """A fixed-width table, one job a line, widths fitted to the content (capped)."""
    if not rows:
        return "no jobs found\n"
    cells = [[_fit(_clean(get(r), 300), width) for _, get, width in _TABLE] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, (h, _, _) in enumerate(_TABLE)]
    lines = ["  ".join(h.ljust(w) for (h, _, _), w in zip(_TABLE, widths, strict=True)).rstrip()]
    for c in cells:
        lines.append("  ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)).rstrip())
    return "\n".join(lines) + "\n"


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."


def rows_to_json(rows: Sequence[JobRow]) -> str:
    """A JSON array, one object a job, times as ISO 8601 UTC."""
    out = []
    for r in rows:
        item = asdict(r)
        for key in ("created", "last_event_at", "reported_at"):
            item[key] = _iso(item[key])
        out.append(item)
    return json.dumps(out, indent=2, ensure_ascii=False) + "\n"


CSV_COLUMNS = ("job_id", "message_id", "received_at", "envelope_from", "header_from",
               "report_to", "peer", "subject", "files", "destination", "pages", "pages_sent",
               "attempts", "state", "fax_status", "result", "error", "fax_sid", "reported_at")


def rows_to_csv(rows: Sequence[JobRow]) -> str:
    """The audit export: who sent what to which number, when, from where, with what result.

    Text that came in by mail is neutralised for spreadsheets (a leading =, +, - or @ would
    make it a formula); numbers and ids are ours and left as they are.
    """
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    for r in rows:
        writer.writerow([
            r.id, r.message_id, _iso(r.created), _cell(r.envelope_from), _cell(r.header_from),
            _cell(r.sender), _cell(r.peer), _cell(r.subject), _cell(r.filenames),
            r.destination, _num(r.pages), _num(r.pages_sent), r.attempts, r.state,
            r.fax_status or "", _cell(r.result), _cell(r.error), r.fax_sid or "",
            _iso(r.reported_at) or ""])
    return buf.getvalue()


def _cell(text: str | None) -> str:
    if not text or text == "-":
        return ""
    text = one_line(text, 1000)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def _num(value: int | None) -> str:
    return "" if value is None else str(value)


def parse_since(text: str, now: float) -> float:
    """`--since` values: an age ("90m", "12h", "7d", "2w") or a UTC date/time
    ("2025-01-31", "2025-01-31T08:00")."""
    value = text.strip()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhdw])", value.lower())
    if match:
        unit = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[match.group(2)]
        return now - float(match.group(1)) * unit
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise AdminError(f"cannot read {one_line(value, 40)!r} as a time: use an "
                         "age like 12h or 7d, or a UTC date like 2025-01-31") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


# -- one job ------------------------------------------------------------------------------------

def describe_job(store: Store, job_id: str, now: float | None = None,
                 fax_domain: str = "") -> str:
    """Everything about one job: its message, state, attempts, history, where the report went."""
    job = _load(store, job_id)
    message = store.message(job.message_id)
    attempts = store.attempts(job.id)
    events = store.events(job.id)
    siblings = [j for j in store.message_jobs(job.message_id) if j.id != job.id]
    _, words = outcome(job)
    result = words if job.state in FINISHED else "in progress"

    lines = [f"Job {job.id}", ""]
    lines += _fields([
        ("Status", _status(job)),
        ("Result", result),
        ("Destination", f"{_number(job.to_number)} ({job.to_number})"),
        ("Caller", job.from_number),
        ("Quality", job.quality),
        ("Fax sid", job.fax_sid or "-"),
        ("Pages", f"{_num(job.pages) or '-'}"
                  + (f", {job.pages_sent} sent" if job.pages_sent is not None else "")),
        ("Duration", f"{job.duration_s} s" if job.duration_s is not None else "-"),
        ("Error", _clean(_error_text(job), 300)),
        ("Attempts", str(job.attempt)),
        ("Created", _when(job.created_at) + " UTC"),
        ("Updated", _when(job.updated_at) + " UTC"),
        ("Next step", _next_step(job, now)),
        ("Reported", _when(job.reported_at) + (" UTC" if job.reported_at else "")),
    ])
    lines += ["", "Message"]
    if message is None:
        lines.append("  (the message record is gone)")
    else:
        lines += _fields(_message_fields(message), indent=2)
    if siblings:
        lines += ["", "Other jobs of this message"]
        lines += [f"  {j.id}  {j.to_number:<16}  {_status(j)}" for j in siblings]
    lines += ["", "Report"]
    lines += _fields(_report_fields(job, message, events, fax_domain), indent=2)
    lines += ["", "Attempts"]
    lines += _attempts_table(attempts)
    lines += ["", "History (UTC)"]
    lines += [f"  {_when(e.at)}  {e.kind:<16} {_clean(e.detail, 500) if e.detail else ''}"
              .rstrip() for e in events] or ["  (none)"]
    return "\n".join(lines) + "\n"


def _number(e164: str) -> str:
    try:
        return format_number(e164)
    except NumberError:
        return _clean(e164, 40)


def _fields(pairs: Iterable[tuple[str, str]], indent: int = 2) -> list[str]:
    return [f"{' ' * indent}{name + ':':<14} {value}" for name, value in pairs]


def _next_step(job: Job, now: float | None) -> str:
    if job.next_run_at is None or job.state is State.REPORTED:
        return "-"
    text = _when(job.next_run_at) + " UTC"
    if now is not None:
        delta = job.next_run_at - now
        text += f" (in {delta:.0f} s)" if delta > 0 else " (due now)"
    return f"{text}, tries {job.tries}" if job.tries else text


def _message_fields(m: Message) -> list[tuple[str, str]]:
    if m.purged_at is not None:
        document = f"deleted {_when(m.purged_at)} UTC"
    else:
        document = f"{m.document_path}" + ("" if Path(m.document_path).is_file()
                                           else " (MISSING)")
    return [
        ("Id", m.id),
        ("Received", _when(m.created_at) + " UTC"),
        ("Envelope from", _clean(m.envelope_from)),
        ("From header", _clean(m.header_from)),
        ("Report to", _clean(m.report_to)),
        ("Subject", _clean(m.subject)),
        ("Message-ID", _clean(m.message_id_header)),
        ("Peer", _clean(m.peer)),
        *([("Authentication-Results", _clean(m.auth_results, 1000))] if m.auth_results else []),
        ("Files", _clean(m.filenames, 500)),
        ("Pages", str(m.pages)),
        ("Size", f"{m.document_bytes} bytes, sha256 {m.document_sha256}"),
        ("Document", document),
    ]


def _report_fields(job: Job, message: Message | None, events: Sequence[Event],
                   fax_domain: str) -> list[tuple[str, str]]:
    """Where the report goes, as the worker decides it (`report_recipient`): a job whose
    recipient asked for DSNs (RCPT NOTIFY) gets one at the envelope sender, not at From:."""
    target = report_recipient(job, message, fax_domain) if message is not None else None
    if message is None:
        to = "-"
    elif job.dsn_notify is None:
        to = _clean(target)
    elif job.dsn_notify == "NEVER":
        to = "none: the sender asked for no notification (NOTIFY=NEVER)"
    else:
        to = (f"{_clean(target)}, as a delivery status notification (NOTIFY="
              f"{job.dsn_notify})" if target else
              "none: a delivery status notification was asked for, but the mail had no "
              "envelope sender to return it to")
    reported = [e for e in events if e.kind == "reported"]
    if reported:
        where = _clean(reported[-1].detail, 300)
    elif job.state in REPORT_DUE:
        where = "due" + (f" (tries {job.tries})" if job.tries else "")
    else:
        where = "when the fax is finished"
    return [("To", to), ("Delivery", where)]


def _attempts_table(attempts: Sequence[Attempt]) -> list[str]:
    if not attempts:
        return ["  (none)"]
    header = (f"  {'N':>2}  {'STARTED':<19}  {'QUALITY':<9}  {'STATUS':<10}  {'PAGES':>5}  "
              f"{'SECS':>5}  {'ENDED':<19}  FAX SID / ERROR")
    lines = [header]
    for a in attempts:
        error = (_clean(a.error_message, 200) + (f" (code {a.error_code})" if a.error_code
                                                  else "")) if a.error_message else ""
        lines.append(
            f"  {a.n:>2}  {_when(a.started_at):<19}  {a.quality:<9}  "
            f"{_clean(a.status or 'pending', 10):<10}  {_num(a.pages) or '-':>5}  "
            f"{_num(a.duration_s) or '-':>5}  {_when(a.ended_at):<19}  "
            f"{a.fax_sid or '-'}" + (f"  {error}" if error else ""))
    return lines


# -- actions ------------------------------------------------------------------------------------

def resend_job(store: Store, job_id: str, now: float, *, retry_policy: RetryPolicy,
               from_number: str | None = None, by: str | None = None,
               shared: bool = False) -> str:
    """Send the same document to the same number again, as a new job; returns its id.
    `AlreadyResent` (naming that job) when another resend of it is under way.

    The job must be finished (reported or given-up; or completed with no automatic retry
    coming), and the document still in the spool: with DOCUMENT_RETENTION_HOURS=0 it is
    deleted as soon as every job of the mail is reported. The new job uses the job's last
    quality and, unless `from_number` is given (pass the configured FAX_FROM_NUMBER), its caller.
    `retry_policy` is the configured one (`RetryPolicy.from_settings`): whether an automatic
    retry is still coming is decided exactly as the daemon's worker decides it.
    """
    job = _load(store, job_id)
    if job.state not in FINISHED:
        raise AdminError(f"job {job.id} is still in progress ({_status(job)}); "
                         "nothing to resend yet")
    if job.state is State.COMPLETED:
        decision = retry_decision(job, retry_policy, now)
        if decision is not None:
            raise AdminError(f"job {job.id} will be retried automatically ({decision[2]}) at "
                             f"{_when(decision[0])} UTC; cancel it first to resend by hand")
    message = store.message(job.message_id)
    if message is None:
        raise AdminError(f"the message of job {job.id} is gone; ask the sender to mail it again")
    if message.purged_at is not None:
        raise AdminError(
            f"cannot resend job {job.id}: its document was deleted from the spool at "
            f"{_when(message.purged_at)} UTC (DOCUMENT_RETENTION_HOURS keeps documents "
            "longer); ask the sender to mail it again")
    # Several gateways (DATABASE_URL): the document is in S3 since the 250, and the spool file
    # is on whichever node took the mail: the new job sends the stored object.
    stored = shared and job.media_key is not None
    if not stored and not Path(message.document_path).is_file():
        raise AdminError(f"cannot resend job {job.id}: its document {message.document_path} is "
                         "missing from the spool; ask the sender to mail it again")
    new = NewJob(id=secrets.token_hex(JOB_ID_CHARS // 2), to_number=job.to_number,
                 from_number=from_number or job.from_number, quality=job.quality,
                 callback_token=secrets.token_urlsafe(24),
                 media_key=job.media_key if stored and job.media_key else new_media_key(),
                 # What the sender asked of the mail (RFC 3461) holds for its resend too: a DSN
                 # naming the ORCPT, or no mail at all for NOTIFY=NEVER.
                 dsn_notify=job.dsn_notify, dsn_orcpt=job.dsn_orcpt)
    problem = store.add_resend(job, new, now, stored=stored, by=by)
    if isinstance(problem, UnderWay):
        if problem.resend:
            raise AlreadyResent(f"job {job.id} is already being resent, as job "
                                f"{problem.job_id} ({problem.state})", problem.job_id)
        raise AdminError(f"cannot resend job {job.id}: job {problem.job_id} for the same "
                         f"document and number is still under way ({problem.state}); wait "
                         "for its report, or cancel it first")
    if problem is not None:
        raise AdminError(f"cannot resend job {job.id}: {problem}")
    return new.id


def request_cancel(store: Store, job_id: str, now: float, *, by: str | None = None
                   ) -> CancelRequest:
    """Stop a fax. Not yet at SignalWire (spooled, stored, or waiting for a retry): the job
    is given up with "canceled by the operator" and the sender gets a report saying so. At
    SignalWire (submitted): returns its fax sid; only a cancel there (`cancel_fax`) can stop
    it, and only
    while it is still queued."""
    job = _load(store, job_id)
    if job.state in (State.SPOOLED, State.STORED):
        if store.cancel_unsent(job.id, CANCELED_BY_OPERATOR, now, by=by):
            return CancelRequest(job.id, None,
                                 f"job {job.id} canceled; the sender will get a report")
        job = _load(store, job.id)  # the worker moved it on meanwhile
    if job.state is State.SUBMITTING:
        raise AdminError(f"job {job.id} is being handed to SignalWire right now; "
                         "try again in a few seconds")
    if job.state is State.SUBMITTED:
        assert job.fax_sid is not None
        return CancelRequest(job.id, job.fax_sid,
                             f"job {job.id}: fax {job.fax_sid} is at SignalWire "
                             f"({job.fax_status or 'queued'})")
    if job.state in (State.SPOOLED, State.STORED):  # raced twice: be plain about it
        raise AdminError(f"job {job.id} changed while canceling; try again")
    raise AdminError(f"job {job.id} is already finished ({_status(job)}): nothing to cancel")


async def cancel_fax(client: SignalWireClient, sid: str) -> None:
    """Cancel a queued fax at SignalWire. Raises AdminError in plain words; SignalWire's code
    10000 means the fax has left the queue and can no longer be stopped."""
    try:
        await client.cancel_fax(sid)
    except SignalWireError as exc:
        if exc.code == sw_errors.NOT_CANCELABLE:
            raise AdminError("too late to cancel: the fax is already being sent") from exc
        raise AdminError(f"SignalWire did not cancel fax {sid}: {exc.words}") from exc


def note_cancel(store: Store, job_id: str, now: float, fax_sid: str, *,
                by: str | None = None) -> None:
    """After a successful `cancel_fax`: record it, and have the worker fetch the fax's status
    now, so the job completes as "canceled" and the sender is told even if no callback comes."""
    store.note_cancel(job_id, f"fax {fax_sid} canceled at SignalWire", now, by=by)


def request_report(store: Store, job_id: str, now: float, *, by: str | None = None) -> str:
    """Send the report again. A reported job goes back to completed (a fax status came) or
    given-up (the gateway gave up), with the report due now; a job whose report is already due
    (say, waiting out a relay outage) is tried now. Returns what was done."""
    job = _load(store, job_id)
    if job.state is State.REPORTED:
        target = State.GIVEN_UP if job.failure_reason else State.COMPLETED
        if not store.report_again(job.id, target, now, by=by):
            raise AdminError(f"job {job.id} changed meanwhile; try again")
        return f"job {job.id}: the report will be sent again"
    if job.state in REPORT_DUE:
        if not store.report_now(job.id, now, by=by):
            raise AdminError(f"job {job.id} changed meanwhile; try again")
        return f"job {job.id}: the report was already due; it will be tried now"
    raise AdminError(f"job {job.id} is still in progress ({_status(job)}); the report goes out "
                     "when the fax is finished")
