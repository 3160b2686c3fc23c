"""The HTTP edge (aiohttp): SignalWire status callbacks (gateway/outbound/callbacks.py), local
media, health, metrics.

Paths carry secrets (callback tokens, media tokens), so aiohttp's access log is off and our own
log lines never include them.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from gateway.config import Settings
from gateway.constants import MAX_CALLBACK_BODY_BYTES
from gateway.media_store import MEDIA_ROUTE, LocalMediaStore
from gateway.outbound.callbacks import CALLBACK_ROUTE, StatusCallbacks
from gateway.runtime.metrics import Metrics, aiohttp_handler
from gateway.store.base import Store

log = logging.getLogger(__name__)

SANDBOX_PREFIX = "/sandbox/signalwire"


class WebApp:
    def __init__(self, settings: Settings, store: Store, on_final: Callable[[], None],
                 media: LocalMediaStore | None, metrics: Metrics | None = None) -> None:
        self.s = settings
        self.store = store
        self.on_final = on_final
        self.media = media
        self.metrics = metrics or Metrics(process=False)
        self.app = web.Application(client_max_size=MAX_CALLBACK_BODY_BYTES)
        self.app.router.add_get("/healthz", self.healthz)
        self.app.router.add_get("/readyz", self.readyz)
        self.app.router.add_get("/metrics", aiohttp_handler(self.metrics, store,
                                                            token=settings.http.metrics_token))
        self.ready_checks: list[Callable[[], Awaitable[tuple[str, bool, str]]]] = []
        self.callbacks = StatusCallbacks(settings, store, self.metrics, on_final)
        self.app.router.add_post(CALLBACK_ROUTE + "/{token}", self.callbacks.status_callback)
        if media is not None:
            self.app.router.add_get(MEDIA_ROUTE + "/{token}", self.media_file)  # HEAD too
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self.port = 0

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False,
                                     shutdown_timeout=5)
        await self._runner.setup()
        listen = self.s.http.listen
        self._site = web.TCPSite(self._runner, listen.host, listen.port)
        await self._site.start()
        # The bound port (HTTP_LISTEN may ask for port 0), from aiohttp's public API.
        self.port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def healthz(self, request: web.Request) -> web.Response:
        """Liveness: the event loop answers."""
        return web.json_response({"status": "ok"})

    async def ready_status(self) -> dict[str, dict[str, object]]:
        """Every readiness check by name, {"ok": bool, "detail": str}; shared by /readyz and
        the dashboard's health panel, so both say the same thing."""
        checks: dict[str, dict[str, object]] = {}
        for check in self.ready_checks:
            name, ok, detail = await check()
            checks[name] = {"ok": ok, "detail": detail}
        return checks

    async def readyz(self, request: web.Request) -> web.Response:
        """Readiness: every check (store writable, listeners bound, last contact with S3 and
        SignalWire) with its state; 503 when one fails."""
        checks = await self.ready_status()
        ready = all(c["ok"] for c in checks.values())
        return web.json_response({"status": "ready" if ready else "not ready",
                                  "checks": checks}, status=200 if ready else 503)

    async def media_file(self, request: web.Request) -> web.StreamResponse:
        assert self.media is not None
        token = request.match_info["token"]
        path = self.media.resolve_token(token) if len(token) <= 512 else None
        if path is None:
            raise web.HTTPNotFound(text="no such document, or the link has expired")
        log.info("media served to %s (%s)", request.remote, request.method)
        return web.FileResponse(path, headers={"Content-Type": "application/pdf",
                                               "Cache-Control": "no-store"})
