"""The media download over real HTTP: credentials only to SignalWire's hosts, never along a
redirect, bounded size."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from gateway.signalwire.client import MediaRefused, SignalWireClient, SignalWireError
from testsupport.harness import start_runner

from .conftest import API_TOKEN, PROJECT_ID, make_pdf


class Host:
    """A tiny HTTP server recording the Authorization header of every request."""

    def __init__(self, handler) -> None:  # type: ignore[no-untyped-def]
        self.seen: list[str | None] = []
        self.handler = handler
        app = web.Application()
        app.router.add_get("/{tail:.*}", self._handle)
        self.runner = web.AppRunner(app)
        self.url = ""

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(request.headers.get("Authorization"))
        return await self.handler(request)

    async def start(self) -> None:
        self.url = await start_runner(self.runner)

    async def stop(self) -> None:
        await self.runner.cleanup()


@pytest.fixture
async def hosts() -> AsyncIterator[tuple[Host, Host]]:
    async def pdf(_request: web.Request) -> web.Response:
        return web.Response(body=make_pdf(1), content_type="application/pdf")

    elsewhere = Host(pdf)
    await elsewhere.start()

    async def space(request: web.Request) -> web.Response:
        if request.path.endswith("/redirect"):
            raise web.HTTPFound(elsewhere.url + "/cdn/fax.pdf")
        if request.path.endswith("/big"):
            return web.Response(body=b"%PDF-" + b"0" * 5000, content_type="application/pdf")
        return await pdf(request)

    space_host = Host(space)
    await space_host.start()
    yield space_host, elsewhere
    await space_host.stop()
    await elsewhere.stop()


async def client_for(space_url: str) -> SignalWireClient:
    client = SignalWireClient(space_url=space_url, project_id=PROJECT_ID, api_token=API_TOKEN,
                              timeout_s=5)
    await client.start()
    return client


async def test_credentials_go_to_the_space_only(hosts: tuple[Host, Host]) -> None:
    space, elsewhere = hosts
    client = await client_for(space.url)
    try:
        data, _ = await client.fetch_media(space.url + "/media/1", 1 << 20)
        assert data.startswith(b"%PDF-")
        assert space.seen[-1] is not None and space.seen[-1].startswith("Basic ")
        with pytest.raises(MediaRefused):
            await client.fetch_media(elsewhere.url + "/media/1", 1 << 20)
        assert elsewhere.seen == []
        # A redirect from the space is followed without the credentials.
        data, _ = await client.fetch_media(space.url + "/media/redirect", 1 << 20)
        assert data.startswith(b"%PDF-")
        assert elsewhere.seen == [None]
        with pytest.raises(MediaRefused):
            await client.fetch_media(space.url + "/media/big", 1000)
    finally:
        await client.stop()


def test_files_host_needs_https() -> None:
    client = SignalWireClient(space_url="https://example.signalwire.com", project_id="p",
                              api_token="t", timeout_s=5)
    client.base = "https://example.signalwire.com/api/laml/2010-04-01/Accounts/p"
    assert client.credentials_allowed("https://files.signalwire.com/abc/def.pdf")
    assert client.credentials_allowed("https://example.signalwire.com:443/x")
    assert not client.credentials_allowed("http://files.signalwire.com/abc.pdf")
    assert not client.credentials_allowed("https://files.signalwire.com.evil.example/a.pdf")
    assert not client.credentials_allowed("https://example.signalwire.com.evil.example/x")
    assert not client.credentials_allowed("https://evil@example.com/x")
    assert not client.credentials_allowed("https://u:p@example.signalwire.com/x")
    assert not client.credentials_allowed("https://example.signalwire.com:8443/x")


async def test_media_http_error_is_retryable(hosts: tuple[Host, Host]) -> None:
    space, _ = hosts

    async def gone(_request: web.Request) -> web.Response:
        return web.Response(status=503)

    space.handler = gone
    client = await client_for(space.url)
    try:
        with pytest.raises(SignalWireError) as err:
            await client.fetch_media(space.url + "/media/1", 1 << 20)
        assert not isinstance(err.value, MediaRefused) and err.value.status == 503
    finally:
        await client.stop()
