"""The job store as a whole: the interface of each concern (gateway/store/interfaces.py: jobs,
leases and limits, listings, nodes) together, with its lifecycle and the thread every call runs
on. Callers that use one concern are typed against that one; the worker and intake use `Store`.

Shaped like postfix-mta-sts-resolver's cache backends: this base class, and each backend a
sibling module (`sqlite.py`, `postgres.py`). The SQL every backend shares lives once in `sql.py`
(`SqlStore`, split by concern into the `sql_*.py` modules); a backend overrides only what differs
(connection, placeholders, transactions and durability, the claim of due work).

Every call is synchronous and runs on one dedicated thread that owns the connection (`run`): the
event loop never waits on a disk or a network round trip, and calls are serialised without locks.
The CLI uses the same objects synchronously (`open()` ... `close()`).

Every change of a job goes through one guarded transition checked against
`gateway.jobs.outbound_states.TRANSITIONS`, and every change leaves an event. A worker step's change
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
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from gateway import defaults
from gateway.jobs.outbound_states import IllegalTransition
from gateway.store.interfaces import Jobs, Leases, Listings, Nodes, Wakeups
from gateway.store.rows import Message, NewJob

T = TypeVar("T")

__all__ = ["IllegalTransition", "Store", "StoreError", "DB_FILENAME"]

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


def _name_os_thread(name: str) -> None:
    """Give the thread its name in the kernel too (Python sets only its own), so `top -H`,
    /proc and the bench tell the store's CPU from the event loop's. Linux only; best effort."""
    global _PRCTL
    if _PRCTL is None:
        try:
            import ctypes

            _PRCTL = ctypes.CDLL(None, use_errno=True).prctl
        except (OSError, AttributeError):
            _PRCTL = False
    if _PRCTL:
        _PRCTL(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME


_PRCTL: Any = None


Call = tuple[Callable[[], Any], "asyncio.Future[Any]"]


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
        # A call waits in one of two lanes; `calls` gets one token per call (or None: stop),
        # and the thread that takes a token runs the oldest call of the first lane that has
        # one. The first lane is for calls a mail's sender is waiting on (its 250).
        self.calls: queue.SimpleQueue[bool | None] = queue.SimpleQueue()
        self._first: collections.deque[Call] = collections.deque()
        self._later: collections.deque[Call] = collections.deque()
        self._results: collections.deque[tuple[asyncio.Future[Any], bool, Any]] = (
            collections.deque())
        self._wake_pending = False
        self._threads = [threading.Thread(target=self._serve, name=f"faxgw-{name}_{n}",
                                          daemon=True) for n in range(count)]
        for thread in self._threads:
            thread.start()

    def _serve(self) -> None:
        _name_os_thread(threading.current_thread().name)
        try:
            self._serve_calls()
        finally:
            if self._teardown is not None:
                try:
                    self._teardown()
                except Exception:  # noqa: BLE001 (closing a read connection at the end)
                    pass

    def put(self, call: Call, first: bool = False) -> None:
        (self._first if first else self._later).append(call)  # a deque's append: thread-safe
        self.calls.put(True)

    def _serve_calls(self) -> None:
        ready = self._setup is None
        while self.calls.get() is not None:
            try:
                call = self._first.popleft()
            except IndexError:
                call = self._later.popleft()  # a token per call: one is here
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


class Store(Jobs, Leases, Listings, Nodes):
    """The whole job store: every concern's interface (gateway/store/interfaces.py), the
    lifecycle, and the thread plumbing every call runs through. Subclasses implement the
    abstract methods (`SqlStore`, for both backends)."""

    # Threads the store's calls run on. SQLite: one (one writer, and the daemon's own order
    # of writes). A server database takes calls on several connections at once, as it takes
    # several nodes' (its transactions and locks are what keep them apart).
    THREADS = 1

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._executor: _StoreThreads | None = None
        self._reader: _StoreThreads | None = None
        # Mails waiting for their intake commit (`add_message_soon`), and whether a store
        # call that commits them is queued.
        self._intake: collections.deque[tuple[Message, list[NewJob], bool, float | None,
                                              asyncio.Future[list[str] | None]]] = (
            collections.deque())
        self._intake_queued = False
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
        self._executor = _StoreThreads(self.THREADS, asyncio.get_running_loop(),
                                       setup=self.open_thread, teardown=self.close_thread)
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
        self._executor.put((functools.partial(fn, *args) if args else fn, future))
        return await future

    async def run_first(self, fn: Callable[..., T], *args: Any) -> T:
        """`run`, ahead of every call queued by `run`: for the calls a mail's sender waits
        on (the intake commit and the checks before it), so a burst of mail does not queue
        its 250s behind the worker's steps. Those wait a little longer; nothing is skipped."""
        assert self._executor is not None, "store not started"
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._executor.put((functools.partial(fn, *args) if args else fn, future), first=True)
        return await future

    async def add_message_soon(self, message: Message, jobs: list[NewJob], *,
                               stored: bool = False,
                               dedup_since: float | None = None) -> list[str] | None:
        """`add_message` in the first lane (`run_first`), committed in one transaction with
        every other mail's that is waiting when a store thread takes it up: a burst's mails
        ending DATA together share one commit (one WAL flush, one BEGIN and COMMIT) instead
        of queueing one commit each. A mail alone is a batch of one."""
        assert self._executor is not None, "store not started"
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[str] | None] = loop.create_future()
        self._intake.append((message, jobs, stored, dedup_since, future))
        if not self._intake_queued:
            self._intake_queued = True
            done: asyncio.Future[None] = loop.create_future()
            self._executor.put((self._commit_intake, done), first=True)
        return await future

    def _commit_intake(self) -> None:
        """On a store thread: every mail waiting now, in one `add_messages`."""
        self._intake_queued = False  # before taking: a mail added after this queues a call
        batch = []
        while self._intake:
            batch.append(self._intake.popleft())
        if not batch:
            return
        try:
            results: list[Any] = self.add_messages([m[:4] for m in batch])
        except BaseException as exc:  # noqa: BLE001 (each mail's caller gets it)
            results = [exc] * len(batch)
        for mail, result in zip(batch, results, strict=True):
            future = mail[4]
            error = isinstance(result, BaseException)
            try:
                future.get_loop().call_soon_threadsafe(_settle, future, not error, result)
            except RuntimeError:  # that loop is closed: nobody is waiting any more
                pass

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
        self._reader.put((functools.partial(fn, *args) if args else fn, future))
        return await future

    def open_thread(self) -> None:
        """On each of the store's threads, before its first call (a backend may keep a
        connection per thread from then on)."""

    def close_thread(self) -> None:
        """On each of the store's threads, after its last call."""

    def wakeups(self, wake: Callable[[], None]) -> Wakeups | None:
        """What wakes this node when another node makes work due (`Wakeups`), calling
        `wake`; None for a backend without (SQLite: a single node wakes its own worker)."""
        return None

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
