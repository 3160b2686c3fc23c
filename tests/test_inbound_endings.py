"""How a received fax ends when things go wrong: the administrator is told of a fax given up,
each fax is counted once by its final outcome on /metrics, and a document SignalWire will not
let go of (deletion failing until GIVE_UP_HOURS) leaves the fax delivered, not given up.

Real parts: the gateway's signed webhook, the simulator over HTTP, the relay sink, SQLite; the
deliverer driven by hand on an injected clock."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from .conftest import FakeClock, GatewayFactory, RelaySink, Simulator, make_pdf
from .helpers.inbound import ADMIN, counts, env, ring, row


async def test_a_document_neither_pdf_nor_tiff_is_given_up_told_and_counted_once(
        tmp_path: Path, simulator: Simulator, relay: RelaySink,
        manual_gateway: GatewayFactory) -> None:
    gw = await manual_gateway(env(tmp_path, simulator, relay, INBOUND_ADMIN_ADDRESS=ADMIN),
                              FakeClock(time.time()))
    try:
        sid = await ring(gw, simulator, b"GIF89a not a fax document at all")
        # Received, but nothing can be mailed yet: not counted until it ends.
        assert await counts(gw) == {}
        await gw.inbound.deliverer.run_until_idle()
        assert row(gw, sid)["state"] == "given-up"
        alert = await relay.next()
        assert alert["To"] == ADMIN
        assert alert["Subject"] == ("Fax from +1 212-555-0147 not delivered: the document is "
                                    "neither PDF nor TIFF (32 bytes): nothing mailed")
        body = alert.get_body(("plain",)).get_content()
        assert sid in body and "Not mailed to: frontdesk@example.com" in body
        assert "SignalWire's dashboard" in body
        assert relay.messages.empty()  # the routed person got nothing (there is nothing)
        assert await counts(gw) == {"gave_up": 1.0}  # once, not also as "received"
        # A second pass changes nothing and tells no one again.
        await gw.inbound.deliverer.run_until_idle()
        assert relay.messages.empty() and await counts(gw) == {"gave_up": 1.0}
    finally:
        await gw.stop(grace_s=1)


async def test_a_refused_media_url_tells_the_administrator(
        tmp_path: Path, simulator: Simulator, relay: RelaySink,
        manual_gateway: GatewayFactory) -> None:
    gw = await manual_gateway(env(tmp_path, simulator, relay, INBOUND_ADMIN_ADDRESS=ADMIN),
                              FakeClock(time.time()))
    try:
        simulator.state.inbound.media_url_override = "https://files.example.net/fax.pdf"
        sid = await ring(gw, simulator, make_pdf(1))
        await gw.inbound.deliverer.run_until_idle()
        alert = await relay.next()
        assert alert["To"] == ADMIN and "media URL refused" in alert["Subject"]
        assert row(gw, sid)["state"] == "given-up"
        assert relay.messages.empty()
        assert await counts(gw) == {"media_refused": 1.0}
    finally:
        await gw.stop(grace_s=1)


async def test_without_an_admin_address_a_give_up_is_logged_only(
        tmp_path: Path, simulator: Simulator, relay: RelaySink,
        caplog: pytest.LogCaptureFixture, manual_gateway: GatewayFactory) -> None:
    gw = await manual_gateway(env(tmp_path, simulator, relay), FakeClock(time.time()))
    try:
        with caplog.at_level(logging.ERROR, "gateway.inbound.delivery"):
            sid = await ring(gw, simulator, b"not a document")
            await gw.inbound.deliverer.run_until_idle()
        assert row(gw, sid)["state"] == "given-up"
        assert relay.messages.empty()
        assert "no INBOUND_ADMIN_ADDRESS to tell" in caplog.text
        assert await counts(gw) == {"gave_up": 1.0}
    finally:
        await gw.stop(grace_s=1)


async def test_media_deletion_failing_until_give_up_leaves_the_fax_delivered(
        tmp_path: Path, simulator: Simulator, relay: RelaySink,
        caplog: pytest.LogCaptureFixture, manual_gateway: GatewayFactory) -> None:
    clock = FakeClock(time.time())
    gw = await manual_gateway(env(tmp_path, simulator, relay, INBOUND_ADMIN_ADDRESS=ADMIN,
                                  GIVE_UP_HOURS="1"), clock)
    try:
        simulator.state.inbound.delete_conflicts = 10_000  # SignalWire never lets go
        sid = await ring(gw, simulator, make_pdf(1))
        await gw.inbound.deliverer.run_until_idle()
        assert (await relay.next())["To"] == "frontdesk@example.com"
        assert row(gw, sid)["state"] == "deleting"
        clock.advance(1800)
        await gw.inbound.deliverer.run_until_idle()
        assert row(gw, sid)["state"] == "deleting"  # still trying within GIVE_UP_HOURS
        clock.advance(1801)
        with caplog.at_level(logging.ERROR, "gateway.inbound.delivery"):
            await gw.inbound.deliverer.run_until_idle()
        r = row(gw, sid)
        assert (r["state"], r["outcome"], r["media_deleted_at"]) == ("done", "received", None)
        assert r["next_run_at"] is None and "409" in r["last_error"]
        assert "delivered, but its document could not be deleted at SignalWire" in caplog.text
        assert simulator.state.faxes[sid].media_bytes is not None  # left there
        assert relay.messages.empty()  # delivered: no alert, no second mail
        assert await counts(gw) == {"received": 1.0}
        await gw.inbound.deliverer.run_until_idle()
        assert row(gw, sid)["state"] == "done"
    finally:
        await gw.stop(grace_s=1)


async def test_a_delivered_fax_is_counted_once_when_mailed(
        tmp_path: Path, simulator: Simulator, relay: RelaySink,
        manual_gateway: GatewayFactory) -> None:
    gw = await manual_gateway(env(tmp_path, simulator, relay), FakeClock(time.time()))
    try:
        sid = await ring(gw, simulator, make_pdf(1))
        assert await counts(gw) == {}
        await gw.inbound.deliverer.run_until_idle()
        await relay.next()
        assert row(gw, sid)["state"] == "done"
        assert await counts(gw) == {"received": 1.0}
        # The reconciler sees the same fax at SignalWire: known, not counted again.
        assert await gw.inbound.reconciler.run_once() == 0
        assert await counts(gw) == {"received": 1.0}
    finally:
        await gw.stop(grace_s=1)
