"""Jobs in SQL: reads, the one guarded transition (checked against
`gateway.jobs.outbound_states.TRANSITIONS`, an event per change, fenced by the claim's lease epoch),
the worker's steps, the document's purge and the operator's actions."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from gateway.jobs.outbound_states import (
    ACTIVE_STATES,
    FINISHED,
    REPORT_DUE,
    CallbackAction,
    Ev,
    Job,
    State,
    check_transition,
    classify_callback,
)
from gateway.sanitise import one_line
from gateway.store.base import StoreError
from gateway.store.rows import Attempt, Event, Message, NewJob, UnderWay
from gateway.store.sql_core import _ATTEMPT_COLUMNS, _MESSAGE_COLUMNS, Expr, SqlCore, _job, _marks


def operator(by: str | None) -> str:
    """Who did an operator action, as written in the history: a name made one plain line of
    at most 80 characters (it comes from a login and is shown in the dashboard and the CLI),
    or "the operator" when no one is named (the CLI)."""
    name = one_line(by, 80) if by else ""
    return name or "the operator"


class SqlJobs(SqlCore):
    """The `Jobs` interface but its intake commit (sql_intake.py)."""

    # -- reads ---------------------------------------------------------------------------

    def job(self, job_id: str) -> Job | None:
        row = self._one("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return _job(row) if row else None

    def message(self, message_id: str) -> Message | None:
        row = self._one("SELECT * FROM messages WHERE id = ?", (message_id,))
        return Message(**{c: row[c] for c in _MESSAGE_COLUMNS}) if row else None

    def events(self, job_id: str) -> list[Event]:
        rows = self._rows("SELECT job_id, at, kind, detail FROM events WHERE job_id = ?"
                          " ORDER BY id", (job_id,))
        return [Event(**r) for r in rows]

    def attempts(self, job_id: str) -> list[Attempt]:
        rows = self._rows("SELECT * FROM attempts WHERE job_id = ? ORDER BY n", (job_id,))
        return [Attempt(**{c: r[c] for c in _ATTEMPT_COLUMNS}) for r in rows]

    def jobs(self, *, state: State | str | None = None, limit: int = 100) -> list[Job]:
        sql, args = "SELECT * FROM jobs", list[Any]()
        if state:
            sql += " WHERE state = ?"
            args.append(str(state))
        sql += " ORDER BY created_at DESC LIMIT ?"
        args.append(limit)
        return [_job(r) for r in self._rows(sql, args)]

    def message_jobs(self, message_id: str, unpurged: bool = False) -> list[Job]:
        if unpurged:
            rows = self._rows("SELECT * FROM jobs WHERE message_id = ? AND NOT EXISTS ("
                              " SELECT 1 FROM messages WHERE id = ? AND purged_at IS NOT NULL)"
                              " ORDER BY id", (message_id, message_id))
        else:
            rows = self._rows("SELECT * FROM jobs WHERE message_id = ? ORDER BY id",
                              (message_id,))
        return [_job(r) for r in rows]

    def _sid_owners(self, job: Job, sids: Sequence[str]) -> set[str]:
        """Of these fax sids, those the store knows as another job's, or as an earlier
        attempt's of this one: a sid belongs to one job (the `attempts_fax_sid` index)."""
        sids = list(sids)
        if not sids:
            return set()
        rows = self._rows(
            f"SELECT fax_sid FROM attempts WHERE fax_sid IN ({_marks(sids)})"
            " AND NOT (job_id = ? AND n = ?)"
            f" UNION SELECT fax_sid FROM jobs WHERE fax_sid IN ({_marks(sids)}) AND id <> ?",
            (*sids, job.id, job.attempt, *sids, job.id))
        return {r["fax_sid"] for r in rows}

    def taken_sids(self, job: Job, sids: Iterable[str]) -> set[str]:
        return self._sid_owners(job, list(sids))

    # -- the one guarded change ----------------------------------------------------------

    def transition(self, job_id: str, sources: Iterable[State], target: State | None,
                   event: str, detail: str | None, *, durable: bool = False,
                   also: Iterable[tuple[str, Sequence[Any]]] = (), at: float | None = None,
                   mine: bool = False, fence: int | None = None, **values: Any) -> bool:
        sources = list(sources)
        with self._tx(durable):
            return self._transition(job_id, sources, target, event, detail, also=also, at=at,
                                    mine=mine, fence=fence, **values)

    def _transition(self, job_id: str, sources: list[State], target: State | None, event: str,
                    detail: str | None, *, also: Iterable[tuple[str, Sequence[Any]]] = (),
                    at: float | None = None, mine: bool = False, fence: int | None = None,
                    **values: Any) -> bool:
        """`transition` inside a transaction the caller holds.

        The state check in the UPDATE is what keeps a late worker step or a replayed callback
        from undoing a newer state, and what lets several instances share one queue. `fence`:
        the lease epoch the worker claimed the job with (a worker step's change): the change
        is made only while no claim came since (no other node took the job over), in the same
        UPDATE, so a node that stalled past its lease records nothing and goes no further.
        """
        update, args, now = self._transition_update(job_id, sources, target, event, at, mine,
                                                    fence, values)
        if self._exec(update, args) != 1:
            return False
        for sql, extra in also:  # statements that belong to the same transition
            self._exec_later(sql, extra)
        self._event(job_id, event, detail, now)
        return True

    def _transition_update(self, job_id: str, sources: list[State], target: State | None,
                           event: str, at: float | None, mine: bool, fence: int | None,
                           values: dict[str, Any]) -> tuple[str, list[Any], float]:
        """The guarded UPDATE of a transition: (its SQL, its arguments, the time it records)."""
        for source in sources:
            check_transition([source], source if target is None else target, event)
        now = self.clock() if at is None else at
        values["updated_at"] = now
        if target is not None:
            values["state"] = target.value
        assignments, args = list[str](), list[Any]()
        for key, value in values.items():
            if isinstance(value, Expr):
                assignments.append(f"{key} = {value.sql}")
                args += value.args
            else:
                assignments.append(f"{key} = ?")
                args.append(value.value if isinstance(value, State) else value)
        expected = [s.value for s in sources]
        # `mine`: only while no other node holds the job (a node that stalled past its lease
        # must not send a fax the node that took the job over is sending).
        guard, guard_args = "", list[Any]()
        if mine or fence is not None:
            guard, guard_args = " AND (lease_owner IS NULL OR lease_owner = ?)", [self.node_id]
        if fence is not None:
            guard += " AND lease_epoch = ?"
            guard_args.append(fence)
        return (f"UPDATE jobs SET {', '.join(assignments)} WHERE id = ?"
                f" AND state IN ({_marks(expected)}){guard}",
                [*args, job_id, *expected, *guard_args], now)

    # -- worker steps --------------------------------------------------------------------

    def add_event(self, job_id: str, kind: str, detail: str | None = None) -> None:
        with self._tx():
            self._event(job_id, kind, detail, self.clock())

    def mark_stored(self, job: Job, media_key: str) -> bool:
        return self.transition(job.id, [State.SPOOLED], State.STORED, Ev.STORED,
                               "document in the media store", fence=job.lease_epoch,
                               media_key=media_key, tries=0, next_run_at=self.clock())

    def mark_submitting(self, job: Job, callback_url: str, recheck_at: float) -> bool:
        """Committed before the send POST: a crash after this point leaves a job that is looked
        up at SignalWire, never blindly sent again."""
        with self._tx(durable=True):
            return self._mark_submitting(job, callback_url, recheck_at)

    def _mark_submitting(self, job: Job, callback_url: str, recheck_at: float) -> bool:
        """`mark_submitting` inside a (durable) transaction the caller holds."""
        args, kwargs = self._submitting(job, callback_url, recheck_at)
        return self._transition(*args, **kwargs)

    def _submitting_row(self, job: Job, callback_url: str, recheck_at: float) -> Job | None:
        """`_mark_submitting`, and the job's row as it is then (None: it did not apply)."""
        if not self._mark_submitting(job, callback_url, recheck_at):
            return None
        return self.job(job.id)

    def _submitting(self, job: Job, callback_url: str, recheck_at: float
                    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The transition to `submitting`: `_transition`'s arguments."""
        now = self.clock()
        n = job.attempt + 1
        return ((job.id, [State.STORED], State.SUBMITTING, Ev.SUBMITTING,
                 f"attempt {n}: sending to SignalWire ({job.quality} quality)"),
                {"also": [("INSERT INTO attempts (job_id, n, quality, started_at)"
                           " VALUES (?, ?, ?, ?)", (job.id, n, job.quality, now))],
                 "fence": job.lease_epoch, "callback_url": callback_url,
                 "submit_started_at": now, "attempt": n, "fax_sid": None, "fax_status": None,
                 "error_code": None, "error_message": None, "next_run_at": recheck_at})

    def mark_submitted(self, job: Job, sid: str, status: str, poll_at: float,
                       detail: str) -> bool:
        return self.transition(
            job.id, [State.SUBMITTING], State.SUBMITTED, Ev.SUBMITTED, detail,
            also=[("UPDATE attempts SET fax_sid = ? WHERE job_id = ? AND n = ?",
                   (sid, job.id, job.attempt))], fence=job.lease_epoch,
            fax_sid=sid, fax_status=status, tries=0, next_run_at=poll_at)

    def mark_outcome_unknown(self, job: Job, recheck_at: float, detail: str) -> bool:
        """The send's answer never came: look the fax up at `recheck_at`, never resend blind."""
        return self.transition(job.id, [State.SUBMITTING], None, Ev.UNKNOWN, detail,
                               fence=job.lease_epoch, next_run_at=recheck_at)

    def back_to_stored(self, job: Job, run_at: float, detail: str) -> bool:
        """The send did not happen (refused as retryable, or looked up and not found)."""
        return self.transition(
            job.id, [State.SUBMITTING], State.STORED, Ev.RETRY, detail,
            also=[("DELETE FROM attempts WHERE job_id = ? AND n = ?", (job.id, job.attempt)),
                  *self._announcing()],
            fence=job.lease_epoch, attempt=max(0, job.attempt - 1), tries=job.tries + 1,
            next_run_at=run_at)

    def schedule_retry(self, job: Job, run_at: float, quality: str, detail: str) -> bool:
        """Another fax attempt (busy, no answer, line trouble) after a final status. The
        other nodes are told, so that whichever is free at `run_at` sends it."""
        return self.transition(job.id, [State.COMPLETED], State.STORED, Ev.RETRY, detail,
                               also=self._announcing(), fence=job.lease_epoch,
                               quality=quality, tries=0, next_run_at=run_at)

    def retry_later(self, job: Job, run_at: float, detail: str) -> bool:
        """A step hit an outage: same state, try again later."""
        return self.transition(job.id, [job.state], None, Ev.RETRY, detail,
                               fence=job.lease_epoch, tries=job.tries + 1, next_run_at=run_at)

    def mark_given_up(self, job: Job, reason: str, error_code: str | None = None,
                      error_message: str | None = None) -> bool:
        now = self.clock()
        return self.transition(
            job.id, sorted(ACTIVE_STATES - {State.GIVEN_UP}), State.GIVEN_UP, Ev.GIVEN_UP,
            reason,
            also=[("UPDATE attempts SET status = ?, error_code = ?, error_message = ?,"
                   " ended_at = ? WHERE job_id = ? AND ended_at IS NULL",
                   ("not sent", error_code, error_message or reason, now, job.id))],
            fence=job.lease_epoch, failure_reason=reason, error_code=error_code,
            error_message=error_message,
            tries=0, next_run_at=now)

    def record_status(self, job: Job, sid: str | None, status: str | None, *, pages: int | None,
                      duration_s: int | None, error_code: str | None,
                      error_message: str | None, source: str) -> CallbackAction:
        """The job is read, classified and changed (`_record`)."""
        _, action = self._record("id", job.id, None, sid, status, pages, duration_s,
                                 error_code, error_message, source)
        return CallbackAction.IGNORE if action is None else action  # None: no such job

    def record_callback(self, token: str, accept: Callable[[Job], bool], sid: str | None,
                        status: str | None, *, pages: int | None, error_code: str | None,
                        error_message: str | None) -> tuple[Job | None, CallbackAction | None]:
        """A status callback's lookup (the job of `token`) and `record_status` in one call
        (`_record`). `accept(job)` is the caller's check of the request against the
        job (its signature, made with the job's callback URL): False records nothing.
        (None, None): no job has this token (or it was never sent); (job, None): refused."""
        found, action = self._record("callback_token", token,
                                     lambda job: bool(job.callback_url) and accept(job),
                                     sid, status, pages, None, error_code, error_message,
                                     "callback")
        if found is not None and not found.callback_url:
            return None, None  # never sent: no callback can be its
        return found, action

    def _record(self, column: str, key: str, accept: Callable[[Job], bool] | None,
                sid: str | None, status: str | None, pages: int | None,
                duration_s: int | None, error_code: str | None, error_message: str | None,
                source: str) -> tuple[Job | None, CallbackAction | None]:
        """The job whose `column` is `key`, checked by `accept` (False: nothing recorded,
        (job, None)), then classified and changed, in one transaction on SQLite and as a read
        and a guarded statement on PostgreSQL (`_guarded_tx`); (None, None): no such
        job. On PostgreSQL the change may still find the job moved on (the send's answer
        recorded meanwhile by another connection: `submitting` -> `submitted`), and then the
        status is classified again against what the job is now, so a final status is never
        lost."""
        for _ in range(5):
            with self._guarded_tx():
                row = self._one(f"SELECT * FROM jobs WHERE {column} = ?", (key,))
                if row is None:
                    return None, None
                job = _job(row)
                if accept is not None and not accept(job):
                    return job, None
                action = self._apply_status(job, sid, status, pages, duration_s, error_code,
                                            error_message, source)
            if action is not None:
                return job, action
        raise StoreError(f"job {job.id}: the status {status} could not be recorded: the job "
                         "kept changing")

    def _apply_status(self, current: Job, sid: str | None, status: str | None,
                      pages: int | None, duration_s: int | None, error_code: str | None,
                      error_message: str | None, source: str) -> CallbackAction | None:
        """Inside the caller's transaction: classify the status against the job as read
        there and record it. None: the job moved on meanwhile (read it again and retry)."""
        # A late word on an earlier attempt's fax is history: with this attempt's sid
        # known, any other sid is (classify_callback); before it is, the sid is looked up.
        action = classify_callback(current.state, current.fax_sid, sid, status)
        if (action is not CallbackAction.IGNORE and sid and current.fax_sid is None
                and self._sid_owners(current, [sid])):
            action = CallbackAction.IGNORE  # another job's, or an earlier attempt's
        now = self.clock()
        detail = (f"{source}: status={status or '-'} sid={sid or '-'}"
                  + (f" pages={pages}" if pages is not None else "")
                  + (f" error={error_code or ''} {error_message}" if error_message else ""))
        done = True
        if action is CallbackAction.FINAL:
            done = self._transition(
                current.id, [current.state], State.COMPLETED, Ev.FINAL, detail,
                also=[("UPDATE attempts SET fax_sid = COALESCE(fax_sid, ?), status = ?,"
                       " error_code = ?, error_message = ?, pages = ?, duration_s = ?,"
                       " ended_at = ? WHERE job_id = ? AND n = ?",
                       (sid, status, error_code, error_message, pages, duration_s, now,
                        current.id, current.attempt)),
                      # The number is free again: a job waiting for it may go now, from
                      # whichever node is free.
                      *self._announcing(
                          "EXISTS (SELECT 1 FROM jobs WHERE to_number = ? AND state = ?"
                          " AND id <> ?)", (current.to_number, State.STORED.value, current.id))],
                fax_sid=Expr("COALESCE(fax_sid, ?)", sid), fax_status=status,
                pages_sent=pages, duration_s=Expr("COALESCE(?, duration_s)", duration_s),
                error_code=error_code, error_message=error_message, tries=0,
                next_run_at=now)
        elif action is CallbackAction.PROGRESS:
            done = self._transition(current.id, [current.state], None, Ev.PROGRESS, detail,
                                    fax_status=status,
                                    fax_sid=Expr("COALESCE(fax_sid, ?)", sid))
        else:
            self._event(current.id, "ignored", detail, now)
        return action if done else None

    def mark_reporting(self, job: Job, n: int, detail: str) -> bool:
        """Committed before report `n` goes to the relay, fenced: a node that lost the job
        does not mail. Until `mark_reported`, the report's outcome is uncertain (`reporting_at`
        set): the node that takes the job over mails it again under the same number, so the
        same Message-ID. Not a durable commit (SQLite: no fsync of its own): lost to a power
        cut, the report's number is worked out again the same (the one recorded, plus one)."""
        return self.transition(job.id, [job.state], None, Ev.REPORTING, detail,
                               fence=job.lease_epoch, report_n=n, reporting_at=self.clock())

    def mark_reported(self, job: Job, detail: str) -> bool:
        return self.transition(job.id, sorted(REPORT_DUE), State.REPORTED, Ev.REPORTED, detail,
                               fence=job.lease_epoch, reported_at=self.clock(),
                               reporting_at=None, next_run_at=None, tries=0)

    # -- the document's end --------------------------------------------------------------

    def gone_messages(self, ids: Sequence[str]) -> set[str]:
        """Of these message ids, those whose document may go: purged, or no such message."""
        ids = list(ids)
        if not ids:
            return set()
        kept = {r["id"] for r in self._rows(
            f"SELECT id FROM messages WHERE purged_at IS NULL AND id IN ({_marks(ids)})", ids)}
        return set(ids) - kept

    def unpurged_done_messages(self, cutoff: float, limit: int = 100) -> list[Message]:
        """Messages whose jobs were all reported before `cutoff` and whose document remains."""
        rows = self._rows(
            "SELECT * FROM messages m WHERE m.purged_at IS NULL AND NOT EXISTS ("
            " SELECT 1 FROM jobs j WHERE j.message_id = m.id"
            " AND (j.state <> 'reported' OR j.reported_at > ?)) ORDER BY m.created_at LIMIT ?",
            (cutoff, limit))
        return [Message(**{c: r[c] for c in _MESSAGE_COLUMNS}) for r in rows]

    def claim_purge(self, message_id: str, job: Job | None = None) -> bool:
        """Recorded before a message's document is deleted, in one statement with its checks:
        every job of the message reported, and (`job`: the purge follows that job's report)
        the job still held under the claim it was reported with. From here no resend takes
        the document (`add_resend`); False: leave it be."""
        with self._tx():
            return self._claim_purge(message_id, job)

    def _claim_purge(self, message_id: str, job: Job | None) -> bool:
        """`claim_purge` inside a transaction the caller holds."""
        self._claim_lock("purge")
        return self._exec(*self._purge_claim(message_id, job)) == 1

    def _purge_claim(self, message_id: str, job: Job | None) -> tuple[str, list[Any]]:
        """The statement of `claim_purge` (under the purge lock)."""
        fence, args = "", [self.clock(), message_id, message_id]
        if job is not None:
            fence = (" AND EXISTS (SELECT 1 FROM jobs WHERE id = ? AND lease_epoch = ?"
                     " AND (lease_owner IS NULL OR lease_owner = ?))")
            args += [job.id, job.lease_epoch, self.node_id]
        return ("UPDATE messages SET purging_at = ? WHERE id = ? AND purged_at IS NULL"
                " AND NOT EXISTS (SELECT 1 FROM jobs WHERE message_id = ?"
                f" AND state <> 'reported'){fence}", args)

    def _claim_purge_jobs(self, message_id: str, job: Job) -> list[Job] | None:
        """Under the purge lock the caller took: `claim_purge`, and the message's jobs if it
        is claimed (else None)."""
        if self._exec(*self._purge_claim(message_id, job)) != 1:
            return None
        return self.message_jobs(message_id)

    def mark_reported_and_claim_purge(self, job: Job, detail: str) -> tuple[bool, list[Job] | None]:
        """`mark_reported`, then in the same transaction `claim_purge` of the job's message
        (its last report: every job of it reported), as a report's end with no document
        retention does: one commit where there were three. Returns (recorded, the message's
        jobs when its purge is now claimed, else None)."""
        with self._tx():
            # The purge lock is taken with the transition (PostgreSQL: in its statement, and
            # only if it applied), before the claim reads which jobs are reported.
            if not self._transition(job.id, sorted(REPORT_DUE), State.REPORTED, Ev.REPORTED,
                                    detail, also=self._locking("purge"), fence=job.lease_epoch,
                                    reported_at=self.clock(), reporting_at=None,
                                    next_run_at=None, tries=0):
                return False, None
            return True, self._claim_purge_jobs(job.message_id, job)

    def mark_purged(self, message_id: str) -> None:
        # One statement, committed by itself: no BEGIN and COMMIT around it.
        self._exec("UPDATE messages SET purged_at = ? WHERE id = ?", (self.clock(), message_id))

    def prune(self, cutoff: float, limit: int = 1000) -> int:
        """Delete reported jobs (and their history) reported before `cutoff`; then messages left
        without jobs. Batched so a large prune never holds the write lock for long."""
        with self._tx():
            ids = [r["id"] for r in self._rows(
                "SELECT id FROM jobs WHERE state = 'reported' AND reported_at < ? LIMIT ?",
                (cutoff, limit))]
            if not ids:
                return 0
            for table, column in (("events", "job_id"), ("attempts", "job_id"),
                                  ("dedup_keys", "job_id"), ("jobs", "id")):
                self._exec_later(f"DELETE FROM {table} WHERE {column} IN ({_marks(ids)})", ids)
            self._exec_later("DELETE FROM messages WHERE purged_at IS NOT NULL AND NOT EXISTS"
                             " (SELECT 1 FROM jobs j WHERE j.message_id = messages.id)")
        return len(ids)

    # -- operator actions ----------------------------------------------------------------

    def add_resend(self, job: Job, new: NewJob, now: float, *, stored: bool = False,
                   by: str | None = None) -> str | UnderWay | None:
        """A new job for the message and number of `job`, in one transaction; None when done,
        else why not (document purged meanwhile, or `UnderWay`: another job of the message to
        the number is still under way). The insert is conditional on the document still being
        there, so it cannot slip in after a purge was recorded.

        The transaction first locks the message's row (PostgreSQL; SQLite's BEGIN IMMEDIATE
        already serialises writers), so the look for a job under way and the new job are one
        step: two resends of one mail at the same moment, on one node or two, are taken one
        after the other, and the second finds the first's job."""
        check_transition([None], State.SPOOLED, Ev.RECEIVED)
        try:
            return self._add_resend(job, new, now, stored, operator(by))
        except _Rollback as exc:
            return str(exc)

    def _add_resend(self, job: Job, new: NewJob, now: float, stored: bool,
                    who: str) -> str | UnderWay | None:
        with self._tx():
            self._claim_lock("purge")  # one or the other: this resend, or the purge
            self._rows(f"SELECT id FROM messages WHERE id = ?{self.FOR_UPDATE}",
                       (job.message_id,))
            busy = self._one(
                "SELECT id, state FROM jobs WHERE message_id = ? AND to_number = ? AND id <> ?"
                " AND state <> ? ORDER BY created_at DESC LIMIT 1",
                (job.message_id, job.to_number, job.id, State.REPORTED.value))
            if busy is not None:
                # A resend's first event says so (see below); an intake job's does not.
                first = self._one("SELECT kind, detail FROM events WHERE job_id = ?"
                                  " ORDER BY id LIMIT 1", (busy["id"],))
                resend = (first is not None and first["kind"] == Ev.RECEIVED
                          and (first["detail"] or "").startswith("resend of job "))
                return UnderWay(busy["id"], busy["state"], resend)
            inserted = self._exec(
                "INSERT INTO jobs (id, message_id, to_number, from_number, quality, state,"
                " callback_token, media_key, pages, attempt, tries, next_run_at, created_at,"
                " updated_at, dsn_notify, dsn_orcpt)"
                " SELECT ?, m.id, ?, ?, ?, ?, ?, ?, m.pages, 0, 0, ?, ?, ?, ?, ?"
                " FROM messages m WHERE m.id = ? AND m.purged_at IS NULL"
                " AND m.purging_at IS NULL",
                (new.id, new.to_number, new.from_number, new.quality, State.SPOOLED.value,
                 new.callback_token, new.media_key, now, now, now, new.dsn_notify,
                 new.dsn_orcpt, job.message_id))
            if inserted != 1:
                return "the document was deleted from the spool meanwhile"
            self._event(new.id, Ev.RECEIVED, f"resend of job {job.id} by {who}", now)
            if stored:  # a shared queue: the document is in the media store already
                self._transition(new.id, [State.SPOOLED], State.STORED, Ev.STORED,
                                 "document already in the media store", at=now, tries=0,
                                 next_run_at=now)
            if not self._transition(job.id, sorted(FINISHED), None, Ev.RESENT,
                                    f"sent again as job {new.id} by {who}", at=now):
                raise _Rollback(f"job {job.id} is no longer finished")
            self._announce()  # whichever node is free sends it
        return None

    def cancel_unsent(self, job_id: str, reason: str, now: float, *,
                      by: str | None = None) -> bool:
        """Give up a job that has not reached SignalWire (spooled or stored) so its report
        tells the sender `reason`; the history names who canceled it. False if it moved on
        meanwhile (the worker may have started the send: then it is not ours to stop)."""
        detail = f"canceled by {operator(by)}" if by else reason
        # fax_status "canceled": not the busy line of an earlier attempt waiting for its retry.
        return self.transition(job_id, [State.SPOOLED, State.STORED], State.GIVEN_UP,
                               Ev.CANCELED, detail, also=self._announcing(), at=now,
                               failure_reason=reason, fax_status="canceled", error_code=None,
                               error_message=None, tries=0, next_run_at=now)

    def note_cancel(self, job_id: str, detail: str, now: float, *,
                    by: str | None = None) -> bool:
        """Record a cancel done at SignalWire ("`detail` by <who>") and have the worker fetch
        the fax's status now rather than wait for the callback or the next poll."""
        return self.transition(job_id, [State.SUBMITTED], None, Ev.CANCEL,
                               f"{detail} by {operator(by)}", also=self._announcing(), at=now,
                               next_run_at=now, tries=0)

    def report_again(self, job_id: str, state: State, now: float, *,
                     by: str | None = None) -> bool:
        """Back from reported to `state` (completed or given-up) with the report due now.
        `reported_at` is kept: it is how the worker tells a job that was reported before
        (report only) from a fresh final status (retries first)."""
        return self.transition(job_id, [State.REPORTED], state, Ev.REPORT_AGAIN,
                               f"report requested again by {operator(by)}",
                               also=self._announcing(), at=now, tries=0, next_run_at=now)

    def report_now(self, job_id: str, now: float, *, by: str | None = None) -> bool:
        """A report already due (maybe waiting out a relay outage): try it now."""
        job = self.job(job_id)
        if job is None or job.state not in REPORT_DUE:
            return False
        return self.transition(job_id, [job.state], None, Ev.REPORT_NOW,
                               f"report retry requested by {operator(by)}",
                               also=self._announcing(), at=now, tries=0, next_run_at=now)


class _Rollback(StoreError):
    """Raised inside a transaction to undo it."""
