"""Wake-ups across nodes on PostgreSQL: LISTEN/NOTIFY (`Store.wakeups`).

A transaction that makes work due which another node could take (a mail's jobs, a resend, a
retry scheduled, jobs a stopping node hands back, a number freed for a job that waits for it,
an operator's action) also runs `SELECT pg_notify('faxgw_due', <its NODE_ID>)`
(`SqlCore._announcing`), which PostgreSQL delivers to every listening session when, and only
if, the transaction commits. Each node keeps one connection of its own for this, not one of
the pool's (a pooled connection goes back to the pool between calls), LISTENs on it, and wakes
its worker at every notification from another node (at its own, it has woken itself already).
The worker then claims as after any wake-up, `FOR UPDATE SKIP LOCKED`: of all the nodes that
woke, one takes each job, under the same leases and fencing as ever.

A notification is a hint, never the only way work is found: the worker still looks at the
queue every SHARED_POLL_S. That poll is what finds work while this connection is down (it is
connected again with a backoff, and the worker woken once for what it may have missed), and
behind a PgBouncer in transaction mode, where LISTEN cannot work (the server session that
listens is lent to other clients between statements, and their notifications go wherever it
is lent). Each connection is tested before it is trusted: it LISTENs on a channel of its own,
a NOTIFY goes out through the store's pool (the way the nodes send theirs), and if it has not
come back within PROBE_WAIT_S the node polls for the rest of its run, which it says once.
`DATABASE_LISTEN_URL` names another way to the same database for this connection (past the
pooler), for a site whose DATABASE_URL is such a PgBouncer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Callable
from typing import Any

import psycopg

from gateway import defaults
from gateway.config import mask_url
from gateway.sanitise import exception_line
from gateway.store.base import Store, StoreError
from gateway.store.interfaces import Wakeups

log = logging.getLogger(__name__)

CHANNEL = "faxgw_due"
PROBE_WAIT_S = 3.0        # a NOTIFY sent through the pool comes back to the listener by then
CHECK_EVERY_S = 30.0      # an idle connection is checked (a round trip) this often ...
CHECK_TIMEOUT_S = 10.0    # ... and given up when the check takes longer
CONNECT_TIMEOUT_S = 10
BACKOFF_FIRST_S = 0.1     # the wait before connecting again, doubled after each failure ...
BACKOFF_MAX_S = 30.0      # ... up to this
# What a lost connection, a database that does not answer, or a failed probe NOTIFY raise.
_FAILURES = (psycopg.Error, OSError, TimeoutError, StoreError)


class PgWakeups(Wakeups):
    """One node's LISTEN connection, on the daemon's event loop (psycopg's async connection:
    no thread of its own, and stopping it is cancelling its task)."""

    def __init__(self, store: Store, wake: Callable[[], None], *, url: str,
                 notify: Callable[[str, str], None], own_url: bool = False) -> None:
        """`url`: where to listen; `notify(channel, payload)`: a NOTIFY through the store's
        pool (a store call); `own_url`: `url` is DATABASE_LISTEN_URL, not DATABASE_URL."""
        self.store = store
        self.wake = wake
        self.url = url
        self.notify = notify
        self.own_url = own_url
        # "connecting", "listening", "polling" (notifications do not arrive here) or "stopped"
        self.state = "stopped"
        self.sessions = 0  # connections that passed the probe and listen, since start
        self.heard = 0     # notifications from other nodes, since start
        self._task: asyncio.Task[None] | None = None

    @property
    def where(self) -> str:
        return mask_url(self.url)

    def status(self) -> tuple[bool, int, str]:
        poll = (f"this node looks for the other nodes' new work every "
                f"{defaults.SHARED_POLL_S:.0f} s")
        words = {
            "listening": f"listening (LISTEN {CHANNEL} at {self.where}): {self.heard} wake-up(s) "
                         "from other nodes since start",
            "connecting": f"connecting to {self.where}; meanwhile {poll}",
            "polling": f"not listening: a notification sent through DATABASE_URL did not reach "
                       f"{self.where} (a pooler in transaction mode?); {poll}",
            "stopped": "stopped",
        }[self.state]
        return self.state == "listening", self.heard, words

    async def start(self) -> None:
        if self._task is None:
            self.state = "connecting"
            self._task = asyncio.create_task(self._run(), name="faxgw-wakeups")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self.state = "stopped"

    async def _run(self) -> None:
        backoff = BACKOFF_FIRST_S
        lost = False  # said that the connection is down (once per outage)
        while True:
            conn: psycopg.AsyncConnection[Any] | None = None
            try:
                conn = await self._connect()
                if not await self._probe(conn):
                    self.state = "polling"
                    self._say_polling()
                    return
                await conn.execute(f"LISTEN {CHANNEL}")
                self.sessions += 1
                self.state = "listening"
                if lost or self.sessions == 1:
                    log.info("wake-ups: %s for other nodes' work (LISTEN %s at %s)",
                             "listening again" if lost else "listening", CHANNEL, self.where)
                lost, backoff = False, BACKOFF_FIRST_S
                # Whatever was announced while nobody listened here.
                self.wake()
                await self._listen(conn)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a task boundary: connect again later
                self.state = "connecting"
                if not isinstance(exc, _FAILURES):
                    log.exception("wake-ups: unexpected error; connecting again")
                elif not lost:
                    log.warning("wake-ups: no notification connection to %s (%s); this node "
                                "looks for other nodes' work every %.0f s until it is back",
                                self.where, exception_line(exc), defaults.SHARED_POLL_S)
                lost = True
            finally:
                if conn is not None:
                    await conn.close()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    def _say_polling(self) -> None:
        if not self.own_url:
            why = ("a pooler such as PgBouncer in transaction mode is in between, where LISTEN "
                   "cannot work; set DATABASE_LISTEN_URL to a direct (or session-mode) URL of "
                   "the same database for wake-ups within milliseconds")
        else:
            why = "is DATABASE_LISTEN_URL a direct (or session-mode) URL of the same database?"
        log.warning("wake-ups: a notification sent through DATABASE_URL did not reach the "
                    "listening connection (%s) within %.0f s: %s. Until this node restarts, it "
                    "finds the other nodes' new work by looking every %.0f s", self.where,
                    PROBE_WAIT_S, why, defaults.SHARED_POLL_S)

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        async with asyncio.timeout(CONNECT_TIMEOUT_S + 5):
            return await psycopg.AsyncConnection.connect(
                self.url, autocommit=True, prepare_threshold=None,
                connect_timeout=CONNECT_TIMEOUT_S, application_name="faxgw-wakeups")

    async def _probe(self, conn: psycopg.AsyncConnection[Any]) -> bool:
        """Whether a NOTIFY sent through the store's pool reaches this connection: LISTEN on a
        channel of this probe's own, notify it (a transaction of its own on a pooled
        connection), wait up to PROBE_WAIT_S. A channel of its own: a session of a pooler
        left listening on it never hears of it again."""
        channel = f"faxgw_probe_{secrets.token_hex(6)}"
        await conn.execute(f"LISTEN {channel}")
        await self.store.run(self.notify, channel, "probe")
        async with contextlib.aclosing(conn.notifies(timeout=PROBE_WAIT_S)) as notes:
            async for note in notes:
                if note.channel == channel:
                    break
            else:
                return False
        await conn.execute(f"UNLISTEN {channel}")
        return True

    async def _listen(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Wake the worker at each notification from another node, until the connection
        fails (raises). Every CHECK_EVERY_S a round trip: a connection whose peer went away
        without a word (a network cut) fails it, rather than wait silently forever."""
        me = self.store.node_id
        while True:
            async with contextlib.aclosing(conn.notifies(timeout=CHECK_EVERY_S)) as notes:
                async for note in notes:
                    if note.channel == CHANNEL and note.payload != me:
                        self.heard += 1
                        self.wake()
            async with asyncio.timeout(CHECK_TIMEOUT_S):
                await conn.execute("SELECT 1")
