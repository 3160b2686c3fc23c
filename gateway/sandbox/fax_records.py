"""What the SignalWire simulator keeps about each fax (`SimFax`, its media fetches and callback
attempts) and the small helpers both of its directions use: sending (gateway/sandbox/fax_api.py
and fax_engine.py) and the faxes that come in (gateway/sandbox/inbound_faxes.py).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import email.utils
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit


class MediaFailure(Exception):
    """The media could not be turned into a fax: becomes the fax's error code and message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def utc_now() -> datetime:
    return datetime.now(UTC)


def rfc2822(moment: datetime) -> str:
    """Twilio/SignalWire date style: ``Tue, 26 Nov 2024 17:43:00 +0000``."""
    return email.utils.format_datetime(moment)


def redact_url(url: str) -> str:
    """A URL fit for a log line: no userinfo, no query (a presigned URL's query is a secret)
    and only the first path segment (the gateway's media and callback paths carry tokens)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<unparseable url>"
    if ":" in host:
        host = f"[{host}]"
    first = parts.path.lstrip("/").split("/", 1)[0]
    path = f"/{first}/..." if first and first != parts.path.strip("/") else parts.path
    return f"{parts.scheme}://{host}{port}{path}"


def is_http_url(url: str) -> bool:
    if not url or any(ch.isspace() for ch in url):
        return False
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def parse_api_date(text: str) -> datetime:
    """A list filter date: ISO 8601 (date or date-time) or RFC 2822; naive means UTC.

    A ``+`` in an unencoded query string arrives as a space, so that is retried as ``+``.
    """
    text = text.strip()
    moment: datetime | None = None
    for candidate in (text, text.replace(" ", "+")):
        try:
            moment = datetime.fromisoformat(candidate)
            break
        except ValueError:
            continue
    if moment is None:
        try:
            moment = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError) as exc:
            raise ValueError(f"not an ISO 8601 or RFC 2822 date: {text!r}") from exc
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment


@dataclass
class MediaFetch:
    """One request the simulator made for a fax's MediaUrl."""

    fax_sid: str
    url: str
    method: str
    status: int | None = None
    content_type: str | None = None
    size_bytes: int = 0
    num_pages: int | None = None
    error_code: str | None = None
    error: str | None = None


@dataclass
class CallbackAttempt:
    """One POST of a status callback; ``status`` is None when no HTTP response came back."""

    fax_sid: str
    url: str
    params: dict[str, str]
    signature: str
    attempt: int
    status: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


@dataclass(eq=False)
class SimFax:
    """An outbound fax as the simulator tracks it."""

    sid: str
    seq: int
    account_sid: str
    to: str
    from_: str
    media_url: str
    quality: str
    ttl_min: int
    status_callback: str | None
    store_media: bool
    uri: str
    media_base_url: str
    date_created: datetime
    date_updated: datetime
    media_sid: str = field(default_factory=lambda: str(uuid.uuid4()))
    status: str = "queued"
    num_pages: str | None = None
    duration: int = 0
    error_code: str | None = None
    error_message: str | None = None
    remote_station_id: str | None = None
    media_bytes: bytes | None = None
    direction: str = "outbound"
    # Set when the fax may leave "queued" (queue released, or canceled).
    released: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    # Set when the background work, callback delivery included, has ended.
    finished: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    def set_status(self, status: str, *, code: str | None = None,
                   message: str | None = None) -> None:
        self.status = status
        self.error_code = code
        self.error_message = message
        self.date_updated = utc_now()

    @property
    def stored_media_url(self) -> str | None:
        if self.media_bytes is None:
            return None
        return f"{self.media_base_url}{self.uri}/Media/{self.media_sid}"

    def resource(self) -> dict[str, Any]:
        """The fax as the API's JSON resource."""
        return {
            "account_sid": self.account_sid,
            "api_version": "v1",
            "date_created": rfc2822(self.date_created),
            "date_updated": rfc2822(self.date_updated),
            "direction": self.direction,
            "from": self.from_,
            "to": self.to,
            "media_url": self.media_url,
            "media_sid": self.media_sid,
            "num_pages": self.num_pages,
            "price": None,
            "price_unit": "USD",
            "quality": self.quality,
            "sid": self.sid,
            "status": self.status,
            "duration": self.duration,
            "url": self.uri,
            "error_code": self.error_code,
            "error_message": self.error_message,
            "links": {"media": f"{self.uri}/Media"},
        }

    def callback_params(self) -> dict[str, str]:
        """Status callback form fields; absent values are left out, as SignalWire does."""
        params: dict[str, str | None] = {
            "FaxSid": self.sid,
            "AccountSid": self.account_sid,
            "ApiVersion": "v1",
            "From": self.from_,
            "To": self.to,
            "FaxStatus": self.status,
            "NumPages": self.num_pages,
            "MediaSid": self.media_sid if self.media_bytes is not None else None,
            "MediaUrl": self.stored_media_url,
            "OriginalMediaUrl": self.media_url,
            "RemoteStationId": self.remote_station_id,
            "ErrorCode": self.error_code,
            "ErrorMessage": self.error_message,
        }
        return {name: value for name, value in params.items() if value is not None}


def basic_credentials(header: str) -> tuple[bytes, bytes]:
    """(user, password) from a Basic Authorization header; empty ones when it is not one.

    Parsed by hand: aiohttp 3.14 deprecates BasicAuth, and bytes suit compare_digest.
    """
    scheme, _, encoded = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return b"", b""
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        return b"", b""
    user, _, password = decoded.partition(b":")
    return user, password
