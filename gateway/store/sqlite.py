"""The job store: SQLite in WAL mode, the only module that speaks SQL.

All SQL is kept portable (plain types, `?` parameters, no SQLite-only functions in queries) so the
store can later sit on PostgreSQL for several gateway instances sharing one queue. Every call runs
on one dedicated thread that owns the one connection: the event loop never waits on an fsync, and
the calls are serialised without locks. CLI commands use the same class synchronously.
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

from gateway.outbound.states import ACTIVE_STATES, CallbackAction, Job, State, classify_callback

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    envelope_from TEXT,
    header_from TEXT,
    report_to TEXT,
    subject TEXT,
    message_id_header TEXT,
    references_header TEXT,
    peer TEXT,
    document_path TEXT NOT NULL,
    document_bytes INTEGER NOT NULL,
    document_sha256 TEXT NOT NULL,
    pages INTEGER NOT NULL,
    filenames TEXT,
    notes TEXT,
    purged_at REAL
);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    message_id TEXT NOT NULL REFERENCES messages(id),
    to_number TEXT NOT NULL,
    from_number TEXT NOT NULL,
    quality TEXT NOT NULL,
    state TEXT NOT NULL,
    callback_token TEXT NOT NULL UNIQUE,
    callback_url TEXT,
    media_key TEXT,
    fax_sid TEXT,
    fax_status TEXT,
    pages INTEGER,
    pages_sent INTEGER,
    duration_s INTEGER,
    error_code TEXT,
    error_message TEXT,
    failure_reason TEXT,
    attempt INTEGER NOT NULL DEFAULT 0,
    tries INTEGER NOT NULL DEFAULT 0,
    next_run_at REAL,
    submit_started_at REAL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    reported_at REAL
);
CREATE INDEX IF NOT EXISTS jobs_due ON jobs (next_run_at);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state);
CREATE INDEX IF NOT EXISTS jobs_message ON jobs (message_id);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    job_id TEXT NOT NULL,
    at REAL NOT NULL,
    kind TEXT NOT NULL,
    detail TEXT
);
CREATE INDEX IF NOT EXISTS events_job ON events (job_id, id);
CREATE TABLE IF NOT EXISTS attempts (
    job_id TEXT NOT NULL,
    n INTEGER NOT NULL,
    quality TEXT NOT NULL,
    started_at REAL NOT NULL,
    fax_sid TEXT,
    status TEXT,
    error_code TEXT,
    error_message TEXT,
    pages INTEGER,
    duration_s INTEGER,
    ended_at REAL,
    PRIMARY KEY (job_id, n)
);
"""

# A job is due when its time has come, unless it would dial a number that another job is dialling
# right now: at most one attempt in flight per destination.
_DUE = """
    next_run_at IS NOT NULL AND state IN ({states})
    AND NOT (state = 'stored' AND to_number IN (
        SELECT other.to_number FROM jobs other
        WHERE other.state IN ('submitting', 'submitted') AND other.id <> jobs.id))
"""

_JOB_COLUMNS = [f.name for f in fields(Job)]


@dataclass(frozen=True)
class Message:
    id: str
    created_at: float
    envelope_from: str | None
    header_from: str | None
    report_to: str | None
    subject: str | None
    message_id_header: str | None
    references_header: str | None
    peer: str | None
    document_path: str
    document_bytes: int
    document_sha256: str
    pages: int
    filenames: str | None
    notes: str | None = None
    purged_at: float | None = None


@dataclass(frozen=True)
class Attempt:
    job_id: str
    n: int
    quality: str
    started_at: float
    fax_sid: str | None
    status: str | None
    error_code: str | None
    error_message: str | None
    pages: int | None
    duration_s: int | None
    ended_at: float | None


@dataclass(frozen=True)
class Event:
    job_id: str
    at: float
    kind: str
    detail: str | None


@dataclass(frozen=True)
class NewJob:
    id: str
    to_number: str
    from_number: str
    quality: str
    callback_token: str
    media_key: str


class StoreError(Exception):
    """The store could not take a write: the SMTP side answers 451 so the sender retries."""


def _job(row: sqlite3.Row) -> Job:
    values = dict(zip(_JOB_COLUMNS, (row[c] for c in _JOB_COLUMNS)))
    values["state"] = State(values["state"])
    return Job(**values)


class Store:
    def __init__(self, path: Path, clock: Callable[[], float] = time.time,
                 busy_timeout_s: float = 10.0) -> None:
        self.path = path
        self.clock = clock
        # How long a write waits for another process (the CLI) holding the lock; then the
        # SMTP side answers 451 and the sender retries.
        self.busy_timeout_s = busy_timeout_s
        self._db: sqlite3.Connection | None = None
        self._executor: ThreadPoolExecutor | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                             timeout=self.busy_timeout_s)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode survives a process crash (kill -9) but may lose the last commits on
        # power loss; the two commits that must survive that too (the mail accepted with 250,
        # and a send about to be POSTed) are made with synchronous=FULL (durable transactions).
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA foreign_keys=ON")
        db.executescript(SCHEMA)
        self._db = db

    async def start(self) -> None:
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="faxgw-store")
        await self.run(self.open)

    async def stop(self) -> None:
        if self._executor is not None:
            await self.run(self.close)
            self._executor.shutdown(wait=True)
            self._executor = None

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a synchronous store call on the store's own thread."""
        assert self._executor is not None, "store not started"
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, functools.partial(fn, *args))

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreError("store is not open")
        return self._db

    def _tx(self, durable: bool = False) -> "_Transaction":
        return _Transaction(self.db, durable)

    def _event(self, job_id: str, kind: str, detail: str | None, at: float) -> None:
        self.db.execute("INSERT INTO events (job_id, at, kind, detail) VALUES (?, ?, ?, ?)",
                        (job_id, at, kind, detail))

    # -- intake ------------------------------------------------------------------------------

    def add_message(self, message: Message, jobs: Iterable[NewJob]) -> None:
        """Commit a message and its jobs in one transaction (durable once this returns)."""
        now = self.clock()
        try:
            with self._tx(durable=True):
                self.db.execute(
                    "INSERT INTO messages (id, created_at, envelope_from, header_from, report_to,"
                    " subject, message_id_header, references_header, peer, document_path,"
                    " document_bytes, document_sha256, pages, filenames, notes)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (message.id, message.created_at, message.envelope_from, message.header_from,
                     message.report_to, message.subject, message.message_id_header,
                     message.references_header, message.peer, message.document_path,
                     message.document_bytes, message.document_sha256, message.pages,
                     message.filenames, message.notes))
                for job in jobs:
                    self.db.execute(
                        "INSERT INTO jobs (id, message_id, to_number, from_number, quality, state,"
                        " callback_token, media_key, pages, attempt, tries, next_run_at,"
                        " created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 0, 0, ?, ?, ?)",
                        (job.id, message.id, job.to_number, job.from_number, job.quality,
                         State.RECEIVED.value, job.callback_token, job.media_key, message.pages,
                         now, now, now))
                    self._event(job.id, "received",
                                f"from {message.report_to or message.envelope_from or '-'}"
                                f" peer {message.peer or '-'}, {message.pages} page(s),"
                                f" {message.document_bytes} bytes", now)
        except sqlite3.Error as exc:
            raise StoreError(str(exc)) from exc

    # -- reads -------------------------------------------------------------------------------

    def job(self, job_id: str) -> Job | None:
        row = self.db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(row) if row else None

    def job_by_token(self, token: str) -> Job | None:
        row = self.db.execute("SELECT * FROM jobs WHERE callback_token = ?", (token,)).fetchone()
        return _job(row) if row else None

    def message(self, message_id: str) -> Message | None:
        row = self.db.execute("SELECT * FROM messages WHERE id = ?", (message_id,)).fetchone()
        return Message(**dict(row)) if row else None

    def events(self, job_id: str) -> list[Event]:
        rows = self.db.execute("SELECT job_id, at, kind, detail FROM events WHERE job_id = ?"
                               " ORDER BY id", (job_id,)).fetchall()
        return [Event(**dict(r)) for r in rows]

    def jobs(self, *, state: str | None = None, limit: int = 100) -> list[Job]:
        sql, args = "SELECT * FROM jobs", []
        if state:
            sql += " WHERE state = ?"
            args.append(state)
        sql += " ORDER BY created_at DESC LIMIT ?"
        args.append(limit)
        return [_job(r) for r in self.db.execute(sql, args).fetchall()]

    def _due_where(self, exclude: list[str]) -> tuple[str, list[Any]]:
        states = sorted(s.value for s in ACTIVE_STATES)
        sql = _DUE.format(states=",".join("?" for _ in states))
        if exclude:
            sql += f" AND id NOT IN ({','.join('?' for _ in exclude)})"
        return sql, [*states, *exclude]

    def due_jobs(self, now: float, limit: int, exclude: Iterable[str] = ()) -> list[Job]:
        """Active jobs whose next step is due (and may run now), oldest first."""
        where, args = self._due_where(list(exclude))
        rows = self.db.execute(
            f"SELECT * FROM jobs WHERE {where} AND next_run_at <= ? ORDER BY next_run_at LIMIT ?",
            (*args, now, limit)).fetchall()
        return [_job(r) for r in rows]

    def next_due_at(self, exclude: Iterable[str] = ()) -> float | None:
        """When the next step of a job not in `exclude` (running now) falls due."""
        where, args = self._due_where(list(exclude))
        return self.db.execute(f"SELECT MIN(next_run_at) FROM jobs WHERE {where}",
                               args).fetchone()[0]

    def earlier_sids(self, job: Job) -> set[str]:
        """Fax sids of the job's earlier attempts: never to be taken for the current one."""
        rows = self.db.execute("SELECT fax_sid FROM attempts WHERE job_id = ? AND n < ?"
                               " AND fax_sid IS NOT NULL", (job.id, job.attempt)).fetchall()
        return {r[0] for r in rows}

    def attempts(self, job_id: str) -> list[Attempt]:
        rows = self.db.execute("SELECT * FROM attempts WHERE job_id = ? ORDER BY n",
                               (job_id,)).fetchall()
        return [Attempt(**dict(r)) for r in rows]

    def message_jobs(self, message_id: str) -> list[Job]:
        rows = self.db.execute("SELECT * FROM jobs WHERE message_id = ? ORDER BY id",
                               (message_id,)).fetchall()
        return [_job(r) for r in rows]

    def check_writable(self) -> None:
        """Take and release the write lock: raises when the database cannot be written."""
        with self._tx():
            pass

    def oldest_active_created_at(self) -> float | None:
        states = sorted(s.value for s in ACTIVE_STATES)
        row = self.db.execute(
            f"SELECT MIN(created_at) FROM jobs WHERE state IN ({','.join('?' for _ in states)})",
            states).fetchone()
        return None if row is None else row[0]

    def counts_by_state(self) -> dict[str, int]:
        rows = self.db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        return {r[0]: r[1] for r in rows}

    # -- transitions -------------------------------------------------------------------------

    def _update(self, job_id: str, expect: Iterable[State], event: tuple[str, str | None],
                also: Iterable[tuple[str, tuple[Any, ...]]] = (), durable: bool = False,
                **values: Any) -> bool:
        """Move a job on only if it is still in one of the expected states (optimistic check).

        The check is what keeps a late worker step or a replayed callback from undoing a newer
        state, and it is what will let several instances share the queue later.
        """
        now = self.clock()
        values["updated_at"] = now
        for key, value in list(values.items()):
            if isinstance(value, State):
                values[key] = value.value
        assignments = ", ".join(f"{k} = ?" for k in values)
        expected = [s.value for s in expect]
        placeholders = ",".join("?" for _ in expected)
        with self._tx(durable):
            cur = self.db.execute(
                f"UPDATE jobs SET {assignments} WHERE id = ? AND state IN ({placeholders})",
                (*values.values(), job_id, *expected))
            if cur.rowcount != 1:
                return False
            for sql, args in also:  # statements that belong to the same transition
                self.db.execute(sql, args)
            self._event(job_id, event[0], event[1], now)
        return True

    def add_event(self, job_id: str, kind: str, detail: str | None = None) -> None:
        with self._tx():
            self._event(job_id, kind, detail, self.clock())

    def mark_stored(self, job: Job, media_key: str) -> bool:
        return self._update(job.id, [State.RECEIVED], ("stored", "document in the media store"),
                            state=State.STORED, media_key=media_key, tries=0,
                            next_run_at=self.clock())

    def mark_submitting(self, job: Job, callback_url: str, recheck_at: float) -> bool:
        """Committed before the send POST: a crash after this point leaves a job that is looked
        up at SignalWire, never blindly sent again."""
        now = self.clock()
        n = job.attempt + 1
        return self._update(
            job.id, [State.STORED],
            ("submitting", f"attempt {n}: sending to SignalWire ({job.quality} quality)"),
            also=[("INSERT INTO attempts (job_id, n, quality, started_at) VALUES (?, ?, ?, ?)",
                   (job.id, n, job.quality, now))], durable=True,
            state=State.SUBMITTING, callback_url=callback_url, submit_started_at=now,
            attempt=n, fax_sid=None, fax_status=None, error_code=None, error_message=None,
            next_run_at=recheck_at)

    def mark_submitted(self, job: Job, sid: str, status: str, poll_at: float,
                       detail: str) -> bool:
        return self._update(
            job.id, [State.SUBMITTING], ("submitted", detail),
            also=[("UPDATE attempts SET fax_sid = ? WHERE job_id = ? AND n = ?",
                   (sid, job.id, job.attempt))],
            state=State.SUBMITTED, fax_sid=sid, fax_status=status, tries=0, next_run_at=poll_at)

    def back_to_stored(self, job: Job, run_at: float, detail: str) -> bool:
        """The send did not happen (refused as retryable, or looked up and not found)."""
        return self._update(
            job.id, [State.SUBMITTING], ("retry", detail),
            also=[("DELETE FROM attempts WHERE job_id = ? AND n = ?", (job.id, job.attempt))],
            state=State.STORED, attempt=max(0, job.attempt - 1), tries=job.tries + 1,
            next_run_at=run_at)

    def schedule_retry(self, job: Job, run_at: float, quality: str, detail: str) -> bool:
        """Another fax attempt (busy, no answer, line trouble) after a final status."""
        return self._update(job.id, [State.COMPLETED], ("retry", detail), state=State.STORED,
                            quality=quality, tries=0, next_run_at=run_at)

    def retry_later(self, job: Job, run_at: float, detail: str) -> bool:
        """A step hit an outage: same state, try again later."""
        return self._update(job.id, [job.state], ("retry", detail), tries=job.tries + 1,
                            next_run_at=run_at)

    def mark_failed(self, job: Job, reason: str, error_code: str | None = None,
                    error_message: str | None = None) -> bool:
        now = self.clock()
        return self._update(
            job.id, [s for s in ACTIVE_STATES if s is not State.FAILED], ("failed", reason),
            also=[("UPDATE attempts SET status = ?, error_code = ?, error_message = ?,"
                   " ended_at = ? WHERE job_id = ? AND ended_at IS NULL",
                   ("not sent", error_code, error_message or reason, now, job.id))],
            state=State.FAILED, failure_reason=reason, error_code=error_code,
            error_message=error_message, tries=0, next_run_at=now)

    def record_status(self, job: Job, sid: str | None, status: str | None, *, pages: int | None,
                      duration_s: int | None, error_code: str | None,
                      error_message: str | None, source: str) -> CallbackAction:
        """Apply a fax status (callback or poll) idempotently; returns what it did."""
        with self._tx():
            row = self.db.execute("SELECT * FROM jobs WHERE id = ?", (job.id,)).fetchone()
            current = _job(row)
            action = classify_callback(current.state, current.fax_sid, sid, status)
            if action is not CallbackAction.IGNORE and sid and sid in self.earlier_sids(current):
                action = CallbackAction.IGNORE  # a late word on an earlier attempt's fax
            now = self.clock()
            detail = (f"{source}: status={status or '-'} sid={sid or '-'}"
                      + (f" pages={pages}" if pages is not None else "")
                      + (f" error={error_code or ''} {error_message}" if error_message else ""))
            if action is CallbackAction.FINAL:
                self.db.execute(
                    "UPDATE jobs SET state = ?, fax_sid = COALESCE(fax_sid, ?), fax_status = ?,"
                    " pages_sent = ?, duration_s = COALESCE(?, duration_s), error_code = ?,"
                    " error_message = ?, tries = 0, next_run_at = ?, updated_at = ?"
                    " WHERE id = ?",
                    (State.COMPLETED.value, sid, status, pages, duration_s, error_code,
                     error_message, now, now, job.id))
                self.db.execute(
                    "UPDATE attempts SET fax_sid = COALESCE(fax_sid, ?), status = ?,"
                    " error_code = ?, error_message = ?, pages = ?, duration_s = ?, ended_at = ?"
                    " WHERE job_id = ? AND n = ?",
                    (sid, status, error_code, error_message, pages, duration_s, now, job.id,
                     current.attempt))
                self._event(job.id, "final", detail, now)
            elif action is CallbackAction.PROGRESS:
                self.db.execute("UPDATE jobs SET fax_status = ?, fax_sid = COALESCE(fax_sid, ?),"
                                " updated_at = ? WHERE id = ?", (status, sid, now, job.id))
                self._event(job.id, "progress", detail, now)
            else:
                self._event(job.id, "ignored", detail, now)
        return action

    def mark_reported(self, job: Job, detail: str) -> bool:
        now = self.clock()
        return self._update(job.id, [State.COMPLETED, State.FAILED], ("reported", detail),
                            state=State.REPORTED, reported_at=now, next_run_at=None, tries=0)

    def unpurged_done_messages(self, cutoff: float, limit: int = 100) -> list[Message]:
        """Messages whose jobs were all reported before `cutoff` and whose document remains."""
        rows = self.db.execute(
            "SELECT * FROM messages m WHERE m.purged_at IS NULL AND NOT EXISTS ("
            " SELECT 1 FROM jobs j WHERE j.message_id = m.id"
            " AND (j.state <> 'reported' OR j.reported_at > ?)) ORDER BY m.created_at LIMIT ?",
            (cutoff, limit)).fetchall()
        return [Message(**dict(r)) for r in rows]

    def mark_purged(self, message_id: str) -> None:
        with self._tx():
            self.db.execute("UPDATE messages SET purged_at = ? WHERE id = ?",
                            (self.clock(), message_id))

    def prune(self, cutoff: float, limit: int = 1000) -> int:
        """Delete reported jobs (and their history) reported before `cutoff`; then messages left
        without jobs. Batched so a large prune never holds the write lock for long."""
        with self._tx():
            ids = [r[0] for r in self.db.execute(
                "SELECT id FROM jobs WHERE state = 'reported' AND reported_at < ? LIMIT ?",
                (cutoff, limit)).fetchall()]
            if not ids:
                return 0
            marks = ",".join("?" for _ in ids)
            for table, column in (("events", "job_id"), ("attempts", "job_id"), ("jobs", "id")):
                self.db.execute(f"DELETE FROM {table} WHERE {column} IN ({marks})", ids)
            self.db.execute("DELETE FROM messages WHERE purged_at IS NOT NULL AND NOT EXISTS"
                            " (SELECT 1 FROM jobs j WHERE j.message_id = messages.id)")
        return len(ids)

    # -- operator actions (faxgw jobs, job, resend, cancel, report) -----------------------

    def job_rows(self, *, status: str | None = None, to_digits: str | None = None,
                       sender: str | None = None, since: float | None = None,
                       limit: int = 50) -> list[Any]:
        """Jobs with their message and last event, newest
        first. `to_digits` matches the end of the number; `sender` is a case-insensitive part of
        the envelope sender, the From: address or the report address."""
        where: list[str] = []
        args: list[Any] = []
        if status == "active":
            states = sorted(s.value for s in ACTIVE_STATES)
            where.append(f"j.state IN ({','.join('?' for _ in states)})")
            args += states
        elif status:
            where.append("(j.state = ? OR j.fax_status = ?)")
            args += [status, status]
        if to_digits:
            where.append("j.to_number LIKE ?")
            args.append(f"%{to_digits}")
        if sender:
            pattern = "%" + _like_escape(sender.lower()) + "%"
            where.append("(" + " OR ".join(
                f"LOWER(COALESCE(m.{c}, '')) LIKE ? ESCAPE '\\'"
                for c in ("envelope_from", "header_from", "report_to")) + ")")
            args += [pattern] * 3
        if since is not None:
            where.append("j.created_at >= ?")
            args.append(since)
        sql = _ROW_SELECT + (" WHERE " + " AND ".join(where) if where else "")
        sql += " ORDER BY j.created_at DESC, j.id DESC LIMIT ?"
        args.append(limit)
        return self.db.execute(sql, args).fetchall()


    def job_ids_by_prefix(self, prefix: str, limit: int = 5) -> list[str]:
        """`prefix` is hex only (no wildcards)."""
        rows = self.db.execute("SELECT id FROM jobs WHERE id LIKE ? ORDER BY id LIMIT ?",
                                (prefix + "%", limit)).fetchall()
        return [r[0] for r in rows]


    def job_ids_by_fax_sid(self, sid: str) -> list[str]:
        """the job that sent a fax, by its
        SignalWire sid (the current attempt's, or an earlier attempt's)."""
        rows = self.db.execute(
            "SELECT id FROM jobs WHERE fax_sid = ? UNION SELECT job_id FROM attempts WHERE fax_sid = ?",
            (sid, sid)).fetchall()
        return sorted(r[0] for r in rows)


    def add_resend(self, job: Job, new: NewJob, now: float) -> str | None:
        """A new job for the message and number of `job`,
        in one transaction; None when done, else why not (document purged meanwhile, or another job
        of the message to the number is still under way). The insert is conditional on the document
        still being there, so it cannot slip in after a purge was recorded."""
        with self._tx():
            busy = self.db.execute(
                "SELECT id, state FROM jobs WHERE message_id = ? AND to_number = ? AND id <> ?"
                " AND state <> ?", (job.message_id, job.to_number, job.id,
                                    State.REPORTED.value)).fetchone()
            if busy is not None:
                return (f"job {busy[0]} for the same document and number is still under way "
                        f"({busy[1]}); wait for its report, or cancel it first")
            cur = self.db.execute(
                "INSERT INTO jobs (id, message_id, to_number, from_number, quality, state,"
                " callback_token, media_key, pages, attempt, tries, next_run_at, created_at,"
                " updated_at)"
                " SELECT ?, m.id, ?, ?, ?, ?, ?, ?, m.pages, 0, 0, ?, ?, ?"
                " FROM messages m WHERE m.id = ? AND m.purged_at IS NULL",
                (new.id, new.to_number, new.from_number, new.quality, State.RECEIVED.value,
                 new.callback_token, new.media_key, now, now, now, job.message_id))
            if cur.rowcount != 1:
                return "the document was deleted from the spool meanwhile"
            self._insert_event_at(new.id, "received", f"resend of job {job.id} by the operator", now)
            self._insert_event_at(job.id, "resent", f"sent again as job {new.id} by the operator",
                          now)
        return None


    def cancel_unsent(self, job_id: str, reason: str, now: float) -> bool:
        """Fail a job that has not reached SignalWire
        (received or stored) so its report tells the sender; False if it moved on meanwhile (the
        worker may have started the send: then it is not ours to fail)."""
        with self._tx():
            cur = self.db.execute(
                "UPDATE jobs SET state = ?, failure_reason = ?, error_code = NULL,"
                " error_message = NULL, tries = 0, next_run_at = ?, updated_at = ?"
                " WHERE id = ? AND state IN (?, ?)",
                (State.FAILED.value, reason, now, now, job_id, State.RECEIVED.value,
                 State.STORED.value))
            if cur.rowcount != 1:
                return False
            self._insert_event_at(job_id, "failed", reason, now)
        return True


    def note_cancel(self, job_id: str, detail: str, now: float) -> None:
        """Record a cancel done at SignalWire and have the
        worker fetch the fax's status now rather than wait for the callback or the next poll."""
        with self._tx():
            self.db.execute("UPDATE jobs SET next_run_at = ?, tries = 0, updated_at = ?"
                             " WHERE id = ? AND state = ?",
                             (now, now, job_id, State.SUBMITTED.value))
            self._insert_event_at(job_id, "cancel", detail, now)


    def report_again(self, job_id: str, state: State, now: float) -> bool:
        """Back from reported to `state` (completed or
        failed) with the report due now. `reported_at` is kept: it is how the worker tells a job
        that was reported before (report only) from a fresh final status (retries first)."""
        with self._tx():
            cur = self.db.execute(
                "UPDATE jobs SET state = ?, tries = 0, next_run_at = ?, updated_at = ?"
                " WHERE id = ? AND state = ?",
                (state.value, now, now, job_id, State.REPORTED.value))
            if cur.rowcount != 1:
                return False
            self._insert_event_at(job_id, "report-again", "report requested again by the operator",
                          now)
        return True


    def report_now(self, job_id: str, now: float) -> bool:
        """A report already due (completed or failed,
        maybe waiting out a relay outage): try it now."""
        with self._tx():
            cur = self.db.execute(
                "UPDATE jobs SET tries = 0, next_run_at = ?, updated_at = ?"
                " WHERE id = ? AND state IN (?, ?)",
                (now, now, job_id, State.COMPLETED.value, State.FAILED.value))
            if cur.rowcount != 1:
                return False
            self._insert_event_at(job_id, "report-now", "report retry requested by the operator",
                          now)
        return True


    def _insert_event_at(self, job_id: str, kind: str, detail: str, at: float) -> None:
        self.db.execute("INSERT INTO events (job_id, at, kind, detail) VALUES (?, ?, ?, ?)",
                         (job_id, at, kind, detail))

    def reschedule(self, job: Job, run_at: float) -> None:
        with self._tx():
            self.db.execute("UPDATE jobs SET next_run_at = ? WHERE id = ?", (run_at, job.id))


_ROW_SELECT = """
    SELECT j.*,
           m.envelope_from AS m_envelope_from, m.header_from AS m_header_from,
           m.report_to AS m_report_to, m.subject AS m_subject, m.peer AS m_peer,
           m.filenames AS m_filenames,
           e.at AS e_at, e.kind AS e_kind, e.detail AS e_detail
    FROM jobs j
    JOIN messages m ON m.id = j.message_id
    LEFT JOIN events e ON e.id = (SELECT MAX(e2.id) FROM events e2 WHERE e2.job_id = j.id)
"""


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT/ROLLBACK on an autocommit connection; a durable one commits
    with synchronous=FULL (the WAL is fsync'ed, with every commit before it)."""

    def __init__(self, db: sqlite3.Connection, durable: bool = False) -> None:
        self.db = db
        self.durable = durable

    def __enter__(self) -> None:
        if self.durable:
            self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            self.db.execute("COMMIT" if exc_type is None else "ROLLBACK")
        finally:
            if self.durable:
                self.db.execute("PRAGMA synchronous=NORMAL")
