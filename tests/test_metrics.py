"""Prometheus metrics: counters, histograms, store gauges from a snapshot, the /metrics handler."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from gateway.jobs.outbound_states import Job, State
from gateway.runtime.metrics import (
    CONTENT_TYPE,
    Metrics,
    StoreSnapshot,
    aiohttp_handler,
    authorized,
    collect_snapshot,
    error_code_label,
)
from gateway.signalwire.client import SendOutcomeUnknown, SendRetryable, SignalWireError
from gateway.store.rows import Message, NewJob
from gateway.store.sqlite import SqliteStore as Store
from testsupport.harness import serve

from .conftest import job_ids, pdf_mail, smtp_send, wait_state

T0 = 1_700_000_000.0


def samples(body: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(body: bytes, name: str, **labels: str) -> float:
    return samples(body)[(name, tuple(sorted(labels.items())))]


def job(**overrides: Any) -> Job:
    base = Job(id="j1", message_id="m1", to_number="+15551234567", from_number="+15550100000",
               quality="fine", state=State.COMPLETED, callback_token="t", callback_url=None,
               media_key=None, fax_sid="sid", fax_status="delivered", pages=1, pages_sent=1,
               duration_s=30, error_code=None, error_message=None, failure_reason=None,
               attempt=1, tries=0, next_run_at=T0, submit_started_at=T0, created_at=T0,
               updated_at=T0, reported_at=None)
    return dataclasses.replace(base, **overrides)


def test_counters_are_per_instance_and_labels_bounded() -> None:
    a, b = Metrics(), Metrics()
    a.mail_accepted(3)
    a.mail_refused("relay_denied")
    a.mail_refused("something new")
    a.attempt_started()
    a.callback_refused()
    a.report_done("no_address")
    body = a.render(None)
    assert value(body, "faxgw_mails_accepted_total") == 1
    assert value(body, "faxgw_jobs_accepted_total") == 3
    assert value(body, "faxgw_mails_refused_total", reason="relay_denied") == 1
    assert value(body, "faxgw_mails_refused_total", reason="other") == 1
    assert value(body, "faxgw_mails_refused_total", reason="rate_limited") == 0  # pre-created
    assert value(body, "faxgw_fax_attempts_total") == 1
    assert value(body, "faxgw_callback_signature_failures_total") == 1
    assert value(body, "faxgw_reports_total", result="no_address") == 1
    assert value(body, "faxgw_store_up") == 0
    assert not any(name == "faxgw_jobs" for name, _ in samples(body))
    assert value(b.render(None), "faxgw_mails_accepted_total") == 0


def test_fax_outcomes_and_end_to_end_latency() -> None:
    m = Metrics(process=False)
    m.fax_finished(job(), T0 + 90)
    m.fax_finished(job(fax_status="busy"), T0 + 1900)
    m.fax_finished(job(state=State.GIVEN_UP, fax_status=None, failure_reason="gave up"), T0 + 5)
    m.fax_finished(job(fax_status="weird"), T0 + 5)
    m.fax_finished(job(reported_at=T0 + 10), T0 + 4000)  # a report sent again: not recounted
    body = m.render(None)
    assert value(body, "faxgw_fax_outcomes_total", status="delivered") == 1
    assert value(body, "faxgw_fax_outcomes_total", status="busy") == 1
    assert value(body, "faxgw_fax_outcomes_total", status="not_sent") == 1
    assert value(body, "faxgw_fax_outcomes_total", status="other") == 1
    assert value(body, "faxgw_fax_end_to_end_seconds_count") == 4
    assert value(body, "faxgw_fax_end_to_end_seconds_sum") == 90 + 1900 + 5 + 5
    assert value(body, "faxgw_fax_end_to_end_seconds_bucket", le="120.0") == 3
    assert not any(name.startswith("process_") for name, _ in samples(body))


def test_api_calls_are_timed_and_errors_labelled_by_code() -> None:
    m = Metrics()
    with m.api_call("send"):
        pass
    for exc in (SendRetryable("slow down", status=429, code=20429),
                SignalWireError("gateway timeout", status=504),
                SendOutcomeUnknown("no answer from SignalWire: TimeoutError")):
        with pytest.raises(SignalWireError), m.api_call("send"):
            raise exc
    with pytest.raises(ValueError), m.api_call("fetch"):
        raise ValueError("bug")
    body = m.render(None)
    assert value(body, "faxgw_signalwire_api_seconds_count", operation="send") == 4
    assert value(body, "faxgw_signalwire_api_seconds_count", operation="list") == 0
    for code in ("20429", "http_504", "network"):
        assert value(body, "faxgw_signalwire_api_errors_total", operation="send", code=code) == 1
    assert value(body, "faxgw_signalwire_api_errors_total", operation="fetch",
                 code="internal") == 1
    assert error_code_label(SignalWireError("x", code=10000, status=400)) == "10000"


def test_store_gauges_from_a_snapshot_of_a_real_store(tmp_path: Path) -> None:
    clock = [T0]
    store = Store(tmp_path / "faxgw.sqlite3", lambda: clock[0])
    store.open()
    try:
        for n, numbers in enumerate((["+15551234567", "+15551234568"], ["+15551234569"])):
            message = Message(id=f"m{n}", created_at=clock[0], envelope_from="a@example.com",
                              header_from=None, report_to="a@example.com", subject=None,
                              message_id_header=None, references_header=None, peer=None,
                              document_path=str(tmp_path / f"m{n}.pdf"), document_bytes=1,
                              document_sha256="0" * 64, pages=1, filenames=None)
            store.add_message(message, [NewJob(id=f"j{n}{i}", to_number=x,
                                               from_number="+15550100000", quality="fine",
                                               callback_token=f"t{n}{i}", media_key="k")
                                        for i, x in enumerate(numbers)])
            clock[0] += 100
        first = store.job("j00")
        store.mark_given_up(first, "x")
        store.mark_reported(store.job("j00"), "done")
        store.mark_stored(store.job("j01"), "k")
        snapshot = collect_snapshot(store, T0 + 1000)
    finally:
        store.close()
    assert snapshot.counts_by_state == {"reported": 1, "stored": 1, "spooled": 1}
    assert snapshot.oldest_active_created_at == T0
    body = Metrics().render(snapshot)
    assert value(body, "faxgw_store_up") == 1
    assert value(body, "faxgw_jobs", state="spooled") == 1
    assert value(body, "faxgw_jobs", state="stored") == 1
    assert value(body, "faxgw_jobs", state="reported") == 1
    assert value(body, "faxgw_jobs", state="submitted") == 0
    assert value(body, "faxgw_queue_depth") == 2
    assert value(body, "faxgw_oldest_active_job_age_seconds") == 1000
    empty = Metrics().render(StoreSnapshot({}, None, T0))
    assert value(empty, "faxgw_queue_depth") == 0
    assert value(empty, "faxgw_oldest_active_job_age_seconds") == 0


def test_authorized() -> None:
    assert authorized(None, None) and authorized("anything", "")
    assert authorized("Bearer s3cret-token", "s3cret-token")
    assert authorized("bearer  s3cret-token ", "s3cret-token")
    assert not authorized(None, "s3cret-token")
    assert not authorized("Bearer wrong", "s3cret-token")
    assert not authorized("Basic s3cret-token", "s3cret-token")


async def test_metrics_endpoint_against_a_live_gateway(make_gateway) -> None:
    gw = await make_gateway()
    metrics = Metrics()
    reply = await smtp_send(gw.smtp.port, pdf_mail("15551234567@fax.local"),
                            ["15551234567@fax.local"])
    [job_id] = job_ids(reply.text)
    await wait_state(gw, job_id, State.REPORTED)
    metrics.mail_accepted(1)

    app = web.Application()
    app.router.add_get("/metrics", aiohttp_handler(metrics, gw.store, token="scrape-token"))
    app.router.add_get("/open", aiohttp_handler(metrics, gw.store))
    runner, url = await serve(app)
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{url}/metrics") as resp:
                assert resp.status == 401
            async with session.get(f"{url}/metrics",
                                   headers={"Authorization": "Bearer scrape-token"}) as resp:
                assert resp.status == 200
                assert resp.headers["Content-Type"] == CONTENT_TYPE
                body = await resp.read()
            async with session.get(f"{url}/open") as resp:
                assert resp.status == 200
    finally:
        await runner.cleanup()
    assert value(body, "faxgw_store_up") == 1
    assert value(body, "faxgw_jobs", state="reported") == 1
    assert value(body, "faxgw_queue_depth") == 0
    assert value(body, "faxgw_mails_accepted_total") == 1


async def test_metrics_endpoint_survives_a_store_that_does_not_answer(tmp_path: Path) -> None:
    store = Store(tmp_path / "faxgw.sqlite3")
    await store.start()
    await store.stop()  # no executor any more: every store call fails
    app = web.Application()
    app.router.add_get("/metrics", aiohttp_handler(Metrics(), store))
    runner, url = await serve(app)
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{url}/metrics") as resp:
                assert resp.status == 200
                body = await resp.read()
    finally:
        await runner.cleanup()
    assert value(body, "faxgw_store_up") == 0
