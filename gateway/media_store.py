"""Media stores: where SignalWire fetches the PDF from.

`S3MediaStore` puts the document in a bucket and hands out SigV4 presigned GET URLs.
`LocalMediaStore` keeps it under DATA_DIR and the gateway's HTTP listener serves it (GET and
HEAD) at an unguessable, HMAC-signed, expiring URL; gateway/web/http_listener.py calls
`resolve_token` to serve it.
Object keys are random, so a URL leaks nothing about the sender or the number.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import hmac
import logging
import os
import re
import secrets
import shutil
import ssl
import time
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import aiohttp
from yarl import URL

from gateway.spool import copy_durable

if TYPE_CHECKING:
    from gateway.config import Settings

T = TypeVar("T")
DELETE_BATCH = 1000  # keys in one DeleteObjects call (S3's own limit)
S3_THREADS = 4  # boto3 calls at once (client start, credential refreshes, several-key deletes)
S3_CONNECTIONS = 16  # requests to S3 at once (uploads, deletes, downloads)
S3_ATTEMPTS = 2  # a dropped connection or a 5xx is tried once more, as boto3's standard mode
REQUEST_URL_TTL_S = 900  # the gateway's own requests are signed for this long
READ_WHOLE_BYTES = 1024 * 1024  # a PDF up to this size is uploaded from one read
UPLOAD_CHUNK_BYTES = 1024 * 1024  # larger ones a chunk at a time
MIN_UPLOAD_BYTES_PER_S = 64 * 1024  # an upload slower than this (plus the timeout) fails
MAX_FETCH_S = 600.0  # a download of the largest document takes at most this long
_PROBE_NAME = "faxgw-address-probe"

log = logging.getLogger(__name__)

MEDIA_ROUTE = "/media"


class MediaError(Exception):
    """The media store could not take or give the document (an outage: retried with backoff)."""


class S3RequestError(MediaError):
    """S3 (or the way to it) refused one request; `reason` is S3's code and words."""

    def __init__(self, what: str, bucket: str, reason: str) -> None:
        super().__init__(f"S3 {what} bucket {bucket}: {reason}")
        self.reason = reason


class MediaStore(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def put(self, key: str, source: Path) -> None: ...
    async def fetch(self, key: str, dest: Path) -> None: ...
    async def url(self, key: str, ttl_s: int) -> str: ...
    async def delete(self, key: str) -> None: ...


def new_media_key() -> str:
    """Random object name: 128 bits, no sender, number or date in it."""
    return secrets.token_urlsafe(16) + ".pdf"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class LocalMediaStore:
    """Documents under DATA_DIR/media, served by the gateway itself."""

    def __init__(self, root: Path, key: bytes, base_url: Callable[[], str],
                 clock: Callable[[], float] = time.time) -> None:
        self.root = root
        self._key = key
        self._base_url = base_url
        self.clock = clock

    async def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    async def stop(self) -> None:
        return None

    async def put(self, key: str, source: Path) -> None:
        await asyncio.to_thread(self._put, key, source)

    def _put(self, key: str, source: Path) -> None:
        try:
            copy_durable(source, self.root / key)
        except OSError as exc:
            raise MediaError(f"local media store: {exc.strerror or exc}") from exc

    async def fetch(self, key: str, dest: Path) -> None:
        """Copy the document to `dest` (a report mailed by a node that did not spool it)."""
        try:
            await asyncio.to_thread(shutil.copyfile, self.root / key, dest)
        except OSError as exc:
            raise MediaError(f"local media store: {exc.strerror or exc}") from exc

    async def url(self, key: str, ttl_s: int) -> str:
        expires = int(self.clock()) + ttl_s
        payload = f"{key}.{expires}".encode()
        mac = hmac.new(self._key, payload, hashlib.sha256).digest()[:20]
        return f"{self._base_url()}{MEDIA_ROUTE}/{_b64(payload)}.{_b64(mac)}"

    def resolve_token(self, token: str) -> Path | None:
        """The file a media URL token names, or None when forged, malformed or expired."""
        try:
            payload_b64, mac_b64 = token.split(".")
            payload = base64.urlsafe_b64decode(payload_b64 + "=" * (-len(payload_b64) % 4))
            mac = base64.urlsafe_b64decode(mac_b64 + "=" * (-len(mac_b64) % 4))
            key, expires_text = payload.decode("ascii").rsplit(".", 1)
            expires = int(expires_text)
        except (ValueError, UnicodeDecodeError):
            return None
        good = hmac.new(self._key, payload, hashlib.sha256).digest()[:20]
        if not hmac.compare_digest(mac, good) or expires < self.clock():
            return None
        if "/" in key or key.startswith("."):
            return None
        path = self.root / key
        return path if path.is_file() else None

    async def delete(self, key: str) -> None:
        await asyncio.to_thread((self.root / key).unlink, True)


def presign_v4(method: str, url: str, *, access_key: str, secret_key: str, token: str | None,
               region: str, ttl_s: int, now: float) -> str:
    """`url` (an S3 object's, path already quoted) presigned for `method`: AWS Signature
    Version 4 in the query string, only the host header signed, the payload unsigned.

    The URL botocore's S3SigV4QueryAuth gives, character for character
    (tests/test_s3_media.py compares them), at a fraction of its cost: it builds and parses a
    request object for every signature (~200 us of the loop; three per fax), and derives the
    day's signing key each time. Here what depends only on the second, the credentials and
    the origin (the date stamp, the query, the host header, the day's key) is made once and
    kept; a signature is then a hash and one HMAC."""
    parts = urllib.parse.urlsplit(url)
    query, canonical, to_sign_head, key = _query_for(
        int(now), access_key, secret_key, token, region, ttl_s)
    host = _host_header(parts.scheme, parts.netloc)
    request = f"{method}\n{parts.path}\n{canonical}\nhost:{host}\n\nhost\nUNSIGNED-PAYLOAD"
    to_sign = to_sign_head + hashlib.sha256(request.encode()).hexdigest()
    signature = hmac.digest(key, to_sign.encode(), "sha256").hex()
    return f"{parts.scheme}://{parts.netloc}{parts.path}?{query}&X-Amz-Signature={signature}"


_DEFAULT_PORTS = {"http": 80, "https": 443}


@functools.lru_cache(maxsize=16)
def _host_header(scheme: str, netloc: str) -> str:
    """The Host header as botocore signs it: the host (IPv6 in brackets), and the port unless
    it is the scheme's default."""
    parts = urllib.parse.urlsplit(f"{scheme}://{netloc}")
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"  # IPv6
    if parts.port is not None and parts.port != _DEFAULT_PORTS.get(parts.scheme):
        host = f"{host}:{parts.port}"
    return host


@functools.lru_cache(maxsize=8)
def _query_for(second: int, access_key: str, secret_key: str, token: str | None, region: str,
               ttl_s: int) -> tuple[str, str, str, bytes]:
    """For one second (and credentials, region, expiry): the query string before the
    signature, its canonical (sorted) form, the string-to-sign up to the request's hash, and
    the day's signing key. A burst signs many requests within the same second."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(second))
    scope = f"{stamp[:8]}/{region}/s3/aws4_request"
    params = [("X-Amz-Algorithm", "AWS4-HMAC-SHA256"),
              ("X-Amz-Credential", f"{access_key}/{scope}"),
              ("X-Amz-Date", stamp), ("X-Amz-Expires", str(ttl_s)),
              ("X-Amz-SignedHeaders", "host")]
    if token is not None:
        params.append(("X-Amz-Security-Token", token))
    query = "&".join(f"{k}={_aws_quote(v)}" for k, v in params)
    canonical = "&".join(sorted(query.split("&")))
    return (query, canonical, f"AWS4-HMAC-SHA256\n{stamp}\n{scope}\n",
            _signing_key(secret_key, stamp[:8], region))


@functools.lru_cache(maxsize=64)
def _aws_quote(value: str) -> str:
    """Percent-encoded as SigV4 asks. Kept: the values repeat (the credential scope all day,
    a session token, the expiry), and quote() walks every character of a ~1 KB STS token."""
    return urllib.parse.quote(value, safe="-_.~")


@functools.lru_cache(maxsize=4)
def _signing_key(secret_key: str, day: str, region: str) -> bytes:
    key = hmac.new(f"AWS4{secret_key}".encode(), day.encode(), hashlib.sha256).digest()
    for part in (region, "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key


class S3MediaStore:
    """Documents in an S3 (or S3-compatible) bucket behind SigV4 presigned URLs.

    The credentials are the settings' (AWS_* from the .env file or the environment, given to
    boto3 explicitly), else boto3's chain (profile, instance role); they and the bucket's
    address are found once, at start. Each request is then presigned by `presign_v4` (the URL
    `generate_presigned_url` would give) and sent with aiohttp on the event loop. Through the
    client, a PUT or DELETE cost ~1.5 ms of CPU and two thread hops (S3 calls were a sixth of
    the pipeline's CPU per fax); a signature costs ~20 us. The boto3 client still does the
    rare several-key DeleteObjects."""

    def __init__(self, *, bucket: str, prefix: str, region: str, endpoint_url: str | None,
                 timeout_s: float, access_key_id: str | None = None,
                 secret_access_key: str | None = None, session_token: str | None = None,
                 profile: str | None = None, ca_bundle: str | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.bucket = bucket
        self._keys = {"aws_access_key_id": access_key_id,
                      "aws_secret_access_key": secret_access_key,
                      "aws_session_token": session_token} if access_key_id else {}
        self._profile = profile
        self._ca_bundle = ca_bundle
        self.clock = clock
        # This node's last request to S3, whoever made it (intake's upload, the worker, the
        # purge): (ok, when, what), for the health checks.
        self.contact: tuple[bool, float, str] | None = None
        self.prefix = prefix
        self.region = region
        self.endpoint_url = endpoint_url
        self.timeout_s = timeout_s
        self._client: Any = None
        self._credentials: Any = None  # botocore's, refreshed by botocore when they expire
        self._frozen: Any = None  # their values, when they never change (keys, not a role)
        self._bucket_url = ""  # the object's URL is this plus its quoted name
        self._signing_region = region
        self._http: aiohttp.ClientSession | None = None
        self._proxy: str | None = None
        # Client creation, credential refreshes and several-key deletes block a thread for a
        # network round trip; they get threads of their own, so that the quick file work the
        # rest of the daemon hands to asyncio's default executor never queues behind them.
        self._threads: ThreadPoolExecutor | None = None
        # Deletes asked for while one DeleteObjects call is out go together in the next one.
        self._deletes: dict[str, list[asyncio.Future[None]]] = {}
        self._deleter: asyncio.Task[None] | None = None

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        assert self._threads is not None, "media store not started"
        return await asyncio.get_running_loop().run_in_executor(
            self._threads, functools.partial(fn, *args, **kwargs))

    async def start(self) -> None:
        self._threads = ThreadPoolExecutor(S3_THREADS, thread_name_prefix="faxgw-s3")
        self._client, self._credentials, self._bucket_url = await self._call(self._make_client)
        from botocore.credentials import RefreshableCredentials

        self._frozen = (None if isinstance(self._credentials, RefreshableCredentials)
                        else self._credentials.get_frozen_credentials())
        self._signing_region = self._client.meta.region_name or self.region
        cafile = self._ca_bundle or os.environ.get("AWS_CA_BUNDLE") or None  # as boto3's
        self._http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=S3_CONNECTIONS,
                                           ssl=ssl.create_default_context(cafile=cafile)),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=min(10.0, self.timeout_s),
                                          sock_read=self.timeout_s),
            auto_decompress=False, skip_auto_headers=("Content-Type",))
        # HTTPS_PROXY / HTTP_PROXY and NO_PROXY, as boto3 reads them, decided once: aiohttp's
        # trust_env would look them (and ~/.netrc) up in a thread on every request.
        self._proxy = env_proxy(self._bucket_url)

    def _make_client(self) -> tuple[Any, Any, str]:
        import boto3
        from botocore.config import Config

        config = Config(
            signature_version="s3v4",  # boto3 may otherwise presign with SigV2
            s3={"addressing_style": "path" if self.endpoint_url else "auto"},
            connect_timeout=min(10.0, self.timeout_s),
            read_timeout=self.timeout_s,
            retries={"max_attempts": 2, "mode": "standard"},
        )
        session = boto3.session.Session(profile_name=self._profile, **self._keys)
        client = session.client("s3", region_name=self.region, endpoint_url=self.endpoint_url,
                                config=config, **({"verify": self._ca_bundle}
                                                  if self._ca_bundle else {}))
        if session.get_credentials() is None:
            raise MediaError("S3: no credentials: set AWS_ACCESS_KEY_ID and "
                             "AWS_SECRET_ACCESS_KEY (in the configuration file or the "
                             "environment), AWS_PROFILE, or give the host an instance role")
        # The bucket's address as boto3 writes it (path or virtual-host style, the regional
        # endpoint): a presigned URL for a known name, cut before that name.
        probe = client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": _PROBE_NAME}, ExpiresIn=60)
        base = probe.split("?", 1)[0]
        if not base.endswith("/" + _PROBE_NAME):
            raise MediaError(f"S3: cannot tell the address of bucket {self.bucket}")
        return client, session.get_credentials(), base[:-len(_PROBE_NAME)]

    async def stop(self) -> None:
        if self._deleter is not None:
            await asyncio.gather(self._deleter, return_exceptions=True)
        if self._http is not None:
            await self._http.close()
            self._http = None
        if self._client is not None:
            await self._call(self._client.close)
            self._client = None
        if self._threads is not None:
            self._threads.shutdown(wait=False)
            self._threads = None

    def _object(self, key: str) -> str:
        return f"{self.prefix}{key}"

    async def _signed(self, method: str, key: str, ttl_s: int) -> str:
        """A presigned URL for one request on the object: SigV4 in the query, only `host`
        signed, so the request carries no Authorization header and its body is not hashed."""
        credentials = self._credentials
        if credentials is None:
            raise MediaError("S3: no credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                             "a profile, or an instance role)")
        frozen = self._frozen  # fixed keys: frozen once, at start
        if frozen is None:  # botocore's refreshable ones (a role, SSO): as they are now
            if credentials.refresh_needed():
                frozen = await self._call(credentials.get_frozen_credentials)  # network
            else:
                frozen = credentials.get_frozen_credentials()
        return presign_v4(method, self._bucket_url + urllib.parse.quote(self._object(key),
                                                                        safe="/~"),
                          access_key=frozen.access_key, secret_key=frozen.secret_key,
                          token=frozen.token, region=self._signing_region, ttl_s=ttl_s,
                          now=time.time())

    async def _request(self, what: str, method: str, key: str, ok: tuple[int, ...],
                       body: Callable[[], Any] | None = None,
                       headers: dict[str, str] | None = None, deadline_s: float | None = None,
                       into: Path | None = None) -> None:
        """One S3 request, tried again once after a dropped connection or a 5xx (as boto3's
        standard retries). Any failure is a MediaError with S3's own code and words, never
        the URL (it carries a signature)."""
        assert self._http is not None, "media store not started"
        reason = ""
        for attempt in range(S3_ATTEMPTS):
            try:
                async with asyncio.timeout(deadline_s or self.timeout_s * 2):
                    url = await self._signed(method, key, REQUEST_URL_TTL_S)
                    # Quoted already (the key's name, and the query by presign_v4): yarl
                    # need not parse and quote the query again.
                    async with self._http.request(method, URL(url, encoded=True),
                                                  headers=headers,
                                                  data=body() if body else None,
                                                  proxy=self._proxy) as response:
                        if response.status in ok:
                            if into is not None:
                                await _save_body(response, into)
                            self.contact = (True, self.clock(), f"{what.split()[0]} ok")
                            return
                        reason = await _s3_error(response)
                        if response.status < 500:
                            break
            except MediaError:
                raise
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                reason = _http_reason(exc)
                if attempt + 1 < S3_ATTEMPTS and _retryable(exc):
                    continue
                break
        error = S3RequestError(what, self.bucket, reason)
        self.contact = (False, self.clock(), str(error))
        raise error

    async def put(self, key: str, source: Path) -> None:
        """One PUT streamed from the spool file: a fax-sized PDF is read at once (it was just
        written: the page cache), a scan a chunk at a time, so a 20 MB PDF never sits in
        memory whole."""
        try:
            size = source.stat().st_size
        except OSError as exc:
            raise MediaError(f"S3 upload to bucket {self.bucket}: {_http_reason(exc)}") from exc
        if size <= READ_WHOLE_BYTES:
            try:
                data = source.read_bytes()
            except OSError as exc:
                raise MediaError(f"S3 upload to bucket {self.bucket}: "
                                 f"{_http_reason(exc)}") from exc
            body: Callable[[], Any] = lambda: data  # noqa: E731
        else:
            body = functools.partial(_file_chunks, source)
        await self._request("upload to", "PUT", key, (200,), body,
                            headers={"Content-Type": "application/pdf",
                                     "Content-Length": str(size)},
                            deadline_s=self.timeout_s * 2 + size / MIN_UPLOAD_BYTES_PER_S)

    async def fetch(self, key: str, dest: Path) -> None:
        """Download the document to `dest`: one GET streamed to disk a chunk at a time (a
        report mailed by a node that did not spool the mail)."""
        await self._request("download from", "GET", key, (200,), into=dest,
                            deadline_s=self.timeout_s * 2 + MAX_FETCH_S)

    async def url(self, key: str, ttl_s: int) -> str:
        return await self._signed("GET", key, ttl_s)

    async def delete(self, key: str) -> None:
        """Delete the object; MediaError if S3 said no. Deletes asked for while a call is out
        wait for it and then go together, up to DELETE_BATCH keys in one DeleteObjects call
        (a purge after every report, one call each, cost a millisecond of CPU per fax)."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._deletes.setdefault(key, []).append(done)
        if self._deleter is None or self._deleter.done():
            self._deleter = asyncio.create_task(self._delete_waiting(), name="faxgw-s3-delete")
        await done

    async def _delete_waiting(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        while self._deletes:
            keys = list(self._deletes)[:DELETE_BATCH]
            waiting = {key: self._deletes.pop(key) for key in keys}
            try:
                if len(keys) == 1:  # a lone key: one DELETE, no thread, no boto3
                    failed = await self._delete_one(keys[0])
                else:
                    failed = await self._call(self._delete_objects, keys)
            except (BotoCoreError, ClientError) as exc:
                failed = dict.fromkeys(keys, _s3_reason(exc))
            except BaseException as exc:  # not S3's answer: each caller gets it as it is
                cancelled = isinstance(exc, asyncio.CancelledError)
                pending = [f for futures in waiting.values() for f in futures]
                if cancelled:  # nothing will delete the rest either
                    pending += [f for futures in self._deletes.values() for f in futures]
                    self._deletes.clear()
                for future in pending:
                    if future.done():
                        continue
                    if cancelled:
                        future.cancel()
                    else:
                        future.set_exception(exc)
                if cancelled:
                    raise
                continue
            for key, futures in waiting.items():
                for future in futures:
                    if future.done():  # its caller was cancelled
                        continue
                    if key in failed:
                        future.set_exception(MediaError(f"S3 delete: {failed[key]}"))
                    else:
                        future.set_result(None)

    async def _delete_one(self, key: str) -> dict[str, str]:
        try:  # S3 answers 204 whether or not the object was there
            await self._request("delete in", "DELETE", key, (200, 204))
        except S3RequestError as exc:
            return {key: exc.reason}
        return {}

    def _delete_objects(self, keys: list[str]) -> dict[str, str]:
        """One DeleteObjects call (boto3: the request body and its checksum); the keys S3
        could not delete, with its reason."""
        names = {self._object(key): key for key in keys}
        response = self._client.delete_objects(
            Bucket=self.bucket,
            Delete={"Objects": [{"Key": name} for name in names], "Quiet": True})
        return {names.get(e.get("Key", ""), e.get("Key", "")):
                f"{e.get('Code', 'error')}: {e.get('Message', '')}".strip(": ")
                for e in response.get("Errors", [])}


def s3_media_store(settings: Settings, timeout_s: float,
                   clock: Callable[[], float] = time.time) -> S3MediaStore:
    """The S3 store with the settings' credentials (the .env file's as much as the
    environment's), not whatever boto3 would find in the process environment."""
    return S3MediaStore(bucket=settings.s3.bucket, prefix=settings.s3.prefix,
                        region=settings.s3.region, endpoint_url=settings.s3.endpoint_url,
                        timeout_s=timeout_s, access_key_id=settings.s3.access_key_id,
                        secret_access_key=settings.s3.secret_access_key,
                        session_token=settings.s3.session_token, profile=settings.s3.profile,
                        ca_bundle=str(settings.s3.ca_bundle) if settings.s3.ca_bundle else None,
                        clock=clock)


def _s3_reason(exc: BaseException) -> str:
    """A log-safe reason: botocore messages can include the endpoint but never credentials."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        err = response.get("Error", {})
        return f"{err.get('Code', 'error')}: {err.get('Message', '')}".strip()
    return type(exc).__name__ + (f": {exc}" if str(exc) else "")


def env_proxy(url: str) -> str | None:
    """The proxy the environment names for `url` (the scheme's `*_PROXY`), unless `NO_PROXY`
    exempts its host: urllib's reading of the variables, which botocore uses too."""
    parts = urllib.parse.urlsplit(url)
    if parts.hostname and urllib.request.proxy_bypass(parts.hostname):
        return None
    return urllib.request.getproxies().get(parts.scheme) or None


def _retryable(exc: BaseException) -> bool:
    # A kept-alive connection the server had closed, or one that broke: send again.
    return isinstance(exc, (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError))


def _http_reason(exc: BaseException) -> str:
    """Log-safe words for a failed request: aiohttp's messages for a response (and its own
    URL errors) quote the URL, which carries a signature; a connection error names only the
    host and port."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, (aiohttp.ClientConnectorError, OSError)) and not isinstance(
            exc, aiohttp.ClientResponseError):
        return f"{type(exc).__name__}: {exc}" if "X-Amz-" not in str(exc) else type(exc).__name__
    return type(exc).__name__


_S3_CODE = re.compile(rb"<Code>([^<]{1,100})</Code>")
_S3_MESSAGE = re.compile(rb"<Message>([^<]{1,300})</Message>")


async def _s3_error(response: aiohttp.ClientResponse) -> str:
    """S3's error code and message from the XML body (read up to 16 KB), or the HTTP status."""
    try:
        body = await response.content.read(16 * 1024)
    except Exception:  # noqa: BLE001 - the status is reason enough
        body = b""
    code, message = _S3_CODE.search(body), _S3_MESSAGE.search(body)
    if code is None:
        return f"HTTP {response.status}"
    words = code.group(1).decode("utf-8", "replace")
    if message is not None:
        words += ": " + message.group(1).decode("utf-8", "replace")
    return words


async def _file_chunks(path: Path) -> AsyncIterator[bytes]:
    with open(path, "rb") as fh:
        while chunk := await asyncio.to_thread(fh.read, UPLOAD_CHUNK_BYTES):
            yield chunk


async def _save_body(response: aiohttp.ClientResponse, dest: Path) -> None:
    with open(dest, "wb") as out:
        async for chunk in response.content.iter_chunked(UPLOAD_CHUNK_BYTES):
            await asyncio.to_thread(out.write, chunk)


def load_or_create_key(path: Path) -> bytes:
    """The local media HMAC key, created once so URLs stay valid across restarts."""
    if path.is_file():
        return path.read_bytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key)
    return key
