"""Dashboard rules that need no browser: roles in the users file, the settings, sessions that
expire or lose their user, and what happens once a document is no longer kept. Over plain
HTTP against a real gateway."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from gateway.config import ConfigError, settings_from
from gateway.jobs.outbound_states import State
from gateway.users import UsersFileError, load_users, passwd_command

from .conftest import (
    FakeClock,
    GatewayFactory,
    RelaySink,
    Simulator,
    base_env,
    drive,
    production_env,
    relay_env,
    send_one,
    wait_state,
)

PASSWORD = "ann-admin-pw"


def test_roles_in_the_users_file(tmp_path: Path) -> None:
    users = tmp_path / "users"
    passwd_command(users, "ann", PASSWORD, role="admin")
    passwd_command(users, "vic", "pw-vic-viewer", role="viewer", from_number="+15551234567")
    passwd_command(users, "sam", "pw-sam-mail-only")
    loaded = load_users(users)
    assert (loaded["ann"].role, loaded["vic"].role, loaded["sam"].role) == ("admin", "viewer",
                                                                           None)
    assert "role=viewer" in users.read_text()
    passwd_command(users, "vic", "pw-vic-viewer-2")          # a new password keeps the role
    assert load_users(users)["vic"].role == "viewer"
    passwd_command(users, "vic", "pw-vic-viewer-2", role="")  # --no-dashboard
    assert load_users(users)["vic"].role is None
    assert load_users(users)["vic"].from_number == "+15551234567"
    with pytest.raises(UsersFileError, match="role=root is not one of admin, viewer"):
        passwd_command(users, "eve", "pw-eve-root", role="root")
    users.write_text(users.read_text() + "bad scrypt$15$8$1$AAAAAAAAAAA=$AAAAAAAAAAAAAAAAAAAAAA== "
                     "role=boss\n")
    with pytest.raises(UsersFileError, match=r":\d+: role=boss is not one of admin, viewer"):
        load_users(users)


def test_passwd_admin_and_viewer_flags(tmp_path: Path) -> None:
    users = tmp_path / "users"
    for args in (["ann", "--admin"], ["vic", "--viewer"]):
        done = subprocess.run([sys.executable, "-m", "gateway", "passwd", *args,
                               "--users-file", str(users), "--password-stdin"],
                              input="pw-123456789\n", capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
    assert {n: u.role for n, u in load_users(users).items()} == {"ann": "admin",
                                                                  "vic": "viewer"}
    done = subprocess.run([sys.executable, "-m", "gateway", "passwd", "ann", "--admin",
                           "--viewer", "--users-file", str(users), "--password-stdin"],
                          input="pw-123456789\n", capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "not allowed with argument" in done.stderr


def test_admin_settings(tmp_path: Path) -> None:
    env = base_env(tmp_path)
    del env["ADMIN_LISTEN"]
    s = settings_from(env)
    assert (s.admin.listen.host, s.admin.listen.port) == ("127.0.0.1", 8026)  # type: ignore
    assert s.admin.trusted_proxies == ("127.0.0.0/8", "::1")
    assert s.admin.session_minutes == 480
    assert settings_from(dict(env, ADMIN_LISTEN="")).admin.listen is None
    assert settings_from(dict(env, ADMIN_LISTEN="  ")).admin.listen is None
    with pytest.raises(ConfigError) as err:
        settings_from(dict(env, HTTP_LISTEN="0.0.0.0:8080", ADMIN_LISTEN="0.0.0.0:8080",
                           ADMIN_TRUSTED_PROXIES="10.0.0.0/8,proxy.example",
                           ADMIN_SESSION_MINUTES="0"))
    text = "\n".join(err.value.problems)
    assert "ADMIN_LISTEN: must differ from HTTP_LISTEN" in text
    assert "ADMIN_TRUSTED_PROXIES: 'proxy.example' is not an IP network" in text
    assert "ADMIN_SESSION_MINUTES: 0.0 is outside" in text


async def _login(http: aiohttp.ClientSession, base: str, name: str = "ann",
                 password: str = PASSWORD) -> int:
    async with http.get(base + "/login") as r:
        token = re.search(r'name="login_token" value="([^"]+)"', await r.text())
    assert token
    async with http.post(base + "/login", allow_redirects=False, data={
            "login_token": token.group(1), "name": name, "password": password}) as r:
        return r.status


async def test_sessions_expire_and_follow_the_users_file(tmp_path: Path,
                                                         manual_gateway: GatewayFactory) -> None:
    users = tmp_path / "users"
    passwd_command(users, "ann", PASSWORD, role="admin")
    clock = FakeClock()
    gw = await manual_gateway(base_env(tmp_path / "var", USERS_FILE=str(users),
                                       ADMIN_SESSION_MINUTES="30"), clock)
    try:
        assert gw.dashboard is not None
        base = f"http://127.0.0.1:{gw.dashboard.port}"
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
            assert await _login(http, base) == 303
            async with http.get(base + "/jobs", allow_redirects=False) as r:
                assert r.status == 200
            clock.advance(29 * 60)
            async with http.get(base + "/jobs", allow_redirects=False) as r:
                assert r.status == 200
            clock.advance(2 * 60)  # past ADMIN_SESSION_MINUTES
            async with http.get(base + "/jobs", allow_redirects=False) as r:
                assert r.status == 303 and r.headers["Location"].startswith("/login")
            # Taking the role away ends a live session at its next request.
            assert await _login(http, base) == 303
            async with http.get(base + "/health", allow_redirects=False) as r:
                assert r.status == 200
            passwd_command(users, "ann", PASSWORD, role="")
            async with http.get(base + "/health", allow_redirects=False) as r:
                assert r.status == 303
            assert await _login(http, base) == 403  # told it has no dashboard role
    finally:
        await gw.stop(grace_s=5)


async def test_a_deleted_document_is_not_shown_or_resent(tmp_path: Path, simulator: Simulator,
                                                         relay: RelaySink,
                                                         manual_gateway: GatewayFactory) -> None:
    """DOCUMENT_RETENTION_HOURS=0: once reported, neither the picture nor the PDF is there,
    and Resend says why in plain words."""
    users = tmp_path / "users"
    passwd_command(users, "ann", PASSWORD, role="admin")
    clock = FakeClock()
    gw = await manual_gateway(production_env(tmp_path / "var", simulator, **relay_env(relay),
                                             USERS_FILE=str(users)), clock)
    try:
        job_id = await send_one(gw)
        await drive(gw, simulator)
        job = await gw.store.run(gw.store.job, job_id)
        assert job is not None and job.state is State.REPORTED
        assert gw.dashboard is not None
        base = f"http://127.0.0.1:{gw.dashboard.port}"
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
            assert await _login(http, base) == 303
            async with http.get(f"{base}/jobs/{job_id}") as r:
                page = await r.text()
                assert r.status == 200 and "no longer kept" in page
                assert "first-page.png" not in page
                csrf = re.search(r'name="csrf" value="([^"]+)"', page)
            assert csrf
            for tail in ("first-page.png", "fax.pdf"):
                async with http.get(f"{base}/jobs/{job_id}/{tail}") as r:
                    assert r.status == 404
            async with http.post(f"{base}/jobs/{job_id}/resend",
                                 data={"csrf": csrf.group(1)}) as r:
                page = await r.text()
                assert r.status == 200 and str(r.url).endswith(f"/jobs/{job_id}")
            assert "Not done.</strong> cannot resend job" in page
            assert "deleted from the spool" in page
            # An unknown job is a plain 404.
            async with http.get(f"{base}/jobs/0123456789abcdef") as r:
                assert r.status == 404
    finally:
        await gw.stop(grace_s=5)


async def test_cli_actions_without_a_name_are_unchanged(make_gateway: GatewayFactory,
                                                       tmp_path: Path, simulator: Simulator,
                                                       relay: RelaySink) -> None:
    """`by` is optional: the CLI's resend records what it always did, and no operator line."""
    from gateway.jobs.outbound_states import RetryPolicy
    from gateway.outbound import actions

    gw = await make_gateway(production_env(tmp_path / "var", simulator, **relay_env(relay),
                                           DOCUMENT_RETENTION_HOURS="1"))
    job_id = await send_one(gw)
    await wait_state(gw, job_id, State.REPORTED)
    policy = RetryPolicy.from_settings(gw.s)
    new = await gw.store.run(lambda: actions.resend_job(gw.store, job_id, gw.clock(),
                                                         retry_policy=policy))
    gw.worker.wake()  # what the CLI's SIGUSR1 does
    events = await gw.store.run(gw.store.events, job_id)
    assert [(e.kind, e.detail) for e in events][-1] == (
        "resent", f"sent again as job {new} by the operator")
    await wait_state(gw, new, State.REPORTED)
