"""SignalWire Compatibility API client for faxes: send, fetch, list (one aiohttp session).

The send call has no idempotency key, so errors are sorted by what they say about the fax:
`SendRefused` (a 4xx: the request can never work as it is), `SendRetryable` (429, 503 or a
connection that failed before the request left: nothing was sent) and `SendOutcomeUnknown`
(a timeout or lost response: the fax may exist, look it up before sending again).
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable
from urllib.parse import urljoin

import aiohttp

from gateway.constants import API_PATH
from gateway.signalwire import errors

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

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Fax":
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
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


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
        return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


class SignalWireClient:
    def __init__(self, *, space_url: str | Callable[[], str], project_id: str, api_token: str,
                 timeout_s: float) -> None:
        # A callable is resolved at start(): the sandbox simulator's port is known only then.
        self._space_url = space_url
        self._project_id = project_id
        self.base = ""
        credentials = base64.b64encode(f"{project_id}:{api_token}".encode()).decode("ascii")
        self._headers = {"Authorization": f"Basic {credentials}"}
        self._timeout = aiohttp.ClientTimeout(total=timeout_s, connect=min(10.0, timeout_s))
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        space = self._space_url() if callable(self._space_url) else self._space_url
        self.base = f"{space.rstrip('/')}{API_PATH}/Accounts/{self._project_id}"
        self._session = aiohttp.ClientSession(headers=self._headers, timeout=self._timeout,
                                              raise_for_status=False)

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

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
            async with self.session.post(f"{self.base}/Faxes", data=form,
                                         allow_redirects=False) as resp:
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
        except (asyncio.TimeoutError, aiohttp.ClientError) as exc:
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
        except (asyncio.TimeoutError, aiohttp.ClientError) as exc:
            raise SignalWireError(f"no answer from SignalWire: {type(exc).__name__}") from exc

    async def fetch_fax(self, sid: str) -> Fax:
        body = await self._get(f"{self.base}/Faxes/{sid}")
        return Fax.from_json(body)

    async def list_faxes(self, *, to: str, from_: str, created_after: datetime,
                         max_pages: int = 10) -> list[Fax]:
        """Faxes to `to` from `from_` created on or after `created_after` (all pages)."""
        params: dict[str, str] | None = {
            "To": to, "From": from_, "PageSize": "50",
            "DateCreatedAfter": created_after.astimezone(timezone.utc).strftime("%Y-%m-%d"),
        }
        url: str | None = f"{self.base}/Faxes"
        found: list[Fax] = []
        for _ in range(max_pages):
            if url is None:
                break
            body = await self._get(url, params)
            for item in body.get("faxes") or []:
                fax = Fax.from_json(item)
                if fax.date_created is None or fax.date_created >= created_after:
                    found.append(fax)
            nxt = body.get("next_page_uri")
            url, params = (self._absolute(nxt), None) if nxt else (None, None)
        return found

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
        except (asyncio.TimeoutError, aiohttp.ClientError) as exc:
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
