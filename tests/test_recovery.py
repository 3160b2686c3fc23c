"""Outages, lost answers, lost callbacks and fax-level retries, in-process with real parts.

Each test checks the two invariants that matter: exactly one fax per recipient reached
SignalWire (the simulator), and exactly one report per job.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from gateway.config import settings_from
from gateway.daemon import Gateway
from gateway.jobs.outbound_states import State
from testsupport.harness import free_port

from .conftest import (
    PROJECT_ID,
    FakeClock,
    GatewayFactory,
    RelaySink,
    Simulator,
    drive,
    pdf_mail,
    production_env,
    relay_env,
    send_one,
    smtp_send,
    wait_state,
)


async def events_of(gw: Gateway, job_id: str) -> list[str]:
    return [e.kind for e in await gw.store.run(gw.store.events, job_id)]


async def test_s3_outage_is_waited_out(make_gateway, seaweed, simulator: Simulator,
                                       relay: RelaySink, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweed.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweed.secret_key)
    gw = await make_gateway(production_env(
        tmp_path / "var", simulator, MEDIA_STORE="s3", S3_BUCKET="faxgw-test",
        S3_ENDPOINT_URL=seaweed.endpoint_url, S3_REGION=seaweed.region, **relay_env(relay)))
    await asyncio.to_thread(seaweed.stop)
    try:
        job_id = await send_one(gw)  # accepted while S3 is down: the spool holds it

        async def retried_twice() -> bool:
            job = await gw.store.run(gw.store.job, job_id)
            return job.tries >= 2

        await gw.worker.wait_for(retried_twice, 30)
        job = await gw.store.run(gw.store.job, job_id)
        assert job.state is State.SPOOLED
        message = await gw.store.run(gw.store.message, job.message_id)
        assert Path(message.document_path).is_file()
    finally:
        await asyncio.to_thread(seaweed.restart)
    report = await relay.next(60)
    assert "delivered" in report["Subject"]
    assert len(simulator.state.faxes) == 1
    history = await gw.store.run(gw.store.events, job_id)
    assert any(e.kind == "retry" and "S3 upload" in (e.detail or "") for e in history)


async def test_send_answered_500_is_looked_up_then_sent_once(
        make_gateway, simulator: Simulator, relay: RelaySink, tmp_path: Path) -> None:
    simulator.state.fail_next_send.append((500, {}))
    gw = await make_gateway(production_env(tmp_path / "var", simulator,
                                           SIGNALWIRE_TIMEOUT_SECONDS="1", **relay_env(relay)))
    job_id = await send_one(gw)
    report = await relay.next()
    assert "delivered" in report["Subject"]
    assert len(simulator.state.send_requests) == 2  # the 500, then the real one
    assert len(simulator.state.faxes) == 1
    kinds = await events_of(gw, job_id)
    assert kinds.index("unknown") < kinds.index("retry") < kinds.index("submitted")


async def test_429_honours_retry_after_and_sends_once(
        make_gateway, simulator: Simulator, relay: RelaySink, tmp_path: Path) -> None:
    simulator.state.fail_next_send.append(
        (429, {"code": 20429, "message": "Too Many Requests"}, {"Retry-After": "0.2"}))
    gw = await make_gateway(production_env(tmp_path / "var", simulator, **relay_env(relay)))
    job_id = await send_one(gw)
    await relay.next()
    assert len(simulator.state.faxes) == 1
    history = await gw.store.run(gw.store.events, job_id)
    [retry] = [e for e in history if e.kind == "retry"]
    assert "rate limiting" in retry.detail and "next try in 0 s" in retry.detail
    attempts = await gw.store.run(gw.store.attempts, job_id)
    assert [a.n for a in attempts] == [1]


async def test_send_hanging_past_timeout_is_found_not_resent(
        make_gateway, simulator: Simulator, relay: RelaySink, tmp_path: Path) -> None:
    simulator.state.hang_next_send = 1
    gw = await make_gateway(production_env(tmp_path / "var", simulator,
                                           SIGNALWIRE_TIMEOUT_SECONDS="0.5",
                                           STATUS_POLL_SECONDS="0.2", **relay_env(relay)))
    try:
        job_id = await send_one(gw)
        report = await relay.next()
    finally:
        simulator.state.release_hung()
    assert "delivered" in report["Subject"]
    assert len(simulator.state.send_requests) == 1
    assert len(simulator.state.faxes) == 1
    kinds = await events_of(gw, job_id)
    assert "unknown" in kinds and "retry" not in kinds
    job = await gw.store.run(gw.store.job, job_id)
    assert job.fax_sid == next(iter(simulator.state.faxes))


async def test_lost_response_is_found_not_resent(
        make_gateway, simulator: Simulator, relay: RelaySink, tmp_path: Path) -> None:
    simulator.state.drop_next_send_responses = 1
    gw = await make_gateway(production_env(tmp_path / "var", simulator,
                                           SIGNALWIRE_TIMEOUT_SECONDS="1", **relay_env(relay)))
    await send_one(gw)
    assert "delivered" in (await relay.next())["Subject"]
    assert len(simulator.state.faxes) == 1


async def test_signalwire_unreachable_then_up(make_gateway, relay: RelaySink,
                                              tmp_path: Path) -> None:
    """Connection refused means nothing was sent: retried until SignalWire answers."""
    port = free_port()
    sim = Simulator(callback_delay_s=0.01)
    env = production_env(tmp_path / "var", sim, **relay_env(relay))
    env["SIGNALWIRE_SPACE_URL"] = f"http://127.0.0.1:{port}"
    gw = await make_gateway(env)
    job_id = await send_one(gw)

    async def refused_twice() -> bool:
        return (await events_of(gw, job_id)).count("retry") >= 2

    await gw.worker.wait_for(refused_twice, 30)
    await sim.start(port)
    try:
        assert "delivered" in (await relay.next())["Subject"]
        assert len(sim.state.faxes) == 1
    finally:
        await sim.stop()


async def test_lost_callbacks_are_recovered_by_polling(
        make_gateway, simulator: Simulator, relay: RelaySink, tmp_path: Path) -> None:
    simulator.state.suppress_callbacks = True
    gw = await make_gateway(production_env(tmp_path / "var", simulator,
                                           STATUS_POLL_SECONDS="0.2", **relay_env(relay)))
    job_id = await send_one(gw)
    report = await relay.next()
    assert "delivered" in report["Subject"]
    assert simulator.state.callbacks == []
    history = await gw.store.run(gw.store.events, job_id)
    assert any(e.kind == "final" and e.detail.startswith("poll:") for e in history)


async def test_report_relay_outage_is_waited_out(make_gateway, simulator: Simulator,
                                                 tmp_path: Path) -> None:
    port = free_port()
    gw = await make_gateway(production_env(
        tmp_path / "var", simulator, NOTIFY_SMTP_HOST="127.0.0.1", NOTIFY_SMTP_PORT=str(port),
        NOTIFY_SMTP_TLS="none"))
    job_id = await send_one(gw)

    async def report_retried() -> bool:
        job = await gw.store.run(gw.store.job, job_id)
        return job.state is State.COMPLETED and job.tries >= 2

    await gw.worker.wait_for(report_retried, 30)
    relay = RelaySink()
    await relay.start(port)
    try:
        report = await relay.next()
        assert "delivered" in report["Subject"]
        await wait_state(gw, job_id, State.REPORTED)
        assert relay.messages.empty()
    finally:
        await relay.stop()


async def test_busy_then_delivered_on_the_injected_clock(
        simulator: Simulator, relay: RelaySink, tmp_path: Path,
        manual_gateway: GatewayFactory) -> None:
    simulator.state.outcome_overrides["+15551234567"] = ["busy", "no-answer"]
    clock = FakeClock()
    gw = await manual_gateway(production_env(tmp_path / "var", simulator, **relay_env(relay)),
                              clock)
    try:
        job_id = await send_one(gw)
        await drive(gw, simulator)
        job = await gw.store.run(gw.store.job, job_id)
        assert (job.state, job.attempt) == (State.STORED, 1)
        assert job.next_run_at == clock.now + 600  # FAX_RETRY_DELAY_SECONDS default
        clock.advance(600)
        await drive(gw, simulator)
        clock.advance(600)
        await drive(gw, simulator)
        report = await relay.next()
    finally:
        await gw.stop()
    assert report["Subject"] == "Fax to +1 555-123-4567 delivered, 2 pages"
    body = report.get_body(("plain",)).get_content()
    assert "Attempts:      3" in body
    assert "not delivered: the line was busy" in body and "not delivered: no answer" in body
    assert len(simulator.state.faxes) == 3
    media_urls = {f["MediaUrl"] for f in simulator.state.send_requests}
    assert len(media_urls) == 3  # a fresh URL per attempt


async def test_busy_gives_up_at_max_attempts_and_kill_time(
        simulator: Simulator, relay: RelaySink, tmp_path: Path,
        manual_gateway: GatewayFactory) -> None:
    clock = FakeClock()
    gw = await manual_gateway(production_env(tmp_path / "var", simulator, FAX_KILL_MINUTES="25",
                                             **relay_env(relay)), clock)
    try:
        await send_one(gw, "15551230000")  # always busy
        for _ in range(5):
            await drive(gw, simulator)
            clock.advance(600)
        report = await relay.next()
    finally:
        await gw.stop()
    # attempts at 0 and 10 minutes; a third at 20 would start within 25 minutes, a fourth not.
    assert report["Subject"] == ("Fax to +1 555-123-0000 not delivered: the line was busy "
                                 "after 3 attempts")
    assert len(simulator.state.faxes) == 3
    simulator.state.faxes.clear()
    clock2 = FakeClock()
    gw = await manual_gateway(production_env(tmp_path / "var2", simulator, FAX_KILL_MINUTES="15",
                                             **relay_env(relay)), clock2)
    try:
        await send_one(gw, "15551230000")
        for _ in range(5):
            await drive(gw, simulator)
            clock2.advance(600)
        report = await relay.next()
    finally:
        await gw.stop()
    assert report["Subject"].endswith("after 2 attempts")
    assert len(simulator.state.faxes) == 2


async def test_resolution_failure_retried_once_at_standard(
        simulator: Simulator, relay: RelaySink, tmp_path: Path,
        manual_gateway: GatewayFactory) -> None:
    clock = FakeClock()
    gw = await manual_gateway(production_env(tmp_path / "var", simulator, FAX_QUALITY="superfine",
                                             **relay_env(relay)), clock)
    try:
        job_id = await send_one(gw, "15551230003")
        for _ in range(3):
            await drive(gw, simulator)
            clock.advance(60)
        report = await relay.next()
        attempts = await gw.store.run(gw.store.attempts, job_id)
    finally:
        await gw.stop()
    assert "delivered" in report["Subject"]
    assert [(a.quality, a.status) for a in attempts] == [("superfine", "failed"),
                                                         ("standard", "delivered")]


async def test_media_failure_is_never_retried(simulator: Simulator, relay: RelaySink,
                                              tmp_path: Path,
                                              manual_gateway: GatewayFactory) -> None:
    clock = FakeClock()
    gw = await manual_gateway(production_env(tmp_path / "var", simulator, **relay_env(relay)),
                              clock)
    try:
        job_id = await send_one(gw)
        assert await gw.worker.run_due() == 1  # upload
        job = await gw.store.run(gw.store.job, job_id)
        assert job.state is State.STORED
        # Break the media: the document disappears from the store before SignalWire fetches it.
        await gw.media.delete(job.media_key)
        await drive(gw, simulator)
        clock.advance(3600)
        await drive(gw, simulator)
        report = await relay.next()
    finally:
        await gw.stop()
    assert "not delivered" in report["Subject"]
    assert "63019" in report.get_body(("plain",)).get_content()
    assert len(simulator.state.faxes) == 1


async def test_one_attempt_in_flight_per_number(simulator: Simulator, relay: RelaySink,
                                                tmp_path: Path,
                                                manual_gateway: GatewayFactory) -> None:
    clock = FakeClock()
    gw = await manual_gateway(production_env(tmp_path / "var", simulator, **relay_env(relay)),
                              clock)
    simulator.state.hold_queue()
    try:
        first = await send_one(gw)
        second = await send_one(gw)
        other = await send_one(gw, "15551234568")
        await gw.worker.run_until_idle()
        states = {j: (await gw.store.run(gw.store.job, j)).state for j in (first, second, other)}
        assert states == {first: State.SUBMITTED, second: State.STORED, other: State.SUBMITTED}
        assert len(simulator.state.faxes) == 2
        simulator.state.release_queue()
        await drive(gw, simulator)
        for _ in range(3):
            await relay.next()
    finally:
        await gw.stop()
    assert len(simulator.state.faxes) == 3


async def test_housekeeping_purges_documents_and_prunes_old_jobs(
        simulator: Simulator, relay: RelaySink, tmp_path: Path,
        manual_gateway: GatewayFactory) -> None:
    clock = FakeClock()
    gw = await manual_gateway(production_env(tmp_path / "var", simulator,
                                             DOCUMENT_RETENTION_HOURS="24",
                                             JOB_RETENTION_DAYS="30", **relay_env(relay)), clock)
    job_id = await send_one(gw)
    await drive(gw, simulator)
    await relay.next()
    job = await gw.store.run(gw.store.job, job_id)
    message = await gw.store.run(gw.store.message, job.message_id)
    assert job.state is State.REPORTED
    assert Path(message.document_path).is_file()  # kept for 24 hours
    clock.advance(23 * 3600)
    await gw.worker.housekeeping()
    assert Path(message.document_path).is_file()
    clock.advance(2 * 3600)
    await gw.worker.housekeeping()
    assert not Path(message.document_path).exists()
    assert not (tmp_path / "var" / "media" / job.media_key).exists()
    assert await gw.store.run(gw.store.job, job_id) is not None
    clock.advance(30 * 86400)
    await gw.worker.housekeeping()
    assert await gw.store.run(gw.store.job, job_id) is None
    assert await gw.store.run(gw.store.message, job.message_id) is None
    assert await gw.store.run(gw.store.events, job_id) == []


async def test_spool_sweep_deletes_only_old_files_of_purged_or_unknown_messages(
        simulator: Simulator, relay: RelaySink, tmp_path: Path,
        manual_gateway: GatewayFactory) -> None:
    """A node's spool files whose message another node purged (or that never got its commit)
    are deleted by that node's own sweep; a kept document, and a file too young to judge (an
    intake may be between its spool write and its commit), stay."""
    gw = await manual_gateway(production_env(tmp_path / "var", simulator,
                                             DOCUMENT_RETENTION_HOURS="24", **relay_env(relay)),
                              FakeClock())
    job_id = await send_one(gw)
    job = await gw.store.run(gw.store.job, job_id)
    kept = Path((await gw.store.run(gw.store.message, job.message_id)).document_path)
    spool = kept.parent
    orphan, young = spool / "0123456789abcdef.pdf", spool / "fedcba9876543210.pdf"
    for path in (orphan, young):
        path.write_bytes(b"%PDF-1.4 left behind")
    old = time.time() - 2 * 3600
    for path in (kept, orphan):
        os.utime(path, (old, old))
    assert await gw.worker.sweep_spool() == 1
    assert kept.is_file() and young.is_file() and not orphan.exists()
    # Once the message is purged (here: by "another node"), its file goes too.
    await gw.store.run(gw.store.mark_purged, job.message_id)
    assert await gw.worker.sweep_spool() == 1
    assert not kept.exists() and young.is_file()


async def test_spool_failure_answers_451_and_keeps_nothing(make_gateway, tmp_path: Path) -> None:
    gw = await make_gateway()
    spool = tmp_path / "var" / "spool"
    spool.rmdir()
    spool.write_text("a file where the spool directory should be")
    reply = await smtp_send(gw.smtp.port, pdf_mail("15551234567@fax.local"),
                            ["15551234567@fax.local"])
    assert reply.code == 451
    assert reply.text.startswith("4.3.0 Temporary failure")
    assert await gw.store.run(gw.store.jobs) == []


async def test_store_locked_answers_451_then_accepts(tmp_path: Path) -> None:
    import sqlite3

    from .conftest import base_env

    gw = Gateway(settings_from(base_env(tmp_path / "var")))
    gw.store.busy_timeout_s = 0.2
    await gw.start()
    try:
        blocker = sqlite3.connect(tmp_path / "var" / "faxgw.sqlite3", isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")
        try:
            reply = await smtp_send(gw.smtp.port, pdf_mail("15551234567@fax.local"),
                                    ["15551234567@fax.local"])
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        assert reply.code == 451
        assert reply.text.startswith("4.3.0 Temporary failure")
        assert list((tmp_path / "var" / "spool").iterdir()) == []  # no orphan document
        reply = await smtp_send(gw.smtp.port, pdf_mail("15551234567@fax.local"),
                                ["15551234567@fax.local"])
        assert reply.code == 250
    finally:
        await gw.stop()


async def test_late_callback_of_an_earlier_attempt_changes_nothing(
        simulator: Simulator, relay: RelaySink, tmp_path: Path,
        manual_gateway: GatewayFactory) -> None:
    """Attempt 1 was busy; while attempt 2 is being sent (no sid yet), a replayed callback of
    attempt 1's fax must not be taken for attempt 2."""
    from gateway.signalwire.signature import compute_signature

    from .conftest import SIGNING_KEY

    simulator.state.outcome_overrides["+15551234567"] = ["busy"]
    clock = FakeClock()
    gw = await manual_gateway(production_env(tmp_path / "var", simulator, **relay_env(relay)),
                              clock)
    job_id = await send_one(gw)
    await drive(gw, simulator)
    job = await gw.store.run(gw.store.job, job_id)
    first_sid = (await gw.store.run(gw.store.attempts, job_id))[0].fax_sid
    assert job.state is State.STORED and first_sid
    # attempt 2 starts (committed as submitting) but its answer has not come yet
    await gw.store.run(gw.store.mark_submitting, job, job.callback_url, clock.now + 60)
    job = await gw.store.run(gw.store.job, job_id)
    import aiohttp

    params = {"FaxSid": first_sid, "FaxStatus": "busy", "AccountSid": PROJECT_ID}
    async with aiohttp.ClientSession() as http:
        async with http.post(job.callback_url, data=params, headers={
                "X-SignalWire-Signature": compute_signature(SIGNING_KEY, job.callback_url,
                                                            params)}) as resp:
            assert resp.status == 200
    job = await gw.store.run(gw.store.job, job_id)
    assert (job.state, job.fax_sid) == (State.SUBMITTING, None)
    assert (await events_of(gw, job_id))[-1] == "ignored"
