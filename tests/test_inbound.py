"""Faxes in, mail out: the gateway's inbound webhook, delivery and reconciler over HTTP, with
the simulator signing every request, the relay sink as the mail relay, and real SQLite."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from gateway.config import ConfigError, settings_from
from gateway.daemon import Gateway
from gateway.inbound.webhook import ACTION_ROUTE, INBOUND_ROUTE
from testsupport.harness import serve

from .conftest import (
    FakeClock,
    GatewayFactory,
    RelaySink,
    Simulator,
    make_pdf,
    production_env,
    relay_env,
)

ROUTED = "+13103383454"
SECOND = "+13103383455"
UNROUTED = "+13103383499"
CALLER = "+12125550147"
ROUTES = (f"{ROUTED}=frontdesk@example.com,billing@example.com;"
          f"{SECOND}=lab@example.com")


def env(tmp_path: Path, simulator: Simulator, relay: RelaySink, **extra: str) -> dict[str, str]:
    return production_env(tmp_path / "var", simulator, **relay_env(relay),
                          INBOUND_ROUTES=extra.pop("INBOUND_ROUTES", ROUTES), **extra)


def webhook_url(gw: Gateway) -> str:
    return gw.public_base_url() + INBOUND_ROUTE


async def ring(gw: Gateway, simulator: Simulator, to: str = ROUTED, caller: str = CALLER,
               document: bytes | None = None):
    return await simulator.state.inbound.ring(
        sim_url=simulator.url, webhook_url=webhook_url(gw), to=to, from_=caller,
        document=document if document is not None else make_pdf(2), station_id="ACME FAX")


def rows(gw: Gateway, table: str = "inbound_faxes") -> list[sqlite3.Row]:
    db = sqlite3.connect(gw.s.queue.data_dir / "faxgw.sqlite3")
    db.row_factory = sqlite3.Row
    try:
        return db.execute(f"SELECT * FROM {table}").fetchall()
    finally:
        db.close()


@pytest.fixture
async def gw_manual(tmp_path: Path, simulator: Simulator, relay: RelaySink,
                    manual_gateway: GatewayFactory) -> AsyncIterator[Gateway]:
    gw = await manual_gateway(env(tmp_path, simulator, relay), FakeClock(time.time()))
    yield gw
    await gw.stop(grace_s=1)


async def test_routed_fax_is_mailed_to_every_address_and_deleted(
        gw_manual: Gateway, simulator: Simulator, relay: RelaySink) -> None:
    call = await ring(gw_manual, simulator)
    assert call.answer == "receive"
    assert call.receive_attrs["action"] == gw_manual.public_base_url() + ACTION_ROUTE
    assert call.receive_attrs["mediaType"] == "application/pdf"
    assert call.receive_attrs["pageSize"] == "letter"
    assert call.action_statuses == [200]
    await gw_manual.inbound.deliverer.run_until_idle()
    mails = [await relay.next(), await relay.next()]
    assert sorted(m["To"] for m in mails) == ["billing@example.com", "frontdesk@example.com"]
    for mail in mails:
        assert mail["Subject"] == "Fax from +1 212-555-0147, 2 pages"
        body = mail.get_body(("plain",)).get_content()
        assert "ACME FAX" in body and "+1 310-338-3454" in body
        [pdf] = [p for p in mail.iter_attachments() if p.get_content_type() == "application/pdf"]
        assert pdf.get_filename().startswith("fax-12125550147-")
        assert pdf.get_content().startswith(b"%PDF-")
        assert any(p.get_content_type() == "image/png" for p in mail.walk())
    assert relay.messages.empty()
    assert simulator.state.inbound.media_deletes == [call.fax_sid]
    assert simulator.state.faxes[call.fax_sid].media_bytes is None
    [row] = rows(gw_manual)
    assert (row["state"], row["outcome"]) == ("done", "received")
    assert len(rows(gw_manual, "inbound_deliveries")) == 2


async def test_unrouted_number_and_blocked_caller_get_reject(
        tmp_path: Path, simulator: Simulator, relay: RelaySink,
        manual_gateway: GatewayFactory) -> None:
    gw = await manual_gateway(env(tmp_path, simulator, relay,
                                  INBOUND_BLOCKED_CALLERS="+1900,+12125550666"),
                              FakeClock(time.time()))
    try:
        unrouted = await ring(gw, simulator, to=UNROUTED)
        blocked = await ring(gw, simulator, caller="+12125550666")
        assert (unrouted.answer, blocked.answer) == ("reject", "reject")
        assert "<Reject/>" in unrouted.laml and "<Reject/>" in blocked.laml
        assert unrouted.action_statuses == [] and blocked.action_statuses == []
        await gw.inbound.deliverer.run_until_idle()
        assert relay.messages.empty()
        outcomes = sorted(r["outcome"] for r in rows(gw))
        assert outcomes == ["blocked", "unrouted"]
        metrics = await metrics_text(gw)
        assert 'faxgw_inbound_faxes_total{outcome="blocked"} 1.0' in metrics
        assert 'faxgw_inbound_faxes_total{outcome="unrouted"} 1.0' in metrics
    finally:
        await gw.stop(grace_s=1)


async def test_inbound_off_rejects_everything(tmp_path: Path, simulator: Simulator,
                                              relay: RelaySink,
                                              manual_gateway: GatewayFactory) -> None:
    gw = await manual_gateway(env(tmp_path, simulator, relay, INBOUND_ROUTES=""),
                              FakeClock(time.time()))
    try:
        assert (await ring(gw, simulator)).answer == "reject"
    finally:
        await gw.stop(grace_s=1)


async def test_unsigned_webhook_and_callback_are_refused_and_record_nothing(
        gw_manual: Gateway, simulator: Simulator) -> None:
    form = {"AccountSid": simulator.state.project_id, "ApiVersion": "v1",
            "FaxSid": "11111111-2222-3333-4444-555555555555", "From": CALLER, "To": ROUTED,
            "FaxStatus": "received", "NumPages": "1", "MediaUrl": simulator.url + "/x"}
    base = gw_manual.public_base_url()
    async with aiohttp.ClientSession() as client:
        for path in (INBOUND_ROUTE, ACTION_ROUTE):
            async with client.post(base + path, data=form) as resp:
                assert resp.status == 403
            async with client.post(base + path, data=form,
                                   headers={"X-SignalWire-Signature": "bm9wZQ=="}) as resp:
                assert resp.status == 403
        # Signed for another URL: still refused.
        wrong = simulator.state.sign(base + "/elsewhere", form)
        async with client.post(base + ACTION_ROUTE, data=form,
                               headers={"X-SignalWire-Signature": wrong}) as resp:
            assert resp.status == 403
    assert rows(gw_manual) == []
    metrics = await metrics_text(gw_manual)
    assert "faxgw_inbound_signature_failures_total 5.0" in metrics


async def metrics_text(gw: Gateway) -> str:
    async with aiohttp.ClientSession() as client:
        async with client.get(gw.public_base_url() + "/metrics") as resp:
            return await resp.text()


async def test_duplicate_callbacks_mail_each_recipient_once(
        gw_manual: Gateway, simulator: Simulator, relay: RelaySink) -> None:
    simulator.state.inbound.action_repeats = 3
    call = await ring(gw_manual, simulator, to=SECOND)
    assert call.action_statuses == [200, 200, 200]
    await gw_manual.inbound.deliverer.run_until_idle()
    mail = await relay.next()
    assert mail["To"] == "lab@example.com"
    # The reconciler finds the same fax: still known, nothing new.
    assert await gw_manual.inbound.reconciler.run_once() == 0
    await gw_manual.inbound.deliverer.run_until_idle()
    assert relay.messages.empty()
    assert 'faxgw_inbound_faxes_total{outcome="received"} 1.0' in await metrics_text(gw_manual)


async def test_media_needs_basic_auth_and_gets_it(gw_manual: Gateway,
                                                  simulator: Simulator, relay: RelaySink) -> None:
    call = await ring(gw_manual, simulator, to=SECOND)
    media_url = call.action_params["MediaUrl"]
    async with aiohttp.ClientSession() as client:  # without credentials: refused
        async with client.get(media_url) as resp:
            assert resp.status == 401
    await gw_manual.inbound.deliverer.run_until_idle()
    mail = await relay.next()
    [pdf] = [p for p in mail.iter_attachments() if p.get_content_type() == "application/pdf"]
    assert pdf.get_content() == make_pdf(2)


async def test_media_url_on_a_foreign_host_gets_no_credentials(
        gw_manual: Gateway, simulator: Simulator, relay: RelaySink,
        caplog: pytest.LogCaptureFixture) -> None:
    seen: list[str | None] = []

    async def foreign(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization"))
        return web.Response(body=make_pdf(1), content_type="application/pdf")

    app = web.Application()
    app.router.add_get("/{tail:.*}", foreign)
    runner, url = await serve(app)
    try:
        simulator.state.inbound.media_url_override = f"{url}/fax.pdf"
        call = await ring(gw_manual, simulator, to=SECOND)
        await gw_manual.inbound.deliverer.run_until_idle()
    finally:
        await runner.cleanup()
    assert seen == []  # not even fetched, so no credentials went there
    assert relay.messages.empty()
    [row] = rows(gw_manual)
    assert row["fax_sid"] == call.fax_sid and row["state"] == "given-up"
    assert "not on SignalWire's hosts" in caplog.text
    assert simulator.state.inbound.media_deletes == []


async def test_voice_call_noise_goes_to_the_admin_only(
        tmp_path: Path, simulator: Simulator, relay: RelaySink,
        manual_gateway: GatewayFactory) -> None:
    gw = await manual_gateway(env(tmp_path, simulator, relay,
                                  INBOUND_ADMIN_ADDRESS="faxadmin@example.com"),
                              FakeClock(time.time()))
    try:
        simulator.state.inbound.outcome = "failed:The call dropped prematurely"
        await ring(gw, simulator)
        await gw.inbound.deliverer.run_until_idle()
        mail = await relay.next()
        assert mail["To"] == "faxadmin@example.com"
        assert "not received" in mail["Subject"]
        assert relay.messages.empty()
        [row] = rows(gw)
        assert row["outcome"] == "noise"
        assert 'faxgw_inbound_faxes_total{outcome="noise"} 1.0' in await metrics_text(gw)
    finally:
        await gw.stop(grace_s=1)


async def test_document_left_out_when_configured(tmp_path: Path, simulator: Simulator,
                                                 relay: RelaySink,
                                                 manual_gateway: GatewayFactory) -> None:
    gw = await manual_gateway(env(tmp_path, simulator, relay, INBOUND_ATTACH_DOCUMENT="no",
                                  INBOUND_KEEP_MEDIA="yes"), FakeClock(time.time()))
    try:
        call = await ring(gw, simulator, to=SECOND)
        await gw.inbound.deliverer.run_until_idle()
        mail = await relay.next()
        assert not any(p.get_content_type() in ("application/pdf", "image/png")
                       for p in mail.walk())
        assert "not attached" in mail.get_body(("plain",)).get_content()
        assert simulator.state.inbound.media_deletes == []  # kept at SignalWire
        assert simulator.state.faxes[call.fax_sid].media_bytes is not None
    finally:
        await gw.stop(grace_s=1)


async def test_reconciler_picks_up_a_fax_whose_callback_was_lost(
        gw_manual: Gateway, simulator: Simulator, relay: RelaySink) -> None:
    simulator.state.inbound.skip_action = True
    call = await ring(gw_manual, simulator, to=SECOND)
    assert call.answer == "receive" and call.action_statuses == []
    await gw_manual.inbound.deliverer.run_until_idle()
    assert relay.messages.empty()
    assert await gw_manual.inbound.reconciler.run_once() == 1
    await gw_manual.inbound.deliverer.run_until_idle()
    mail = await relay.next()
    assert mail["To"] == "lab@example.com"
    assert mail["Subject"] == "Fax from +1 212-555-0147, 2 pages"
    assert await gw_manual.inbound.reconciler.run_once() == 0
    [row] = rows(gw_manual)
    assert (row["source"], row["state"]) == ("reconciler", "done")


async def test_relay_outage_is_waited_out(tmp_path: Path, simulator: Simulator, relay: RelaySink,
                                          manual_gateway: GatewayFactory) -> None:
    clock = FakeClock(time.time())
    gw = await manual_gateway(env(tmp_path, simulator, relay), clock)
    try:
        await relay.stop()
        await ring(gw, simulator, to=SECOND)
        await gw.inbound.deliverer.run_until_idle()
        [row] = rows(gw)
        assert row["state"] == "delivering" and row["tries"] == 1
        assert "relay" in row["last_error"]
        await relay.start(relay.port)
        clock.advance(60)
        await gw.inbound.deliverer.run_until_idle()
        assert (await relay.next())["To"] == "lab@example.com"
        assert [r["state"] for r in rows(gw)] == ["done"]
    finally:
        await gw.stop(grace_s=1)


@pytest.mark.parametrize("value, words", [
    ("+1310=a@example.com", "'+1310' is not an E.164 number"),
    (f"{ROUTED}", "is not NUMBER=ADDRESS"),
    (f"{ROUTED}=not-an-address", "'not-an-address' is not a mail address"),
    (f"{ROUTED}=", "names no mail address"),
    (f"{ROUTED}=a@example.com;{ROUTED}=b@example.com", "routed twice"),
])
def test_bad_routes_name_the_variable_and_the_entry(tmp_path: Path, value: str,
                                                    words: str) -> None:
    with pytest.raises(ConfigError) as err:
        settings_from({"INBOUND_ROUTES": value, "DATA_DIR": str(tmp_path)})
    [problem] = [p for p in err.value.problems if p.startswith("INBOUND_ROUTES")]
    assert words in problem


def test_routes_file_and_wildcard(tmp_path: Path) -> None:
    path = tmp_path / "routes"
    path.write_text("# numbers\n+13103383454 = a@example.com, b@example.com\n*=c@example.com\n")
    s = settings_from({"INBOUND_ROUTES_FILE": str(path), "DATA_DIR": str(tmp_path)})
    assert s.inbound.routes.recipients(ROUTED) == ("a@example.com", "b@example.com")
    assert s.inbound.routes.recipients("+15550001111") == ("c@example.com",)
    path.write_text("+13103383454=a@example.com\nbogus line\n")
    with pytest.raises(ConfigError) as err:
        settings_from({"INBOUND_ROUTES_FILE": str(path), "DATA_DIR": str(tmp_path)})
    assert any("INBOUND_ROUTES_FILE" in p and "line 2" in p and "'bogus line'" in p
               for p in err.value.problems)


def test_bad_route_stops_the_start_with_78(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    environ = {k: v for k, v in os.environ.items() if not k.startswith(("FAXGW_", "INBOUND_"))}
    environ.update(DATA_DIR=str(tmp_path), INBOUND_ROUTES="+1555=x@example.com")
    proc = subprocess.run([sys.executable, "-m", "gateway", "run", "--check"], env=environ,
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 78
    assert "INBOUND_ROUTES: '+1555=x@example.com'" in proc.stderr


async def test_media_delete_409_is_retried_later(tmp_path: Path, simulator: Simulator,
                                                 relay: RelaySink,
                                                 manual_gateway: GatewayFactory) -> None:
    clock = FakeClock(time.time())
    gw = await manual_gateway(env(tmp_path, simulator, relay), clock)
    try:
        simulator.state.inbound.delete_conflicts = 1
        call = await ring(gw, simulator, to=SECOND)
        await gw.inbound.deliverer.run_until_idle()
        assert (await relay.next())["To"] == "lab@example.com"
        [row] = rows(gw)
        assert row["state"] == "deleting" and "409" in row["last_error"]
        assert simulator.state.inbound.media_deletes == []
        clock.advance(60)
        await gw.inbound.deliverer.run_until_idle()
        assert simulator.state.inbound.media_deletes == [call.fax_sid]
        assert [r["state"] for r in rows(gw)] == ["done"]
        assert relay.messages.empty()  # the mail is not sent again for the retry
    finally:
        await gw.stop(grace_s=1)


async def test_tiff_media_is_mailed_as_pdf(gw_manual: Gateway, simulator: Simulator,
                                           relay: RelaySink) -> None:
    import io

    from PIL import Image

    frames = [Image.new("1", (1728, 2200), 1) for _ in range(2)]
    out = io.BytesIO()
    frames[0].save(out, "TIFF", save_all=True, append_images=frames[1:],
                   compression="group4", dpi=(204, 196))
    await ring(gw_manual, simulator, to=SECOND, document=out.getvalue())
    await gw_manual.inbound.deliverer.run_until_idle()
    mail = await relay.next()
    assert mail["Subject"] == "Fax from +1 212-555-0147, 2 pages"
    [pdf] = [p for p in mail.iter_attachments() if p.get_content_type() == "application/pdf"]
    assert pdf.get_content().startswith(b"%PDF-")


async def test_real_failure_goes_to_routed_people_and_admin(
        tmp_path: Path, simulator: Simulator, relay: RelaySink,
        manual_gateway: GatewayFactory) -> None:
    gw = await manual_gateway(env(tmp_path, simulator, relay,
                                  INBOUND_ADMIN_ADDRESS="faxadmin@example.com"),
                              FakeClock(time.time()))
    try:
        simulator.state.inbound.outcome = "failed:Unexpected message received"
        await ring(gw, simulator, to=SECOND)
        await gw.inbound.deliverer.run_until_idle()
        mails = [await relay.next(), await relay.next()]
        assert sorted(m["To"] for m in mails) == ["faxadmin@example.com", "lab@example.com"]
        assert all("not received: Unexpected message received" in m["Subject"] for m in mails)
        assert relay.messages.empty()
        assert [r["outcome"] for r in rows(gw)] == ["failed"]
    finally:
        await gw.stop(grace_s=1)


async def test_wildcard_route_and_reconciler_without_a_number(
        tmp_path: Path, simulator: Simulator, relay: RelaySink,
        manual_gateway: GatewayFactory) -> None:
    gw = await manual_gateway(env(tmp_path, simulator, relay,
                                  INBOUND_ROUTES="*=office@example.com"),
                              FakeClock(time.time()))
    try:
        simulator.state.inbound.skip_action = True
        await ring(gw, simulator, to=UNROUTED)
        assert await gw.inbound.reconciler.run_once() == 1
        await gw.inbound.deliverer.run_until_idle()
        assert (await relay.next())["To"] == "office@example.com"
    finally:
        await gw.stop(grace_s=1)


def test_lookback_must_be_shorter_than_retention(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        settings_from({"INBOUND_LOOKBACK_HOURS": "48", "JOB_RETENTION_DAYS": "1",
                       "DATA_DIR": str(tmp_path)})
    assert any(p.startswith("INBOUND_LOOKBACK_HOURS") for p in err.value.problems)


async def test_reconciler_does_not_reach_back_before_inbound_was_switched_on(
        tmp_path: Path, simulator: Simulator, relay: RelaySink,
        manual_gateway: GatewayFactory) -> None:
    # A fax received (and handled by something else) before this gateway had routes.
    gw_off = await manual_gateway(env(tmp_path / "other", simulator, relay,
                                      INBOUND_ROUTES=""), FakeClock(time.time()))
    try:
        simulator.state.inbound.skip_action = True
        call = await ring(gw_off, simulator, to=SECOND)
        assert call.answer == "reject"
    finally:
        await gw_off.stop(grace_s=1)
    simulator.state.faxes[call.fax_sid].set_status("received")  # say someone else took it
    gw = await manual_gateway(env(tmp_path, simulator, relay), FakeClock(time.time() + 3600))
    try:
        assert await gw.inbound.reconciler.run_once() == 0
        assert rows(gw) == []
    finally:
        await gw.stop(grace_s=1)


async def test_webhook_by_get_is_signed_over_the_query(gw_manual: Gateway,
                                                       simulator: Simulator) -> None:
    from urllib.parse import urlencode

    query = urlencode({"AccountSid": simulator.state.project_id, "ApiVersion": "v1",
                       "FaxSid": "c0ffee00-0000-4000-8000-000000000001", "From": CALLER,
                       "To": SECOND})
    url = f"{webhook_url(gw_manual)}?{query}"
    async with aiohttp.ClientSession() as client:
        async with client.get(url, headers={"X-SignalWire-Signature":
                                            simulator.state.sign(url, {})}) as resp:
            assert resp.status == 200
            assert "<Receive " in await resp.text()
        async with client.get(url + "&To=%2B13103383499", headers={
                "X-SignalWire-Signature": simulator.state.sign(url, {})}) as resp:
            assert resp.status == 403
    assert [r["state"] for r in rows(gw_manual)] == ["ringing"]


async def test_reconciled_fax_without_media_url_uses_the_media_instance(
        gw_manual: Gateway, simulator: Simulator, relay: RelaySink) -> None:
    simulator.state.inbound.skip_action = True
    call = await ring(gw_manual, simulator, to=SECOND)
    simulator.state.faxes[call.fax_sid].media_url = ""  # the resource names no media_url
    assert await gw_manual.inbound.reconciler.run_once() == 1
    await gw_manual.inbound.deliverer.run_until_idle()
    mail = await relay.next()
    [pdf] = [p for p in mail.iter_attachments() if p.get_content_type() == "application/pdf"]
    assert pdf.get_content() == make_pdf(2)


async def test_a_relay_that_stalls_forever_is_given_up_within_the_send_bound(
        gw_manual: Gateway, simulator: Simulator, relay: RelaySink) -> None:
    """The relay takes the connection, MAIL and RCPT, then never answers DATA. Each step has
    its own NOTIFY_TIMEOUT_S (60 s); the send as a whole is bounded (well inside the settle
    window other nodes wait): the mail is given up and retried later, not waited on."""
    from gateway.inbound.delivery import SEND_SETTLE_S, SEND_TIMEOUT_S

    assert SEND_TIMEOUT_S <= SEND_SETTLE_S / 1.5  # comfortably inside the window
    deliverer = gw_manual.inbound.deliverer
    deliverer.send_timeout_s = 1.0  # the bound, short for the test
    relay.stall_data = True
    await ring(gw_manual, simulator, to=SECOND)
    await asyncio.wait_for(deliverer.run_until_idle(), 20)  # not the 60 s of DATA's timeout
    assert relay.stalled.is_set()
    [row] = rows(gw_manual)
    assert row["state"] != "done"
    assert row["last_error"] == ("mail to lab@example.com: the relay took longer than 1 s in "
                                 "all; given up")
    assert rows(gw_manual, "inbound_deliveries") == []
