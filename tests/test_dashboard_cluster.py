"""The dashboard told the truth, exactly once, on one node or several: a resend asked for
several times at the same moment (a double click, two operators, `faxgw resend` twice) makes
one job; sessions and login lockouts live in the job store, so every node and a restarted one
know them; a login flood is bounded and gets no one in while the address is locked; a new
password or a deleted user ends the sessions.

Over plain HTTP (aiohttp) against real gateways: SQLite files, a real PostgreSQL shared by two
in-process nodes, SeaweedFS, the SignalWire simulator, a relay sink.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import aiohttp
import pytest

from gateway.commands import jobs as commands
from gateway.config import settings_from
from gateway.daemon import Gateway
from gateway.jobs.outbound_states import State
from gateway.store.factory import open_store
from gateway.users import load_users, passwd_command
from gateway.web.dashboard.auth import MAX_CONCURRENT_LOGINS
from testsupport.s3server import SeaweedS3

from .conftest import (
    GatewayFactory,
    RelaySink,
    Simulator,
    base_env,
    pg_reset,
    production_env,
    relay_env,
    send_one,
)
from .helpers.cluster import shared_env
from .helpers.jobs import add_mail, to_reported
from .helpers.web import login_token

PASSWORDS = {"ann": "ann-admin-pw", "vic": "vic-viewer-pw"}
# A done action's message, and a refused one's ("Not done." set apart, see base.html).
FLASH = re.compile(r'<p class="flash" role="status">([^<]*)</p>'
                   r'|<p class="flash bad" role="alert"><strong>(Not done)\.</strong> ([^<]*)</p>')


def flashes(page: str) -> list[str]:
    return [done or f"{refused}: {words}" for done, refused, words in FLASH.findall(page)]


@pytest.fixture
def s3_credentials(seaweed: SeaweedS3, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweed.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweed.secret_key)


def make_users(tmp_path: Path) -> Path:
    users = tmp_path / "users"
    passwd_command(users, "ann", PASSWORDS["ann"], role="admin")
    passwd_command(users, "vic", PASSWORDS["vic"], role="viewer")
    return users


def slow_hash(password: str) -> str:
    """A valid users-file hash 8 times as costly as `faxgw passwd`'s (p=8): its check takes
    long enough for other logins to finish meanwhile."""
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=1 << 15, r=8, p=8, dklen=32,
                            maxmem=64 * 1024 * 1024)
    return (f"scrypt$15$8$8${base64.b64encode(salt).decode()}$"
            f"{base64.b64encode(digest).decode()}")


def jar() -> aiohttp.CookieJar:
    return aiohttp.CookieJar(unsafe=True)  # cookies for 127.0.0.1; every node's port shares them


def base(gw: Gateway) -> str:
    assert gw.dashboard is not None
    return f"http://127.0.0.1:{gw.dashboard.port}"


async def login(http: aiohttp.ClientSession, url: str, name: str = "ann",
                password: str | None = None, *, ip: str | None = None,
                token: str | None = None) -> tuple[int, str, dict[str, str]]:
    """POST the login form; (status, page, headers). `ip`: the client address as the trusted
    proxy (127.0.0.1, ADMIN_TRUSTED_PROXIES' default) says it."""
    token = token or await login_token(http, url)
    headers = {"X-Forwarded-For": ip} if ip else {}
    async with http.post(url + "/login", allow_redirects=False, headers=headers, data={
            "login_token": token, "name": name,
            "password": PASSWORDS.get(name, "") if password is None else password}) as r:
        return r.status, await r.text(), dict(r.headers)


async def status_of(http: aiohttp.ClientSession, url: str) -> int:
    async with http.get(url, allow_redirects=False) as r:
        return r.status


async def csrf_of(http: aiohttp.ClientSession, url: str) -> str:
    async with http.get(url) as r:
        assert r.status == 200, url
        found = re.search(r'name="csrf" value="([^"]+)"', await r.text())
    assert found
    return found.group(1)


async def gateways(backend: str, make_gateway: GatewayFactory, tmp_path: Path,
                   simulator: Simulator, relay: RelaySink, request: pytest.FixtureRequest,
                   **extra: str) -> tuple[list[Gateway], dict[str, str]]:
    """SQLite: one gateway (listed twice); PostgreSQL: two nodes on one database. Also the
    environment of the first, to start it again."""
    users = make_users(tmp_path)
    if backend == "postgresql":
        pg_url = request.getfixturevalue("pg_url")
        seaweed = request.getfixturevalue("seaweed")
        request.getfixturevalue("s3_credentials")
        pg_reset(pg_url)
        envs = [shared_env(tmp_path, name, pg_url, seaweed, simulator, relay,
                           USERS_FILE=str(users), **extra) for name in ("node-a", "node-b")]
        return [await make_gateway(env) for env in envs], envs[0]
    env = production_env(tmp_path / "var", simulator, **relay_env(relay),
                         USERS_FILE=str(users), **extra)
    gw = await make_gateway(env)
    return [gw, gw], env


async def reported(gw: Gateway, job_id: str, timeout_s: float = 30) -> None:
    """Watch the (maybe shared) store until the job is reported, by whichever node: a node's
    own `wait_state` hears only of its own worker's steps."""
    async with asyncio.timeout(timeout_s):
        while (job := await gw.store.run(gw.store.job, job_id)) is None or (
                job.state is not State.REPORTED):
            await asyncio.sleep(0.05)


# -- resend: once however many ask at the same moment ------------------------------------------

@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_a_double_click_on_resend_makes_one_job(
        backend: str, make_gateway: GatewayFactory, tmp_path: Path, simulator: Simulator,
        relay: RelaySink, request: pytest.FixtureRequest) -> None:
    """Three POSTs of "Yes, resend" at the same moment (to two nodes on PostgreSQL): one new
    job; the other two say "already being resent" and land on that job's page."""
    (a, b), _ = await gateways(backend, make_gateway, tmp_path, simulator, relay, request,
                               DOCUMENT_RETENTION_HOURS="1")
    job_id = await send_one(a)
    await relay.next(30)
    await reported(a, job_id)
    async with aiohttp.ClientSession(cookie_jar=jar()) as http:
        assert (await login(http, base(a)))[0] == 303
        csrf = await csrf_of(http, f"{base(a)}/jobs/{job_id}/resend")

        async def post(gw: Gateway) -> tuple[str, str]:
            async with http.post(f"{base(gw)}/jobs/{job_id}/resend", data={"csrf": csrf}) as r:
                assert r.status == 200
                return str(r.url), await r.text()

        answers = await asyncio.gather(post(a), post(b), post(a))
    job = await a.store.run(a.store.job, job_id)
    assert job is not None
    jobs = await a.store.run(a.store.message_jobs, job.message_id)
    [new] = [j.id for j in jobs if j.id != job_id]
    assert all(url.endswith(f"/jobs/{new}") for url, _ in answers), [u for u, _ in answers]
    shown = sorted(m for _, page in answers for m in flashes(page))
    assert shown == sorted(
        [f"Job {job_id} is being sent again as this job, {new}."]
        + [f"Not done: job {job_id} is already being resent, as this job, {new}."] * 2), shown
    await relay.next(60)  # the resend's report (whichever node sent it)
    await simulator.state.wait_idle()
    assert len(simulator.state.send_requests) == 2  # the mail, and its one resend
    resent = [e for e in await a.store.run(a.store.events, job_id) if e.kind == "resent"]
    assert [e.detail for e in resent] == [f"sent again as job {new} by ann"]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_faxgw_resend_at_the_same_moment_makes_one_job(
        backend: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        request: pytest.FixtureRequest) -> None:
    """`faxgw resend` run three times at once (three operators, three shells; each its own
    database connection), five times over: one new job each time, and the two others say
    which job is already resending it."""
    env = {"DATA_DIR": str(tmp_path / "var"), "SMTP_HOSTNAME": "faxgw.test",
           "NOTIFY_FROM": "faxgw@faxgw.test", "DOCUMENT_RETENTION_HOURS": "1"}
    if backend == "postgresql":
        pg_url = request.getfixturevalue("pg_url")
        pg_reset(pg_url)
        env.update(DATABASE_URL=pg_url, MEDIA_STORE="s3", S3_BUCKET="faxgw-test",
                   S3_REGION="us-east-1", NODE_ID="cli")
    settings = settings_from(env)
    store = open_store(settings)
    store.open()
    try:
        for round_ in range(5):
            [job_id] = add_mail(store, tmp_path, ["+15551234567"])
            to_reported(store, job_id, f"sid-{round_}-{job_id}")
            start = threading.Barrier(3)
            codes: list[int] = []

            def resend(start: threading.Barrier = start, codes: list[int] = codes,
                       job_id: str = job_id) -> None:
                start.wait(10)
                codes.append(commands.resend(settings, job_id))

            threads = [threading.Thread(target=resend) for _ in range(3)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            out = capsys.readouterr()
            message_id = store.job(job_id).message_id  # type: ignore[union-attr]
            [new] = [j.id for j in store.message_jobs(message_id) if j.id != job_id]
            assert sorted(codes) == [0, 1, 1], (codes, out)
            assert f"job {job_id} will be sent again as job {new}" in out.out
            assert out.err.count(f"faxgw: job {job_id} is already being resent, as job "
                                 f"{new} (") == 2, out.err
    finally:
        store.close()


# -- sessions: in the store, on every node, over a restart --------------------------------------

@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_a_session_works_on_every_node_and_over_a_restart(
        backend: str, make_gateway: GatewayFactory, tmp_path: Path, simulator: Simulator,
        relay: RelaySink, request: pytest.FixtureRequest) -> None:
    (a, b), env_a = await gateways(backend, make_gateway, tmp_path, simulator, relay, request)
    async with aiohttp.ClientSession(cookie_jar=jar()) as http:
        status, _, headers = await login(http, base(a))
        assert status == 303
        cookie = re.search(r"faxgw_session=([^;]+)", headers["Set-Cookie"])
        assert cookie
        # The other node knows the session (a load balancer may send any request anywhere).
        assert await status_of(http, f"{base(b)}/jobs") == 200
        # The store keeps the token's hash, never the token.
        rows = await a.store.run(a.store._rows, "SELECT * FROM dashboard_sessions")
        assert [r["token_hash"] for r in rows] == [
            hashlib.sha256(cookie.group(1).encode()).hexdigest()]
        assert cookie.group(1) not in repr(rows)
        # A restart logs no one out.
        await a.stop(grace_s=5)
        a = await make_gateway(env_a)
        b = b if backend == "postgresql" else a
        assert await status_of(http, f"{base(a)}/jobs") == 200
        # Logging out on one node ends the session on all.
        csrf = await csrf_of(http, f"{base(b)}/jobs")
        async with http.post(f"{base(b)}/logout", data={"csrf": csrf},
                             allow_redirects=False) as r:
            assert r.status == 303
        http.cookie_jar.update_cookies({"faxgw_session": cookie.group(1)})  # kept by a thief
        assert await status_of(http, f"{base(a)}/jobs") == 303


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_a_lockout_holds_on_every_node_and_over_a_restart(
        backend: str, make_gateway: GatewayFactory, tmp_path: Path, simulator: Simulator,
        relay: RelaySink, request: pytest.FixtureRequest) -> None:
    """8 wrong passwords on one node (AUTH_MAX_FAILURES=5): the right one is refused on the
    other, and after a restart."""
    (a, b), env_a = await gateways(backend, make_gateway, tmp_path, simulator, relay, request)
    async with aiohttp.ClientSession(cookie_jar=jar()) as http:
        statuses = [(await login(http, base(a), password="wrong"))[0] for _ in range(8)]
        assert statuses == [401] * 4 + [429] * 4
        status, page, _ = await login(http, base(b))
        assert status == 429 and "Try again in 15 minutes" in page
        await a.stop(grace_s=5)
        a = await make_gateway(env_a)
        assert (await login(http, base(a)))[0] == 429
        # Another address is not locked.
        assert (await login(http, base(a), ip="192.0.2.7"))[0] == 303


# -- a login flood ------------------------------------------------------------------------------

async def test_no_one_gets_in_while_the_address_is_locked(make_gateway: GatewayFactory,
                                                          tmp_path: Path) -> None:
    """Logins that were under way when the address got locked: refused, even with the right
    password, whether they waited for their turn or were being checked at that moment."""
    users = make_users(tmp_path)
    [line] = [ln for ln in users.read_text().splitlines() if ln.startswith("ann ")]
    users.write_text(users.read_text().replace(line, f"ann {slow_hash(PASSWORDS['ann'])} "
                                                      "role=admin"))
    assert load_users(users)["ann"].role == "admin"
    gw = await make_gateway(base_env(tmp_path / "var", USERS_FILE=str(users),
                                     AUTH_MAX_FAILURES="3"))
    async with aiohttp.ClientSession(cookie_jar=jar()) as http:
        token = await login_token(http, base(gw))
        for ip, order in (("192.0.2.1", ("ann", "vic")),           # checked side by side
                          ("192.0.2.2", ("vic", "vic", "ann"))):   # ann waits her turn
            for _ in range(2):
                assert (await login(http, base(gw), "vic", "wrong", ip=ip, token=token))[0] == 401
            results = await asyncio.gather(*(
                login(http, base(gw), name, None if name == "ann" else "wrong", ip=ip,
                      token=token) for name in order))
            assert [r[0] for r in results] == [429] * len(order), (ip, [r[0] for r in results])
            # ann's answer: locked out, not a wrong password.
            assert "Too many failed logins" in results[order.index("ann")][1]


async def test_a_login_flood_is_bounded(make_gateway: GatewayFactory, tmp_path: Path) -> None:
    """300 logins at once from one address, one of them with the right password: a few are
    checked, the rest are refused at once (503, try again in a minute) or for the lockout
    (429); none gets in."""
    users = make_users(tmp_path)
    gw = await make_gateway(base_env(tmp_path / "var", USERS_FILE=str(users)))
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(cookie_jar=jar(), connector=connector) as http:
        token = await login_token(http, base(gw))
        names = ["vic"] * 300
        names[150] = "ann"
        results = await asyncio.gather(*(
            login(http, base(gw), name, None if name == "ann" else "wrong", token=token)
            for name in names))
        statuses = [r[0] for r in results]
        assert set(statuses) <= {401, 429, 503}, sorted(set(statuses))
        busy = [r for r in results if r[0] == 503]
        assert busy and all("Too many logins at once. Try again in a minute." in r[1]
                            and r[2].get("Retry-After") == "60" for r in busy)
        checked = [r for r in results if "Wrong name or password" in r[1]]
        assert len(checked) <= 5 + MAX_CONCURRENT_LOGINS - 1, len(checked)
        assert (await login(http, base(gw)))[0] == 429


# -- a new password, a deleted user -------------------------------------------------------------

async def test_a_new_password_or_a_deleted_user_ends_the_sessions(
        make_gateway: GatewayFactory, tmp_path: Path) -> None:
    users = make_users(tmp_path)
    gw = await make_gateway(base_env(tmp_path / "var", USERS_FILE=str(users)))

    def faxgw_passwd(*args: str, password: str = "") -> None:
        done = subprocess.run([sys.executable, "-m", "gateway", "passwd", *args,
                               "--users-file", str(users), "--password-stdin"],
                              input=password + "\n", capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr

    async with (aiohttp.ClientSession(cookie_jar=jar()) as one,
                aiohttp.ClientSession(cookie_jar=jar()) as two,
                aiohttp.ClientSession(cookie_jar=jar()) as vic):
        for http in (one, two):
            assert (await login(http, base(gw)))[0] == 303
        assert (await login(vic, base(gw), "vic"))[0] == 303
        await asyncio.to_thread(faxgw_passwd, "ann", password="ann-new-pw")
        for http in (one, two):  # both of ann's sessions end; vic's goes on
            assert await status_of(http, f"{base(gw)}/jobs") == 303
        assert await status_of(vic, f"{base(gw)}/jobs") == 200
        assert (await login(one, base(gw)))[0] == 401
        assert (await login(one, base(gw), password="ann-new-pw"))[0] == 303
        assert await status_of(one, f"{base(gw)}/jobs") == 200
        await asyncio.to_thread(faxgw_passwd, "ann", "--delete")
        assert "ann" not in load_users(users)
        assert await status_of(one, f"{base(gw)}/jobs") == 303
        assert (await login(one, base(gw), password="ann-new-pw"))[0] == 401
        assert await status_of(vic, f"{base(gw)}/jobs") == 200
    left = await gw.store.run(gw.store._rows, "SELECT user_name FROM dashboard_sessions")
    assert [r["user_name"] for r in left] == ["vic"]
