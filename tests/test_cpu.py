"""The document worker pool: a task over its time or memory limit is stopped, the pool lives on."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.documents.pool import CpuPool, TaskLimitError


async def _running(workers: int, timeout_s: float):
    cpu = CpuPool(workers, timeout_s=timeout_s, memory_bytes=512 * 1024 * 1024)
    await cpu.start()
    try:
        yield cpu
    finally:
        await cpu.stop()


@pytest.fixture
async def pool():
    async for cpu in _running(1, 1.0):
        yield cpu


async def test_runaway_task_is_killed_and_the_pool_recovers(pool: CpuPool) -> None:
    with pytest.raises(TaskLimitError, match="longer than 1 seconds"):
        await pool.run(time.sleep, 30)
    assert await pool.run(sum, [1, 2, 3]) == 6


async def test_memory_hog_is_stopped_and_the_pool_recovers(pool: CpuPool) -> None:
    with pytest.raises(TaskLimitError, match="more memory"):
        await pool.run(bytearray, 2 * 1024 * 1024 * 1024)
    assert await pool.run(len, b"abc") == 3


def test_every_task_named_by_dotted_path_resolves() -> None:
    """The pool is handed functions by dotted name (so the daemon never imports the PDF
    libraries); a module move would otherwise break only inside a child process, at the first
    mail. Every such name in the package must resolve here."""
    import importlib
    import re
    from pathlib import Path

    import gateway

    root = Path(gateway.__file__).parent
    names = {m for f in root.rglob("*.py")
             for m in re.findall(r"\"(gateway(?:\.\w+)+:\w+)\"", f.read_text())}
    assert names, "no dotted task names found: has the pool's calling convention changed?"
    for name in names:
        module, _, attr = name.partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), name


@pytest.fixture
async def two():
    async for cpu in _running(2, 2.0):
        yield cpu


async def test_a_runaway_task_costs_only_its_own_worker(two: CpuPool) -> None:
    """The task beside a runaway one finishes: only the runaway's worker is killed."""
    import asyncio

    before = set(two.pids)
    runaway = asyncio.create_task(two.run(time.sleep, 30))
    beside = asyncio.create_task(two.run(_sleep_then, 0.5, "finished"))
    with pytest.raises(TaskLimitError, match="longer than 2 seconds"):
        await runaway
    assert await beside == "finished"
    assert await two.run(sum, [4, 5]) == 9
    await two.ready()
    after = set(two.pids)
    assert len(after) == 2 and len(after & before) == 1  # one replaced, one kept


async def test_a_worker_killed_from_outside_is_replaced(pool: CpuPool) -> None:
    import asyncio
    import os
    import signal

    (pid,) = pool.pids
    task = asyncio.create_task(pool.run(time.sleep, 30))
    await asyncio.sleep(0)  # the task is written to the worker before the kill
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(TaskLimitError):
        await task
    assert await pool.run(len, b"abcd") == 4
    await pool.ready()
    assert len(pool.pids) == 1 and pool.pids != [pid]


async def test_a_tasks_exception_comes_back_with_the_workers_traceback(pool: CpuPool) -> None:
    with pytest.raises(ValueError, match="invalid literal") as info:
        await pool.run(int, "not a number")
    assert "Traceback" in str(info.value.__cause__)
    assert await pool.run(int, "12") == 12


async def test_a_result_that_cannot_be_sent_back_is_a_plain_error(pool: CpuPool) -> None:
    with pytest.raises(RuntimeError, match="result could not be sent back"):
        await pool.run(_unpicklable)
    assert await pool.run(len, b"ab") == 2


async def test_large_arguments_and_results_cross_intact(pool: CpuPool) -> None:
    data = bytes(range(256)) * (24 * 1024 * 1024 // 256)  # 24 MiB, many socket reads
    assert await pool.run(bytes, data) == data


async def test_a_caller_that_gives_up_leaves_the_worker_usable(pool: CpuPool) -> None:
    import asyncio

    with pytest.raises(TimeoutError):
        await asyncio.wait_for(pool.run(_sleep_then, 0.3, "late"), 0.05)
    # The abandoned result is read and dropped; the one worker takes the next task.
    assert await pool.run(_sleep_then, 0, "next") == "next"


def _sleep_then(seconds: float, value: str) -> str:
    time.sleep(seconds)
    return value


def _unpicklable() -> object:
    import threading

    return threading.Lock()


_HOLDER = """
import asyncio, sys
from gateway.documents.pool import CpuPool

async def main():
    pool = CpuPool(2, timeout_s=60, memory_bytes=0)
    await pool.start()
    print(*pool.pids, flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


def test_the_workers_end_with_a_killed_daemon() -> None:
    """kill -9 of the daemon must not leave its workers behind (holding its files)."""
    import os
    import signal
    import subprocess
    import sys

    holder = subprocess.Popen([sys.executable, "-c", _HOLDER], stdout=subprocess.PIPE,
                              text=True)
    try:
        pids = [int(p) for p in holder.stdout.readline().split()]  # type: ignore[union-attr]
        assert len(pids) == 2 and all(_alive(p) for p in pids)
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(10)
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not any(_alive(p) for p in pids)
    finally:
        holder.kill()


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting for a reaper (PID 1 in a container may be slow)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def test_an_idle_worker_is_a_bare_interpreter_with_no_helper_process(two: CpuPool) -> None:
    """The workers start on pool_child.py alone: no asyncio or ssl in them until a task needs
    them (an idle worker was 23 MB with multiprocessing's spawn, which also started a 13 MB
    resource-tracker process beside them), and nothing but the workers is started."""
    import os
    from pathlib import Path

    for pid in two.pids:
        maps = Path(f"/proc/{pid}/maps").read_text()
        assert "_asyncio" not in maps and "_ssl" not in maps, "the worker imported asyncio"
        assert Path(f"/proc/{pid}/status").read_text().count(f"PPid:\t{os.getpid()}\n") == 1
    me = os.getpid()
    children = {int(c) for c in Path(f"/proc/{me}/task/{me}/children").read_text().split()}
    assert set(two.pids) <= children
    for child in children - set(two.pids):
        cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        assert b"multiprocessing" not in cmdline, cmdline
    # And they work: a task in each.
    assert await asyncio.gather(two.run(len, b"ab"), two.run(len, b"abc")) == [2, 3]


async def test_workers_that_cannot_start_are_retried_slowly_and_said_so(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A worker that ends before it answers anything (here: an interpreter that exits at
    once, as a broken install would) fails the pool's start with an error, is logged with its
    exit status, and is started again with a growing delay, not as fast as processes start."""
    import logging

    from gateway.documents import pool as pool_module

    monkeypatch.setattr(pool_module, "_CHILD_CODE", "import sys; sys.exit(3)")
    cpu = CpuPool(1, timeout_s=5.0, memory_bytes=0)
    spawned: list[float] = []
    third = asyncio.Event()  # the first start, then two restarts after it died
    real_spawn = cpu._spawn

    async def counting_spawn(slot: int) -> None:
        spawned.append(asyncio.get_running_loop().time())
        if len(spawned) == 3:
            third.set()
        await real_spawn(slot)

    monkeypatch.setattr(cpu, "_spawn", counting_spawn)
    with caplog.at_level(logging.ERROR, logger="gateway.documents.pool"):
        with pytest.raises(TaskLimitError):
            await cpu.start()
        try:
            await asyncio.wait_for(third.wait(), 30)
        finally:
            await cpu.stop()
    assert "ended without answering a task (exit status 3)" in caplog.text
    gaps = [b - a for a, b in zip(spawned, spawned[1:], strict=False)]
    assert gaps[0] >= 0.5 and gaps[1] >= 1.0, gaps  # 0.5 s, then 1 s, ... up to 30 s
