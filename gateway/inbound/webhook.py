"""The HTTP side of inbound faxes: SignalWire's "a fax comes in" webhook and the <Receive>
action callback.

The webhook answers from memory (the routes) within SignalWire's 5 seconds: LaML with
`<Receive>` for a routed number, `<Reject/>` for an unrouted number or a blocked caller. The
action callback is recorded durably before the 200, and delivery happens in the background.
Both must carry a valid signature over the exact URL SignalWire was given (403 otherwise, and
nothing is recorded). The action URL names no node, so any gateway sharing the database can
take the callback.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from xml.sax.saxutils import quoteattr

from aiohttp import web

from gateway.config import Settings
from gateway.inbound.counters import InboundMetrics
from gateway.mail.received import is_noise
from gateway.rules.inbound_routes import is_blocked
from gateway.signalwire.signature import SIGNATURE_HEADER, TWILIO_SIGNATURE_HEADER, verify_signature
from gateway.store.base import Store, StoreError
from gateway.store.inbound import REJECTED, RINGING, Completion, InboundStore

log = logging.getLogger(__name__)

INBOUND_ROUTE = "/signalwire/inbound"
ACTION_ROUTE = "/signalwire/inbound/done"
LAML_TYPE = "application/xml"
FINAL = ("received", "failed", "canceled")
# SignalWire waits 5 s for the answer: the database gets part of that, the answer never waits.
RECORD_CALL_TIMEOUT_S = 2.0


def _text(value: object, limit: int = 300) -> str | None:
    if not isinstance(value, str) or value == "":
        return None
    return "".join(c if c.isprintable() else " " for c in value)[:limit]


def _int(value: str | None) -> int | None:
    try:
        return None if value is None else max(0, int(value))
    except ValueError:
        return None


def laml_receive(action: str, page_size: str) -> str:
    return ('<?xml version="1.0" encoding="UTF-8"?>\n<Response><Receive action='
            f'{quoteattr(action)} method="POST" mediaType="application/pdf" '
            f'pageSize={quoteattr(page_size)}/></Response>')


LAML_REJECT = '<?xml version="1.0" encoding="UTF-8"?>\n<Response><Reject/></Response>'
LAML_EMPTY = '<?xml version="1.0" encoding="UTF-8"?>\n<Response></Response>'


def classify(settings: Settings, status: str, error_message: str | None, pages: int | None,
             to_number: str | None) -> tuple[str, tuple[str, ...]]:
    """(outcome, recipients) of a finished fax: received -> the routed addresses; a real
    failure -> them and the administrator; voice-call noise -> the administrator only;
    canceled (a <Reject/>, or the caller gave up before any page) -> nobody."""
    routed = settings.inbound.routes.recipients(to_number)
    admin = (settings.inbound.admin_address,) if settings.inbound.admin_address else ()
    if status == "received":
        return "received", routed
    if status == "canceled":
        return "canceled", ()
    if is_noise(status, error_message, pages):
        return "noise", admin
    return "failed", tuple(dict.fromkeys([*routed, *admin]))


class InboundWebhook:
    def __init__(self, settings: Settings, store: Store, inbound: InboundStore,
                 public_base_url: Callable[[], str], on_completion: Callable[[], None],
                 metrics: InboundMetrics, clock: Callable[[], float]) -> None:
        self.s = settings
        self.store = store
        self.inbound = inbound
        self.public_base_url = public_base_url
        self.on_completion = on_completion
        self.metrics = metrics
        self.clock = clock

    def install(self, app: web.Application) -> None:
        app.router.add_post(INBOUND_ROUTE, self.incoming)
        app.router.add_get(INBOUND_ROUTE, self.incoming)
        app.router.add_post(ACTION_ROUTE, self.completed)

    def action_url(self) -> str:
        return self.public_base_url() + ACTION_ROUTE

    async def _signed_form(self, request: web.Request, path: str) -> dict[str, str] | None:
        """The form if its signature is right; None (after logging and counting) if not."""
        if request.method == "GET":
            url = self.public_base_url() + path + (f"?{request.query_string}"
                                                   if request.query_string else "")
            pairs: list[tuple[str, str]] = []
            fields = {k: v for k, v in request.query.items()}
        else:
            url = self.public_base_url() + path
            form = await request.post()
            pairs = [(k, v) for k, v in form.items() if isinstance(v, str)]
            fields = {}
            for k, v in pairs:
                fields.setdefault(k, v)
        signature = (request.headers.get(SIGNATURE_HEADER)
                     or request.headers.get(TWILIO_SIGNATURE_HEADER))
        if not verify_signature(self.s.signalwire.signing_key, url, pairs, signature):
            log.warning("inbound %s with a %s signature from %s: refused", path,
                        "wrong" if signature else "missing", request.remote)
            self.metrics.signature_failures.inc()
            return None
        account = fields.get("AccountSid")
        if account and account != self.s.signalwire.project_id:
            log.warning("inbound %s signed but for another account: refused", path)
            self.metrics.signature_failures.inc()
            return None
        return fields

    async def incoming(self, request: web.Request) -> web.Response:
        fields = await self._signed_form(request, INBOUND_ROUTE)
        if fields is None:
            raise web.HTTPForbidden(text="signature check failed")
        sid = _text(fields.get("FaxSid"), 64)
        caller, to = _text(fields.get("From"), 100), _text(fields.get("To"), 100)
        recipients = self.s.inbound.routes.recipients(to)
        if is_blocked(caller, self.s.inbound.blocked_callers):
            decision, reason = "blocked", "caller on INBOUND_BLOCKED_CALLERS"
        elif not recipients:
            decision = "unrouted"
            reason = ("inbound is off (INBOUND_ROUTES unset)" if not self.s.inbound.routes.enabled
                      else "no route for this number")
        else:
            decision, reason = "receive", f"to {len(recipients)} address(es)"
        log.info("inbound fax %s from %s to %s: %s (%s)", sid or "-", caller or "-", to or "-",
                 "receive" if decision == "receive" else "reject", reason)
        if sid:
            state = RINGING if decision == "receive" else REJECTED
            outcome = None if decision == "receive" else decision
            try:
                await asyncio.wait_for(self.store.run(
                    self.inbound.record_call, sid, _text(fields.get("AccountSid"), 64), caller,
                    to, state, outcome, self.clock()), RECORD_CALL_TIMEOUT_S)
            except (TimeoutError, StoreError, OSError) as exc:
                # The answer matters more than the record: the completion records it again.
                log.warning("inbound fax %s: call not recorded: %s", sid, exc)
            except Exception as exc:  # sqlite3 errors: same reasoning
                log.warning("inbound fax %s: call not recorded: %s: %s", sid,
                            type(exc).__name__, exc)
        if decision != "receive":
            self.metrics.faxes.labels(decision).inc()
            return web.Response(text=LAML_REJECT, content_type=LAML_TYPE)
        return web.Response(text=laml_receive(self.action_url(), self.s.inbound.page_size),
                            content_type=LAML_TYPE)

    async def completed(self, request: web.Request) -> web.Response:
        fields = await self._signed_form(request, ACTION_ROUTE)
        if fields is None:
            raise web.HTTPForbidden(text="signature check failed")
        sid = _text(fields.get("FaxSid"), 64)
        status = (_text(fields.get("FaxStatus"), 40) or "").lower()
        if not sid:
            raise web.HTTPBadRequest(text="FaxSid missing")
        if status not in FINAL:
            log.debug("inbound fax %s: progress %s ignored", sid, status or "-")
            return web.Response(text=LAML_EMPTY, content_type=LAML_TYPE)
        to = _text(fields.get("To"), 100)
        pages = _int(_text(fields.get("NumPages"), 10))
        error_message = _text(fields.get("ErrorMessage"))
        outcome, recipients = classify(self.s, status, error_message, pages, to)
        completion = Completion(
            fax_sid=sid, account_sid=_text(fields.get("AccountSid"), 64),
            from_number=_text(fields.get("From"), 100), to_number=to, fax_status=status,
            outcome=outcome, num_pages=pages, media_url=_text(fields.get("MediaUrl"), 2000),
            media_sid=_text(fields.get("MediaSid"), 64),
            remote_station_id=_text(fields.get("RemoteStationId"), 60),
            error_code=_text(fields.get("ErrorCode"), 20), error_message=error_message,
            recipients=recipients, source="callback", completed_at=self.clock())
        try:
            new = await self.store.run(self.inbound.record_completion, completion, self.clock())
        except Exception as exc:  # the store is down: SignalWire's fallback, then reconciler
            log.error("inbound fax %s: completion not recorded: %s: %s", sid,
                      type(exc).__name__, exc)
            raise web.HTTPServiceUnavailable(text="try later") from None
        if new:
            if not recipients:  # finished now; otherwise counted when delivered or given up
                self.metrics.faxes.labels(outcome).inc()
            log.info("inbound fax %s: %s, %s page(s), for %d recipient(s)%s", sid, outcome,
                     pages if pages is not None else "-", len(recipients),
                     f": {error_message}" if error_message and outcome != "received" else "")
            if recipients:
                self.on_completion()
            elif outcome == "received":
                log.warning("inbound fax %s to %s: received, but the number has no route any "
                            "more: nobody mailed", sid, to or "-")
        else:
            log.info("inbound fax %s: repeated completion (%s) ignored", sid, status)
        return web.Response(text=LAML_EMPTY, content_type=LAML_TYPE)
