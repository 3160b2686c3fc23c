"""The reads over all jobs for the dashboard, the metrics and the CLI: counts, a listing with
each job's message and last event, and a page of a search filtered, counted and paged in SQL."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from gateway.jobs.outbound_states import ACTIVE_STATES, State
from gateway.store.rows import Event, JobListing
from gateway.store.sql_core import JOB_COLUMNS, SqlCore, _job, _marks, like_escape

_LISTING_MESSAGE_FIELDS = ("envelope_from", "header_from", "report_to", "subject", "peer",
                           "filenames")

_LISTING = """
    SELECT {job_columns}, {message_columns},
           e.at AS e_at, e.kind AS e_kind, e.detail AS e_detail
    FROM jobs j
    JOIN messages m ON m.id = j.message_id
    LEFT JOIN events e ON e.id = (SELECT MAX(e2.id) FROM events e2 WHERE e2.job_id = j.id)
""".format(job_columns=", ".join(f"j.{c}" for c in JOB_COLUMNS),
           message_columns=", ".join(f"m.{c} AS m_{c}" for c in _LISTING_MESSAGE_FIELDS))


class SqlListings(SqlCore):
    """The `Listings` interface."""

    def queue_depth(self) -> int:
        states = sorted(s.value for s in ACTIVE_STATES)
        return int(self._scalar(f"SELECT COUNT(*) AS n FROM jobs WHERE state IN"
                                f" ({_marks(states)})", states) or 0)

    def oldest_active_created_at(self) -> float | None:
        states = sorted(s.value for s in ACTIVE_STATES)
        return self._scalar(
            f"SELECT MIN(created_at) AS t FROM jobs WHERE state IN ({_marks(states)})", states)

    def counts_by_state(self) -> dict[str, int]:
        rows = self._rows("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")
        return {r["state"]: r["n"] for r in rows}

    def job_listing(self, *, states: Iterable[State] | None = None,
                    fax_status: str | None = None, to_digits: str | None = None,
                    sender: str | None = None, since: float | None = None,
                    limit: int = 50, gave_up: bool = False) -> list[JobListing]:
        """`states` and `fax_status` are separate filters (a state word never names a fax
        status); `to_digits` matches the end of the number; `sender` is a case-insensitive
        part of the envelope sender, the From: address or the report address; `gave_up`:
        the jobs the gateway gave up (canceled included), reported to the sender or not."""
        where, args = _job_filters(states, fax_status, to_digits, sender, since, gave_up)
        sql = _LISTING + (" WHERE " + " AND ".join(where) if where else "")
        sql += " ORDER BY j.created_at DESC, j.id DESC LIMIT ?"
        args.append(limit)
        return [_listing(r) for r in self._rows(sql, args)]

    def job_search(self, *, states: Iterable[State] | None = None,
                   fax_status: str | None = None, to_digits: str | None = None,
                   sender: str | None = None, since: float | None = None,
                   until: float | None = None, text: str | None = None, offset: int = 0,
                   limit: int = 25) -> tuple[list[JobListing], int]:
        """One page of `job_listing` (newest first) with its filters plus an end time
        (`until`, exclusive) and a free-text search (`text`: a case-insensitive part of the
        job id, number, fax id, sender addresses, subject, file names or error), and how many
        jobs match in all. Filtered, counted and paged in SQL (the dashboard over any number
        of jobs); the page's ids first, then their rows, so the last event is looked up for
        the page only."""
        where, args = _job_filters(states, fax_status, to_digits, sender, since)
        needs_message = bool(sender)
        if until is not None:
            where.append("j.created_at < ?")
            args.append(until)
        if text:
            needs_message = True
            pattern = "%" + like_escape(text.strip().lower()) + "%"
            columns = ("j.id", "j.to_number", "j.fax_sid", "j.fax_status", "j.failure_reason",
                       "j.error_message", "m.envelope_from", "m.header_from", "m.report_to",
                       "m.subject", "m.filenames")
            where.append("(" + " OR ".join(f"LOWER(COALESCE({c}, '')) LIKE ? ESCAPE '\\'"
                                           for c in columns) + ")")
            args += [pattern] * len(columns)
        source = "jobs j" + (" JOIN messages m ON m.id = j.message_id" if needs_message else "")
        condition = (" WHERE " + " AND ".join(where)) if where else ""
        total = int(self._scalar(f"SELECT COUNT(*) AS n FROM {source}{condition}", args) or 0)
        if total <= offset:
            return [], total
        ids = [r["id"] for r in self._rows(
            f"SELECT j.id FROM {source}{condition}"
            " ORDER BY j.created_at DESC, j.id DESC LIMIT ? OFFSET ?", [*args, limit, offset])]
        if not ids:
            return [], total
        sql = (_LISTING + f" WHERE j.id IN ({_marks(ids)})"
               " ORDER BY j.created_at DESC, j.id DESC")
        return [_listing(r) for r in self._rows(sql, ids)], total

    def job_ids_by_prefix(self, prefix: str, limit: int = 5) -> list[str]:
        """`prefix` is hex only (no wildcards)."""
        rows = self._rows("SELECT id FROM jobs WHERE id LIKE ? ORDER BY id LIMIT ?",
                          (prefix + "%", limit))
        return [r["id"] for r in rows]

    def job_ids_by_fax_sid(self, sid: str) -> list[str]:
        """The job that sent a fax, by the sid of its current attempt or an earlier one."""
        rows = self._rows("SELECT id FROM jobs WHERE fax_sid = ?"
                          " UNION SELECT job_id AS id FROM attempts WHERE fax_sid = ?",
                          (sid, sid))
        return sorted(r["id"] for r in rows)


def _job_filters(states: Iterable[State] | None, fax_status: str | None,
                 to_digits: str | None, sender: str | None, since: float | None,
                 gave_up: bool = False) -> tuple[list[str], list[Any]]:
    """The WHERE terms (over `jobs j` joined to `messages m`) and their arguments that
    `job_listing` and `job_search` share."""
    where: list[str] = []
    args: list[Any] = []
    if states is not None:
        values = sorted(s.value for s in states)
        where.append(f"j.state IN ({_marks(values)})")
        args += values
    if gave_up:
        where.append("(j.state = ? OR (j.state = ? AND j.failure_reason IS NOT NULL))")
        args += [State.GIVEN_UP.value, State.REPORTED.value]
    if fax_status:
        where.append("j.fax_status = ?")
        args.append(fax_status)
    if to_digits:
        where.append("j.to_number LIKE ?")
        args.append(f"%{to_digits}")
    if sender:
        pattern = "%" + like_escape(sender.lower()) + "%"
        where.append("(" + " OR ".join(
            f"LOWER(COALESCE(m.{c}, '')) LIKE ? ESCAPE '\\'"
            for c in ("envelope_from", "header_from", "report_to")) + ")")
        args += [pattern] * 3
    if since is not None:
        where.append("j.created_at >= ?")
        args.append(since)
    return where, args


def _listing(r: dict[str, Any]) -> JobListing:
    """A listing row (`_LISTING`): the job, its message's fields, its last event."""
    job = _job(r)
    last = (Event(job.id, r["e_at"], r["e_kind"], r["e_detail"])
            if r["e_kind"] is not None else None)
    return JobListing(job, last_event=last, **{c: r[f"m_{c}"] for c in _LISTING_MESSAGE_FIELDS})
