"""The systemd notify protocol (sd_notify(3)) without dependencies: READY, STOPPING, STATUS and
the watchdog, as datagrams to $NOTIFY_SOCKET.

Outside systemd (no NOTIFY_SOCKET) every call is a no-op returning False, so the daemon calls
them unconditionally. The watchdog pings come from a task on the event loop: if the loop is
stuck (a blocking call, a busy loop), the pings stop and systemd restarts the service.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Mapping

from gateway.sanitise import one_line

log = logging.getLogger(__name__)

SEND_TIMEOUT_S = 1.0        # a datagram to PID 1; only a wedged systemd makes this wait
HEALTH_TIMEOUT_FRACTION = 0.25  # of the watchdog interval, for the optional health check


def _address(environ: Mapping[str, str]) -> str | None:
    path = environ.get("NOTIFY_SOCKET", "")
    if path.startswith("@"):
        return "\0" + path[1:]  # abstract namespace
    if path.startswith("/"):
        return path
    return None  # unset, or a kind we do not speak (vsock:)


def notify(state: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send `state` ("READY=1", "STATUS=...", newline-separated assignments); True if sent."""
    address = _address(os.environ if environ is None else environ)
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(SEND_TIMEOUT_S)
            sock.connect(address)
            sock.sendall(state.encode("utf-8"))
    except OSError as exc:
        log.warning("systemd notify (%s) failed: %s", state.split("=", 1)[0], exc)
        return False
    return True


def ready(status: str | None = None) -> bool:
    """The listeners are bound and the worker runs (Type=notify waits for this)."""
    return notify("READY=1" + (f"\nSTATUS={one_line(status)}" if status else ""))


def stopping(status: str | None = None) -> bool:
    """Shutdown has begun (systemd shows "deactivating" meanwhile)."""
    return notify("STOPPING=1" + (f"\nSTATUS={one_line(status)}" if status else ""))


def status(text: str) -> bool:
    """A one-line status shown by `systemctl status`."""
    return notify(f"STATUS={one_line(text)}")


def extend_timeout(seconds: float) -> bool:
    """Ask for more time to start or stop than TimeoutStartSec/TimeoutStopSec allow."""
    return notify(f"EXTEND_TIMEOUT_USEC={max(0, int(seconds * 1_000_000))}")


def watchdog() -> bool:
    return notify("WATCHDOG=1")


def watchdog_interval_s(environ: Mapping[str, str] | None = None) -> float | None:
    """WatchdogSec as seconds when systemd set it for this process, else None."""
    env = os.environ if environ is None else environ
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None  # meant for another process (a parent that exec'ed us, say)
        except ValueError:
            return None
    return usec / 1_000_000


HealthCheck = Callable[[], Awaitable[bool]]


class Watchdog:
    """Pings the watchdog at half the interval from the event loop.

    With `healthy`, a ping is sent only when the check says yes within a quarter of the
    interval (for instance "the store thread answers"): a wedged part then gets the service
    restarted, not only a wedged loop.
    """

    def __init__(self, interval_s: float | None = None, *, healthy: HealthCheck | None = None,
                 ping: Callable[[], bool] = watchdog) -> None:
        self.interval_s = watchdog_interval_s() if interval_s is None else interval_s
        self.healthy = healthy
        self._ping = ping
        self._task: asyncio.Task[None] | None = None
        self.pings = 0

    @property
    def enabled(self) -> bool:
        return bool(self.interval_s and self.interval_s > 0)

    async def start(self) -> None:
        if self.enabled and self._task is None:
            self._task = asyncio.create_task(self._run(), name="faxgw-watchdog")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    async def _run(self) -> None:
        assert self.interval_s is not None
        period = self.interval_s / 2
        while True:
            if await self._is_healthy():
                if self._ping():
                    self.pings += 1
            await asyncio.sleep(period)

    async def _is_healthy(self) -> bool:
        if self.healthy is None:
            return True
        assert self.interval_s is not None
        try:
            ok = await asyncio.wait_for(self.healthy(),
                                        self.interval_s * HEALTH_TIMEOUT_FRACTION)
        except TimeoutError:
            log.warning("watchdog: health check timed out; not pinging")
            return False
        except Exception:  # a task boundary: the check failing is "unhealthy", not a crash
            log.exception("watchdog: health check failed; not pinging")
            return False
        if not ok:
            log.warning("watchdog: health check says unhealthy; not pinging")
        return ok
