"""`SqlStore`: every query of the store, written once in portable SQL, for all SQL backends.

Queries use `?` placeholders, plain types and no backend-only functions. What differs between
backends is a handful of small methods a backend provides: `open`/`close`, turning `?` into its
placeholder (`_sql`), a write transaction and its durability (`_tx`; `_batch_tx`, one whose
statements may go to the server together), running a statement
(`_exec`, `_rows`), `_has_table`, the DDL types (`DDL_TYPES`), a lock while migrating
(`_lock_migrations`), which driver errors mean "could not write" (`_is_db_error`) and the claim
of due work (`due_jobs`: SQLite has one writer; a shared PostgreSQL queue would lock and skip).
"""

from __future__ import annotations

import abc
import contextlib
import logging
import math
from dataclasses import fields
from typing import Any, Callable, ContextManager, Iterable, Sequence

from gateway.jobs.outbound_states import (ACTIVE_STATES, FINISHED, REPORT_DUE,
                                     CallbackAction, Ev, Job, State, check_transition,
                                     classify_callback)
from gateway.store import migrations
from gateway.sanitise import one_line
from gateway.store.base import Store, StoreError
from gateway.store.rows import Attempt, Event, JobListing, Message, NewJob, UnderWay

log = logging.getLogger(__name__)

JOB_COLUMNS = tuple(f.name for f in fields(Job))
_MESSAGE_COLUMNS = tuple(f.name for f in fields(Message))
_ATTEMPT_COLUMNS = tuple(f.name for f in fields(Attempt))
_LISTING_MESSAGE_FIELDS = ("envelope_from", "header_from", "report_to", "subject", "peer",
                           "filenames")

# A job is due when its time has come, unless it would dial a number that another job is dialling
# right now, or that a node has claimed a job to and is about to dial (its lease is live): at most
# one attempt in flight per destination, across nodes. The `?` is the time now.
_DUE = """
    next_run_at IS NOT NULL AND state IN ({states})
    AND NOT (state = 'stored' AND EXISTS (
        SELECT 1 FROM jobs other
        WHERE other.to_number = jobs.to_number AND other.id <> jobs.id
            AND (other.state IN ('submitting', 'submitted')
                 OR (other.state = 'stored' AND other.lease_until > ?))))
"""
# Not claimed by a live node: never claimed, released, or its lease ran out (the node died).
_UNCLAIMED = " AND (lease_until IS NULL OR lease_until <= ?)"

_LISTING = """
    SELECT {job_columns}, {message_columns},
           e.at AS e_at, e.kind AS e_kind, e.detail AS e_detail
    FROM jobs j
    JOIN messages m ON m.id = j.message_id
    LEFT JOIN events e ON e.id = (SELECT MAX(e2.id) FROM events e2 WHERE e2.job_id = j.id)
""".format(job_columns=", ".join(f"j.{c}" for c in JOB_COLUMNS),
           message_columns=", ".join(f"m.{c} AS m_{c}" for c in _LISTING_MESSAGE_FIELDS))


class Expr:
    """A column value computed in SQL (`COALESCE(fax_sid, ?)`) rather than a plain value."""

    def __init__(self, sql: str, *args: Any) -> None:
        self.sql = sql
        self.args = args


def operator(by: str | None) -> str:
    """Who did an operator action, as written in the history: a name made one plain line of
    at most 80 characters (it comes from a login and is shown in the dashboard and the CLI),
    or "the operator" when no one is named (the CLI)."""
    name = one_line(by, 80) if by else ""
    return name or "the operator"


def _marks(items: Sequence[Any]) -> str:
    return ",".join("?" for _ in items)


def _job(row: dict[str, Any]) -> Job:
    values = {c: row[c] for c in JOB_COLUMNS}
    values["state"] = State(values["state"])
    return Job(**values)


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


class SqlStore(Store):
    """All of the store's SQL. Subclasses provide the connection and the few dialect bits."""

    # Types that differ in DDL (see gateway/store/migrations.py).
    DDL_TYPES: dict[str, str] = {"float": "DOUBLE PRECISION", "autoid": "INTEGER"}

    # -- what a backend provides -------------------------------------------------------------

    @abc.abstractmethod
    def _tx(self, durable: bool = False) -> ContextManager[None]:
        """A write transaction that takes the write lock at once. `durable`: the commit
        survives power loss, not only a process crash (the 250 to a sender, a send about to
        be POSTed)."""

    def _batch_tx(self, durable: bool = False) -> ContextManager[None]:
        """A write transaction whose statements the backend may send together: an `_exec`'s
        row count is not known inside it (PostgreSQL: pipeline mode, which waits for the
        server only at a `_rows` and at the commit). Default: `_tx`."""
        return self._tx(durable)

    @abc.abstractmethod
    def _exec(self, sql: str, args: Sequence[Any] = ()) -> int:
        """Run one statement (`?` placeholders); the number of rows it changed."""

    @abc.abstractmethod
    def _rows(self, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """Run one query (`?` placeholders); its rows as dicts keyed by column name."""

    def _exec_later(self, sql: str, args: Sequence[Any] = ()) -> Callable[[], int]:
        """`_exec` whose row count is read, if at all, once the transaction it is in has
        ended. PostgreSQL does not wait for it: it goes out with the next statement or with
        the COMMIT (statements whose count nobody reads: events, leases, locks), so a
        transaction costs a round trip less per such statement. Default: run now."""
        changed = self._exec(sql, args)
        return lambda: changed

    def _sql(self, sql: str) -> str:
        """The statement in the backend's placeholder style (`?` here; `%s` for psycopg)."""
        return sql

    def _one(self, sql: str, args: Sequence[Any] = ()) -> dict[str, Any] | None:
        rows = self._rows(sql, args)
        return rows[0] if rows else None

    def _scalar(self, sql: str, args: Sequence[Any] = ()) -> Any:
        row = self._one(sql, args)
        return None if row is None else next(iter(row.values()))

    # -- schema ------------------------------------------------------------------------------

    def _ddl(self, statement: str) -> str:
        return statement.format(**self.DDL_TYPES)

    def _lock_migrations(self) -> None:
        """First in every migration's transaction, so that two gateways starting on one shared
        database do not both apply a step (PostgreSQL: a transaction-scoped advisory lock, which
        a pooler in transaction mode cannot strand on a server connection as it could a
        session's). SQLite needs none: only the daemon migrates (the CLI opens with
        `migrate=False`), and each step's `BEGIN IMMEDIATE` plus the version check inside it
        keeps a step from applying twice."""

    @abc.abstractmethod
    def _has_table(self, name: str) -> bool:
        """Whether a table exists (a database from before versioning has no schema_version)."""

    def _open_schema(self, migrate: bool) -> None:
        """At open: upgrade the schema, or (the CLI) only check that it is current.

        The CLI must not upgrade a database under a running daemon of the previous version,
        which would then meet rows it cannot read; it asks for the daemon to be restarted."""
        if migrate:
            self.migrate()
            return
        current = self.schema_version() if self._has_table("schema_version") else 0
        if current != migrations.LATEST:
            raise StoreError(
                f"the database {self.where} is at schema version {current}, this faxgw needs "
                f"{migrations.LATEST}: "
                + ("restart the daemon (the new version upgrades the database at start-up)"
                   if current < migrations.LATEST else "upgrade faxgw"))

    def migrate(self) -> int:
        """Apply every migration above the database's version, each in its own transaction;
        returns the version reached."""
        with self._tx():
            self._lock_migrations()
            self._exec(self._ddl(migrations.SCHEMA_VERSION_DDL))
        current = self.schema_version()
        if current > migrations.LATEST:
            raise StoreError(f"the database is at schema version {current}, newer than this "
                             f"gateway knows ({migrations.LATEST}): upgrade the gateway")
        for migration in migrations.MIGRATIONS:
            if migration.version <= current:
                continue
            with self._tx(durable=True):
                self._lock_migrations()
                if self.schema_version() >= migration.version:
                    continue  # another process applied it meanwhile
                for statement in migration.statements:
                    self._exec(self._ddl(statement))
                self._exec("INSERT INTO schema_version (version, applied_at, description)"
                           " VALUES (?, ?, ?)",
                           (migration.version, self.clock(), migration.description))
            log.info("database schema migrated to version %d: %s", migration.version,
                     migration.description)
            current = migration.version
        return current

    def schema_version(self) -> int:
        return int(self._scalar("SELECT MAX(version) AS v FROM schema_version") or 0)

    def check_writable(self) -> None:
        with self._tx():
            pass

    def _event(self, job_id: str, kind: str, detail: str | None, at: float) -> None:
        # Nothing to wait for: PostgreSQL sends it with the next statement or the commit.
        self._exec_later("INSERT INTO events (job_id, at, kind, detail) VALUES (?, ?, ?, ?)",
                         (job_id, at, kind, detail))

    # -- intake ------------------------------------------------------------------------------

    _JOB_INSERT = ("id", "message_id", "to_number", "from_number", "quality", "state",
                   "callback_token", "media_key", "pages", "attempt", "tries", "next_run_at",
                   "created_at", "updated_at")
    # Columns of migration 6 (DSN, AUTH=), written only when a mail has them: a mail without
    # is the same INSERT as before (tests/test_store_backends.py writes to older schemas).
    _DSN_JOB_COLUMNS = ("dsn_notify", "dsn_orcpt")
    _DSN_MESSAGE_COLUMNS = frozenset({"dsn_ret", "dsn_envid", "auth_submitter", "dsn_headers",
                                      "dsn_full"})

    def add_message(self, message: Message, jobs: Iterable[NewJob], *, stored: bool = False,
                    dedup_since: float | None = None) -> list[str] | None:
        """`stored`: the document is already in the media store (a shared queue uploads it
        before the 250), so the jobs start in `stored`. `dedup_since`: see `_claim_dedup`.

        A few statements whatever the number of jobs (one per table), in a batch transaction:
        PostgreSQL sends them together and waits once for the dedup claim and once for the
        commit, which is most of the 250's wait on a database across the network."""
        jobs = list(jobs)
        try:
            with self._batch_tx(durable=True):
                columns = [c for c in _MESSAGE_COLUMNS if c not in self._DSN_MESSAGE_COLUMNS
                           or getattr(message, c) is not None]
                self._exec(
                    f"INSERT INTO messages ({', '.join(columns)})"
                    f" VALUES ({_marks(columns)})",
                    [getattr(message, c) for c in columns])
                if jobs:
                    self._insert_jobs(message, jobs, self.clock(), stored)
                    if dedup_since is not None and message.message_id_header:
                        earlier = self._claim_dedup(message, jobs, dedup_since)
                        if earlier is not None:
                            raise _Resent(earlier)  # nothing of this copy is kept
        except _Resent as resent:
            return resent.job_ids
        except StoreError:
            raise
        except Exception as exc:
            if self._is_db_error(exc):
                raise StoreError(str(exc)) from exc
            raise
        return None

    def _insert_jobs(self, message: Message, jobs: list[NewJob], now: float,
                     stored: bool) -> None:
        """A new message's jobs and their first events, in two statements: each job born
        `spooled` (received) and, `stored`, moved on to `stored` at once: both changes checked
        against the table, made by the insert itself."""
        check_transition([None], State.SPOOLED, Ev.RECEIVED)
        events = [(j.id, Ev.RECEIVED,
                   f"from {message.report_to or message.envelope_from or '-'}"
                   f" peer {message.peer or '-'}, {message.pages} page(s),"
                   f" {message.document_bytes} bytes") for j in jobs]
        state = State.SPOOLED
        if stored:
            check_transition([State.SPOOLED], State.STORED, Ev.STORED)
            state = State.STORED
            events += [(j.id, Ev.STORED, "document in the media store before the 250")
                       for j in jobs]
        dsn = any(j.dsn_notify is not None or j.dsn_orcpt is not None for j in jobs)
        columns = self._JOB_INSERT + (self._DSN_JOB_COLUMNS if dsn else ())
        self._exec(
            f"INSERT INTO jobs ({', '.join(columns)}) VALUES "
            + ", ".join(f"({_marks(columns)})" for _ in jobs),
            [v for j in jobs for v in (
                j.id, message.id, j.to_number, j.from_number, j.quality, state.value,
                j.callback_token, j.media_key, message.pages, 0, 0, now, now, now,
                *((j.dsn_notify, j.dsn_orcpt) if dsn else ()))])
        self._exec("INSERT INTO events (job_id, at, kind, detail) VALUES "
                   + ", ".join("(?, ?, ?, ?)" for _ in events),
                   [v for job_id, kind, detail in events for v in (job_id, now, kind, detail)])

    def _claim_dedup(self, message: Message, jobs: list[NewJob],
                     since: float) -> list[str] | None:
        """Inside the intake commit: claim this mail's dedup key for each number (Message-ID,
        number, document), unless an earlier copy accepted at or after `since` holds it.

        One upsert for all numbers, in key order (two copies committing at once on two nodes
        lock the keys in the same order: the second waits for the first and then finds its
        keys; SQLite serialises the commits). A key older than `since` is taken over, so the
        window's end lets a later copy through. Returns None when this mail is new (every key
        now ours: a mail with a new recipient is a new mail and takes the others over too), or
        the jobs of the earlier copy, in the order of `jobs`, when it holds every key."""
        mine = sorted((j.to_number, j.id) for j in jobs)
        rows = self._rows(
            "INSERT INTO dedup_keys (message_id_header, to_number, document_sha256, job_id, at)"
            f" VALUES {', '.join('(?, ?, ?, ?, ?)' for _ in mine)}"
            " ON CONFLICT (message_id_header, to_number, document_sha256) DO UPDATE SET"
            " job_id = CASE WHEN dedup_keys.at < ? THEN excluded.job_id"
            " ELSE dedup_keys.job_id END,"
            " at = CASE WHEN dedup_keys.at < ? THEN excluded.at ELSE dedup_keys.at END"
            " RETURNING to_number, job_id",
            [*(v for number, job_id in mine
               for v in (message.message_id_header, number, message.document_sha256, job_id,
                         message.created_at)), since, since])
        holders = {r["to_number"]: r["job_id"] for r in rows}
        taken = [(number, job_id) for number, job_id in mine if holders[number] != job_id]
        if len(taken) == len(mine):
            return [holders[j.to_number] for j in jobs]
        for number, job_id in taken:
            self._exec_later("UPDATE dedup_keys SET job_id = ?, at = ? WHERE message_id_header = ?"
                             " AND to_number = ? AND document_sha256 = ?",
                             (job_id, message.created_at, message.message_id_header, number,
                              message.document_sha256))
        return None

    def is_db_error(self, exc: BaseException) -> bool:
        return self._is_db_error(exc)

    def _is_db_error(self, exc: BaseException) -> bool:
        """Whether `exc` is the driver's database error (turned into StoreError on intake)."""
        return False

    # -- reads -------------------------------------------------------------------------------

    def job(self, job_id: str) -> Job | None:
        row = self._one("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return _job(row) if row else None

    def job_by_token(self, token: str) -> Job | None:
        row = self._one("SELECT * FROM jobs WHERE callback_token = ?", (token,))
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
        sql, args = "SELECT * FROM jobs", []
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

    def _due_where(self, exclude: list[str], now: float) -> tuple[str, list[Any]]:
        states = sorted(s.value for s in ACTIVE_STATES)
        sql = _DUE.format(states=_marks(states))
        if exclude:
            sql += f" AND id NOT IN ({_marks(exclude)})"
        return sql, [*states, now, *exclude]

    def due_jobs(self, now: float, limit: int, exclude: Iterable[str] = ()) -> list[Job]:
        where, args = self._due_where(list(exclude), now)
        rows = self._rows(
            f"SELECT * FROM jobs WHERE {where}{_UNCLAIMED} AND next_run_at <= ?"
            " ORDER BY next_run_at LIMIT ?", (*args, now, now, limit))
        return [_job(r) for r in rows]

    def next_due_at(self, exclude: Iterable[str] = ()) -> float | None:
        """A job another node holds falls due for us when its lease runs out."""
        where, args = self._due_where(list(exclude), self.clock())
        return self._scalar(
            "SELECT MIN(CASE WHEN lease_until > next_run_at THEN lease_until"
            f" ELSE next_run_at END) AS t FROM jobs WHERE {where}", args)

    # -- claims: several nodes, one queue ----------------------------------------------------

    SKIP_LOCKED = ""  # PostgreSQL: " FOR UPDATE SKIP LOCKED"
    FOR_UPDATE = ""   # PostgreSQL: " FOR UPDATE" (SQLite: BEGIN IMMEDIATE locks everything)

    def _claim_lock(self, what: str = "claims") -> None:
        """Serialise one kind of shared decision across nodes, inside a transaction: "claims"
        (jobs, named leases), "hits" (rate limits), "send-slot" (the account's send rate),
        "partials" (opening a split mail's set, counted per sender),
        "purge" (a document's deletion against a resend of it).
        Each kind has its own lock, so a sender's rate-limit check never waits behind a
        claim. SQLite: BEGIN IMMEDIATE already serialises every write."""

    def _relaxed_commit(self) -> None:
        """Inside a transaction: its commit need not wait for the disk (rate-limit counts:
        losing the last few to a crash of the database server costs nothing). SQLite: as
        every commit."""

    def claim_due(self, now: float, limit: int, exclude: Iterable[str] = ()) -> list[Job]:
        where, args = self._due_where(list(exclude), now)
        with self._tx():
            self._claim_lock()
            rows = self._rows(
                f"SELECT * FROM jobs WHERE {where}{_UNCLAIMED} AND next_run_at <= ?"
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

    def release(self, *job_ids: str) -> None:
        if not job_ids:
            return
        with self._tx():
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
                 count, now - window_s])
        if inserted():
            return 0.0
        return max(self._hits_wait(rules, count, now, window_s), 1e-3)  # refused: not 0

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

    def queue_depth(self) -> int:
        states = sorted(s.value for s in ACTIVE_STATES)
        return int(self._scalar(f"SELECT COUNT(*) AS n FROM jobs WHERE state IN"
                                f" ({_marks(states)})", states) or 0)

    def earlier_sids(self, job: Job) -> set[str]:
        rows = self._rows("SELECT fax_sid FROM attempts WHERE job_id = ? AND n < ?"
                          " AND fax_sid IS NOT NULL", (job.id, job.attempt))
        return {r["fax_sid"] for r in rows}

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
            pattern = "%" + _like_escape(sender.lower()) + "%"
            where.append("(" + " OR ".join(
                f"LOWER(COALESCE(m.{c}, '')) LIKE ? ESCAPE '\\'"
                for c in ("envelope_from", "header_from", "report_to")) + ")")
            args += [pattern] * 3
        if since is not None:
            where.append("j.created_at >= ?")
            args.append(since)
        sql = _LISTING + (" WHERE " + " AND ".join(where) if where else "")
        sql += " ORDER BY j.created_at DESC, j.id DESC LIMIT ?"
        args.append(limit)
        out = []
        for r in self._rows(sql, args):
            job = _job(r)
            last = (Event(job.id, r["e_at"], r["e_kind"], r["e_detail"])
                    if r["e_kind"] is not None else None)
            out.append(JobListing(job, last_event=last,
                                  **{c: r[f"m_{c}"] for c in _LISTING_MESSAGE_FIELDS}))
        return out

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
        where: list[str] = []
        args: list[Any] = []
        needs_message = False
        if states is not None:
            values = sorted(s.value for s in states)
            where.append(f"j.state IN ({_marks(values)})")
            args += values
        if fax_status:
            where.append("j.fax_status = ?")
            args.append(fax_status)
        if to_digits:
            where.append("j.to_number LIKE ?")
            args.append(f"%{to_digits}")
        if sender:
            needs_message = True
            pattern = "%" + _like_escape(sender.lower()) + "%"
            where.append("(" + " OR ".join(
                f"LOWER(COALESCE(m.{c}, '')) LIKE ? ESCAPE '\\'"
                for c in ("envelope_from", "header_from", "report_to")) + ")")
            args += [pattern] * 3
        if since is not None:
            where.append("j.created_at >= ?")
            args.append(since)
        if until is not None:
            where.append("j.created_at < ?")
            args.append(until)
        if text:
            needs_message = True
            pattern = "%" + _like_escape(text.strip().lower()) + "%"
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
        out = []
        for r in self._rows(sql, ids):
            job = _job(r)
            last = (Event(job.id, r["e_at"], r["e_kind"], r["e_detail"])
                    if r["e_kind"] is not None else None)
            out.append(JobListing(job, last_event=last,
                                  **{c: r[f"m_{c}"] for c in _LISTING_MESSAGE_FIELDS}))
        return out, total

    def node_seen(self, node_id: str, started_at: float, now: float, detail: str) -> None:
        """This node is alive (its heartbeat): one row per node, written over."""
        with self._tx():
            self._exec("INSERT INTO nodes (node_id, started_at, seen_at, detail)"
                       " VALUES (?, ?, ?, ?) ON CONFLICT (node_id) DO UPDATE SET"
                       " started_at = excluded.started_at, seen_at = excluded.seen_at,"
                       " detail = excluded.detail", (node_id, started_at, now, detail))

    def node_gone(self, node_id: str) -> None:
        """This node stopped cleanly: no longer listed (a crashed one ages out)."""
        with self._tx():
            self._exec("DELETE FROM nodes WHERE node_id = ?", (node_id,))

    def live_nodes(self, since: float, limit: int = 100) -> list[dict[str, Any]]:
        """Nodes seen at or after `since`, by node id: node_id, started_at, seen_at, detail."""
        return self._rows("SELECT node_id, started_at, seen_at, detail FROM nodes"
                          " WHERE seen_at >= ? ORDER BY node_id LIMIT ?", (since, limit))

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

    def unpurged_done_messages(self, cutoff: float, limit: int = 100) -> list[Message]:
        """Messages whose jobs were all reported before `cutoff` and whose document remains."""
        rows = self._rows(
            "SELECT * FROM messages m WHERE m.purged_at IS NULL AND NOT EXISTS ("
            " SELECT 1 FROM jobs j WHERE j.message_id = m.id"
            " AND (j.state <> 'reported' OR j.reported_at > ?)) ORDER BY m.created_at LIMIT ?",
            (cutoff, limit))
        return [Message(**{c: r[c] for c in _MESSAGE_COLUMNS}) for r in rows]

    # -- the one guarded change --------------------------------------------------------------

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
        for source in sources:
            check_transition([source], source if target is None else target, event)
        now = self.clock() if at is None else at
        values["updated_at"] = now
        if target is not None:
            values["state"] = target.value
        assignments, args = [], []
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
        guard, guard_args = "", []
        if mine or fence is not None:
            guard, guard_args = " AND (lease_owner IS NULL OR lease_owner = ?)", [self.node_id]
        if fence is not None:
            guard += " AND lease_epoch = ?"
            guard_args.append(fence)
        changed = self._exec(
            f"UPDATE jobs SET {', '.join(assignments)} WHERE id = ?"
            f" AND state IN ({_marks(expected)}){guard}",
            (*args, job_id, *expected, *guard_args))
        if changed != 1:
            return False
        for sql, extra in also:  # statements that belong to the same transition
            self._exec_later(sql, extra)
        self._event(job_id, event, detail, now)
        return True

    # -- worker steps ------------------------------------------------------------------------

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
        now = self.clock()
        n = job.attempt + 1
        return self.transition(
            job.id, [State.STORED], State.SUBMITTING, Ev.SUBMITTING,
            f"attempt {n}: sending to SignalWire ({job.quality} quality)",
            also=[("INSERT INTO attempts (job_id, n, quality, started_at) VALUES (?, ?, ?, ?)",
                   (job.id, n, job.quality, now))], durable=True, fence=job.lease_epoch,
            callback_url=callback_url, submit_started_at=now, attempt=n, fax_sid=None,
            fax_status=None, error_code=None, error_message=None, next_run_at=recheck_at)

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
            also=[("DELETE FROM attempts WHERE job_id = ? AND n = ?", (job.id, job.attempt))],
            fence=job.lease_epoch, attempt=max(0, job.attempt - 1), tries=job.tries + 1,
            next_run_at=run_at)

    def schedule_retry(self, job: Job, run_at: float, quality: str, detail: str) -> bool:
        """Another fax attempt (busy, no answer, line trouble) after a final status."""
        return self.transition(job.id, [State.COMPLETED], State.STORED, Ev.RETRY, detail,
                               fence=job.lease_epoch, quality=quality, tries=0,
                               next_run_at=run_at)

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
            fence=job.lease_epoch, failure_reason=reason, error_code=error_code, error_message=error_message,
            tries=0, next_run_at=now)

    def record_status(self, job: Job, sid: str | None, status: str | None, *, pages: int | None,
                      duration_s: int | None, error_code: str | None,
                      error_message: str | None, source: str) -> CallbackAction:
        """The job is read, classified and changed in one transaction; on PostgreSQL the
        change may still find the job moved on (the send's answer recorded meanwhile by
        another connection: `submitting` -> `submitted`), and then the status is classified
        again against what the job is now, so a final status is never lost."""
        for _ in range(5):
            action = self._record_status(job, sid, status, pages, duration_s, error_code,
                                         error_message, source)
            if action is not None:
                return action
        raise StoreError(f"job {job.id}: the status {status} could not be recorded: the job "
                         "kept changing")

    def _record_status(self, job: Job, sid: str | None, status: str | None, pages: int | None,
                       duration_s: int | None, error_code: str | None,
                       error_message: str | None, source: str) -> CallbackAction | None:
        with self._tx():
            row = self._one("SELECT * FROM jobs WHERE id = ?", (job.id,))
            if row is None:
                return CallbackAction.IGNORE
            current = _job(row)
            action = classify_callback(current.state, current.fax_sid, sid, status)
            if action is not CallbackAction.IGNORE and sid and sid in self.earlier_sids(current):
                action = CallbackAction.IGNORE  # a late word on an earlier attempt's fax
            if (action is not CallbackAction.IGNORE and sid and current.fax_sid is None
                    and self._sid_owners(current, [sid])):
                action = CallbackAction.IGNORE  # another job's fax: never this job's
            now = self.clock()
            detail = (f"{source}: status={status or '-'} sid={sid or '-'}"
                      + (f" pages={pages}" if pages is not None else "")
                      + (f" error={error_code or ''} {error_message}" if error_message else ""))
            done = True
            if action is CallbackAction.FINAL:
                done = self._transition(
                    job.id, [current.state], State.COMPLETED, Ev.FINAL, detail,
                    also=[("UPDATE attempts SET fax_sid = COALESCE(fax_sid, ?), status = ?,"
                           " error_code = ?, error_message = ?, pages = ?, duration_s = ?,"
                           " ended_at = ? WHERE job_id = ? AND n = ?",
                           (sid, status, error_code, error_message, pages, duration_s, now,
                            job.id, current.attempt))],
                    fax_sid=Expr("COALESCE(fax_sid, ?)", sid), fax_status=status,
                    pages_sent=pages, duration_s=Expr("COALESCE(?, duration_s)", duration_s),
                    error_code=error_code, error_message=error_message, tries=0,
                    next_run_at=now)
            elif action is CallbackAction.PROGRESS:
                done = self._transition(job.id, [current.state], None, Ev.PROGRESS, detail,
                                        fax_status=status, fax_sid=Expr("COALESCE(fax_sid, ?)", sid))
            else:
                self._event(job.id, "ignored", detail, now)
        return action if done else None

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

    def gone_messages(self, ids: Sequence[str]) -> set[str]:
        """Of these message ids, those whose document may go: purged, or no such message."""
        ids = list(ids)
        if not ids:
            return set()
        kept = {r["id"] for r in self._rows(
            f"SELECT id FROM messages WHERE purged_at IS NULL AND id IN ({_marks(ids)})", ids)}
        return set(ids) - kept

    def claim_purge(self, message_id: str, job: Job | None = None) -> bool:
        """Recorded before a message's document is deleted, in one statement with its checks:
        every job of the message reported, and (`job`: the purge follows that job's report)
        the job still held under the claim it was reported with. From here no resend takes
        the document (`add_resend`); False: leave it be."""
        fence, args = "", [self.clock(), message_id, message_id]
        if job is not None:
            fence = (" AND EXISTS (SELECT 1 FROM jobs WHERE id = ? AND lease_epoch = ?"
                     " AND (lease_owner IS NULL OR lease_owner = ?))")
            args += [job.id, job.lease_epoch, self.node_id]
        with self._tx():
            self._claim_lock("purge")
            return self._exec(
                "UPDATE messages SET purging_at = ? WHERE id = ? AND purged_at IS NULL"
                " AND NOT EXISTS (SELECT 1 FROM jobs WHERE message_id = ?"
                f" AND state <> 'reported'){fence}", args) == 1

    def mark_purged(self, message_id: str) -> None:
        with self._tx():
            self._exec_later("UPDATE messages SET purged_at = ? WHERE id = ?",
                             (self.clock(), message_id))

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

    # -- operator actions --------------------------------------------------------------------

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
                " updated_at)"
                " SELECT ?, m.id, ?, ?, ?, ?, ?, ?, m.pages, 0, 0, ?, ?, ?"
                " FROM messages m WHERE m.id = ? AND m.purged_at IS NULL"
                " AND m.purging_at IS NULL",
                (new.id, new.to_number, new.from_number, new.quality, State.SPOOLED.value,
                 new.callback_token, new.media_key, now, now, now, job.message_id))
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
        return None

    def cancel_unsent(self, job_id: str, reason: str, now: float, *,
                      by: str | None = None) -> bool:
        """Give up a job that has not reached SignalWire (spooled or stored) so its report
        tells the sender `reason`; the history names who canceled it. False if it moved on
        meanwhile (the worker may have started the send: then it is not ours to stop)."""
        detail = f"canceled by {operator(by)}" if by else reason
        # fax_status "canceled": not the busy line of an earlier attempt waiting for its retry.
        return self.transition(job_id, [State.SPOOLED, State.STORED], State.GIVEN_UP,
                               Ev.CANCELED, detail, at=now, failure_reason=reason,
                               fax_status="canceled", error_code=None, error_message=None,
                               tries=0, next_run_at=now)

    def note_cancel(self, job_id: str, detail: str, now: float, *,
                    by: str | None = None) -> bool:
        """Record a cancel done at SignalWire ("`detail` by <who>") and have the worker fetch
        the fax's status now rather than wait for the callback or the next poll."""
        return self.transition(job_id, [State.SUBMITTED], None, Ev.CANCEL,
                               f"{detail} by {operator(by)}", at=now, next_run_at=now, tries=0)

    def report_again(self, job_id: str, state: State, now: float, *,
                     by: str | None = None) -> bool:
        """Back from reported to `state` (completed or given-up) with the report due now.
        `reported_at` is kept: it is how the worker tells a job that was reported before
        (report only) from a fresh final status (retries first)."""
        return self.transition(job_id, [State.REPORTED], state, Ev.REPORT_AGAIN,
                               f"report requested again by {operator(by)}", at=now, tries=0,
                               next_run_at=now)

    def report_now(self, job_id: str, now: float, *, by: str | None = None) -> bool:
        """A report already due (maybe waiting out a relay outage): try it now."""
        job = self.job(job_id)
        if job is None or job.state not in REPORT_DUE:
            return False
        return self.transition(job_id, [job.state], None, Ev.REPORT_NOW,
                               f"report retry requested by {operator(by)}", at=now, tries=0,
                               next_run_at=now)


class _Rollback(StoreError):
    """Raised inside a transaction to undo it."""


class _Resent(Exception):
    """Raised inside the intake commit to undo it: the mail is an earlier copy's jobs."""

    def __init__(self, job_ids: list[str]) -> None:
        super().__init__(", ".join(job_ids))
        self.job_ids = job_ids

