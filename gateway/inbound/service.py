"""Inbound faxes as one part of the daemon: webhook routes, deliverer and reconciler, started
after the store and the SignalWire client, stopped before them."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web
from prometheus_client import CollectorRegistry

from gateway.config import Settings
from gateway.documents.pool import CpuPool
from gateway.inbound.counters import InboundMetrics
from gateway.inbound.delivery import Deliverer
from gateway.inbound.reconciler import Reconciler
from gateway.inbound.webhook import InboundWebhook
from gateway.mail.sender import Notifier
from gateway.signalwire.client import SignalWireClient
from gateway.store.inbound import InboundStore
from gateway.store.sql import SqlStore


class Inbound:
    def __init__(self, *, settings: Settings, store: SqlStore, signalwire: SignalWireClient,
                 notifier: Notifier, cpu: CpuPool, registry: CollectorRegistry,
                 public_base_url: Callable[[], str], clock: Callable[[], float]) -> None:
        self.store = store
        self.settings = settings
        self.clock = clock
        self.db = InboundStore(store)
        self.metrics = InboundMetrics(registry)
        self.deliverer = Deliverer(settings=settings, store=store, inbound=self.db,
                                   signalwire=signalwire, notifier=notifier, cpu=cpu,
                                   metrics=self.metrics, clock=clock)
        self.webhook = InboundWebhook(settings, store, self.db, public_base_url,
                                      self.deliverer.wake, self.metrics, clock)
        self.reconciler = Reconciler(settings=settings, store=store, inbound=self.db,
                                     signalwire=signalwire, metrics=self.metrics,
                                     on_completion=self.deliverer.wake, clock=clock)

    def install(self, app: web.Application) -> None:
        """Add the webhook routes to the gateway's public HTTP app (before it starts)."""
        self.webhook.install(app)

    async def prepare(self) -> None:
        """Free the fax leases an earlier run left (SQLite: one gateway, so all of them; a
        shared database: this NODE_ID's), and note when inbound was first switched on (the
        reconciler never looks back before it)."""
        await self.store.run(self.db.release_all, not self.settings.shared)
        if self.settings.inbound.routes.enabled:
            await self.store.run(self.db.enabled_since, self.clock())

    async def start(self, run_background: bool = True) -> None:
        if run_background:
            await self.deliverer.start()
            await self.reconciler.start()

    async def stop(self, grace_s: float) -> None:
        await self.reconciler.stop()
        await self.deliverer.stop(grace_s)


SANDBOX_INFO = "sandbox.json"


def write_sandbox_info(settings: Settings, simulator_url: str, public_base_url: str) -> None:
    """Sandbox only: where the running simulator is and its throw-away credentials, so
    `faxgw receive-sample` (another process) can make it ring this gateway. Mode 0600."""
    import json

    from gateway.inbound.webhook import INBOUND_ROUTE
    from gateway.spool import write_durable

    info = {"simulator_url": simulator_url, "project_id": settings.signalwire.project_id,
            "api_token": settings.signalwire.api_token,
            "inbound_url": public_base_url + INBOUND_ROUTE,
            "outbox": str(settings.queue.data_dir / "outbox")}
    write_durable(settings.queue.data_dir / SANDBOX_INFO, json.dumps(info).encode(), 0o600)
