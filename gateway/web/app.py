"""The HTTP edge (aiohttp): SignalWire status callbacks, local media, health.

Paths carry secrets (callback tokens, media tokens), so aiohttp's access log is off and our own
log lines never include them.
"""

from __future__ import annotations

import logging
from typing import Awaitable, Callable

from aiohttp import web

from gateway.config import Settings
from gateway.constants import MAX_CALLBACK_BODY_BYTES
from gateway.outbound.states import CallbackAction
from gateway.signalwire.media import MEDIA_ROUTE, LocalMediaStore
from gateway.ops.metrics import Metrics, aiohttp_handler
from gateway.signalwire.signature import verify_signature
from gateway.store.base import Store, StoreError
from gateway.text import one_line

log = logging.getLogger(__name__)

CALLBACK_ROUTE = "/signalwire/status"
SANDBOX_PREFIX = "/sandbox/signalwire"
MAX_TOKEN_CHARS = 128


def _int(value: str | None) -> int | None:
    try:
        return None if value in (None, "") else int(str(value))
    except ValueError:
        return None


def _short(value: object, limit: int = 300) -> str | None:
    """A callback form field as one bounded line of text, or None when absent or empty."""
    if not isinstance(value, str):
        return None
    return one_line(value, limit) or None


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
        self.app.router.add_post(CALLBACK_ROUTE + "/{token}", self.status_callback)
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

    async def status_callback(self, request: web.Request) -> web.Response:
        """A job's status callback. With the job store not answering (an outage, a connection
        killed under it), 503: SignalWire tries the callback again, as for the inbound
        completion; the status poll finds a status whose callbacks all came in vain."""
        try:
            return await self._status_callback(request)
        except Exception as exc:
            if not (isinstance(exc, StoreError) or self.store.is_db_error(exc)):
                raise
            log.warning("status callback not recorded, answered 503 so SignalWire tries "
                        "again: the job store did not answer: %s: %s", type(exc).__name__,
                        one_line(str(exc), 200))
            raise web.HTTPServiceUnavailable(text="try later",
                                             headers={"Retry-After": "5"}) from None

    async def _status_callback(self, request: web.Request) -> web.Response:
        token = request.match_info["token"]
        if len(token) > MAX_TOKEN_CHARS:
            raise web.HTTPNotFound()
        job = await self.store.run(self.store.job_by_token, token)
        if job is None or not job.callback_url:
            log.warning("callback for an unknown job from %s: ignored", request.remote)
            raise web.HTTPNotFound()
        form = await request.post()
        params = [(k, v) for k, v in form.items() if isinstance(v, str)]
        signature = (request.headers.get("X-SignalWire-Signature")
                     or request.headers.get("X-Twilio-Signature"))
        if not verify_signature(self.s.signalwire.signing_key, job.callback_url, params,
                                signature):
            log.warning("job %s: callback with a %s signature from %s: refused", job.id,
                        "wrong" if signature else "missing", request.remote)
            await self.store.run(self.store.add_event, job.id, "callback-refused",
                                 f"bad signature from {request.remote}")
            self.metrics.callback_refused()
            raise web.HTTPForbidden(text="signature check failed")
        account = form.get("AccountSid")
        if account and account != self.s.signalwire.project_id:
            log.warning("job %s: signed callback for another account: refused", job.id)
            raise web.HTTPForbidden(text="wrong account")
        status = _short(form.get("FaxStatus"), 40)
        action = await self.store.run(
            lambda: self.store.record_status(
                job, _short(form.get("FaxSid"), 64), status,
                pages=_int(_short(form.get("NumPages"), 10)), duration_s=None,
                error_code=_short(form.get("ErrorCode"), 20),
                error_message=_short(form.get("ErrorMessage")), source="callback"))
        log.log(logging.INFO if action is CallbackAction.FINAL else logging.DEBUG,
                "job %s: callback status %s -> %s", job.id, status, action.value)
        if action is CallbackAction.FINAL:
            self.on_final()
        return web.Response(text="OK")

    async def media_file(self, request: web.Request) -> web.StreamResponse:
        assert self.media is not None
        token = request.match_info["token"]
        path = self.media.resolve_token(token) if len(token) <= 512 else None
        if path is None:
            raise web.HTTPNotFound(text="no such document, or the link has expired")
        log.info("media served to %s (%s)", request.remote, request.method)
        return web.FileResponse(path, headers={"Content-Type": "application/pdf",
                                               "Cache-Control": "no-store"})
