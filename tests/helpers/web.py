"""The dashboard's login over plain HTTP (aiohttp, no browser): the form's one-time token,
and a session logged in."""

from __future__ import annotations

import re

import aiohttp


async def login_token(http: aiohttp.ClientSession, url: str) -> str:
    """The login form's one-time token (login_token) from `url`/login."""
    async with http.get(url + "/login") as r:
        found = re.search(r'name="login_token" value="([^"]+)"', await r.text())
    assert found
    return found.group(1)


async def log_in(http: aiohttp.ClientSession, url: str, name: str, password: str) -> None:
    """Log `http` in (its cookie jar keeps the session); the dashboard answers 303."""
    async with http.post(url + "/login", allow_redirects=False, data={
            "login_token": await login_token(http, url), "name": name,
            "password": password}) as r:
        assert r.status == 303
