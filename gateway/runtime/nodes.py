"""Which gateways are running: each node writes a heartbeat row (`nodes`) into the store it
shares with the others, so the dashboard of any node can list the live ones.

A node that stops cleanly removes its row; one that crashed stops being listed once its last
heartbeat is older than LIVE_S.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from gateway.store.interfaces import Nodes

log = logging.getLogger(__name__)

HEARTBEAT_S = 10.0
LIVE_S = 3 * HEARTBEAT_S  # two heartbeats may be missed (a busy database) before it is gone


class NodeHeartbeat:
    """The node's row in `nodes`, written at start and every HEARTBEAT_S; `start()`/`stop()`."""

    def __init__(self, store: Nodes, node_id: str, detail: str,
                 clock: Callable[[], float]) -> None:
        self.store = store
        self.node_id = node_id
        self.detail = detail
        self.clock = clock
        self.started_at = clock()
        self._task: asyncio.Task[None] | None = None

    async def beat(self) -> None:
        await self.store.run(self.store.node_seen, self.node_id, self.started_at, self.clock(),
                             self.detail)

    async def start(self) -> None:
        await self.beat()
        self._task = asyncio.create_task(self._loop(), name="node-heartbeat")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            try:
                await self.beat()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # task boundary: the store's own checks say more
                log.warning("node heartbeat not written: %s: %s", type(exc).__name__, exc)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
            try:
                await self.store.run(self.store.node_gone, self.node_id)
            except Exception as exc:  # stopping after the store failed: it ages out
                log.info("node heartbeat not removed: %s: %s", type(exc).__name__, exc)
