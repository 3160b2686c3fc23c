"""The SQL store's transaction plumbing, in one piece: what a backend provides (its connection,
placeholders, transactions and their durability, running a statement, the DDL types, the locks
of shared decisions), the schema's migrations, and the public surface (`SqlAccess`) the tables
kept beside the jobs are written through (gateway/store/inbound.py, partials.py, sessions.py).

The queries of each concern are mixins over this (sql_intake.py, sql_jobs.py, sql_leases.py,
sql_listings.py, sql_nodes.py), composed into `SqlStore` (sql.py).
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import fields
from typing import Any

from gateway.jobs.outbound_states import Job, State
from gateway.store import migrations
from gateway.store.base import Store, StoreError
from gateway.store.interfaces import SqlAccess
from gateway.store.rows import Attempt, Message

log = logging.getLogger(__name__)

JOB_COLUMNS = tuple(f.name for f in fields(Job))
# The job's columns that hold a time (a float): a row read as JSON (PostgreSQL's functions)
# gives 1.0 back as 1.
FLOAT_JOB_COLUMNS = tuple(f.name for f in fields(Job) if "float" in str(f.type))
_MESSAGE_COLUMNS = tuple(f.name for f in fields(Message))
_ATTEMPT_COLUMNS = tuple(f.name for f in fields(Attempt))


class Expr:
    """A column value computed in SQL (`COALESCE(fax_sid, ?)`) rather than a plain value."""

    def __init__(self, sql: str, *args: Any) -> None:
        self.sql = sql
        self.args = args


def _marks(items: Sequence[Any]) -> str:
    return ",".join("?" for _ in items)


def _job(row: dict[str, Any]) -> Job:
    values = {c: row[c] for c in JOB_COLUMNS}
    values["state"] = State(values["state"])
    return Job(**values)


def like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


class SqlCore(Store, SqlAccess):
    """The transaction plumbing and the schema. Backends provide the connection and the few
    dialect bits (the abstract methods here)."""

    # Types that differ in DDL (see gateway/store/migrations.py).
    DDL_TYPES: dict[str, str] = {"float": "DOUBLE PRECISION", "autoid": "INTEGER"}

    @abc.abstractmethod
    def _tx(self, durable: bool = False) -> AbstractContextManager[None]:
        """A write transaction that takes the write lock at once. `durable`: the commit
        survives power loss, not only a process crash (the 250 to a sender, a send about to
        be POSTed)."""

    def _batch_tx(self, durable: bool = False) -> AbstractContextManager[None]:
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

    def _rows_later(self, sql: str, args: Sequence[Any] = ()
                    ) -> Callable[[], list[dict[str, Any]]]:
        """`_rows` whose rows are read later, inside the same transaction: PostgreSQL sends
        the query and waits only when they are read, so several such queries sent in a row
        cost one round trip. Default: run now."""
        rows = self._rows(sql, args)
        return lambda: rows

    def _sql(self, sql: str) -> str:
        """The statement in the backend's placeholder style (`?` here; `%s` for psycopg)."""
        return sql

    def _one(self, sql: str, args: Sequence[Any] = ()) -> dict[str, Any] | None:
        rows = self._rows(sql, args)
        return rows[0] if rows else None

    def _scalar(self, sql: str, args: Sequence[Any] = ()) -> Any:
        row = self._one(sql, args)
        return None if row is None else next(iter(row.values()))

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

    def is_db_error(self, exc: BaseException) -> bool:
        return self._is_db_error(exc)

    def _is_db_error(self, exc: BaseException) -> bool:
        """Whether `exc` is the driver's database error (turned into StoreError on intake)."""
        return False

    SKIP_LOCKED = ""  # PostgreSQL: " FOR UPDATE SKIP LOCKED"

    FOR_UPDATE = ""   # PostgreSQL: " FOR UPDATE" (SQLite: BEGIN IMMEDIATE locks everything)

    def _claim_lock(self, what: str = "claims") -> None:
        """Serialise one kind of shared decision across nodes, inside a transaction: "claims"
        (jobs, named leases), "hits" (rate limits), "send-slot" (the account's send rate),
        "partials" (opening a split mail's set, counted per sender),
        "purge" (a document's deletion against a resend of it).
        Each kind has its own lock, so a sender's rate-limit check never waits behind a
        claim. SQLite: BEGIN IMMEDIATE already serialises every write."""

    def _guarded_tx(self) -> AbstractContextManager[None]:
        """Around a read and the transition it decides, whose guard (the state read) is
        checked by the transition itself, and retried by the caller if the row moved on:
        SQLite takes the write lock for the pair (a transaction); PostgreSQL needs none (each
        statement commits by itself: two statements, not four)."""
        return self._tx()

    def _locking(self, what: str) -> list[tuple[str, Sequence[Any]]]:
        """`_claim_lock` as a statement to run with another (a transition's `also`). SQLite:
        none."""
        return []

    def _relaxed_commit(self) -> None:
        """Inside a transaction: its commit need not wait for the disk (rate-limit counts:
        losing the last few to a crash of the database server costs nothing). SQLite: as
        every commit."""

    def _announcing(self, where: str = "",
                    args: Sequence[Any] = ()) -> list[tuple[str, Sequence[Any]]]:
        """The statements that tell the other nodes, when the transaction they are in commits,
        that work is due now or sooner than they think (new jobs, a resend, a retry, jobs
        handed back): PostgreSQL's NOTIFY (gateway/store/pg_wakeups.py); `where` (SQL, `?`
        for `args`): only if it holds. None on SQLite: one node, which wakes itself."""
        return []

    def _announce(self, where: str = "", args: Sequence[Any] = ()) -> None:
        """`_announcing`, run inside the caller's transaction (sent with the commit)."""
        for sql, values in self._announcing(where, args):
            self._exec_later(sql, values)

    def _event(self, job_id: str, kind: str, detail: str | None, at: float) -> None:
        # Nothing to wait for: PostgreSQL sends it with the next statement or the commit.
        self._exec_later("INSERT INTO events (job_id, at, kind, detail) VALUES (?, ?, ?, ?)",
                         (job_id, at, kind, detail))

    # -- the public surface (SqlAccess) ------------------------------------------------------

    def tx(self, durable: bool = False) -> AbstractContextManager[None]:
        return self._tx(durable)

    def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        return self._exec(sql, args)

    def execute_later(self, sql: str, args: Sequence[Any] = ()) -> Callable[[], int]:
        return self._exec_later(sql, args)

    def rows(self, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]:
        return self._rows(sql, args)

    def one(self, sql: str, args: Sequence[Any] = ()) -> dict[str, Any] | None:
        return self._one(sql, args)

    def scalar(self, sql: str, args: Sequence[Any] = ()) -> Any:
        return self._scalar(sql, args)

    def lock(self, what: str) -> None:
        self._claim_lock(what)
