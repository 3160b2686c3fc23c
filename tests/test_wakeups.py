"""Wake-ups across gateways on PostgreSQL (LISTEN/NOTIFY, gateway/store/pg_wakeups.py): a change
that makes work due tells the other nodes when it commits, and a node that is free sends a mail
another node accepted at once, not at its next look at the queue; a listening connection that
is killed comes back; behind PgBouncer in transaction mode, where LISTEN cannot work, the nodes
poll and say so once.

The gateway tests push the worker's look at the queue (SHARED_POLL_S) past their end, so only a
wake-up can make node-b send: on the code before this change they time out."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

import aiohttp
import psycopg
import pytest

from gateway import defaults
from gateway.config import ConfigError, settings_from
from gateway.daemon import Gateway
from gateway.jobs.outbound_states import CallbackAction, Job, State
from gateway.store.pg_wakeups import CHANNEL, PgWakeups
from gateway.store.postgres import PostgresStore
from gateway.store.rows import NewJob
from gateway.store.sqlite import SqliteStore
from testsupport.s3server import SeaweedS3

from .conftest import FakeClock, GatewayFactory, RelaySink, Simulator, pg_reset
from .helpers.cluster import (
    all_reported,
    s3_credentials,  # noqa: F401 - a fixture
    send,
    shared_env,
)
from .helpers.store import add_mail, new_mail

# -- the store: which changes tell the other nodes ------------------------------------------


class Heard:
    """A session LISTENing on the wake-up channel, as another node's listener would. What it
    heard between two points is read up to a marker notification sent after the change:
    notifications arrive in commit order, so anything the change sent comes before it."""

    def __init__(self, url: str, store: PostgresStore) -> None:
        self.conn = psycopg.connect(url, autocommit=True)
        self.conn.execute(f"LISTEN {CHANNEL}")
        self.store = store
        self.n = 0

    def since_last(self) -> list[str]:
        self.n += 1
        marker = f"marker-{self.n}"
        self.store.notify(CHANNEL, marker)
        heard = []
        for note in self.conn.notifies(timeout=10):
            if note.payload == marker:
                return heard
            heard.append(note.payload)
        raise AssertionError(f"the marker did not come back; heard {heard}")


def claim(store: PostgresStore, job_id: str) -> Job:
    """Claim what is due and keep `job_id` (the others are let go)."""
    due = store.claim_due(store.clock(), 10)
    store.release(*(j.id for j in due if j.id != job_id))
    [job] = [j for j in due if j.id == job_id]
    return job


def test_each_change_that_makes_work_due_tells_the_other_nodes(pg_url: str) -> None:
    pg_reset(pg_url)
    clock = FakeClock()
    a = PostgresStore(pg_url, clock)
    a.node_id = "node-a"
    a.open()
    heard = Heard(pg_url, a)
    told, silent = ["node-a"], list[str]()
    try:
        # A mail's jobs (stored before the 250, as on a shared queue): told at the commit.
        message, jobs = new_mail(a, "+15551230001", msgid="<dup@x>")
        assert a.add_message(message, jobs, stored=True, dedup_since=0) is None
        assert heard.since_last() == told
        first = jobs[0].id
        # A copy of a mail already accepted commits nothing, and tells nobody.
        again, again_jobs = new_mail(a, "+15551230001", msgid="<dup@x>")
        assert a.add_message(again, again_jobs, stored=True, dedup_since=0) == [first]
        assert heard.since_last() == silent
        # The worker's own steps: the node that does them claims what comes next itself.
        assert a.mark_submitting(claim(a, first), "http://gw.test/cb", clock() + 40)
        assert a.mark_submitted(a.job(first), "sid-1", "queued", clock() + 600, "accepted")
        a.release(first)
        assert heard.since_last() == silent
        # A final status: told only when a job waits for the number it frees (none here).
        assert a.record_status(a.job(first), "sid-1", "busy", pages=0, duration_s=0,
                               error_code=None, error_message=None,
                               source="callback") is CallbackAction.FINAL
        assert heard.since_last() == silent
        # A retry after a busy line: whichever node is free when it falls due sends it.
        job = claim(a, first)
        assert job.state is State.COMPLETED
        assert a.schedule_retry(job, clock() + 60, "fine", "busy; again in 60 s")
        assert heard.since_last() == told
        # Jobs a stopping node hands back.
        a.release(first, wake_others=True)
        assert heard.since_last() == told

        # A number freed while another job waits for it.
        [second] = add_mail(a, "+15551230002", stored=True)
        assert heard.since_last() == told
        assert a.mark_submitting(claim(a, second), "http://gw.test/cb", clock() + 40)
        a.release(second)
        [waiting] = add_mail(a, "+15551230002", stored=True)
        assert heard.since_last() == told
        assert waiting not in {j.id for j in a.claim_due(clock(), 10)}  # the number is busy
        assert a.record_status(a.job(second), "sid-2", "delivered", pages=1, duration_s=9,
                               error_code=None, error_message=None,
                               source="callback") is CallbackAction.FINAL
        assert heard.since_last() == told
        # The operator: a resend, a cancel.
        assert a.mark_reported(claim(a, second), "reported")
        assert heard.since_last() == silent
        resend = NewJob("j-resend", "+15551230002", "+15550100000", "fine", "tok-r", "key-r")
        assert a.add_resend(a.job(second), resend, clock(), stored=True) is None
        assert heard.since_last() == told
        assert a.cancel_unsent("j-resend", "not wanted", clock())
        assert heard.since_last() == told
    finally:
        heard.conn.close()
        a.close()


def test_a_listen_url_belongs_with_a_database_url(tmp_path: Path) -> None:
    base = {"DATA_DIR": str(tmp_path), "MEDIA_STORE": "s3", "S3_BUCKET": "b"}
    with pytest.raises(ConfigError) as err:
        settings_from(dict(base, DATABASE_LISTEN_URL="postgresql://db/faxgw"))
    assert err.value.problems == [
        "DATABASE_LISTEN_URL without DATABASE_URL: it is where gateways sharing a PostgreSQL "
        "queue listen for each other; a gateway on SQLite has no other gateways"]
    with pytest.raises(ConfigError) as err:
        settings_from(dict(base, DATABASE_URL="postgresql://db/faxgw",
                           DATABASE_LISTEN_URL="mysql://u:Zq9-pw@db/faxgw"))
    assert err.value.problems == ["DATABASE_LISTEN_URL: 'mysql://u:********@db/faxgw' is not a "
                                  "postgresql://user:password@host:port/dbname URL"]
    both = settings_from(dict(base, DATABASE_URL="postgresql://bouncer/faxgw",
                              DATABASE_LISTEN_URL="postgresql://db/faxgw"))
    assert both.cluster.listen_url == "postgresql://db/faxgw"


def test_sqlite_has_no_wakeups(tmp_path: Path) -> None:
    """One node: its own intake and callbacks wake its worker; nothing to listen to."""
    store = SqliteStore(tmp_path / "faxgw.sqlite3")
    assert store.wakeups(lambda: None) is None


# -- gateways: a busy node and a free one ----------------------------------------------------


@pytest.fixture
def no_poll(monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker's look at a shared queue every SHARED_POLL_S, pushed past the test's end:
    what makes node-b send must be a wake-up."""
    monkeypatch.setattr(defaults, "SHARED_POLL_S", 3600.0)


async def busy_and_free(make_gateway: GatewayFactory, url: str, seaweed: SeaweedS3,
                        simulator: Simulator, relay: RelaySink, tmp_path: Path,
                        **both: str) -> tuple[Gateway, Gateway]:
    """node-a works one job at a time and is busy with one (its send POST hangs at the
    simulator); node-b is free. Long leases and API timeout: node-b has no reason of its own
    to look at the queue during the test (its next due time is node-a's lease's end)."""
    def env(name: str, **extra: str) -> dict[str, str]:
        return dict(shared_env(tmp_path, name, url, seaweed, simulator, relay),
                    LEASE_SECONDS="600", SIGNALWIRE_TIMEOUT_SECONDS="120", **both, **extra)

    a = await make_gateway(env("node-a", WORKER_CONCURRENCY="1"))
    simulator.state.hang_next_send = 1
    await send(a.smtp.port, "15551400011")
    await simulator.state.wait_faxes(1, timeout=30)
    b = await make_gateway(env("node-b"))
    return a, b


async def until(predicate: Callable[[], bool], timeout_s: float = 30) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.02)


def wakeups(gw: Gateway) -> PgWakeups:
    assert isinstance(gw.wakeups, PgWakeups)
    return gw.wakeups


async def listener_seen(gw: Gateway) -> tuple[str, int, str]:
    """What an operator sees of the node's listener: its /metrics lines, and /readyz's status
    and wake-ups detail."""
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{gw.web.port}/metrics") as resp:
            lines = [line for line in (await resp.text()).splitlines()
                     if line.startswith("faxgw_wakeups_")]
        async with http.get(f"http://127.0.0.1:{gw.web.port}/readyz") as resp:
            ready = await resp.json()
            return "\n".join(lines), resp.status, ready["checks"]["wakeups"]["detail"]


async def sent_by(simulator: Simulator, gw: Gateway, number: str) -> None:
    """The send POST of the fax to `number` came, and from `gw` (its callback URL)."""
    await simulator.state.wait_faxes(len(simulator.state.send_requests) + 1, timeout=20)
    [post] = [r for r in simulator.state.send_requests if r["To"] == f"+{number}"]
    assert post["StatusCallback"].startswith(f"http://127.0.0.1:{gw.web.port}/"), post


async def finish(simulator: Simulator, relay: RelaySink, count: int) -> None:
    simulator.state.release_hung()
    for _ in range(count):
        assert "delivered" in (await relay.next(60))["Subject"]


async def test_a_mail_at_a_busy_node_is_sent_at_once_by_a_free_one(
        pg_url: str, seaweed: SeaweedS3, s3_credentials: None, simulator: Simulator,
        relay: RelaySink, make_gateway: GatewayFactory, tmp_path: Path, no_poll: None) -> None:
    pg_reset(pg_url)
    a, b = await busy_and_free(make_gateway, pg_url, seaweed, simulator, relay, tmp_path)
    await until(lambda: wakeups(a).state == wakeups(b).state == "listening")
    await send(a.smtp.port, "15551400021")
    await sent_by(simulator, b, "15551400021")
    # node-b heard node-a's intake; node-a heard nothing: its own notifications are not news.
    assert wakeups(b).heard >= 1 and wakeups(a).heard == 0
    metrics, status, detail = await listener_seen(b)
    assert "faxgw_wakeups_listening 1.0" in metrics
    assert f"faxgw_wakeups_heard_total {float(wakeups(b).heard)}" in metrics
    assert status == 200 and detail.startswith("listening (LISTEN faxgw_due at postgresql://")
    # node-a stops: the step it was busy with is cancelled (the fax's final callback came
    # meanwhile: its report is due) and the job handed back; node-b is told, and reports it
    # at once, not when it would have seen node-a's lease run out (600 s on).
    heard = wakeups(b).heard
    await a.stop(grace_s=0)
    await until(lambda: wakeups(b).heard > heard)
    await finish(simulator, relay, 2)
    assert await all_reported(pg_url) == {"reported"}


async def test_a_killed_listening_connection_comes_back(
        pg_url: str, seaweed: SeaweedS3, s3_credentials: None, simulator: Simulator,
        relay: RelaySink, make_gateway: GatewayFactory, tmp_path: Path, no_poll: None,
        caplog: pytest.LogCaptureFixture) -> None:
    pg_reset(pg_url)
    caplog.set_level(logging.INFO, logger="gateway.store.pg_wakeups")
    a, b = await busy_and_free(make_gateway, pg_url, seaweed, simulator, relay, tmp_path)
    await until(lambda: wakeups(a).sessions == wakeups(b).sessions == 1)
    with psycopg.connect(pg_url, autocommit=True) as db:
        killed = db.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                            " WHERE application_name = 'faxgw-wakeups'").fetchall()
    assert len(killed) == 2
    await until(lambda: wakeups(a).sessions == wakeups(b).sessions == 2)
    before = wakeups(b).heard
    await send(a.smtp.port, "15551400031")
    await sent_by(simulator, b, "15551400031")
    assert wakeups(b).heard > before  # on its new connection
    lost = [r for r in caplog.records if "no notification connection" in r.getMessage()]
    assert len(lost) == 2 and all(r.levelno == logging.WARNING for r in lost)
    assert len([r for r in caplog.records if "listening again" in r.getMessage()]) == 2
    await finish(simulator, relay, 2)


async def test_behind_pgbouncer_the_nodes_poll_and_say_so_once(
        pg_url: str, pgbouncer_url: str, seaweed: SeaweedS3, s3_credentials: None,
        simulator: Simulator, relay: RelaySink, make_gateway: GatewayFactory, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """LISTEN through a transaction pooler hears nothing: each node finds out at start, says
    so once, and finds the other's work by looking every SHARED_POLL_S; nothing is lost."""
    pg_reset(pg_url)
    a, b = await busy_and_free(make_gateway, pgbouncer_url, seaweed, simulator, relay, tmp_path)
    await send(a.smtp.port, "15551400041")
    await sent_by(simulator, b, "15551400041")  # at node-b's next look
    await until(lambda: wakeups(a).state == wakeups(b).state == "polling")
    said = [r for r in caplog.records if "did not reach the listening connection" in r.getMessage()]
    assert len(said) == 2 and all(r.levelno == logging.WARNING for r in said), said
    assert "DATABASE_LISTEN_URL" in said[0].getMessage()
    assert wakeups(a).sessions == wakeups(b).sessions == 0
    # Said where an operator looks too; the node stays ready (it finds the work by looking).
    metrics, status, detail = await listener_seen(b)
    assert "faxgw_wakeups_listening 0.0" in metrics
    assert status == 200 and detail.startswith("not listening: a notification sent through "
                                               "DATABASE_URL did not reach"), detail
    await finish(simulator, relay, 2)


async def test_behind_pgbouncer_a_direct_listen_url_wakes_at_once(
        pg_url: str, pgbouncer_url: str, seaweed: SeaweedS3, s3_credentials: None,
        simulator: Simulator, relay: RelaySink, make_gateway: GatewayFactory, tmp_path: Path,
        no_poll: None) -> None:
    """DATABASE_URL through the pooler, DATABASE_LISTEN_URL straight to the server: the nodes'
    notifications, sent through the pooler, reach the direct listeners."""
    pg_reset(pg_url)
    a, b = await busy_and_free(make_gateway, pgbouncer_url, seaweed, simulator, relay, tmp_path,
                               DATABASE_LISTEN_URL=pg_url)
    await until(lambda: wakeups(a).state == wakeups(b).state == "listening")
    await send(a.smtp.port, "15551400051")
    await sent_by(simulator, b, "15551400051")
    await finish(simulator, relay, 2)
