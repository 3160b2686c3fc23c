"""kill -9 of the real daemon between two recipients' mails of one received fax: after the
restart the second recipient gets it, and neither gets it twice."""

from __future__ import annotations

import signal
import sqlite3
from pathlib import Path

import pytest

from gateway.inbound.webhook import INBOUND_ROUTE
from testsupport.harness import DaemonProcess

from .conftest import RelaySink, Simulator, make_pdf, production_env, relay_env

ROUTED = "+13103383454"


def deliveries(data_dir: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(f"file:{data_dir / 'faxgw.sqlite3'}?mode=ro", uri=True) as db:
        return db.execute("SELECT recipient, message_id FROM inbound_deliveries "
                          "ORDER BY recipient").fetchall()


@pytest.mark.parametrize("point", ["inbound-between-mails", "inbound-after-mail"])
async def test_kill9_between_two_recipients_mails(point: str, simulator: Simulator,
                                                   relay: RelaySink, tmp_path: Path) -> None:
    env = production_env(tmp_path / "var", simulator, **relay_env(relay),
                         INBOUND_ROUTES=f"{ROUTED}=a@example.com,b@example.com",
                         RETRY_BASE_SECONDS="0.1", RETRY_MAX_SECONDS="1")
    daemon = DaemonProcess(env, tmp_path / "daemon.log")
    try:
        await daemon.start(crash_at=point)
        url = f"http://127.0.0.1:{daemon.http_port}{INBOUND_ROUTE}"
        call = await simulator.state.inbound.ring(sim_url=simulator.url, webhook_url=url,
                                                  to=ROUTED, from_="+12125550147",
                                                  document=make_pdf(1))
        assert call.action_statuses == [200]  # recorded before the 200, then it dies
        assert await daemon.wait_exit() == -signal.SIGKILL
        first = await relay.next()
        assert first["To"] == "a@example.com"
        await daemon.start()
        mails = [first, await relay.next(30)]
        if point == "inbound-after-mail":
            # Died after the relay accepted a's mail but before recording it: a's mail is
            # sent again (the known window), with the same Message-ID, then b's.
            mails.append(await relay.next(30))
        await daemon.wait_log("media deleted at SignalWire")
        assert await daemon.terminate() == 0, daemon.log_tail()
    finally:
        await daemon.close()
    assert relay.messages.empty()
    recipients = [m["To"] for m in mails]
    if point == "inbound-between-mails":
        assert recipients == ["a@example.com", "b@example.com"]
    else:
        assert recipients == ["a@example.com", "a@example.com", "b@example.com"]
        assert mails[0]["Message-ID"] == mails[1]["Message-ID"]
    assert [r for r, _ in deliveries(tmp_path / "var")] == ["a@example.com", "b@example.com"]
    assert simulator.state.inbound.media_deletes == [call.fax_sid]
