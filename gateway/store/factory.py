"""The store the settings name: SQLite in DATA_DIR, or PostgreSQL at DATABASE_URL. Apart from
gateway/store/base.py, which both backends import, so the choice of backend is made above them."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from gateway.store.base import DB_FILENAME
from gateway.store.sql import SqlStore

if TYPE_CHECKING:
    from gateway.config import Settings


def open_store(settings: Settings, clock: Callable[[], float] = time.time) -> SqlStore:
    """The store the settings name, not yet opened (`open()` or `await start()`):
    PostgreSQL when DATABASE_URL is set (several gateways, one queue), else SQLite at
    DATA_DIR/faxgw.sqlite3."""
    store: SqlStore
    if settings.cluster.database_url:
        from gateway.store.postgres import PostgresStore

        store = PostgresStore(settings.cluster.database_url, clock,
                              prepared_statements=settings.cluster.prepared_statements,
                              listen_url=settings.cluster.listen_url)
    else:
        from gateway.store.sqlite import SqliteStore

        store = SqliteStore(settings.queue.data_dir / DB_FILENAME, clock)
    store.node_id = settings.cluster.node_id
    store.lease_s = settings.cluster.lease_seconds
    return store
