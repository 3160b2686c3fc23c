"""A job's page offers only the actions that can work, says why the others cannot, and a
refused action looks refused (issue 26, item 7); times in the viewer's own zone with UTC on
hover, and when an active job's next attempt is (item 10). Real headless Chromium against a
real gateway, as in tests/test_dashboard.py."""

from __future__ import annotations

import asyncio
import re
import time
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

from playwright.async_api import Browser, expect

from gateway.daemon import Gateway
from gateway.jobs.outbound_states import State
from gateway.users import passwd_command

from .conftest import GatewayFactory, RelaySink, Simulator, production_env, relay_env, wait_state
from .helpers.dashboard import PASSWORDS, browser, login, new_page, pytestmark, send  # noqa: F401

ZONE = "America/New_York"


async def start(make_gateway: GatewayFactory, tmp_path: Path, simulator: Simulator,
                relay: RelaySink, **extra: str) -> tuple[Gateway, str]:
    users = tmp_path / "users"
    passwd_command(users, "ann", PASSWORDS["ann"], role="admin")
    env = production_env(tmp_path / "var", simulator, **relay_env(relay), USERS_FILE=str(users),
                         **extra)
    gw = await make_gateway(env)
    return gw, f"http://127.0.0.1:{gw.dashboard.port}"  # type: ignore[union-attr]


async def wait_purged(gw: Gateway, job_id: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        job = await gw.store.run(gw.store.job, job_id)
        message = await gw.store.run(gw.store.message, job.message_id)
        if message is not None and message.purged_at is not None:
            return
        assert time.monotonic() < deadline, "the document was not deleted"
        gw.worker.wake()
        await asyncio.sleep(0.1)  # polling the store for the housekeeping's result


async def test_a_finished_job_with_its_document_deleted(make_gateway: GatewayFactory,
                                                        tmp_path: Path, simulator: Simulator,
                                                        relay: RelaySink,
                                                        browser: Browser) -> None:
    # The default retention: the document goes as soon as the report is sent.
    gw, base = await start(make_gateway, tmp_path, simulator, relay,
                           DOCUMENT_RETENTION_HOURS="0", FAX_MAX_ATTEMPTS="1")
    job_id = await send(gw, "15551234567", subject="Invoice 42", sender="alice@example.com")
    await wait_state(gw, job_id, State.REPORTED)
    await wait_purged(gw, job_id)
    w = await new_page(browser)
    await login(w, base, "ann")
    page = w.page
    await page.goto(f"{base}/jobs/{job_id}")
    # Only "Send the report again" is offered; the other two say why not.
    offered = await page.locator("ul.actions a.button").all_text_contents()
    assert offered == ["Send the report again…"]
    await expect(page.locator("#no-resend")).to_contain_text("no longer kept")
    await expect(page.locator("#no-resend")).to_contain_text("DOCUMENT_RETENTION_HOURS")
    await expect(page.locator("#no-cancel")).to_contain_text("nothing to cancel")
    # The resend page, reached by an old link, has no button and says why.
    jobs_before = sum((await gw.store.run(gw.store.counts_by_state)).values())
    await page.goto(f"{base}/jobs/{job_id}/resend")
    await expect(page.locator(".card .error")).to_contain_text("cannot be done now")
    assert await page.locator("button:has-text('Yes')").count() == 0
    # A post anyway (a form open from before): refused, and it looks refused.
    token = await page.locator("header input[name=csrf]").get_attribute("value")
    await page.evaluate("""([url, token]) => {
        const f = document.createElement('form'); f.method = 'post'; f.action = url;
        const i = document.createElement('input'); i.type = 'hidden'; i.name = 'csrf';
        i.value = token; f.appendChild(i); document.body.appendChild(f); f.submit(); }""",
                        [f"/jobs/{job_id}/resend", token])
    await page.wait_for_load_state()
    refused = page.locator(".flash")
    await expect(refused).to_contain_text("Not done.")
    await expect(refused).to_contain_text("deleted")
    assert await refused.get_attribute("role") == "alert"
    refused_colour = await refused.evaluate("e => getComputedStyle(e).backgroundColor")
    assert sum((await gw.store.run(gw.store.counts_by_state)).values()) == jobs_before
    # What is offered works, and success looks different.
    await page.click("text=Send the report again…")
    await page.click("button:has-text('Yes, send the report again')")
    await page.wait_for_load_state()
    done = page.locator(".flash")
    await expect(done).to_contain_text("the report will be sent again")
    assert await done.get_attribute("role") == "status"
    assert await done.evaluate("e => getComputedStyle(e).backgroundColor") != refused_colour
    w.clean()


async def test_an_active_job_offers_cancel_and_says_when_it_tries_next(
        make_gateway: GatewayFactory, tmp_path: Path, simulator: Simulator, relay: RelaySink,
        browser: Browser) -> None:
    gw, base = await start(make_gateway, tmp_path, simulator, relay,
                           FAX_MAX_ATTEMPTS="3", FAX_RETRY_DELAY_SECONDS="1800",
                           FAX_KILL_MINUTES="600")
    # A busy line (the simulator's ...0000): attempt 2 is half an hour away.
    job_id = await send(gw, "15551230000", subject="Busy line", sender="bob@example.com")
    deadline = time.monotonic() + 30
    while True:
        job = await gw.store.run(gw.store.job, job_id)
        if job.state is State.STORED and job.attempt == 1:
            break
        assert time.monotonic() < deadline, job
        await asyncio.sleep(0.1)  # polling the store for the worker's step
    assert job.next_run_at is not None
    w = await new_page(browser, timezone_id=ZONE)
    await login(w, base, "ann")
    page = w.page
    await page.goto(f"{base}/jobs/{job_id}")
    assert await page.locator("ul.actions a.button").all_text_contents() == ["Cancel…"]
    await expect(page.locator("#no-resend")).to_contain_text("still in progress")
    await expect(page.locator("#no-report")).to_contain_text("when the fax is finished")
    # When the next attempt is, in the viewer's time, UTC on hover.
    nxt = page.locator(".next-step time")
    local = datetime.fromtimestamp(job.next_run_at, ZoneInfo(ZONE))
    await expect(nxt).to_have_text(local.strftime("%Y-%m-%d %H:%M:%S"))
    utc = datetime.fromtimestamp(job.next_run_at, ZoneInfo("UTC"))
    assert await nxt.get_attribute("title") == utc.strftime("%Y-%m-%d %H:%M:%S UTC")
    await expect(page.locator(".facts")).to_contain_text(
        re.compile(r"Next attempt.*\(in (29|30) min"))
    # The list's times too, and they stay local when the list refreshes itself.
    await page.goto(f"{base}/jobs")
    created = datetime.fromtimestamp(job.created_at, ZoneInfo(ZONE))
    cell = page.locator(f"a[href='/jobs/{job_id}'] time")
    await expect(cell).to_have_text(created.strftime("%Y-%m-%d %H:%M:%S"))
    await page.evaluate("window.sameDocument = true")
    other = await send(gw, "15551230000", subject="Arrived while watching",
                       sender="bob@example.com")
    await expect(page.locator(f"a[href='/jobs/{other}'] time")).to_be_visible(timeout=15_000)
    await expect(cell).to_have_text(created.strftime("%Y-%m-%d %H:%M:%S"))
    assert await page.evaluate("window.sameDocument") is True
    # Cancel works from the page.
    await page.goto(f"{base}/jobs/{job_id}")
    await page.click("text=Cancel…")
    await page.click("button:has-text('Yes, cancel')")
    await page.wait_for_load_state()
    await expect(page.locator(".flash")).to_contain_text("canceled")
    assert await page.locator(".flash").get_attribute("role") == "status"
    w.clean()
