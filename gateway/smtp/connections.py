"""How many SMTP connections the gateway holds, and what happens when the system runs out.

Every connection costs a file descriptor and a little memory, so the SMTP edge caps them in
total (SMTP_MAX_CONNECTIONS) and per client address (SMTP_MAX_CONNECTIONS_PER_IP): one address
opening hundreds of idle sessions gets `421 4.7.0` and is closed, while other clients still get
in. The caps are shared by the plain and the implicit-TLS listeners.

If file descriptors run out anyway (a low open-files limit), asyncio stops accepting for a
second and reports the accept() error to the loop's exception handler each time; `AcceptErrors`
turns that into one WARNING line per minute with a count, instead of a traceback a second.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

ACCEPT_LOG_INTERVAL_S = 60.0


class ConnectionLimits:
    """Counts open connections per client address; `admit` says whether one more fits."""

    def __init__(self, max_total: int, max_per_ip: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_total = max_total
        self.max_per_ip = max_per_ip
        self.clock = clock
        self.total = 0
        self._per_ip: Counter[str] = Counter()
        self.refused_recently = 0
        self._last_log = -ACCEPT_LOG_INTERVAL_S

    def note_refusal(self) -> bool:
        """Count a refused connection; True when it is time for one log line about them (a
        connection flood must not become a log flood)."""
        self.refused_recently += 1
        now = self.clock()
        if now - self._last_log < ACCEPT_LOG_INTERVAL_S:
            return False
        self._last_log = now
        return True

    def logged(self) -> None:
        self.refused_recently = 0

    def admit(self, ip: str) -> str | None:
        """None and the connection is counted, or why it is refused ("total" / "per_ip")."""
        if self.total >= self.max_total:
            return "total"
        if self._per_ip[ip] >= self.max_per_ip:
            return "per_ip"
        self.total += 1
        self._per_ip[ip] += 1
        return None

    def release(self, ip: str) -> None:
        self.total -= 1
        self._per_ip[ip] -= 1
        if self._per_ip[ip] <= 0:
            del self._per_ip[ip]


class AcceptErrors:
    """A loop exception handler in front of the previous one: accept() failures for lack of
    resources (EMFILE, ENFILE, ENOBUFS, ENOMEM) become one rate-limited line; everything else
    goes on to the previous handler unchanged."""

    def __init__(self, loop: asyncio.AbstractEventLoop,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.loop = loop
        self.clock = clock
        self.previous = loop.get_exception_handler()
        self.suppressed = 0
        self._last_log = -ACCEPT_LOG_INTERVAL_S

    def install(self) -> None:
        self.loop.set_exception_handler(self)

    def uninstall(self) -> None:
        if self.loop.get_exception_handler() is self:
            self.loop.set_exception_handler(self.previous)

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        message = str(context.get("message", ""))
        if message.startswith("socket.accept() out of system resource"):
            now = self.clock()
            if now - self._last_log >= ACCEPT_LOG_INTERVAL_S:
                exc = context.get("exception")
                log.warning("cannot accept connections: %s (%d more in the last minute); "
                            "asyncio retries each second. Raise LimitNOFILE or lower "
                            "SMTP_MAX_CONNECTIONS", exc, self.suppressed)
                self._last_log = now
                self.suppressed = 0
            else:
                self.suppressed += 1
            return
        if self.previous is not None:
            self.previous(loop, context)
        else:
            loop.default_exception_handler(context)
