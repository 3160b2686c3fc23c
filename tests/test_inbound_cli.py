"""`faxgw receive-sample` against the sandbox daemon as a real process (the simulator inside
it rings it over HTTP), then `faxgw received` lists the fax with its direction."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from testsupport.harness import DaemonProcess

from .conftest import base_env


async def faxgw(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("FAXGW_", "SIGNALWIRE_"))}
    full.update(env)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", *args, env=full, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_receive_sample_lands_in_the_outbox(tmp_path: Path) -> None:
    env = base_env(tmp_path / "var", INBOUND_ROUTES="*=frontdesk@example.com")
    daemon = DaemonProcess(env, tmp_path / "daemon.log")
    try:
        await daemon.start()
        code, out, err = await faxgw(daemon.env, "receive-sample", "--to", "+15550100000")
        assert code == 0, out + err
        assert "received by the gateway" in out
        [line] = [x for x in out.splitlines() if x.startswith("mail written to")]
        mail = Path(line.split(" to ", 1)[1]).read_bytes()
        assert b"Subject: Fax from +1 212-555-0147, 1 page" in mail
        assert b"To: frontdesk@example.com" in mail
        code, out, err = await faxgw(daemon.env, "received")
        assert code == 0, err
        [row] = out.splitlines()[1:]
        assert row.startswith("in ") and "+12125550147" in row and "received" in row
        assert await daemon.terminate() == 0
    finally:
        await daemon.close()


async def test_receive_sample_on_an_unrouted_number_says_rejected(tmp_path: Path) -> None:
    env = base_env(tmp_path / "var")
    daemon = DaemonProcess(env, tmp_path / "daemon.log")
    try:
        await daemon.start()
        code, out, _err = await faxgw(daemon.env, "receive-sample", "--to", "+15550100000")
        assert code == 1 and "<Reject/>" in out and "INBOUND_ROUTES" in out
    finally:
        await daemon.close()
