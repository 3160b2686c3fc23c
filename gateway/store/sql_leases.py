"""Shared decisions across nodes in SQL: claims of due jobs (a lease and a fencing epoch each),
their renewal and release, named leases, the account's send slot, and hits (rate limits)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from gateway.jobs.outbound_states import ACTIVE_STATES, Job, State
from gateway.store.sql_core import SqlCore, _job, _marks

# A job is due when its time has come, unless it would dial a number that another job is dialling
# right now, or that a node has claimed a job to and is about to dial (its lease is live): at most
# one attempt in flight per destination, across nodes. The `?` is the time now.
DUE = """
    next_run_at IS NOT NULL AND state IN ({states})
    AND NOT (state = 'stored' AND EXISTS (
        SELECT 1 FROM jobs other
        WHERE other.to_number = jobs.to_number AND other.id <> jobs.id
            AND (other.state IN ('submitting', 'submitted')
                 OR (other.state = 'stored' AND other.lease_until > ?))))
"""
# Not claimed by a live node: never claimed, released, or its lease ran out (the node died).
UNCLAIMED = " AND (lease_until IS NULL OR lease_until <= ?)"


class SqlLeases(SqlCore):
    """The `Leases` interface."""

    # -- claims --------------------------------------------------------------------------

    def _due_where(self, exclude: list[str], now: float) -> tuple[str, list[Any]]:
        states = sorted(s.value for s in ACTIVE_STATES)
        sql = DUE.format(states=_marks(states))
        if exclude:
            sql += f" AND id NOT IN ({_marks(exclude)})"
        return sql, [*states, now, *exclude]

    def next_due_at(self, exclude: Iterable[str] = ()) -> float | None:
        """A job another node holds falls due for us when its lease runs out."""
        where, args = self._due_where(list(exclude), self.clock())
        return self._scalar(
            "SELECT MIN(CASE WHEN lease_until > next_run_at THEN lease_until"
            f" ELSE next_run_at END) AS t FROM jobs WHERE {where}", args)

    def claim_due(self, now: float, limit: int, exclude: Iterable[str] = ()) -> list[Job]:
        with self._tx():
            return self._claim_due(now, limit, list(exclude))

    def release_and_claim(self, released: Sequence[str], now: float, limit: int,
                          exclude: Sequence[str]) -> tuple[list[Job], float | None]:
        """The worker's trip after steps end, in one transaction: the ended steps' leases go
        (`release`), up to `limit` due jobs are claimed (`claim_due`, none when 0) and the
        next due time is read (`next_due_at`, past the claimed ones)."""
        with self._tx():
            self._release(released)
            due = self._claim_due(now, limit, list(exclude)) if limit > 0 else []
            return due, self.next_due_at([*exclude, *(j.id for j in due)])

    def _claim_due(self, now: float, limit: int, exclude: list[str]) -> list[Job]:
        """`claim_due` inside a transaction the caller holds."""
        where, args = self._due_where(exclude, now)
        self._claim_lock()
        rows = self._rows(
            f"SELECT * FROM jobs WHERE {where}{UNCLAIMED} AND next_run_at <= ?"
            f" ORDER BY next_run_at LIMIT ?{self.SKIP_LOCKED}",
            (*args, now, now, limit))
        claimed, numbers = [], set()
        for row in rows:
            if row["state"] == State.STORED.value:
                if row["to_number"] in numbers:
                    continue  # one attempt in flight per destination number
                numbers.add(row["to_number"])
            claimed.append(row)
        if claimed:
            ids = [r["id"] for r in claimed]
            # Each claim is a new fencing token: the rows are locked (or the database is,
            # SQLite) from the read to this update, so the token is the one read plus one.
            self._exec_later(f"UPDATE jobs SET lease_owner = ?, lease_until = ?,"
                             f" lease_epoch = lease_epoch + 1 WHERE id IN ({_marks(ids)})",
                             (self.node_id, now + self.lease_s, *ids))
            for row in claimed:
                row["lease_epoch"] += 1
        return [_job(r) for r in claimed]

    def renew_leases(self, job_ids: Iterable[str], now: float) -> set[str]:
        ids = list(job_ids)
        if not ids:
            return set()
        with self._tx():
            self._exec_later(f"UPDATE jobs SET lease_until = ? WHERE lease_owner = ?"
                             f" AND id IN ({_marks(ids)})",
                             (now + self.lease_s, self.node_id, *ids))
            rows = self._rows(f"SELECT id FROM jobs WHERE lease_owner = ?"
                              f" AND id IN ({_marks(ids)})", (self.node_id, *ids))
        return {r["id"] for r in rows}

    def release(self, *job_ids: str, wake_others: bool = False) -> None:
        if not job_ids:
            return
        if not wake_others:
            self._release(job_ids)  # one statement, committed by itself
            return
        with self._tx():
            self._release(job_ids)
            self._announce()

    def _release(self, job_ids: Sequence[str]) -> None:
        if job_ids:
            self._exec_later("UPDATE jobs SET lease_owner = NULL, lease_until = NULL"
                             f" WHERE lease_owner = ? AND id IN ({_marks(job_ids)})",
                             (self.node_id, *job_ids))

    def release_all(self, everyone: bool = False) -> int:
        """At start: this node's leases from before a restart (same NODE_ID), or with
        `everyone` every lease (SQLite: one gateway per database, so any lease is a dead
        one's)."""
        with self._tx():
            if everyone:
                return self._exec("UPDATE jobs SET lease_owner = NULL, lease_until = NULL"
                                  " WHERE lease_owner IS NOT NULL")
            return self._exec("UPDATE jobs SET lease_owner = NULL, lease_until = NULL"
                              " WHERE lease_owner = ?", (self.node_id,))

    def lease_of(self, job_id: str) -> tuple[str | None, float | None]:
        row = self._one("SELECT lease_owner, lease_until FROM jobs WHERE id = ?", (job_id,))
        return (None, None) if row is None else (row["lease_owner"], row["lease_until"])

    def take_lead(self, name: str, now: float, ttl_s: float) -> bool:
        """Hold (or extend) the named lease for this node; True if this node holds it.
        It moves to another node only once its holder stops extending it."""
        with self._tx():
            self._claim_lock()
            row = self._one("SELECT owner, until FROM leases WHERE name = ?", (name,))
            if row is None:
                self._exec_later("INSERT INTO leases (name, owner, until) VALUES (?, ?, ?)",
                                 (name, self.node_id, now + ttl_s))
                return True
            if row["owner"] != self.node_id and row["until"] > now:
                return False
            self._exec_later("UPDATE leases SET owner = ?, until = ? WHERE name = ?",
                             (self.node_id, now + ttl_s, name))
            return True

    def take_send_slot(self, now: float, interval_s: float) -> float:
        """Reserve the next send slot under the account's rate, across nodes; returns when it
        is (now, or later: the caller waits until then)."""
        with self._tx():
            return self._take_send_slot(now, interval_s)

    def _take_send_slot(self, now: float, interval_s: float) -> float:
        """`take_send_slot` inside a transaction the caller holds."""
        self._claim_lock("send-slot")
        row = self._one("SELECT until FROM leases WHERE name = 'send-slot'")
        at = now if row is None else max(now, float(row["until"]))
        if row is None:
            self._exec_later("INSERT INTO leases (name, owner, until)"
                             " VALUES ('send-slot', ?, ?)", (self.node_id, at + interval_s))
        else:
            self._exec_later("UPDATE leases SET owner = ?, until = ? WHERE name = 'send-slot'",
                             (self.node_id, at + interval_s))
        return at

    # -- hits: shared rate limits --------------------------------------------------------

    def _hits_wait(self, rules: Sequence[tuple[str, str, int]], count: int, now: float,
                   window_s: float) -> float:
        """Inside a transaction: 0.0 if `count` more hits fit every (kind, key, limit) rule in
        the sliding window, else the seconds until they will (inf: they never can). Hits
        that left the window are not counted (housekeeping deletes them: prune_hits)."""
        if any(count > limit for _, _, limit in rules):
            return math.inf
        if not rules:
            return 0.0
        since = now - window_s
        counts = self.hit_counts(rules, now, window_s)
        wait = 0.0
        for kind, key, limit in rules:
            if limit - counts.get((kind, key), 0) < count:
                # The hit that must expire before `count` more fit.
                row = self._one("SELECT at FROM hits WHERE kind = ? AND hkey = ? AND at > ?"
                                " ORDER BY at DESC LIMIT 1 OFFSET ?",
                                (kind, key, since, limit - count))
                if row is not None:
                    wait = max(wait, float(row["at"]) + window_s - now)
        return wait

    def hit_counts(self, rules: Sequence[tuple[str, str, int]], now: float,
                   window_s: float) -> dict[tuple[str, str], int]:
        """Each rule's (kind, key) hits in the sliding window (absent: none), in one query,
        counted, not fetched."""
        if not rules:
            return {}
        match = " OR ".join(["(kind = ? AND hkey = ?)"] * len(rules))
        return {(r["kind"], r["hkey"]): int(r["n"]) for r in self._rows(
            f"SELECT kind, hkey, COUNT(*) AS n FROM hits WHERE ({match}) AND at > ?"
            " GROUP BY kind, hkey", [*(v for k, h, _ in rules for v in (k, h)),
                                     now - window_s])}

    def hits_wait(self, rules: Sequence[tuple[str, str, int]], count: int, now: float,
                  window_s: float) -> float:
        """Whether `count` more hits would fit now (see take_hits), without recording any:
        a read, under no lock and in no transaction (take_hits decides; this only refuses
        early), so one round trip."""
        return self._hits_wait(rules, count, now, window_s)

    def take_hits(self, rules: Sequence[tuple[str, str, int]], now: float,
                  window_s: float, count: int = 1) -> float:
        """Count `count` hits under every (kind, key, limit) rule, or under none: 0.0 if each
        has room in the sliding window (and records them all), else the seconds until all will.
        One transaction under the hits lock, so nodes cannot overrun a limit together: the
        hits are inserted only where every rule still has room, in one statement, and the
        batch (lock, insert, commit) goes out together: one round trip, and the lock is
        held for no round trip at all. Only a refusal reads again, for how long to wait."""
        if any(count > limit for _, _, limit in rules):
            return math.inf
        if not rules:
            return 0.0
        # Distinct times, so a give-back removes exactly these.
        fresh = [(kind, key, now + i * 1e-6) for kind, key, _ in rules for i in range(count)]
        if self._insert_hits(rules, fresh, count, now - window_s):
            return 0.0
        return max(self._hits_wait(rules, count, now, window_s), 1e-3)  # refused: not 0

    def _insert_hits(self, rules: Sequence[tuple[str, str, int]],
                     fresh: Sequence[tuple[str, str, float]], count: int, since: float) -> bool:
        """`take_hits`' transaction: the `fresh` hits, inserted (True) only where every rule
        has room for `count` more after `since`, under the hits lock."""
        with self._batch_tx():
            self._claim_lock("hits")
            self._relaxed_commit()
            inserted = self._exec_later(
                "INSERT INTO hits (kind, hkey, at) WITH rules (kind, hkey, lim) AS (VALUES "
                + ", ".join(["(?, ?, ?)"] * len(rules))
                + "), fresh (kind, hkey, at) AS (VALUES "
                + ", ".join(["(?, ?, ?)"] * len(fresh))
                + ") SELECT kind, hkey, at FROM fresh"
                " WHERE NOT EXISTS (SELECT 1 FROM rules WHERE rules.lim - ? < ("
                " SELECT COUNT(*) FROM hits WHERE hits.kind = rules.kind"
                " AND hits.hkey = rules.hkey AND hits.at > ?))",
                [*(v for rule in rules for v in rule), *(v for row in fresh for v in row),
                 count, since])
        return bool(inserted())

    def give_back_hits(self, keys: Sequence[tuple[str, str]], count: int) -> None:
        """Undo the newest `count` hits of each (kind, key): faxes charged at DATA whose
        message was then refused."""
        with self._tx():
            self._relaxed_commit()
            for kind, key in keys:
                rows = self._rows("SELECT at FROM hits WHERE kind = ? AND hkey = ?"
                                  " ORDER BY at DESC LIMIT ?", (kind, key, count))
                for r in rows:
                    self._exec_later("DELETE FROM hits WHERE kind = ? AND hkey = ? AND at = ?",
                                     (kind, key, r["at"]))

    def prune_hits(self, before: float) -> int:
        """Forget hits older than every window (senders and addresses seen once stay no
        longer than that)."""
        with self._tx():
            return self._exec("DELETE FROM hits WHERE at <= ?", (before,))

    def last_hit(self, kind: str, key: str) -> float | None:
        return self._scalar("SELECT MAX(at) AS t FROM hits WHERE kind = ? AND hkey = ?",
                            (kind, key))

    def count_hits(self, kind: str, key: str, since: float) -> int:
        return int(self._scalar("SELECT COUNT(*) AS n FROM hits WHERE kind = ? AND hkey = ?"
                                " AND at > ?", (kind, key, since)) or 0)

    def add_hit(self, kind: str, key: str, now: float, forget_before: float) -> int:
        """Record a hit and return how many there are since `forget_before` (older ones of
        this key are deleted on the way)."""
        with self._tx():
            self._exec_later("DELETE FROM hits WHERE kind = ? AND hkey = ? AND at <= ?",
                             (kind, key, forget_before))
            self._exec_later("INSERT INTO hits (kind, hkey, at) VALUES (?, ?, ?)",
                             (kind, key, now))
            return int(self._scalar("SELECT COUNT(*) AS n FROM hits WHERE kind = ?"
                                    " AND hkey = ?", (kind, key)) or 0)

    def clear_hits(self, kind: str, key: str) -> None:
        with self._tx():
            self._exec_later("DELETE FROM hits WHERE kind = ? AND hkey = ?", (kind, key))
