"""What the dashboard reads, in one place: thin functions over `gateway.ops.actions` and the
store's public methods, so a change of the store's interface is adapted here and nowhere else.

Every function is synchronous and meant to run on the store's own thread (`store.run`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from gateway.mail.reports import outcome
from gateway.ops import actions
from gateway.ops.actions import JobRow
from gateway.outbound.states import ACTIVE_STATES, Job, State
from gateway.store.rows import Attempt, Event, Message

# The newest jobs a search looks through: search and "until" are done here, not in SQL, so
# they are bounded (the store interface has no text search or offset yet).
MAX_SCAN = 5000
FINAL_STATES = (State.COMPLETED, State.GIVEN_UP, State.REPORTED)


@dataclass(frozen=True)
class Page:
    rows: list[JobRow]
    total: int          # matches among the scanned jobs
    capped: bool        # MAX_SCAN was reached: there may be more


def _matches(row: JobRow, needle: str) -> bool:
    hay = " ".join(x for x in (row.id, row.destination, row.sender, row.subject or "",
                               row.filenames or "", row.envelope_from or "",
                               row.header_from or "", row.fax_sid or "", row.result)
                   if x).lower()
    return needle in hay


def search_jobs(store: Any, *, status: str | None, to: str | None, sender: str | None,
                since: float | None, until: float | None, text: str | None, offset: int,
                limit: int) -> Page:
    """Jobs newest first, filtered like `faxgw jobs` plus a free-text search (id, number,
    sender, subject, file names, fax id, result) and an end time, one page of them."""
    rows = actions.list_jobs(store, status=status, to=to, sender=sender, since=since,
                             limit=MAX_SCAN)
    capped = len(rows) >= MAX_SCAN
    if until is not None:
        rows = [r for r in rows if r.created < until]
    if text:
        needle = text.strip().lower()
        rows = [r for r in rows if _matches(r, needle)]
    return Page(rows[offset:offset + limit], len(rows), capped)


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


def job_detail(store: Any, ref: str) -> JobDetail:
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


def document_of(store: Any, job_id: str) -> tuple[str, str] | None:
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


def queue_depth(store: Any) -> tuple[int, dict[str, int], float | None]:
    """(jobs not yet reported, counts by state, when the oldest of them arrived)."""
    counts = store.counts_by_state()
    depth = sum(counts.get(s.value, 0) for s in ACTIVE_STATES)
    return depth, counts, store.oldest_active_created_at()


def relay_state(store: Any) -> tuple[bool | None, str]:
    """How report delivery went lately, from the newest jobs' last events: (ok, words);
    ok None when no report has been tried yet."""
    for row in actions.list_jobs(store, limit=50):
        text = row.last_event or ""
        if "report not delivered" in text.lower() or "report NOT delivered" in text:
            return False, text
        if text.startswith("reported:"):
            return True, text
    return None, "no report sent yet"
