"""Received faxes on several gateways (PostgreSQL, real daemon processes): the node delivering
them stalls (SIGSTOP) past LEASE_SECONDS or dies, and every received fax is still mailed once
to each recipient, counted at the relay sink; a dead node's faxes are taken over within about
the lease time."""

from __future__ import annotations

import asyncio
import collections
import signal
import time
from email.message import EmailMessage
from pathlib import Path

import psycopg

from gateway.inbound.webhook import INBOUND_ROUTE
from testsupport.harness import DaemonProcess
from testsupport.s3server import SeaweedS3

from .conftest import RelaySink, Simulator, make_pdf, pg_reset
from .helpers.cluster import s3_credentials, shared_env  # noqa: F401 - a fixture

ROUTED = "+13103383454"
RECIPIENTS = ("a@example.com", "b@example.com")
LEASE_S = 3.0


def nodes(tmp_path: Path, pg_url: str, seaweed: SeaweedS3, simulator: Simulator,
          relay: RelaySink, **extra: str) -> tuple[DaemonProcess, DaemonProcess]:
    def one(name: str) -> DaemonProcess:
        return DaemonProcess(shared_env(tmp_path, name, pg_url, seaweed, simulator, relay,
                                        INBOUND_ROUTES=f"{ROUTED}={','.join(RECIPIENTS)}",
                                        **extra), tmp_path / f"{name}.log")
    return one("node-a"), one("node-b")


async def ring(simulator: Simulator, node: DaemonProcess, caller: str) -> str:
    call = await simulator.state.inbound.ring(
        sim_url=simulator.url, webhook_url=f"http://127.0.0.1:{node.http_port}{INBOUND_ROUTE}",
        to=ROUTED, from_=caller, document=make_pdf(1))
    assert call.action_statuses == [200], call.summary()
    return call.fax_sid


def fax_states(pg_url: str) -> dict[str, str]:
    with psycopg.connect(pg_url) as db:
        return dict(db.execute("SELECT fax_sid, state FROM inbound_faxes").fetchall())


async def all_done(pg_url: str, sids: list[str], timeout_s: float) -> None:
    async with asyncio.timeout(timeout_s):
        while set(fax_states(pg_url).get(s) for s in sids) != {"done"}:
            await asyncio.sleep(0.1)


def drain(relay: RelaySink) -> list[EmailMessage]:
    out = []
    while not relay.messages.empty():
        out.append(relay.messages.get_nowait())
    return out


async def test_a_stalled_delivering_node_mails_each_received_fax_once(
        pg_url: str, seaweed: SeaweedS3, s3_credentials: None, simulator: Simulator,
        relay: RelaySink, tmp_path: Path) -> None:
    """Six faxes come in at node-a, which starts mailing them; between a fax's two
    recipients' mails it stops itself (FAXGW_PAUSE_AT=inbound-between-mails, SIGSTOP;
    LEASE_SECONDS=3): node-b takes that fax over once the lease has run out and mails its
    second recipient; node-a, continued (SIGCONT) in the middle of its work, must send nothing
    node-b sent. Its other faxes may be stopped anywhere, even between the relay's 250 and its
    record: node-b waits for those (the settle window), and node-a records them on waking."""
    pg_reset(pg_url)
    a, b = nodes(tmp_path, pg_url, seaweed, simulator, relay)
    try:
        await a.start(pause_at="inbound-between-mails")
        # No mail is answered before every fax is in, so node-a cannot stop with a ring
        # unanswered (node-b starts only after the pause: the faxes are node-a's).
        relay.hold_data()
        sids = await asyncio.gather(*(ring(simulator, a, f"+1212555{i:04d}")
                                      for i in range(6)))
        relay.release_data()
        held = await a.wait_paused("inbound-between-mails")  # "inbound fax <sid>"
        sid = held.removeprefix("inbound fax ")
        assert sid in sids, held
        await b.start()
        # node-b can take the fax only once node-a's lease has run out: the fax done is the
        # stall past the lease, observed.
        await all_done(pg_url, [sid], 60)
        a.resume()
        # node-a runs on from the pause, to the fenced start of the second mail (checked below).
        lost = await a.wait_log(f"inbound fax {sid}: lease lost (this node stalled past "
                                "LEASE_SECONDS, or another node took the fax over)")
        await all_done(pg_url, sids, 60)
        # Both stop gracefully: whatever node-a still had under way ends before counting.
        assert await a.terminate() == 0, a.log_tail()
        assert await b.terminate() == 0, b.log_tail()
    finally:
        await a.close()
        await b.close()
    mails = drain(relay)
    by_b = [line for line in b.lines if "mail to" in line and "relayed" in line]
    sent = collections.Counter((m["X-Fax-Sid"], m["To"]) for m in mails)
    twice = {k: n for k, n in sent.items() if n > 1}
    assert not twice, f"mailed more than once: {twice}"
    assert set(sent) == {(s, r) for s in sids for r in RECIPIENTS}
    assert len(mails) == len(sids) * len(RECIPIENTS)
    assert sorted(simulator.state.inbound.media_deletes) == sorted(sids)
    assert any(f"inbound fax {sid}: mail to {RECIPIENTS[1]}" in line for line in by_b), by_b
    assert f"the mail to {RECIPIENTS[1]} not done here" in lost, lost
    print(f"{len(by_b)} of {len(mails)} mails sent by node-b, which took over from node-a")


async def test_a_dead_nodes_received_faxes_are_taken_over_within_the_lease(
        pg_url: str, seaweed: SeaweedS3, s3_credentials: None, simulator: Simulator,
        relay: RelaySink, tmp_path: Path) -> None:
    """node-a dies (kill -9) between a fax's two recipients' mails, holding the fax: node-b
    mails the second recipient once node-a's fax lease runs out (LEASE_SECONDS=3), not after
    a leader's lease of several times that."""
    pg_reset(pg_url)
    a, b = nodes(tmp_path, pg_url, seaweed, simulator, relay)
    try:
        await a.start(crash_at="inbound-between-mails")
        # node-a claims the fax as its callback is recorded: node-b starts only after that
        # (it would claim it itself otherwise), while node-a is mailing and dying.
        sid = await ring(simulator, a, "+12125550147")
        await b.start()
        assert await a.wait_exit() == -signal.SIGKILL
        died_at = time.monotonic()
        first = await relay.next(10)
        second = await relay.next(30)
        took = time.monotonic() - died_at
        await all_done(pg_url, [sid], 30)
        assert await b.terminate() == 0, b.log_tail()
    finally:
        await a.close()
        await b.close()
    assert relay.messages.empty()
    assert [first["To"], second["To"]] == list(RECIPIENTS)
    assert first["X-Fax-Sid"] == second["X-Fax-Sid"] == sid
    assert took < 2.5 * LEASE_S, f"taken over {took:.1f} s after node-a died"
    print(f"taken over and mailed {took:.1f} s after node-a died (LEASE_SECONDS=3)")
