"""The dashboard in a real headless Chromium (Debian's /usr/bin/chromium driven by playwright),
against a real gateway: its SMTP listener, the SignalWire simulator over HTTP, a relay sink.

Every page a test opens is watched for JavaScript errors and console errors (a CSP violation
is one); each test ends by asserting there were none.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from PIL import Image
from playwright.async_api import Browser, Page, expect

from gateway.daemon import Gateway
from gateway.jobs.outbound_states import State
from gateway.mail.reports import outcome
from gateway.users import passwd_command
from gateway.web.dashboard import routes as dashboard_app

from .conftest import GatewayFactory, RelaySink, Simulator, production_env, relay_env, wait_state
from .helpers.dashboard import PASSWORDS, SCREENSHOTS, browser, login, new_page, pytestmark, send  # noqa: F401 - a fixture and the module's mark

SCRIPT_SUBJECT = 'Quote <script>window.pwned=1</script> & "co"'


class Dash:
    def __init__(self, gw: Gateway, simulator: Simulator, jobs: dict[str, str]) -> None:
        self.gw = gw
        self.simulator = simulator
        self.jobs = jobs   # name -> job id
        self.base = f"http://127.0.0.1:{gw.dashboard.port}"  # type: ignore[union-attr]

    async def job(self, job_id: str) -> Any:
        return await self.gw.store.run(self.gw.store.job, job_id)

    async def count_jobs(self) -> int:
        counts = await self.gw.store.run(self.gw.store.counts_by_state)
        return sum(counts.values())


async def start_dash(make_gateway: GatewayFactory, tmp_path: Path, simulator: Simulator,
                     relay: RelaySink, **extra: str) -> Dash:
    users = tmp_path / "users"
    passwd_command(users, "ann", PASSWORDS["ann"], role="admin")
    passwd_command(users, "vic", PASSWORDS["vic"], role="viewer")
    passwd_command(users, "sam", PASSWORDS["sam"])
    env = production_env(tmp_path / "var", simulator, **relay_env(relay),
                         USERS_FILE=str(users), DOCUMENT_RETENTION_HOURS="1",
                         FAX_MAX_ATTEMPTS="1", **extra)
    gw = await make_gateway(env)
    jobs = {
        "delivered": await send(gw, "15551234567", subject="Invoice 42 for ACME",
                                sender="alice@example.com", text="Invoice 42 - ACME Corp"),
        "failed": await send(gw, "15551230002", subject="Purchase order 7",
                             sender="carol@example.com", text="Purchase order 7"),
        "script": await send(gw, "15559876543", subject=SCRIPT_SUBJECT,
                             sender="bob@example.com", text="Quote for Bob"),
    }
    for job_id in jobs.values():
        await wait_state(gw, job_id, State.REPORTED)
    return Dash(gw, simulator, jobs)


@pytest.fixture
async def dash(make_gateway: GatewayFactory, tmp_path: Path, simulator: Simulator,
               relay: RelaySink) -> Dash:
    return await start_dash(make_gateway, tmp_path, simulator, relay)


async def rows(page: Page) -> list[str]:
    """The job ids in the list, top to bottom."""
    hrefs = await page.locator("table.jobs tbody a").evaluate_all(
        "links => links.map(a => a.getAttribute('href'))")
    return [h.rsplit("/", 1)[1] for h in hrefs]


async def test_login_list_filter_search_and_paging(dash: Dash, browser: Browser,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    w = await new_page(browser)
    page = w.page
    # No job data without a login: the list sends the browser to the login form.
    await page.goto(dash.base + "/jobs")
    await expect(page).to_have_url(re.compile(r"/login\?next=(%2F|/)jobs$"))
    assert "Invoice" not in await page.content()

    await login(w, dash.base, "ann", "not-the-password")
    await expect(page.locator("p.error")).to_have_text("Wrong name or password.")
    await login(w, dash.base, "ann")
    await expect(page).to_have_url(dash.base + "/jobs")
    await expect(page.locator("header .who")).to_contain_text("ann")

    # Newest first.
    j = dash.jobs
    assert await rows(page) == [j["script"], j["failed"], j["delivered"]]
    # Health at a glance.
    await expect(page.locator(".health-bar")).to_contain_text("SignalWire")
    await expect(page.locator(".health-bar")).to_contain_text("0 jobs not yet reported")

    # Filters and search go through the form, as a person would use them.
    await page.select_option("#status", "delivered")
    await page.click(".filters button[type=submit]")
    await page.wait_for_load_state()
    assert await rows(page) == [j["script"], j["delivered"]]
    await page.goto(dash.base + "/jobs")
    await page.fill("#to", "0002")
    await page.press("#to", "Enter")
    await page.wait_for_load_state()
    assert await rows(page) == [j["failed"]]
    await page.goto(dash.base + "/jobs?sender=BOB@example")
    assert await rows(page) == [j["script"]]
    await page.goto(dash.base + "/jobs")
    await page.fill("#q", "acme")
    await page.press("#q", "Enter")
    await page.wait_for_load_state()
    assert await rows(page) == [j["delivered"]]
    today = (await page.evaluate("new Date().toISOString().slice(0, 10)"))
    await page.goto(dash.base + f"/jobs?from={today}&until={today}")
    assert len(await rows(page)) == 3
    await page.goto(dash.base + "/jobs?until=2000-01-01")
    await expect(page.locator(".count")).to_have_text("No jobs found.")
    await page.goto(dash.base + "/jobs?from=yesterday")
    await expect(page.locator("#results .error")).to_contain_text("YYYY-MM-DD")

    # Paging (two to a page here).
    monkeypatch.setattr(dashboard_app, "PAGE_SIZE", 2)
    await page.goto(dash.base + "/jobs")
    assert await rows(page) == [j["script"], j["failed"]]
    await page.click("a[rel=next]")
    await page.wait_for_load_state()
    assert await rows(page) == [j["delivered"]]
    await expect(page.locator(".pager")).to_contain_text("Page 2 of 2")
    await page.click("a[rel=prev]")
    await page.wait_for_load_state()
    assert await rows(page) == [j["script"], j["failed"]]
    # The dates in the form, then Clear.
    await page.fill("#until", "2000-01-01")
    await page.click(".filters button[type=submit]")
    await expect(page.locator(".count")).to_have_text("No jobs found.")
    await page.click(".filters a.secondary")
    await expect(page).to_have_url(dash.base + "/jobs")
    w.clean()


async def test_job_page_picture_pdf_and_resend(dash: Dash, browser: Browser, relay: RelaySink
                                               ) -> None:
    w = await new_page(browser)
    page = w.page
    j = dash.jobs
    # A link to a job survives the login.
    await page.goto(f"{dash.base}/jobs/{j['failed']}")
    await login(w, dash.base, "ann")
    await expect(page).to_have_url(f"{dash.base}/jobs/{j['failed']}")
    failed = await dash.job(j["failed"])
    # The outcome in the report's own words.
    await expect(page.locator(".result")).to_have_text(outcome(failed)[1])
    await expect(page.locator(".facts")).to_contain_text("carol@example.com")
    await expect(page.locator(".facts")).to_contain_text("Purchase order 7")
    await expect(page.locator(".history")).to_contain_text("reported")

    # From the list to a job, by its link.
    await page.goto(dash.base + "/jobs")
    await page.click(f"a[href='/jobs/{j['delivered']}']")
    await expect(page).to_have_url(f"{dash.base}/jobs/{j['delivered']}")
    await expect(page.locator("h1")).to_contain_text("+1 555-123-4567")
    await expect(page.locator(".result")).to_have_text("delivered")
    # The first page is really shown (decoded by the browser), and the PDF is there.
    image = page.locator("img#first-page")
    await expect(image).to_be_visible()
    # Polled through the protocol: a string predicate would need eval, which the page's CSP
    # forbids (it fails whenever the image is not complete at the first look).
    await expect(page.locator("img#first-page")).to_have_js_property("complete", True)
    assert await image.evaluate("img => img.naturalWidth") > 0
    pdf = await page.request.get(f"{dash.base}/jobs/{j['delivered']}/fax.pdf")
    assert pdf.status == 200 and (await pdf.body()).startswith(b"%PDF-")

    # Resend: asks first; "No" changes nothing.
    faxes_before = len(dash.simulator.state.faxes)
    await page.click("text=Resend…")
    await expect(page.locator("h1")).to_contain_text("Resend")
    await page.click("text=No, go back")
    await expect(page).to_have_url(f"{dash.base}/jobs/{j['delivered']}")
    assert len(dash.simulator.state.faxes) == faxes_before
    await page.click("text=Resend…")
    await page.click("button:has-text('Yes, resend')")
    await page.wait_for_load_state()
    new_id = page.url.rsplit("/", 1)[1]
    assert new_id != j["delivered"] and re.fullmatch(r"[0-9a-f]{16}", new_id)
    await expect(page.locator(".flash")).to_contain_text(
        f"Job {j['delivered']} is being sent again")
    # A second fax really goes out, to the same number.
    await dash.simulator.state.wait_faxes(faxes_before + 1)
    newest = list(dash.simulator.state.faxes.values())[-1]
    assert newest.to == "+15551234567"
    await wait_state(dash.gw, new_id, State.REPORTED)
    # Recorded with the administrator's name, on both jobs, in the action's one event.
    old_events = await dash.gw.store.run(dash.gw.store.events, j["delivered"])
    assert [(e.kind, e.detail) for e in old_events][-1] == (
        "resent", f"sent again as job {new_id} by ann")
    assert not [e for e in old_events if e.kind == "operator"]
    await expect(page.locator(".history li").first).to_contain_text(
        f"resend of job {j['delivered']} by ann", timeout=15_000)

    # Send the report again (confirmed), recorded with the name.
    await page.click("text=Send the report again…")
    await page.click("button:has-text('Yes, send the report again')")
    await page.wait_for_load_state()
    await expect(page.locator(".flash")).to_contain_text("the report will be sent again")
    await wait_state(dash.gw, new_id, State.REPORTED)
    events = await dash.gw.store.run(dash.gw.store.events, new_id)
    assert [e.detail for e in events if e.kind == "report-again"] == [
        "report requested again by ann"]
    assert not [e for e in events if e.kind == "operator"]

    # Cancel a finished job: not offered, and the page says why.
    await expect(page.locator("#no-cancel")).to_contain_text("nothing to cancel")
    assert await page.locator("a.button:has-text('Cancel')").count() == 0
    w.clean()


async def test_cancel_before_sending_records_the_name(make_gateway: GatewayFactory,
                                                      tmp_path: Path, simulator: Simulator,
                                                      relay: RelaySink, browser: Browser
                                                      ) -> None:
    dash = await start_dash(make_gateway, tmp_path, simulator, relay)
    # A job at SignalWire, held in its queue: Cancel stops it there.
    simulator.state.hold_queue()
    job_id = await send(dash.gw, "15557654000", subject="Held", sender="alice@example.com")
    await wait_state(dash.gw, job_id, State.SUBMITTED)
    w = await new_page(browser)
    await login(w, dash.base, "ann")
    await w.page.goto(f"{dash.base}/jobs/{job_id}/cancel")
    await w.page.click("button:has-text('Yes, cancel')")
    await w.page.wait_for_load_state()
    await expect(w.page.locator(".flash")).to_contain_text("canceled at SignalWire")
    simulator.state.release_queue()
    await wait_state(dash.gw, job_id, State.REPORTED)
    job = await dash.job(job_id)
    assert job.fax_status == "canceled"
    events = await dash.gw.store.run(dash.gw.store.events, job_id)
    assert [e.detail for e in events if e.kind == "cancel"] == [
        f"fax {job.fax_sid} canceled at SignalWire by ann"]
    assert not [e for e in events if e.kind == "operator"]
    w.clean()


async def test_post_without_the_form_token_changes_nothing(dash: Dash, browser: Browser) -> None:
    w = await new_page(browser)
    await login(w, dash.base, "ann")
    jobs_before = await dash.count_jobs()
    faxes_before = len(dash.simulator.state.faxes)
    url = f"{dash.base}/jobs/{dash.jobs['delivered']}/resend"
    for form in ({}, {"csrf": "wrong-token"}, {"csrf": ""}):
        response = await w.page.request.post(url, form=form, max_redirects=0)
        assert response.status == 403
        assert "form token" in await response.text()
    response = await w.page.request.post(f"{dash.base}/jobs/{dash.jobs['failed']}/report",
                                         form={}, max_redirects=0)
    assert response.status == 403
    assert await dash.count_jobs() == jobs_before
    assert len(dash.simulator.state.faxes) == faxes_before
    failed = await dash.job(dash.jobs["failed"])
    assert failed.state is State.REPORTED
    events = await dash.gw.store.run(dash.gw.store.events, dash.jobs["delivered"])
    assert not [e for e in events if e.kind in ("operator", "resent")]
    # Logging out needs the token too.
    response = await w.page.request.post(f"{dash.base}/logout", form={}, max_redirects=0)
    assert response.status == 403
    await w.page.goto(dash.base + "/jobs")
    await expect(w.page).to_have_url(dash.base + "/jobs")
    await w.page.click("header button:has-text('Log out')")
    await w.page.wait_for_load_state()
    await expect(w.page).to_have_url(dash.base + "/login")
    await w.page.goto(dash.base + "/jobs")
    await expect(w.page).to_have_url(re.compile(r"/login\?next="))
    w.clean()


async def test_a_script_in_a_subject_is_shown_as_text(dash: Dash, browser: Browser) -> None:
    w = await new_page(browser)
    await login(w, dash.base, "ann")
    page = w.page
    for url in ("/jobs", f"/jobs/{dash.jobs['script']}", f"/jobs/{dash.jobs['script']}/resend",
                f"/jobs?q={SCRIPT_SUBJECT}"):
        await page.goto(dash.base + url)
        await expect(page.locator(".subject, .card p").filter(
            has_text="<script>").first).to_contain_text(SCRIPT_SUBJECT)
        assert await page.evaluate("window.pwned") is None
        # Only our own script element is on the page.
        assert await page.evaluate(
            "[...document.scripts].map(s => s.getAttribute('src'))") == ["/static/dash.js"]
    w.clean()


async def test_the_list_updates_while_it_is_open(dash: Dash, browser: Browser) -> None:
    w = await new_page(browser)
    await login(w, dash.base, "ann")
    page = w.page
    await page.evaluate("window.sameDocument = true")
    job_id = await send(dash.gw, "15551112222", subject="Arrived while watching",
                        sender="dave@example.com")
    # The poll (every 5 s) brings the new row in; the page is not reloaded.
    await expect(page.locator(f"a[href='/jobs/{job_id}']")).to_be_visible(timeout=15_000)
    assert await page.evaluate("window.sameDocument") is True
    assert (await rows(page))[0] == job_id
    w.clean()


async def test_lockout_after_repeated_wrong_passwords(make_gateway: GatewayFactory,
                                                      tmp_path: Path, simulator: Simulator,
                                                      relay: RelaySink, browser: Browser) -> None:
    dash = await start_dash(make_gateway, tmp_path, simulator, relay, AUTH_MAX_FAILURES="3")
    w = await new_page(browser)
    page = w.page
    for _ in range(2):
        await login(w, dash.base, "ann", "wrong")
        await expect(page.locator("p.error")).to_have_text("Wrong name or password.")
    await login(w, dash.base, "ann", "wrong")
    await expect(page.locator("p.error")).to_contain_text("Too many failed logins")
    # Now even the right password is refused without being checked.
    await login(w, dash.base, "ann")
    await expect(page.locator("p.error")).to_contain_text("Try again in 15 minutes")
    await expect(page).to_have_url(re.compile(r"/login"))
    w.clean()


async def test_viewer_sees_but_cannot_act(dash: Dash, browser: Browser) -> None:
    w = await new_page(browser)
    page = w.page
    # A user without a dashboard role cannot log in at all, and is told why.
    await login(w, dash.base, "sam")
    await expect(page.locator("p.error")).to_contain_text("may only send faxes by mail")
    await login(w, dash.base, "vic")
    await expect(page).to_have_url(dash.base + "/jobs")
    await expect(page.locator("header .who")).to_contain_text("vic (read-only)")
    # With the keyboard alone: Tab to the first job's link, Enter opens it.
    for _ in range(40):
        await page.keyboard.press("Tab")
        if await page.evaluate("document.activeElement.matches('table.jobs tbody a')"):
            break
    else:
        raise AssertionError("no job link reachable with Tab")
    await page.keyboard.press("Enter")
    await expect(page).to_have_url(f"{dash.base}/jobs/{dash.jobs['script']}")
    await page.goto(f"{dash.base}/jobs/{dash.jobs['delivered']}")
    await expect(page.locator("img#first-page")).to_be_visible()
    assert await page.locator("a.button:has-text('Resend')").count() == 0
    await expect(page.locator(".side")).to_contain_text("Read-only access")
    await page.goto(f"{dash.base}/jobs/{dash.jobs['delivered']}/resend")
    assert await page.locator("button:has-text('Yes')").count() == 0
    # Even a well-formed post with the viewer's own token changes nothing.
    token = await page.locator("header input[name=csrf]").get_attribute("value")
    faxes_before = len(dash.simulator.state.faxes)
    jobs_before = await dash.count_jobs()
    response = await page.request.post(f"{dash.base}/jobs/{dash.jobs['delivered']}/resend",
                                       form={"csrf": token or ""}, max_redirects=0)
    assert response.status == 403 and "read-only" in await response.text()
    assert await dash.count_jobs() == jobs_before
    assert len(dash.simulator.state.faxes) == faxes_before
    w.errors = [e for e in w.errors if "403" not in e]  # the refused login of sam
    w.clean()


async def test_screenshots(dash: Dash, browser: Browser, tmp_path: Path) -> None:
    """The pictures in docs/operations.md; written to docs/screenshots with FAXGW_SCREENSHOTS=1."""
    out = SCREENSHOTS if os.environ.get("FAXGW_SCREENSHOTS") == "1" else tmp_path
    out.mkdir(parents=True, exist_ok=True)
    w = await new_page(browser, viewport={"width": 1100, "height": 640})
    await login(w, dash.base, "ann")
    await w.page.screenshot(path=str(out / "jobs.png"), full_page=True)
    await w.page.goto(f"{dash.base}/jobs/{dash.jobs['delivered']}")
    await expect(w.page.locator("img#first-page")).to_have_js_property("complete", True)
    await w.page.screenshot(path=str(out / "job.png"), full_page=True)
    phone = await new_page(browser, viewport={"width": 390, "height": 760},
                           device_scale_factor=1, is_mobile=True)
    await login(phone, dash.base, "ann")
    # On a phone nothing is wider than the screen.
    assert await phone.page.evaluate("document.documentElement.scrollWidth") <= 390
    await phone.page.screenshot(path=str(out / "jobs-phone.png"))
    await phone.page.goto(f"{dash.base}/jobs/{dash.jobs['script']}")
    assert await phone.page.evaluate("document.documentElement.scrollWidth") <= 390
    await phone.page.screenshot(path=str(tmp_path / "job-phone.png"), full_page=True)
    await w.page.goto(f"{dash.base}/health")
    await w.page.screenshot(path=str(out / "health.png"), full_page=True)
    for name in ("jobs.png", "job.png", "jobs-phone.png", "health.png"):
        assert (out / name).stat().st_size > 5000
        with Image.open(out / name) as shot:  # smaller files for the repository
            shot.convert("RGB").quantize(colors=128).save(out / name, optimize=True)
    w.clean()
    phone.clean()


async def test_no_job_data_without_a_login_and_the_cookie_rules(dash: Dash) -> None:
    """Plain HTTP, to see the exact answers and Set-Cookie headers."""
    j = dash.jobs["delivered"]
    jar = aiohttp.CookieJar(unsafe=True)  # the dashboard is on 127.0.0.1
    async with aiohttp.ClientSession(cookie_jar=jar) as http:
        for path in ("/", "/jobs", "/jobs/rows", f"/jobs/{j}", f"/jobs/{j}/live",
                     f"/jobs/{j}/first-page.png", f"/jobs/{j}/fax.pdf", f"/jobs/{j}/resend",
                     "/health", "/health/live"):
            async with http.get(dash.base + path, allow_redirects=False) as r:
                assert r.status == 303, path
                assert r.headers["Location"].startswith("/login?next="), path
                assert j not in await r.text()
            async with http.get(dash.base + path, allow_redirects=False,
                                headers={"X-Requested-With": "fetch"}) as r:
                assert r.status in (401, 303), path
        for action in ("resend", "cancel", "report"):
            async with http.post(f"{dash.base}/jobs/{j}/{action}", data={"csrf": "x"},
                                 allow_redirects=False) as r:
                assert r.status == 403
        async with http.get(dash.base + "/login") as r:
            page = await r.text()
            assert r.headers["Content-Security-Policy"].startswith("default-src 'none'")
            login_cookie = r.headers["Set-Cookie"]
            assert "HttpOnly" in login_cookie and "SameSite=Strict" in login_cookie
        token = re.search(r'name="login_token" value="([^"]+)"', page)
        assert token
        form = {"login_token": token.group(1), "name": "ann", "password": PASSWORDS["ann"]}
        # Over plain HTTP from the proxy: no Secure flag.
        async with http.post(dash.base + "/login", data=form, allow_redirects=False) as r:
            assert r.status == 303
            cookie = r.headers.getall("Set-Cookie")
            session = next(c for c in cookie if c.startswith("faxgw_session="))
            assert "HttpOnly" in session and "SameSite=Strict" in session
            assert "Max-Age=28800" in session and "Secure" not in session
        # The login form's token is single-use: the login cookie went with the login.
        async with http.post(dash.base + "/login", data=form, allow_redirects=False) as r:
            assert r.status == 403 and "login form had expired" in await r.text()
        async with http.get(dash.base + "/login") as r:
            token = re.search(r'name="login_token" value="([^"]+)"', await r.text())
        assert token
        form["login_token"] = token.group(1)
        # The trusted proxy (loopback by default) says HTTPS: Secure.
        async with http.post(dash.base + "/login", data=form, allow_redirects=False,
                             headers={"X-Forwarded-Proto": "https"}) as r:
            session = next(c for c in r.headers.getall("Set-Cookie")
                           if c.startswith("faxgw_session="))
            assert "Secure" in session
    # The public listener has no dashboard.
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{dash.gw.web.port}/jobs") as r:
            assert r.status == 404


async def test_forwarded_headers_only_from_a_trusted_proxy(make_gateway: GatewayFactory,
                                                           tmp_path: Path,
                                                           simulator: Simulator,
                                                           relay: RelaySink) -> None:
    users = tmp_path / "users"
    passwd_command(users, "ann", PASSWORDS["ann"], role="admin")
    env = production_env(tmp_path / "var", simulator, **relay_env(relay), USERS_FILE=str(users),
                         ADMIN_TRUSTED_PROXIES="10.9.0.0/16", AUTH_MAX_FAILURES="2")
    gw = await make_gateway(env)
    base = f"http://127.0.0.1:{gw.dashboard.port}"  # type: ignore[union-attr]
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        async with http.get(base + "/login") as r:
            token = re.search(r'name="login_token" value="([^"]+)"', await r.text())
        assert token
        form = {"login_token": token.group(1), "name": "ann", "password": PASSWORDS["ann"]}
        async with http.post(base + "/login", data=form, allow_redirects=False,
                             headers={"X-Forwarded-Proto": "https"}) as r:
            session = next(c for c in r.headers.getall("Set-Cookie")
                           if c.startswith("faxgw_session="))
            assert "Secure" not in session  # 127.0.0.1 is not the proxy here
        # Nor does a made-up X-Forwarded-For dodge the lockout.
        async with http.get(base + "/login") as r:
            token = re.search(r'name="login_token" value="([^"]+)"', await r.text())
        assert token
        form["login_token"] = token.group(1)
        bad = dict(form, password="wrong")
        for n in range(3):
            async with http.post(base + "/login", data=bad, allow_redirects=False,
                                 headers={"X-Forwarded-For": f"192.0.2.{n}"}) as r:
                assert r.status in (401, 429)
        async with http.post(base + "/login", data=form, allow_redirects=False,
                             headers={"X-Forwarded-For": "192.0.2.99"}) as r:
            assert r.status == 429


async def test_admin_listen_empty_turns_the_dashboard_off(make_gateway: GatewayFactory,
                                                          tmp_path: Path) -> None:
    from .conftest import base_env

    gw = await make_gateway(base_env(tmp_path / "var", ADMIN_LISTEN=""))
    assert gw.dashboard is None
