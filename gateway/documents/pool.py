"""CPU-bound document work (parsing, conversion, rendering) in child processes, with a time and
a memory limit per task, so a hostile attachment can neither stall the event loop nor take the
daemon down with it."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import multiprocessing
import os
import resource
import signal
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, AsyncIterator, Callable, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class TaskLimitError(Exception):
    """A task ran out of time or memory; the pool was replaced."""


def _init_child(max_bytes: int, parent_pid: int, pids: Any) -> None:
    """In each worker: the memory limit, and death with the parent (a kill -9 of the daemon
    must not leave workers behind holding its sockets and pipes). It tells the pool its pid
    (`pids`, a SimpleQueue), so a runaway task can be killed without the executor's
    internals."""
    pids.put(os.getpid())
    try:
        # Conversions are batch work; the daemon's loop answers SMTP and webhooks and must
        # not wait for a CPU behind them (on 2 cores, two busy workers stalled it 150+ ms).
        os.nice(WORKER_NICE)
    except OSError:
        pass
    if max_bytes > 0:
        resource.setrlimit(resource.RLIMIT_AS, (max_bytes, max_bytes))
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:
        os._exit(0)  # the daemon died while this worker was still starting up


def call(target: str, *args: Any, **kwargs: Any) -> Any:
    """Run `module:function` in the worker: the daemon never imports the module itself (the
    PDF and image libraries stay out of its memory)."""
    import importlib

    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)(*args, **kwargs)


def _task(fn: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any]) -> T:
    """Every task in a worker: the function, then, after a large one, its memory handed back."""
    before = _resident_bytes()
    try:
        return fn(*args, **kwargs)
    finally:
        if _resident_bytes() - before > RELEASE_AFTER_BYTES:
            _release_memory()


def _resident_bytes() -> int:
    try:
        with open("/proc/self/statm", "rb") as fh:
            return int(fh.read().split()[1]) * _PAGE_BYTES
    except (OSError, ValueError, IndexError):
        return 0


_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
# A task that grew the worker by more than this (a large scan, never ordinary mail) is
# followed by a collection and a trim: they cost 5-80 ms, too much after every small task.
RELEASE_AFTER_BYTES = 16 * 1024 * 1024


def _release_memory() -> None:
    """Give the memory a task used back to the system, now rather than some day.

    The parsed mail and pypdf's objects hold reference cycles, so a 20 MB scan's buffers
    outlive the task until the cyclic collector happens to run (each task left ~20 MB more
    behind); and glibc keeps freed heap by default."""
    gc.collect()
    global _TRIM
    if _TRIM is None:
        try:
            import ctypes

            _TRIM = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):  # not glibc
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM: Any = None


# Work on inputs this large (a mail, a PDF) takes a "large" turn: one at a time. A worker
# needs about 3x a message while it converts it (a 20 MB scan: ~70 MB on top of the worker),
# so eight scans at once would make every worker that size together; one at a time bounds
# the workers' growth to one large document, and keeps the other workers for ordinary mail,
# which then never queues behind a batch of scans.
LARGE_INPUT_BYTES = 4 * 1024 * 1024
LARGE_AT_ONCE = 1
# Scheduling priority of the workers relative to the daemon (nice increment).
WORKER_NICE = 5


class NoTurnError(Exception):
    """A large input's turn did not come in time (the caller answers "try later")."""


class CpuPool:
    def __init__(self, workers: int, timeout_s: float, memory_bytes: int) -> None:
        self.workers = workers
        self.timeout_s = timeout_s
        self.memory_bytes = memory_bytes
        self._pool: ProcessPoolExecutor | None = None
        self._pids: Any = None  # the current pool's SimpleQueue of worker pids
        self._large = asyncio.Semaphore(LARGE_AT_ONCE)
        # Background work (report mails) may occupy all workers but one: the executor runs
        # tasks in order, so a queue of reports would otherwise hold up every mail's 250.
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

    def _new_pool(self) -> ProcessPoolExecutor:
        # spawn: children start clean (no copy of the daemon's threads, sockets or loop) and
        # are the daemon's own children, so PR_SET_PDEATHSIG ends them with it.
        ctx = multiprocessing.get_context("spawn")
        self._pids = ctx.SimpleQueue()
        return ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_init_child,
                                   initargs=(self.memory_bytes, os.getpid(), self._pids))

    async def start(self) -> None:
        self._pool = self._new_pool()
        # Start every child now, not during the first burst of mail (a start costs a
        # process's worth of CPU): the executor starts one per task while none is idle.
        await asyncio.gather(*(self.run(len, b"warm-up") for _ in range(self.workers)))

    async def stop(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await asyncio.to_thread(pool.shutdown, True, cancel_futures=True)

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if self._pool is None:
            raise RuntimeError("CPU pool not started")
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._pool, functools.partial(_task, fn, args, kwargs))
        try:
            return await asyncio.wait_for(future, self.timeout_s)
        except asyncio.TimeoutError:
            log.warning("document task exceeded %.0f s; restarting the worker processes",
                        self.timeout_s)
            self._replace()
            raise TaskLimitError(f"took longer than {self.timeout_s:.0f} seconds") from None
        except (BrokenProcessPool, MemoryError):
            log.warning("document task died (out of memory?); restarting the worker processes")
            self._replace()
            raise TaskLimitError("needed more memory than allowed") from None

    def _replace(self) -> None:
        old, old_pids = self._pool, self._pids
        self._pool = self._new_pool()
        if old is not None:
            # Killing is the only way to stop a runaway task in a pool worker. The pids come
            # from the workers themselves; only those still our live children are killed
            # (a pid is never reused while its process is our unreaped child).
            reported = set()
            while not old_pids.empty():
                reported.add(old_pids.get())
            for proc in multiprocessing.active_children():
                if proc.pid in reported:
                    proc.kill()
            old.shutdown(wait=False, cancel_futures=True)
            old_pids.close()
