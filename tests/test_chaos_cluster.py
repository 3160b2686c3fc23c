"""Chaos (slow): three gateway processes on one PostgreSQL and one SeaweedFS, an HTTP front for
callbacks (as a load balancer would be), mail arriving at all three, random faults (kill -9
and restart, a pause with SIGSTOP past LEASE_SECONDS and SIGCONT, every database connection
killed with pg_terminate_backend), and one node that never comes back. Every accepted mail is
faxed exactly once and reported once: a report repeated by a fault that hit between the
relay's 250 and its record is the same message (the same Message-ID), and there are no more
such repeats than faults. The takeover time of the dead nodes' jobs is measured and printed.

Run: pytest -m slow -s tests/test_chaos_cluster.py
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import smtplib
import time
from collections import Counter
from pathlib import Path

import aiohttp
import psycopg
import pytest
from aiohttp import web

from testsupport.harness import DaemonProcess
from testsupport.s3server import SeaweedS3

from .conftest import RelaySink, Simulator, job_ids, pdf_mail, pg_reset, smtp_send
from .helpers.cluster import all_reported, shared_env

pytestmark = pytest.mark.slow

MAILS = 30


class Front:
    """The HTTP load balancer: forwards each request to the next node that answers."""

    def __init__(self, nodes: list[DaemonProcess]) -> None:
        self.nodes = nodes
        self.turn = 0
        self.app = web.Application()
        self.app.router.add_route("*", "/{tail:.*}", self.forward)
        self.runner = web.AppRunner(self.app, access_log=None)
        self.url = ""
        self.session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))

    async def stop(self) -> None:
        assert self.session is not None
        await self.session.close()
        await self.runner.cleanup()

    async def forward(self, request: web.Request) -> web.Response:
        assert self.session is not None
        body = await request.read()
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() not in ("host", "content-length")}
        for _ in range(len(self.nodes)):
            node = self.nodes[self.turn % len(self.nodes)]
            self.turn += 1
            url = f"http://127.0.0.1:{node.http_port}{request.path_qs}"
            try:
                async with self.session.request(request.method, url, data=body,
                                                headers=headers) as resp:
                    return web.Response(status=resp.status, body=await resp.read(),
                                        content_type=resp.content_type)
            except aiohttp.ClientError:
                continue
        return web.Response(status=503, text="no node answers")


def alive(node: DaemonProcess) -> bool:
    return node.proc is not None and node.proc.returncode is None


async def deliver(nodes: list[DaemonProcess], number: str, msgid: str) -> list[str]:
    """Like a sending MTA: try the nodes in turn until one answers 250 (same Message-ID)."""
    for _ in range(40):
        node = random.choice([n for n in nodes if alive(n)] or nodes)
        try:
            reply = await smtp_send(node.smtp_port, pdf_mail(f"{number}@fax.local",
                                                             message_id=msgid),
                                    [f"{number}@fax.local"])
        except (smtplib.SMTPException, ConnectionError, OSError):
            await asyncio.sleep(0.2)
            continue
        if reply.code == 250:
            return job_ids(reply.text)
        await asyncio.sleep(0.2)
    raise AssertionError(f"mail to {number} never accepted")


def held_by(pg_url: str, node_id: str, now: float) -> set[str]:
    with psycopg.connect(pg_url) as db:
        rows = db.execute("SELECT id FROM jobs WHERE lease_owner = %s AND lease_until > %s",
                          (node_id, now)).fetchall()
    return {r[0] for r in rows}


async def takeover_time(pg_url: str, node_id: str, died_at: float) -> float | None:
    """Seconds from the kill until no job is leased to the dead node any more (taken over by
    another node, or moved on); None when it held nothing."""
    with psycopg.connect(pg_url) as db:
        held = {r[0] for r in db.execute("SELECT id FROM jobs WHERE lease_owner = %s",
                                         (node_id,)).fetchall()}
    if not held:
        return None
    async with asyncio.timeout(120):
        while True:
            with psycopg.connect(pg_url) as db:
                still = db.execute("SELECT COUNT(*) FROM jobs WHERE lease_owner = %s AND"
                                   " id = ANY(%s)", (node_id, list(held))).fetchone()[0]
            if still == 0:
                return time.monotonic() - died_at
            await asyncio.sleep(0.1)


def kill_connections(pg_url: str) -> int:
    """Every gateway's database connections killed at once (a failover, a DBA, a proxy)."""
    with psycopg.connect(pg_url, autocommit=True) as db:
        return len(db.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE"
                              " datname = current_database() AND application_name = 'faxgw'"
                              ).fetchall())


async def test_three_nodes_random_kill9_one_never_returns(
        pg_url: str, seaweed: SeaweedS3, simulator: Simulator, relay: RelaySink,
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweed.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweed.secret_key)
    pg_reset(pg_url)
    rng = random.Random(int(os.environ.get("FAXGW_CHAOS_SEED", "11")))
    names = ["node-a", "node-b", "node-c"]
    nodes: list[DaemonProcess] = []
    front = Front(nodes)
    await front.start()
    for name in names:
        nodes.append(DaemonProcess(
            shared_env(tmp_path, name, pg_url, seaweed, simulator, relay,
                       PUBLIC_BASE_URL=front.url, WORKER_CONCURRENCY="4",
                       SMTP_HOSTNAME=f"{name}.test",  # a report's Message-ID is not the node's
                       SEND_RATE_PER_SECOND="10"),  # shared pacing: 10 faxes/s in all
            tmp_path / f"{name}.log"))
    takeovers: list[tuple[str, float | None]] = []
    watchers: list[tuple[str, asyncio.Task[float | None]]] = []
    faults: list[str] = []
    try:
        for node in nodes:
            await node.start()
        numbers = [f"15551400{i + 10:03d}" for i in range(MAILS)]

        async def chaos() -> None:
            for round_ in range(6):
                await asyncio.sleep(rng.uniform(0.5, 2.0))
                victim_i = 2 if round_ == 0 else rng.randrange(2)  # node-c dies for good
                victim = nodes[victim_i]
                if not alive(victim):
                    continue
                fault = "kill9" if round_ == 0 else rng.choice(["kill9", "pause", "connections"])
                faults.append(f"{fault} {names[victim_i]}")
                if fault == "connections":
                    await asyncio.to_thread(kill_connections, pg_url)
                    continue
                if fault == "pause":  # a stall past LEASE_SECONDS=3: its jobs are taken over
                    assert victim.proc is not None
                    victim.proc.send_signal(signal.SIGSTOP)
                    try:
                        await asyncio.sleep(rng.uniform(4.0, 6.0))
                    finally:
                        victim.proc.send_signal(signal.SIGCONT)
                    continue
                if round_ == 0:  # for good: at a moment it holds work, to see the takeover
                    try:
                        async with asyncio.timeout(15):
                            while not held_by(pg_url, names[victim_i], time.time()):
                                await asyncio.sleep(0.02)
                    except TimeoutError:
                        pass
                await victim.kill9()
                died = time.monotonic()
                # A node that restarts with the same NODE_ID frees its own leases at start;
                # the one that never returns shows the real takeover (lease expiry + claim).
                label = f"{names[victim_i]}{' (never back)' if round_ == 0 else ' (restarted)'}"
                watchers.append((label, asyncio.create_task(
                    takeover_time(pg_url, names[victim_i], died))))
                if round_ > 0:
                    await asyncio.sleep(rng.uniform(0.5, 3.0))
                    await victim.start()

        chaos_task = asyncio.create_task(chaos())
        accepted: dict[str, list[str]] = {}
        for i, number in enumerate(numbers):
            accepted[number] = await deliver(nodes, number, f"<chaos-{i}@example.com>")
            await asyncio.sleep(rng.uniform(0.0, 0.2))
        await chaos_task
        takeovers = [(label, await task) for label, task in watchers]
        reports = [await relay.next(180) for _ in range(MAILS)]
        await all_reported(pg_url, 120)
        await simulator.state.wait_idle(60)
        for node in nodes:
            if alive(node):
                assert await node.terminate() == 0, node.log_tail()
    finally:
        for node in nodes:
            await node.close()
        await front.stop()
    while not relay.messages.empty():
        reports.append(relay.messages.get_nowait())
    ids: dict[str, set[str]] = {}
    for report in reports:
        ids.setdefault(report["X-Faxgw-Job"], set()).add(report["Message-ID"])
    accepted_ids = {i for got in accepted.values() for i in got}
    assert set(ids) == accepted_ids and len(ids) == MAILS, ids
    # A copy mailed again after a fault between the relay's 250 and its record (SMTP cannot
    # do exactly once) is the same message; a node that lost its job mails nothing.
    assert all(len(msgids) == 1 for msgids in ids.values()), ids
    repeats = len(reports) - MAILS
    assert repeats <= len(faults), (repeats, faults)
    faxed = Counter(r["To"] for r in simulator.state.send_requests)
    assert len(faxed) == MAILS and set(faxed.values()) == {1}, faxed
    assert all("delivered" in r["Subject"] for r in reports)
    print(f"\nchaos: {MAILS} mails accepted, faxed once, reported once ({repeats} copy(ies) "
          f"with the same Message-ID); faults: {', '.join(faults)}; "
          f"{len(watchers)} kill(s); takeover of a dead node's leased jobs: "
          + ", ".join(f"{label}: " + ("held no lease" if t is None else f"{t:.1f} s")
                      for label, t in takeovers)
          + " (LEASE_SECONDS=3)")
