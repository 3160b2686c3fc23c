"""The document worker pool: a task over its time or memory limit is stopped, the pool lives on."""

from __future__ import annotations

import time

import pytest

from gateway.documents.pool import CpuPool, TaskLimitError


@pytest.fixture
async def pool():
    cpu = CpuPool(1, timeout_s=1.0, memory_bytes=512 * 1024 * 1024)
    await cpu.start()
    yield cpu
    await cpu.stop()


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
