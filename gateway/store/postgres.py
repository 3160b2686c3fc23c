"""The PostgreSQL backend: one database shared by several gateways (DATABASE_URL).

psycopg 3 with psycopg_pool: a synchronous API (the store runs on its own thread, and the CLI is
synchronous). A query the store runs often is prepared on the server (psycopg's own
`prepare_threshold`), so PostgreSQL parses and plans it once per connection, not on every call;
`DATABASE_PREPARED_STATEMENTS=no` turns that off for a PgBouncer in transaction mode that does
not keep prepared statements (before 1.21, or `max_prepared_statements = 0`). Every query is
in `sql.py`; only what PostgreSQL does its
own way is here: connecting, `%s` placeholders, the advisory lock that lets only one of several
nodes starting together run the migrations, and the claim of due work with
`FOR UPDATE SKIP LOCKED` under a transaction-scoped advisory lock (so the check "no other
attempt in flight to this number" and the lease that makes it true are one step across nodes),
and the batch transaction of the intake commit (pipeline mode: two round trips, not eight), and
NOTIFY, which wakes the other nodes when a commit makes work due (`_announcing`; the listener is
pg_wakeups.py), and two calls as PL/pgSQL functions (`_FUNCTIONS`): the worker's trip (release,
claim, next due time; made from sql_leases.py's own SQL) and the rate limits' charge. Where
statements go together, they are one statement where PostgreSQL allows (`_moved`,
`_write_together`, `_claim_purge_jobs`, `_submitting_row`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from gateway import defaults
from gateway.config import mask_url
from gateway.jobs.outbound_states import ACTIVE_STATES, Job, State
from gateway.store.base import StoreError
from gateway.store.interfaces import Wakeups
from gateway.store.pg_wakeups import CHANNEL, PgWakeups
from gateway.store.sql import SqlStore
from gateway.store.sql_core import FLOAT_JOB_COLUMNS, _job
from gateway.store.sql_leases import DUE, UNCLAIMED

log = logging.getLogger(__name__)

# Advisory lock keys (any bigint; these spell "faxgw" + a purpose).
MIGRATION_LOCK = 0x6661786777_01
CLAIM_LOCK = 0x6661786777_02
# One advisory lock per kind of shared decision (see SqlStore._claim_lock).
_LOCKS = {"claims": CLAIM_LOCK, "hits": 0x6661786777_03, "send-slot": 0x6661786777_04,
          "partials": 0x6661786777_05, "purge": 0x6661786777_06}


# The worker's trip (`release_and_claim`) as one function call where it was six statements:
# the same SQL as SqlLeases (its `DUE` and `UNCLAIMED`, the time `?` made `p_now`), run in the
# server. Each of its statements takes its own snapshot (a VOLATILE function), so the claim
# reads after the advisory lock, as the statements sent one by one did. Its name carries a
# hash of its text: a node of another version uses its own, and a changed body is a new
# function, made at start (`_make_functions`), never one replaced under a running node.
_DUE_PG = DUE.format(states=", ".join(f"'{s.value}'" for s in sorted(ACTIVE_STATES))
                     ).replace("?", "p_now")
_CLAIM_BODY = f"""
DECLARE
    taken text[] := '{{}}';
    numbers text[] := '{{}}';
    claimed jsonb := '[]';
    nxt double precision;
    r record;
BEGIN
    IF cardinality(p_released) > 0 THEN
        UPDATE jobs SET lease_owner = NULL, lease_until = NULL
            WHERE lease_owner = p_node AND id = ANY(p_released);
    END IF;
    IF p_limit > 0 THEN
        PERFORM pg_advisory_xact_lock(p_lock);
        FOR r IN SELECT id, state, to_number FROM jobs
                WHERE {_DUE_PG} {UNCLAIMED.replace("?", "p_now")}
                    AND next_run_at <= p_now AND NOT (id = ANY(p_exclude))
                ORDER BY next_run_at LIMIT p_limit FOR UPDATE SKIP LOCKED LOOP
            IF r.state = 'stored' THEN
                CONTINUE WHEN r.to_number = ANY(numbers);  -- one attempt in flight a number
                numbers := numbers || r.to_number;
            END IF;
            taken := taken || r.id;
        END LOOP;
        IF cardinality(taken) > 0 THEN
            WITH up AS (UPDATE jobs SET lease_owner = p_node, lease_until = p_now + p_lease_s,
                            lease_epoch = lease_epoch + 1
                        WHERE id = ANY(taken) RETURNING *)
            SELECT jsonb_agg(to_jsonb(up) ORDER BY up.next_run_at, up.id) INTO claimed FROM up;
        END IF;
    END IF;
    SELECT MIN(CASE WHEN lease_until > next_run_at THEN lease_until ELSE next_run_at END)
        INTO nxt FROM jobs WHERE {_DUE_PG} AND NOT (id = ANY(p_exclude || taken));
    RETURN jsonb_build_object('jobs', claimed, 'next', nxt);
END"""
# `take_hits`' transaction (SqlLeases._insert_hits: the lock, the relaxed commit, the insert
# where every rule has room) as one call; the rules and the hits come as arrays.
_HITS_BODY = """
DECLARE
    n integer;
BEGIN
    PERFORM pg_advisory_xact_lock(p_lock);
    PERFORM set_config('synchronous_commit', 'off', true);  -- as SET LOCAL: this commit only
    INSERT INTO hits (kind, hkey, at)
        SELECT f.kind, f.hkey, f.at FROM unnest(p_kinds, p_keys, p_at) AS f(kind, hkey, at)
        WHERE NOT EXISTS (
            SELECT 1 FROM unnest(p_rule_kinds, p_rule_keys, p_limits) AS r(kind, hkey, lim)
            WHERE r.lim - p_count < (SELECT COUNT(*) FROM hits WHERE hits.kind = r.kind
                                     AND hits.hkey = r.hkey AND hits.at > p_since));
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END"""


def _named(stem: str, body: str) -> str:
    return f"faxgw_{stem}_{hashlib.sha256(body.encode()).hexdigest()[:12]}"


_CLAIM_FUNCTION = _named("release_and_claim", _CLAIM_BODY)
_HITS_FUNCTION = _named("take_hits", _HITS_BODY)
_FUNCTIONS = {
    _CLAIM_FUNCTION: ("p_node text, p_released text[], p_now double precision,"
                      " p_limit integer, p_exclude text[], p_lease_s double precision,"
                      " p_lock bigint", "jsonb", _CLAIM_BODY),
    _HITS_FUNCTION: ("p_rule_kinds text[], p_rule_keys text[], p_limits integer[],"
                     " p_kinds text[], p_keys text[], p_at double precision[], p_count integer,"
                     " p_since double precision, p_lock bigint", "integer", _HITS_BODY)}

PREPARE_THRESHOLD = 5
_IDLE = psycopg.pq.TransactionStatus.IDLE
# What a prepared statement meets behind a pooler that moves transactions between server
# connections and does not carry prepared statements along.
_LOST_PREPARED = (psycopg.errors.DuplicatePreparedStatement,
                  psycopg.errors.InvalidSqlStatementName)
# PostgreSQL's words when a prepared `SELECT *` meets a table that gained a column.
_STALE_PLAN = "cached plan must not change result type"


@functools.lru_cache(maxsize=512)
def _placeholders(sql: str) -> str:
    """`?` -> `%s`; a literal `%` doubled so psycopg does not read it as a placeholder."""
    return sql.replace("%", "%%").replace("?", "%s")


_INSERT_VALUES = re.compile(r"^(INSERT INTO \w+ \([^)]*\)) VALUES (\([^)]*\))$", re.S)
# A NOTIFY, or an advisory lock taken with a transition (`_locking`).
_NOTIFY = re.compile(r"^(SELECT (?:pg_notify\(\?, \?\)|pg_advisory_xact_lock\(\?\)))"
                     r"( WHERE .+)?$", re.S)
_WRITE = re.compile(r"^(INSERT INTO|UPDATE|DELETE FROM) ")
_GUARDED = re.compile(r"^(UPDATE|DELETE FROM) \w+\b.* WHERE .+$", re.S)


@functools.lru_cache(maxsize=64)
def _only_if_moved(sql: str) -> str | None:
    """A statement of a transition (`also`), made to happen only if its UPDATE did: an
    INSERT ... VALUES selects its row from `moved`; an UPDATE or DELETE adds the condition.
    A NOTIFY's `SELECT pg_notify(...) [WHERE ...]`, and a lock's `SELECT
    pg_advisory_xact_lock(?)`, select from `moved` (and are read by the event's row,
    `_moved`). None for any other shape (a subquery's WHERE): such a transition runs as a
    transaction of statements instead, never one of them unguarded."""
    if m := _NOTIFY.match(sql):
        return f"{m.group(1)} FROM moved{m.group(2) or ''}"
    if m := _INSERT_VALUES.match(sql):
        return f"{m.group(1)} SELECT {m.group(2)[1:-1]} FROM moved"
    if _GUARDED.match(sql) and sql.count(" WHERE ") == 1 and " RETURNING " not in sql:
        head, _, cond = sql.partition(" WHERE ")
        return f"{head} WHERE ({cond}) AND EXISTS (SELECT 1 FROM moved)"
    return None


class PostgresStore(SqlStore):
    DDL_TYPES = {"float": "DOUBLE PRECISION",
                 "autoid": "BIGINT GENERATED BY DEFAULT AS IDENTITY"}
    SKIP_LOCKED = " FOR UPDATE SKIP LOCKED"
    FOR_UPDATE = " FOR UPDATE"
    # One store call at a time left every mail's commit queued behind the worker's and the
    # callbacks' round trips (intake on PostgreSQL ran at a third of SQLite's rate); the
    # pool's connections serve this many calls at once, each transaction on its own one.
    # Two, since intake's commits go first (`run_first`) and share one (`add_message_soon`):
    # four threads only fought over the GIL (in two pairs of 400-mail bursts on 2 cores: 56-65
    # vs 84-88 mails/s, 24.6-27.2 vs 21.3-23.8 ms of CPU a fax, the server's 6.4-7.3 vs 5.3-5.7).
    THREADS = 2

    def __init__(self, url: str, clock: Callable[[], float] = time.time,
                 connect_timeout_s: float = defaults.STORE_BUSY_TIMEOUT_S,
                 max_connections: int = 4, prepared_statements: bool = True,
                 listen_url: str | None = None) -> None:
        super().__init__(clock)
        # Where the wake-up listener connects (pg_wakeups.py); None: `url`.
        self.listen_url = listen_url
        # psycopg prepares a query after it ran this many times on a connection (its
        # default); None: never (each call is parsed and planned again).
        self.prepare_threshold: int | None = PREPARE_THRESHOLD if prepared_statements else None
        self.url = url
        self.connect_timeout_s = connect_timeout_s
        self.max_connections = max_connections
        self._pool: ConnectionPool[psycopg.Connection[dict[str, Any]]] | None = None
        # The connection a transaction runs on, per thread (the store's calls run on THREADS
        # threads at once): inside _tx / _batch_tx / the migration lock.
        self._local = threading.local()
        # Bumped when a call finds its connection broken: every thread then gives back the
        # connection it keeps (see `_connection`).
        self._generation = 0

    # A store thread keeps the connection it took for this long, then hands it back to the
    # pool after a call (so the pool's own ageing and health checks still reach it).
    KEEP_CONNECTION_S = 60.0

    @property
    def _conn(self) -> psycopg.Connection[dict[str, Any]] | None:
        return getattr(self._local, "conn", None)

    @_conn.setter
    def _conn(self, conn: psycopg.Connection[dict[str, Any]] | None) -> None:
        self._local.conn = conn

    @property
    def where(self) -> str:
        return mask_url(self.url)

    def open(self, *, migrate: bool = True) -> None:
        pool: ConnectionPool[psycopg.Connection[dict[str, Any]]] = ConnectionPool(
            # One connection more than the store's threads: the dashboard's reader
            # (`Store.read`) never takes one that intake's commit is waiting for.
            self.url, min_size=1, max_size=self.max_connections + 1, open=False,
            timeout=self.connect_timeout_s, name="faxgw",
            check=ConnectionPool.check_connection,
            kwargs={"autocommit": True, "row_factory": dict_row,
                    "prepare_threshold": self.prepare_threshold,
                    "connect_timeout": max(1, int(self.connect_timeout_s)),
                    "application_name": "faxgw"})
        try:
            pool.open(wait=True, timeout=self.connect_timeout_s)
        except Exception as exc:
            pool.close()
            # The driver's message may quote the conninfo; say where without the password.
            raise StoreError(f"cannot connect to PostgreSQL at {self.where}: "
                             f"{type(exc).__name__}") from None
        self._pool = pool
        try:
            if self.prepare_threshold is not None and not self._server_keeps_prepared():
                self._stop_preparing("a test at start")
            self._open_schema(migrate)
            if migrate:
                self._make_functions()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self.close_thread()
        if self._pool is not None:
            self._pool.close()  # a connection another thread keeps is closed when it comes back
            self._pool = None

    def open_thread(self) -> None:
        """A store thread (and the dashboard's reader) keeps one pooled connection between
        calls instead of taking one from the pool and giving it back for each transaction
        (the pool's lock, checks and reset: 0.04-0.09 ms of a one-statement transaction's
        0.25-0.35 ms of CPU, measured in a loop).
        Other threads (the CLI, a test) still take one per call."""
        self._local.keeps = True

    def close_thread(self) -> None:
        self._give_back()

    open_reader = open_thread
    close_reader = close_thread

    def _give_back(self) -> None:
        kept = getattr(self._local, "kept", None)
        self._local.kept = None
        if kept is not None and self._pool is not None:
            with contextlib.suppress(Exception):
                self._pool.putconn(kept[0])

    def _server_keeps_prepared(self) -> bool:
        """Whether a prepared statement stays where it was prepared. Not so behind PgBouncer in
        transaction mode before 1.21 (or with `max_prepared_statements = 0`): each transaction
        may run on another server connection. Two clients prepare the same name in turn; through
        such a pooler the second lands on the first's server connection (PgBouncer hands out the
        one used last) and is refused, or finds its statement gone."""
        clients = [psycopg.connect(self.url, autocommit=True, prepare_threshold=0,
                                   connect_timeout=max(1, int(self.connect_timeout_s)),
                                   application_name="faxgw")
                   for _ in range(2)]
        try:
            for _ in range(3):
                for client in clients:
                    client.execute("SELECT 1 AS probe", prepare=True).fetchall()
        except _LOST_PREPARED:
            return False
        finally:
            for client in clients:
                client.close()
        return True

    def _stop_preparing(self, why: str) -> None:
        if self.prepare_threshold is None:
            return
        self.prepare_threshold = None
        log.warning("PostgreSQL at %s does not keep prepared statements between transactions "
                    "(%s): a pooler such as PgBouncer in transaction mode before 1.21 is in "
                    "front of it. Prepared statements are off for this run; set "
                    "DATABASE_PREPARED_STATEMENTS=no to say so.", self.where, why)

    @property
    def pool(self) -> ConnectionPool[psycopg.Connection[dict[str, Any]]]:
        if self._pool is None:
            raise StoreError("store is not open")
        return self._pool

    def _lock_migrations(self) -> None:
        # Held to the end of this migration's transaction: nodes starting together migrate
        # once (the others wait, then find the schema current).
        self._exec_later("SELECT pg_advisory_xact_lock(?)", (MIGRATION_LOCK,))

    def _has_table(self, name: str) -> bool:
        return bool(self._rows("SELECT 1 AS x FROM information_schema.tables"
                               " WHERE table_schema = current_schema() AND table_name = ?",
                               (name,)))

    @contextlib.contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[dict[str, Any]]]:
        if self._conn is not None:
            yield self._conn
            return
        local = self._local
        if not getattr(local, "keeps", False):
            with self.pool.connection() as conn:
                self._check_prepare(conn)
                try:
                    yield conn
                except psycopg.Error as exc:
                    self._on_error(conn, exc)
                    raise
            return
        kept = getattr(local, "kept", None)
        if kept is not None and kept[2] != self._generation:
            self._give_back()  # another thread found its connection dead: this one may be too
            kept = None
        if kept is None:
            # The pool checks a connection before handing it out (check_connection): a
            # thread takes one rarely, and after a server restart its idle ones are dead.
            try:
                fresh = self.pool.getconn()
            except BaseException:
                # No connection to be had (the server is down or refuses this database): the
                # connections the other threads keep are likely dead too.
                self._generation += 1
                raise
            kept = local.kept = (fresh, time.monotonic(), self._generation)
        conn = kept[0]
        self._check_prepare(conn)
        try:
            yield conn
        except BaseException as exc:
            if isinstance(exc, psycopg.Error):
                self._on_error(conn, exc)
            if conn.broken or conn.closed:
                # The server restarted, or connections were killed: the other threads'
                # kept connections are likely dead too; they take fresh ones next call.
                self._generation += 1
            if conn.closed or conn.info.transaction_status != _IDLE:
                self._give_back()  # the pool discards a broken one and resets the others
            raise
        if conn.info.transaction_status != _IDLE \
                or time.monotonic() - kept[1] > self.KEEP_CONNECTION_S:
            self._give_back()

    def _check_prepare(self, conn: psycopg.Connection[dict[str, Any]]) -> None:
        if conn.prepare_threshold != self.prepare_threshold:  # turned off since it was made
            conn.prepare_threshold = self.prepare_threshold

    def _on_error(self, conn: psycopg.Connection[dict[str, Any]], exc: psycopg.Error) -> None:
        """What a call may meet that later calls must not: prepared statements gone, or a
        table changed under a prepared one. The call itself fails (its caller retries)."""
        if isinstance(exc, _LOST_PREPARED):
            # A pooler in front of the server moved this connection's transactions to a
            # server connection that lacks its prepared statements (or has another's): none
            # from now on.
            self._stop_preparing(type(exc).__name__)
        elif isinstance(exc, psycopg.errors.FeatureNotSupported) \
                and _STALE_PLAN in str(exc) and not conn.closed:
            # Another node's migration changed a table under a query prepared here: the
            # connection forgets its prepared statements, so the next call works.
            log.info("a table changed under a prepared query; forgetting them")
            with contextlib.suppress(psycopg.Error):
                conn.execute("DEALLOCATE ALL")  # psycopg drops its cache too

    @contextlib.contextmanager
    def _tx(self, durable: bool = False) -> Iterator[None]:
        """A transaction on one pooled connection, in pipeline mode: BEGIN goes out with the
        first statement, and what needs no answer (`_exec_later`: events, locks) with the next
        one or with the COMMIT; an `_exec` waits for its row count. Every commit is durable
        (synchronous_commit stays the server's, `on` by default)."""
        with self._pipelined(wait_for_counts=True):
            yield

    @contextlib.contextmanager
    def _batch_tx(self, durable: bool = False) -> Iterator[None]:
        """`_tx` where not even an `_exec` waits: the server is waited for where a result is
        read (`_rows`) and once at the end, so the intake commit is two round trips."""
        with self._pipelined(wait_for_counts=False):
            yield

    @contextlib.contextmanager
    def _pipelined(self, wait_for_counts: bool) -> Iterator[None]:
        """BEGIN, the statements and COMMIT in pipeline mode (psycopg's own `transaction()`
        waits after BEGIN and after COMMIT). Inside another transaction: a savepoint."""
        outer = self._conn
        if outer is not None:
            with outer.transaction():
                yield
            return
        local = self._local
        with self._connection() as conn:
            self._conn = conn
            try:
                try:
                    with conn.pipeline() as pipeline:
                        local.pipeline, local.wait_for_counts = pipeline, wait_for_counts
                        try:
                            conn.execute("BEGIN")
                            yield
                            conn.execute("COMMIT")
                        except BaseException:
                            # Past the aborted pipeline here: leaving one that still holds an
                            # error logs it a second time.
                            with contextlib.suppress(psycopg.Error):
                                pipeline.sync()
                            raise
                except BaseException:
                    if not conn.closed:
                        with contextlib.suppress(psycopg.Error):  # the first error is the one
                            conn.execute("ROLLBACK")
                    raise
            finally:
                self._conn = outer
                local.pipeline = None

    def _exec(self, sql: str, args: Sequence[Any] = ()) -> int:
        with self._connection() as conn:
            cursor = conn.execute(_placeholders(sql), args)
            pipeline = getattr(self._local, "pipeline", None)
            if pipeline is not None and self._local.wait_for_counts:
                pipeline.sync()  # the count is the answer: wait for it (one round trip)
            return cursor.rowcount

    def _rows(self, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]:
        with self._connection() as conn:
            return conn.execute(_placeholders(sql), args).fetchall()  # waits in a pipeline

    def _rows_later(self, sql: str, args: Sequence[Any] = ()
                    ) -> Callable[[], list[dict[str, Any]]]:
        with self._connection() as conn:
            cursor = conn.execute(_placeholders(sql), args)
            if getattr(self._local, "pipeline", None) is None:
                rows = cursor.fetchall()
                return lambda: rows
        return cursor.fetchall  # in a pipeline: fetched (and waited for) when read

    def _exec_later(self, sql: str, args: Sequence[Any] = ()) -> Callable[[], int]:
        with self._connection() as conn:
            cursor = conn.execute(_placeholders(sql), args)
        return lambda: cursor.rowcount  # in pipeline mode: known once the batch is synced

    def transition(self, job_id: str, sources: Iterable[State], target: State | None,
                   event: str, detail: str | None, *, durable: bool = False,
                   also: Iterable[tuple[str, Sequence[Any]]] = (), at: float | None = None,
                   mine: bool = False, fence: int | None = None, **values: Any) -> bool:
        """A transition is one statement (`_moved`), committed by itself or inside the
        caller's transaction: no transaction (or savepoint) of its own is needed."""
        also = list(also)
        one = self._moved(job_id, list(sources), target, event, detail, also, at, mine, fence,
                          values)
        if one is not None:
            return one
        return super().transition(job_id, sources, target, event, detail, durable=durable,
                                  also=also, at=at, mine=mine, fence=fence, **values)

    def _transition(self, job_id: str, sources: list[State], target: State | None, event: str,
                    detail: str | None, *, also: Iterable[tuple[str, Sequence[Any]]] = (),
                    at: float | None = None, mine: bool = False, fence: int | None = None,
                    **values: Any) -> bool:
        also = list(also)
        one = self._moved(job_id, sources, target, event, detail, also, at, mine, fence,
                          values)
        if one is not None:
            return one
        # Statements that belong together: the caller's transaction, else one of their own.
        with contextlib.nullcontext() if self._conn is not None else self._tx():
            return super()._transition(job_id, sources, target, event, detail, also=also,
                                       at=at, mine=mine, fence=fence, **values)

    def _moved(self, job_id: str, sources: list[State], target: State | None, event: str,
               detail: str | None, also: list[tuple[str, Sequence[Any]]], at: float | None,
               mine: bool, fence: int | None, values: dict[str, Any]) -> bool | None:
        """The transition as one statement: the guarded UPDATE in a WITH, the statements that
        belong to it and its event made from its RETURNING, so each happens only if the
        UPDATE did (one statement and round trip, where the UPDATE, each statement and the
        event took one each). None where a statement cannot be guarded (`_only_if_moved`):
        the caller makes it a transaction of statements instead."""
        made = self._moved_statement(job_id, sources, target, event, detail, also, at, mine,
                                     fence, values, row=False)
        return None if made is None else self._exec(*made) == 1

    def _moved_statement(self, job_id: str, sources: list[State], target: State | None,
                         event: str, detail: str | None, also: list[tuple[str, Sequence[Any]]],
                         at: float | None, mine: bool, fence: int | None,
                         values: dict[str, Any], row: bool) -> tuple[str, list[Any]] | None:
        """`_moved`'s statement; `row`: it answers with the job's row as the UPDATE left it
        (the event in a WITH too), so no read follows."""
        guarded = [_only_if_moved(sql) for sql, _ in also]
        if None in guarded:
            return None
        update, args, now = self._transition_update(job_id, sources, target, event, at,
                                                    mine, fence, values)
        parts = [f"WITH moved AS ({update} RETURNING {'*' if row else 'id'})"]
        selects = []
        for n, ((_, extra), sql) in enumerate(zip(also, guarded, strict=True)):
            parts.append(f", also_{n} AS ({sql})")
            args += extra
            if sql is not None and sql.startswith("SELECT "):
                selects.append(n)
        event_row = "INSERT INTO events (job_id, at, kind, detail) SELECT id, ?, ?, ? FROM moved"
        parts.append(f", event AS ({event_row}) SELECT * FROM moved" if row else f" {event_row}")
        args += [now, event, detail]
        # A SELECT in a WITH runs only where the statement reads it (an INSERT, UPDATE or
        # DELETE always runs): the event's row (or the row answered) reads it, so it runs
        # with the event.
        parts.extend(f"{' AND' if i else ' WHERE'} (SELECT COUNT(*) FROM also_{n}) >= 0"
                     for i, n in enumerate(selects))
        return "".join(parts), args

    def _submitting_row(self, job: Job, callback_url: str, recheck_at: float) -> Job | None:
        """The transition and the job's row after it in one statement, where a read followed."""
        (job_id, sources, target, event, detail), kwargs = self._submitting(
            job, callback_url, recheck_at)
        also = kwargs.pop("also")
        fence = kwargs.pop("fence")
        made = self._moved_statement(job_id, sources, target, event, detail, also, None, False,
                                     fence, kwargs, row=True)
        if made is None:
            return super()._submitting_row(job, callback_url, recheck_at)
        rows = self._rows(*made)
        return _job(rows[0]) if rows else None

    def release_and_claim(self, released: Sequence[str], now: float, limit: int,
                          exclude: Sequence[str]) -> tuple[list[Job], float | None]:
        """SqlLeases' transaction, as one call of the function made from its SQL
        (`_CLAIM_BODY`): one statement where there were six, in one round trip."""
        result = self._call(_CLAIM_FUNCTION, self.node_id, list(released), now, max(limit, 0),
                            list(exclude), self.lease_s, _LOCKS["claims"])
        jobs = []
        for row in result["jobs"]:
            for column in FLOAT_JOB_COLUMNS:
                if row[column] is not None:
                    row[column] = float(row[column])
            jobs.append(_job(row))
        nxt = result["next"]
        return jobs, None if nxt is None else float(nxt)

    def _insert_hits(self, rules: Sequence[tuple[str, str, int]],
                     fresh: Sequence[tuple[str, str, float]], count: int, since: float) -> bool:
        return bool(self._call(_HITS_FUNCTION, [r[0] for r in rules], [r[1] for r in rules],
                               [r[2] for r in rules], [f[0] for f in fresh],
                               [f[1] for f in fresh], [f[2] for f in fresh], count, since,
                               _LOCKS["hits"]))

    def _call(self, function: str, *args: Any) -> Any:
        """One of `_FUNCTIONS`, called: its answer (one statement, committed by itself)."""
        sql = f"SELECT {function}({', '.join('?' * len(args))}) AS r"
        try:
            answer = self._one(sql, args)
        except psycopg.errors.UndefinedFunction:
            if self._conn is not None:
                raise  # inside a transaction, which is aborted now
            self._make_functions()  # a database made or reset after this node started
            answer = self._one(sql, args)
        assert answer is not None
        return answer["r"]

    def claim_due(self, now: float, limit: int, exclude: Iterable[str] = ()) -> list[Job]:
        return self.release_and_claim([], now, limit, list(exclude))[0] if limit > 0 else []

    def _make_functions(self) -> None:
        """The functions this version calls, made where missing (under the migration lock:
        nodes starting together make each once)."""
        with self._tx():
            self._lock_migrations()
            have = {r["proname"] for r in self._rows(
                "SELECT proname FROM pg_proc WHERE proname = ANY(?)", (list(_FUNCTIONS),))}
            for name, (params, returns, body) in _FUNCTIONS.items():
                if name not in have:
                    self._exec(f"CREATE FUNCTION {name}({params}) RETURNS {returns}"
                               f" LANGUAGE plpgsql AS $faxgw${body}$faxgw$")

    def _take_send_slot(self, now: float, interval_s: float) -> float:
        """One statement where the lock, the read and the write were three: the slot's row is
        locked by the read (FOR UPDATE: another node's slot waits for this commit, then reads
        what it wrote), and the upsert moves it on from there (made on first use)."""
        row = self._one(
            # `old` is read before the row is written (the new row's value reads it; a read
            # after would not see a row this statement wrote) and is read once.
            "WITH old AS (SELECT until FROM leases WHERE name = 'send-slot' FOR UPDATE)"
            " INSERT INTO leases (name, owner, until) SELECT 'send-slot', ?,"
            " GREATEST(?, (SELECT until FROM old)) + ?"
            " ON CONFLICT (name) DO UPDATE SET owner = excluded.owner,"
            " until = GREATEST(leases.until, ?) + ?"
            " RETURNING (SELECT until FROM old) AS before, until",
            (self.node_id, now, interval_s, now, interval_s))
        assert row is not None  # an upsert returns its row
        if row["before"] is not None:
            return max(now, float(row["before"]))
        if row["until"] == now + interval_s:  # made now: the first slot
            return now
        # Made by another node since this one looked (the first slots of a new database,
        # taken at once): moved on from what that node wrote.
        return float(row["until"]) - interval_s

    def _is_db_error(self, exc: BaseException) -> bool:
        return isinstance(exc, psycopg.Error)  # PoolTimeout is an OperationalError

    def _claim_lock(self, what: str = "claims") -> None:
        # Not waited for: the server takes the lock before it runs the next statement.
        self._exec_later("SELECT pg_advisory_xact_lock(?)", (_LOCKS[what],))

    def _write_together(self, writes: Sequence[tuple[str, Sequence[Any]]]) -> None:
        """One statement: each write but the last in a WITH (PostgreSQL runs an INSERT,
        UPDATE or DELETE there whether or not it is read), the last as the statement (a
        NOTIFY's SELECT, say). A mail's message, jobs, events and wake-up were four."""
        head = writes[:-1]
        if any(not _WRITE.match(sql) for sql, _ in head):
            super()._write_together(writes)
            return
        sql, args = writes[-1]
        ctes = ", ".join(f"w{n} AS ({text})" for n, (text, _) in enumerate(head))
        self._exec_later(f"WITH {ctes} {sql}" if head else sql,
                         [v for _, values in writes for v in values])

    def _guarded_tx(self) -> AbstractContextManager[None]:
        return contextlib.nullcontext()

    def _locking(self, what: str) -> list[tuple[str, Sequence[Any]]]:
        return [("SELECT pg_advisory_xact_lock(?)", (_LOCKS[what],))]

    def _claim_purge_jobs(self, message_id: str, job: Job) -> list[Job] | None:
        """The claim and the read of the message's jobs in one statement (this transaction's
        transition is seen: it came before)."""
        sql, args = self._purge_claim(message_id, job)
        rows = self._rows(f"WITH claimed AS ({sql} RETURNING id) SELECT * FROM jobs"
                          " WHERE message_id IN (SELECT id FROM claimed) ORDER BY id", args)
        return [_job(r) for r in rows] or None

    def _relaxed_commit(self) -> None:
        self._exec_later("SET LOCAL synchronous_commit = off")

    def _announcing(self, where: str = "",
                    args: Sequence[Any] = ()) -> list[tuple[str, Sequence[Any]]]:
        # Delivered at COMMIT to every node's listener (pg_wakeups.py), with who sent it.
        return [("SELECT pg_notify(?, ?)" + (f" WHERE {where}" if where else ""),
                 (CHANNEL, self.node_id, *args))]

    def notify(self, channel: str, payload: str) -> None:
        """A notification in a transaction of its own (the wake-up listener's probe)."""
        self._exec("SELECT pg_notify(?, ?)", (channel, payload))

    def wakeups(self, wake: Callable[[], None]) -> Wakeups:
        return PgWakeups(self, wake, url=self.listen_url or self.url, notify=self.notify,
                         own_url=self.listen_url is not None)

    def tune_for_bulk_load(self) -> None:
        """Benchmark seeding only: commits without waiting for the WAL flush."""
        self._exec("SET synchronous_commit = off")

    def checkpoint(self) -> None:
        """Nothing to fold: PostgreSQL checkpoints by itself."""
