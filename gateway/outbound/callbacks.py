"""SignalWire's status callbacks for sent faxes: the signed POST that tells a job its fax's
status, checked (token, signature, account) and recorded through the job's state machine.

The outbound direction's counterpart of gateway/inbound/webhook.py; gateway/web/http_listener.py
mounts it at CALLBACK_ROUTE. Paths carry the job's callback token, so no log line names them.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

from aiohttp import web

from gateway.config import Settings
from gateway.jobs.outbound_states import CallbackAction
from gateway.runtime.metrics import Metrics
from gateway.sanitise import one_line
from gateway.signalwire.signature import verify_signature
from gateway.store.base import Store, StoreError
from gateway.store.rows import Job

log = logging.getLogger(__name__)

CALLBACK_ROUTE = "/signalwire/status"
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


class StatusCallbacks:
    def __init__(self, settings: Settings, store: Store, metrics: Metrics,
                 on_final: Callable[[], None]) -> None:
        self.s = settings
        self.store = store
        self.metrics = metrics
        self.on_final = on_final

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
        form = await request.post()
        params = [(k, v) for k, v in form.items() if isinstance(v, str)]
        signature = (request.headers.get("X-SignalWire-Signature")
                     or request.headers.get("X-Twilio-Signature"))
        account = form.get("AccountSid")
        refused: list[str] = []

        def accept(job: Job) -> bool:
            """On the store's thread, before anything is recorded: the signature, made with
            the job's own callback URL, and the account."""
            assert job.callback_url is not None
            refused.clear()
            if not verify_signature(self.s.signalwire.signing_key, job.callback_url, params,
                                    signature):
                refused.append("signature")
            elif account and account != self.s.signalwire.project_id:
                refused.append("account")
            return not refused

        status = _short(form.get("FaxStatus"), 40)
        record = functools.partial(
            self.store.record_callback, token, accept, _short(form.get("FaxSid"), 64), status,
            pages=_int(_short(form.get("NumPages"), 10)),
            error_code=_short(form.get("ErrorCode"), 20),
            error_message=_short(form.get("ErrorMessage")))
        # The lookup, the checks and the record in one store call (one transaction).
        job, action = await self.store.run(record)
        if job is None:
            log.warning("callback for an unknown job from %s: ignored", request.remote)
            raise web.HTTPNotFound()
        if refused == ["signature"]:
            log.warning("job %s: callback with a %s signature from %s: refused", job.id,
                        "wrong" if signature else "missing", request.remote)
            await self.store.run(self.store.add_event, job.id, "callback-refused",
                                 f"bad signature from {request.remote}")
            self.metrics.callback_refused()
            raise web.HTTPForbidden(text="signature check failed")
        if refused:
            log.warning("job %s: signed callback for another account: refused", job.id)
            raise web.HTTPForbidden(text="wrong account")
        assert action is not None
        log.log(logging.INFO if action is CallbackAction.FINAL else logging.DEBUG,
                "job %s: callback status %s -> %s", job.id, status, action.value)
        if action is CallbackAction.FINAL:
            self.on_final()
        return web.Response(text="OK")
