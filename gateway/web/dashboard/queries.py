"""What the dashboard reads, in one place: thin functions over `gateway.outbound.actions` and the
store's public methods, so a change of the store's interface is adapted here and nowhere else.

Every function is synchronous and meant to run on the store's own thread (`store.run`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
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
from gateway.mail.reports import outcome
from gateway.outbound import actions
from gateway.outbound.actions import JobRow
from gateway.store import inbound
from gateway.store.base import Store
from gateway.store.inbound import InboundFax, InboundStore
from gateway.store.interfaces import Jobs, Listings
from gateway.store.rows import Attempt, Event, Message

FINAL_STATES = (State.COMPLETED, State.GIVEN_UP, State.REPORTED)


@dataclass(frozen=True)
class Page:
    rows: list[JobRow]
    total: int          # every job that matches


def search_jobs(store: Listings, *, status: str | None, to: str | None, sender: str | None,
                since: float | None, until: float | None, text: str | None, offset: int,
                limit: int) -> Page:
    """Jobs newest first, filtered like `faxgw jobs` plus a free-text search (id, number,
    sender, subject, file names, fax id, error) and an end time, one page of them: searched,
    counted and paged by the database over every job, however many there are."""
    states: frozenset[State] | None = None
    fax_status = None
    if status is not None:
        status = status.strip().lower()
        if status not in actions.STATUS_FILTERS:
            raise actions.AdminError(f"unknown status {status[:30]!r}; use one of: "
                                     + ", ".join(actions.STATUS_FILTERS))
        if status == "active":
            states = ACTIVE_STATES
        elif status in actions.FAX_STATUSES:
            fax_status = status
        else:
            states = frozenset({State(status)})
    digits = None
    if to:
        digits = "".join(c for c in to if c.isdigit())
        if not digits:
            raise actions.AdminError("Number: give some digits of the number")
    listings, total = store.job_search(
        states=states, fax_status=fax_status, to_digits=digits,
        sender=(sender or "").strip() or None, since=since, until=until,
        text=(text or "").strip() or None, offset=offset, limit=limit)
    return Page([actions._row(r) for r in listings], total)


@dataclass(frozen=True)
class JobDetail:
    job: Job
    row_status: str
    result: str
    final: bool
    message: Message | None
    attempts: Sequence[Attempt]
    events: Sequence[Event]
    siblings: Sequence[Job]
    document_kept: bool


def job_detail(store: Store, ref: str) -> JobDetail:
    """Everything the job page shows; AdminError (plain words) for an unknown job."""
    job = actions._load(store, ref)
    message = store.message(job.message_id)
    final = job.state in FINAL_STATES
    _, words = outcome(job)
    kept = (message is not None and message.purged_at is None
            and Path(message.document_path).is_file())
    return JobDetail(
        job=job, row_status=actions._status(job), result=words if final else "in progress",
        final=final, message=message, attempts=store.attempts(job.id),
        events=store.events(job.id),
        siblings=[j for j in store.message_jobs(job.message_id) if j.id != job.id],
        document_kept=kept)


@dataclass(frozen=True)
class Offer:
    """One of the job page's actions: whether it can work now, and if not, why not."""
    key: str
    possible: bool
    why_not: str = ""


def _when_utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M UTC")


def offers(d: JobDetail, now: float, retry_policy: RetryPolicy, shared: bool) -> list[Offer]:
    """Resend, Cancel and Send the report again as `gateway.outbound.actions` would decide them
    now, so the page offers only what can work and says why the rest cannot (the action
    still checks again when it is done: the job may move on meanwhile)."""
    job, message = d.job, d.message
    if job.state not in FINISHED:
        resend = Offer("resend", False, "The fax is still in progress; it can be sent again "
                                        "once it is finished.")
    elif (job.state is State.COMPLETED
          and (decision := retry_decision(job, retry_policy, now)) is not None):
        resend = Offer("resend", False, f"It will be retried automatically at "
                                        f"{_when_utc(decision[0])}; cancel it first to resend "
                                        "it by hand.")
    elif message is None or message.purged_at is not None or not (
            (shared and job.media_key) or d.document_kept):
        resend = Offer("resend", False, "Its document is no longer kept "
                                        "(DOCUMENT_RETENTION_HOURS): ask the sender to mail it "
                                        "again.")
    else:
        resend = Offer("resend", True)
    if job.state in (State.SPOOLED, State.STORED, State.SUBMITTED):
        cancel = Offer("cancel", True)
    elif job.state is State.SUBMITTING:
        cancel = Offer("cancel", False, "It is being handed to SignalWire right now; try again "
                                        "in a few seconds.")
    else:
        cancel = Offer("cancel", False, "The fax is finished: there is nothing to cancel.")
    if job.state is State.REPORTED or job.state in REPORT_DUE:
        report = Offer("report", True)
    else:
        report = Offer("report", False, "The report goes out by itself when the fax is "
                                        "finished.")
    return [resend, cancel, report]


def document_of(store: Jobs, job_id: str) -> tuple[str, str] | None:
    """(message id, path) of a job's document while it is still kept, else None."""
    job = store.job(job_id)
    if job is None:
        return None
    message = store.message(job.message_id)
    if message is None or message.purged_at is not None:
        return None
    if not Path(message.document_path).is_file():
        return None
    return message.id, message.document_path


def queue_depth(store: Listings) -> tuple[int, dict[str, int], float | None]:
    """(jobs not yet reported, counts by state, when the oldest of them arrived)."""
    counts = store.counts_by_state()
    depth = sum(counts.get(s.value, 0) for s in ACTIVE_STATES)
    return depth, counts, store.oldest_active_created_at()


def relay_state(store: Store) -> tuple[bool | None, str]:
    """How report delivery went lately, from the newest jobs' last events: (ok, words);
    ok None when no report has been tried yet."""
    for row in actions.list_jobs(store, limit=50):
        text = row.last_event or ""
        if "report not delivered" in text.lower() or "report NOT delivered" in text:
            return False, text
        if text.startswith("reported:"):
            return True, text
    return None, "no report sent yet"


# -- received faxes --------------------------------------------------------------------------

@dataclass(frozen=True)
class Delivery:
    recipient: str
    message_id: str
    sent_at: float
    detail: str | None


@dataclass(frozen=True)
class ReceivedRow:
    fax: InboundFax
    result: str        # the outcome in plain words
    tone: str          # ok / bad / busy, for the row's colour
    mailed: int        # recipients served so far


@dataclass(frozen=True)
class ReceivedPage:
    rows: list[ReceivedRow]
    total: int


@dataclass(frozen=True)
class ReceivedDetail:
    row: ReceivedRow
    deliveries: Sequence[Delivery]
    picture: bool           # page 1 can be drawn from SignalWire's copy
    no_picture: str         # why not, in plain words, when it cannot
    document_gone: bool = False  # SignalWire answered that it no longer has the document


def _pages(n: int | None) -> str:
    if not n:
        return "no pages"
    return "1 page" if n == 1 else f"{n} pages"


def received_result(fax: InboundFax, mailed: int) -> tuple[str, str]:
    """(plain words, tone) for a received fax: what a person at the front desk would ask."""
    wanted = len(fax.recipient_list)
    reason = fax.error_message or fax.last_error or ""
    if fax.state == inbound.RINGING:
        return "coming in: answered, no outcome from SignalWire yet", "busy"
    if fax.state == inbound.REJECTED:
        if fax.outcome == "blocked":
            return "refused: the caller is blocked (INBOUND_BLOCKED_CALLERS)", "bad"
        return "refused: no route for this number (INBOUND_ROUTES)", "bad"
    if fax.state == inbound.GIVEN_UP:
        return (f"given up{': ' + reason if reason else ''}; "
                f"mailed to {mailed} of {wanted}", "bad")
    if fax.outcome == "received":
        got = f"received, {_pages(fax.num_pages)}"
        if fax.state == inbound.DELIVERING:
            return f"{got}; mailing ({mailed} of {wanted} sent)", "busy"
        if wanted == 0:
            return f"{got}; no one to mail it to", "bad"
        return f"{got}, mailed to {mailed} of {wanted}", "ok"
    if fax.outcome == "canceled":
        return "canceled: the caller hung up before a page, or the call was refused", "bad"
    if fax.outcome == "noise":
        return (f"not a fax (a voice call or a hang-up){': ' + reason if reason else ''}",
                "bad")
    words = f"not received{': ' + reason if reason else ''}"
    if fax.error_code:
        words += f" (code {fax.error_code})"
    return words, "bad" if fax.state != inbound.DELIVERING else "busy"


def _received_row(db: InboundStore, fax: InboundFax) -> ReceivedRow:
    mailed = len(db.delivered_to(fax.fax_sid))
    words, tone = received_result(fax, mailed)
    return ReceivedRow(fax, words, tone, mailed)


def search_received(db: InboundStore, *, to: str | None, caller: str | None,
                    since: float | None, until: float | None, offset: int,
                    limit: int) -> ReceivedPage:
    """Received faxes newest first, filtered by the number they came in on (its digits),
    the caller (number digits or station id) and the date; one page of them."""
    digits = None
    if to:
        digits = "".join(c for c in to if c.isdigit())
        if not digits:
            raise actions.AdminError("Number: give some digits of the number")
    faxes, total = db.search(to_digits=digits, caller=caller or None, since=since,
                             until=until, offset=offset, limit=limit)
    return ReceivedPage([_received_row(db, f) for f in faxes], total)


def picture_state(fax: InboundFax) -> tuple[bool, str]:
    """Whether page 1 can be drawn now, or why not. The gateway keeps no copy of a received
    fax (the mail carries it); SignalWire keeps it until the gateway deletes it after mailing
    (unless INBOUND_KEEP_MEDIA=yes), so the picture exists only while SignalWire has it."""
    if fax.state == inbound.RINGING:
        return False, "No picture yet: the fax is still coming in."
    if fax.outcome != "received":
        return False, "No picture: no document was received."
    if fax.media_deleted_at is not None:
        return False, ("No picture: the gateway keeps no copy of received faxes, and the "
                       "document was deleted at SignalWire after it was mailed (set "
                       "INBOUND_KEEP_MEDIA=yes to keep it there). The recipients' mail has it.")
    if not fax.media_url and not fax.media_sid:
        return False, "No picture: SignalWire named no document for this fax."
    return True, ""


DOCUMENT_GONE = ("No picture: SignalWire no longer has this fax's document (it was deleted "
                 "there), and the gateway keeps no copy. The recipients' mail has it.")


def document_gone(d: ReceivedDetail) -> ReceivedDetail:
    """The detail of a fax whose document SignalWire answered it no longer has."""
    return replace(d, picture=False, no_picture=DOCUMENT_GONE, document_gone=True)


def received_detail(db: InboundStore, fax_sid: str) -> ReceivedDetail | None:
    fax = db.get(fax_sid)
    if fax is None:
        return None
    deliveries = [Delivery(d["recipient"], d["message_id"], d["sent_at"], d["detail"])
                  for d in db.deliveries(fax_sid)]
    words, tone = received_result(fax, len(deliveries))
    picture, why = picture_state(fax)
    return ReceivedDetail(ReceivedRow(fax, words, tone, len(deliveries)), deliveries,
                          picture, why)
