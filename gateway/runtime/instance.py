"""One daemon per DATA_DIR, and a pid file the CLI can trust.

Two daemons on one DATA_DIR share the SQLite file and the spool, and each one's housekeeping
deletes documents the other still needs. The daemon therefore holds an exclusive `flock` on
`DATA_DIR/faxgw.lock` for its whole life; the kernel drops it when the process dies, even by
kill -9, so there is never a stale lock to clean up. The CLI never takes it: it works beside a
running daemon through SQLite's own locking.

The pid file names the daemon together with its start time (field 22 of /proc/<pid>/stat, in
clock ticks since boot). A pid is reused after the process dies; a pid with the same start time
is the same process. The CLI signals only when both match, so a stale pid file left by kill -9
can never make it signal a stranger.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_NAME = "faxgw.lock"
PID_NAME = "faxgw.pid"


class AlreadyRunning(Exception):
    """Another daemon holds DATA_DIR; ``str(exc)`` says which and what to do."""


def process_start_time(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot, or None where it cannot be read (no such
    process, or no /proc). The command name in field 2 may hold spaces and parentheses, so the
    fields are counted after its closing parenthesis."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    after = raw[raw.rfind(b")") + 2:].split()
    try:
        return int(after[19])  # field 22 overall; field 3 is after[0]
    except (IndexError, ValueError):
        return None


class DataDirLock:
    """The exclusive lock on DATA_DIR, held from `acquire()` until `release()` or exit."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock or raise AlreadyRunning naming the holder. Non-blocking: a second
        daemon must be told at once, not hang waiting for the first to go."""
        if self._fd is not None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_pid(fd)
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            who = f"pid {holder}" if holder else "another process"
            raise AlreadyRunning(
                f"another faxgw daemon ({who}) is already using DATA_DIR "
                f"{self.path.parent}: stop it first, or give this one its own DATA_DIR") from None
        # Who holds it, for the message above (informative only; the lock is the truth).
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        # The file stays: unlinking a lock file lets a third process lock a new inode while a
        # second still waits on the old one.
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "0") or None
    except (OSError, ValueError):
        return None


def write_pid_file(data_dir: Path) -> Path:
    """Write "<pid> <start time>" for the CLI's nudges."""
    path = data_dir / PID_NAME
    start = process_start_time(os.getpid())
    path.write_text(f"{os.getpid()} {start if start is not None else ''}".rstrip() + "\n")
    return path


def remove_pid_file(data_dir: Path) -> None:
    """Remove the pid file only if it is still ours."""
    path = data_dir / PID_NAME
    if read_pid_file(data_dir)[0] == os.getpid():
        path.unlink(missing_ok=True)


def read_pid_file(data_dir: Path) -> tuple[int | None, int | None]:
    try:
        parts = (data_dir / PID_NAME).read_text().split()
    except OSError:
        return None, None
    try:
        pid = int(parts[0]) if parts else None
        start = int(parts[1]) if len(parts) > 1 else None
    except ValueError:
        return None, None
    return pid, start


def running_daemon(data_dir: Path) -> int | None:
    """The pid of the daemon serving `data_dir`, or None when none is running.

    Only a pid whose process start time is the one the daemon wrote counts: an old pid file
    without a start time, or one whose pid now belongs to another process, names no daemon.
    """
    pid, start = read_pid_file(data_dir)
    if pid is None or start is None or pid <= 1:
        return None
    if process_start_time(pid) != start:
        return None
    return pid
