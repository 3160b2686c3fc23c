"""The dashboard in a real headless Chromium (Debian's /usr/bin/chromium driven by playwright):
the browser fixture, watched pages, logging in, and mail sent to fill the job list."""

from __future__ import annotations

import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

from gateway.cli import sample_pdf
from gateway.daemon import Gateway

from ..conftest import job_ids, needs, pdf_mail, smtp_send

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
PASSWORDS = {"ann": "ann-admin-pw", "vic": "vic-viewer-pw", "sam": "sam-mail-only-pw"}
REFUSED_LOGIN = re.compile(r"Failed to load resource: the server responded with a status of "
                           r"(401 \(Unauthorized\)|429 \(Too Many Requests\)|403 \(Forbidden\))")
SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"

# The machine running the suite may be busy: generous waits, still bounded.
expect.set_options(timeout=15_000)
TIMEOUT_MS = 30_000

pytestmark = needs(bool(shutil.which(CHROMIUM)),
                   "Debian's chromium (apt-get install chromium); .ci/run installs it")


async def send(gw: Gateway, number: str, *, subject: str, sender: str,
               text: str = "faxgw dashboard test") -> str:
    reply = await smtp_send(gw.smtp.port, pdf_mail(f"{number}@fax.local", pdf=sample_pdf(text),
                                                   subject=subject, sender=sender,
                                                   filename="scan.pdf"),
                            [f"{number}@fax.local"], mail_from=sender)
    assert reply.code == 250, reply.text
    [job_id] = job_ids(reply.text)
    return job_id


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as pw:
        chromium = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            await chromium.close()


class Watched:
    """A page whose JavaScript errors, console errors and dialogs are collected."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))
        page.on("console", self._console)
        page.on("dialog", self._dialog)

    def _console(self, msg: Any) -> None:
        if msg.type != "error":
            return
        # A refused login answers 401 / 429 / 403 on purpose, and Chromium logs any such
        # page load; that one message, for the login form only, is not a script error.
        if (REFUSED_LOGIN.fullmatch(msg.text)
                and msg.location.get("url", "").split("?")[0].endswith("/login")):
            return
        self.errors.append(f"console: {msg.text} at {msg.location.get('url')}")

    async def _dialog(self, dialog: Any) -> None:
        self.dialogs.append(dialog.message)
        await dialog.dismiss()

    def clean(self) -> None:
        assert self.errors == [], self.errors
        assert self.dialogs == [], self.dialogs


async def new_page(browser: Browser, **options: Any) -> Watched:
    context = await browser.new_context(**options)
    context.set_default_timeout(TIMEOUT_MS)
    return Watched(await context.new_page())


async def login(w: Watched, base: str, name: str, password: str | None = None) -> None:
    page = w.page
    if not page.url.startswith(base + "/login"):
        await page.goto(base + "/login")
    await page.fill("#name", name)
    await page.fill("#password", PASSWORDS[name] if password is None else password)
    await page.click("form.stack button[type=submit]")
    await page.wait_for_load_state()


