"""The SignalWire simulator over real loopback sockets, against a small stand-in gateway.

The stand-in serves the PDF (and broken variants) and receives the status callbacks,
checking each signature with the gateway's own `verify_signature`.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import logging
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDictProxy

from gateway.sandbox.fax_records import parse_api_date
from gateway.sandbox.simulator import (
    SIM_STATE,
    SimulatorState,
    create_simulator_app,
    install_simulator,
)
from gateway.signalwire.signature import SIGNATURE_HEADER, verify_signature
from testsupport.harness import serve

from .conftest import make_pdf

PROJECT = "b3877c40-da60-4998-90ad-b792e98472ac"
TOKEN = "PTsimulator-api-token-secret"
KEY = "PSKsimulator-signing-key-secret"
MEDIA_SECRET = "presigned-query-secret"
API = "/api/laml/2010-04-01"
REPO = Path(__file__).resolve().parent.parent

FAX_RESOURCE_FIELDS = {
    "account_sid", "api_version", "date_created", "date_updated", "direction", "from", "to",
    "media_url", "media_sid", "num_pages", "price", "price_unit", "quality", "sid", "status",
    "duration", "url", "error_code", "error_message", "links",
}


PDF_2_PAGES = make_pdf(2)


def basic_auth(user: str = PROJECT, password: str = TOKEN) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


@dataclass
class Received:
    url: str
    params: dict[str, str]
    signature: str | None
    valid: bool


@dataclass
class Gateway:
    """The stand-in gateway's view: callbacks received and media requests served."""

    base_url: str = ""
    callbacks: list[Received] = field(default_factory=list)
    # Statuses to answer the next callbacks with (then 200).
    callback_statuses: list[int] = field(default_factory=list)
    media_requests: list[tuple[str, str]] = field(default_factory=list)
    callback_arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def media_url(self, path: str = "/doc.pdf") -> str:
        return f"{self.base_url}{path}?X-Amz-Signature={MEDIA_SECRET}"

    def callback_url(self, job: int = 42) -> str:
        return f"{self.base_url}/signalwire/fax-status?job={job}"


def build_gateway_app(gw: Gateway) -> web.Application:
    async def doc(request: web.Request) -> web.Response:
        gw.media_requests.append((request.method, request.path))
        return web.Response(body=PDF_2_PAGES, content_type="application/pdf")

    async def text(request: web.Request) -> web.Response:
        gw.media_requests.append((request.method, request.path))
        return web.Response(text="this is not a PDF", content_type="text/plain")

    async def fake_pdf(request: web.Request) -> web.Response:
        gw.media_requests.append((request.method, request.path))
        return web.Response(body=b"%PDF-1.7\nbroken beyond repair", content_type="application/pdf")

    async def redirect(request: web.Request) -> web.Response:
        gw.media_requests.append((request.method, request.path))
        raise web.HTTPFound("/doc.pdf")

    async def callback(request: web.Request) -> web.Response:
        form = await request.post()
        # The URL SignalWire was given: our base plus the raw path and query.
        url = gw.base_url + request.raw_path
        signature = request.headers.get(SIGNATURE_HEADER)
        gw.callbacks.append(Received(url, {k: str(v) for k, v in form.items()}, signature,
                                     verify_signature(KEY, url, form, signature)))
        gw.callback_arrived.set()
        status = gw.callback_statuses.pop(0) if gw.callback_statuses else 200
        return web.Response(status=status, text="ok")

    app = web.Application()
    app.router.add_get("/doc.pdf", doc)
    app.router.add_get("/page.txt", text)
    app.router.add_get("/broken.pdf", fake_pdf)
    app.router.add_get("/redirect", redirect)
    app.router.add_post("/signalwire/fax-status", callback)
    return app


async def api_call(http: aiohttp.ClientSession, method: str, url: str, *,
                   form: dict[str, str] | None = None, headers: dict[str, str] | None = None,
                   **kwargs: Any) -> tuple[int, Any, CIMultiDictProxy[str]]:
    """One authenticated API request: (status, JSON body or None, headers)."""
    all_headers = {**basic_auth(), **(headers or {})}
    async with http.request(method, url, data=form, headers=all_headers, **kwargs) as resp:
        body = await resp.json() if resp.content_type == "application/json" else None
        return resp.status, body, resp.headers


@dataclass
class Sim:
    state: SimulatorState
    base_url: str
    http: aiohttp.ClientSession
    prefix: str = ""

    @property
    def faxes_url(self) -> str:
        return f"{self.base_url}{self.prefix}{API}/Accounts/{PROJECT}/Faxes"

    async def call(self, method: str, url: str, **kwargs: Any
                   ) -> tuple[int, Any, CIMultiDictProxy[str]]:
        return await api_call(self.http, method, url, **kwargs)

    async def send(self, form: dict[str, str]) -> tuple[int, Any]:
        status, body, _ = await self.call("POST", self.faxes_url, form=form)
        return status, body

    async def fetch(self, sid: str) -> dict[str, Any]:
        status, body, _ = await self.call("GET", f"{self.faxes_url}/{sid}")
        assert status == 200, body
        return dict(body)


def fax_form(gw: Gateway, *, to: str = "+13104456789", media: str = "/doc.pdf",
             callback: bool = True, **extra: str) -> dict[str, str]:
    form = {"To": to, "From": "+13103383454", "MediaUrl": gw.media_url(media)}
    if callback:
        form["StatusCallback"] = gw.callback_url()
    form.update(extra)
    return form


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def gateway() -> AsyncIterator[Gateway]:
    gw = Gateway()
    runner, gw.base_url = await serve(build_gateway_app(gw))
    try:
        yield gw
    finally:
        await runner.cleanup()


@pytest.fixture
async def sim(gateway: Gateway, http: aiohttp.ClientSession) -> AsyncIterator[Sim]:
    app = create_simulator_app(project_id=PROJECT, api_token=TOKEN, signing_key=KEY,
                               callback_delay_s=0.0, callback_retry_delay_s=0.01)
    runner, base_url = await serve(app)
    try:
        yield Sim(app[SIM_STATE], base_url, http)
    finally:
        await runner.cleanup()


async def send_and_wait(sim: Sim, form: dict[str, str]) -> dict[str, Any]:
    status, body = await sim.send(form)
    assert status == 201, body
    await sim.state.wait_fax(body["sid"])
    return await sim.fetch(body["sid"])


# -- sending and outcomes --------------------------------------------------------------------


async def test_delivered_two_pages_with_signed_callback(
        sim: Sim, gateway: Gateway, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    status, created = await sim.send(fax_form(gateway, Quality="superfine", Ttl="30"))
    assert status == 201
    assert set(created) == FAX_RESOURCE_FIELDS
    uuid.UUID(created["sid"])
    assert created["status"] == "queued"
    assert created["num_pages"] is None
    assert created["direction"] == "outbound"
    assert created["api_version"] == "v1"
    assert created["account_sid"] == PROJECT
    assert created["quality"] == "superfine"
    assert created["price"] is None and created["price_unit"] == "USD"
    assert created["error_code"] is None and created["error_message"] is None
    assert email.utils.parsedate_to_datetime(created["date_created"]).tzinfo is not None
    assert created["url"] == f"{API}/Accounts/{PROJECT}/Faxes/{created['sid']}"
    assert created["links"]["media"] == created["url"] + "/Media"

    fax = await sim.state.wait_fax(created["sid"])
    assert fax.status == "delivered"

    [attempt] = sim.state.callbacks_for(created["sid"])
    assert attempt.status == 200 and attempt.attempt == 1
    [received] = gateway.callbacks
    assert received.valid
    assert received.url == gateway.callback_url()
    params = received.params
    assert params["FaxSid"] == created["sid"]
    assert params["AccountSid"] == PROJECT
    assert params["ApiVersion"] == "v1"
    assert params["FaxStatus"] == "delivered"
    assert params["NumPages"] == "2"
    assert params["To"] == "+13104456789" and params["From"] == "+13103383454"
    assert params["OriginalMediaUrl"] == gateway.media_url()
    assert "ErrorCode" not in params and "ErrorMessage" not in params

    fetched = await sim.fetch(created["sid"])
    assert fetched["status"] == "delivered"
    assert fetched["num_pages"] == "2"
    assert fetched["duration"] == 60

    [fetch] = sim.state.media_fetches
    assert (fetch.method, fetch.status, fetch.num_pages) == ("GET", 200, 2)
    assert fetch.content_type == "application/pdf"
    assert gateway.media_requests == [("GET", "/doc.pdf")]
    assert sim.state.send_requests[0]["MediaUrl"] == gateway.media_url()

    # SignalWire's stored copy, as the callback's MediaUrl names it.
    status, _, headers = await sim.call("GET", params["MediaUrl"])
    assert status == 200 and headers["Content-Type"] == "application/pdf"

    sim_log = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("gateway"))
    assert "queued" in sim_log
    for secret in (TOKEN, KEY, MEDIA_SECRET):
        assert secret not in sim_log


@pytest.mark.parametrize(
    ("to", "status", "message"),
    [
        ("+13105550000", "busy", None),
        ("+13105550001", "no-answer", None),
        ("+13105550002", "failed", "The call dropped prematurely"),
        ("+13105550004", "failed", "Timed out waiting for initial communication"),
    ],
)
async def test_outcome_by_destination(sim: Sim, gateway: Gateway, to: str, status: str,
                                      message: str | None) -> None:
    fetched = await send_and_wait(sim, fax_form(gateway, to=to))
    assert fetched["status"] == status
    assert fetched["error_message"] == message
    assert fetched["num_pages"] == "0"
    [received] = gateway.callbacks
    assert received.valid
    assert received.params["FaxStatus"] == status
    assert received.params.get("ErrorMessage") == message
    if message:
        assert received.params["ErrorCode"].isdigit()


async def test_resolution_failure_depends_on_quality(sim: Sim, gateway: Gateway) -> None:
    fine = await send_and_wait(sim, fax_form(gateway, to="+13105550003"))
    assert fine["status"] == "failed"
    assert "resolution" in fine["error_message"]
    standard = await send_and_wait(sim, fax_form(gateway, to="+13105550003", Quality="standard"))
    assert standard["status"] == "delivered"


async def test_non_pdf_media_fails_12300(sim: Sim, gateway: Gateway) -> None:
    fetched = await send_and_wait(sim, fax_form(gateway, media="/page.txt"))
    assert (fetched["status"], fetched["error_code"]) == ("failed", "12300")
    assert fetched["num_pages"] is None
    [received] = gateway.callbacks
    assert received.valid and received.params["ErrorCode"] == "12300"
    assert "NumPages" not in received.params


async def test_unreadable_pdf_fails_12300(sim: Sim, gateway: Gateway) -> None:
    fetched = await send_and_wait(sim, fax_form(gateway, media="/broken.pdf"))
    assert (fetched["status"], fetched["error_code"]) == ("failed", "12300")


async def test_media_404_fails(sim: Sim, gateway: Gateway) -> None:
    fetched = await send_and_wait(sim, fax_form(gateway, media="/missing.pdf"))
    assert (fetched["status"], fetched["error_code"]) == ("failed", "63019")
    assert fetched["error_message"] == "Media could not be downloaded"
    assert sim.state.media_fetches[0].status == 404
    assert gateway.callbacks[0].params["FaxStatus"] == "failed"


async def test_media_unreachable_fails(sim: Sim, gateway: Gateway) -> None:
    form = fax_form(gateway, MediaUrl="http://127.0.0.1:1/doc.pdf")
    fetched = await send_and_wait(sim, form)
    assert (fetched["status"], fetched["error_code"]) == ("failed", "63019")
    assert sim.state.media_fetches[0].status is None
    assert sim.state.media_fetches[0].error


async def test_redirecting_media_fails_53603(sim: Sim, gateway: Gateway) -> None:
    fetched = await send_and_wait(sim, fax_form(gateway, media="/redirect"))
    assert (fetched["status"], fetched["error_code"]) == ("failed", "53603")
    assert sim.state.media_fetches[0].status == 302
    # The redirect was not followed.
    assert gateway.media_requests == [("GET", "/redirect")]


async def test_head_before_get_when_asked(sim: Sim, gateway: Gateway) -> None:
    sim.state.media_head_first = True
    fetched = await send_and_wait(sim, fax_form(gateway))
    assert fetched["status"] == "delivered"
    assert [f.method for f in sim.state.media_fetches] == ["HEAD", "GET"]
    assert gateway.media_requests == [("HEAD", "/doc.pdf"), ("GET", "/doc.pdf")]


# -- request validation ----------------------------------------------------------------------


@pytest.mark.parametrize("auth", [
    basic_auth(password="wrong"),
    basic_auth(user="someone-else"),
    {"Authorization": "Bearer abc"},
    {"Authorization": "Basic !!!not-base64"},
    {},
])
async def test_bad_auth_401(sim: Sim, gateway: Gateway, http: aiohttp.ClientSession,
                            auth: dict[str, str]) -> None:
    async with http.post(sim.faxes_url, data=fax_form(gateway), headers=auth) as resp:
        assert resp.status == 401
        body = await resp.json()
    assert body["code"] == 20003
    assert body["status"] == 401
    assert body["message"] == "Authentication Error - invalid username"
    assert body["more_info"].startswith("https://developer.signalwire.com/")
    assert sim.state.send_requests == [] and sim.state.faxes == {}


async def test_wrong_project_in_path_404(sim: Sim, gateway: Gateway) -> None:
    url = sim.faxes_url.replace(PROJECT, "00000000-0000-0000-0000-000000000000")
    status, body, _ = await sim.call("POST", url, form=fax_form(gateway))
    assert (status, body["code"]) == (404, 20404)


async def test_json_body_rejected(sim: Sim, gateway: Gateway) -> None:
    status, body, _ = await sim.call("POST", sim.faxes_url, json=fax_form(gateway))
    assert status == 415
    assert set(body) == {"code", "message", "more_info", "status"}
    assert sim.state.faxes == {}


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"To": "13104456789"}, 21211),
        ({"To": "+1 310 445 6789"}, 21211),
        ({"To": ""}, 21604),
        ({"From": "3103383454"}, 21212),
        ({"MediaUrl": ""}, 21620),
        ({"MediaUrl": "ftp://example.com/doc.pdf"}, 21620),
        ({"Quality": "ultra"}, 20001),
        ({"Ttl": "4"}, 20001),
        ({"Ttl": "301"}, 20001),
        ({"Ttl": "soon"}, 20001),
        ({"StatusCallback": "not a url"}, 21609),
        ({"StatusCallbackMethod": "GET"}, 20001),
    ],
)
async def test_send_validation(sim: Sim, gateway: Gateway, change: dict[str, str],
                               code: int) -> None:
    form = {**fax_form(gateway), **change}
    form = {k: v for k, v in form.items() if v != ""}
    status, body = await sim.send(form)
    assert (status, body["code"], body["status"]) == (400, code, 400)
    assert sim.state.faxes == {}


async def test_sip_destination_accepted(sim: Sim, gateway: Gateway) -> None:
    fetched = await send_and_wait(sim, fax_form(gateway, to="sip:fax@example.com"))
    assert fetched["status"] == "delivered"


async def test_from_must_be_owned_when_configured(sim: Sim, gateway: Gateway) -> None:
    sim.state.from_numbers = {"+13100000000"}
    status, body = await sim.send(fax_form(gateway))
    assert (status, body["code"]) == (400, 21210)


# -- fetch, list, cancel, delete -------------------------------------------------------------


async def test_fetch_by_sid(sim: Sim, gateway: Gateway) -> None:
    status, created = await sim.send(fax_form(gateway, callback=False))
    assert status == 201
    await sim.state.wait_idle()
    fetched = await sim.fetch(created["sid"])
    assert fetched["sid"] == created["sid"]
    assert fetched["status"] == "delivered"
    assert gateway.callbacks == []

    status, body, _ = await sim.call("GET", f"{sim.faxes_url}/{uuid.uuid4()}")
    assert (status, body["code"]) == (404, 20404)
    status, body, _ = await sim.call("GET", f"{sim.faxes_url}/{created['sid']}",
                                     headers=basic_auth(password="nope"))
    assert (status, body["code"]) == (401, 20003)


async def test_list_filters_and_paging(sim: Sim, gateway: Gateway) -> None:
    to_a, to_b = "+13104450100", "+13104450200"

    async def send(to: str, **extra: str) -> str:
        status, body = await sim.send(fax_form(gateway, to=to, callback=False, **extra))
        assert status == 201, body
        return str(body["sid"])

    a1 = await send(to_a)
    a2 = await send(to_a)
    cutoff = datetime.now(UTC)
    a3 = await send(to_a)
    b1 = await send(to_b, From="+13109990000")
    await sim.state.wait_idle()

    async def listing(url: str, **query: str) -> dict[str, Any]:
        status, body, _ = await sim.call("GET", url, params=query)
        assert status == 200, body
        return dict(body)

    first = await listing(sim.faxes_url, To=to_a, PageSize="2")
    assert [f["sid"] for f in first["faxes"]] == [a3, a2]  # newest first
    assert first["page_size"] == 2 and first["page"] == 0
    assert first["next_page_uri"]
    second = await listing(sim.base_url + first["next_page_uri"])
    assert [f["sid"] for f in second["faxes"]] == [a1]
    assert second["next_page_uri"] is None
    assert second["page"] == 1

    by_from = await listing(sim.faxes_url, From="+13109990000")
    assert [f["sid"] for f in by_from["faxes"]] == [b1]

    iso = await listing(sim.faxes_url, DateCreatedAfter=cutoff.isoformat())
    assert {f["sid"] for f in iso["faxes"]} == {a3, b1}
    zulu = await listing(sim.faxes_url,
                         DateCreatedAfter=cutoff.strftime("%Y-%m-%dT%H:%M:%S.%fZ"))
    assert {f["sid"] for f in zulu["faxes"]} == {a3, b1}
    combined = await listing(sim.faxes_url, To=to_a, DateCreatedAfter=cutoff.isoformat())
    assert [f["sid"] for f in combined["faxes"]] == [a3]

    tomorrow = email.utils.format_datetime(cutoff + timedelta(days=1))
    assert (await listing(sim.faxes_url, DateCreatedAfter=tomorrow))["faxes"] == []
    yesterday = email.utils.format_datetime(cutoff - timedelta(days=1))
    assert len((await listing(sim.faxes_url, DateCreatedAfter=yesterday))["faxes"]) == 4
    assert len((await listing(sim.faxes_url, DateCreatedAfter="2000-01-01"))["faxes"]) == 4
    everything = await listing(sim.faxes_url)
    assert len(everything["faxes"]) == 4 and everything["next_page_uri"] is None

    status, body, _ = await sim.call("GET", sim.faxes_url, params={"DateCreatedAfter": "soon"})
    assert (status, body["code"]) == (400, 20001)


async def test_paging_walks_every_fax_once(sim: Sim, gateway: Gateway) -> None:
    sids = set()
    for _ in range(5):
        status, body = await sim.send(fax_form(gateway, callback=False))
        sids.add(body["sid"])
    await sim.state.wait_idle()
    seen: list[str] = []
    url: str | None = f"{sim.faxes_url}?PageSize=2"
    while url:
        status, body, _ = await sim.call("GET", url)
        assert status == 200
        seen += [f["sid"] for f in body["faxes"]]
        url = sim.base_url + body["next_page_uri"] if body["next_page_uri"] else None
    assert sorted(seen) == sorted(sids)


def test_parse_api_date_forms() -> None:
    utc = UTC
    assert parse_api_date("2024-05-01") == datetime(2024, 5, 1, tzinfo=utc)
    assert parse_api_date("2024-05-01T10:00:00Z") == datetime(2024, 5, 1, 10, tzinfo=utc)
    assert parse_api_date("2024-05-01T12:00:00 02:00") == datetime(2024, 5, 1, 10, tzinfo=utc)
    assert parse_api_date("Wed, 01 May 2024 10:00:00 +0000") == datetime(2024, 5, 1, 10,
                                                                         tzinfo=utc)
    with pytest.raises(ValueError):
        parse_api_date("yesterday")


async def test_cancel_while_queued(sim: Sim, gateway: Gateway) -> None:
    sim.state.hold_queue()
    status, created = await sim.send(fax_form(gateway))
    assert status == 201
    sid = created["sid"]
    url = f"{sim.faxes_url}/{sid}"

    status, body, _ = await sim.call("POST", url, form={"Status": "delivered"})
    assert (status, body["code"]) == (400, 20001)
    status, body, _ = await sim.call("POST", url, form={"Status": "canceled"})
    assert status == 200 and body["status"] == "canceled"
    status, body, _ = await sim.call("POST", url, form={"Status": "canceled"})
    assert (status, body["code"]) == (400, 10000)

    sim.state.release_queue()
    await sim.state.wait_idle()
    assert (await sim.fetch(sid))["status"] == "canceled"
    assert sim.state.media_fetches == []
    [received] = gateway.callbacks
    assert received.valid and received.params["FaxStatus"] == "canceled"


async def test_cancel_after_delivery_refused(sim: Sim, gateway: Gateway) -> None:
    fetched = await send_and_wait(sim, fax_form(gateway, callback=False))
    status, body, _ = await sim.call("POST", f"{sim.faxes_url}/{fetched['sid']}",
                                     form={"Status": "canceled"})
    assert (status, body["code"]) == (400, 10000)
    status, body, _ = await sim.call("POST", f"{sim.faxes_url}/{uuid.uuid4()}",
                                     form={"Status": "canceled"})
    assert (status, body["code"]) == (404, 20404)


async def test_delete(sim: Sim, gateway: Gateway) -> None:
    sim.state.hold_queue()
    status, created = await sim.send(fax_form(gateway, callback=False))
    url = f"{sim.faxes_url}/{created['sid']}"
    status, body, _ = await sim.call("DELETE", url)
    assert (status, body["code"]) == (409, 20009)
    sim.state.release_queue()
    await sim.state.wait_idle()
    status, _, _ = await sim.call("DELETE", url)
    assert status == 204
    status, _, _ = await sim.call("GET", url)
    assert status == 404


# -- fault knobs -----------------------------------------------------------------------------


async def test_fail_next_send_429_with_retry_after(sim: Sim, gateway: Gateway) -> None:
    sim.state.fail_next_send.append((429, {}, {"Retry-After": "3"}))
    sim.state.fail_next_send.append((503, {"code": 20503, "message": "Service unavailable",
                                           "more_info": "x", "status": 503}))
    status, body, headers = await sim.call("POST", sim.faxes_url, form=fax_form(gateway))
    assert (status, body["code"], body["status"]) == (429, 20429, 429)
    assert headers["Retry-After"] == "3"
    status, body = await sim.send(fax_form(gateway))
    assert (status, body["message"]) == (503, "Service unavailable")
    status, body = await sim.send(fax_form(gateway))
    assert status == 201
    assert len(sim.state.send_requests) == 3
    assert list(sim.state.faxes) == [body["sid"]]
    await sim.state.wait_idle()


async def test_lost_send_response_still_creates_fax(sim: Sim, gateway: Gateway) -> None:
    sim.state.drop_next_send_responses = 1
    with pytest.raises(aiohttp.ClientError):
        await sim.send(fax_form(gateway, callback=False))
    status, body, _ = await sim.call("GET", sim.faxes_url, params={"To": "+13104456789"})
    assert status == 200 and len(body["faxes"]) == 1
    await sim.state.wait_idle()


async def test_callback_retried_until_2xx(sim: Sim, gateway: Gateway) -> None:
    gateway.callback_statuses = [500, 500]
    status, created = await sim.send(fax_form(gateway))
    assert status == 201
    await sim.state.wait_fax(created["sid"])
    attempts = sim.state.callbacks_for(created["sid"])
    assert [(a.attempt, a.status) for a in attempts] == [(1, 500), (2, 500), (3, 200)]
    assert len(gateway.callbacks) == 3
    assert all(r.valid for r in gateway.callbacks)
    assert len({a.signature for a in attempts}) == 1


async def test_callback_dropped_after_three_attempts(sim: Sim, gateway: Gateway) -> None:
    gateway.callback_statuses = [503] * 5
    fetched = await send_and_wait(sim, fax_form(gateway))
    assert fetched["status"] == "delivered"
    assert [a.status for a in sim.state.callbacks] == [503, 503, 503]
    assert len(gateway.callbacks) == 3


async def test_callback_connection_refused_retried(sim: Sim, gateway: Gateway) -> None:
    form = fax_form(gateway, StatusCallback="http://127.0.0.1:1/fax-status")
    await send_and_wait(sim, form)
    attempts = sim.state.callbacks
    assert [a.attempt for a in attempts] == [1, 2, 3]
    assert all(a.status is None and a.error for a in attempts)


async def test_suppress_callbacks(sim: Sim, gateway: Gateway) -> None:
    sim.state.suppress_callbacks = True
    fetched = await send_and_wait(sim, fax_form(gateway))
    assert fetched["status"] == "delivered"
    assert sim.state.callbacks == [] and gateway.callbacks == []


# -- mounting and running --------------------------------------------------------------------


@pytest.mark.parametrize("mount", ["install", "subapp"])
async def test_mounted_under_base_path(http: aiohttp.ClientSession, mount: str) -> None:
    """The sandbox mode: the gateway's own app serves the simulator, media and callbacks."""
    gw = Gateway()
    app = build_gateway_app(gw)
    prefix = "/sandbox/signalwire"
    kwargs: dict[str, Any] = dict(project_id=PROJECT, api_token=TOKEN, signing_key=KEY,
                                  callback_delay_s=0.0, callback_retry_delay_s=0.01)
    if mount == "install":
        state = install_simulator(app, base_path=prefix + "/", **kwargs)
    else:
        sub = create_simulator_app(**kwargs)
        app.add_subapp(prefix, sub)
        state = sub[SIM_STATE]
    runner, gw.base_url = await serve(app)
    try:
        sim = Sim(state, gw.base_url, http, prefix=prefix)
        status, created = await sim.send(fax_form(gw))
        assert status == 201, created
        assert created["url"].startswith(f"{prefix}{API}/Accounts/{PROJECT}/Faxes/")
        await state.wait_fax(created["sid"])
        fetched = await sim.fetch(created["sid"])
        assert fetched["status"] == "delivered" and fetched["num_pages"] == "2"
        [received] = gw.callbacks
        assert received.valid
        for _ in range(3):
            await sim.send(fax_form(gw, callback=False))
        await state.wait_idle()
        status, body, _ = await sim.call("GET", sim.faxes_url, params={"PageSize": "3"})
        assert body["next_page_uri"].startswith(prefix + API)
        status, body, _ = await sim.call("GET", gw.base_url + body["next_page_uri"])
        assert status == 200 and len(body["faxes"]) == 1
    finally:
        await runner.cleanup()


async def test_cleanup_cancels_unfinished_faxes(gateway: Gateway,
                                                http: aiohttp.ClientSession) -> None:
    app = create_simulator_app(project_id=PROJECT, api_token=TOKEN, signing_key=KEY)
    runner, base_url = await serve(app)
    state = app[SIM_STATE]
    state.hold_queue()
    sim = Sim(state, base_url, http)
    status, created = await sim.send(fax_form(gateway))
    assert status == 201
    task = next(iter(state._tasks))
    await runner.cleanup()
    assert task.cancelled()
    await state.wait_idle(timeout=1)
    assert state.faxes[created["sid"]].finished.is_set()


async def test_python_m_runs_standalone(gateway: Gateway, http: aiohttp.ClientSession) -> None:
    env = {**os.environ, "SIM_API_TOKEN": TOKEN, "SIM_SIGNING_KEY": KEY,
           "PYTHONPATH": str(REPO)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.sandbox.simulator", "--port", "0", "--project-id", PROJECT,
        "--callback-delay-s", "0", cwd=REPO, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), timeout=30)  # type: ignore[union-attr]
        base_url = line.decode().strip()
        assert base_url.startswith("http://127.0.0.1:")
        faxes_url = f"{base_url}{API}/Accounts/{PROJECT}/Faxes"
        status, created, _ = await api_call(http, "POST", faxes_url, form=fax_form(gateway))
        assert status == 201
        # The state lives in the other process: the signed callback is the signal.
        await asyncio.wait_for(gateway.callback_arrived.wait(), timeout=30)
        status, fetched, _ = await api_call(http, "GET", f"{faxes_url}/{created['sid']}")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert proc.returncode == 0, stderr.decode()
    assert fetched["status"] == "delivered"
    [received] = gateway.callbacks
    assert received.valid and received.params["NumPages"] == "2"
    assert TOKEN.encode() not in stderr and KEY.encode() not in stderr
    assert MEDIA_SECRET.encode() not in stderr
