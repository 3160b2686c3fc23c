"""The simulated SignalWire's HTTP API: the Compatibility API's fax endpoints (send, list,
fetch, update, delete, media) with SignalWire's parameter checks, error bodies and paging, and
the failures a test can inject. Bound to one `SimulatorState` (gateway/sandbox/fax_engine.py).
"""

from __future__ import annotations

import hmac
import logging
import operator
import uuid
from urllib.parse import urlencode

from aiohttp import web

from gateway.constants import QUALITIES, TTL_MAX_MINUTES, TTL_MIN_MINUTES
from gateway.sandbox.fax_engine import (
    _E164,
    _SIP_URI,
    DEFAULT_PAGE_SIZE,
    ERR_AUTH,
    ERR_BAD_CALLBACK_URL,
    ERR_BAD_FROM,
    ERR_BAD_MEDIA_URL,
    ERR_BAD_TO,
    ERR_FROM_NOT_OWNED,
    ERR_FROM_REQUIRED,
    ERR_IN_PROGRESS,
    ERR_INVALID_PARAMETER,
    ERR_NOT_CANCELABLE,
    ERR_NOT_FOUND,
    ERR_TO_REQUIRED,
    ERR_UNSUPPORTED_MEDIA_TYPE,
    MAX_PAGE_SIZE,
    MORE_INFO,
    FailSpec,
    SimulatorState,
)
from gateway.sandbox.fax_records import (
    SimFax,
    basic_credentials,
    is_http_url,
    parse_api_date,
    redact_url,
    utc_now,
)

log = logging.getLogger(__name__)


def _error(status: int, code: int, message: str,
           headers: dict[str, str] | None = None) -> web.Response:
    body = {"code": code, "message": message, "more_info": MORE_INFO, "status": status}
    return web.json_response(body, status=status, headers=headers)


def _validate_send(fields: dict[str, str],
                   from_numbers: set[str] | None) -> web.Response | None:
    """The send call's parameter checks, in the order SignalWire reports them."""
    media_url = fields.get("MediaUrl", "")
    to = fields.get("To", "")
    from_ = fields.get("From", "")
    if not to:
        return _error(400, ERR_TO_REQUIRED, "A 'To' phone number is required.")
    if not (_E164.fullmatch(to) or _SIP_URI.fullmatch(to)):
        return _error(400, ERR_BAD_TO, "Invalid 'To' Phone Number")
    if not from_:
        return _error(400, ERR_FROM_REQUIRED, "A 'From' phone number is required.")
    if not _E164.fullmatch(from_):
        return _error(400, ERR_BAD_FROM, "'From' phone number is not a valid E.164 number")
    if from_numbers is not None and from_ not in from_numbers:
        return _error(400, ERR_FROM_NOT_OWNED,
                      "'From' phone number is not a number of this project")
    if not media_url:
        return _error(400, ERR_BAD_MEDIA_URL, "'MediaUrl' is required")
    if not is_http_url(media_url):
        return _error(400, ERR_BAD_MEDIA_URL, "Invalid media URL")
    if fields.get("Quality", "fine") not in QUALITIES:
        return _error(400, ERR_INVALID_PARAMETER,
                      "Invalid 'Quality': use standard, fine or superfine")
    if "Ttl" in fields:
        try:
            ttl = int(fields["Ttl"])
        except ValueError:
            ttl = -1
        if not TTL_MIN_MINUTES <= ttl <= TTL_MAX_MINUTES:
            return _error(400, ERR_INVALID_PARAMETER,
                          f"Invalid 'Ttl': minutes {TTL_MIN_MINUTES}..{TTL_MAX_MINUTES}")
    callback = fields.get("StatusCallback")
    if callback is not None and not is_http_url(callback):
        return _error(400, ERR_BAD_CALLBACK_URL, "Invalid 'StatusCallback' URL")
    if fields.get("StatusCallbackMethod", "POST").upper() != "POST":
        return _error(400, ERR_INVALID_PARAMETER,
                      "The simulator supports StatusCallbackMethod=POST only")
    return None


def _injected_failure(spec: FailSpec) -> web.Response:
    status, body = spec[0], dict(spec[1])
    headers = dict(spec[2]) if len(spec) > 2 else {}
    if status == 429 and not headers:
        headers = {"Retry-After": "1"}
    if not body:
        code = 20000 + status  # 20429, 20500, 20503: Twilio's HTTP-status codes
        body = {"code": code, "message": f"Injected failure {status}",
                "more_info": MORE_INFO, "status": status}
    return web.json_response(body, status=status, headers=headers)


def _page_query(filters: list[tuple[str, str]], size: int, page: int,
                token: str | None = None) -> str:
    query = [*filters, ("PageSize", str(size)), ("Page", str(page))]
    if token:
        query.append(("PageToken", token))
    return urlencode(query)


class FaxApi:
    """The HTTP handlers, bound to one state and one set of credentials."""

    def __init__(self, state: SimulatorState, api_token: str) -> None:
        self.state = state
        self._user = state.project_id.encode("utf-8")
        self._password = api_token.encode("utf-8")

    def _guard(self, request: web.Request) -> web.Response | None:
        """Basic auth, then the project in the path: 401 before 404, as the API does."""
        user, password = basic_credentials(request.headers.get("Authorization", ""))
        user_ok = hmac.compare_digest(user, self._user)
        password_ok = hmac.compare_digest(password, self._password)
        if not (user_ok and password_ok):
            return _error(401, ERR_AUTH, "Authentication Error - invalid username",
                          headers={"WWW-Authenticate": 'Basic realm="SignalWire"'})
        if request.match_info["project"] != self.state.project_id:
            return self._not_found(request)
        return None

    @staticmethod
    def _not_found(request: web.Request) -> web.Response:
        return _error(404, ERR_NOT_FOUND,
                      f"The requested resource {request.path} was not found")

    @staticmethod
    def _form_only(request: web.Request) -> web.Response | None:
        if request.content_type != "application/x-www-form-urlencoded":
            return _error(415, ERR_UNSUPPORTED_MEDIA_TYPE,
                          "Unsupported Media Type: send application/x-www-form-urlencoded")
        return None

    def _fax(self, request: web.Request) -> SimFax | None:
        return self.state.faxes.get(request.match_info["sid"])

    async def create(self, request: web.Request) -> web.StreamResponse:
        if (denied := self._guard(request) or self._form_only(request)) is not None:
            return denied
        fields: dict[str, str] = {}
        for name, value in (await request.post()).items():
            fields.setdefault(name, str(value))
        state = self.state
        state.send_requests.append(fields)
        if state.fail_next_send:
            spec = state.fail_next_send.pop(0)
            log.info("send: injected failure %d", spec[0])
            return _injected_failure(spec)
        if (problem := _validate_send(fields, state.from_numbers)) is not None:
            return problem
        now = utc_now()
        sid = str(uuid.uuid4())
        fax = SimFax(
            sid=sid, seq=state._next_seq(), account_sid=state.project_id,
            to=fields["To"], from_=fields["From"], media_url=fields["MediaUrl"],
            quality=fields.get("Quality", "fine"), ttl_min=int(fields.get("Ttl", "60")),
            status_callback=fields.get("StatusCallback"),
            store_media=fields.get("StoreMedia", "true").lower() != "false",
            uri=f"{request.path.rstrip('/')}/{sid}",
            media_base_url=str(request.url.origin()),
            date_created=now, date_updated=now,
        )
        state.faxes[sid] = fax
        state._spawn(fax)
        log.info("fax %s: queued to=%s media=%s callback=%s", sid, fax.to,
                 redact_url(fax.media_url),
                 redact_url(fax.status_callback) if fax.status_callback else "-")
        await state._fax_created()
        if state.drop_next_send_responses > 0:
            state.drop_next_send_responses -= 1
            return await _drop_connection(request)
        if state.hang_next_send > 0:
            state.hang_next_send -= 1
            await state._unhang.wait()
        if state.answer_after_callback > 0:
            state.answer_after_callback -= 1
            await fax.finished.wait()
            return web.json_response({**fax.resource(), "status": "queued"}, status=201)
        return web.json_response(fax.resource(), status=201)

    async def fetch(self, request: web.Request) -> web.Response:
        if (denied := self._guard(request)) is not None:
            return denied
        if (fax := self._fax(request)) is None:
            return self._not_found(request)
        return web.json_response(fax.resource())

    async def update(self, request: web.Request) -> web.Response:
        """``Status=canceled`` while queued; SignalWire refuses it later with code 10000."""
        if (denied := self._guard(request) or self._form_only(request)) is not None:
            return denied
        if (fax := self._fax(request)) is None:
            return self._not_found(request)
        form = await request.post()
        if form.get("Status") != "canceled":
            return _error(400, ERR_INVALID_PARAMETER, "'Status' must be 'canceled'")
        if fax.status != "queued":
            return _error(400, ERR_NOT_CANCELABLE,
                          f"Fax cannot be canceled: its status is {fax.status}")
        fax.set_status("canceled")
        fax.released.set()
        log.info("fax %s: canceled", fax.sid)
        return web.json_response(fax.resource())

    async def delete(self, request: web.Request) -> web.Response:
        if (denied := self._guard(request)) is not None:
            return denied
        if (fax := self._fax(request)) is None:
            return self._not_found(request)
        if fax.status in ("queued", "processing", "sending"):
            return _error(409, ERR_IN_PROGRESS, "Fax is in progress and cannot be deleted")
        del self.state.faxes[fax.sid]
        return web.Response(status=204)

    async def media(self, request: web.Request) -> web.Response:
        """The stored copy of the sent document (GET) or its removal (DELETE)."""
        if (denied := self._guard(request)) is not None:
            return denied
        fax = self._fax(request)
        if (fax is None or fax.media_bytes is None
                or request.match_info["media_sid"] != fax.media_sid):
            return self._not_found(request)
        if request.method == "DELETE":
            inbound = self.state.inbound
            busy = inbound is not None and inbound.delete_conflicts > 0
            if busy or fax.status in ("queued", "processing", "sending", "receiving"):
                if busy:
                    inbound.delete_conflicts -= 1
                return _error(409, ERR_IN_PROGRESS, "Fax is in progress: media cannot be deleted")
            fax.media_bytes = None
            if self.state.inbound is not None:
                self.state.inbound.media_deletes.append(fax.sid)
            return web.Response(status=204)
        return web.Response(body=fax.media_bytes, content_type="application/pdf")

    async def list_faxes(self, request: web.Request) -> web.Response:
        """Newest first; ``PageToken=PA<sid>`` continues after that fax, as Twilio's does."""
        if (denied := self._guard(request)) is not None:
            return denied
        query = request.query
        filters: list[tuple[str, str]] = []
        faxes = sorted(self.state.faxes.values(),
                       key=lambda f: (f.date_created, f.seq), reverse=True)
        for name, attr in (("To", "to"), ("From", "from_")):
            if name in query:
                filters.append((name, query[name]))
                faxes = [f for f in faxes if getattr(f, attr) == query[name]]
        for name, keep in (("DateCreatedAfter", operator.ge),
                           ("DateCreatedOnOrBefore", operator.le)):
            if name in query:
                try:
                    bound = parse_api_date(query[name])
                except ValueError:
                    return _error(400, ERR_INVALID_PARAMETER, f"Invalid '{name}' date")
                filters.append((name, query[name]))
                faxes = [f for f in faxes if keep(f.date_created, bound)]
        try:
            size = int(query.get("PageSize", DEFAULT_PAGE_SIZE))
            page = int(query.get("Page", 0))
        except ValueError:
            return _error(400, ERR_INVALID_PARAMETER, "Invalid 'PageSize' or 'Page'")
        if not 1 <= size <= MAX_PAGE_SIZE or page < 0:
            return _error(400, ERR_INVALID_PARAMETER, f"'PageSize' must be 1..{MAX_PAGE_SIZE}")
        start = page * size
        token = query.get("PageToken", "")
        if token.startswith("PA"):
            after = [i for i, f in enumerate(faxes) if f.sid == token[2:]]
            if after:
                start = after[0] + 1
        chunk = faxes[start:start + size]
        path = request.path
        next_uri = None
        if start + size < len(faxes) and chunk:
            next_uri = f"{path}?{_page_query(filters, size, page + 1, 'PA' + chunk[-1].sid)}"
        return web.json_response({
            "faxes": [f.resource() for f in chunk],
            "page": page,
            "page_size": size,
            "start": start,
            "end": start + max(len(chunk) - 1, 0),
            "uri": request.path_qs,
            "first_page_uri": f"{path}?{_page_query(filters, size, 0)}",
            "previous_page_uri": (f"{path}?{_page_query(filters, size, page - 1)}"
                                  if page > 0 else None),
            "next_page_uri": next_uri,
        })


async def _drop_connection(request: web.Request) -> web.StreamResponse:
    """Close the socket without a response, so the client sees a lost answer."""
    if request.transport is not None:
        request.transport.abort()
    response = web.StreamResponse()
    response.force_close()
    return response
