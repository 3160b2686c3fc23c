"""A fax the operator canceled (after a busy first attempt, while it waited for the next): the
listing finds it as `canceled` and `given-up`, before and after its report, on both stores, and
not as `busy`; its report says canceled, in the sender's words, without advice about the line."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.jobs.outbound_states import State
from gateway.outbound import actions as admin
from gateway.store.factory import open_store
from gateway.store.postgres import PostgresStore
from gateway.store.rows import Message, NewJob
from gateway.store.sql import SqlStore
from gateway.store.sqlite import SqliteStore

from .conftest import FakeClock, drive, pg_reset, production_env, relay_env, send_one

T0 = 1_800_000_000.0


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SqlStore]:
    clock = FakeClock(T0)
    if request.param == "postgresql":
        url = request.getfixturevalue("pg_url")
        pg_reset(url)
        s: SqlStore = PostgresStore(url, clock)
    else:
        s = SqliteStore(tmp_path / "faxgw.sqlite3", clock)
    s.open()
    yield s
    s.close()


def add_job(store: SqlStore, job_id: str, number: str) -> str:
    message = Message(id="m" + job_id[1:], created_at=store.clock(),
                      envelope_from="a@example.com", header_from="a@example.com",
                      report_to="a@example.com", subject="s", message_id_header=None,
                      references_header=None, peer="127.0.0.1", document_path="/spool/x.pdf",
                      document_bytes=10, document_sha256="ab" * 32, pages=1, filenames="a.pdf")
    store.add_message(message, [NewJob(job_id, number, "+15550100000", "fine", f"tok-{job_id}",
                                       f"{job_id}.pdf")])
    return job_id


def busy_once(store: SqlStore, job_id: str) -> None:
    """Attempt 1 busy; the job waits (stored) for attempt 2."""
    job = store.job(job_id)
    assert store.mark_stored(job, job.media_key)
    assert store.mark_submitting(store.job(job_id), "http://gw.test/cb", T0 + 40)
    sid = f"sid-{job_id}"
    assert store.mark_submitted(store.job(job_id), sid, "queued", T0 + 600, "accepted")
    store.record_status(store.job(job_id), sid, "busy", pages=0, duration_s=30,
                        error_code=None, error_message=None, source="callback")
    assert store.schedule_retry(store.job(job_id), T0 + 600, "fine",
                                "attempt 1 busy (busy); attempt 2 in 600 s at fine quality")
    assert store.job(job_id).state is State.STORED


def ids(store: SqlStore, status: str) -> list[str]:
    return sorted(r.id for r in admin.list_jobs(store, status=status))


def test_a_canceled_job_is_canceled_and_given_up_not_busy(store: SqlStore) -> None:
    canceled = add_job(store, "c000000000000001", "+15551230000")
    busy = add_job(store, "b000000000000002", "+15551230000")
    outage = add_job(store, "a000000000000003", "+15551234567")
    for job_id in (canceled, busy):
        busy_once(store, job_id)
    assert admin.request_cancel(store, canceled, T0 + 60).fax_sid is None
    assert store.mark_given_up(store.job(outage), "an outage lasted more than 24 hours")

    for reported in (False, True):
        assert ids(store, "canceled") == [canceled]
        assert ids(store, "given-up") == sorted([canceled, outage])
        assert ids(store, "busy") == [busy]
        [row] = [r for r in admin.list_jobs(store) if r.id == canceled]
        assert row.status == ("reported/canceled" if reported else "given-up/canceled")
        if not reported:
            for job_id in (canceled, outage):
                assert store.mark_reported(store.job(job_id), "report written")
    assert ids(store, "active") == [busy]  # the reported given-up jobs are not active


async def test_the_report_of_a_canceled_fax_says_so_in_the_senders_words(
        simulator, relay, tmp_path: Path, manual_gateway) -> None:
    clock = FakeClock(T0)
    gw = await manual_gateway(production_env(tmp_path / "var", simulator, **relay_env(relay)),
                              clock)
    cli = open_store(gw.s)
    cli.open()
    try:
        job_id = await send_one(gw, "15551230000")  # the simulator's busy line
        await drive(gw, simulator)
        job = await gw.store.run(gw.store.job, job_id)
        assert (job.state, job.fax_status, job.attempt) == (State.STORED, "busy", 1)
        request = await asyncio.to_thread(admin.request_cancel, cli, job_id, clock.now)
        assert request.fax_sid is None
        await drive(gw, simulator)
        report = await relay.next()
    finally:
        cli.close()
    text = report.get_body(("plain",)).get_content().replace("\r\n", "\n")
    assert report["Subject"] == "Fax to +1 555-123-0000 not sent: canceled by the operator"
    assert "busy" not in text.split("Attempts:")[0]  # headline, advice, status
    assert "Status:        canceled\n" in text
    history = [line.split("UTC  ", 1)[1] for line in
               text.split("History\n", 1)[1].split("\n\n", 1)[0].splitlines()]
    assert history == ["your mail was received (2 pages)", "attempt 1: dialing",
                       "not delivered: the line was busy", "waiting to try again",
                       "canceled by the operator"]
    html = report.get_body(("html",)).get_content()
    assert "status=" not in html and "SignalWire" not in html
