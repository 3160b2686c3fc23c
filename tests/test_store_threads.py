"""The store's threads (gateway/store/base.py `_StoreThreads`): every call's result or error
reaches its caller, in any number at once, and a caller that gave up is not answered."""

from __future__ import annotations

import asyncio
import threading

import pytest

from gateway.store.base import _StoreThreads


async def _run(threads: _StoreThreads, fn, *args):
    future = asyncio.get_running_loop().create_future()
    threads.put((lambda: fn(*args), future))
    return await future


@pytest.mark.parametrize("count", [1, 4])
async def test_many_calls_at_once_each_get_their_own_result(count: int) -> None:
    threads = _StoreThreads(count, asyncio.get_running_loop())
    try:
        results = await asyncio.gather(*(_run(threads, pow, n, 2) for n in range(2000)))
        assert results == [n * n for n in range(2000)]
        names = await asyncio.gather(*(_run(threads, lambda: threading.current_thread().name)
                                       for _ in range(50)))
        assert set(names) <= {f"faxgw-store_{n}" for n in range(count)}
    finally:
        await asyncio.to_thread(threads.shutdown)


async def test_errors_reach_the_caller_and_the_thread_goes_on() -> None:
    threads = _StoreThreads(1, asyncio.get_running_loop())
    try:
        with pytest.raises(ZeroDivisionError):
            await _run(threads, lambda: 1 / 0)
        with pytest.raises(RuntimeError, match="StopIteration"):
            await _run(threads, next, iter(()))
        assert await _run(threads, len, "abc") == 3
    finally:
        await asyncio.to_thread(threads.shutdown)


async def test_a_call_whose_caller_gave_up_before_it_started_is_not_run() -> None:
    threads = _StoreThreads(1, asyncio.get_running_loop())
    ran: list[str] = []
    gate = threading.Event()
    try:
        blocker = asyncio.ensure_future(_run(threads, gate.wait, 10))
        loop = asyncio.get_running_loop()
        abandoned = loop.create_future()
        threads.put((lambda: ran.append("abandoned"), abandoned))
        abandoned.cancel()
        gate.set()
        assert await blocker is True
        assert await _run(threads, lambda: ran.append("next") or "done") == "done"
        assert ran == ["next"]
    finally:
        await asyncio.to_thread(threads.shutdown)


def test_a_caller_on_another_loop_is_answered_on_its_own_loop() -> None:
    """The CLI and tests call a store from loops other than the one it started on."""
    async def start() -> _StoreThreads:
        return _StoreThreads(1, asyncio.get_running_loop())

    threads = asyncio.run(start())  # that loop is closed now
    try:
        assert asyncio.run(_run(threads, sum, [1, 2, 3])) == 6
    finally:
        threads.shutdown()


async def test_a_call_put_first_runs_before_the_calls_already_waiting() -> None:
    """`Store.run_first` (a mail's intake commit) overtakes the worker's queued calls; every
    call still runs, each lane in its own order."""
    threads = _StoreThreads(1, asyncio.get_running_loop())
    order: list[str] = []
    gate = threading.Event()
    loop = asyncio.get_running_loop()
    try:
        blocker = asyncio.ensure_future(_run(threads, gate.wait, 10))
        futures = []
        for name, first in (("later-1", False), ("later-2", False), ("first-1", True),
                            ("later-3", False), ("first-2", True)):
            future = loop.create_future()
            threads.put((lambda name=name: order.append(name), future), first=first)
            futures.append(future)
        gate.set()
        await blocker
        await asyncio.gather(*futures)
        assert order == ["first-1", "first-2", "later-1", "later-2", "later-3"]
    finally:
        await asyncio.to_thread(threads.shutdown)
