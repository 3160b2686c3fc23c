"""Is it still safe to answer 250? The database file and the disk under DATA_DIR.

A 250 promises the job survives. Two things break that promise without any write failing:

- The SQLite file deleted or replaced under the running daemon. The open connection keeps
  writing to the unlinked inode, every commit "succeeds", and the jobs vanish at the next
  start. So the file at the path must still be the one that was opened (same st_dev/st_ino),
  checked before each intake commit, by /readyz and periodically.
- A damaged file. `PRAGMA quick_check` at start, and SQLITE_CORRUPT / SQLITE_NOTADB named as
  such wherever they surface, so the operator reads what to do instead of a traceback; found
  by a query after start, the store reports it here once (`Guard.report_damage`) and the
  daemon takes the deleted-file path.

Neither heals by restarting, so the daemon stops with EXIT_DATA (65), which the systemd unit
lists in RestartPreventExitStatus, rather than crash-looping (or worse, restarting on a fresh
empty database and accepting mail as if nothing had happened).

Free space is the softer case: below MIN_FREE_DISK_MB intake answers 451 4.3.1 (the sender
retries) and /readyz says why, until space comes back.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

MB = 1024 * 1024
# SQLite primary result codes that mean "this file is not a usable database" (not "busy").
_SQLITE_CORRUPT = 11
_SQLITE_NOTADB = 26

ADVICE = ("stop here and restore the database from a backup (or move it away to start with an "
          "empty queue, losing the jobs in it)")


class DatabaseUnusable(Exception):
    """The job database is damaged, gone or replaced; ``str(exc)`` says so in plain words."""


def is_damage(exc: BaseException) -> bool:
    """True for SQLite errors that mean a damaged or foreign file (not a lock or a full disk)."""
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(exc, sqlite3.DatabaseError) and code is not None and \
        code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB)


def damaged(path: Path, exc: BaseException) -> DatabaseUnusable:
    return DatabaseUnusable(f"the job database {path} is damaged or not a faxgw database "
                            f"({exc}): {ADVICE}")


def check_integrity(db: sqlite3.Connection, path: Path) -> None:
    """`PRAGMA quick_check` (the O(N) check without index cross-checks): fast enough at start,
    and it reads every page, so a damaged file is found before mail is taken, not after."""
    try:
        rows = [str(r[0]) for r in db.execute("PRAGMA quick_check(5)").fetchall()]
    except sqlite3.DatabaseError as exc:
        if is_damage(exc):
            raise damaged(path, exc) from None
        raise
    if rows != ["ok"]:
        raise DatabaseUnusable(f"the job database {path} is damaged ({'; '.join(rows)[:300]}): "
                               f"{ADVICE}")


class Guard:
    """Watches the database file and the free space under DATA_DIR for a running daemon.

    `on_fatal` is called once, with the reason, when the database is found gone or replaced:
    the daemon uses it to stop. The database problem is sticky: a new file appearing at the
    path later does not make the lost jobs come back.
    """

    def __init__(self, db_path: Path | None, data_dir: Path, min_free_mb: int,
                 on_fatal: Callable[[str], None] | None = None) -> None:
        self.db_path = db_path
        self.data_dir = data_dir
        self.min_free_bytes = min_free_mb * MB
        self.min_free_mb = min_free_mb
        self.on_fatal = on_fatal
        self._identity: tuple[int, int] | None = None
        self.database_problem: str | None = None
        self._disk_low = False
        self._lock = threading.Lock()

    def opened(self) -> None:
        """Remember which file was opened: call right after the store opened it. A database
        that is not a local file (PostgreSQL) has nothing to watch here."""
        if self.db_path is None:
            return
        st = os.stat(self.db_path)
        self._identity = (st.st_dev, st.st_ino)

    def check_database(self) -> str | None:
        """Why the database can no longer be trusted, or None. A stat: cheap enough for every
        mail."""
        if (self.database_problem is not None or self._identity is None
                or self.db_path is None):
            return self.database_problem
        try:
            st = os.stat(self.db_path)
        except FileNotFoundError:
            problem = f"the job database {self.db_path} was deleted while the gateway ran"
        except OSError as exc:
            problem = f"the job database {self.db_path} cannot be checked: {exc.strerror or exc}"
        else:
            if (st.st_dev, st.st_ino) == self._identity:
                return None
            problem = (f"the job database {self.db_path} was replaced by another file while "
                       "the gateway ran")
        self._lost(problem)
        return self.database_problem

    def report_damage(self, exc: BaseException) -> None:
        """A query found the database damaged after start (pages overwritten under the
        running daemon): the same path as a deleted file (451 to mail, /readyz 503, one log
        line, the daemon stops with EXIT_DATA). Called on the store's thread; once."""
        self._lost(f"the job database {self.db_path} is damaged ({exc}); found while the "
                   "gateway ran")

    def _lost(self, problem: str) -> None:
        """The database can no longer be trusted: said once (the first finding wins, from the
        loop or the store's thread), then the daemon is told to stop."""
        with self._lock:
            if self.database_problem is not None:
                return
            self.database_problem = problem
        log.error("%s: refusing mail (451) and stopping; jobs accepted since then may be "
                  "lost: %s", problem, ADVICE)
        if self.on_fatal is not None:
            self.on_fatal(problem)

    def free_bytes(self) -> int:
        st = os.statvfs(self.data_dir)
        return st.f_bavail * st.f_frsize

    def check_disk(self) -> str | None:
        """Why DATA_DIR has too little room, or None. Logged once when it goes low and once
        when it recovers, not per mail."""
        if self.min_free_bytes <= 0:
            return None
        try:
            free = self.free_bytes()
        except OSError as exc:
            return f"free space in DATA_DIR {self.data_dir} cannot be read: {exc.strerror or exc}"
        low = free < self.min_free_bytes
        if low != self._disk_low:
            self._disk_low = low
            if low:
                log.error("only %d MB free in DATA_DIR %s (MIN_FREE_DISK_MB=%d): refusing mail "
                          "with 451 until there is room", free // MB, self.data_dir,
                          self.min_free_mb)
            else:
                log.info("%d MB free in DATA_DIR %s again: taking mail", free // MB,
                         self.data_dir)
        if not low:
            return None
        return (f"{free // MB} MB free in DATA_DIR {self.data_dir}, below MIN_FREE_DISK_MB="
                f"{self.min_free_mb}")
