"""The simulated SignalWire's engine: the state of one simulated project (`SimulatorState`:
its faxes, fault knobs, callback attempts) and how a sent fax runs (media fetched, outcome by
number, signed status callbacks). The HTTP API over it is gateway/sandbox/fax_api.py; the app
that mounts both is gateway/sandbox/simulator.py.
"""

from __future__ import annotations

import asyncio
import io
import logging
import re
from typing import Any, Final, TypeAlias
from urllib.parse import urlencode

import aiohttp
from aiohttp import web
from yarl import URL

from gateway.sandbox.fax_records import (
    CallbackAttempt,
    MediaFailure,
    MediaFetch,
    SimFax,
    redact_url,
)
from gateway.signalwire import errors
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

    def _next_outcome(self, fax: SimFax) -> tuple[str, str | None, str | None]:
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
