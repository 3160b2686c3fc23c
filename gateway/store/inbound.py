"""Inbound fax persistence: one row per received fax, one per (fax, recipient) mail sent.

The tables come from migration 3 (gateway/store/migrations.py). The queries are written once in
portable SQL and run through the job store's own dialect hooks (`_tx`, `_exec_later`, `_rows`),
so they work on every SQL backend; every method runs on the main store's own thread and connection
(`await store.run(inbound.method, ...)`), so writes are serialised with the job store's.

Exactly-once per recipient: a recipient's mail is recorded in `inbound_deliveries` only after the
relay accepted it, keyed by (fax_sid, recipient), so duplicate callbacks, the reconciler and a
restart after kill -9 all see what was already sent. A crash between the relay's acceptance and
that commit sends that one mail again, with the same Message-ID.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Iterable

from gateway.store.base import StoreError
from gateway.store.sql import SqlStore, _like_escape


# Row states. `ringing`: the webhook was answered with <Receive>, no outcome yet; `rejected`:
# answered with <Reject/>; `delivering`: the outcome is recorded and mail is due; `deleting`:
# every mail went out, the media is to be deleted at SignalWire; `done`; `gave_up`.
RINGING, REJECTED, DELIVERING, DELETING, DONE, GAVE_UP = (
    "ringing", "rejected", "delivering", "deleting", "done", "gave_up")
DUE_STATES = (DELIVERING, DELETING)


@dataclass(frozen=True)
class InboundFax:
    fax_sid: str
    account_sid: str | None
    from_number: str | None
    to_number: str | None
    state: str
    outcome: str | None
    fax_status: str | None
    num_pages: int | None
    media_url: str | None
    media_sid: str | None
    remote_station_id: str | None
    error_code: str | None
    error_message: str | None
    recipients: str | None
    source: str | None
    tries: int
    next_run_at: float | None
    last_error: str | None
    called_at: float | None
    completed_at: float | None
    media_deleted_at: float | None
    done_at: float | None
    created_at: float
    updated_at: float

    @property
    def recipient_list(self) -> tuple[str, ...]:
        return tuple(r for r in (self.recipients or "").split(",") if r)


@dataclass(frozen=True)
class Completion:
    """What SignalWire said when the fax ended (action callback or the fax resource)."""

    fax_sid: str
    account_sid: str | None
    from_number: str | None
    to_number: str | None
    fax_status: str
    outcome: str
    num_pages: int | None
    media_url: str | None
    media_sid: str | None
    remote_station_id: str | None
    error_code: str | None
    error_message: str | None
    recipients: tuple[str, ...]
    source: str
    completed_at: float


_COLUMNS = [f.name for f in fields(InboundFax)]


def _row(row: dict[str, Any]) -> InboundFax:
    return InboundFax(**{c: row[c] for c in _COLUMNS})


class InboundStore:
    """Inbound fax rows on the main store's connection. Synchronous methods: call them through
    `store.run(...)` in the daemon, directly from the CLI (which opens the store itself)."""

    def __init__(self, store: SqlStore) -> None:
        self.store = store
        self._tx = store._tx
        self._exec_later = store._exec_later
        self._rows = store._rows
        self._one = store._one

    def enabled_since(self, now: float) -> float:
        """When inbound delivery was first switched on here: the reconciler never reaches
        back before it, so a new installation does not mail faxes an earlier system handled."""
        with self._tx():
            row = self._one("SELECT value FROM inbound_meta WHERE name = ?", ("enabled_at",))
            if row is not None:
                return float(row["value"])
            # Two nodes starting together: the first one's time stands.
            self._exec_later("INSERT INTO inbound_meta (name, value) VALUES (?, ?)"
                             " ON CONFLICT (name) DO NOTHING", ("enabled_at", now))
        row = self._one("SELECT value FROM inbound_meta WHERE name = ?", ("enabled_at",))
        if row is not None:
            return float(row["value"])
        return now

    def get(self, fax_sid: str) -> InboundFax | None:
        row = self._one("SELECT * FROM inbound_faxes WHERE fax_sid = ?", (fax_sid,))
        return _row(row) if row else None

    def known(self, sids: Iterable[str]) -> dict[str, str]:
        """sid -> state for the sids that have a row."""
        out: dict[str, str] = {}
        batch = list(sids)
        for i in range(0, len(batch), 200):
            chunk = batch[i:i + 200]
            marks = ",".join("?" * len(chunk))
            for row in self._rows(
                    f"SELECT fax_sid, state FROM inbound_faxes WHERE fax_sid IN ({marks})",
                    chunk):
                out[row["fax_sid"]] = row["state"]
        return out

    def record_call(self, fax_sid: str, account_sid: str | None, from_number: str | None,
                    to_number: str | None, state: str, outcome: str | None, now: float) -> None:
        """The webhook's answer (a repeat of the same call changes nothing)."""
        with self._tx():
            if self._one("SELECT 1 AS x FROM inbound_faxes WHERE fax_sid = ?", (fax_sid,)):
                return
            self._exec_later(
                "INSERT INTO inbound_faxes (fax_sid, account_sid, from_number, to_number, "
                "state, outcome, called_at, created_at, updated_at, done_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (fax_sid) DO NOTHING",
                (fax_sid, account_sid, from_number, to_number, state, outcome, now, now, now,
                 now if state == REJECTED else None))

    def record_completion(self, c: Completion, now: float) -> bool:
        """Record the fax's outcome durably; True when it is new (the first final word on this
        fax), False for a duplicate, replayed or late one, which changes nothing."""
        recipients = ",".join(c.recipients)
        state = DELIVERING if c.recipients else DONE
        values = (c.account_sid, c.from_number, c.to_number, state, c.outcome, c.fax_status,
                  c.num_pages, c.media_url, c.media_sid, c.remote_station_id, c.error_code,
                  c.error_message, recipients, c.source, now if state == DELIVERING else None,
                  c.completed_at, now if state == DONE else None, now)
        with self._tx(durable=True):
            row = self._one("SELECT state FROM inbound_faxes WHERE fax_sid = ?", (c.fax_sid,))
            if row is not None and row["state"] != RINGING:
                return False
            if row is None:
                self._exec_later("INSERT INTO inbound_faxes (fax_sid, state, created_at,"
                                 " updated_at) VALUES (?, ?, ?, ?)"
                                 " ON CONFLICT (fax_sid) DO NOTHING",
                                 (c.fax_sid, RINGING, now, now))
            self._exec_later(
                "UPDATE inbound_faxes SET account_sid = ?, from_number = ?, to_number = ?, "
                "state = ?, outcome = ?, fax_status = ?, num_pages = ?, media_url = ?, "
                "media_sid = ?, remote_station_id = ?, error_code = ?, error_message = ?, "
                "recipients = ?, source = ?, next_run_at = ?, completed_at = ?, done_at = ?, "
                "updated_at = ? WHERE fax_sid = ? AND state = ?",
                (*values, c.fax_sid, RINGING))
        return True

    def due(self, now: float, limit: int, exclude: Iterable[str] = ()) -> list[InboundFax]:
        skip = list(exclude)
        extra = f" AND fax_sid NOT IN ({','.join('?' * len(skip))})" if skip else ""
        rows = self._rows(
            "SELECT * FROM inbound_faxes WHERE state IN (?, ?) AND next_run_at IS NOT NULL "
            f"AND next_run_at <= ?{extra} ORDER BY next_run_at LIMIT ?",
            (*DUE_STATES, now, *skip, limit))
        return [_row(r) for r in rows]

    def next_due_at(self) -> float | None:
        row = self._one("SELECT MIN(next_run_at) AS t FROM inbound_faxes WHERE state IN (?, ?)",
                        DUE_STATES)
        return row["t"] if row else None

    def delivered_to(self, fax_sid: str) -> set[str]:
        return {r["recipient"] for r in self._rows(
            "SELECT recipient FROM inbound_deliveries WHERE fax_sid = ?", (fax_sid,))}

    def deliveries(self, fax_sid: str) -> list[dict[str, Any]]:
        return self._rows("SELECT recipient, message_id, sent_at, detail FROM inbound_deliveries "
                          "WHERE fax_sid = ? ORDER BY sent_at", (fax_sid,))

    def mark_sent(self, fax_sid: str, recipient: str, message_id: str, detail: str,
                  now: float) -> None:
        """After the relay accepted the mail (never before): this recipient is done."""
        with self._tx(durable=True):
            if self._one("SELECT 1 AS x FROM inbound_deliveries WHERE fax_sid = ? "
                         "AND recipient = ?", (fax_sid, recipient)):
                return
            self._exec_later("INSERT INTO inbound_deliveries (fax_sid, recipient, message_id, "
                             "sent_at, detail) VALUES (?, ?, ?, ?, ?)"
                             " ON CONFLICT (fax_sid, recipient) DO NOTHING",
                             (fax_sid, recipient, message_id, now, detail[:300]))
            self._exec_later("UPDATE inbound_faxes SET updated_at = ?, tries = 0,"
                             " last_error = NULL WHERE fax_sid = ?", (now, fax_sid))

    def set_state(self, fax_sid: str, state: str, now: float, *, next_run_at: float | None,
                  detail: str | None = None, media_deleted: bool = False) -> None:
        with self._tx():
            self._exec_later(
                "UPDATE inbound_faxes SET state = ?, next_run_at = ?, updated_at = ?, tries = 0, "
                "last_error = COALESCE(?, last_error), "
                "media_deleted_at = CASE WHEN ? = 1 THEN ? ELSE media_deleted_at END, "
                "done_at = CASE WHEN ? IN (?, ?) THEN ? ELSE done_at END WHERE fax_sid = ?",
                (state, next_run_at, now, detail, 1 if media_deleted else 0, now, state, DONE,
                 GAVE_UP, now, fax_sid))

    def later(self, fax_sid: str, run_at: float, error: str, now: float) -> None:
        with self._tx():
            self._exec_later("UPDATE inbound_faxes SET tries = tries + 1, next_run_at = ?, "
                             "last_error = ?, updated_at = ? WHERE fax_sid = ?",
                             (run_at, error[:500], now, fax_sid))

    def stale_ringing(self, before: float, limit: int = 100) -> list[InboundFax]:
        rows = self._rows("SELECT * FROM inbound_faxes WHERE state = ? AND called_at < ? "
                          "ORDER BY called_at LIMIT ?", (RINGING, before, limit))
        return [_row(r) for r in rows]

    def listing(self, *, since: float | None = None, limit: int = 100) -> list[InboundFax]:
        where, args = ("WHERE created_at >= ?", [since]) if since is not None else ("", [])
        rows = self._rows(f"SELECT * FROM inbound_faxes {where} ORDER BY created_at DESC "
                          "LIMIT ?", (*args, limit))
        return [_row(r) for r in rows]

    def search(self, *, to_digits: str | None = None, caller: str | None = None,
               since: float | None = None, until: float | None = None, offset: int = 0,
               limit: int = 25) -> tuple[list[InboundFax], int]:
        """One page of faxes, newest first, and how many match in all (the dashboard's list).
        `to_digits`: digits of the number it came in on; `caller`: a number (its digits
        match the caller's number) or a case-insensitive part of the station id; `since`/`until`: created_at."""
        where: list[str] = []
        args: list[Any] = []
        if to_digits:
            where.append("COALESCE(to_number, '') LIKE ?")
            args.append(f"%{to_digits}%")
        if caller:
            # Digits match the caller's number only when the text is written as a number
            # ("(617) 555"), not when they are part of a name ("LAB 2").
            numeric = all(c.isdigit() or c in "+()-. " for c in caller)
            digits = "".join(c for c in caller if c.isdigit()) if numeric else ""
            parts = ["LOWER(COALESCE(remote_station_id, '')) LIKE ? ESCAPE '\\'"]
            args.append("%" + _like_escape(caller.lower()) + "%")
            if digits:
                parts.append("COALESCE(from_number, '') LIKE ?")
                args.append(f"%{digits}%")
            where.append("(" + " OR ".join(parts) + ")")
        if since is not None:
            where.append("created_at >= ?")
            args.append(since)
        if until is not None:
            where.append("created_at < ?")
            args.append(until)
        clause = (" WHERE " + " AND ".join(where)) if where else ""
        total = int(self._one(f"SELECT COUNT(*) AS n FROM inbound_faxes{clause}",
                              args)["n"])  # type: ignore[index]
        rows = self._rows(f"SELECT * FROM inbound_faxes{clause} "
                          "ORDER BY created_at DESC, fax_sid DESC LIMIT ? OFFSET ?",
                          (*args, limit, offset))
        return [_row(r) for r in rows], total

    def prune(self, cutoff: float, limit: int = 1000) -> int:
        """Forget finished faxes older than `cutoff` (JOB_RETENTION_DAYS). The reconciler's
        look-back must stay shorter than this, or it would deliver a forgotten fax again."""
        with self._tx():
            sids = [r["fax_sid"] for r in self._rows(
                "SELECT fax_sid FROM inbound_faxes WHERE state IN (?, ?, ?) AND created_at < ? "
                "LIMIT ?", (DONE, GAVE_UP, REJECTED, cutoff, limit))]
            for sid in sids:
                self._exec_later("DELETE FROM inbound_deliveries WHERE fax_sid = ?", (sid,))
                self._exec_later("DELETE FROM inbound_faxes WHERE fax_sid = ?", (sid,))
        return len(sids)

    def counts_by_outcome(self) -> dict[str, int]:
        return {r["o"] or "pending": r["n"] for r in self._rows(
            "SELECT outcome AS o, COUNT(*) AS n FROM inbound_faxes GROUP BY outcome")}


__all__ = ["InboundStore", "InboundFax", "Completion", "StoreError"]
