"""Told the truth, exactly once (issue 23, outbound): a fax sid is one job's only, a node that
lost its claim to a job neither sends, mails nor records, a report mailed is recorded and not
mailed again, a status callback is never lost to a race or an outage.

In-process gateways on SQLite and on PostgreSQL (with the shared S3, as a cluster runs), the
simulator over HTTP and the relay sink; a second node is a second store on the same database.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import pytest

from gateway.daemon import Gateway
from gateway.jobs.outbound_states import CallbackAction, State
from gateway.store.base import DB_FILENAME
from gateway.store.postgres import PostgresStore
from gateway.store.sql import SqlStore
from gateway.store.sqlite import SqliteStore

from .conftest import (
    GatewayFactory,
    RelaySink,
    Simulator,
    drive,
    pg_reset,
    production_env,
    relay_env,
    send_one,
)

NUMBER = "15551230077"


class ShiftedClock:
    """Real time (the simulator dates its faxes by it) that a test may move on."""

    def __init__(self) -> None:
        self.shift = 0.0

    def __call__(self) -> float:
        return time.time() + self.shift


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def node_env(backend: str, request: pytest.FixtureRequest, simulator: Simulator,
             relay: RelaySink, tmp_path: Path,
             monkeypatch: pytest.MonkeyPatch) -> Callable[..., dict[str, str]]:
    """The settings of a node on the backend under test: SQLite in DATA_DIR, or the shared
    PostgreSQL database with documents in the shared S3 (SeaweedFS), as a cluster runs."""
    extra: dict[str, str] = {}
    if backend == "postgresql":
        pg_url = request.getfixturevalue("pg_url")
        seaweed = request.getfixturevalue("seaweed")
        pg_reset(pg_url)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweed.access_key)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweed.secret_key)
        extra = dict(DATABASE_URL=pg_url, MEDIA_STORE="s3", S3_BUCKET="faxgw-test",
                     S3_PREFIX=f"fence-{tmp_path.name}", S3_ENDPOINT_URL=seaweed.endpoint_url,
                     S3_REGION=seaweed.region)

    def env(**more: str) -> dict[str, str]:
        settings = dict(NODE_ID="node-a", SIGNALWIRE_TIMEOUT_SECONDS="1", **relay_env(relay),
                        **extra)
        settings.update(more)
        return production_env(tmp_path / "var", simulator, **settings)
    return env


def other_node(gw: Gateway, clock: Callable[[], float]) -> SqlStore:
    """A second node on the gateway's database: its own connection and NODE_ID."""
    store: SqlStore
    if gw.s.cluster.database_url:
        store = PostgresStore(gw.s.cluster.database_url, clock)
    else:
        store = SqliteStore(gw.s.queue.data_dir / DB_FILENAME, clock)
    store.node_id = "node-b"
    store.lease_s = gw.s.cluster.lease_seconds
    store.open(migrate=False)
    return store


async def job_in(gw: Gateway, job_id: str, state: State, simulator: Simulator) -> None:
    """Run the queue step by step until the job reaches `state` (the simulator's callbacks
    come in between); the job is not claimed at the end."""
    for _ in range(20):
        job = await gw.store.run(gw.store.job, job_id)
        assert job is not None
        if job.state is state:
            await settle(gw)
            return
        await gw.worker.run_due()
        await simulator.state.wait_idle()
    raise AssertionError(f"job {job_id} never reached {state}")


async def settle(gw: Gateway) -> None:
    """Let go of the leases of the steps that ended (the worker does it on its next trip to
    the store, with the next claim)."""
    released, gw.worker._released = gw.worker._released, []
    await gw.store.run(gw.store.release, *released)


# -- 1. a sid belongs to one job -----------------------------------------------------------------

async def test_a_send_answered_500_never_takes_the_fax_of_an_earlier_job(
        backend: str, node_env: Callable[..., dict[str, str]], manual_gateway: GatewayFactory,
        simulator: Simulator, relay: RelaySink) -> None:
    """Two mails to one number: the second send is answered 500 and SignalWire made no fax.
    The lookup finds the first job's fax (same To and From, within the skew): it is not the
    second job's, so the second is sent again, and each sender is told of their own fax."""
    clock = ShiftedClock()
    gw = await manual_gateway(node_env(), clock)
    first = await send_one(gw, NUMBER)
    await drive(gw, simulator)
    first_report = await relay.next(30)
    simulator.state.fail_next_send.append((500, {}))  # answered 500, no fax made
    second = await send_one(gw, NUMBER)
    await gw.worker.run_until_idle()  # the send: 500, so looked up later
    job = await gw.store.run(gw.store.job, second)
    assert job is not None and job.state is State.SUBMITTING and job.fax_sid is None
    clock.shift += 60  # the lookup is due
    await drive(gw, simulator)
    second_report = await relay.next(30)
    one = await gw.store.run(gw.store.job, first)
    two = await gw.store.run(gw.store.job, second)
    assert one is not None and two is not None
    assert len(simulator.state.send_requests) == 3  # the first, the 500, the second again
    assert len(simulator.state.faxes) == 2
    assert two.fax_sid != one.fax_sid and two.fax_sid in simulator.state.faxes
    assert one.fax_sid in first_report.get_body(("plain",)).get_content()
    body = second_report.get_body(("plain",)).get_content()
    assert str(two.fax_sid) in body and str(one.fax_sid) not in body
    history = [(e.kind, e.detail) for e in await gw.store.run(gw.store.events, second)]
    assert ("retry", "the unanswered send did not reach SignalWire; sending again") in history
    assert relay.messages.empty()


async def test_a_fax_sid_belongs_to_one_job_in_the_store(
        backend: str, node_env: Callable[..., dict[str, str]], manual_gateway: GatewayFactory,
        simulator: Simulator, relay: RelaySink) -> None:
    """Even past the lookup, the store keeps a sid to one job: a callback naming another
    job's fax changes nothing, and a second record of one sid is refused by the index."""
    gw = await manual_gateway(node_env())
    first = await send_one(gw, NUMBER)
    await drive(gw, simulator)
    await relay.next(30)
    one = await gw.store.run(gw.store.job, first)
    assert one is not None and one.fax_sid
    simulator.state.suppress_callbacks = True
    simulator.state.drop_next_send_responses = 1  # sent, answer lost: submitting, no sid
    second = await send_one(gw, "15551230078")
    await gw.worker.run_until_idle()
    two = await gw.store.run(gw.store.job, second)
    assert two is not None and two.state is State.SUBMITTING and two.fax_sid is None
    action = await gw.store.run(lambda: gw.store.record_status(
        two, one.fax_sid, "delivered", pages=1, duration_s=None, error_code=None,
        error_message=None, source="callback"))
    assert action is CallbackAction.IGNORE
    with pytest.raises(Exception) as caught:
        await gw.store.run(gw.store.mark_submitted, two, one.fax_sid, "queued",
                           time.time() + 60, "taken")
    assert gw.store.is_db_error(caught.value)
    two = await gw.store.run(gw.store.job, second)
    assert two is not None and two.state is State.SUBMITTING and two.fax_sid is None


# -- 3. a node that lost its claim does nothing ----------------------------------------------------

async def test_a_node_that_lost_its_claim_neither_mails_nor_sends(
        backend: str, node_env: Callable[..., dict[str, str]], manual_gateway: GatewayFactory,
        simulator: Simulator, relay: RelaySink, caplog: pytest.LogCaptureFixture) -> None:
    """node-a claims a job and stalls past its lease; node-b takes the job over and lets it
    go again (its step ended). node-a's step then runs: its record is refused (the claim it
    holds is not the latest), so it mails no report and sends no fax; the job is done once,
    under the claim that came after."""
    gw = await manual_gateway(node_env())
    # Two mails to one number: the first is faxed (the second waits for the number) and
    # completes; the second is still to be sent.
    await send_one(gw, NUMBER)
    await send_one(gw, NUMBER)
    for _ in range(20):
        states = {j.id: j.state for j in await gw.store.run(gw.store.jobs)}
        if State.COMPLETED in states.values():
            break
        await gw.worker.run_due()
        await simulator.state.wait_idle()
    await settle(gw)
    [report_job] = [i for i, state in states.items() if state is State.COMPLETED]
    [send_job] = [i for i, state in states.items() if state is State.STORED]
    later = time.time() + gw.s.cluster.lease_seconds + 1
    b = other_node(gw, lambda: later)
    try:
        stale = {j.id: j for j in await gw.store.run(gw.store.claim_due, time.time(), 10)}
        assert set(stale) == {report_job, send_job}
        taken = {j.id for j in b.claim_due(later, 10)}  # node-a's leases ran out
        assert taken == set(stale)
        b.release(*taken)
    finally:
        b.close()
    sends = len(simulator.state.send_requests)
    with caplog.at_level(logging.WARNING):
        for job in stale.values():
            await gw.worker._step(job)
    assert relay.messages.empty()  # no report mailed
    assert len(simulator.state.send_requests) == sends  # no fax sent
    for job_id in stale:
        assert f"job {job_id}: " in caplog.text and "another node holds the job" in caplog.text
        job = await gw.store.run(gw.store.job, job_id)
        assert job is not None and job.state is stale[job_id].state
    # Under a claim of its own, the node does each step once.
    await drive(gw, simulator)
    reports = [await relay.next(30), await relay.next(30)]
    assert sorted(r["X-Faxgw-Job"] for r in reports) == sorted(stale)
    assert len(simulator.state.send_requests) == sends + 1
    assert relay.messages.empty()


async def test_a_report_mailed_and_not_recorded_is_mailed_again_with_its_message_id(
        backend: str, node_env: Callable[..., dict[str, str]], manual_gateway: GatewayFactory,
        simulator: Simulator, relay: RelaySink) -> None:
    """A report whose mailing began and was never recorded (the node died, or stalled and
    lost the job) may have gone out: the node that takes the job over mails it again under
    the same number, so with the same Message-ID whatever the node's name; a report the
    operator asks for again is a new one."""
    gw = await manual_gateway(node_env(SMTP_HOSTNAME="node-a.test"))
    job_id = await send_one(gw, NUMBER)
    await job_in(gw, job_id, State.COMPLETED, simulator)
    [claimed] = await gw.store.run(gw.store.claim_due, time.time(), 10)
    assert await gw.store.run(gw.store.mark_reporting, claimed, 1, "report 1: mailing it")
    await gw.store.run(gw.store.release, job_id)  # ...and node-a died before recording it
    await gw.stop()
    gw = await manual_gateway(node_env(SMTP_HOSTNAME="node-b.test", NODE_ID="node-b"))
    await drive(gw, simulator)
    again = await relay.next(30)
    assert again["Message-ID"] == f"<faxgw-report.{job_id}.1@faxgw.test>"
    history = [(e.kind, e.detail) for e in await gw.store.run(gw.store.events, job_id)]
    assert [k for k, _ in history].count("reporting") == 2
    assert "mailing it again with the same Message-ID" in history[-2][1]
    assert await gw.store.run(gw.store.report_again, job_id, State.COMPLETED, time.time())
    await drive(gw, simulator)
    assert (await relay.next(30))["Message-ID"] == f"<faxgw-report.{job_id}.2@faxgw.test>"
    assert relay.messages.empty()


class KillingRelay(RelaySink):
    """The relay sink, which kills the gateway's database connections just before it
    answers 250 to a report (`armed` times): the report is out, its record meets a dead
    connection."""

    def __init__(self, pg_url: str) -> None:
        super().__init__()
        self.pg_url = pg_url
        self.armed = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.armed:
            self.armed -= 1
            await asyncio.to_thread(terminate_backends, self.pg_url)
        return await super().handle_DATA(server, session, envelope)


def terminate_backends(pg_url: str) -> int:
    dbname = pg_url.rsplit("/", 1)[1]
    with psycopg.connect(pg_url, autocommit=True) as admin:
        rows = admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                             " WHERE datname = %s AND pid <> pg_backend_pid()",
                             (dbname,)).fetchall()
    return len(rows)


async def test_a_report_whose_record_meets_a_killed_connection_is_mailed_once(
        pg_url: str, seaweed: Any, manual_gateway: GatewayFactory, simulator: Simulator,
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """PostgreSQL: the relay took the report, then every connection of the gateway is killed
    (pg_terminate_backend) before `mark_reported`. The record is tried again, not the mail."""
    pg_reset(pg_url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweed.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweed.secret_key)
    relay = KillingRelay(pg_url)
    await relay.start()
    try:
        gw = await manual_gateway(production_env(
            tmp_path / "var", simulator, DATABASE_URL=pg_url, MEDIA_STORE="s3",
            S3_BUCKET="faxgw-test", S3_PREFIX=f"kill-{tmp_path.name}",
            S3_ENDPOINT_URL=seaweed.endpoint_url, S3_REGION=seaweed.region,
            **relay_env(relay)))
        job_id = await send_one(gw, NUMBER)
        await job_in(gw, job_id, State.COMPLETED, simulator)
        relay.armed = 1
        with caplog.at_level(logging.WARNING):
            await gw.worker.run_until_idle()
            await drive(gw, simulator)
        report = await relay.next(5)
        job = await gw.store.run(gw.store.job, job_id)
        assert job is not None and job.state is State.REPORTED
        assert relay.messages.empty()  # mailed once
        assert report["X-Faxgw-Job"] == job_id
        assert "recording it failed" in caplog.text
        assert "Task exception was never retrieved" not in caplog.text
        await gw.stop()
    finally:
        await relay.stop()


# -- 4. a callback while the send's answer is recorded ---------------------------------------------

async def test_a_final_callback_racing_the_send_answer_is_kept(pg_url: str,
                                                               tmp_path: Path) -> None:
    """PostgreSQL, two connections: the send's answer (`submitting` -> `submitted`) is being
    committed while the final callback reads the job as `submitting`; the callback's change
    then finds the job moved on. The final status is classified again, not lost."""
    from .helpers.store import add_mail

    pg_reset(pg_url)
    store = PostgresStore(pg_url)
    store.open()
    try:
        [job_id] = add_mail(store, "+15551230077", stored=True)
        [job] = store.claim_due(time.time(), 10)
        assert store.mark_submitting(job, "http://gw.test/cb", time.time() + 60)
        job = store.job(job_id)
        assert job is not None
        holding, answered = threading.Event(), threading.Event()

        def send_answer() -> None:  # the worker's mark_submitted, committed on a signal
            with store._tx():
                assert store.mark_submitted(job, "sid-77", "queued", time.time() + 60, "ok")
                holding.set()
                assert answered.wait(10)

        recorder = threading.Thread(target=send_answer)
        recorder.start()
        assert holding.wait(10)
        outcome: list[CallbackAction] = []
        callback = threading.Thread(target=lambda: outcome.append(store.record_status(
            job, "sid-77", "delivered", pages=1, duration_s=None, error_code=None,
            error_message=None, source="callback")))
        callback.start()
        # The callback read `submitting` and waits on the row the answer holds: let it go.
        with psycopg.connect(pg_url, autocommit=True) as admin:
            for _ in range(200):
                waiting = admin.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND wait_event_type = 'Lock' AND query LIKE '%%UPDATE jobs%%'").fetchone()
                if waiting and waiting[0]:
                    break
                await asyncio.sleep(0.02)
            else:
                raise AssertionError("the callback never waited for the row")
        answered.set()
        recorder.join(10)
        callback.join(10)
        assert outcome == [CallbackAction.FINAL]
        job = store.job(job_id)
        assert job is not None
        assert (job.state, job.fax_status, job.fax_sid) == (State.COMPLETED, "delivered",
                                                            "sid-77")
        assert [e.kind for e in store.events(job_id)][-2:] == ["submitted", "final"]
    finally:
        store.close()


# -- 5. the store down under a callback or a step ------------------------------------------------

def store_down(gw: Gateway) -> Callable[[], None]:
    """Make the gateway's job store stop answering writes; returns the undo. SQLite: another
    connection holds the write lock (and the gateway waits 0.2 s, not its 10, for it);
    PostgreSQL: new connections are refused and the gateway's are killed."""
    if gw.s.cluster.database_url:
        url = gw.s.cluster.database_url
        dbname = url.rsplit("/", 1)[1]
        admin_url = url.rsplit("/", 1)[0] + "/postgres"
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS false')
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                          " WHERE datname = %s", (dbname,))

        def undo() -> None:
            with psycopg.connect(admin_url, autocommit=True) as admin:
                admin.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS true')
        return undo
    assert isinstance(gw.store, SqliteStore)
    gw.store.db.execute("PRAGMA busy_timeout = 200")
    locker = sqlite3.connect(gw.s.queue.data_dir / DB_FILENAME, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")

    def release() -> None:
        locker.execute("ROLLBACK")
        locker.close()
    return release


async def test_a_callback_during_a_store_outage_is_answered_503(
        backend: str, node_env: Callable[..., dict[str, str]], manual_gateway: GatewayFactory,
        simulator: Simulator, relay: RelaySink, caplog: pytest.LogCaptureFixture) -> None:
    """SignalWire tries a callback again after a 5xx: the gateway answers 503 in one log
    line, no traceback; the callback tried again once the store is back is recorded."""
    simulator.state.suppress_callbacks = True
    gw = await manual_gateway(node_env())
    job_id = await send_one(gw, NUMBER)
    await job_in(gw, job_id, State.SUBMITTED, simulator)
    job = await gw.store.run(gw.store.job, job_id)
    assert job is not None and job.callback_url and job.fax_sid
    params = {"FaxSid": job.fax_sid, "FaxStatus": "delivered", "NumPages": "1",
              "AccountSid": gw.s.signalwire.project_id}
    headers = {"X-SignalWire-Signature": simulator.state.sign(job.callback_url, params)}
    url = f"http://127.0.0.1:{gw.web.port}/signalwire/status/{job.callback_token}"
    undo = store_down(gw)
    try:
        with caplog.at_level(logging.INFO):
            async with aiohttp.ClientSession() as http:
                async with http.post(url, data=params, headers=headers) as resp:
                    assert resp.status == 503, await resp.text()
    finally:
        undo()
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    assert any("answered 503" in r.getMessage() for r in caplog.records)
    for _ in range(3):  # the pool's killed connections go one by one (PostgreSQL)
        async with aiohttp.ClientSession() as http:
            async with http.post(url, data=params, headers=headers) as resp:
                if resp.status == 200:
                    break
    job = await gw.store.run(gw.store.job, job_id)
    assert job is not None and job.state is State.COMPLETED


async def test_a_step_whose_failure_cannot_be_recorded_ends_quietly(
        backend: str, node_env: Callable[..., dict[str, str]], manual_gateway: GatewayFactory,
        simulator: Simulator, relay: RelaySink, caplog: pytest.LogCaptureFixture) -> None:
    """A step meets the store going down, and so does the record of its failure (`_later`):
    the step ends with a log line, not an exception left in its task."""
    simulator.state.suppress_callbacks = True
    clock = ShiftedClock()
    gw = await manual_gateway(node_env(STATUS_POLL_SECONDS="1"), clock)
    job_id = await send_one(gw, NUMBER)
    await job_in(gw, job_id, State.SUBMITTED, simulator)
    clock.shift += 5  # the status poll is due
    tasks, _ = await gw.worker._dispatch()  # the poll is claimed; it runs from here
    assert len(tasks) == 1
    undo = store_down(gw)
    try:
        with caplog.at_level(logging.WARNING):
            results = await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        undo()
    assert results == [None]
    assert "could not be recorded either" in caplog.text
    assert not [r for r in caplog.records if r.exc_info and "store" in r.getMessage()]


# -- 3. two processes: a node paused past its lease ------------------------------------------------

async def test_a_node_paused_past_its_lease_mails_no_report_twice(
        pg_url: str, seaweed: Any, simulator: Simulator, relay: RelaySink, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Two gateway processes on one PostgreSQL (LEASE_SECONDS=3). node-a stops itself
    (FAXGW_PAUSE_AT=report-rendered, SIGSTOP) holding a job whose report it has rendered and
    not yet recorded as being mailed; node-b takes that job over once the lease has run out and
    reports it, with every other job; node-a, continued (SIGCONT), finds its claim gone and
    mails nothing. Every job is faxed once and reported once.

    node-a works one job at a time (WORKER_CONCURRENCY=1), so nothing else of it is stopped
    between the relay's 250 and its record, the window in which a report is mailed again by
    design (docs/fencing.md); node-b starts once node-a has stopped, so node-a surely takes a
    report first."""
    from testsupport.harness import DaemonProcess

    from .helpers.cluster import all_reported, send, shared_env

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweed.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweed.secret_key)
    pg_reset(pg_url)

    def node(name: str, **more: str) -> DaemonProcess:
        return DaemonProcess(shared_env(tmp_path, name, pg_url, seaweed, simulator, relay,
                                        SMTP_HOSTNAME=f"{name}.test", REPORT_ATTACH_PDF="yes",
                                        **more), tmp_path / f"{name}.log")

    a, b = node("node-a", WORKER_CONCURRENCY="1"), node("node-b")
    sent: list[str] = []
    try:
        await a.start(pause_at="report-rendered")
        simulator.state.hold_queue()  # the faxes end together: the reports are due together
        for i in range(8):
            sent += await send(a.smtp_port, f"155513{i + 50:05d}")
        await simulator.state.wait_faxes(8, 30)
        simulator.state.release_queue()
        held = await a.wait_paused("report-rendered")  # "job <id>", stopped there
        job_id = held.removeprefix("job ")
        assert job_id in sent, held
        with psycopg.connect(pg_url, autocommit=True) as db:
            [(owner, epoch, state)] = db.execute(
                "SELECT lease_owner, lease_epoch, state FROM jobs WHERE id = %s",
                (job_id,)).fetchall()
        assert (owner, state) == ("node-a", "completed"), (owner, state)
        await b.start()
        # node-b can take the job only once node-a's lease has run out: every job reported,
        # node-a's too, is the stall past the lease, observed.
        await all_reported(pg_url, 60)
        with psycopg.connect(pg_url, autocommit=True) as db:
            [(later_epoch,)] = db.execute("SELECT lease_epoch FROM jobs WHERE id = %s",
                                          (job_id,)).fetchall()
        assert later_epoch > epoch  # claimed again since, by node-b
        a.resume()
        # node-a runs on from the pause, with the one job it held, to the point where it finds
        # the job taken (checked below: before mailing).
        lost = await a.wait_log("not done: another node holds the job now")
        for node in (a, b):
            assert await node.terminate() == 0, node.log_tail()
    finally:
        for node in (a, b):
            await node.close()
    reports = []
    while not relay.messages.empty():
        reports.append(relay.messages.get_nowait())
    per_job = Counter(r["X-Faxgw-Job"] for r in reports)
    assert per_job == Counter(sent), per_job  # each reported once
    assert len({r["Message-ID"] for r in reports}) == len(reports)
    numbers = [r["To"] for r in simulator.state.send_requests]
    assert len(numbers) == len(set(numbers)) == 8, numbers  # each faxed once
    # The fenced record of the mailing (mark_reporting) stopped node-a, not a later one.
    assert f"job {job_id}: report not done: another node holds" in lost, lost


# -- 4. a callback before the send's answer -------------------------------------------------------

async def test_a_final_callback_before_the_send_answer_blocks_nothing(
        backend: str, node_env: Callable[..., dict[str, str]], make_gateway: GatewayFactory,
        simulator: Simulator, relay: RelaySink) -> None:
    """SignalWire calls back with the final status before it answers the send POST. The final
    status stands (the answer recorded after it changes nothing), and the faxes behind it to
    the same number go at once, not at the status poll (STATUS_POLL_SECONDS=600)."""
    simulator.state.answer_after_callback = 1
    gw = await make_gateway(node_env(SIGNALWIRE_TIMEOUT_SECONDS="20"))
    jobs = [await send_one(gw, NUMBER) for _ in range(3)]
    reports = {r["X-Faxgw-Job"]: r for r in [await relay.next(30) for _ in jobs]}
    assert set(reports) == set(jobs)
    assert all("delivered" in r["Subject"] for r in reports.values())
    first = await gw.store.run(gw.store.job, jobs[0])
    assert first is not None and first.fax_sid in simulator.state.faxes
    for job_id in jobs:  # each final status came by callback, none by the poll
        [final] = [e for e in await gw.store.run(gw.store.events, job_id) if e.kind == "final"]
        assert final.detail is not None and final.detail.startswith("callback: "), final
    assert len(simulator.state.faxes) == 3
