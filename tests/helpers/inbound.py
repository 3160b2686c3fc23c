"""Received faxes without a browser: a gateway's settings with one inbound route, a fax rung in
through the simulator, its row in SQLite, the outcome counts on /metrics, an InboundFax row."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import aiohttp

from gateway.daemon import Gateway
from gateway.inbound.webhook import INBOUND_ROUTE
from gateway.store.inbound import InboundFax

from ..conftest import RelaySink, Simulator, production_env, relay_env

ROUTED = "+13103383454"
CALLER = "+12125550147"
ADMIN = "faxadmin@example.com"
OUTCOMES = ("received", "failed", "noise", "canceled", "unrouted", "blocked", "media_refused",
            "gave_up")


def env(tmp_path: Path, simulator: Simulator, relay: RelaySink, **extra: str) -> dict[str, str]:
    return production_env(tmp_path / "var", simulator, **relay_env(relay),
                          INBOUND_ROUTES=f"{ROUTED}=frontdesk@example.com", **extra)


async def ring(gw: Gateway, simulator: Simulator, document: bytes) -> str:
    call = await simulator.state.inbound.ring(
        sim_url=simulator.url, webhook_url=gw.public_base_url() + INBOUND_ROUTE, to=ROUTED,
        from_=CALLER, document=document, station_id="ACME FAX")
    assert call.answer == "receive" and call.action_statuses == [200]
    return call.fax_sid


def row(gw: Gateway, sid: str) -> sqlite3.Row:
    db = sqlite3.connect(gw.s.queue.data_dir / "faxgw.sqlite3")
    db.row_factory = sqlite3.Row
    try:
        return db.execute("SELECT * FROM inbound_faxes WHERE fax_sid = ?", (sid,)).fetchone()
    finally:
        db.close()


async def counts(gw: Gateway) -> dict[str, float]:
    """faxgw_inbound_faxes_total by outcome, as /metrics shows it."""
    async with aiohttp.ClientSession() as client:
        async with client.get(gw.public_base_url() + "/metrics") as resp:
            text = await resp.text()
    found = dict(re.findall(r'^faxgw_inbound_faxes_total\{outcome="(\w+)"\} (\S+)$', text,
                            re.M))
    assert set(found) == set(OUTCOMES)
    return {k: float(v) for k, v in found.items() if float(v)}


def fax(**over: object) -> InboundFax:
    values: dict[str, object] = dict(
        fax_sid="b3877c40-da60-4998-90ad-b792e98472fx", account_sid="p",
        from_number="+12125550147", to_number="+13103383454", state="delivering",
        outcome="received", fax_status="received", num_pages=2, media_url=None,
        media_sid=None, remote_station_id="ACME <FAX>\r\nBcc: x@y", error_code=None,
        error_message=None, recipients="a@example.com", source="callback", tries=0,
        next_run_at=None, last_error=None, called_at=None, completed_at=1_800_000_000.0,
        media_deleted_at=None, done_at=None, created_at=1_800_000_000.0,
        updated_at=1_800_000_000.0)
    values.update(over)
    return InboundFax(**values)  # type: ignore[arg-type]


