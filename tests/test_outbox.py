"""The outbox keeps every report (issue 15, item 12): `faxgw report` adds `<job>-2.eml`."""

from __future__ import annotations

import time
from pathlib import Path

from gateway.jobs.outbound_states import State
from gateway.mail.sender import write_new
from gateway.outbound.actions import request_report

from .conftest import base_env, send_one, wait_state


def test_write_new_never_overwrites(tmp_path: Path) -> None:
    paths = [write_new(tmp_path, "abc", f"report {n}".encode()) for n in range(1, 4)]
    assert [p.name for p in paths] == ["abc.eml", "abc-2.eml", "abc-3.eml"]
    assert [p.read_text() for p in paths] == ["report 1", "report 2", "report 3"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["abc-2.eml", "abc-3.eml", "abc.eml"]


async def test_a_report_sent_again_keeps_the_first(make_gateway, tmp_path: Path) -> None:
    gw = await make_gateway(base_env(tmp_path / "var"))
    job_id = await send_one(gw)
    await wait_state(gw, job_id, State.REPORTED)
    outbox = tmp_path / "var" / "outbox"
    first = (outbox / f"{job_id}.eml").read_bytes()

    await gw.store.run(request_report, gw.store, job_id, time.time())
    gw.worker.wake()

    async def written() -> bool:
        return (outbox / f"{job_id}-2.eml").exists()

    await gw.worker.wait_for(written, 20)
    assert (outbox / f"{job_id}.eml").read_bytes() == first
    again = (outbox / f"{job_id}-2.eml").read_text()
    assert f"X-Faxgw-Report: {job_id}" in again and "delivered" in again
    assert sorted(p.name for p in outbox.iterdir()) == [f"{job_id}-2.eml", f"{job_id}.eml"]
