"""Received TIFFs that are hard to convert (issue 26, item 11): one that cannot be converted is
final at once and the administrator is told, with no retries and no traceback; a long one is
converted frame by frame within the document worker's memory limit.

Real parts: the gateway's signed webhook, the simulator over HTTP, the relay sink, SQLite, real
document workers with their memory limit; the deliverer driven by hand on an injected clock."""

from __future__ import annotations

import asyncio
import io
import logging
import time
from pathlib import Path

import pytest
from PIL import Image
from pypdf import PdfReader

from .conftest import FakeClock, GatewayFactory, RelaySink, Simulator
from .helpers.inbound import ADMIN, counts, env, ring, row


def tiff(frames: list[Image.Image], compression: str) -> bytes:
    out = io.BytesIO()
    frames[0].save(out, "TIFF", save_all=True, append_images=frames[1:],
                   compression=compression, dpi=(204, 196))
    return out.getvalue()


async def test_a_tiff_that_cannot_be_converted_is_final_at_once(
        tmp_path: Path, simulator: Simulator, relay: RelaySink, manual_gateway: GatewayFactory,
        caplog: pytest.LogCaptureFixture) -> None:
    # One 20000 x 20000 frame: 400 megapixels, refused from its header.
    document = await asyncio.to_thread(
        lambda: tiff([Image.new("1", (20000, 20000), 1)], "group4"))
    gw = await manual_gateway(env(tmp_path, simulator, relay, INBOUND_ADMIN_ADDRESS=ADMIN),
                              FakeClock(time.time()))
    try:
        sid = await ring(gw, simulator, document)
        caplog.set_level(logging.INFO)
        await gw.inbound.deliverer.run_until_idle()
        fax = row(gw, sid)
        assert fax["state"] == "given-up" and fax["tries"] == 0  # never scheduled again
        assert fax["next_run_at"] is None
        alert = await relay.next()
        assert alert["To"] == ADMIN
        assert "could not be converted" in alert["Subject"]
        body = alert.get_body(("plain",)).get_content()
        assert "received fax is too large an image" in body
        assert "Not mailed to: frontdesk@example.com" in body
        assert relay.messages.empty()
        assert await counts(gw) == {"gave_up": 1.0}
        # Said in one line, without a traceback.
        assert not [r for r in caplog.records if r.exc_info], [
            r.getMessage() for r in caplog.records if r.exc_info]
        # Another pass tells no one again.
        gw.clock.advance(3600)  # type: ignore[attr-defined]
        await gw.inbound.deliverer.run_until_idle()
        assert relay.messages.empty() and row(gw, sid)["state"] == "given-up"
    finally:
        await gw.stop(grace_s=1)


async def test_a_long_tiff_is_converted_within_the_memory_bound(
        tmp_path: Path, simulator: Simulator, relay: RelaySink,
        manual_gateway: GatewayFactory) -> None:
    # 120 grey fax pages: 450 MB once decoded, more than a document worker may use here.
    pages = 120
    frame = Image.new("L", (1728, 2200), 128)
    document = await asyncio.to_thread(lambda: tiff([frame] * pages, "packbits"))
    gw = await manual_gateway(env(tmp_path, simulator, relay, INBOUND_ADMIN_ADDRESS=ADMIN,
                                  DOC_MEMORY_MB="400", DOC_TIMEOUT_SECONDS="300"),
                              FakeClock(time.time()))
    try:
        sid = await ring(gw, simulator, document)
        await gw.inbound.deliverer.run_until_idle()
        mail = await relay.next()
        assert mail["To"] == "frontdesk@example.com"
        [pdf] = [p for p in mail.iter_attachments()
                 if p.get_content_type() == "application/pdf"]
        assert len(PdfReader(io.BytesIO(pdf.get_content())).pages) == pages
        assert row(gw, sid)["state"] in ("deleting", "done")
        assert row(gw, sid)["tries"] == 0
    finally:
        await gw.stop(grace_s=1)
