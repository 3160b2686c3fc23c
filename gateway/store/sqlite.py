"""The SQLite backend: one file in WAL mode, one connection on the store's own thread.

Only what SQLite does its own way is here (connecting, pragmas, `BEGIN IMMEDIATE`, durability by
`synchronous=FULL` for the commits that must survive power loss); every query is in `sql.py`.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from gateway import defaults
from gateway.store.base import StoreError
from gateway.store.health import check_integrity, damaged, is_damage
from gateway.store.sql import SqlStore


class SqliteStore(SqlStore):
    DDL_TYPES = {"float": "REAL", "autoid": "INTEGER"}  # INTEGER PRIMARY KEY: the rowid

    def __init__(self, path: Path, clock: Callable[[], float] = time.time,
                 busy_timeout_s: float = defaults.STORE_BUSY_TIMEOUT_S) -> None:
        super().__init__(clock)
        self.path = path
        # How long a write waits for another process (the CLI) holding the lock; then the
        # SMTP side answers 451 and the sender retries.
        self.busy_timeout_s = busy_timeout_s
        self._db: sqlite3.Connection | None = None
        # The dashboard's reader thread reads on a connection of its own (`open_reader`): in
        # WAL mode its reads run beside the writer's transactions, never between them.
        self._local = threading.local()

    @property
    def where(self) -> str:
        return str(self.path)

    @property
    def file_path(self) -> Path:
        return self.path

    def exists(self) -> bool:
        return self.path.is_file()

    def verify(self) -> None:
        check_integrity(self.db, self.path)

    def open(self, *, migrate: bool = True) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                             timeout=self.busy_timeout_s)
        db.row_factory = sqlite3.Row
        try:
            db.execute("PRAGMA journal_mode=WAL")
        except sqlite3.DatabaseError as exc:  # not a database at all: say so, no traceback
            db.close()
            if is_damage(exc):
                raise damaged(self.path, exc) from None
            raise
        # NORMAL in WAL mode survives a process crash (kill -9) but may lose the last commits on
        # power loss; the two commits that must survive that too (the mail accepted with 250,
        # and a send about to be POSTed) are made with synchronous=FULL (durable transactions).
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA foreign_keys=ON")
        self._db = db
        try:
            self._open_schema(migrate)
        except sqlite3.DatabaseError as exc:
            self.close()
            if is_damage(exc):
                raise damaged(self.path, exc) from None
            raise
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def open_reader(self) -> None:
        """A read-only connection for this thread (the dashboard's reader)."""
        # mode=rw: never create a file (one deleted under the daemon is the guard's to see).
        db = sqlite3.connect(self.path.resolve().as_uri() + "?mode=rw", uri=True,
                             isolation_level=None, check_same_thread=False,
                             timeout=self.busy_timeout_s)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA query_only=ON")
        self._local.db = db

    def close_reader(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            self._local.db = None
            db.close()

    @property
    def db(self) -> sqlite3.Connection:
        reader = getattr(self._local, "db", None)
        if reader is not None:
            return reader
        if self._db is None:
            raise StoreError("store is not open")
        return self._db

    @contextlib.contextmanager
    def _tx(self, durable: bool = False) -> Iterator[None]:
        """BEGIN IMMEDIATE ... COMMIT/ROLLBACK on an autocommit connection; a durable one
        commits with synchronous=FULL (the WAL is fsync'ed, with every commit before it)."""
        db = self.db
        if durable:
            db.execute("PRAGMA synchronous=FULL")
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                try:
                    db.execute("ROLLBACK")
                except sqlite3.Error:
                    if self.damage is None:  # keep the first error, not the rollback's
                        raise
                raise
            try:
                db.execute("COMMIT")
            except sqlite3.DatabaseError as exc:
                self._notice(exc)
                raise
        finally:
            if durable:
                db.execute("PRAGMA synchronous=NORMAL")

    def _has_table(self, name: str) -> bool:
        return bool(self._rows("SELECT name FROM sqlite_master WHERE type = 'table' AND name = ?",
                               (name,)))

    def _exec(self, sql: str, args: Sequence[Any] = ()) -> int:
        try:
            return self.db.execute(self._sql(sql), args).rowcount
        except sqlite3.DatabaseError as exc:
            self._notice(exc)
            raise

    def _rows(self, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]:
        try:
            return [dict(r) for r in self.db.execute(self._sql(sql), args).fetchall()]
        except sqlite3.DatabaseError as exc:
            self._notice(exc)
            raise

    def _notice(self, exc: sqlite3.DatabaseError) -> None:
        """A query that found the file damaged (SQLITE_CORRUPT / SQLITE_NOTADB: pages
        overwritten under the running daemon): say so once, through `on_damage`, so the daemon
        takes the same path as for a deleted database instead of failing query by query."""
        if not is_damage(exc) or self.damage is not None:
            return
        self.damage = str(damaged(self.path, exc))
        if self.on_damage is not None:
            self.on_damage(exc)

    def _is_db_error(self, exc: BaseException) -> bool:
        return isinstance(exc, sqlite3.Error)

    def tune_for_bulk_load(self) -> None:
        """Benchmark seeding only: no fsync at all (a crash may corrupt the file)."""
        self.db.execute("PRAGMA synchronous=OFF")

    def checkpoint(self) -> None:
        """Fold the WAL into the main file (the benchmark starts from a compact file)."""
        self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
