"""CPU-bound document work (parsing, conversion, rendering) in child processes, with a time and
a memory limit per task, so a hostile attachment can neither stall the event loop nor take the
daemon down with it.

Each worker is a process of its own (`pool_child.py`) on one end of a socket pair; the daemon's
end is an asyncio transport on the event loop. A task goes down as one length-prefixed pickle
and its result comes back the same way, so handing work over costs a write and a read on the
loop: no manager or feeder threads, no locks, no wake-ups across threads (concurrent.futures'
ProcessPoolExecutor spent ~8% of the daemon's GIL time on those in an intake burst). A task
over its time limit, or a worker that dies, costs that one worker, which is killed and started
again; the others go on.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import pickle
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from gateway.documents.pool_child import _HEAD, _frame, call

__all__ = ["CpuPool", "LARGE_AT_ONCE", "LARGE_INPUT_BYTES", "NoTurnError", "TaskLimitError",
           "call"]

log = logging.getLogger(__name__)

T = TypeVar("T")


class TaskLimitError(Exception):
    """A task ran out of time or memory; its worker process was replaced."""


# Work on inputs this large (a mail, a PDF) takes a "large" turn: one at a time. A worker
# needs about twice a message while it converts it (a 20 MB scan's 27 MB mail: ~52 MB on top
# of the worker) and about three times a page's image to draw its thumbnail (PDFium),
# so eight scans at once would make every worker that size together; one at a time bounds
# the workers' growth to one large document, and keeps the other workers for ordinary mail,
# which then never queues behind a batch of scans.
LARGE_INPUT_BYTES = 4 * 1024 * 1024
LARGE_AT_ONCE = 1


class NoTurnError(Exception):
    """A large input's turn did not come in time (the caller answers "try later")."""


class _RemoteTraceback(Exception):
    """The worker's traceback, as the cause of the exception a task raised there."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return self.text


_CHILD_CODE = ("import os, sys; "
               "sys.path[:0] = os.environ.pop('FAXGW_WORKER_PATH').split(os.pathsep); "
               "from gateway.documents.pool_child import _child_main; _child_main()")


class _Process:
    """A worker process: the interpreter started afresh on `_child_main`, with the daemon's
    import path and its end of the socket pair.

    Not multiprocessing's spawn: that starts a resource-tracker process beside the workers
    (13 MB for nothing here: the pool shares no semaphores or memory) and has each worker
    import the daemon's own `__main__` first."""

    def __init__(self, sock: socket.socket, max_bytes: int) -> None:
        # The daemon's import path (a bench snapshot, a checkout run in place), handed over
        # in a variable of our own that the worker removes: PYTHONPATH would reach whatever
        # the worker starts in turn (LibreOffice).
        env = dict(os.environ, FAXGW_WORKER_PATH=os.pathsep.join(p for p in sys.path if p))
        self._popen = subprocess.Popen(
            [sys.executable, "-c", _CHILD_CODE, str(sock.fileno()), str(max_bytes),
             str(os.getpid())],
            pass_fds=(sock.fileno(),), stdin=subprocess.DEVNULL, env=env)
        self.pid = self._popen.pid

    def is_alive(self) -> bool:
        return self._popen.poll() is None

    def exit_status(self) -> int | None:
        """The exit code, or minus the signal that ended it; None while it runs (it may
        still be on its way out when its socket closes)."""
        return self._popen.poll()

    def kill(self) -> None:
        """SIGKILL, unless it has ended (and been reaped) already."""
        if self.is_alive():
            self._popen.kill()

    def join(self, timeout_s: float | None = None) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._popen.wait(timeout_s)


class _Job:
    __slots__ = ("payload", "future")

    def __init__(self, payload: bytes, future: asyncio.Future[Any]) -> None:
        self.payload = payload
        self.future = future


class _Worker(asyncio.Protocol):
    """The daemon's end of one worker: its process, its transport, the task it runs."""

    def __init__(self, pool: CpuPool, slot: int, process: _Process) -> None:
        self.pool = pool
        self.slot = slot
        self.process = process
        self.transport: asyncio.Transport | None = None
        self.job: _Job | None = None
        self.timer: asyncio.TimerHandle | None = None
        self._buf = bytearray()
        self._need = 0  # the length of the frame being read, 0 before its header
        self.gone = False
        self.served = 0  # tasks answered: 0 when it dies means it never got going

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def start(self, job: _Job) -> None:
        assert self.transport is not None and self.job is None
        self.job = job
        self.timer = asyncio.get_running_loop().call_later(
            self.pool.timeout_s, self.pool._timed_out, self)
        payload = job.payload
        job.payload = b""  # the worker has it now; a large argument is not kept twice
        self.transport.writelines(_frame(payload))

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        while True:
            if not self._need:
                if len(buf) < _HEAD.size:
                    return
                (self._need,) = _HEAD.unpack_from(buf)
                del buf[:_HEAD.size]
            if len(buf) < self._need:
                return
            try:
                with memoryview(buf) as view:
                    reply = pickle.loads(view[:self._need])
            except Exception as exc:  # e.g. an exception class that cannot be rebuilt here
                reply = (False, RuntimeError(f"document task's reply could not be read: "
                                             f"{type(exc).__name__}: {exc}"), "")
            del buf[:self._need]
            self._need = 0
            self.pool._done(self, reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.pool._lost(self)


class CpuPool:
    def __init__(self, workers: int, timeout_s: float, memory_bytes: int) -> None:
        self.workers = workers
        self.timeout_s = timeout_s
        self.memory_bytes = memory_bytes
        self._slots: list[_Worker | None] = []
        self._idle: list[_Worker] = []
        self._queue: collections.deque[_Job] = collections.deque()
        self._starting: set[asyncio.Task[None]] = set()
        self._running = False
        self._early_deaths = 0  # workers in a row that ended without answering a task
        self._large = asyncio.Semaphore(LARGE_AT_ONCE)
        # Background work (report mails) may occupy all workers but one: tasks run in the
        # order they come, so a queue of reports would otherwise hold up every mail's 250.
        self._background = asyncio.Semaphore(max(1, workers - 1))

    @contextlib.asynccontextmanager
    async def background(self) -> AsyncIterator[None]:
        """Hold this around `run` for work nobody is waiting on (a report mail): it leaves
        a worker free for intake, whose sender waits for the 250."""
        async with self._background:
            yield

    @contextlib.asynccontextmanager
    async def turn(self, input_bytes: int, wait_s: float | None = None) -> AsyncIterator[None]:
        """Hold this around `run` for work on an input of `input_bytes`: immediate for
        ordinary input, one at a time from LARGE_INPUT_BYTES. NoTurnError when a large turn
        does not come within `wait_s` (None: wait as long as it takes)."""
        if input_bytes < LARGE_INPUT_BYTES:
            yield
            return
        try:
            await asyncio.wait_for(self._large.acquire(), wait_s)
        except TimeoutError:
            raise NoTurnError(f"no turn for a large input within {wait_s:.0f} s") from None
        try:
            yield
        finally:
            self._large.release()

    @property
    def pids(self) -> list[int]:
        """The worker processes' pids (for tests and the operator's `ps`)."""
        return [w.process.pid for w in self._slots if w is not None and not w.gone]

    async def ready(self) -> None:
        """Return when every worker being started again (after a kill) is up."""
        while self._starting:
            await asyncio.gather(*self._starting, return_exceptions=True)

    async def start(self) -> None:
        self._running = True
        self._slots = [None] * self.workers
        # Every worker now, not during the first burst of mail (a start costs a process's
        # worth of CPU), and each one's first task proves it answers.
        await asyncio.gather(*(self._spawn(slot) for slot in range(self.workers)))
        await asyncio.gather(*(self.run(len, b"warm-up") for _ in range(self.workers)))

    async def stop(self) -> None:
        if not self._running:
            return
        self._running = False
        for task in list(self._starting):
            task.cancel()
        while self._queue:
            self._queue.popleft().future.cancel()
        workers = [w for w in self._slots if w is not None]
        self._slots, self._idle = [], []
        for w in workers:
            w.gone = True
            if w.timer is not None:
                w.timer.cancel()
            if w.job is not None and not w.job.future.done():
                w.job.future.cancel()
            if w.transport is not None:
                w.transport.close()  # an idle worker reads the end of its socket and exits
        await asyncio.to_thread(_reap, [w.process for w in workers], 2.0)

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if not self._running:
            raise RuntimeError("CPU pool not started")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        job = _Job(pickle.dumps((fn, args, kwargs), pickle.HIGHEST_PROTOCOL), future)
        if self._idle:
            self._idle.pop().start(job)
        else:
            self._queue.append(job)
        ok, value, remote_tb = await future
        if ok:
            return value
        if isinstance(value, MemoryError):
            raise TaskLimitError("needed more memory than allowed") from None
        if remote_tb:
            value.__cause__ = _RemoteTraceback(remote_tb)
        raise value

    # -- the workers' side, called by _Worker and the timers --------------------------------

    def _next(self, worker: _Worker) -> None:
        while self._queue:
            job = self._queue.popleft()
            if not job.future.done():  # its caller gave up while it waited
                worker.start(job)
                return
        self._idle.append(worker)

    def _finish(self, worker: _Worker) -> _Job | None:
        job, worker.job = worker.job, None
        if worker.timer is not None:
            worker.timer.cancel()
            worker.timer = None
        return job

    def _done(self, worker: _Worker, reply: tuple[bool, Any, str]) -> None:
        worker.served += 1
        self._early_deaths = 0
        job = self._finish(worker)
        if job is not None and not job.future.done():
            job.future.set_result(reply)
        if not reply[0] and isinstance(reply[1], MemoryError):
            # The worker lives, but its heap may be left fragmented at the limit: a new one.
            log.warning("document task needed more memory than allowed; restarting its worker")
            self._replace(worker)
        elif not worker.gone:
            self._next(worker)

    def _timed_out(self, worker: _Worker) -> None:
        worker.timer = None
        job = self._finish(worker)
        log.warning("document task exceeded %.0f s; restarting its worker process",
                    self.timeout_s)
        if job is not None and not job.future.done():
            job.future.set_exception(
                TaskLimitError(f"took longer than {self.timeout_s:.0f} seconds"))
        self._replace(worker)

    def _lost(self, worker: _Worker) -> None:
        if worker.gone:
            return
        job = self._finish(worker)
        if worker.served == 0:
            # Not a task's doing: the interpreter could not start the worker (its traceback,
            # if any, is on stderr just before this line).
            log.error("document worker %s ended without answering a task (exit status %s); "
                      "starting another", worker.process.pid, worker.process.exit_status())
        else:
            log.warning("document worker %s ended%s; starting another", worker.process.pid,
                        " during a task (out of memory?)" if job is not None else "")
        if job is not None and not job.future.done():
            job.future.set_exception(TaskLimitError("needed more memory than allowed"))
        self._replace(worker)

    def _replace(self, worker: _Worker) -> None:
        """Kill `worker` (a runaway task can only be stopped so) and start another in its
        place; tasks waiting meanwhile go to the others, or to the new one."""
        if worker.gone:
            return
        worker.gone = True
        with contextlib.suppress(ValueError):
            self._idle.remove(worker)
        worker.process.kill()
        if worker.transport is not None:
            worker.transport.close()
        if self._running and self._slots[worker.slot] is worker:
            task = asyncio.get_running_loop().create_task(self._restart(worker))
            self._starting.add(task)
            task.add_done_callback(self._starting.discard)

    async def _restart(self, old: _Worker) -> None:
        await asyncio.to_thread(_reap, [old.process], 5.0)
        if old.served == 0:
            # Workers that end without answering a task (a broken install, no memory at all)
            # are started again more and more slowly, not at the rate processes can start.
            self._early_deaths += 1
            await asyncio.sleep(min(0.25 * 2 ** self._early_deaths, 30.0))
        delay = 0.5
        while self._running:
            try:
                await self._spawn(old.slot)
                return
            except OSError as exc:  # no fork for now (EAGAIN, ENOMEM): try again
                log.error("cannot start a document worker (%s); trying again in %.0f s",
                          exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

    async def _spawn(self, slot: int) -> None:
        ours, theirs = socket.socketpair()
        try:
            # A new interpreter: no copy of the daemon's threads, sockets or loop; and the
            # daemon's own child, so PR_SET_PDEATHSIG ends it with the daemon.
            process = _Process(theirs, self.memory_bytes)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        loop = asyncio.get_running_loop()
        try:
            _, worker = await loop.create_unix_connection(
                lambda: _Worker(self, slot, process), sock=ours)
        except BaseException:
            process.kill()
            ours.close()
            raise
        if not self._running:
            worker.gone = True
            assert worker.transport is not None
            worker.transport.close()
            return
        self._slots[slot] = worker
        self._next(worker)


def _reap(processes: list[_Process], grace_s: float) -> None:
    """Wait up to `grace_s` for the processes to end, then kill what is left; in a thread."""
    for process in processes:
        process.join(grace_s)
        process.kill()  # if it is still running
        process.join()
