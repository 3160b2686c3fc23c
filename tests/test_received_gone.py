"""A received fax whose document is gone at SignalWire, the received list's recipients, and the
received-fax mail's page picture (issue 26, items 13 and 10): real Chromium against a real
gateway, the simulator over HTTP, the relay sink."""

from __future__ import annotations

import email
import email.policy
import io
import re
import time
from pathlib import Path

from PIL import Image
from playwright.async_api import Browser, expect

from gateway.mail.received import build_received
from gateway.store.inbound import InboundFax

from .conftest import GatewayFactory, RelaySink, Simulator
from .helpers.dashboard import browser, login, new_page, pytestmark  # noqa: F401
from .helpers.received import Inbox, received_rows, start_inbox

NOT_FOUND = re.compile(r"Failed to load resource: the server responded with a status of 404")


async def test_a_document_deleted_at_signalwire_shows_words_not_a_broken_picture(
        tmp_path: Path, simulator: Simulator, relay: RelaySink, browser: Browser,
        manual_gateway: GatewayFactory) -> None:
    gw = await start_inbox(manual_gateway, tmp_path, simulator, relay,
                           INBOUND_KEEP_MEDIA="yes")
    try:
        inbox = Inbox(gw, simulator)
        sid = await inbox.ring()
        w = await new_page(browser)
        await login(w, inbox.base, "ann")
        # The list says to whom the fax went.
        await w.page.goto(inbox.base + "/received")
        assert await received_rows(w) == [sid]
        await expect(w.page.locator("td[data-label='Mailed to']")).to_have_text(
            "frontdesk@example.com, billing@example.com")
        # Someone deletes the document in SignalWire's dashboard (the gateway was told to
        # keep it there, and keeps no copy of its own).
        row = await gw.store.run(gw.inbound.db.get, sid)
        assert row is not None and row.media_sid, "the fax names its media"
        assert await gw.signalwire.delete_media(sid, row.media_sid) in (200, 204)
        await w.page.goto(f"{inbox.base}/received/{sid}")
        # The picture cannot come: words instead of a broken image, at once.
        await expect(w.page.locator("#no-picture")).to_be_visible()
        assert await w.page.locator("img#first-page").count() == 0
        # The browser's own log line for the refused picture is the only error.
        assert all(NOT_FOUND.search(e) for e in w.errors), w.errors
        w.errors.clear()
        # From then on the page says why, and offers no picture at all.
        await w.page.reload()
        await expect(w.page.locator("#no-picture")).to_contain_text(
            "SignalWire no longer has this fax's document")
        await expect(w.page.locator(".facts")).to_contain_text("no longer at SignalWire")
        await expect(w.page.locator(".facts")).not_to_contain_text("Fax status")
        await expect(w.page.locator(".result")).to_have_text(
            "received, 2 pages, mailed to 2 of 2")
        assert await w.page.locator("img#first-page").count() == 0
        w.clean()
    finally:
        await gw.stop(grace_s=1)


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (30, 40), 255).save(buf, "PNG")
    return buf.getvalue()


def test_the_page_picture_is_inline_where_the_html_shows_it() -> None:
    fax = InboundFax(**{**{f: None for f in InboundFax.__dataclass_fields__},
                        "fax_sid": "FX-inline-test-0001", "state": "delivering",
                        "outcome": "received", "fax_status": "received", "num_pages": 1,
                        "from_number": "+12125550147", "to_number": "+13103383454",
                        "recipients": "a@example.com", "tries": 0,
                        "completed_at": time.time(), "created_at": time.time(),
                        "updated_at": time.time()})
    mail = build_received(fax, "a@example.com", from_addr="faxgw@example.com",
                          hostname="fax.example.com", pdf=b"%PDF-1.4 x", thumbnail_png=_png(),
                          attach=True)
    parsed = email.message_from_bytes(mail.as_bytes(), policy=email.policy.default)
    [picture] = [p for p in parsed.walk() if p.get_content_type() == "image/png"]
    assert picture.get_content_disposition() == "inline"
    [html] = [p for p in parsed.walk() if p.get_content_type() == "text/html"]
    cid = picture["Content-ID"].strip("<>")
    assert f'src="cid:{cid}"' in html.get_content()
    # The PDF is the one attachment.
    attachments = [p.get_content_type() for p in parsed.walk()
                   if p.get_content_disposition() == "attachment"]
    assert attachments == ["application/pdf"]
