"""The operator's commands: `faxgw check-config`, `jobs`, `job`, `resend`, `cancel`, `report`.

They read and write the daemon's own database (safe while it runs: SQLite WAL, short
transactions) and nudge a running daemon with SIGUSR1 so an action takes effect at once.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from datetime import UTC
from pathlib import Path
from typing import Any

from gateway.config import Settings
from gateway.constants import EXIT_UNAVAILABLE
from gateway.jobs.outbound_states import RetryPolicy
from gateway.outbound import actions as admin
from gateway.runtime.instance import running_daemon
from gateway.signalwire.client import SignalWireClient, SignalWireError
from gateway.store.base import Store, StoreError
from gateway.store.factory import open_store
from gateway.store.sql import SqlStore
from gateway.web.http_listener import SANDBOX_PREFIX

EX_OK, EX_FAIL = 0, 1


def open_existing_store(settings: Settings) -> SqlStore:
    store = open_store(settings)
    if not store.exists():
        raise admin.AdminError(f"no database at {store.where}: is DATA_DIR right, has the "
                               "daemon run?")
    try:
        store.open(migrate=False)
    except StoreError as exc:
        raise admin.AdminError(str(exc)) from exc
    try:
        # The same check the daemon makes at start: a damaged file is named, not half-read.
        store.verify()
    except BaseException:
        store.close()
        raise
    return store


NOT_RUNNING = "(the daemon is not running: this takes effect when it next starts)"


def nudge_daemon(settings: Settings) -> bool:
    """Tell a running daemon to look at its queue now (SIGUSR1), if one runs.

    Only the process the pid file names *and* that started when the pid file says is
    signalled (see gateway.runtime.instance): after a kill -9 the pid may belong to anyone now.
    """
    pid = running_daemon(settings.queue.data_dir)
    if pid is None:
        return False
    try:
        os.kill(pid, signal.SIGUSR1)
    except OSError:
        return False
    return True


def _nudged(settings: Settings, text: str) -> str:
    if settings.shared:  # every node looks at the shared queue every few seconds: no signal
        return text
    return text if nudge_daemon(settings) else f"{text}\n{NOT_RUNNING}"


def space_url(settings: Settings) -> str:
    if settings.signalwire.space_url:
        return settings.signalwire.space_url
    host = settings.http.listen.host
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return f"http://{host}:{settings.http.listen.port}{SANDBOX_PREFIX}"


def _client(settings: Settings) -> SignalWireClient:
    return SignalWireClient(space_url=space_url(settings),
                            project_id=settings.signalwire.project_id,
                            api_token=settings.signalwire.api_token,
                            timeout_s=settings.signalwire.timeout_s)


def with_store(action: Callable[[Store], str]) -> Callable[[Settings], int]:
    def run(settings: Settings) -> int:
        try:
            store = open_existing_store(settings)
            try:
                print(action(store))
            finally:
                store.close()
        except admin.AdminError as exc:
            print(f"faxgw: {exc}", file=sys.stderr)
            return EX_FAIL
        return EX_OK
    return run


def jobs(settings: Settings, *, status: str | None, to: str | None, sender: str | None,
         since: str | None, limit: int, fmt: str) -> int:
    def action(store: Store) -> str:
        since_ts = admin.parse_since(since, time.time()) if since else None
        rows = admin.list_jobs(store, status=status, to=to, sender=sender, since=since_ts,
                               limit=limit)
        if fmt == "json":
            return admin.rows_to_json(rows)
        if fmt == "csv":
            return admin.rows_to_csv(rows).rstrip("\n")
        return admin.format_table(rows)
    return with_store(action)(settings)


def job(settings: Settings, ref: str) -> int:
    return with_store(lambda store: admin.describe_job(store, ref, time.time(),
                                                        settings.fax.domain))(settings)


def resend(settings: Settings, ref: str) -> int:
    def action(store: Store) -> str:
        new = admin.resend_job(store, ref, time.time(), from_number=settings.fax.from_number,
                               retry_policy=RetryPolicy.from_settings(settings),
                               shared=settings.shared)
        return _nudged(settings, f"job {ref} will be sent again as job {new}")
    return with_store(action)(settings)


def report(settings: Settings, ref: str) -> int:
    def action(store: Store) -> str:
        text = admin.request_report(store, ref, time.time())
        return _nudged(settings, text)
    return with_store(action)(settings)


def cancel(settings: Settings, ref: str) -> int:
    try:
        store = open_existing_store(settings)
    except admin.AdminError as exc:
        print(f"faxgw: {exc}", file=sys.stderr)
        return EX_FAIL
    try:
        request = admin.request_cancel(store, ref, time.time())
        if request.fax_sid is not None:
            asyncio.run(_cancel_at_signalwire(settings, request.fax_sid))
            admin.note_cancel(store, request.job_id, time.time(), request.fax_sid)
        print(_nudged(settings, request.text))
        return EX_OK
    except admin.AdminError as exc:
        print(f"faxgw: {exc}", file=sys.stderr)
        return EX_FAIL
    finally:
        store.close()


async def _cancel_at_signalwire(settings: Settings, sid: str) -> None:
    client = _client(settings)
    await client.start()
    try:
        await admin.cancel_fax(client, sid)
    finally:
        await client.stop()


# -- check-config ------------------------------------------------------------------------------


async def _probe_s3(settings: Settings) -> str:
    from gateway.media_store import s3_media_store

    store = s3_media_store(settings, 20)
    await store.start()
    try:
        probe = Path(os.environ.get("TMPDIR", "/tmp")) / f"faxgw-probe-{os.getpid()}.pdf"
        probe.write_bytes(b"%PDF-1.4\n% faxgw check-config probe\n")
        try:
            key = f"check-config-probe-{os.getpid()}.pdf"
            await store.put(key, probe)
            url = await store.url(key, 60)
            await store.delete(key)
        finally:
            probe.unlink(missing_ok=True)
    finally:
        await store.stop()
    return f"bucket {settings.s3.bucket}: put, presign ({url.split('?')[0]}), delete"


async def _probe_signalwire(settings: Settings) -> str:
    from datetime import datetime

    client = _client(settings)
    await client.start()
    try:
        await client.list_faxes(to=settings.fax.from_number, from_=settings.fax.from_number,
                                created_after=datetime.now(UTC), max_pages=1)
    finally:
        await client.stop()
    return f"credentials accepted by {space_url(settings)}"


async def _probe_relay(settings: Settings) -> str:
    import aiosmtplib

    smtp = aiosmtplib.SMTP(hostname=settings.notify.host, port=settings.notify.port,
                           use_tls=settings.notify.tls == "tls",
                           start_tls=settings.notify.tls == "starttls", timeout=20)
    await smtp.connect()
    try:
        if settings.notify.username and settings.notify.password:
            await smtp.login(settings.notify.username, settings.notify.password)
    finally:
        await smtp.quit()
    return f"{settings.notify.host}:{settings.notify.port} EHLO" + (
        " + AUTH" if settings.notify.username else "")


async def _probe_certificate(settings: Settings) -> str:
    from gateway.smtp.tls import cert_fingerprint, make_server_context

    assert settings.tls.cert_file and settings.tls.key_file
    make_server_context(settings.tls.cert_file, settings.tls.key_file, settings.tls.min_version)
    return f"{settings.tls.cert_file} (sha256 {cert_fingerprint(settings.tls.cert_file)[:23]}...)"


async def _probe_users(settings: Settings) -> str:
    from gateway.users import load_users

    assert settings.access.users_file
    return f"{settings.access.users_file}: {len(load_users(settings.access.users_file))} user(s)"


def check_config(settings: Settings) -> int:
    """One line per check, OK/FAIL/SKIP and why; exit 0, or 69 when a service is unreachable
    (configuration errors never get here: they exit 78 while loading)."""
    checks: list[tuple[str, Callable[[Settings], Coroutine[Any, Any, str]] | None, str]] = [
        ("S3 media store", _probe_s3 if settings.media.store == "s3" else None,
         "MEDIA_STORE=local"),
        ("SignalWire API", _probe_signalwire if not settings.sandbox else None,
         "sandbox (built-in simulator)"),
        ("report relay", _probe_relay if settings.notify.host else None,
         f"reports go to {settings.queue.data_dir / 'outbox'}"),
        ("TLS certificate", _probe_certificate if settings.tls.cert_file else None,
         "no TLS_CERT_FILE: no STARTTLS / SMTPS"),
        ("users file", _probe_users if settings.access.users_file else None,
         "no USERS_FILE: no SMTP AUTH"),
    ]
    failed = False
    print("configuration: OK")
    for name, probe, skip_reason in checks:
        if probe is None:
            print(f"{name}: SKIP ({skip_reason})")
            continue
        try:
            detail = asyncio.run(probe(settings))
            print(f"{name}: OK {detail}")
        except Exception as exc:  # a check reports every failure, whatever its kind
            failed = True
            words = (exc.words if isinstance(exc, SignalWireError)
                     else f"{type(exc).__name__}: {exc}")
            print(f"{name}: FAIL {words[:300]}")
    return EXIT_UNAVAILABLE if failed else EX_OK

