"""A SignalWire fax API simulator: the gateway's sandbox mode and the tests' fax provider.

It speaks the Compatibility API's fax endpoints over real HTTP and behaves like SignalWire
where the gateway depends on it (signalwire-fax-facts.md): form-encoded sends, Basic auth,
the error body shape, a real GET of MediaUrl with no redirects followed, PDF only, a signed
form-encoded status callback with 3 attempts and short timeouts. The fax outcome is chosen
by the destination number so every path of the gateway can be driven without a phone line:

    ...0000 busy   ...0001 no-answer   ...0002 failed "The call dropped prematurely"
    ...0003 failed "Far end cannot receive at the resolution of the image" unless
            Quality=standard   ...0004 failed "Timed out waiting for initial communication"
    anything else: delivered

`SimulatorState` (``app[SIM_STATE]``) records what happened and carries fault knobs.
Routes live under ``base_path`` so the simulator can run alone or inside the gateway's app
(`install_simulator`). Handlers close over their state rather than reading ``request.app``,
so mounting with ``add_subapp`` works as well.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import io
import logging
import operator
import os
import re
import signal
import sys
import uuid
from collections.abc import Callable
from typing import Any, Final, TypeAlias
from urllib.parse import urlencode

import aiohttp
from aiohttp import web
from yarl import URL

from gateway.constants import API_PATH, QUALITIES, TTL_MAX_MINUTES, TTL_MIN_MINUTES
from gateway.signalwire import errors
from gateway.sandbox.fax_records import (CallbackAttempt, MediaFailure, MediaFetch, SimFax,
                                         basic_credentials, is_http_url, parse_api_date,
                                         redact_url, utc_now)
from gateway.signalwire.signature import SIGNATURE_HEADER, compute_signature

log = logging.getLogger(__name__)

MEDIA_FETCH_TIMEOUT_S: Final = 20.0
MAX_MEDIA_BYTES: Final = 50 * 1024 * 1024
CALLBACK_CONNECT_TIMEOUT_S: Final = 2.0
CALLBACK_READ_TIMEOUT_S: Final = 5.0
CALLBACK_ATTEMPTS: Final = 3
DEFAULT_PAGE_SIZE: Final = 50
MAX_PAGE_SIZE: Final = 1000
SECONDS_PER_PAGE: Final = 30
MORE_INFO: Final = "https://developer.signalwire.com/compatibility-api/rest/overview#error-codes"

# Error codes from the gateway's one table (gateway/signalwire/errors.py). API errors carry a
# number; a fax's ErrorCode is text.
ERR_INVALID_PARAMETER: Final = errors.INVALID_PARAMETER  # sim: any other bad parameter
ERR_AUTH: Final = errors.AUTH
ERR_NOT_FOUND: Final = errors.NOT_FOUND
ERR_IN_PROGRESS: Final = errors.IN_PROGRESS
ERR_UNSUPPORTED_MEDIA_TYPE: Final = errors.UNSUPPORTED_MEDIA_TYPE  # sim: JSON or multipart body
ERR_TOO_MANY_REQUESTS: Final = errors.TOO_MANY_REQUESTS
ERR_FROM_NOT_OWNED: Final = errors.FROM_NOT_OWNED
ERR_BAD_TO: Final = errors.BAD_TO
ERR_BAD_FROM: Final = errors.BAD_FROM
ERR_FROM_REQUIRED: Final = errors.FROM_REQUIRED
ERR_TO_REQUIRED: Final = errors.TO_REQUIRED
ERR_BAD_CALLBACK_URL: Final = errors.BAD_CALLBACK_URL
ERR_BAD_MEDIA_URL: Final = errors.BAD_MEDIA_URL
ERR_NOT_CANCELABLE: Final = errors.NOT_CANCELABLE
ERR_CONTENT_TYPE: Final = str(errors.CONTENT_TYPE)
ERR_MEDIA_REDIRECT: Final = str(errors.MEDIA_REDIRECT)
ERR_MEDIA_DOWNLOAD: Final = str(errors.MEDIA_DOWNLOAD)
ERR_T30: Final = str(errors.T30)  # sim: SignalWire publishes no numbers for T.30 failures

MSG_RESOLUTION: Final = errors.T30_RESOLUTION
# Destination suffix -> (final status, error code, error message).
_OUTCOMES: Final[dict[str, tuple[str, str | None, str | None]]] = {
    "0000": ("busy", None, None),
    "0001": ("no-answer", None, None),
    "0002": ("failed", ERR_T30, errors.T30_DROPPED),
    "0003": ("failed", ERR_T30, MSG_RESOLUTION),
    "0004": ("failed", ERR_T30, errors.T30_NO_ANSWER),
}

_E164 = re.compile(r"\+[1-9][0-9]{1,14}")
_SIP_URI = re.compile(r"sips?:[^\s@]+@[^\s]+", re.IGNORECASE)

FailSpec: TypeAlias = tuple[int, dict[str, Any]] | tuple[int, dict[str, Any], dict[str, str]]


class SimulatorState:
    """What the simulator saw and did, plus knobs a test turns to inject faults.

    Records: ``send_requests`` (form fields of every authenticated, form-encoded send POST,
    rejected ones included), ``faxes`` (sid -> SimFax), ``callbacks`` (every attempt),
    ``media_fetches``. Knobs: ``fail_next_send``, ``drop_next_send_responses``,
    ``answer_after_callback``,
    ``suppress_callbacks``, ``media_head_first``, ``require_pdf_content_type``,
    ``from_numbers``, `hold_queue` / `release_queue`.
    """

    def __init__(self, *, project_id: str, signing_key: str, callback_delay_s: float,
                 callback_retry_delay_s: float) -> None:
        self.project_id = project_id
        self._signing_key = signing_key
        self.callback_delay_s = callback_delay_s
        self.callback_retry_delay_s = callback_retry_delay_s
        self.media_timeout_s = MEDIA_FETCH_TIMEOUT_S

        self.send_requests: list[dict[str, str]] = []
        self.faxes: dict[str, SimFax] = {}
        self.callbacks: list[CallbackAttempt] = []
        self.media_fetches: list[MediaFetch] = []

        # Each send POST pops one: (status, error body[, headers]); an empty body gets the
        # standard one, and a 429 without headers gets Retry-After: 1.
        self.fail_next_send: list[FailSpec] = []
        # Create the fax, then close the connection unanswered (a lost response).
        self.drop_next_send_responses = 0
        self.suppress_callbacks = False
        # Create the fax, then keep the response back until `release_hung()` (a send that hangs
        # past the client's timeout, or whose client is killed while waiting).
        self.hang_next_send = 0
        self._unhang = asyncio.Event()
        # Create the fax, and answer the send only once it has ended and its final status
        # callback has been delivered (a callback that overtakes the send's answer).
        self.answer_after_callback = 0
        # Per destination, the outcomes of its next faxes ("busy", "no-answer", "delivered",
        # "failed:<T.30 message>"); when a list runs out the number's usual outcome applies.
        self.outcome_overrides: dict[str, list[str]] = {}
        self._faxes_changed = asyncio.Condition()
        # Send a HEAD before the GET, as FreeSWITCH has been seen to; a non-2xx HEAD fails.
        self.media_head_first = False
        self.require_pdf_content_type = False
        # When set, a From outside it is refused with 21210 (not a number of this project).
        self.from_numbers: set[str] | None = None

        # Inbound faxes (gateway/sandbox/inbound_faxes.py), set by install_inbound.
        self.inbound: Any = None

        self._seq = 0
        self._queue_held = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        return f"SimulatorState(project_id={self.project_id!r}, faxes={len(self.faxes)})"

    # -- test controls -------------------------------------------------------------------

    def hold_queue(self) -> None:
        """Keep new faxes in "queued" (so they can be canceled) until `release_queue`."""
        self._queue_held = True

    def release_hung(self) -> None:
        self._unhang.set()

    async def wait_faxes(self, count: int, timeout: float = 10.0) -> None:
        """Return once at least `count` faxes have been created."""
        async with asyncio.timeout(timeout):
            async with self._faxes_changed:
                await self._faxes_changed.wait_for(lambda: len(self.faxes) >= count)

    async def _fax_created(self) -> None:
        async with self._faxes_changed:
            self._faxes_changed.notify_all()

    def _next_outcome(self, fax: "SimFax") -> tuple[str, str | None, str | None]:
        queued = self.outcome_overrides.get(fax.to)
        if queued:
            status, _, message = queued.pop(0).partition(":")
            if status == "failed":
                return status, ERR_T30, message or errors.T30_DROPPED
            return status, None, None
        return _outcome(fax.to, fax.quality)

    def release_queue(self) -> None:
        self._queue_held = False
        for fax in self.faxes.values():
            fax.released.set()

    async def wait_idle(self, timeout: float = 10.0) -> None:
        """Return once no fax is being processed or called back; held faxes count as busy."""
        async with asyncio.timeout(timeout):
            await self._idle.wait()

    async def wait_fax(self, sid: str, timeout: float = 10.0) -> SimFax:
        """Return the fax once its processing and callback delivery have ended."""
        fax = self.faxes[sid]
        async with asyncio.timeout(timeout):
            await fax.finished.wait()
        return fax

    def sign(self, url: str, params: dict[str, str]) -> str:
        """The signature SignalWire would put on a request to `url` (inbound webhooks)."""
        return compute_signature(self._signing_key, url, params)

    def callbacks_for(self, sid: str) -> list[CallbackAttempt]:
        return [attempt for attempt in self.callbacks if attempt.fax_sid == sid]

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession()

    async def stop(self) -> None:
        """Cancel unfinished fax work, then close the HTTP client."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
            log.info("simulator stopped with %d fax task(s) cancelled", len(tasks))
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _on_startup(self, _app: web.Application) -> None:
        await self.start()

    async def _on_cleanup(self, _app: web.Application) -> None:
        await self.stop()

    # -- fax processing ------------------------------------------------------------------

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _spawn(self, fax: SimFax) -> None:
        if not self._queue_held:
            fax.released.set()
        task = asyncio.get_running_loop().create_task(self._run(fax), name=f"sim-fax-{fax.sid}")
        self._tasks.add(task)
        self._idle.clear()
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not self._tasks:
            self._idle.set()

    async def _run(self, fax: SimFax) -> None:
        try:
            await fax.released.wait()
            if fax.status != "canceled":
                await self._transmit(fax)
            log.info("fax %s: %s pages=%s error=%s", fax.sid, fax.status, fax.num_pages,
                     fax.error_code)
            await self._deliver_callback(fax)
        except asyncio.CancelledError:
            raise
        except Exception:  # task boundary: a simulator bug must not hang waiters
            log.exception("fax %s: simulator task failed", fax.sid)
            if fax.status not in ("delivered", "busy", "no-answer", "failed", "canceled"):
                fax.set_status("failed", code="30001", message="Simulator internal error")
        finally:
            fax.finished.set()

    async def _transmit(self, fax: SimFax) -> None:
        fax.set_status("processing")
        try:
            pages = await self._fetch_media(fax)
        except MediaFailure as failure:
            fax.set_status("failed", code=failure.code, message=failure.message)
            return
        fax.set_status("sending")
        if self.callback_delay_s > 0:
            await asyncio.sleep(self.callback_delay_s)
        status, code, message = self._next_outcome(fax)
        fax.set_status(status, code=code, message=message)
        if status == "delivered":
            fax.num_pages = str(pages)
            fax.duration = SECONDS_PER_PAGE * pages
            fax.remote_station_id = fax.to
        else:
            fax.num_pages = "0"

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("simulator not started (its app's on_startup has not run)")
        return self._session

    async def _fetch_media(self, fax: SimFax) -> int:
        """GET the MediaUrl like SignalWire: 200 only, no redirects, a PDF; returns pages."""
        timeout = aiohttp.ClientTimeout(total=self.media_timeout_s)
        url = URL(fax.media_url, encoded=True)
        for method in ("HEAD", "GET") if self.media_head_first else ("GET",):
            record = MediaFetch(fax_sid=fax.sid, url=fax.media_url, method=method)
            self.media_fetches.append(record)
            try:
                body = await self._fetch_once(method, url, timeout, record)
                if method == "GET":
                    pages = await _check_pdf(body, record.content_type,
                                             self.require_pdf_content_type)
                    record.num_pages = pages
                    if fax.store_media:
                        fax.media_bytes = body
                    log.info("fax %s: media %s %s bytes=%d pages=%d", fax.sid,
                             redact_url(fax.media_url), record.status, len(body), pages)
                    return pages
            except MediaFailure as failure:
                record.error_code = failure.code
                record.error = record.error or failure.message
                log.info("fax %s: media %s %s: %s", fax.sid, method, redact_url(fax.media_url),
                         record.error)
                raise
        raise AssertionError("unreachable: the loop ends with a GET")

    async def _fetch_once(self, method: str, url: URL, timeout: aiohttp.ClientTimeout,
                          record: MediaFetch) -> bytes:
        try:
            async with self._client().request(method, url, allow_redirects=False,
                                              timeout=timeout) as resp:
                record.status = resp.status
                record.content_type = resp.headers.get("Content-Type")
                if 300 <= resp.status < 400:
                    raise MediaFailure(ERR_MEDIA_REDIRECT,
                                        "Media URL redirected: redirects are not followed")
                if not 200 <= resp.status < 300:
                    raise MediaFailure(ERR_MEDIA_DOWNLOAD, "Media could not be downloaded")
                if method == "HEAD":
                    return b""
                body = bytearray()
                async for chunk in resp.content.iter_chunked(64 * 1024):
                    body += chunk
                    if len(body) > MAX_MEDIA_BYTES:
                        raise MediaFailure(ERR_MEDIA_DOWNLOAD,
                                            "Media could not be downloaded: too large")
                record.size_bytes = len(body)
                return bytes(body)
        except (aiohttp.ClientError, TimeoutError) as exc:
            record.error = f"{type(exc).__name__}: {exc}"
            raise MediaFailure(ERR_MEDIA_DOWNLOAD, "Media could not be downloaded") from exc

    async def _deliver_callback(self, fax: SimFax) -> None:
        """POST the signed final status: 3 attempts, 2 s connect / 5 s read, then dropped."""
        if not fax.status_callback or self.suppress_callbacks:
            return
        params = fax.callback_params()
        signature = compute_signature(self._signing_key, fax.status_callback, params)
        headers = {"Content-Type": "application/x-www-form-urlencoded",
                   SIGNATURE_HEADER: signature}
        body = urlencode(params).encode("ascii")
        # encoded=True: send the URL byte for byte as registered, since it is what was signed.
        url = URL(fax.status_callback, encoded=True)
        timeout = aiohttp.ClientTimeout(total=None, connect=CALLBACK_CONNECT_TIMEOUT_S,
                                        sock_connect=CALLBACK_CONNECT_TIMEOUT_S,
                                        sock_read=CALLBACK_READ_TIMEOUT_S)
        for attempt in range(1, CALLBACK_ATTEMPTS + 1):
            record = CallbackAttempt(fax_sid=fax.sid, url=fax.status_callback,
                                     params=dict(params), signature=signature, attempt=attempt)
            self.callbacks.append(record)
            try:
                async with self._client().post(url, data=body, headers=headers,
                                               allow_redirects=False, timeout=timeout) as resp:
                    record.status = resp.status
                    await resp.content.read(64 * 1024)
            except (aiohttp.ClientError, TimeoutError) as exc:
                record.error = f"{type(exc).__name__}: {exc}"
            log.info("fax %s: callback %s attempt %d/%d -> %s", fax.sid,
                     redact_url(fax.status_callback), attempt, CALLBACK_ATTEMPTS,
                     record.status if record.status is not None else record.error)
            if record.ok:
                return
            if attempt < CALLBACK_ATTEMPTS and self.callback_retry_delay_s > 0:
                await asyncio.sleep(self.callback_retry_delay_s)
        log.warning("fax %s: callback dropped after %d attempts", fax.sid, CALLBACK_ATTEMPTS)


def _outcome(to: str, quality: str) -> tuple[str, str | None, str | None]:
    status, code, message = _OUTCOMES.get(to[-4:], ("delivered", None, None))
    if message == MSG_RESOLUTION and quality == "standard":
        return "delivered", None, None
    return status, code, message


def _count_pages(body: bytes) -> int:
    from pypdf import PdfReader

    return len(PdfReader(io.BytesIO(body)).pages)


async def _check_pdf(body: bytes, content_type: str | None, strict_type: bool) -> int:
    """Pages of a PDF body; anything else is 12300, as SignalWire sends PDF only."""
    media_type = (content_type or "").split(";")[0].strip().lower()
    if strict_type and media_type != "application/pdf":
        raise MediaFailure(ERR_CONTENT_TYPE, "Invalid content type")
    if not body.startswith(b"%PDF-"):
        raise MediaFailure(ERR_CONTENT_TYPE, "Invalid content type")
    try:
        pages = await asyncio.to_thread(_count_pages, body)
    except Exception as exc:  # pypdf raises many types on a broken file
        raise MediaFailure(ERR_CONTENT_TYPE, "Invalid content type: unreadable PDF") from exc
    if pages < 1:
        raise MediaFailure(ERR_CONTENT_TYPE, "Invalid content type: PDF without pages")
    return pages


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


class _Api:
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


def _normalise_base_path(base_path: str) -> str:
    base = base_path.strip().rstrip("/")
    if base and not base.startswith("/"):
        base = "/" + base
    return base


def install_simulator(app: web.Application, *, project_id: str, api_token: str,
                      signing_key: str, callback_delay_s: float = 0.2, base_path: str = "",
                      callback_retry_delay_s: float = 0.5) -> SimulatorState:
    """Add the simulator's routes under ``base_path`` to an existing (unfrozen) app.

    The state is stored at ``app[SIM_STATE]`` and returned; its HTTP client opens on the
    app's startup and its fax tasks are cancelled on the app's cleanup.
    """
    state = SimulatorState(project_id=project_id, signing_key=signing_key,
                           callback_delay_s=callback_delay_s,
                           callback_retry_delay_s=callback_retry_delay_s)
    api = _Api(state, api_token)
    faxes = f"{_normalise_base_path(base_path)}{API_PATH}/Accounts/{{project}}/Faxes"
    app.router.add_post(faxes, api.create)
    app.router.add_get(faxes, api.list_faxes)
    app.router.add_get(faxes + "/{sid}", api.fetch)
    app.router.add_post(faxes + "/{sid}", api.update)
    app.router.add_delete(faxes + "/{sid}", api.delete)
    app.router.add_get(faxes + "/{sid}/Media/{media_sid}", api.media)
    app.router.add_delete(faxes + "/{sid}/Media/{media_sid}", api.media)
    from gateway.sandbox.inbound_faxes import install_inbound

    install_inbound(app, state, api, _normalise_base_path(base_path))
    app[SIM_STATE] = state
    app.on_startup.append(state._on_startup)
    app.on_cleanup.append(state._on_cleanup)
    return state


def create_simulator_app(*, project_id: str, api_token: str, signing_key: str,
                         callback_delay_s: float = 0.2, base_path: str = "",
                         callback_retry_delay_s: float = 0.5) -> web.Application:
    """A standalone simulator app; its state is ``app[SIM_STATE]``."""
    app = web.Application()
    install_simulator(app, project_id=project_id, api_token=api_token,
                      signing_key=signing_key, callback_delay_s=callback_delay_s,
                      base_path=base_path, callback_retry_delay_s=callback_retry_delay_s)
    return app


SIM_STATE: Final = web.AppKey("faxgw_simulator_state", SimulatorState)


def _bound_url(runner: web.AppRunner, base_path: str) -> str:
    host, port = runner.addresses[0][:2]
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}{_normalise_base_path(base_path)}"


async def run_standalone(host: str = "127.0.0.1", port: int = 0, *,
                         on_ready: Callable[[str], None] | None = None,
                         stop: asyncio.Event | None = None, **kwargs: Any) -> None:
    """Serve the simulator until ``stop`` is set or the task is cancelled.

    ``on_ready`` gets the base URL (the equivalent of ``https://SPACE.signalwire.com``, plus
    ``base_path``) once the socket is bound; by default it is printed on one line of stdout.
    ``kwargs`` go to `create_simulator_app`.
    """
    app = create_simulator_app(**kwargs)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        url = _bound_url(runner, kwargs.get("base_path", ""))
        log.info("simulator listening on %s", url)
        if on_ready is None:
            print(url, flush=True)
        else:
            on_ready(url)
        await (stop or asyncio.Event()).wait()
    finally:
        await runner.cleanup()


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m gateway.sandbox.simulator",
        description="SignalWire fax API simulator; prints its base URL once listening.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--project-id", default=os.environ.get("SIM_PROJECT_ID"))
    parser.add_argument("--api-token", default=os.environ.get("SIM_API_TOKEN"),
                        help="or SIM_API_TOKEN (keeps it out of the process list)")
    parser.add_argument("--signing-key", default=os.environ.get("SIM_SIGNING_KEY"),
                        help="or SIM_SIGNING_KEY")
    parser.add_argument("--callback-delay-s", type=float, default=0.2)
    parser.add_argument("--callback-retry-delay-s", type=float, default=0.5)
    parser.add_argument("--base-path", default="")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    missing = [name for name in ("project_id", "api_token", "signing_key")
               if not getattr(args, name)]
    if missing:
        parser.error("missing: " + ", ".join("--" + m.replace("_", "-") for m in missing))
    return args


async def _amain(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await run_standalone(args.host, args.port, stop=stop, project_id=args.project_id,
                         api_token=args.api_token, signing_key=args.signing_key,
                         callback_delay_s=args.callback_delay_s,
                         callback_retry_delay_s=args.callback_retry_delay_s,
                         base_path=args.base_path)


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(_amain(args))


if __name__ == "__main__":
    main()
