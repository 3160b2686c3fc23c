"""A real PgBouncer (Debian's `pgbouncer` package) in transaction mode in front of the test
database, as many sites run PostgreSQL: each transaction of a client may run on another server
connection, so nothing may outlive a transaction on the server (session advisory locks, SET,
prepared statements unless PgBouncer keeps them: 1.21 and newer with max_prepared_statements).

Started and stopped by the tests that need it (`pgbouncer_url` in conftest.py).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from testsupport.harness import free_port

PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"

# Two server connections for every client of a test: enough that consecutive transactions of
# one client land on different server connections (what transaction mode is about), few enough
# that they do so often.
POOL_SIZE = 2


def available() -> bool:
    return os.path.exists(PGBOUNCER)


def version() -> tuple[int, ...]:
    out = subprocess.run([PGBOUNCER, "--version"], capture_output=True, text=True,
                         check=True).stdout
    words = out.split()  # "PgBouncer 1.18.0 ..."
    return tuple(int(part) for part in words[1].split(".")[:2])


class PgBouncer:
    """One PgBouncer process on 127.0.0.1 forwarding every database to `server_host:port`."""

    def __init__(self, server_host: str, server_port: int, user: str = "postgres") -> None:
        self.server_host, self.server_port, self.user = server_host, server_port, user
        # Outside pytest's private tmp tree: PgBouncer drops root for `user` (it refuses to run
        # as root), and that user must still read its files.
        self.dir = Path(tempfile.mkdtemp(prefix="faxgw-pgbouncer-"))
        self.dir.chmod(0o755)
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def _write_config(self) -> Path:
        users = self.dir / "users.txt"
        users.write_text(f'"{self.user}" ""\n')
        ini = self.dir / "pgbouncer.ini"
        ini.write_text(
            "[databases]\n"
            f"* = host={self.server_host} port={self.server_port}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {self.port}\n"
            "unix_socket_dir =\n"
            "auth_type = trust\n"
            f"auth_file = {users}\n"
            "pool_mode = transaction\n"
            f"default_pool_size = {POOL_SIZE}\n"
            "max_client_conn = 200\n"
            "ignore_startup_parameters = extra_float_digits,options\n")
        for path in (users, ini):
            path.chmod(0o644)
        return ini

    def start(self, timeout_s: float = 10.0) -> None:
        for _ in range(5):  # a free port can be taken between the look and the bind
            self.port = free_port()  # below the ephemeral range: see free_port
            ini = self._write_config()
            args = [PGBOUNCER, str(ini)]
            if os.geteuid() == 0:
                args[1:1] = ["-u", self.user]
            self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.PIPE)
            if self._wait_ready(timeout_s):
                return
            why = self.stop()
        raise RuntimeError(f"PgBouncer did not start: {why[-2000:]}")

    def _wait_ready(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                return False
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return True
            except OSError:
                time.sleep(0.05)  # polling a port that is not open yet, bounded by the deadline
        return False

    def url(self, database: str) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def stop(self) -> str:
        """Stop it; what it wrote to stderr (its log)."""
        said = ""
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            if self.proc.stderr is not None:
                said = self.proc.stderr.read().decode(errors="replace")
                self.proc.stderr.close()
            self.proc = None
        return said

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
