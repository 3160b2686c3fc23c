"""Media stores: where SignalWire fetches the PDF from.

`S3MediaStore` puts the document in a bucket and hands out SigV4 presigned GET URLs.
`LocalMediaStore` keeps it under DATA_DIR and the gateway's HTTP listener serves it (GET and
HEAD) at an unguessable, HMAC-signed, expiring URL; `web.py` calls `resolve_token` to serve it.
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
import secrets
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Protocol, TypeVar

from gateway.store.spool import copy_durable

T = TypeVar("T")
DELETE_BATCH = 1000  # keys in one DeleteObjects call (S3's own limit)
S3_THREADS = 8  # S3 calls at once (uploads, presigning, deletes, fetches)

log = logging.getLogger(__name__)

MEDIA_ROUTE = "/media"


class MediaError(Exception):
    """The media store could not take or give the document (an outage: retried with backoff)."""


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


class S3MediaStore:
    """Documents in an S3 (or S3-compatible) bucket behind SigV4 presigned GET URLs."""

    def __init__(self, *, bucket: str, prefix: str, region: str, endpoint_url: str | None,
                 timeout_s: float) -> None:
        self.bucket = bucket
        self.prefix = prefix
        self.region = region
        self.endpoint_url = endpoint_url
        self.timeout_s = timeout_s
        self._client: Any = None
        # S3 calls block a thread for a network round trip (a 20 MB PUT: seconds). They get
        # threads of their own, so that the quick file work the rest of the daemon hands to
        # asyncio's default executor never queues behind a burst of uploads (with a shared
        # queue every mail's PUT comes before its 250).
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
        self._client = await self._call(self._make_client)

    def _make_client(self) -> Any:
        import boto3
        from botocore.config import Config

        config = Config(
            signature_version="s3v4",  # boto3 may otherwise presign with SigV2
            s3={"addressing_style": "path" if self.endpoint_url else "auto"},
            connect_timeout=min(10.0, self.timeout_s),
            read_timeout=self.timeout_s,
            retries={"max_attempts": 2, "mode": "standard"},
        )
        return boto3.client("s3", region_name=self.region, endpoint_url=self.endpoint_url,
                            config=config)

    async def stop(self) -> None:
        if self._deleter is not None:
            await asyncio.gather(self._deleter, return_exceptions=True)
        if self._client is not None:
            await self._call(self._client.close)
            self._client = None
        if self._threads is not None:
            self._threads.shutdown(wait=False)
            self._threads = None

    def _object(self, key: str) -> str:
        return f"{self.prefix}{key}"

    async def put(self, key: str, source: Path) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            # One PUT streamed from the spool file, in one of the S3 threads.
            # Not upload_file: its transfer manager would split a 20 MB PDF into 8 MB parts
            # read into memory by up to 10 threads per upload (with scans arriving together,
            # the daemon's largest growth), and even single-threaded its machinery costs a
            # third more CPU than the PUT itself for a 100 KB fax.
            await self._call(self._put, key, source)
        except (BotoCoreError, ClientError, OSError) as exc:
            raise MediaError(f"S3 upload to bucket {self.bucket}: {_s3_reason(exc)}") from exc

    def _put(self, key: str, source: Path) -> None:
        with open(source, "rb") as body:
            self._client.put_object(Bucket=self.bucket, Key=self._object(key), Body=body,
                                    ContentType="application/pdf")

    async def fetch(self, key: str, dest: Path) -> None:
        """Download the document to `dest`: one GET streamed to disk a chunk at a time (a
        report mailed by a node that did not spool the mail)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            await self._call(self._fetch, key, dest)
        except (BotoCoreError, ClientError, OSError) as exc:
            raise MediaError(f"S3 download from bucket {self.bucket}: {_s3_reason(exc)}") \
                from exc

    def _fetch(self, key: str, dest: Path) -> None:
        body = self._client.get_object(Bucket=self.bucket, Key=self._object(key))["Body"]
        try:
            with open(dest, "wb") as out:
                for chunk in body.iter_chunks(1 << 20):  # botocore's StreamingBody
                    out.write(chunk)
        finally:
            body.close()

    async def url(self, key: str, ttl_s: int) -> str:
        return await self._call(
            self._client.generate_presigned_url, "get_object",
            Params={"Bucket": self.bucket, "Key": self._object(key)}, ExpiresIn=ttl_s)

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

    def _delete_objects(self, keys: list[str]) -> dict[str, str]:
        """One call; the keys S3 could not delete, with its reason. A lone key is one
        DeleteObject (a DeleteObjects of one key costs a fifth more)."""
        if len(keys) == 1:
            self._client.delete_object(Bucket=self.bucket, Key=self._object(keys[0]))
            return {}
        names = {self._object(key): key for key in keys}
        response = self._client.delete_objects(
            Bucket=self.bucket,
            Delete={"Objects": [{"Key": name} for name in names], "Quiet": True})
        return {names.get(e.get("Key", ""), e.get("Key", "")):
                f"{e.get('Code', 'error')}: {e.get('Message', '')}".strip(": ")
                for e in response.get("Errors", [])}


def _s3_reason(exc: BaseException) -> str:
    """A log-safe reason: botocore messages can include the endpoint but never credentials."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        err = response.get("Error", {})
        return f"{err.get('Code', 'error')}: {err.get('Message', '')}".strip()
    return type(exc).__name__ + (f": {exc}" if str(exc) else "")


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
