"""Compose the parts: start in dependency order, stop in reverse.

`Gateway` is what `faxgw run` runs and what the tests start in-process on port 0.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable

from gateway import defaults
from gateway.config import Settings, is_loopback_url
from gateway.constants import EXIT_CONFIG, EXIT_DATA, EXIT_UNAVAILABLE
from gateway.documents.pool import CpuPool
from gateway.inbound.service import Inbound, write_sandbox_info
from gateway.mail.sender import Notifier, OutboxNotifier, RelayNotifier
from gateway.media_store import (
    LocalMediaStore,
    MediaError,
    MediaStore,
    load_or_create_key,
    s3_media_store,
)
from gateway.outbound.callbacks import CALLBACK_ROUTE
from gateway.outbound.job_runner import Worker
from gateway.runtime import systemd as sdnotify
from gateway.runtime.instance import AlreadyRunning, DataDirLock, remove_pid_file, write_pid_file
from gateway.runtime.metrics import Metrics
from gateway.runtime.nodes import NodeHeartbeat
from gateway.signalwire.client import SignalWireClient
from gateway.smtp import replies
from gateway.smtp.access import Access
from gateway.smtp.intake import Intake
from gateway.smtp.replies import Reply
from gateway.smtp.server import FaxHandler, SMTPListener
from gateway.smtp.tls import ReloadableTLS
from gateway.spool import Spool
from gateway.store.base import StoreError
from gateway.store.factory import open_store
from gateway.store.health import ADVICE, MB, DatabaseUnusable, Guard
from gateway.web.http_listener import SANDBOX_PREFIX, WebApp

log = logging.getLogger(__name__)

GUARD_INTERVAL_S = 5.0


class Gateway:
    def __init__(self, settings: Settings, clock: Callable[[], float] = time.time) -> None:
        self.s = settings
        self.clock = clock
        data = settings.queue.data_dir
        self.lock = DataDirLock(data)
        self.store = open_store(settings, clock)
        # Set by amain: called once when the database is found gone (the daemon stops).
        self.on_fatal: Callable[[str], None] | None = None
        self.guard = Guard(self.store.file_path, data, settings.queue.min_free_disk_mb, self._fatal)
        # Damage found by a query after start (intake, the worker, ...): as a deleted file.
        self.store.on_damage = self.guard.report_damage
        self._loop: asyncio.AbstractEventLoop | None = None
        self.spool = Spool(data / "spool")
        self.local_media: LocalMediaStore | None = None
        if settings.media.store == "local":
            key = (settings.media.signing_key.encode() if settings.media.signing_key
                   else load_or_create_key(data / "media.key"))
            self.local_media = LocalMediaStore(data / "media", key, self.public_base_url, clock)
            self.media: MediaStore = self.local_media
        else:
            self.media = s3_media_store(settings, defaults.S3_TIMEOUT_S, clock)
        self.notifier: Notifier = (
            RelayNotifier(settings, defaults.NOTIFY_TIMEOUT_S) if settings.notify.host
            else OutboxNotifier(data / "outbox"))
        self.cpu = CpuPool(settings.documents.workers, settings.documents.timeout_s,
                           settings.documents.memory_mb * 1024 * 1024)
        self.metrics = Metrics()
        self.metrics.node.info({"node_id": settings.cluster.node_id,
                                "store": "postgresql" if settings.shared else "sqlite"})
        self.web = WebApp(settings, self.store, self._wake_worker, self.local_media, self.metrics)
        self.web.ready_checks += [self._check_store, self._check_disk, self._check_listeners,
                                  self._contact_check("media"), self._contact_check("signalwire")]
        self.simulator_state: object | None = None
        if settings.sandbox:
            from gateway.sandbox.simulator import SIM_STATE, create_simulator_app

            sim = create_simulator_app(project_id=settings.signalwire.project_id,
                                       api_token=settings.signalwire.api_token,
                                       signing_key=settings.signalwire.signing_key)
            self.simulator_state = sim[SIM_STATE]
            self.web.app.add_subapp(SANDBOX_PREFIX, sim)
        self.signalwire = SignalWireClient(space_url=self.space_url,
                                           project_id=settings.signalwire.project_id,
                                           api_token=settings.signalwire.api_token,
                                           timeout_s=settings.signalwire.timeout_s)
        self.worker = Worker(settings=settings, store=self.store, spool=self.spool,
                             media=self.media, signalwire=self.signalwire,
                             notifier=self.notifier, cpu=self.cpu,
                             callback_url=self.callback_url, clock=clock, metrics=self.metrics)
        # Faxes in, mail out (gateway/inbound/): webhook routes on the public app.
        self.inbound = Inbound(settings=settings, store=self.store, signalwire=self.signalwire,
                               notifier=self.notifier, cpu=self.cpu,
                               registry=self.metrics.registry,
                               public_base_url=self.public_base_url, clock=clock)
        self.inbound.install(self.web.app)
        self.access = Access(settings, store=self.store if settings.shared else None)
        self.intake = Intake(settings, self.store, self.spool, self.cpu, self._wake_worker, clock,
                             self.notifier, self.access, self.metrics,
                             media=self.media if settings.shared else None,
                             part_media=self.media)
        self.intake.durability_check = self._durability
        self.worker.intake_active = lambda: self.intake.active
        # Several gateways on PostgreSQL: another node's new work wakes this one's worker at
        # once (LISTEN/NOTIFY), not at its next look at the queue. None on SQLite.
        self.wakeups = self.store.wakeups(self.worker.wake)
        if self.wakeups is not None:
            self.metrics.watch_wakeups(self.wakeups.status)
            self.web.ready_checks.append(self._check_wakeups)
        self.tls = (ReloadableTLS(settings.tls.cert_file, settings.tls.key_file,
                                  settings.tls.min_version)
                    if settings.tls.cert_file and settings.tls.key_file else None)
        self.smtp_handler = FaxHandler(settings, self.intake, self.access, self.metrics)
        self.smtp = SMTPListener(settings, self.smtp_handler, settings.smtp.listen, self.tls)
        self.smtps = (SMTPListener(settings, self.smtp_handler, settings.smtp.smtps_listen,
                                   self.tls, implicit_tls=True)
                      if settings.smtp.smtps_listen else None)
        self.listeners = [x for x in (self.smtp, self.smtps) if x is not None]
        self.heartbeat: NodeHeartbeat | None = None
        self.dashboard = None
        if settings.admin.listen is not None:
            # Imported only when on: jinja2 and the templates stay out of a daemon without it.
            from gateway.web.dashboard.routes import Dashboard

            self.dashboard = Dashboard(settings, self.store, clock=clock,
                                       wake=self._wake_worker, ready=self.web.ready_status,
                                       cpu=self.cpu, signalwire=self.signalwire,
                                       retry_policy=self.worker.retry_policy,
                                       contact=self._contact)

    def _wake_worker(self) -> None:
        self.worker.wake()

    def _durability(self) -> Reply | None:
        """The SMTP reply for a mail that cannot be made durable now, or None to go on."""
        if self.guard.check_database() is not None:
            return replies.DATABASE_UNAVAILABLE
        if self.guard.check_disk() is not None:
            return replies.DISK_LOW
        return None

    def _fatal(self, reason: str) -> None:
        """Stop the daemon; callable from any thread (damage is found on the store's)."""
        if self.on_fatal is None:
            return
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self.on_fatal, reason)
        else:
            self.on_fatal(reason)

    async def _check_disk(self) -> tuple[str, bool, str]:
        problem = self.guard.check_disk()
        if problem is not None:
            return "disk", False, problem
        return "disk", True, f"{self.guard.free_bytes() // MB} MB free in DATA_DIR"

    async def _check_store(self) -> tuple[str, bool, str]:
        if (problem := self.guard.check_database()) is not None:
            return "store", False, problem
        try:
            await asyncio.wait_for(self.store.run(self.store.check_writable), 5)
        except Exception as exc:  # a health check reports, it does not raise
            return "store", False, f"{self.store.where}: {type(exc).__name__}: {exc}"
        return "store", True, f"writable ({self.store.where}, node {self.s.cluster.node_id})"

    async def _check_listeners(self) -> tuple[str, bool, str]:
        bound = [f"{type(x).__name__}:{x.port}" for x in self.listeners if x.bound]
        ok = len(bound) == len(self.listeners) and self.web.port > 0
        return "listeners", ok, ", ".join(bound) or "none bound"

    async def _check_wakeups(self) -> tuple[str, bool, str]:
        """Informational: a node that does not hear the others' wake-ups still finds their
        work (later, at its next look at the queue), so it stays ready."""
        assert self.wakeups is not None
        return "wakeups", True, self.wakeups.status()[2]

    def _contact(self, name: str) -> tuple[bool, float, str] | None:
        """This node's last contact with an outside service: the worker's, or the media
        store's own (a shared queue uploads at intake, not in the worker), the newer."""
        states = [self.worker.contact.get(name)]
        if name == "media":
            states.append(getattr(self.media, "contact", None))
        known = [s for s in states if s is not None]
        return max(known, key=lambda s: s[1]) if known else None

    def _contact_check(self, name: str) -> Callable[[], Awaitable[tuple[str, bool, str]]]:
        async def check() -> tuple[str, bool, str]:
            state = self._contact(name)
            if state is None:
                return name, True, "no contact yet"
            ok, when, detail = state
            return name, ok, f"{detail} ({self.clock() - when:.0f} s ago)"
        return check

    def space_url(self) -> str:
        # Sandbox: the simulator lives on our own HTTP listener, so its URL is known after bind.
        return self.s.signalwire.space_url or self.public_base_url() + SANDBOX_PREFIX

    def public_base_url(self) -> str:
        if self.s.http.public_base_url:
            return self.s.http.public_base_url
        host = self.s.http.listen.host
        host = "127.0.0.1" if host in ("0.0.0.0", "") else host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.web.port}"

    def callback_url(self, token: str) -> str:
        return f"{self.public_base_url()}{CALLBACK_ROUTE}/{token}"

    async def start(self, run_worker: bool = True) -> None:
        """Start every part; `run_worker=False` leaves the queue to be driven by hand
        (`worker.run_until_idle()`), for tests on an injected clock."""
        self._loop = asyncio.get_running_loop()
        self.s.queue.data_dir.mkdir(parents=True, exist_ok=True)
        # First of all: a second daemon on this DATA_DIR must not touch the store or spool.
        self.lock.acquire()
        self.spool.root.mkdir(exist_ok=True)
        await self.store.start()  # a damaged database raises DatabaseUnusable
        await self.store.run(self.store.verify)
        self.guard.opened()
        # Leases a dead run left: SQLite has one gateway, so all of them; a shared queue only
        # this NODE_ID's (another node's run out by themselves).
        released = await self.store.run(self.store.release_all, not self.s.shared)
        if released:
            log.info("released %d job lease(s) left by an earlier run", released)
        await self.inbound.prepare()
        await self.cpu.start()
        await self.media.start()
        await _bound("HTTP_LISTEN", self.s.http.listen, self.web.start())
        await self.signalwire.start()
        if self.dashboard is not None:
            await _bound("ADMIN_LISTEN", self.s.admin.listen, self.dashboard.start())
        if run_worker:
            await self.worker.start()
            if self.wakeups is not None:
                await self.wakeups.start()
        await self.inbound.start(run_background=run_worker)
        if self.s.sandbox:
            write_sandbox_info(self.s, self.space_url(), self.public_base_url())
        for listener in self.listeners:
            await _bound("SMTPS_LISTEN" if listener is self.smtps else "SMTP_LISTEN",
                         listener.listen, listener.start())
        self.heartbeat = NodeHeartbeat(
            self.store, self.s.cluster.node_id, self._node_detail(), self.clock)
        await self.heartbeat.start()
        mode = "sandbox (built-in SignalWire simulator)" if self.s.sandbox else "production"
        log.info("faxgw started in %s mode: SMTP %s:%d%s%s for *@%s, HTTP %s:%d, media %s, "
                 "reports %s, store %s (node %s)", mode, self.s.smtp.listen.host, self.smtp.port,
                 " (STARTTLS)" if self.tls else "",
                 f", SMTPS {self.smtps.listen.host}:{self.smtps.port}" if self.smtps else "",
                 self.s.fax.domain, self.s.http.listen.host, self.web.port, self.s.media.store,
                 f"via {self.s.notify.host}" if self.s.notify.host
                 else f"to {self.s.queue.data_dir / 'outbox'}", self.store.where,
                 self.s.cluster.node_id)
        if not self.s.sandbox and is_loopback_url(self.public_base_url()):
            log.warning("PUBLIC_BASE_URL %s is a loopback address: SignalWire cannot reach "
                        "it for callbacks or media", self.public_base_url())

    def reload(self) -> None:
        """SIGHUP: a renewed certificate and the users file, without dropping connections."""
        if self.tls is not None:
            try:
                if self.tls.reload_if_changed():
                    log.info("TLS certificate reloaded: %s", self.tls.fingerprint)
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                log.error("TLS certificate not reloaded, keeping the old one: %s", exc)
        self.access.reload()
        if self.dashboard is not None:
            self.dashboard.logins.reload()

    def _node_detail(self) -> str:
        """What the dashboard of every node shows about this one."""
        reports = (f"reports via {self.s.notify.host}" if self.s.notify.host
                   else f"reports to {self.s.queue.data_dir / 'outbox'}")
        return f"{socket.gethostname()}, SMTP port {self.smtp.port}, {reports}"

    async def stop(self, grace_s: float | None = None) -> None:
        grace_s = self.s.queue.shutdown_grace_s if grace_s is None else grace_s
        # New sessions are turned away (421) first; the node's heartbeat row goes after, while
        # the open ones may still finish.
        await asyncio.gather(*(listener.stop(grace_s) for listener in self.listeners))
        if self.heartbeat is not None:
            await self.heartbeat.stop()
            self.heartbeat = None
        if self.wakeups is not None:
            await self.wakeups.stop()
        await self.worker.stop(grace_s)
        await self.inbound.stop(grace_s)
        if self.dashboard is not None:
            await self.dashboard.stop()
        await self.signalwire.stop()
        await self.web.stop()
        await self.notifier.stop()
        await self.media.stop()
        await self.cpu.stop()
        try:
            # Not from a database found damaged or gone: a summary is not worth a traceback.
            counts = ({} if self.guard.database_problem is not None
                      else await self.store.run(self.store.counts_by_state))
        except Exception as exc:  # stopping after a failed start, or a connection killed
            if not (isinstance(exc, (AssertionError, OSError, StoreError))
                    or self.store.is_db_error(exc)):
                raise
            counts = {}
        await self.store.stop()
        if self.lock.held:
            log.info("faxgw stopped; jobs by state: %s",
                     ", ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "none")
        self.lock.release()


async def _bound(name: str, listen: object, start: Awaitable[None]) -> None:
    """Bind a listener; a port in use (or any bind error) names the setting that asked."""
    try:
        await start
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise OSError(f"{name}={listen}: {reason}") from exc


async def amain(settings: Settings) -> int:
    gateway = Gateway(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, gateway.reload)
    # SIGUSR1: look at the queue now (the CLI's resend/cancel/report take effect at once).
    loop.add_signal_handler(signal.SIGUSR1, gateway.worker.wake)
    try:
        # The lock before the pid file: a refused second daemon must not overwrite it.
        settings.queue.data_dir.mkdir(parents=True, exist_ok=True)
        gateway.lock.acquire()
        write_pid_file(settings.queue.data_dir)
        await gateway.start()
    except DatabaseUnusable as exc:
        log.error("cannot start: %s", exc)
        await gateway.stop(grace_s=0)
        remove_pid_file(settings.queue.data_dir)
        return EXIT_DATA
    except AlreadyRunning as exc:
        # A configuration mistake (two daemons, one DATA_DIR): restarting cannot fix it, so
        # exit 78, which the unit does not restart.
        log.error("cannot start: %s", exc)
        await gateway.stop(grace_s=0)
        return EXIT_CONFIG
    except MediaError as exc:  # no S3 credentials: restarting cannot fix it
        log.error("cannot start: %s", exc)
        await gateway.stop(grace_s=0)
        remove_pid_file(settings.queue.data_dir)
        return EXIT_CONFIG
    except (OSError, StoreError) as exc:  # a port in use, an unwritable DATA_DIR, no database
        log.error("cannot start: %s", exc)
        await gateway.stop(grace_s=0)
        remove_pid_file(settings.queue.data_dir)
        return EXIT_UNAVAILABLE
    fatal: list[str] = []

    def on_fatal(reason: str) -> None:
        fatal.append(reason)
        stop.set()

    gateway.on_fatal = on_fatal
    guard_task = asyncio.create_task(_watch(gateway))
    # The watchdog pings only while the loop runs and the store thread answers.
    watchdog = sdnotify.Watchdog(healthy=lambda: gateway.store.run(lambda: True))
    await watchdog.start()
    sdnotify.ready(f"SMTP port {gateway.smtp.port}, HTTP port {gateway.web.port}")
    try:
        await stop.wait()
        log.info("shutting down")
        sdnotify.stopping("shutting down")
        sdnotify.extend_timeout(2 * settings.queue.shutdown_grace_s + 15)
    finally:
        guard_task.cancel()
        await watchdog.stop()
        await gateway.stop()
        remove_pid_file(settings.queue.data_dir)
    if fatal:
        log.error("faxgw stopped because %s: %s", fatal[0], ADVICE)
        return EXIT_DATA
    return 0


async def _watch(gateway: Gateway, interval_s: float = GUARD_INTERVAL_S) -> None:
    """Notice a deleted database or a full disk even when no mail arrives to find it."""
    while True:
        await asyncio.sleep(interval_s)
        gateway.guard.check_database()
        gateway.guard.check_disk()
