"""systemd notify protocol against a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gateway.runtime import systemd as sdnotify
from gateway.runtime.systemd import Watchdog


class FakeSystemd:
    """A bound datagram socket; a thread records each message with its arrival time, so a
    blocked event loop in the test cannot distort what was received when."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.05)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode()))

    def texts(self) -> list[str]:
        return [text for _, text in self.messages]

    def wait_for(self, count: int, timeout_s: float = 5.0) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.messages) < count:
            assert time.monotonic() < deadline, f"got {self.texts()}"
            time.sleep(0.01)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


async def until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


@pytest.fixture
def systemd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeSystemd]:
    path = tmp_path / "notify.sock"
    assert len(str(path)) < 100  # sun_path limit
    fake = FakeSystemd(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield fake
    fake.close()


def test_messages_reach_the_socket(systemd: FakeSystemd) -> None:
    assert sdnotify.ready("SMTP 127.0.0.1:2525, HTTP 127.0.0.1:8025")
    assert sdnotify.status("3 jobs\nactive")
    assert sdnotify.watchdog()
    assert sdnotify.extend_timeout(20.5)
    assert sdnotify.stopping()
    systemd.wait_for(5)
    assert systemd.texts() == [
        "READY=1\nSTATUS=SMTP 127.0.0.1:2525, HTTP 127.0.0.1:8025",
        "STATUS=3 jobs active",
        "WATCHDOG=1",
        "EXTEND_TIMEOUT_USEC=20500000",
        "STOPPING=1",
    ]


def test_abstract_namespace_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"faxgw-test-{secrets.token_hex(6)}"
    fake = FakeSystemd("\0" + name)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.ready()
        fake.wait_for(1)
    finally:
        fake.close()
    assert fake.texts() == ["READY=1"]


def test_without_systemd_nothing_is_sent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.ready() is False
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert sdnotify.ready() is False
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    assert sdnotify.watchdog() is False
    assert "systemd notify (WATCHDOG) failed" in caplog.text


def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"WATCHDOG_USEC": "30000000"}
    assert sdnotify.watchdog_interval_s(env) == 30.0
    assert sdnotify.watchdog_interval_s({**env, "WATCHDOG_PID": str(os.getpid())}) == 30.0
    assert sdnotify.watchdog_interval_s({**env, "WATCHDOG_PID": str(os.getpid() + 1)}) is None
    assert sdnotify.watchdog_interval_s({**env, "WATCHDOG_PID": "x"}) is None
    assert sdnotify.watchdog_interval_s({}) is None
    assert sdnotify.watchdog_interval_s({"WATCHDOG_USEC": "0"}) is None
    assert sdnotify.watchdog_interval_s({"WATCHDOG_USEC": "soon"}) is None
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert sdnotify.watchdog_interval_s() == 2.0
    assert Watchdog().interval_s == 2.0
    monkeypatch.delenv("WATCHDOG_USEC")
    assert not Watchdog().enabled


async def test_watchdog_pings_from_the_loop_and_a_stuck_loop_stops_them(
        systemd: FakeSystemd) -> None:
    dog = Watchdog(0.2)  # pings every 0.1 s
    await dog.start()
    try:
        await until(lambda: len(systemd.messages) >= 3)
        before = len(systemd.messages)
        blocked_at = time.monotonic()
        time.sleep(0.5)  # the event loop is stuck: no task runs
        unblocked_at = time.monotonic()
        await until(lambda: any(t > unblocked_at for t, _ in systemd.messages))  # resumed
    finally:
        await dog.stop()
    assert all(text == "WATCHDOG=1" for text in systemd.texts())
    during = [t for t, _ in systemd.messages[before:] if blocked_at + 0.02 < t < unblocked_at]
    assert during == []
    count = len(systemd.messages)
    await asyncio.sleep(0.25)
    assert len(systemd.messages) == count  # stopped


async def test_watchdog_health_check_gates_the_pings() -> None:
    pings: list[float] = []

    def ping() -> bool:
        pings.append(time.monotonic())
        return True

    state = {"mode": "ok"}

    async def healthy() -> bool:
        if state["mode"] == "hang":
            await asyncio.sleep(10)
        if state["mode"] == "raise":
            raise RuntimeError("store thread gone")
        return state["mode"] == "ok"

    dog = Watchdog(0.2, healthy=healthy, ping=ping)
    await dog.start()
    try:
        await until(lambda: len(pings) >= 2)
        for mode in ("sick", "hang", "raise"):
            state["mode"] = mode
            await asyncio.sleep(0.15)  # let a check already under way finish
            count = len(pings)
            await asyncio.sleep(0.3)
            assert len(pings) == count, mode
        state["mode"] = "ok"
        await until(lambda: len(pings) > count)
    finally:
        await dog.stop()
    assert dog.pings == len(pings)


async def test_disabled_watchdog_starts_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    dog = Watchdog()
    await dog.start()
    assert dog._task is None
    await dog.stop()
