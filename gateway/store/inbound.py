"""Inbound fax persistence: one row per received fax, one per (fax, recipient) mail sent.

The tables come from migration 3 (gateway/store/migrations.py). The queries are written once in
portable SQL and run through the SQL store's public surface (`SqlAccess`: `tx`, `execute_later`,
`rows`), so they work on every SQL backend; every method runs on the main store's own thread and
connection (`await store.run(inbound.method, ...)`), so writes are serialised with the job
store's.

Every change of state goes through `_move`, which refuses what gateway/jobs/inbound_states.py does
not allow and records an event. A fax being delivered is claimed by one node (`claim_due`: a
lease with an epoch that goes up at every claim, renewed by the deliverer's heartbeat); a node
proves it still holds that lease in the very statement that records a mail or a media DELETE
as about to happen (`begin_send`, `begin_delete`), so a node that stalled past its lease sends
nothing the node that took the fax over is sending.

Once per recipient: a started mail is an `inbound_sends` row until the relay's acceptance moves
it to `inbound_deliveries`, keyed by (fax_sid, recipient). A started mail that was never settled
(its node crashed or stalled between the relay's 250 and the commit) is uncertain: it is
recorded as such and sent again only once its node cannot still be sending it, with the same
Message-ID (derived from the fax and the recipient), so a copy that escapes is one message.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any

from gateway.jobs.inbound_states import DUE_STATES, InEv, InState, check_transition
from gateway.store.base import StoreError
from gateway.store.interfaces import SqlAccess
from gateway.store.sql_core import Expr, like_escape

# Row states (see gateway/jobs/inbound_states.py); plain strings compare equal to them.
RINGING, REJECTED, DELIVERING, DELETING, DONE, GIVEN_UP = (
    InState.RINGING, InState.REJECTED, InState.DELIVERING, InState.DELETING, InState.DONE,
    InState.GIVEN_UP)

_DUE = tuple(s.value for s in DUE_STATES)

# What `begin_send` found: the mail may go (GO), or goes again after an uncertain earlier try
# (AGAIN); it was accepted already (SENT); another node may be sending it right now (WAIT); or
# this node no longer holds the fax (LOST: send nothing).
GO, AGAIN, SENT, WAIT, LOST = "go", "again", "sent", "wait", "lost"


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
    lease_owner: str | None = None
    lease_until: float | None = None
    lease_epoch: int = 0

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

    def __init__(self, store: SqlAccess) -> None:
        self.store = store
        self._tx = store.tx
        self._exec_later = store.execute_later
        self._rows = store.rows
        self._one = store.one

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

    # -- the one guarded change ------------------------------------------------------------

    def _fence(self, epoch: int, now: float) -> tuple[str, list[Any]]:
        """The lease proof: this node holds the fax, at the epoch of its claim, right now."""
        return (" AND lease_owner = ? AND lease_epoch = ? AND lease_until > ?",
                [self.store.node_id, epoch, now])

    def _event(self, fax_sid: str, kind: str, detail: str | None, now: float) -> None:
        self._exec_later("INSERT INTO inbound_events (fax_sid, at, kind, detail) "
                         "VALUES (?, ?, ?, ?)",
                         (fax_sid, now, str(kind), (detail or "")[:500] or None))

    def _move(self, fax_sid: str, sources: Iterable[str], target: str, event: str,
              detail: str | None, now: float, *, fence: int | None = None,
              **values: Any) -> bool:
        """Inside a transaction: change the fax from one of `sources` to `target` recording
        `event`, if the table allows it (IllegalTransition otherwise); False when the fax is
        not in one of `sources` or, with `fence` (the epoch of this node's claim), when this
        node no longer holds it."""
        expected = [InState(x) for x in sources]
        target = InState(target)
        check_transition(expected, target, event)
        values.update(state=target.value, updated_at=now)
        assignments, args = list[str](), list[Any]()
        for key, value in values.items():
            if isinstance(value, Expr):
                assignments.append(f"{key} = {value.sql}")
                args += value.args
            else:
                assignments.append(f"{key} = ?")
                args.append(value)
        guard, guard_args = self._fence(fence, now) if fence is not None else ("", [])
        changed = self.store.execute(
            f"UPDATE inbound_faxes SET {', '.join(assignments)} WHERE fax_sid = ?"
            f" AND state IN ({','.join('?' * len(expected))}){guard}",
            (*args, fax_sid, *[e.value for e in expected], *guard_args))
        if changed != 1:
            return False
        self._event(fax_sid, event, detail, now)
        return True

    def move(self, fax_sid: str, sources: Iterable[str], target: str, event: str,
             detail: str | None, now: float, *, fence: int | None = None,
             **values: Any) -> bool:
        with self._tx():
            return self._move(fax_sid, sources, target, event, detail, now, fence=fence,
                              **values)

    def events(self, fax_sid: str) -> list[dict[str, Any]]:
        return self._rows("SELECT at, kind, detail FROM inbound_events WHERE fax_sid = ? "
                          "ORDER BY id", (fax_sid,))

    # -- the webhook and SignalWire's final word ----------------------------------------------

    def record_call(self, fax_sid: str, account_sid: str | None, from_number: str | None,
                    to_number: str | None, state: str, outcome: str | None, now: float) -> None:
        """The webhook's answer (a repeat of the same call changes nothing)."""
        check_transition([None], InState(state), InEv.CALLED)
        with self._tx():
            if self._one("SELECT 1 AS x FROM inbound_faxes WHERE fax_sid = ?", (fax_sid,)):
                return
            if self.store.execute(
                    "INSERT INTO inbound_faxes (fax_sid, account_sid, from_number, to_number, "
                    "state, outcome, called_at, created_at, updated_at, done_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (fax_sid) DO NOTHING",
                    (fax_sid, account_sid, from_number, to_number, str(state), outcome, now,
                     now, now, now if state == REJECTED else None)) == 1:
                self._event(fax_sid, InEv.CALLED, f"answered: {state}", now)

    def record_completion(self, c: Completion, now: float) -> bool:
        """Record the fax's outcome durably; True when it is new (the first final word on this
        fax), False for a duplicate, replayed or late one, which changes nothing."""
        recipients = ",".join(c.recipients)
        state = DELIVERING if c.recipients else DONE
        with self._tx(durable=True):
            row = self._one("SELECT state FROM inbound_faxes WHERE fax_sid = ?", (c.fax_sid,))
            if row is not None and row["state"] != RINGING:
                return False
            if row is None:
                self._exec_later("INSERT INTO inbound_faxes (fax_sid, state, created_at,"
                                 " updated_at) VALUES (?, ?, ?, ?)"
                                 " ON CONFLICT (fax_sid) DO NOTHING",
                                 (c.fax_sid, RINGING.value, now, now))
            return self._move(
                c.fax_sid, [RINGING], state, InEv.COMPLETED,
                f"{c.source}: {c.fax_status}, {c.num_pages if c.num_pages is not None else '-'}"
                f" page(s), for {len(c.recipients)} recipient(s)", now,
                account_sid=c.account_sid, from_number=c.from_number, to_number=c.to_number,
                outcome=c.outcome, fax_status=c.fax_status, num_pages=c.num_pages,
                media_url=c.media_url, media_sid=c.media_sid,
                remote_station_id=c.remote_station_id, error_code=c.error_code,
                error_message=c.error_message, recipients=recipients, source=c.source,
                next_run_at=now if state == DELIVERING else None,
                completed_at=c.completed_at, done_at=now if state == DONE else None)

    # -- claims: one node works a fax at a time ------------------------------------------------

    def claim_due(self, now: float, limit: int, exclude: Iterable[str] = ()) -> list[InboundFax]:
        """Claim the due faxes no live node holds: each comes back leased to this node until
        now + LEASE_SECONDS, at a new epoch (its `lease_epoch`), which every fenced step names."""
        skip = list(exclude)
        extra = f" AND fax_sid NOT IN ({','.join('?' * len(skip))})" if skip else ""
        me = self.store.node_id
        with self._tx():
            rows = self._rows(
                "SELECT fax_sid, state, lease_owner FROM inbound_faxes WHERE state IN (?, ?) "
                "AND next_run_at IS NOT NULL AND next_run_at <= ? "
                f"AND (lease_until IS NULL OR lease_until <= ?){extra} "
                f"ORDER BY next_run_at LIMIT ?{self.store.SKIP_LOCKED}",
                (*_DUE, now, now, *skip, limit))
            claimed = []
            for row in rows:
                if self.store.execute(
                        "UPDATE inbound_faxes SET lease_owner = ?, lease_until = ?, "
                        "lease_epoch = lease_epoch + 1 WHERE fax_sid = ? AND state IN (?, ?) "
                        "AND (lease_until IS NULL OR lease_until <= ?)",
                        (me, now + self.store.lease_s, row["fax_sid"], *_DUE, now)) != 1:
                    continue
                claimed.append(row["fax_sid"])
                if row["lease_owner"] not in (None, me):
                    check_transition([InState(row["state"])], InState(row["state"]),
                                     InEv.TAKEN_OVER)
                    self._event(row["fax_sid"], InEv.TAKEN_OVER,
                                f"from {row['lease_owner']} (its lease ran out) by {me}", now)
            if not claimed:
                return []
            out = self._rows(
                f"SELECT * FROM inbound_faxes WHERE fax_sid IN ({','.join('?' * len(claimed))})"
                " AND lease_owner = ?", (*claimed, me))
        return [_row(r) for r in out]

    def renew(self, fax_sids: Iterable[str], now: float) -> dict[str, int]:
        """Extend this node's leases on these faxes; fax_sid -> epoch of those it still holds
        (a fax whose epoch changed was claimed by another node meanwhile)."""
        sids = list(fax_sids)
        if not sids:
            return {}
        marks = ",".join("?" * len(sids))
        me = self.store.node_id
        with self._tx():
            self._exec_later(f"UPDATE inbound_faxes SET lease_until = ? WHERE lease_owner = ?"
                             f" AND fax_sid IN ({marks})", (now + self.store.lease_s, me, *sids))
            rows = self._rows(f"SELECT fax_sid, lease_epoch FROM inbound_faxes"
                              f" WHERE lease_owner = ? AND fax_sid IN ({marks})", (me, *sids))
        return {r["fax_sid"]: int(r["lease_epoch"]) for r in rows}

    def release(self, *fax_sids: str) -> None:
        if not fax_sids:
            return
        with self._tx():
            self._exec_later("UPDATE inbound_faxes SET lease_owner = NULL, lease_until = NULL"
                             f" WHERE lease_owner = ? AND fax_sid IN"
                             f" ({','.join('?' * len(fax_sids))})",
                             (self.store.node_id, *fax_sids))

    def release_all(self, everyone: bool = False) -> int:
        """At start: the leases of an earlier run of this NODE_ID, or with `everyone` every
        lease (SQLite: one gateway per database, so any lease is a dead run's)."""
        with self._tx():
            if everyone:
                return self.store.execute("UPDATE inbound_faxes SET lease_owner = NULL,"
                                          " lease_until = NULL WHERE lease_owner IS NOT NULL")
            return self.store.execute("UPDATE inbound_faxes SET lease_owner = NULL,"
                                      " lease_until = NULL WHERE lease_owner = ?",
                                      (self.store.node_id,))

    def next_due_at(self) -> float | None:
        """A fax another node holds falls due for us when its lease runs out."""
        row = self._one("SELECT MIN(CASE WHEN lease_until > next_run_at THEN lease_until"
                        " ELSE next_run_at END) AS t FROM inbound_faxes WHERE state IN (?, ?)"
                        " AND next_run_at IS NOT NULL", _DUE)
        return row["t"] if row else None

    # -- fenced side effects ------------------------------------------------------------------

    def delivered_to(self, fax_sid: str) -> set[str]:
        return {r["recipient"] for r in self._rows(
            "SELECT recipient FROM inbound_deliveries WHERE fax_sid = ?", (fax_sid,))}

    def deliveries(self, fax_sid: str) -> list[dict[str, Any]]:
        return self._rows("SELECT recipient, message_id, sent_at, detail FROM inbound_deliveries "
                          "WHERE fax_sid = ? ORDER BY sent_at", (fax_sid,))

    def begin_send(self, fax_sid: str, epoch: int, recipient: str, now: float,
                   settle_s: float) -> tuple[str, float | None]:
        """Before a recipient's mail goes to the relay: (GO or AGAIN, None) when this node
        still holds the fax at `epoch` (proven in the statement that records the mail as
        started); LOST when it does not; SENT when it was accepted already; (WAIT, when) when
        another node started it, never settled it, and may still be sending it until `when`
        (`settle_s` after it started)."""
        me = self.store.node_id
        with self._tx(durable=True):
            guard, guard_args = self._fence(epoch, now)
            if self.store.execute(f"UPDATE inbound_faxes SET updated_at = ? WHERE fax_sid = ?"
                                  f" AND state = ?{guard}",
                                  (now, fax_sid, DELIVERING.value, *guard_args)) != 1:
                return LOST, None
            if self._one("SELECT 1 AS x FROM inbound_deliveries WHERE fax_sid = ? AND "
                         "recipient = ?", (fax_sid, recipient)):
                return SENT, None
            row = self._one("SELECT node, epoch, started_at, ended_at FROM inbound_sends "
                            "WHERE fax_sid = ? AND recipient = ?", (fax_sid, recipient))
            if row is None:
                self._exec_later("INSERT INTO inbound_sends (fax_sid, recipient, node, epoch,"
                                 " started_at) VALUES (?, ?, ?, ?, ?)",
                                 (fax_sid, recipient, me, epoch, now))
                self._event(fax_sid, InEv.MAILING, f"mail to {recipient}", now)
                return GO, None
            settle_at = float(row["started_at"]) + settle_s
            if row["ended_at"] is None and row["node"] != me and now < settle_at:
                return WAIT, settle_at
            self._exec_later("UPDATE inbound_sends SET node = ?, epoch = ?, started_at = ?,"
                             " ended_at = NULL WHERE fax_sid = ? AND recipient = ?",
                             (me, epoch, now, fax_sid, recipient))
            how = ("its try failed without an answer to tell" if row["ended_at"] is not None
                   else f"{row['node']} started it and never recorded the relay's answer")
            self._event(fax_sid, InEv.UNCERTAIN,
                        f"mail to {recipient}: may have gone already ({how}); sent again "
                        "with the same Message-ID", now)
            return AGAIN, None

    def settle_send(self, fax_sid: str, epoch: int, recipient: str, now: float, *,
                    message_id: str | None = None, detail: str = "") -> None:
        """After the relay answered: accepted (`message_id` given) moves the mail to
        `inbound_deliveries`, whoever holds the fax now (it went out: that is a fact); else
        the try ended without acceptance, so the next try need not wait for it."""
        with self._tx(durable=True):
            if message_id is None:
                self._exec_later("UPDATE inbound_sends SET ended_at = ? WHERE fax_sid = ? AND "
                                 "recipient = ? AND node = ? AND epoch = ?",
                                 (now, fax_sid, recipient, self.store.node_id, epoch))
                return
            self._exec_later("INSERT INTO inbound_deliveries (fax_sid, recipient, message_id, "
                             "sent_at, detail) VALUES (?, ?, ?, ?, ?)"
                             " ON CONFLICT (fax_sid, recipient) DO NOTHING",
                             (fax_sid, recipient, message_id, now, detail[:300]))
            self._exec_later("DELETE FROM inbound_sends WHERE fax_sid = ? AND recipient = ? "
                             "AND node = ? AND epoch = ?",
                             (fax_sid, recipient, self.store.node_id, epoch))
            self._event(fax_sid, InEv.MAILED, f"mail to {recipient}: {detail}", now)
            self._exec_later("UPDATE inbound_faxes SET updated_at = ?, tries = 0,"
                             " last_error = NULL WHERE fax_sid = ?", (now, fax_sid))

    def begin_delete(self, fax_sid: str, epoch: int, now: float) -> bool:
        """Before the media DELETE at SignalWire: True while this node holds the fax. A DELETE
        whose answer was lost is simply sent again (SignalWire answers 404 once it is gone)."""
        return self.move(fax_sid, [DELETING], DELETING, InEv.DELETING_MEDIA,
                         "deleting the media at SignalWire", now, fence=epoch)

    def later(self, fax_sid: str, epoch: int, run_at: float, error: str, now: float) -> bool:
        """An outage: the same step at `run_at`, if this node still holds the fax."""
        with self._tx():
            row = self._one("SELECT state FROM inbound_faxes WHERE fax_sid = ?", (fax_sid,))
            if row is None or row["state"] not in _DUE:
                return False
            return self._move(fax_sid, [row["state"]], row["state"], InEv.RETRY, error, now,
                              fence=epoch, tries=Expr("tries + 1"), next_run_at=run_at,
                              last_error=error[:500])

    def stale_ringing(self, before: float, limit: int = 100) -> list[InboundFax]:
        rows = self._rows("SELECT * FROM inbound_faxes WHERE state = ? AND called_at < ? "
                          "ORDER BY called_at LIMIT ?", (RINGING.value, before, limit))
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
        match the caller's number) or a case-insensitive part of the station id;
        `since`/`until`: created_at."""
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
            args.append("%" + like_escape(caller.lower()) + "%")
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
                "LIMIT ?", (DONE.value, GIVEN_UP.value, REJECTED.value, cutoff, limit))]
            for sid in sids:
                self._exec_later("DELETE FROM inbound_deliveries WHERE fax_sid = ?", (sid,))
                self._exec_later("DELETE FROM inbound_sends WHERE fax_sid = ?", (sid,))
                self._exec_later("DELETE FROM inbound_events WHERE fax_sid = ?", (sid,))
                self._exec_later("DELETE FROM inbound_faxes WHERE fax_sid = ?", (sid,))
        return len(sids)


__all__ = ["InboundStore", "InboundFax", "Completion", "StoreError"]
