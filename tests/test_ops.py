"""The operator's view against a live daemon process: the CLI on its database, /healthz,
/readyz, /metrics, sd_notify READY/STOPPING, SIGUSR1 nudges, check-config."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from testsupport.harness import DaemonProcess

from .conftest import RelaySink, Simulator, job_ids, pdf_mail, production_env, smtp_send


def cli_env(daemon: DaemonProcess) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FAXGW_", "SIGNALWIRE_"))}
    env.update(daemon.env)
    return env


async def faxgw(daemon: DaemonProcess, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", *args, env=cli_env(daemon),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


@pytest.fixture
async def live(simulator: Simulator, relay: RelaySink, tmp_path: Path):
    env = production_env(tmp_path / "var", simulator, NOTIFY_SMTP_HOST="127.0.0.1",
                         NOTIFY_SMTP_PORT=str(relay.port), NOTIFY_SMTP_TLS="none",
                         DOCUMENT_RETENTION_HOURS="1", METRICS_TOKEN="metrics-secret-token")
    daemon = DaemonProcess(env, tmp_path / "daemon.log")
    await daemon.start()
    yield daemon
    await daemon.close()


async def test_cli_against_a_live_daemon(live: DaemonProcess, simulator: Simulator,
                                         relay: RelaySink) -> None:
    reply = await smtp_send(live.smtp_port, pdf_mail("15551234567@fax.local"),
                            ["15551234567@fax.local"])
    [job_id] = job_ids(reply.text)
    first = await relay.next()
    assert "delivered" in first["Subject"]

    code, out, _ = await faxgw(live, "jobs")
    assert code == 0
    header, row = out.splitlines()[:2]
    for column in ("ID", "CREATED", "SENDER", "TO", "STATUS", "PAGES", "LAST EVENT"):
        assert column in header
    assert row.startswith(job_id) and "+15551234567" in row and "reported/delivered" in row

    code, out, _ = await faxgw(live, "jobs", "--json", "--to", "4567")
    assert [r["id"] for r in json.loads(out)] == [job_id]
    code, out, _ = await faxgw(live, "jobs", "--csv")
    [audit] = list(csv.DictReader(io.StringIO(out)))
    assert (audit["job_id"], audit["envelope_from"], audit["destination"], audit["fax_status"]) \
        == (job_id, "alice@example.com", "+15551234567", "delivered")

    code, out, _ = await faxgw(live, "job", job_id[:8])
    assert code == 0
    fax_sid = next(iter(simulator.state.faxes))
    for expected in (job_id, fax_sid, "Invoice 42", "received", "submitted", "final",
                     "reported"):
        assert expected in out, expected

    # report again: the daemon is nudged (SIGUSR1) and sends it at once, without redialling
    code, out, _ = await faxgw(live, "report", job_id)
    assert code == 0, out
    again = await relay.next()
    assert again["Subject"] == first["Subject"]
    assert len(simulator.state.faxes) == 1

    # resend: a new job for the same document and number
    code, out, _ = await faxgw(live, "resend", job_id)
    assert code == 0, out
    [new_id] = [w for w in out.split() if len(w) == 16 and w != job_id]
    assert "delivered" in (await relay.next())["Subject"]
    await simulator.state.wait_idle()
    assert len(simulator.state.faxes) == 2

    code, _, err = await faxgw(live, "job", "ffffffffffff")
    assert code == 1 and err.startswith("faxgw: ")


async def test_cancel_while_queued_at_signalwire(live: DaemonProcess, simulator: Simulator,
                                                 relay: RelaySink) -> None:
    simulator.state.hold_queue()
    reply = await smtp_send(live.smtp_port, pdf_mail("15551234567@fax.local"),
                            ["15551234567@fax.local"])
    [job_id] = job_ids(reply.text)
    await simulator.state.wait_faxes(1)
    await live.wait_log(f"job {job_id} attempt 1: submitted")
    code, out, err = await faxgw(live, "cancel", job_id)
    assert code == 0, err
    report = await relay.next()
    assert report["Subject"] == "Fax to +1 555-123-4567 not delivered: the fax was canceled"
    [fax] = simulator.state.faxes.values()
    assert fax.status == "canceled"


async def test_health_readiness_and_metrics(live: DaemonProcess, relay: RelaySink) -> None:
    base = f"http://127.0.0.1:{live.http_port}"
    reply = await smtp_send(live.smtp_port, pdf_mail("15551234567@fax.local"),
                            ["15551234567@fax.local"])
    assert reply.code == 250
    refused = await smtp_send(live.smtp_port, pdf_mail("x@example.org"), ["x@example.org"])
    assert refused.code == 550
    await relay.next()
    async with aiohttp.ClientSession() as http:
        async with http.get(base + "/healthz") as resp:
            assert resp.status == 200 and (await resp.json())["status"] == "ok"
        async with http.get(base + "/readyz") as resp:
            body = await resp.json()
            assert resp.status == 200, body
            assert set(body["checks"]) == {"store", "disk", "listeners", "media", "signalwire"}
            assert body["checks"]["signalwire"]["detail"].startswith("send ok")
        async with http.get(base + "/metrics") as resp:
            assert resp.status == 401  # METRICS_TOKEN is set
        async with http.get(base + "/metrics",
                            headers={"Authorization": "Bearer metrics-secret-token"}) as resp:
            assert resp.status == 200
            text = await resp.text()
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
              for line in text.splitlines() if line and not line.startswith("#")}
    assert values["faxgw_mails_accepted_total"] == 1
    assert values['faxgw_mails_refused_total{reason="relay_denied"}'] == 1
    assert values['faxgw_fax_outcomes_total{status="delivered"}'] == 1
    assert values["faxgw_fax_attempts_total"] == 1
    assert values['faxgw_jobs{state="reported"}'] == 1
    assert values["faxgw_queue_depth"] == 0
    assert values["faxgw_fax_end_to_end_seconds_count"] == 1
    assert "metrics-secret-token" not in live.log_path.read_text()


async def test_sd_notify_ready_and_stopping(simulator: Simulator, relay: RelaySink,
                                            tmp_path: Path) -> None:
    sock_path = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(sock_path))
    listener.setblocking(False)
    env = production_env(tmp_path / "var", simulator, NOTIFY_SOCKET=str(sock_path))
    daemon = DaemonProcess(env, tmp_path / "daemon.log")
    loop = asyncio.get_running_loop()
    try:
        await daemon.start()
        ready = (await asyncio.wait_for(loop.sock_recv(listener, 4096), 10)).decode()
        assert "READY=1" in ready and f"SMTP port {daemon.smtp_port}" in ready
        assert await daemon.terminate() == 0
        messages = []
        while "STOPPING=1" not in "".join(messages):
            messages.append((await asyncio.wait_for(loop.sock_recv(listener, 4096),
                                                    10)).decode())
    finally:
        listener.close()
        await daemon.close()


async def test_check_config_reports_each_service(tmp_path: Path, simulator: Simulator,
                                                 relay: RelaySink) -> None:
    env = production_env(tmp_path / "var", simulator, NOTIFY_SMTP_HOST="127.0.0.1",
                         NOTIFY_SMTP_PORT=str(relay.port), NOTIFY_SMTP_TLS="none")
    daemon = DaemonProcess(env, tmp_path / "log")
    code, out, _ = await faxgw(daemon, "check-config")
    assert code == 0, out
    assert "SignalWire API: OK credentials accepted" in out
    assert "report relay: OK 127.0.0.1" in out
    assert "S3 media store: SKIP" in out
    daemon.env["SIGNALWIRE_API_TOKEN"] = "wrong"
    code, out, _ = await faxgw(daemon, "check-config")
    assert code == 69
    assert "SignalWire API: FAIL the gateway's SignalWire credentials were refused" in out
    daemon.env["FAX_QUALITY"] = "ultra"
    code, _, err = await faxgw(daemon, "check-config")
    assert code == 78 and "FAX_QUALITY" in err


async def test_port_in_use_exits_69_with_a_clear_line(tmp_path: Path) -> None:
    from .conftest import base_env

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FAXGW_", "SIGNALWIRE_"))}
        env.update(base_env(tmp_path / "var", SMTP_LISTEN=f"127.0.0.1:{port}"))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "run", env=env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE)
        _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 69
    assert f"cannot start: SMTP_LISTEN=127.0.0.1:{port}: Address already in use" in err.decode()
