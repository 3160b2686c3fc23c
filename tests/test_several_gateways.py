"""Several gateways, one queue: PostgreSQL (DATABASE_URL), shared S3 (SeaweedFS), the simulator
and the report relay in the test process (they outlive every node), nodes as real processes
where one is killed with -9."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import shutil
import smtplib
import subprocess
import sys
import time
from email.message import EmailMessage
from pathlib import Path

import aiohttp
import psycopg
import pytest
from pypdf import PdfReader

from testsupport.harness import DaemonProcess
from testsupport.s3server import SeaweedS3

from .conftest import (
    GatewayFactory,
    RelaySink,
    Simulator,
    drive,
    job_ids,
    pdf_mail,
    pg_reset,
    production_env,
    smtp_send,
)
from .helpers.cluster import (
    all_reported,
    db_states,
    s3_credentials,  # noqa: F401 - a fixture
    send,
    shared_env,
)
from .helpers.partial import split


def test_media_store_local_with_database_url_exits_78(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "DATA_DIR": str(tmp_path / "var"), "MEDIA_STORE": "local",
           "DATABASE_URL": "postgresql://faxgw:pw-not-shown@127.0.0.1:5432/faxgw"}
    done = subprocess.run([sys.executable, "-m", "gateway", "run"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 78, done.stderr
    assert "MEDIA_STORE=local with DATABASE_URL" in done.stderr
    assert "pw-not-shown" not in done.stderr + done.stdout


async def test_a_mail_sent_twice_is_faxed_once(make_gateway: GatewayFactory,
                                               simulator: Simulator, relay: RelaySink,
                                               tmp_path: Path) -> None:
    """SQLite, one gateway: the client lost our 250 and sent the same mail again."""
    gw = await make_gateway(production_env(tmp_path / "var", simulator,
                                           NOTIFY_SMTP_HOST="127.0.0.1",
                                           NOTIFY_SMTP_PORT=str(relay.port),
                                           NOTIFY_SMTP_TLS="none"))
    msg = pdf_mail("15551234567@fax.local", message_id="<resent-1@example.com>")
    first = await smtp_send(gw.smtp.port, msg, ["15551234567@fax.local"])
    again = await smtp_send(gw.smtp.port, msg, ["15551234567@fax.local"])
    assert first.code == again.code == 250
    [job_id] = job_ids(first.text)
    assert again.text.startswith(f"2.0.0 Already queued as fax job {job_id} ")
    # A different mail with no Message-ID is never merged, even with the same document.
    bare = pdf_mail("15551234567@fax.local")
    del bare["Message-ID"]
    third = await smtp_send(gw.smtp.port, bare, ["15551234567@fax.local"])
    fourth = await smtp_send(gw.smtp.port, bare, ["15551234567@fax.local"])
    assert len({*job_ids(third.text), *job_ids(fourth.text), job_id}) == 3
    for _ in range(3):
        await relay.next(30)
    await simulator.state.wait_idle()
    assert len(simulator.state.send_requests) == 3


async def test_a_mail_with_a_cover_page_sent_twice_is_faxed_once(
        make_gateway: GatewayFactory, simulator: Simulator, relay: RelaySink,
        tmp_path: Path) -> None:
    """The cover page shows the mail's own Date:, so the same mail renders the same PDF
    seconds later and is recognised (it once showed the arrival time, and was faxed twice)."""
    gw = await make_gateway(production_env(tmp_path / "var", simulator, FAX_COVER="yes",
                                           NOTIFY_SMTP_HOST="127.0.0.1",
                                           NOTIFY_SMTP_PORT=str(relay.port),
                                           NOTIFY_SMTP_TLS="none"))
    msg = pdf_mail("15551234567@fax.local", message_id="<cover-1@example.com>")
    msg["Date"] = "Sun, 29 Nov 2026 09:00:00 +0000"  # every mail client sets one
    first = await smtp_send(gw.smtp.port, msg, ["15551234567@fax.local"])
    assert "(3 pages)" in first.text, first.text  # the cover and the document's two
    gw.intake.clock = lambda: time.time() + 7  # arrives "seconds later"
    again = await smtp_send(gw.smtp.port, msg, ["15551234567@fax.local"])
    [job_id] = job_ids(first.text)
    assert again.text.startswith(f"2.0.0 Already queued as fax job {job_id} "), again.text


async def test_two_gateways_work_one_queue(make_gateway: GatewayFactory, pg_url: str,
                                           seaweed: SeaweedS3, s3_credentials: None,
                                           simulator: Simulator, relay: RelaySink,
                                           tmp_path: Path) -> None:
    pg_reset(pg_url)
    keep = {"DOCUMENT_RETENTION_HOURS": "1"}  # so the operator can resend at the end
    a = await make_gateway(shared_env(tmp_path, "node-a", pg_url, seaweed, simulator, relay,
                                      **keep))
    b = await make_gateway(shared_env(tmp_path, "node-b", pg_url, seaweed, simulator, relay,
                                      **keep))
    sent: list[str] = []
    for i in range(6):
        gw = (a, b)[i % 2]
        sent += await send(gw.smtp.port, f"155512{i + 10:05d}")
    # The 250 came after the document was in S3: the jobs start in `stored`.
    events = await a.store.run(a.store.events, sent[0])
    assert [(e.kind, e.detail) for e in events[:2]] == [
        ("received", events[0].detail), ("stored", "document in the media store before the 250")]
    # Resent to the other node after a lost 250: the same job.
    msg = pdf_mail("15551299999@fax.local", message_id="<lost-250@example.com>")
    one = await smtp_send(a.smtp.port, msg, ["15551299999@fax.local"])
    two = await smtp_send(b.smtp.port, msg, ["15551299999@fax.local"])
    assert job_ids(one.text) == job_ids(two.text)
    sent += job_ids(one.text)
    reports = [await relay.next(60) for _ in range(len(sent))]
    await simulator.state.wait_idle()
    assert all("delivered" in r["Subject"] for r in reports)
    assert len(simulator.state.send_requests) == len(sent) == 7
    assert sorted(r["To"] for r in simulator.state.send_requests) == sorted(
        {r["To"] for r in simulator.state.send_requests})  # each number once
    assert await all_reported(pg_url) == {"reported"}

    # Each node says who it is; the queue depth and /readyz are the shared database's.
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{b.web.port}/metrics") as resp:
            text = await resp.text()
        async with http.get(f"http://127.0.0.1:{b.web.port}/readyz") as resp:
            ready = await resp.text()
    assert 'faxgw_node_info{node_id="node-b",store="postgresql"} 1.0' in text
    assert "faxgw_queue_depth 0.0" in text
    assert "postgresql://postgres@127.0.0.1" in ready and "node node-b" in ready

    # The CLI on a third machine (no pid file, no spool): it reads the shared database, and a
    # resend is picked up by whichever node looks at the queue next.
    env = dict(shared_env(tmp_path, "cli", pg_url, seaweed, simulator, relay),
               DOCUMENT_RETENTION_HOURS="1")
    cli_env = {k: v for k, v in os.environ.items() if not k.startswith(("FAXGW_",))}
    cli_env.update(env)

    def faxgw(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "gateway", *args], env=cli_env,
                              capture_output=True, text=True, timeout=60)

    listing = await asyncio.to_thread(faxgw, "jobs")
    assert listing.returncode == 0, listing.stderr
    assert all(job_id in listing.stdout for job_id in sent)
    shown = await asyncio.to_thread(faxgw, "job", sent[0])
    assert shown.returncode == 0 and "delivered" in shown.stdout, shown.stdout + shown.stderr
    again = await asyncio.to_thread(faxgw, "resend", sent[-1])
    assert again.returncode == 0, again.stderr
    report = await relay.next(30)
    assert "delivered" in report["Subject"]
    assert len(simulator.state.send_requests) == 8


async def test_a_node_killed_with_9_leaves_nothing_behind(pg_url: str, seaweed: SeaweedS3,
                                                          s3_credentials: None,
                                                          simulator: Simulator,
                                                          relay: RelaySink,
                                                          tmp_path: Path) -> None:
    """Mail to both nodes; node-a dies with -9 while its faxes are under way and never comes
    back: node-b takes its jobs over after the lease, each is faxed once and reported once."""
    pg_reset(pg_url)
    a = DaemonProcess(shared_env(tmp_path, "node-a", pg_url, seaweed, simulator, relay),
                      tmp_path / "a.log")
    b = DaemonProcess(shared_env(tmp_path, "node-b", pg_url, seaweed, simulator, relay),
                      tmp_path / "b.log")
    try:
        await a.start()
        await b.start()
        simulator.state.hold_queue()  # faxes stay queued: node-a dies with work under way
        sent: list[str] = []
        for i in range(8):
            sent += await send((a, b)[i % 2].smtp_port, f"155513{i + 10:05d}")
        await a.kill9()
        killed_at = time.monotonic()
        simulator.state.release_queue()
        reports = [await relay.next(60) for _ in range(len(sent))]
        took = time.monotonic() - killed_at
        await simulator.state.wait_idle(30)
        assert await b.terminate() == 0, b.log_tail()
    finally:
        await a.close()
        await b.close()
    assert relay.messages.empty(), "a job was reported twice"
    assert len(reports) == 8 and all("delivered" in r["Subject"] for r in reports)
    numbers = [r["To"] for r in simulator.state.send_requests]
    assert len(numbers) == len(set(numbers)) == 8, numbers  # each faxed exactly once
    assert await all_reported(pg_url) == {"reported"}
    print(f"all {len(sent)} reported {took:.1f} s after the kill (LEASE_SECONDS=3)")


async def test_a_send_left_in_submitting_is_looked_up_by_the_node_that_takes_over(
        pg_url: str, seaweed: SeaweedS3, s3_credentials: None, simulator: Simulator,
        relay: RelaySink, tmp_path: Path) -> None:
    """node-a dies right after SignalWire took the fax, before recording it: its job sits in
    `submitting` under node-a's lease. node-b waits out the lease, finds the fax at SignalWire
    and does not send it again."""
    pg_reset(pg_url)
    a = DaemonProcess(shared_env(tmp_path, "node-a", pg_url, seaweed, simulator, relay),
                      tmp_path / "a.log")
    b = DaemonProcess(shared_env(tmp_path, "node-b", pg_url, seaweed, simulator, relay,
                                 WORKER_CONCURRENCY="1"), tmp_path / "b.log")
    try:
        await a.start(crash_at="after-send")
        # Until node-a has claimed the job, node-b must not: start it once node-a is dead.
        [job_id] = await send(a.smtp_port, "15551300042")
        assert await a.wait_exit() == -9
        died_at = time.monotonic()
        with psycopg.connect(pg_url) as db:
            state, owner = db.execute("SELECT state, lease_owner FROM jobs WHERE id = %s",
                                      (job_id,)).fetchone()
        assert (state, owner) == ("submitting", "node-a")
        await b.start()
        report = await relay.next(60)
        took = time.monotonic() - died_at
        await all_reported(pg_url)
        assert await b.terminate() == 0, b.log_tail()
    finally:
        await a.close()
        await b.close()
    assert "delivered" in report["Subject"]
    assert len(simulator.state.send_requests) == 1  # looked up, not resent
    assert any("found at SignalWire" in line for line in b.lines), b.log_tail()
    assert took >= 3  # not before node-a's lease ran out
    print(f"taken over and reported {took:.1f} s after node-a died (LEASE_SECONDS=3)")


async def test_rate_limits_and_lockouts_are_shared_by_the_nodes(pg_url: str,
                                                                tmp_path: Path) -> None:
    """Two nodes' access checks on one database: a sender gets its hourly limit once, not
    once per node, and a lockout started on one node holds on the other."""
    from gateway.config import settings_from
    from gateway.smtp.access import Access
    from gateway.store.postgres import PostgresStore

    pg_reset(pg_url)
    settings = settings_from({"DATA_DIR": str(tmp_path), "RATE_LIMIT_PER_SENDER": "2",
                              "AUTH_MAX_FAILURES": "2"})
    stores = [PostgresStore(pg_url), PostgresStore(pg_url)]
    for store in stores:
        await store.start()
    try:
        a, b = (Access(settings, store=store) for store in stores)
        client = a.client("192.0.2.7", None, "scanner@example.com")
        # RCPT only looks: naming recipients charges nothing (issue 15's lock-out attack).
        for _ in range(5):
            assert await a.check_destination_async(client, "+15551230011") is None
        # DATA charges: one fax accepted on each node uses the sender's 2 an hour.
        assert await a.reserve_async(client, 1) is None
        assert await b.reserve_async(client, 1) is None
        refusal = await a.check_destination_async(client, "+15551230013")
        assert refusal is not None and str(refusal).startswith("450 4.7.1 Rate limit reached")
        assert await b.reserve_async(client, 1) is not None
        # A message refused at DATA gives its charge back, on any node.
        await a.release_async(client, 1)
        assert await b.check_destination_async(client, "+15551230013") is None
        other = b.client("192.0.2.8", None, "someone@example.com")
        assert await b.check_destination_async(other, "+15551230014") is None
        # A lockout: failures on both nodes add up; the lock holds everywhere.
        assert await a._failed_login("192.0.2.9") == 0.0
        assert await b._failed_login("192.0.2.9") == settings.access.auth_lockout_minutes * 60
        assert await a.locked_out("192.0.2.9") > 0
        assert await b.locked_out("192.0.2.10") == 0.0
    finally:
        for store in stores:
            await store.stop()


async def test_rcpt_reads_the_shared_counts_once_a_second_while_far_from_the_limits(
        pg_url: str, tmp_path: Path) -> None:
    """RCPT only looks (DATA's charge decides): far from the limits a node answers RCPT from
    the counts it read in the last RCPT_COUNTS_S, so most recipients cost no round trip; near
    a limit, and once the counts are older, it reads again and sees the other nodes' charges."""
    from gateway.config import settings_from
    from gateway.smtp.access import RCPT_COUNTS_S, Access
    from gateway.store.postgres import PostgresStore

    pg_reset(pg_url)
    settings = settings_from({"DATA_DIR": str(tmp_path), "RATE_LIMIT_PER_SENDER": "30"})
    stores = [PostgresStore(pg_url), PostgresStore(pg_url)]
    for store in stores:
        await store.start()
    try:
        now = [0.0]
        a = Access(settings, clock=lambda: now[0], store=stores[0])
        b = Access(settings, store=stores[1])
        reads: list[int] = []
        counts = stores[0].hit_counts

        def counted(*args: object) -> dict[tuple[str, str], int]:
            reads.append(1)
            return counts(*args)  # type: ignore[arg-type]

        stores[0].hit_counts = counted  # type: ignore[method-assign]
        client = a.client("192.0.2.7", None, "scanner@example.com")
        for _ in range(5):
            assert await a.check_destination_async(client, "+15551230011") is None
        assert len(reads) == 1
        assert await a.reserve_async(client, 27) is None  # its own charge: counted at once
        assert await a.check_destination_async(client, "+15551230011") is None
        assert len(reads) == 2  # 3 left of 30: within a tenth of the limit, it reads
        assert await b.reserve_async(client, 3) is None  # the other node takes the rest
        refusal = await a.check_destination_async(client, "+15551230011")
        assert refusal is not None and str(refusal).startswith("450 4.7.1 Rate limit reached")
        assert await a.reserve_async(client, 1) is not None  # DATA always asks the database
        # Another sender, far from its limit when node a last looked: node b's charges show at
        # node a's RCPT once its counts are RCPT_COUNTS_S old.
        other = a.client("192.0.2.8", None, "copier@example.com")
        assert await a.check_destination_async(other, "+15551230012") is None
        assert await b.reserve_async(other, 30) is None
        assert await a.check_destination_async(other, "+15551230012") is None  # not read
        now[0] += RCPT_COUNTS_S + 0.1
        refusal = await a.check_destination_async(other, "+15551230012")
        assert refusal is not None and str(refusal).startswith("450 4.7.1 Rate limit reached")
    finally:
        for store in stores:
            await store.stop()


async def test_a_shared_database_that_stops_answering_is_a_451_not_a_traceback(
        pg_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The shared checks at AUTH, RCPT and DATA meet a dropped connection: the driver's error
    becomes StoreError, and the SMTP side answers 451 "database unavailable" in one line."""
    from gateway.config import settings_from
    from gateway.smtp.access import Access
    from gateway.smtp.replies import DATABASE_UNAVAILABLE
    from gateway.smtp.server import FaxHandler
    from gateway.store.base import StoreError
    from gateway.store.postgres import PostgresStore

    pg_reset(pg_url)
    from gateway.smtp.access import RCPT_COUNTS_S

    settings = settings_from({"DATA_DIR": str(tmp_path)})
    store = PostgresStore(pg_url, connect_timeout_s=2)  # the outage is found in 2 s
    await store.start()
    try:
        now = [0.0]
        access = Access(settings, clock=lambda: now[0], store=store)
        client = access.client("192.0.2.7", None, "scanner@example.com")
        assert await access.check_destination_async(client, "+15551230011") is None
        dbname = pg_url.rsplit("/", 1)[1]
        admin_url = pg_url.rsplit("/", 1)[0] + "/postgres"
        # The server drops us and takes no new connection (a store thread that held none
        # would take a fresh one, checked, and go on: the outage must last).
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS false')
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                          " WHERE datname = %s", (dbname,))
        # The counts RCPT read a moment ago still stand (the limits have room to spare).
        assert await access.check_destination_async(client, "+15551230011") is None
        now[0] += RCPT_COUNTS_S + 0.1
        with pytest.raises(StoreError, match="did not answer") as caught:
            await access.check_destination_async(client, "+15551230011")
        # What aiosmtpd does with an exception in a command: the handler's exception hook.
        handler = FaxHandler(settings, None, access)  # type: ignore[arg-type]  # no DATA here
        with caplog.at_level(logging.WARNING):
            reply = await handler.handle_exception(caught.value)
        assert reply == str(DATABASE_UNAVAILABLE)
        assert not [r for r in caplog.records if r.exc_info]
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS true')
        # The pool tries again after a growing pause (1 s, 2 s, ...): wait for its next try.
        await asyncio.to_thread(store.pool.wait, 30)
        # Back: the next check works on a fresh connection (no store thread goes on with the
        # connection it kept from before the outage, whichever thread failed).
        assert await access.check_destination_async(client, "+15551230011") is None
    finally:
        await store.stop()


async def test_a_report_mailed_by_another_node_carries_the_document(
        manual_gateway: GatewayFactory, pg_url: str, seaweed: SeaweedS3, s3_credentials: None,
        simulator: Simulator, relay: RelaySink, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """node-a takes two mails and is gone with its disk before either is reported; node-b
    reports both. The document comes from the shared media store for the thumbnail and the
    attached PDF; when it cannot be fetched, the report still goes, without them."""
    from gateway.cli import sample_pdf

    pg_reset(pg_url)
    a = await manual_gateway(shared_env(tmp_path, "node-a", pg_url, seaweed, simulator, relay))
    b = await manual_gateway(shared_env(tmp_path, "node-b", pg_url, seaweed, simulator, relay,
                                        REPORT_ATTACH_PDF="yes"))
    pdfs = [sample_pdf("fetched for the report"), sample_pdf("gone before the report")]
    sent: list[str] = []
    for i, pdf in enumerate(pdfs):
        number = f"155514{i + 10:05d}"
        reply = await smtp_send(a.smtp.port, pdf_mail(f"{number}@fax.local", pdf=pdf),
                                [f"{number}@fax.local"])
        assert reply.code == 250, reply.text
        sent += job_ids(reply.text)
    await a.stop()
    shutil.rmtree(tmp_path / "node-a" / "spool")  # the node's disk went with it
    assert await b.worker.run_due() == 2  # node-b sends both
    await simulator.state.wait_idle()
    # The second document leaves the media store after its fax, before its report.
    second = await b.store.run(b.store.job, sent[1])
    assert second is not None and second.media_key is not None
    await b.media.delete(second.media_key)
    with caplog.at_level(logging.INFO):
        await drive(b, simulator)
        reports = {r["X-Faxgw-Job"]: r for r in [await relay.next(30), await relay.next(30)]}
    assert await all_reported(pg_url) == {"reported"}

    def parts(report: EmailMessage) -> list[str]:
        return [p.get_content_type() for p in report.walk()]

    fetched = reports[sent[0]]
    assert "image/png" in parts(fetched)
    [attached] = [p for p in fetched.iter_attachments()
                  if p.get_content_type() == "application/pdf"]
    assert attached.get_content() == pdfs[0]
    assert "delivered" in reports[sent[1]]["Subject"]
    assert "image/png" not in parts(reports[sent[1]])
    assert "application/pdf" not in parts(reports[sent[1]])
    warnings = [r.getMessage() for r in caplog.records
                if r.levelno >= logging.WARNING and "media store" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith(f"job {sent[1]}: "), warnings
    assert not [r for r in caplog.records if "X-Amz-" in r.getMessage()]
    assert not list((tmp_path / "node-b" / "spool").glob(".report-*"))  # temp files gone


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_copies_of_a_mail_arriving_together_make_one_job(
        backend: str, manual_gateway: GatewayFactory, seaweed: SeaweedS3, s3_credentials: None,
        simulator: Simulator, relay: RelaySink, tmp_path: Path,
        request: pytest.FixtureRequest) -> None:
    """The client sent the same mail over two connections at once (to one gateway, or to two
    nodes): the commit decides, so one becomes the job and the other answers with its id."""
    if backend == "postgresql":
        pg_url = request.getfixturevalue("pg_url")
        pg_reset(pg_url)
        prefix = f"multi-{tmp_path.name}"
        gateways = [await manual_gateway(shared_env(tmp_path, name, pg_url, seaweed, simulator,
                                                    relay)) for name in ("node-a", "node-b")]
    else:
        gateways = [await manual_gateway(production_env(tmp_path / "var", simulator))] * 2
    msg = pdf_mail("15551234567@fax.local", message_id="<together-1@example.com>")
    replies = await asyncio.gather(*(smtp_send(gw.smtp.port, msg, ["15551234567@fax.local"])
                                     for gw in gateways))
    assert [r.code for r in replies] == [250, 250], [r.text for r in replies]
    [job_id] = {i for r in replies for i in job_ids(r.text)}
    again = [r.text for r in replies if r.text.startswith("2.0.0 Already queued as fax job")]
    assert len(again) == 1 and job_id in again[0], [r.text for r in replies]
    assert [j.id for j in await gateways[0].store.run(gateways[0].store.jobs)] == [job_id]
    # The copy that lost kept nothing: one spool file, and (shared) one object in S3.
    spooled = [p for gw in gateways for p in gw.spool.root.glob("*.pdf")]
    assert len(set(spooled)) == 1
    if backend == "postgresql":
        listed = seaweed.client().list_objects_v2(Bucket="faxgw-test", Prefix=prefix)
        [key] = [o["Key"] for o in listed.get("Contents", [])]
        job = await gateways[0].store.run(gateways[0].store.job, job_id)
        assert job is not None and job.media_key and key.endswith(job.media_key)


async def test_a_data_charge_refused_meanwhile_is_the_rate_refusal_and_no_mail(
        make_gateway: GatewayFactory, pg_url: str, seaweed: SeaweedS3, s3_credentials: None,
        simulator: Simulator, relay: RelaySink, tmp_path: Path) -> None:
    """The shared DATA charge is decided while the document is converted. Two sessions of one
    sender pass RCPT on two nodes while one fax is left in its hour; the second DATA gets the
    rate limit's 450, even with a broken document (no refusal mail: the sender is over the
    limit, as when the charge came first), and nothing of it is kept."""
    pg_reset(pg_url)
    limits = {"RATE_LIMIT_PER_SENDER": "1"}
    a = await make_gateway(shared_env(tmp_path, "node-a", pg_url, seaweed, simulator, relay,
                                      **limits))
    b = await make_gateway(shared_env(tmp_path, "node-b", pg_url, seaweed, simulator, relay,
                                      **limits))

    def past_rcpt(port: int, number: str) -> smtplib.SMTP:
        client = smtplib.SMTP("127.0.0.1", port, timeout=30)
        client.ehlo("client.test")
        assert client.mail("alice@example.com")[0] == 250
        assert client.rcpt(f"{number}@fax.local")[0] == 250  # RCPT only looks
        return client

    def data(client: smtplib.SMTP, msg: EmailMessage) -> tuple[int, bytes]:
        try:
            return client.data(msg.as_bytes(policy=msg.policy.clone(linesep="\r\n")))
        finally:
            client.quit()

    one = await asyncio.to_thread(past_rcpt, a.smtp.port, "15551230011")
    two = await asyncio.to_thread(past_rcpt, b.smtp.port, "15551230012")
    code, text = await asyncio.to_thread(data, one, pdf_mail("15551230011@fax.local"))
    assert code == 250, text
    code, text = await asyncio.to_thread(data, two, pdf_mail("15551230012@fax.local", pdf=b""))
    assert code == 450 and text.startswith(b"4.7.1 Rate limit reached"), text
    await asyncio.gather(*a.intake._tasks, *b.intake._tasks)  # refusal mails go out here
    # A broken document from a sender under the limit: 554 and a refusal mail, as ever.
    bob = await smtp_send(a.smtp.port, pdf_mail("15551230013@fax.local", pdf=b"",
                                                sender="bob@example.com"),
                          ["15551230013@fax.local"], mail_from="bob@example.com")
    assert bob.code == 554 and "is empty" in bob.text, bob.text
    mails = [await relay.next(30), await relay.next(30)]  # bob's refusal, alice's one report
    assert sorted(str(m["To"]) for m in mails) == ["alice@example.com", "bob@example.com"]
    assert "delivered" in str(next(m for m in mails if "alice" in str(m["To"]))["Subject"])
    assert relay.messages.empty()
    # Nothing of the refused mail was kept: one job, one document in the media store.
    assert await all_reported(pg_url) == {"reported"} and len(db_states(pg_url)) == 1
    assert len(simulator.state.send_requests) == 1
    assert [p for p in (tmp_path / "node-b").rglob("*.pdf*")] == []


async def test_a_spool_that_cannot_be_written_leaves_no_object_in_s3(
        manual_gateway: GatewayFactory, pg_url: str, seaweed: SeaweedS3, s3_credentials: None,
        simulator: Simulator, relay: RelaySink, tmp_path: Path) -> None:
    """Shared, the PUT to S3 runs while the spool links the document in: when the spool
    write fails the sender gets 451 and the object the PUT made is deleted again."""
    pg_reset(pg_url)
    gw = await manual_gateway(shared_env(tmp_path, "node-a", pg_url, seaweed, simulator, relay))
    shutil.rmtree(gw.spool.root, ignore_errors=True)
    gw.spool.root.write_text("not a directory")  # mkdir of the spool fails: an OSError
    reply = await smtp_send(gw.smtp.port, pdf_mail("15551234567@fax.local"),
                            ["15551234567@fax.local"])
    assert reply.code == 451 and reply.text.startswith("4.3.0"), reply.text
    listed = seaweed.client().list_objects_v2(Bucket="faxgw-test",
                                              Prefix=f"multi-{tmp_path.name}")
    assert listed.get("Contents", []) == []
    assert await gw.store.run(gw.store.jobs) == []
    gw.spool.root.unlink()  # the disk is back: the sender's retry goes through
    again = await smtp_send(gw.smtp.port, pdf_mail("15551234567@fax.local"),
                            ["15551234567@fax.local"])
    assert again.code == 250, again.text


def numbered_pdf(pages: int) -> bytes:
    """A PDF whose pages say "Page 1", "Page 2", ...: the fax shows whether they kept order."""
    from reportlab.pdfgen import canvas

    out = io.BytesIO()
    pdf = canvas.Canvas(out)
    for n in range(1, pages + 1):
        pdf.setFont("Helvetica", 48)
        pdf.drawString(100, 600, f"Page {n}")
        pdf.showPage()
    pdf.save()
    return out.getvalue()


def split_mail(pages: int, parts: int, ident: str) -> list[bytes]:
    msg = pdf_mail("15551234567@fax.local", pdf=numbered_pdf(pages),
                   message_id=f"<whole-{ident}>")
    raw = msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))
    return split(raw, parts, ident)


async def test_a_split_mail_whose_parts_reach_two_gateways_is_faxed_once(
        make_gateway: GatewayFactory, pg_url: str, seaweed: SeaweedS3, s3_credentials: None,
        simulator: Simulator, relay: RelaySink, tmp_path: Path) -> None:
    """Parts 1 and 3 at node A, part 2 at node B: each node kept its parts to itself, all
    three got `250 Part N received` and no fax was ever sent. The parts are in the shared
    store now, so B, which gets the last one, joins the set."""
    pg_reset(pg_url)
    a = await make_gateway(shared_env(tmp_path, "node-a", pg_url, seaweed, simulator, relay))
    b = await make_gateway(shared_env(tmp_path, "node-b", pg_url, seaweed, simulator, relay))
    parts = split_mail(3, 3, "scan-2@copier.example")
    rcpt = ["15551234567@fax.local"]
    for gw, n in ((a, 1), (a, 3)):
        reply = await smtp_send(gw.smtp.port, parts[n - 1], rcpt)
        assert (reply.code, reply.text) == (250, f"2.0.0 Part {n} of 3 received; the fax is "
                                                 "sent when all parts have arrived")
    last = await smtp_send(b.smtp.port, parts[1], rcpt)
    assert last.code == 250 and "(3 pages)" in last.text, last.text
    [job_id] = job_ids(last.text)
    await all_reported(pg_url)
    assert len(simulator.state.send_requests) == 1
    [fax] = simulator.state.faxes.values()
    assert fax.media_bytes is not None
    pages = [" ".join(p.extract_text().split())
             for p in PdfReader(io.BytesIO(fax.media_bytes)).pages]
    assert pages == ["Page 1", "Page 2", "Page 3"], pages
    # Nothing of the parts is left: no rows, no objects in S3 (only the fax's document).
    with psycopg.connect(pg_url) as db:
        assert db.execute("SELECT COUNT(*) FROM partial_sets").fetchone() == (0,)
        assert db.execute("SELECT COUNT(*) FROM partials").fetchone() == (0,)
    listed = seaweed.client().list_objects_v2(Bucket="faxgw-test",
                                              Prefix=f"multi-{tmp_path.name}")
    assert [o["Key"] for o in listed.get("Contents", []) if "partial-" in o["Key"]] == []
    assert [j.id for j in await a.store.run(a.store.jobs)] == [job_id]


async def test_the_last_two_parts_at_two_gateways_at_once_make_one_fax(
        manual_gateway: GatewayFactory, pg_url: str, seaweed: SeaweedS3, s3_credentials: None,
        simulator: Simulator, relay: RelaySink, tmp_path: Path) -> None:
    """Parts 2 and 3 reach A and B at the same moment: the commit that completes the set
    claims it, so exactly one node joins it, whichever order the commits take."""
    pg_reset(pg_url)
    a = await manual_gateway(shared_env(tmp_path, "node-a", pg_url, seaweed, simulator, relay))
    b = await manual_gateway(shared_env(tmp_path, "node-b", pg_url, seaweed, simulator, relay))
    rcpt = ["15551234567@fax.local"]
    for round_ in range(3):
        parts = split_mail(2, 3, f"race-{round_}@copier.example")
        assert (await smtp_send(a.smtp.port, parts[0], rcpt)).code == 250
        replies = await asyncio.gather(smtp_send(a.smtp.port, parts[1], rcpt),
                                       smtp_send(b.smtp.port, parts[2], rcpt))
        assert [r.code for r in replies] == [250, 250], [r.text for r in replies]
        queued = [r.text for r in replies if "Queued as fax job" in r.text]
        assert len(queued) == 1, [r.text for r in replies]
        others = [r.text for r in replies if r.text not in queued]
        assert "received; the fax is sent when all parts have arrived" in others[0]
    jobs = await a.store.run(a.store.jobs)
    assert len(jobs) == 3 and len({j.message_id for j in jobs}) == 3
    with psycopg.connect(pg_url) as db:
        assert db.execute("SELECT COUNT(*) FROM partial_sets").fetchone() == (0,)


async def test_a_split_mail_whose_joining_node_died_is_joined_when_its_last_part_comes_again(
        make_gateway: GatewayFactory, pg_url: str, seaweed: SeaweedS3, s3_credentials: None,
        simulator: Simulator, relay: RelaySink, tmp_path: Path) -> None:
    """node-a took the last part, claimed the set for its join and died (-9) before queuing
    the fax; the copier, which got no answer, sends that part again, to node-b, later: the
    claim is stale, node-b joins the set and the fax is sent (it was told "being faxed", and
    nothing ever was)."""
    pg_reset(pg_url)
    a = DaemonProcess(shared_env(tmp_path, "node-a", pg_url, seaweed, simulator, relay),
                      tmp_path / "a.log")
    rcpt = ["15551234567@fax.local"]
    parts = split_mail(2, 2, "died@copier.example")
    try:
        await a.start(crash_at="partial-claimed")
        assert (await smtp_send(a.smtp_port, parts[0], rcpt)).code == 250
        with pytest.raises(smtplib.SMTPException):
            await smtp_send(a.smtp_port, parts[1], rcpt)
        assert await a.wait_exit() == -9
    finally:
        await a.close()
    with psycopg.connect(pg_url) as db:
        assert db.execute("SELECT state, owner LIKE 'node-a/%' FROM partial_sets"
                          ).fetchall() == [("joining", True)]
    env = shared_env(tmp_path, "node-b", pg_url, seaweed, simulator, relay)
    soon = await make_gateway(env)
    reply = await smtp_send(soon.smtp.port, parts[1], rcpt)
    assert reply.text == ("2.0.0 Part 2 received; the message it belongs to is complete and "
                          "being faxed"), reply.text  # node-a might still be at it
    await soon.stop(grace_s=5)
    later = await make_gateway(env, clock=lambda: time.time() + 1000)  # past the claim's life
    reply = await smtp_send(later.smtp.port, parts[1], rcpt)
    assert reply.code == 250 and "Queued as fax job" in reply.text, reply.text
    await all_reported(pg_url)
    assert len(simulator.state.send_requests) == 1
    with psycopg.connect(pg_url) as db:
        assert db.execute("SELECT COUNT(*) FROM partial_sets").fetchone() == (0,)
