"""Shared fixtures: every part real and on loopback, port 0, torn down after use."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import secrets
import smtplib
from collections.abc import AsyncIterator, Callable, Iterator
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from email.utils import make_msgid
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP as AioSMTP
from pypdf import PdfWriter

from gateway.config import Settings, settings_from
from gateway.daemon import Gateway
from gateway.jobs.outbound_states import State
from gateway.runtime import logs

# Shared with bench/ (one copy): the simulator's account, the simulator server, job ids.
from testsupport.harness import API_TOKEN, PROJECT_ID, SIGNING_KEY, job_ids, simulator_env
from testsupport.harness import SimulatorServer as Simulator
from testsupport.s3server import SeaweedS3

__all__ = ["API_TOKEN", "PROJECT_ID", "SIGNING_KEY", "Simulator", "job_ids"]


def make_pdf(pages: int = 1, *, landscape: bool = False) -> bytes:
    """A small valid PDF with `pages` blank pages (Letter)."""
    writer = PdfWriter()
    for _ in range(pages):
        writer.add_blank_page(width=792 if landscape else 612, height=612 if landscape else 792)
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def pdf_mail(to: str | list[str], *, pdf: bytes | None = None, sender: str = "alice@example.com",
             subject: str = "Invoice 42", filename: str | None = "invoice.pdf",
             message_id: str | None = None) -> EmailMessage:
    """`message_id`: by default a new one per mail (the same Message-ID and document within
    DEDUP_WINDOW_HOURS is one mail sent twice, faxed once)."""
    msg = EmailMessage()
    msg["From"] = f"Alice Example <{sender}>"
    msg["To"] = ", ".join(to) if isinstance(to, list) else to
    msg["Subject"] = subject
    msg["Message-ID"] = message_id or make_msgid(domain="example.com")
    msg.set_content("Please fax the attached invoice.\n")
    msg.add_attachment(pdf if pdf is not None else make_pdf(2), maintype="application",
                       subtype="pdf", filename=filename)
    return msg


class SMTPResult:
    def __init__(self, code: int, text: str, refused: dict[str, tuple[int, bytes]]) -> None:
        self.code = code
        self.text = text
        self.refused = refused


def _send_blocking(port: int, msg: EmailMessage | bytes, mail_from: str,
                   rcpts: list[str]) -> SMTPResult:
    """Send over a real smtplib session; returns the DATA reply (or the refusal) as seen."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("client.test")
        code, text = client.mail(mail_from)
        if code != 250:
            return SMTPResult(code, text.decode(), {})
        refused: dict[str, tuple[int, bytes]] = {}
        for rcpt in rcpts:
            code, text = client.rcpt(rcpt)
            if code != 250:
                refused[rcpt] = (code, text)
        if len(refused) == len(rcpts):
            first = next(iter(refused.values()))
            return SMTPResult(first[0], first[1].decode(), refused)
        # smtplib only fixes line ends of str data; SMTP wants CRLF.
        data = msg if isinstance(msg, bytes) else msg.as_bytes(
            policy=msg.policy.clone(linesep="\r\n"))
        code, text = client.data(data)
        return SMTPResult(code, text.decode(), refused)


async def smtp_send(port: int, msg: EmailMessage | bytes, rcpts: list[str],
                    mail_from: str = "alice@example.com") -> SMTPResult:
    """smtplib is blocking and the gateway runs on this loop: send from a thread."""
    return await asyncio.to_thread(_send_blocking, port, msg, mail_from, rcpts)


class RelaySink:
    """An aiosmtpd server acting as the report relay; captured mail arrives on a queue."""

    def __init__(self) -> None:
        self.messages: asyncio.Queue[EmailMessage] = asyncio.Queue()
        self.envelopes: list[tuple[str, list[str]]] = []
        self.server: asyncio.base_events.Server | None = None
        self.port = 0
        self.sessions: list[AioSMTP] = []  # every connection the sink took, in order
        self.quits = 0
        self._quit = asyncio.Condition()
        # stall_data: DATA is never answered (a relay that hangs); `stalled` is set once one is.
        self.stall_data = False
        self.stalled = asyncio.Event()
        self._unstall = asyncio.Event()
        # hold_data(): DATA is answered only at release_data() (a relay slow to answer).
        self._data_open = asyncio.Event()
        self._data_open.set()

    async def handle_QUIT(self, server: Any, session: Any, envelope: Any) -> str:
        async with self._quit:
            self.quits += 1
            self._quit.notify_all()
        return "221 Bye"

    async def quits_reach(self, n: int, timeout_s: float = 10.0) -> None:
        """Wait until clients have said QUIT `n` times in all."""
        async with self._quit:
            await asyncio.wait_for(self._quit.wait_for(lambda: self.quits >= n), timeout_s)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.stall_data:
            self.stalled.set()
            await self._unstall.wait()  # until the sink stops
        await self._data_open.wait()
        msg = BytesParser(policy=policy.default).parsebytes(envelope.original_content)
        self.envelopes.append((envelope.mail_from, list(envelope.rcpt_tos)))
        await self.messages.put(msg)  # type: ignore[arg-type]
        return "250 2.0.0 OK sink"

    def hold_data(self) -> None:
        """From now on DATA waits for release_data() before it is answered."""
        self._data_open.clear()

    def release_data(self) -> None:
        self._data_open.set()

    async def start(self, port: int = 0) -> None:
        """Listen on `port` (0: a free one); a stopped sink may start again on its port."""
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(self._session, "127.0.0.1", port)
        self.port = self.server.sockets[0].getsockname()[1]

    def _session(self) -> AioSMTP:
        session = AioSMTP(self, hostname="sink.test")
        self.sessions.append(session)
        return session

    def drop_connections(self) -> None:
        """Close every open connection, as a relay does to idle clients or when it stops."""
        for session in self.sessions:
            if session.transport is not None:
                session.transport.close()

    async def stop(self) -> None:
        """Down like a real relay: no listener and no connection left open."""
        self._unstall.set()
        self._data_open.set()
        if self.server:
            self.server.close()
            self.drop_connections()
            await self.server.wait_closed()

    async def next(self, timeout_s: float = 20.0) -> EmailMessage:
        return await asyncio.wait_for(self.messages.get(), timeout_s)


# Loggers setup_logging() tunes (gateway/runtime/logs.py); put back after each test.
TUNED_LOGGERS = ("mail.log", "botocore", "boto3", "s3transfer", "urllib3", "aiohttp.access")


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """What a test changes in process-wide logging it does not keep: handlers and levels set
    by setup_logging() (the CLI in-process, the log tests) and secrets registered with the
    redactor (which would otherwise mask those values in every later test's lines)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    levels = {name: logging.getLogger(name).level for name in TUNED_LOGGERS}
    srcfile = logging._srcfile  # setup_logging turns the caller lookup off: pytest shows it
    secrets = logs.registered_secrets()
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    logging._srcfile = srcfile
    for name, lvl in levels.items():
        logging.getLogger(name).setLevel(lvl)
    for value in logs.registered_secrets() - secrets:
        logs.unregister_secret(value)
    assert logs.registered_secrets() == secrets


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    server = SeaweedS3(tmp_path_factory.mktemp("seaweed"))
    server.start()
    server.create_bucket("faxgw-test")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def relay() -> AsyncIterator[RelaySink]:
    sink = RelaySink()
    await sink.start()
    yield sink
    await sink.stop()


@pytest.fixture
async def simulator() -> AsyncIterator[Simulator]:
    sim = Simulator(callback_delay_s=0.05)
    await sim.start()
    yield sim
    await sim.stop()


def base_env(data_dir: Path, **overrides: str) -> dict[str, str]:
    env = {
        "DATA_DIR": str(data_dir),
        "SMTP_LISTEN": "127.0.0.1:0",
        "HTTP_LISTEN": "127.0.0.1:0",
        "ADMIN_LISTEN": "127.0.0.1:0",
        "SMTP_HOSTNAME": "faxgw.test",
        "NOTIFY_FROM": "faxgw@faxgw.test",
        "RETRY_BASE_SECONDS": "0.05",
        "RETRY_MAX_SECONDS": "0.5",
        # Tests send many faxes at once; the pacing itself has its own test.
        "SEND_RATE_PER_SECOND": "1000",
    }
    env.update(overrides)
    return env


def production_env(data_dir: Path, simulator: Simulator, **overrides: str) -> dict[str, str]:
    return base_env(data_dir, **{**simulator_env(simulator.url), **overrides})


class GatewayFactory:
    """Starts in-process gateways for one test and stops, at teardown, every one the test
    left running (newest first), whether the test passed, failed or stopped some itself.

    Name the fixture after `simulator` and `relay` in a test's arguments: fixtures are torn
    down in reverse order, so the gateways then stop while those are still there."""

    def __init__(self, default_env: Callable[[], dict[str, str]], *, run_worker: bool) -> None:
        self.default_env = default_env
        self.run_worker = run_worker
        self.started: list[Gateway] = []

    async def __call__(self, env: dict[str, str] | None = None,
                       clock: Callable[[], float] | None = None) -> Gateway:
        settings: Settings = settings_from(env or self.default_env())
        gateway = Gateway(settings) if clock is None else Gateway(settings, clock=clock)
        await gateway.start(run_worker=self.run_worker)
        self.started.append(gateway)
        return gateway

    async def close(self) -> None:
        for gateway in reversed(self.started):
            if gateway.lock.held:  # released by Gateway.stop(): the test stopped it already
                await gateway.stop(grace_s=5)


@pytest.fixture
async def make_gateway(tmp_path: Path) -> AsyncIterator[GatewayFactory]:
    """Start gateways from an environment dict (base_env by default), the worker running;
    PUBLIC_BASE_URL is filled in once bound."""
    factory = GatewayFactory(lambda: base_env(tmp_path / "var"), run_worker=True)
    yield factory
    await factory.close()


@pytest.fixture
async def manual_gateway(tmp_path: Path) -> AsyncIterator[GatewayFactory]:
    """Gateways whose queue the test drives (no worker loop: `drive()`, `run_due()`), on the
    clock it injects: `await manual_gateway(env, FakeClock())`."""
    factory = GatewayFactory(lambda: base_env(tmp_path / "var"), run_worker=False)
    yield factory
    await factory.close()


async def wait_state(gateway: Gateway, job_id: str, state: State,
                     timeout_s: float = 20.0) -> None:
    async def reached() -> bool:
        job = await gateway.store.run(gateway.store.job, job_id)
        return job is not None and job.state is state

    await gateway.worker.wait_for(reached, timeout_s)


async def wait_state_any(gateways: list[Gateway], job_id: str, state: State,
                         timeout_s: float = 20.0) -> None:
    """`wait_state` for a job that any of several nodes on one database may work (a node
    free when the mail came wakes and takes it: LISTEN/NOTIFY)."""
    waits = [asyncio.ensure_future(wait_state(gw, job_id, state, timeout_s))
             for gw in gateways]
    done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    for task in done:
        task.result()  # a timeout, if that is what ended first


def relay_env(relay: RelaySink, **extra: str) -> dict[str, str]:
    """Settings that send reports to the test's relay sink."""
    return {"NOTIFY_SMTP_HOST": "127.0.0.1", "NOTIFY_SMTP_PORT": str(relay.port),
            "NOTIFY_SMTP_TLS": "none", **extra}


async def send_one(gw: Gateway, number: str = "15551234567") -> str:
    """Send one PDF mail to `number`; returns the job id from the 250 reply."""
    reply = await smtp_send(gw.smtp.port, pdf_mail(f"{number}@fax.local"),
                            [f"{number}@fax.local"])
    assert reply.code == 250, reply.text
    [job_id] = job_ids(reply.text)
    return job_id


class FakeClock:
    """An injectable clock the test moves by hand."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


async def drive(gw: Gateway, simulator: Simulator) -> None:
    """Run the queue by hand until nothing is due and the simulator has called back."""
    for _ in range(50):
        await gw.worker.run_until_idle()
        await simulator.state.wait_idle()
        if await gw.worker.run_due() == 0:
            return
    raise AssertionError("queue did not settle")


# -- PostgreSQL: a real server on 127.0.0.1:5432, one database per test run ---------------------

PG_ADMIN_URL = os.environ.get("FAXGW_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A database of this test run's own, dropped at the end. No server: the PostgreSQL tests
    skip (one line), except under CI=true, where they fail."""
    import psycopg

    name = f"faxgw_test_{os.getpid()}_{secrets.token_hex(3)}"
    try:
        admin = psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        reason = f"no PostgreSQL at {PG_ADMIN_URL}: {str(exc).splitlines()[0]}"
        if os.environ.get("CI") == "true":
            pytest.fail(reason + " (CI=true: required)")
        pytest.skip(reason)
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pgbouncer_url(pg_url: str) -> Iterator[str]:
    """The test run's database behind a real PgBouncer in transaction mode (tests/pgbouncer.py),
    a new one for each test (it starts in a few milliseconds), so that no test meets the server
    connections another test left. Missing PgBouncer: skipped (one line), except under CI=true,
    where .ci/run installs it."""
    from urllib.parse import urlsplit

    from . import pgbouncer

    if not pgbouncer.available():
        if os.environ.get("CI") == "true":
            pytest.fail("no pgbouncer (CI=true: .ci/run installs Debian's pgbouncer)")
        pytest.skip("needs PgBouncer (Debian's pgbouncer package)")
    server = urlsplit(pg_url)
    bouncer = pgbouncer.PgBouncer(server.hostname or "127.0.0.1", server.port or 5432)
    bouncer.start()
    try:
        yield bouncer.url(server.path.lstrip("/"))
    finally:
        bouncer.close()


def pg_reset(url: str) -> None:
    """An empty schema: each test starts from a new database as far as it can tell."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as db:
        db.execute("DROP SCHEMA public CASCADE")
        db.execute("CREATE SCHEMA public")


def needs(available: bool, what: str) -> pytest.MarkDecorator:
    """Skip a test whose tool is missing on this machine, with one clear line; but under CI
    (`CI=true`), where .ci/run installs it, run it anyway so that a missing tool fails."""
    return pytest.mark.skipif(not available and os.environ.get("CI") != "true",
                              reason=f"needs {what}")
