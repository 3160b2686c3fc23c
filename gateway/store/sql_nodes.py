"""Which gateways are running, in SQL: a heartbeat row per node (gateway/ops/nodes.py)."""

from __future__ import annotations

from typing import Any

from gateway.store.sql_core import SqlCore


class SqlNodes(SqlCore):
    """The `Nodes` interface."""

    def node_seen(self, node_id: str, started_at: float, now: float, detail: str) -> None:
        """This node is alive (its heartbeat): one row per node, written over."""
        with self._tx():
            self._exec("INSERT INTO nodes (node_id, started_at, seen_at, detail)"
                       " VALUES (?, ?, ?, ?) ON CONFLICT (node_id) DO UPDATE SET"
                       " started_at = excluded.started_at, seen_at = excluded.seen_at,"
                       " detail = excluded.detail", (node_id, started_at, now, detail))

    def node_gone(self, node_id: str) -> None:
        """This node stopped cleanly: no longer listed (a crashed one ages out)."""
        with self._tx():
            self._exec("DELETE FROM nodes WHERE node_id = ?", (node_id,))

    def live_nodes(self, since: float, limit: int = 100) -> list[dict[str, Any]]:
        """Nodes seen at or after `since`, by node id: node_id, started_at, seen_at, detail."""
        return self._rows("SELECT node_id, started_at, seen_at, detail FROM nodes"
                          " WHERE seen_at >= ? ORDER BY node_id LIMIT ?", (since, limit))
