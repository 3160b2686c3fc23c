"""The store interface: what the worker, intake, callbacks, metrics, the CLI and the benchmark
may ask of the job store, in typed rows (gateway/store/rows.py).

Shaped like postfix-mta-sts-resolver's cache backends: this small base class, and each backend a
sibling module (`sqlite.py` today; `postgres.py` next). The SQL every backend shares lives once
in `sql.py` (`SqlStore`); a backend overrides only what differs (connection, placeholders,
transactions and durability, the claim of due work).

Every call is synchronous and runs on one dedicated thread that owns the connection (`run`): the
event loop never waits on a disk or a network round trip, and calls are serialised without locks.
The CLI uses the same objects synchronously (`open()` ... `close()`).

Every change of a job goes through one guarded transition checked against
`gateway.outbound.states.TRANSITIONS`, and every change leaves an event. A worker step's change
is fenced: it carries the lease epoch the job was claimed with (`Job.lease_epoch`, one more at
every claim), and is made only while no other claim came since.
"""

from __future__ import annotations

import abc
import asyncio
import collections
import functools
import os
import queue
import socket
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence, TypeVar

from gateway import defaults
from gateway.outbound.states import CallbackAction, IllegalTransition, Job, State
from gateway.store.rows import Attempt, Event, JobListing, Message, NewJob, UnderWay

if TYPE_CHECKING:
    from gateway.config import Settings

T = TypeVar("T")

__all__ = ["IllegalTransition", "Store", "StoreError", "open_store", "DB_FILENAME"]

DB_FILENAME = "faxgw.sqlite3"


class StoreError(Exception):
    """The store could not take a write: the SMTP side answers 451 so the sender retries."""


def _settle(future: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if future.cancelled():
        return
    if ok:
        future.set_result(value)
    elif isinstance(value, StopIteration):  # a Future cannot carry one
        future.set_exception(RuntimeError(f"store call raised StopIteration: {value!r}"))
    else:
        future.set_exception(value)


class _StoreThreads:
    """The store's threads: calls go in on a queue, results come back to the loop.

    What `run_in_executor` does, for the ~15 store calls of every fax, without a
    concurrent.futures.Future to chain to each asyncio one, and with one wake-up of the loop
    for all the results that are ready together rather than one per result (each costs a
    write to the loop's self-pipe): run_in_executor's plumbing was ~7% of the daemon's loop in
    an intake burst."""

    def __init__(self, count: int, loop: asyncio.AbstractEventLoop, *,
                 setup: Callable[[], None] | None = None,
                 teardown: Callable[[], None] | None = None, name: str = "store") -> None:
        self.loop = loop
        # Run on each thread before its first call and after its last (a reader's own
        # connection); a failed setup fails that call, and the next call tries it again.
        self._setup = setup
        self._teardown = teardown
        self.calls: queue.SimpleQueue[tuple[Callable[[], Any], asyncio.Future[Any]] | None] = (
            queue.SimpleQueue())
        self._results: collections.deque[tuple[asyncio.Future[Any], bool, Any]] = (
            collections.deque())
        self._wake_pending = False
        self._threads = [threading.Thread(target=self._serve, name=f"faxgw-{name}_{n}",
                                          daemon=True) for n in range(count)]
        for thread in self._threads:
            thread.start()

    def _serve(self) -> None:
        try:
            self._serve_calls()
        finally:
            if self._teardown is not None:
                try:
                    self._teardown()
                except Exception:  # noqa: BLE001 (closing a read connection at the end)
                    pass

    def _serve_calls(self) -> None:
        ready = self._setup is None
        while (call := self.calls.get()) is not None:
            fn, future = call
            if future.cancelled():  # its caller gave up before it started (a read only)
                continue
            try:
                if not ready and self._setup is not None:
                    self._setup()  # raises to this caller; the next call tries again
                    ready = True
                result = (future, True, fn())
            except BaseException as exc:  # noqa: BLE001 (the caller gets it, as it would)
                result = (future, False, exc)
            loop = future.get_loop()
            del call, fn, future
            try:
                if loop is not self.loop:  # a caller on another loop (a test, a CLI command)
                    loop.call_soon_threadsafe(_settle, *result)
                    continue
                self._results.append(result)
                # One wake-up for whatever is ready: the flag is cleared before the results
                # are taken, so a result added after that always schedules another round.
                if not self._wake_pending:
                    self._wake_pending = True
                    self.loop.call_soon_threadsafe(self._deliver)
            except RuntimeError:  # that loop is closed: nobody is waiting any more
                pass
            finally:
                del result

    def _deliver(self) -> None:
        self._wake_pending = False
        results = self._results
        while results:
            _settle(*results.popleft())

    def shutdown(self) -> None:
        """Let the calls already queued run, then end the threads (blocking: in a thread)."""
        for _ in self._threads:
            self.calls.put(None)
        for thread in self._threads:
            thread.join()


class Store(abc.ABC):
    """The job store. Subclasses implement the abstract methods; the thread plumbing is here."""

    # Threads the store's calls run on. SQLite: one (one writer, and the daemon's own order
    # of writes). A server database takes calls on several connections at once, as it takes
    # several nodes' (its transactions and locks are what keep them apart).
    THREADS = 1

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._executor: _StoreThreads | None = None
        self._reader: _StoreThreads | None = None
        # Who claims jobs (NODE_ID), and for how long a claim lasts without a heartbeat
        # (LEASE_SECONDS); open_store sets both from the settings.
        self.node_id = f"{socket.gethostname()}-{os.getpid()}"
        self.lease_s = defaults.LEASE_SECONDS
        # Set by a backend the first time a query finds the database damaged (after start:
        # start itself raises DatabaseUnusable); every later failure is that one. The daemon
        # sets `on_damage` (called once, on the store's thread) to refuse mail and stop.
        self.damage: str | None = None
        self.on_damage: Callable[[BaseException], None] | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    @abc.abstractmethod
    def open(self, *, migrate: bool = True) -> None:
        """Connect and bring the schema up to date (migrations); synchronous. The CLI passes
        `migrate=False`: it refuses a database of another schema version instead of
        upgrading it under a running daemon of the previous version."""

    @abc.abstractmethod
    def close(self) -> None: ...

    async def start(self) -> None:
        self._executor = _StoreThreads(self.THREADS, asyncio.get_running_loop())
        await self.run(self.open)

    async def stop(self) -> None:
        if self._reader is not None:
            await asyncio.to_thread(self._reader.shutdown)
            self._reader = None
        if self._executor is not None:
            await self.run(self.close)
            await asyncio.to_thread(self._executor.shutdown)
            self._executor = None

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a synchronous store call on the store's own thread."""
        assert self._executor is not None, "store not started"
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._executor.calls.put((functools.partial(fn, *args) if args else fn, future))
        return await future

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a read-only store call for the dashboard on the reader's own thread and
        connection (`open_reader`), never in the queue that intake's commits and the worker's
        steps wait in: a page of the job list over many jobs, refreshed by every open tab,
        delays no mail's 250. Calls that write use `run`."""
        if self._reader is None:
            assert self._executor is not None, "store not started"
            self._reader = _StoreThreads(1, asyncio.get_running_loop(), setup=self.open_reader,
                                         teardown=self.close_reader, name="store-reader")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._reader.calls.put((functools.partial(fn, *args) if args else fn, future))
        return await future

    def open_reader(self) -> None:
        """On the reader thread, before its first call: a connection of its own for reads.
        A backend whose calls may run on any thread at once needs nothing here."""

    def close_reader(self) -> None:
        """On the reader thread, after its last call."""

    @property
    @abc.abstractmethod
    def where(self) -> str:
        """Where the data lives, for messages (a path, or a database name; no password)."""

    def is_db_error(self, exc: BaseException) -> bool:
        """Whether `exc` is the database driver's own error (the store could not answer)."""
        return False

    @property
    def file_path(self) -> Path | None:
        """The database file, for a backend that keeps one on the local disk (watched while
        the daemon runs: gateway/store/health.py); None for a server database."""
        return None

    def verify(self) -> None:
        """Raise `DatabaseUnusable` when the database is damaged (checked at start, before any
        mail is taken); a backend with nothing cheap to check does nothing."""

    def exists(self) -> bool:
        """Whether there is a database to open (the CLI will not create an empty one)."""
        return True

    @abc.abstractmethod
    def schema_version(self) -> int:
        """The schema version the database is at (see gateway/store/migrations.py)."""

    @abc.abstractmethod
    def check_writable(self) -> None:
        """Take and release the write lock: raises when the database cannot be written."""

    # -- intake ------------------------------------------------------------------------------

    @abc.abstractmethod
    def add_message(self, message: Message, jobs: Iterable[NewJob], *, stored: bool = False,
                    dedup_since: float | None = None) -> list[str] | None:
        """Commit a message and its jobs in one transaction (durable once this returns), and
        return None; `stored`: the document is in the media store already, the jobs start
        there. `dedup_since`: a mail with a Message-ID that was accepted for these same
        numbers with the same document at or after this time (a client that lost our 250
        and sent again, to any node) is not committed again: the earlier copy's job ids come
        back instead, in the order of `jobs`. The check is part of the commit, so two copies
        committing at once on two nodes make one job. None: never merged."""

    # -- reads -------------------------------------------------------------------------------

    @abc.abstractmethod
    def job(self, job_id: str) -> Job | None: ...

    @abc.abstractmethod
    def job_by_token(self, token: str) -> Job | None: ...

    @abc.abstractmethod
    def message(self, message_id: str) -> Message | None: ...

    @abc.abstractmethod
    def events(self, job_id: str) -> list[Event]: ...

    @abc.abstractmethod
    def attempts(self, job_id: str) -> list[Attempt]: ...

    @abc.abstractmethod
    def jobs(self, *, state: State | str | None = None, limit: int = 100) -> list[Job]: ...

    @abc.abstractmethod
    def message_jobs(self, message_id: str, unpurged: bool = False) -> list[Job]:
        """The message's jobs; `unpurged`: none once its documents are purged."""

    @abc.abstractmethod
    def due_jobs(self, now: float, limit: int, exclude: Iterable[str] = ()) -> list[Job]:
        """Active jobs whose next step is due (and may run now), oldest first."""

    @abc.abstractmethod
    def next_due_at(self, exclude: Iterable[str] = ()) -> float | None:
        """When the next step of a job not in `exclude` (running now) falls due."""

    # -- claims (several nodes, one queue) ---------------------------------------------------

    @abc.abstractmethod
    def claim_due(self, now: float, limit: int, exclude: Iterable[str] = ()) -> list[Job]:
        """Like `due_jobs`, but each job returned is leased to this node until
        now + lease_s, in the same transaction: no other node gets it while the lease lives.
        At most one stored job per destination number, and none to a number in flight."""

    @abc.abstractmethod
    def renew_leases(self, job_ids: Iterable[str], now: float) -> set[str]:
        """The heartbeat: extend this node's leases; returns the ids it still holds."""

    @abc.abstractmethod
    def release(self, *job_ids: str) -> None:
        """This node is done with these jobs' steps: any node may claim their next ones."""

    @abc.abstractmethod
    def release_all(self, everyone: bool = False) -> int:
        """At start: drop leases a previous run of this node (or, `everyone`, any) left."""

    @abc.abstractmethod
    def take_lead(self, name: str, now: float, ttl_s: float) -> bool:
        """Hold the named lease (once-only tasks); False while another live node holds it."""

    @abc.abstractmethod
    def take_send_slot(self, now: float, interval_s: float) -> float:
        """The time of the next free send slot, reserved for this node (shared send rate)."""

    @abc.abstractmethod
    def add_hit(self, kind: str, key: str, now: float, forget_before: float) -> int:
        """Count a hit (a mail, a failed login) shared across nodes; hits since then."""

    @abc.abstractmethod
    def count_hits(self, kind: str, key: str, since: float) -> int: ...

    @abc.abstractmethod
    def take_hits(self, rules: Sequence[tuple[str, str, int]], now: float,
                  window_s: float, count: int = 1) -> float:
        """A shared sliding-window rate limit: record `count` hits under every rule or none;
        0.0, or the seconds until they would fit."""

    @abc.abstractmethod
    def hits_wait(self, rules: Sequence[tuple[str, str, int]], count: int, now: float,
                  window_s: float) -> float:
        """`take_hits` without recording: would `count` more fit now?"""

    @abc.abstractmethod
    def hit_counts(self, rules: Sequence[tuple[str, str, int]], now: float,
                   window_s: float) -> dict[tuple[str, str], int]:
        """Each rule's (kind, key) hits in the window now (absent: none)."""

    @abc.abstractmethod
    def give_back_hits(self, keys: Sequence[tuple[str, str]], count: int) -> None:
        """Remove the newest `count` hits of each (kind, key) (a refused message's charge)."""

    @abc.abstractmethod
    def gone_messages(self, ids: Sequence[str]) -> set[str]:
        """Of these message ids, those whose document may go (purged, or no such message)."""

    @abc.abstractmethod
    def prune_hits(self, before: float) -> int:
        """Delete every hit older than `before` (housekeeping)."""

    @abc.abstractmethod
    def last_hit(self, kind: str, key: str) -> float | None: ...

    @abc.abstractmethod
    def clear_hits(self, kind: str, key: str) -> None: ...

    @abc.abstractmethod
    def queue_depth(self) -> int:
        """Jobs not yet reported, all nodes together."""

    @abc.abstractmethod
    def earlier_sids(self, job: Job) -> set[str]:
        """Fax sids of the job's earlier attempts: never to be taken for the current one."""

    @abc.abstractmethod
    def taken_sids(self, job: Job, sids: Iterable[str]) -> set[str]:
        """Of these fax sids, those that belong to another job (or to an earlier attempt of
        this one): a sid is one job's only, never to be adopted by another."""

    @abc.abstractmethod
    def oldest_active_created_at(self) -> float | None: ...

    @abc.abstractmethod
    def counts_by_state(self) -> dict[str, int]: ...

    @abc.abstractmethod
    def job_listing(self, *, states: Iterable[State] | None = None,
                    fax_status: str | None = None, to_digits: str | None = None,
                    sender: str | None = None, since: float | None = None,
                    limit: int = 50, gave_up: bool = False) -> list[JobListing]:
        """Jobs with their message and last event, newest first (`faxgw jobs`)."""

    @abc.abstractmethod
    def job_ids_by_prefix(self, prefix: str, limit: int = 5) -> list[str]: ...

    @abc.abstractmethod
    def job_ids_by_fax_sid(self, sid: str) -> list[str]: ...

    @abc.abstractmethod
    def unpurged_done_messages(self, cutoff: float, limit: int = 100) -> list[Message]: ...

    # -- the one guarded change --------------------------------------------------------------

    @abc.abstractmethod
    def transition(self, job_id: str, sources: Iterable[State], target: State | None,
                   event: str, detail: str | None, **values: Any) -> bool:
        """Move a job from one of `sources` to `target` (None: it stays where it is), setting
        `values` and recording `event`, only if the table allows every (source, target, event)
        (else IllegalTransition, nothing written) and the job is still in one of `sources`
        (else False, nothing written)."""

    # -- worker steps ------------------------------------------------------------------------

    @abc.abstractmethod
    def add_event(self, job_id: str, kind: str, detail: str | None = None) -> None:
        """History only (a refused or ignored callback): no change to the job."""

    @abc.abstractmethod
    def mark_stored(self, job: Job, media_key: str) -> bool: ...

    @abc.abstractmethod
    def mark_submitting(self, job: Job, callback_url: str, recheck_at: float) -> bool:
        """Committed durably before the send POST."""

    @abc.abstractmethod
    def mark_submitted(self, job: Job, sid: str, status: str, poll_at: float,
                       detail: str) -> bool: ...

    @abc.abstractmethod
    def mark_outcome_unknown(self, job: Job, recheck_at: float, detail: str) -> bool: ...

    @abc.abstractmethod
    def back_to_stored(self, job: Job, run_at: float, detail: str) -> bool: ...

    @abc.abstractmethod
    def schedule_retry(self, job: Job, run_at: float, quality: str, detail: str) -> bool: ...

    @abc.abstractmethod
    def retry_later(self, job: Job, run_at: float, detail: str) -> bool: ...

    @abc.abstractmethod
    def mark_given_up(self, job: Job, reason: str, error_code: str | None = None,
                      error_message: str | None = None) -> bool: ...

    @abc.abstractmethod
    def record_status(self, job: Job, sid: str | None, status: str | None, *,
                      pages: int | None, duration_s: int | None, error_code: str | None,
                      error_message: str | None, source: str) -> CallbackAction:
        """Apply a fax status (callback or poll) idempotently; returns what it did."""

    @abc.abstractmethod
    def mark_reporting(self, job: Job, n: int, detail: str) -> bool:
        """Report `n` is about to be mailed; False (nothing mailed) when the job moved on or
        another node claimed it since `job` was claimed (its fencing token, `lease_epoch`)."""

    @abc.abstractmethod
    def mark_reported(self, job: Job, detail: str) -> bool: ...

    @abc.abstractmethod
    def claim_purge(self, message_id: str, job: Job | None = None) -> bool:
        """The message's document is about to be deleted: only if every job of it is
        reported (and `job` is still held); no resend takes the document from then on."""

    @abc.abstractmethod
    def mark_purged(self, message_id: str) -> None: ...

    @abc.abstractmethod
    def prune(self, cutoff: float, limit: int = 1000) -> int: ...

    # -- operator actions --------------------------------------------------------------------

    # Each takes `by`: who asked (a dashboard administrator's name), written into the job's
    # history in the one event the action makes; None means "the operator" (the CLI).

    @abc.abstractmethod
    def add_resend(self, job: Job, new: NewJob, now: float, *, stored: bool = False,
                   by: str | None = None) -> str | UnderWay | None:
        """A new job for the message and number of `job`; None when done, else why not
        (`UnderWay`: another job of the message to the number is not yet reported). The check
        and the insert are one step across nodes: of resends asked at the same moment, one
        is made. `stored`: it sends the media object `new.media_key` already in the media
        store; `by`: who asked (the history names them)."""

    @abc.abstractmethod
    def cancel_unsent(self, job_id: str, reason: str, now: float, *,
                      by: str | None = None) -> bool: ...

    @abc.abstractmethod
    def note_cancel(self, job_id: str, detail: str, now: float, *,
                    by: str | None = None) -> bool: ...

    @abc.abstractmethod
    def report_again(self, job_id: str, state: State, now: float, *,
                     by: str | None = None) -> bool: ...

    @abc.abstractmethod
    def report_now(self, job_id: str, now: float, *, by: str | None = None) -> bool: ...


def open_store(settings: "Settings", clock: Callable[[], float] = time.time) -> Store:
    """The store the settings name, not yet opened (`open()` or `await start()`):
    PostgreSQL when DATABASE_URL is set (several gateways, one queue), else SQLite at
    DATA_DIR/faxgw.sqlite3."""
    store: Store
    if settings.cluster.database_url:
        from gateway.store.postgres import PostgresStore

        store = PostgresStore(settings.cluster.database_url, clock,
                              prepared_statements=settings.cluster.prepared_statements)
    else:
        from gateway.store.sqlite import SqliteStore

        store = SqliteStore(settings.queue.data_dir / DB_FILENAME, clock)
    store.node_id = settings.cluster.node_id
    store.lease_s = settings.cluster.lease_seconds
    return store
