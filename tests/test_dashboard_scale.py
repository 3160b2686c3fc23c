"""The dashboard's job list over many jobs (issue 26, item 8): searched, filtered, counted and
paged by the database over every job, not the newest few thousand; and its reads run on a
reader of their own, so they never wait in the queue intake's commits wait in (nor the other
way round). On both backends, with more jobs than the old in-Python scan ever looked at."""

from __future__ import annotations

import asyncio
import re
import secrets
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from gateway.jobs.outbound_states import State
from gateway.store.postgres import PostgresStore
from gateway.store.rows import Message, NewJob
from gateway.store.sql import SqlStore
from gateway.store.sqlite import SqliteStore
from gateway.users import passwd_command
from gateway.web.dashboard import queries
from gateway.web.dashboard import routes as dashboard_app

from .conftest import FakeClock, GatewayFactory, Simulator, pg_reset, production_env
from .helpers.web import log_in

MESSAGES = 61
PER_MESSAGE = 100
TOTAL = MESSAGES * PER_MESSAGE          # 6,100: more than the old scan's 5,000
OLD_SCAN = 5000


@pytest.fixture(params=["sqlite", "postgresql"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SqlStore]:
    clock = FakeClock()
    s: SqlStore
    if request.param == "postgresql":
        url = request.getfixturevalue("pg_url")
        pg_reset(url)
        s = PostgresStore(url, clock)
    else:
        s = SqliteStore(tmp_path / "faxgw.sqlite3", clock)
    await s.start()
    try:
        yield s
    finally:
        await s.stop()


def seed(store: SqlStore, clock: FakeClock) -> list[list[str]]:
    """MESSAGES mails of PER_MESSAGE jobs each, one second apart, oldest first; each mail has
    a subject of its own. Returns the job ids per mail."""
    out = []
    for n in range(MESSAGES):
        message = Message(
            id=f"m{n:015d}", created_at=clock(), envelope_from=f"sender{n}@example.com",
            header_from=None, report_to=f"sender{n}@example.com", subject=f"Batch {n:03d} of scans",
            message_id_header=None, references_header=None, peer="127.0.0.1",
            document_path=f"/nowhere/{n}.pdf", document_bytes=10, document_sha256="ab" * 32,
            pages=1, filenames=f"scan-{n}.pdf")
        jobs = [NewJob(secrets.token_hex(8), f"+1555{n:03d}{k:04d}", "+15550100000", "fine",
                       secrets.token_urlsafe(12), f"media-{n}-{k}") for k in range(PER_MESSAGE)]
        assert store.add_message(message, jobs) is None
        out.append([j.id for j in jobs])
        clock.advance(1)
    return out


async def test_search_filter_and_paging_cover_every_job(store: SqlStore) -> None:
    clock = store.clock
    assert isinstance(clock, FakeClock)
    start = clock()
    batches = await store.run(seed, store, clock)
    oldest_batch = batches[0]

    def search(**kw: object) -> queries.Page:
        args: dict[str, object] = dict(status=None, to=None, sender=None, since=None,
                                       until=None, text=None, offset=0, limit=25)
        args.update(kw)
        return queries.search_jobs(store, **args)  # type: ignore[arg-type]

    first = await store.read(search)
    assert first.total == TOTAL
    assert len(first.rows) == 25
    assert {r.id for r in first.rows} <= set(batches[-1])   # newest first
    # The last page holds the oldest jobs: 6,100 = 244 pages of 25.
    last = await store.read(lambda: search(offset=243 * 25))
    assert last.total == TOTAL and len(last.rows) == 25
    assert {r.id for r in last.rows} <= set(oldest_batch)
    assert (await store.read(lambda: search(offset=244 * 25))).rows == []
    # A job older than the newest 5,000 is found by its id, its subject, its sender and its
    # number; the count is of every match.
    target = oldest_batch[7]
    assert TOTAL - OLD_SCAN > PER_MESSAGE  # the whole first mail is past the old scan
    found = await store.read(lambda: search(text=target[:10].upper()))
    assert [r.id for r in found.rows] == [target] and found.total == 1
    found = await store.read(lambda: search(text="batch 000 OF"))
    assert found.total == PER_MESSAGE and {r.id for r in found.rows} <= set(oldest_batch)
    found = await store.read(lambda: search(sender="SENDER0@example"))
    assert found.total == PER_MESSAGE
    found = await store.read(lambda: search(to="(555) 000-0007"))
    assert [r.id for r in found.rows] == [target]
    # LIKE's own wildcards are plain characters in a search.
    assert (await store.read(lambda: search(text="%"))).total == 0
    assert (await store.read(lambda: search(text="batch_000"))).total == 0
    # Dates: `until` is exclusive, `since` inclusive, both in SQL.
    found = await store.read(lambda: search(until=start + 1))
    assert found.total == PER_MESSAGE
    found = await store.read(lambda: search(since=start + 60, until=start + 61))
    assert found.total == PER_MESSAGE and {r.id for r in found.rows} <= set(batches[60])
    # A status filter: one job given up among the old ones.
    job = await store.run(store.job, target)
    assert await store.run(lambda: store.mark_given_up(job, "test: given up"))
    found = await store.read(lambda: search(status="given-up"))
    assert [r.id for r in found.rows] == [target] and found.total == 1


async def test_reads_do_not_queue_behind_the_store_threads(store: SqlStore) -> None:
    """Every one of the store's own threads busy (a slow commit, say): the dashboard's read
    still answers, on its own thread and connection."""
    clock = store.clock
    assert isinstance(clock, FakeClock)
    await store.run(seed, store, clock)
    release = threading.Event()
    busy = [asyncio.ensure_future(store.run(release.wait, 30)) for _ in range(store.THREADS)]
    try:
        page = await asyncio.wait_for(store.read(lambda: queries.search_jobs(
            store, status=None, to=None, sender=None, since=None, until=None, text="batch 001",
            offset=0, limit=25)), timeout=10)
        assert page.total == PER_MESSAGE
        assert not any(t.done() for t in busy)  # the store's threads were busy all along
    finally:
        release.set()
        await asyncio.gather(*busy)


async def test_the_list_pages_and_searches_every_job(manual_gateway: GatewayFactory,
                                                     tmp_path: Path, simulator: Simulator,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    users = tmp_path / "users"
    passwd_command(users, "ann", "ann-admin-pw", role="admin")
    clock = FakeClock(time.time())
    gw = await manual_gateway(production_env(tmp_path / "var", simulator,
                                             USERS_FILE=str(users)), clock)
    batches = await gw.store.run(seed, gw.store, clock)
    assert dashboard_app.PAGE_SIZE == 25
    base = f"http://127.0.0.1:{gw.dashboard.port}"  # type: ignore[union-attr]
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        await log_in(http, base, "ann", "ann-admin-pw")
        async with http.get(base + "/jobs") as r:
            text = await r.text()
        assert f"of {TOTAL:,}".replace(",", "") in text.replace(",", "")
        assert "Page 1 of 244" in text
        async with http.get(base + "/jobs/rows?page=244") as r:
            text = await r.text()
        assert "Page 244 of 244" in text
        shown = re.findall(r'href="/jobs/([0-9a-f]{16})"', text)
        assert len(shown) == 25 and set(shown) <= set(batches[0])
        target = batches[0][3]
        async with http.get(base + f"/jobs?q={target}") as r:
            text = await r.text()
        assert re.findall(r'href="/jobs/([0-9a-f]{16})"', text) == [target]
        async with http.get(base + f"/jobs/{target}") as r:
            assert r.status == 200
        # A page past the end says so, with the true count of pages.
        async with http.get(base + "/jobs/rows?page=245") as r:
            text = await r.text()
        assert "No jobs on this page" in text and "Page 245 of 200" not in text
    assert (await gw.store.run(gw.store.job, target)).state is State.SPOOLED
