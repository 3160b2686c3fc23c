"""The login's `next` and the health page of several nodes (issue 26, item 9), over plain HTTP
against real gateways: the exact Location headers, and what each node's health page says."""

from __future__ import annotations

import re
from pathlib import Path

import aiohttp
import pytest

from gateway.jobs.outbound_states import State
from gateway.users import passwd_command
from gateway.web.dashboard.filters import safe_next
from testsupport.s3server import SeaweedS3

from .conftest import (
    GatewayFactory,
    Simulator,
    job_ids,
    pdf_mail,
    pg_reset,
    production_env,
    smtp_send,
    wait_state_any,
)
from .helpers.web import log_in

PASSWORD = "ann-admin-pw"


def users_file(tmp_path: Path) -> Path:
    users = tmp_path / "users"
    if not users.exists():
        passwd_command(users, "ann", PASSWORD, role="admin")
    return users


@pytest.mark.parametrize("target", [
    "/\t/evil.example", "/\n/evil.example", "/%09/evil.example", "/%2F/evil.example",
    "//evil.example", "/\\evil.example", "/%5Cevil.example", "https://evil.example/",
    "/jobs\r\nSet-Cookie: x=1", "/jobs%0ASet-Cookie:%20x=1", "/jobs%0D%0A", "jobs",
    "/\x00x", "/" + "a" * 600])
def test_an_unsafe_next_goes_to_the_job_list(target: str) -> None:
    assert safe_next(target) == "/jobs"


@pytest.mark.parametrize("target", ["/jobs", "/jobs/0123456789abcdef",
                                    "/jobs?q=acme&page=2", "/received?caller=%2B1212", "/"])
def test_a_path_here_is_kept(target: str) -> None:
    assert safe_next(target) == target


async def test_the_login_goes_only_to_a_path_here(make_gateway: GatewayFactory, tmp_path: Path,
                                                  simulator: Simulator) -> None:
    gw = await make_gateway(production_env(tmp_path / "var", simulator,
                                           USERS_FILE=str(users_file(tmp_path))))
    base = f"http://127.0.0.1:{gw.dashboard.port}"  # type: ignore[union-attr]
    cases = {"/\t/evil.example": "/jobs", "/jobs\n/x": "/jobs",
             "/jobs%0ASet-Cookie: a=b": "/jobs", "/%09/evil.example": "/jobs",
             "/received?to=3455": "/received?to=3455"}
    for target, expected in cases.items():
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
            # The form shows the target it will go to: a refused one is never in the page.
            async with http.get(base + "/login", params={"next": target}) as r:
                page = await r.text()
            assert f'name="next" value="{expected}"' in page.replace("&amp;", "&"), target
            token = re.search(r'name="login_token" value="([^"]+)"', page)
            assert token
            form = {"login_token": token.group(1), "name": "ann", "password": PASSWORD,
                    "next": target}
            # Posted as is (a hand-made form): a clean redirect, never a dropped connection.
            async with http.post(base + "/login", data=form, allow_redirects=False) as r:
                assert r.status == 303, (target, r.status)
                assert r.headers["Location"] == expected, target
                assert any(c.startswith("faxgw_session=")
                           for c in r.headers.getall("Set-Cookie"))


def shared_env(tmp_path: Path, name: str, pg_url: str, seaweed: SeaweedS3,
               simulator: Simulator) -> dict[str, str]:
    """A node of a shared queue that writes its reports to its own outbox folder."""
    return production_env(
        tmp_path / name, simulator, DATABASE_URL=pg_url, NODE_ID=name, MEDIA_STORE="s3",
        S3_BUCKET="faxgw-test", S3_PREFIX=f"health-{tmp_path.name}",
        S3_ENDPOINT_URL=seaweed.endpoint_url, S3_REGION=seaweed.region,
        USERS_FILE=str(users_file(tmp_path)), LEASE_SECONDS="3")


async def health_page(base: str) -> str:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        await log_in(http, base, "ann", PASSWORD)
        async with http.get(base + "/health") as r:
            assert r.status == 200
            return await r.text()


async def test_each_node_says_what_it_saw_and_lists_the_live_nodes(
        make_gateway: GatewayFactory, tmp_path: Path, simulator: Simulator, pg_url: str,
        seaweed: SeaweedS3, monkeypatch: pytest.MonkeyPatch) -> None:
    pg_reset(pg_url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweed.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweed.secret_key)
    a = await make_gateway(shared_env(tmp_path, "node-a", pg_url, seaweed, simulator))
    b = await make_gateway(shared_env(tmp_path, "node-b", pg_url, seaweed, simulator))
    bases = {gw.s.cluster.node_id: f"http://127.0.0.1:{gw.dashboard.port}"  # type: ignore[union-attr]
             for gw in (a, b)}
    outbox = {gw.s.cluster.node_id: str(gw.s.queue.data_dir / "outbox") for gw in (a, b)}
    # Node a takes the mail (its intake uploads the document to S3 before the 250); a node
    # faxes it and writes the report to its own outbox.
    reply = await smtp_send(a.smtp.port, pdf_mail("15551234567@fax.local"),
                            ["15551234567@fax.local"])
    assert reply.code == 250, reply.text
    [job_id] = job_ids(reply.text)
    await wait_state_any([a, b], job_id, State.REPORTED)
    pages = {name: await health_page(base) for name, base in bases.items()}
    for name, page in pages.items():
        other = "node-b" if name == "node-a" else "node-a"
        # Its checks name its own outbox and what it did, never the other node's.
        checks = page.split("Gateways running", 1)[0]
        assert outbox[name] in checks
        assert outbox[other] not in checks, name
        # Both nodes are listed as running, this one marked.
        nodes = page.split("Gateways running", 1)[1].split("</ul>", 1)[0]
        assert "node-a" in nodes and "node-b" in nodes
        assert f"<strong>{name}</strong> (this node)" in nodes
    # Node a used S3 at intake: it has been in contact.
    media = re.search(r"Media store \(S3\)</strong>(.*?)</li>", pages["node-a"], re.S)
    assert media and "no contact yet" not in media.group(1)
    assert re.search(r"(upload|delete) ok \(\d+ s ago\)", media.group(1))
    # Node b stops: node a no longer lists it.
    await b.stop(grace_s=1)
    page = await health_page(bases["node-a"])
    nodes = page.split("Gateways running", 1)[1].split("</ul>", 1)[0]
    assert "node-a" in nodes and "node-b" not in nodes
