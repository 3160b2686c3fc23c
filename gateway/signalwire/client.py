"""SignalWire Compatibility API client for faxes: send, fetch, list (one aiohttp session).

The send call has no idempotency key, so errors are sorted by what they say about the fax:
`SendRefused` (a 4xx: the request can never work as it is), `SendRetryable` (429, 503 or a
connection that failed before the request left: nothing was sent) and `SendOutcomeUnknown`
(a timeout or lost response: the fax may exist, look it up before sending again).
"""

from __future__ import annotations

import base64
import email.utils
import logging
import re
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urljoin, urlsplit

import aiohttp
from yarl import URL

from gateway.constants import API_PATH, SIGNALWIRE_FILES_HOSTS
from gateway.signalwire import errors

_DEFAULT_PORTS = {"http": 80, "https": 443}

log = logging.getLogger(__name__)

class SignalWireError(Exception):
    def __init__(self, message: str, *, status: int | None = None, code: int | None = None,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.retry_after_s = retry_after_s

    @property
    def words(self) -> str:
        """The error in plain words, SignalWire's own message and code kept for the record."""
        plain = errors.words(self.code)
        detail = f"{self}" + (f" (code {self.code})" if self.code else "")
        return f"{plain}: {detail}" if plain else detail


class MediaRefused(SignalWireError):
    """A received fax's media URL the gateway will not fetch (a foreign host, too large)."""


class SendRefused(SignalWireError):
    """SignalWire answered and refused: resending the same request cannot help."""


class SendRetryable(SignalWireError):
    """Nothing was sent (429/503/connection refused): safe to send again after a delay."""


class SendOutcomeUnknown(SignalWireError):
    """The request may have reached SignalWire: look the fax up before any resend."""


@dataclass(frozen=True)
class Fax:
    sid: str
    status: str
    to: str | None
    from_: str | None
    num_pages: int | None
    duration_s: int | None
    error_code: str | None
    error_message: str | None
    date_created: datetime | None
    # Inbound faxes (the reconciler): which way the fax went and where its document is.
    direction: str | None = None
    media_url: str | None = None
    media_sid: str | None = None
    remote_station_id: str | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Fax:
        return cls(
            sid=str(data.get("sid") or ""),
            status=str(data.get("status") or ""),
            to=data.get("to"),
            from_=data.get("from"),
            num_pages=_int_or_none(data.get("num_pages")),
            duration_s=_int_or_none(data.get("duration")),
            error_code=None if data.get("error_code") in (None, "") else str(data["error_code"]),
            error_message=data.get("error_message") or None,
            date_created=_parse_date(data.get("date_created")),
            direction=data.get("direction") or None,
            media_url=data.get("media_url") or None,
            media_sid=data.get("media_sid") or None,
            remote_station_id=data.get("remote_station_id") or None,
        )


def _int_or_none(value: Any) -> int | None:
    try:
        return None if value in (None, "") else int(value)
    except (TypeError, ValueError):
        return None


def _parse_date(value: Any) -> datetime | None:
    if not value:
        return None
    try:
        return email.utils.parsedate_to_datetime(str(value))
    except (TypeError, ValueError):
        try:
            parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        except ValueError:
            return None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


FORM_HEADERS = {"Content-Type": "application/x-www-form-urlencoded"}
# A value of these characters (what URLs and numbers are made of) is escaped by str.replace;
# anything else by quote_plus. The order matters: "%" before the escapes bring their own, "+"
# before the spaces become "+".
_FORM_PLAIN = re.compile(r"[A-Za-z0-9_.~:/?=&%+ -]*")
_FORM_REPLACE = (("%", "%25"), ("+", "%2B"), (" ", "+"), (":", "%3A"), ("/", "%2F"),
                 ("?", "%3F"), ("=", "%3D"), ("&", "%26"))


def form_body(fields: dict[str, str]) -> bytes:
    """The fields as application/x-www-form-urlencoded, byte for byte what
    urllib.parse.urlencode writes (aiohttp's FormData calls it), without quote_plus's Python
    loop over every character of a value that needs any escaping: a send's media URL and
    callback URL are ~400 of them (~2% of the event loop's CPU per fax)."""
    return "&".join(f"{_form_quote(k)}={_form_quote(v)}"
                    for k, v in fields.items()).encode("ascii")


def _form_quote(text: str) -> str:
    if _FORM_PLAIN.fullmatch(text) is None:
        return urllib.parse.quote_plus(text, safe="")
    for char, escaped in _FORM_REPLACE:
        if char in text:
            text = text.replace(char, escaped)
    return text


def _retry_after(headers: Any) -> float | None:
    raw = headers.get("Retry-After") if headers else None
    if not raw:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(raw)
        except (TypeError, ValueError):
            return None
        return max(0.0, (when - datetime.now(UTC)).total_seconds())


class SignalWireClient:
    def __init__(self, *, space_url: str | Callable[[], str], project_id: str, api_token: str,
                 timeout_s: float) -> None:
        # A callable is resolved at start(): the sandbox simulator's port is known only then.
        self._space_url = space_url
        self._project_id = project_id
        self.base = ""
        self._faxes_url = URL()
        credentials = base64.b64encode(f"{project_id}:{api_token}".encode()).decode("ascii")
        self._headers = {"Authorization": f"Basic {credentials}"}
        self._timeout = aiohttp.ClientTimeout(total=timeout_s, connect=min(10.0, timeout_s))
        self._session: aiohttp.ClientSession | None = None
        # Media downloads: no default Authorization, so it is added only where allowed.
        self._media_session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        space = self._space_url() if callable(self._space_url) else self._space_url
        self.base = f"{space.rstrip('/')}{API_PATH}/Accounts/{self._project_id}"
        self._faxes_url = URL(f"{self.base}/Faxes")  # parsed once, not for every send
        self._session = aiohttp.ClientSession(headers=self._headers, timeout=self._timeout,
                                              raise_for_status=False)
        self._media_session = aiohttp.ClientSession(timeout=self._timeout,
                                                    raise_for_status=False)

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._media_session is not None:
            await self._media_session.close()
            self._media_session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "SignalWire client not started"
        return self._session

    async def send_fax(self, *, to: str, from_: str, media_url: str, quality: str, ttl_min: int,
                       status_callback: str) -> Fax:
        form = {"To": to, "From": from_, "MediaUrl": media_url, "Quality": quality,
                "Ttl": str(ttl_min), "StatusCallback": status_callback,
                "StatusCallbackMethod": "POST"}
        try:
            async with self.session.post(self._faxes_url, data=form_body(form),
                                         headers=FORM_HEADERS, allow_redirects=False) as resp:
                body = await _json_body(resp)
                if 200 <= resp.status < 300:
                    fax = Fax.from_json(body)
                    if not fax.sid:
                        raise SendOutcomeUnknown("SignalWire answered without a fax sid",
                                                 status=resp.status)
                    return fax
                code, message = _error_of(body, resp)
                if resp.status in (429, 503) or code == 20429:
                    raise SendRetryable(message, status=resp.status, code=code,
                                        retry_after_s=_retry_after(resp.headers))
                if resp.status >= 500:
                    # A 500 may come after the fax was queued: never resend blindly.
                    raise SendOutcomeUnknown(message, status=resp.status, code=code)
                raise SendRefused(message, status=resp.status, code=code)
        except aiohttp.ClientConnectorError as exc:
            # Failed to connect: the request never left, so sending again is safe.
            raise SendRetryable(f"cannot connect to SignalWire: {exc.os_error or exc}") from exc
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise SendOutcomeUnknown(f"no answer from SignalWire: {type(exc).__name__}") from exc

    async def cancel_fax(self, sid: str) -> Fax:
        """Cancel a fax that is still queued (SignalWire answers code 10000 otherwise)."""
        try:
            async with self.session.post(f"{self.base}/Faxes/{sid}", data={"Status": "canceled"},
                                         allow_redirects=False) as resp:
                body = await _json_body(resp)
                if 200 <= resp.status < 300:
                    return Fax.from_json(body)
                code, message = _error_of(body, resp)
                raise SignalWireError(message, status=resp.status, code=code)
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise SignalWireError(f"no answer from SignalWire: {type(exc).__name__}") from exc

    async def fetch_fax(self, sid: str) -> Fax:
        body = await self._get(f"{self.base}/Faxes/{sid}")
        return Fax.from_json(body)

    async def _listed(self, params: dict[str, str], created_after: datetime,
                      max_pages: int) -> list[Fax]:
        """The Faxes list call, following `next_page_uri` for at most `max_pages` pages;
        faxes created on or after `created_after` (the API filters by day only)."""
        params = {"PageSize": "50", **params,
                  "DateCreatedAfter": created_after.astimezone(UTC).strftime("%Y-%m-%d")}
        url: str | None = f"{self.base}/Faxes"
        query: dict[str, str] | None = params
        found: list[Fax] = []
        for _ in range(max_pages):
            if url is None:
                break
            body = await self._get(url, query)
            for item in body.get("faxes") or []:
                if not isinstance(item, dict):
                    continue
                fax = Fax.from_json(item)
                if fax.date_created is None or fax.date_created >= created_after:
                    found.append(fax)
            nxt = body.get("next_page_uri")
            url, query = (self._absolute(nxt), None) if nxt else (None, None)
        return found

    async def list_faxes(self, *, to: str, from_: str, created_after: datetime,
                         max_pages: int = 10) -> list[Fax]:
        """Faxes to `to` from `from_` created on or after `created_after` (all pages)."""
        return await self._listed({"To": to, "From": from_}, created_after, max_pages)

    async def list_received(self, *, to: str | None, created_after: datetime,
                            max_pages: int = 20) -> list[Fax]:
        """Inbound faxes (to `to`, or to any number of the project) created since then."""
        faxes = await self._listed({"To": to} if to else {}, created_after, max_pages)
        return [f for f in faxes if (f.direction or "").startswith("inbound")]

    def media_instance_url(self, sid: str, media_sid: str) -> str:
        return f"{self.base}/Faxes/{quote(sid, safe='')}/Media/{quote(media_sid, safe='')}"

    async def delete_media(self, sid: str, media_sid: str) -> int:
        """DELETE a fax's stored document: the HTTP status (204 gone, 404 already gone, 409
        still in progress). Raises SignalWireError for anything else."""
        url = self.media_instance_url(sid, media_sid)
        try:
            async with self.session.delete(url, allow_redirects=False) as resp:
                if resp.status in (200, 204, 404, 409):
                    return resp.status
                body = await _json_body(resp)
                code, message = _error_of(body, resp)
                raise SignalWireError(message, status=resp.status, code=code,
                                      retry_after_s=_retry_after(resp.headers))
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise SignalWireError(f"no answer from SignalWire: {type(exc).__name__}") from exc

    def credentials_allowed(self, url: str) -> bool:
        """May the project's credentials go to `url`? Only to the configured space (same
        scheme, host and port) and SignalWire's files host over https."""
        try:
            target, space = urlsplit(url), urlsplit(self.base)
            target_port, space_port = target.port, space.port
        except ValueError:
            return False
        host = (target.hostname or "").lower()
        if target.username is not None or target.password is not None:
            return False  # userinfo in a media URL: not something SignalWire sends
        if (target.scheme == space.scheme and host == (space.hostname or "").lower()
                and (target_port or _DEFAULT_PORTS.get(target.scheme))
                == (space_port or _DEFAULT_PORTS.get(space.scheme))):
            return True
        return (target.scheme == "https" and host in SIGNALWIRE_FILES_HOSTS
                and target_port in (None, 443))

    async def fetch_media(self, url: str, max_bytes: int) -> tuple[bytes, str | None]:
        """Download a received fax's document with the project's credentials as HTTP Basic
        (needed when "Protect Fax Media URLs" is on). Refuses any URL that is not SignalWire's
        own (`MediaRefused`); a redirect is followed without the credentials, at most 3 times.
        Returns (bytes, content type)."""
        if not self.credentials_allowed(url):
            raise MediaRefused("the media URL is not on SignalWire's hosts; credentials withheld")
        headers: dict[str, str] | None = dict(self._headers)
        assert self._media_session is not None, "SignalWire client not started"
        current = url
        try:
            for _hop in range(4):
                async with self._media_session.get(URL(current, encoded=True), headers=headers,
                                                   allow_redirects=False) as resp:
                    if resp.status in (301, 302, 303, 307, 308):
                        location = resp.headers.get("Location", "")
                        nxt = urljoin(current, location)
                        if not location or urlsplit(nxt).scheme not in ("http", "https"):
                            raise SignalWireError("media redirect without a usable Location",
                                                  status=resp.status)
                        current = nxt
                        headers = None  # never carry the credentials along a redirect
                        continue
                    if resp.status != 200:
                        raise SignalWireError(f"media download: HTTP {resp.status}",
                                              status=resp.status)
                    if (resp.content_length or 0) > max_bytes:
                        raise MediaRefused(f"media larger than {max_bytes} bytes")
                    body = bytearray()
                    async for chunk in resp.content.iter_chunked(64 * 1024):
                        body += chunk
                        if len(body) > max_bytes:
                            raise MediaRefused(f"media larger than {max_bytes} bytes")
                    return bytes(body), resp.headers.get("Content-Type")
            raise SignalWireError("media download: too many redirects")
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise SignalWireError(f"media download failed: {type(exc).__name__}") from exc

    def _absolute(self, uri: str) -> str:
        """next_page_uri is a path from the server's root (or a full URL)."""
        return urljoin(self.base, uri)

    async def _get(self, url: str, params: dict[str, str] | None = None) -> dict[str, Any]:
        try:
            async with self.session.get(url, params=params, allow_redirects=False) as resp:
                body = await _json_body(resp)
                if 200 <= resp.status < 300:
                    return body
                code, message = _error_of(body, resp)
                raise SignalWireError(message, status=resp.status, code=code,
                                      retry_after_s=_retry_after(resp.headers))
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise SignalWireError(f"no answer from SignalWire: {type(exc).__name__}") from exc


async def _json_body(resp: aiohttp.ClientResponse) -> dict[str, Any]:
    try:
        data = await resp.json(content_type=None)
    except (ValueError, aiohttp.ContentTypeError):
        return {}
    return data if isinstance(data, dict) else {}


def _error_of(body: dict[str, Any], resp: aiohttp.ClientResponse) -> tuple[int | None, str]:
    code = _int_or_none(body.get("code"))
    message = str(body.get("message") or f"HTTP {resp.status} {resp.reason or ''}".strip())
    return code, message[:500]
