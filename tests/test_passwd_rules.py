"""`faxgw passwd` refuses a password too short to guard a fax line, and the dashboard tells a
user whose password is right but who has no dashboard role so, instead of "wrong password"."""

from __future__ import annotations

import io
import re
from pathlib import Path

import aiohttp
import pytest

from gateway.cli import main
from gateway.users import MIN_PASSWORD_CHARS, authenticate, load_users, passwd_command

from .conftest import GatewayFactory, base_env


@pytest.mark.parametrize("password", ["x", "9" * (MIN_PASSWORD_CHARS - 1)])
def test_faxgw_passwd_refuses_a_short_password(password: str, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "users"
    monkeypatch.setattr("sys.stdin", io.StringIO(password + "\n"))
    assert main(["passwd", "copier", "--users-file", str(path), "--password-stdin"]) == 1
    assert capsys.readouterr().err == (
        "faxgw passwd: the password is shorter than 10 characters\n")
    assert not path.exists()
    monkeypatch.setattr("sys.stdin", io.StringIO("9" * MIN_PASSWORD_CHARS + "\n"))
    assert main(["passwd", "copier", "--users-file", str(path), "--password-stdin"]) == 0
    assert authenticate(load_users(path), "copier", "9" * MIN_PASSWORD_CHARS) is not None


async def _login(http: aiohttp.ClientSession, base: str, name: str,
                 password: str) -> tuple[int, str]:
    async with http.get(base + "/login") as r:
        token = re.search(r'name="login_token" value="([^"]+)"', await r.text())
    assert token
    async with http.post(base + "/login", allow_redirects=False, data={
            "login_token": token.group(1), "name": name, "password": password}) as r:
        return r.status, await r.text()


async def test_a_user_without_a_dashboard_role_is_told_so(
        tmp_path: Path, make_gateway: GatewayFactory) -> None:
    users = tmp_path / "users"
    passwd_command(users, "sam", "sam-mail-only-pw")
    passwd_command(users, "ann", "ann-admin-pw", role="admin")
    gw = await make_gateway(base_env(tmp_path / "var", USERS_FILE=str(users)))
    assert gw.dashboard is not None
    base = f"http://127.0.0.1:{gw.dashboard.port}"
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        status, page = await _login(http, base, "sam", "sam-mail-only-pw")
        assert status == 403
        assert "this user may only send faxes by mail" in page
        assert "Wrong name or password" not in page
        async with http.get(base + "/jobs", allow_redirects=False) as r:
            assert r.status == 303  # no session came of it
        # Without the password, nothing is given away about the user.
        status, page = await _login(http, base, "sam", "not-sams-password")
        assert status == 401 and "Wrong name or password." in page
        assert (await _login(http, base, "ann", "ann-admin-pw"))[0] == 303
