"""Received faxes in the dashboard, in a real headless Chromium against a real gateway: the
simulator rings the gateway's signed inbound webhook, the deliverer mails the relay sink, and
the pages are read as a person would (list, filters, one fax, its picture, live updates)."""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, expect

from gateway.cli import sample_pdf
from gateway.web.dashboard import routes as dashboard_app

from .conftest import GatewayFactory, RelaySink, Simulator
from .helpers.dashboard import PASSWORDS, SCREENSHOTS, Watched, browser, login, new_page, pytestmark  # noqa: F401
from .helpers.received import OTHER, Inbox, received_rows, start_inbox

SCRIPT_STATION = '<script>window.pwned=1</script> & "ACME"'


@pytest.fixture
async def kept(tmp_path: Path, simulator: Simulator, relay: RelaySink,
               manual_gateway: GatewayFactory) -> AsyncIterator[Inbox]:
    """SignalWire keeps the documents (INBOUND_KEEP_MEDIA=yes): page 1 can be shown."""
    gw = await start_inbox(manual_gateway, tmp_path, simulator, relay,
                          INBOUND_KEEP_MEDIA="yes")
    yield Inbox(gw, simulator)
    await gw.stop(grace_s=1)


async def test_received_list_filters_paging_and_one_fax(kept: Inbox, browser: Browser,
                                                        relay: RelaySink,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    first = await kept.ring(pages=2)
    other = await kept.ring(to=OTHER, caller="+14155550123", pages=1, station="LAB 2")
    failed = await kept.ring(caller="+16175550199", failed="Far end hung up after page 1")
    mails = [await relay.next() for _ in range(2 + 1 + 3)]
    message_ids = {m["To"]: m["Message-ID"] for m in mails if "2 pages" in m["Subject"]}
    w = await new_page(browser)
    page = w.page
    # No data without a login; the link survives it.
    await page.goto(kept.base + "/received")
    await expect(page).to_have_url(re.compile(r"/login\?next=(%2F|/)received$"))
    await login(w, kept.base, "ann")
    await expect(page).to_have_url(kept.base + "/received")
    await expect(page.locator("nav a[aria-current=page]")).to_have_text("Received")
    assert await received_rows(w) == [failed, other, first]
    await expect(page.locator(f"tr:has(a[href='/received/{first}'])")).to_contain_text(
        "received, 2 pages, mailed to 2 of 2")
    await expect(page.locator(f"tr:has(a[href='/received/{failed}'])")).to_contain_text(
        "not received: Far end hung up after page 1")

    # Filters, through the form: the number it came in on, the caller (digits or station id).
    await page.fill("#to", "3455")
    await page.press("#to", "Enter")
    await page.wait_for_load_state()
    assert await received_rows(w) == [other]
    await page.goto(kept.base + "/received")
    await page.fill("#caller", "(617) 555")
    await page.click(".filters button[type=submit]")
    await page.wait_for_load_state()
    assert await received_rows(w) == [failed]
    await page.goto(kept.base + "/received?caller=lab 2")
    assert await received_rows(w) == [other]
    today = await page.evaluate("new Date().toISOString().slice(0, 10)")
    await page.goto(kept.base + f"/received?from={today}&until={today}")
    assert len(await received_rows(w)) == 3
    await page.goto(kept.base + "/received?until=2000-01-01")
    await expect(page.locator(".count")).to_have_text("No received faxes found.")
    await page.goto(kept.base + "/received?from=monday")
    await expect(page.locator("#results .error")).to_contain_text("YYYY-MM-DD")

    # Paging, two to a page.
    monkeypatch.setattr(dashboard_app, "PAGE_SIZE", 2)
    await page.goto(kept.base + "/received")
    assert await received_rows(w) == [failed, other]
    await page.click("a[rel=next]")
    await page.wait_for_load_state()
    assert await received_rows(w) == [first]
    await expect(page.locator(".pager")).to_contain_text("Page 2 of 2")
    await page.click("a[rel=prev]")
    await page.wait_for_load_state()
    assert await received_rows(w) == [failed, other]
    await page.click("a[rel=next]")
    await page.wait_for_load_state()

    # One fax, by its link: every fact, each recipient's mail, the picture of page 1.
    await page.click(f"a[href='/received/{first}']")
    await expect(page).to_have_url(f"{kept.base}/received/{first}")
    facts = page.locator(".facts")
    await expect(page.locator(".result")).to_have_text("received, 2 pages, mailed to 2 of 2")
    await expect(facts).to_contain_text("+1 212-555-0147")
    await expect(facts).to_contain_text("ACME FAX")
    await expect(facts).to_contain_text("+1 310-338-3454")
    await expect(facts.locator("dd").nth(5)).to_have_text("2")
    mail_rows = page.locator(".details table tbody tr")
    await expect(mail_rows).to_have_count(2)
    for recipient in ("frontdesk@example.com", "billing@example.com"):
        row = mail_rows.filter(has_text=recipient)
        await expect(row).to_contain_text(message_ids[recipient])
        await expect(row.locator("td").nth(1)).to_have_text(re.compile(r"\d{4}-\d\d-\d\d "))
    image = page.locator("img#first-page")
    await expect(image).to_be_visible()
    await expect(page.locator("img#first-page")).to_have_js_property("complete", True)
    assert await image.evaluate("img => img.naturalWidth") > 0

    # A failed fax: its reason, the administrator's mail, and why there is no picture.
    await page.goto(f"{kept.base}/received/{failed}")
    await expect(page.locator(".result")).to_contain_text("Far end hung up after page 1")
    await expect(page.locator(".details table")).to_contain_text("admin@example.com")
    await expect(page.locator("#no-picture")).to_have_text(
        "No picture: no document was received.")
    assert await page.locator("img#first-page").count() == 0
    # An unknown fax is a plain 404.
    response = await page.request.get(f"{kept.base}/received/00000000-no-such-fax")
    assert response.status == 404
    w.clean()


async def test_a_script_in_the_station_id_is_shown_as_text(kept: Inbox, browser: Browser
                                                           ) -> None:
    sid = await kept.ring(station=SCRIPT_STATION)
    w = await new_page(browser)
    await login(w, kept.base, "ann")
    for url in ("/received", f"/received/{sid}", f"/received?caller={SCRIPT_STATION}"):
        await w.page.goto(kept.base + url)
        await expect(w.page.locator(".subject, .station").filter(
            has_text="<script>").first).to_have_text(SCRIPT_STATION)
        assert await w.page.evaluate("window.pwned") is None
        assert await w.page.evaluate(
            "[...document.scripts].map(s => s.getAttribute('src'))") == ["/static/dash.js"]
    w.clean()


async def test_the_received_list_updates_while_it_is_open(kept: Inbox, browser: Browser
                                                          ) -> None:
    w = await new_page(browser)
    await login(w, kept.base, "ann", )
    await w.page.goto(kept.base + "/received")
    await expect(w.page.locator(".count")).to_have_text("No received faxes found.")
    await w.page.evaluate("window.sameDocument = true")
    sid = await kept.ring(caller="+13125550100")
    # The poll (every 5 s) brings the new row in; the page is not reloaded.
    await expect(w.page.locator(f"a[href='/received/{sid}']")).to_be_visible(timeout=15_000)
    assert await w.page.evaluate("window.sameDocument") is True
    w.clean()


async def test_a_deleted_document_says_why_there_is_no_picture(
        tmp_path: Path, simulator: Simulator, relay: RelaySink, browser: Browser,
        manual_gateway: GatewayFactory) -> None:
    """The default: the document is deleted at SignalWire once mailed; the gateway kept no
    copy, and the page says so instead of showing a broken picture."""
    gw = await start_inbox(manual_gateway, tmp_path, simulator, relay)
    try:
        inbox = Inbox(gw, simulator)
        sid = await inbox.ring()
        assert simulator.state.inbound.media_deletes == [sid]
        w = await new_page(browser)
        await login(w, inbox.base, "ann")
        await w.page.goto(f"{inbox.base}/received/{sid}")
        await expect(w.page.locator(".result")).to_have_text(
            "received, 2 pages, mailed to 2 of 2")
        await expect(w.page.locator("#no-picture")).to_contain_text(
            "deleted at SignalWire after it was mailed")
        await expect(w.page.locator(".facts")).to_contain_text("deleted at SignalWire")
        assert await w.page.locator("img#first-page").count() == 0
        response = await w.page.request.get(f"{inbox.base}/received/{sid}/first-page.png")
        assert response.status == 404
        w.clean()
    finally:
        await gw.stop(grace_s=1)


async def test_received_screenshot(kept: Inbox, browser: Browser, tmp_path: Path) -> None:
    """The received fax page for docs/operations.md; written to docs/screenshots with
    FAXGW_SCREENSHOTS=1."""
    from PIL import Image

    out = SCREENSHOTS if os.environ.get("FAXGW_SCREENSHOTS") == "1" else tmp_path
    out.mkdir(parents=True, exist_ok=True)
    await kept.ring(caller="+14155550123", to=OTHER, pages=1, station="LAB 2")
    sid = await kept.ring(document=sample_pdf("Fax for the front desk"))
    w = await new_page(browser, viewport={"width": 1100, "height": 640})
    await login(w, kept.base, "ann")
    await w.page.goto(f"{kept.base}/received/{sid}")
    await expect(w.page.locator("img#first-page")).to_have_js_property("complete", True)
    await w.page.screenshot(path=str(out / "received.png"), full_page=True)
    assert (out / "received.png").stat().st_size > 5000
    with Image.open(out / "received.png") as shot:
        shot.convert("RGB").quantize(colors=128).save(out / "received.png", optimize=True)
    # On a phone nothing is wider than the screen, the list nor a fax's page.
    phone = await new_page(browser, viewport={"width": 390, "height": 760},
                           device_scale_factor=1, is_mobile=True)
    await login(phone, kept.base, "ann")
    for url in ("/received", f"/received/{sid}"):
        await phone.page.goto(kept.base + url)
        assert await phone.page.evaluate("document.documentElement.scrollWidth") <= 390, url
    w.clean()
    phone.clean()
