"""Received faxes in the dashboard: a gateway with inbound routes on a FakeClock, faxes rung in
through the simulator and delivered, and the rows the received list shows."""

from __future__ import annotations

import time
from pathlib import Path

from gateway.daemon import Gateway
from gateway.inbound.webhook import INBOUND_ROUTE
from gateway.users import passwd_command

from ..conftest import (
    FakeClock,
    GatewayFactory,
    RelaySink,
    Simulator,
    make_pdf,
    production_env,
    relay_env,
)
from .dashboard import PASSWORDS, Watched

ROUTED = "+13103383454"
OTHER = "+13103383455"
CALLER = "+12125550147"


class Inbox:
    def __init__(self, gw: Gateway, simulator: Simulator) -> None:
        self.gw = gw
        self.simulator = simulator
        self.base = f"http://127.0.0.1:{gw.dashboard.port}"  # type: ignore[union-attr]

    async def ring(self, *, to: str = ROUTED, caller: str = CALLER, pages: int = 2,
                   station: str = "ACME FAX", failed: str | None = None,
                   document: bytes | None = None) -> str:
        """A fax comes in and is delivered (the deliverer driven to idle): its sid."""
        inbound = self.simulator.state.inbound
        inbound.outcome = f"failed:{failed}" if failed else "received"
        call = await inbound.ring(sim_url=self.simulator.url,
                                  webhook_url=self.gw.public_base_url() + INBOUND_ROUTE,
                                  to=to, from_=caller,
                                  document=document or make_pdf(pages),
                                  station_id=station)
        assert call.answer == "receive"
        await self.gw.inbound.deliverer.run_until_idle()
        self.gw.clock.advance(1)  # type: ignore[attr-defined]  # a FakeClock: a clear order
        return call.fax_sid


async def start_inbox(manual_gateway: GatewayFactory, tmp_path: Path, simulator: Simulator,
                      relay: RelaySink, **extra: str) -> Gateway:
    users = tmp_path / "users"
    passwd_command(users, "ann", PASSWORDS["ann"], role="admin")
    env = production_env(tmp_path / "var", simulator, **relay_env(relay),
                         USERS_FILE=str(users),
                         INBOUND_ROUTES=f"{ROUTED}=frontdesk@example.com,billing@example.com;"
                                        f"{OTHER}=lab@example.com",
                         INBOUND_ADMIN_ADDRESS="admin@example.com", **extra)
    return await manual_gateway(env, FakeClock(time.time()))


async def received_rows(w: Watched) -> list[str]:
    hrefs = await w.page.locator("table.received tbody a").evaluate_all(
        "links => links.map(a => a.getAttribute('href'))")
    return [h.rsplit("/", 1)[1] for h in hrefs]


