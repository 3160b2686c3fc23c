"""kill -9 and SIGTERM against the real daemon process; the simulator and the report relay run
in the test process, so they outlive every crash and count what really went out."""

from __future__ import annotations

import asyncio
import random
import signal
import smtplib
import sqlite3
from pathlib import Path

import pytest

from testsupport.harness import DaemonProcess

from .conftest import (
    RelaySink,
    Simulator,
    _send_blocking,
    job_ids,
    pdf_mail,
    production_env,
    smtp_send,
)


def daemon_env(tmp_path: Path, simulator: Simulator, relay: RelaySink,
               **extra: str) -> dict[str, str]:
    return production_env(tmp_path / "var", simulator, NOTIFY_SMTP_HOST="127.0.0.1",
                          NOTIFY_SMTP_PORT=str(relay.port), NOTIFY_SMTP_TLS="none",
                          SIGNALWIRE_TIMEOUT_SECONDS="1", STATUS_POLL_SECONDS="0.5",
                          RETRY_BASE_SECONDS="0.1", RETRY_MAX_SECONDS="1", **extra)


def job_states(data_dir: Path) -> dict[str, str]:
    with sqlite3.connect(f"file:{data_dir / 'faxgw.sqlite3'}?mode=ro", uri=True) as db:
        return dict(db.execute("SELECT id, state FROM jobs").fetchall())


async def send_pdf(port: int, number: str = "15551234567") -> list[str]:
    """Send one mail; [] when the daemon died before answering DATA."""
    try:
        reply = await smtp_send(port, pdf_mail(f"{number}@fax.local"), [f"{number}@fax.local"])
    except (smtplib.SMTPServerDisconnected, ConnectionError):
        return []
    assert reply.code == 250, reply.text
    return job_ids(reply.text)


async def finish(daemon: DaemonProcess, simulator: Simulator, relay: RelaySink,
                 reports: int) -> list:
    """Collect the expected reports, then stop the daemon cleanly and check nothing is left."""
    got = [await relay.next(60) for _ in range(reports)]
    await simulator.state.wait_idle(30)
    assert await daemon.terminate() == 0, daemon.log_tail()
    assert relay.messages.empty(), "a job was reported twice"
    return got


@pytest.mark.parametrize("point", ["after-commit", "after-upload", "after-send",
                                   "before-report"])
async def test_kill9_at_each_stage_sends_once_and_reports_once(
        point: str, simulator: Simulator, relay: RelaySink, tmp_path: Path) -> None:
    daemon = DaemonProcess(daemon_env(tmp_path, simulator, relay), tmp_path / "daemon.log")
    try:
        await daemon.start(crash_at=point)
        ids = await send_pdf(daemon.smtp_port)
        assert await daemon.wait_exit() == -signal.SIGKILL
        # after-commit dies before the 250 (the client would retry: the SMTP duplicate window);
        # every other point dies after it.
        assert (ids == []) == (point == "after-commit")
        await daemon.start()
        [report] = await finish(daemon, simulator, relay, 1)
    finally:
        await daemon.close()
    assert "delivered" in report["Subject"]
    assert len(simulator.state.faxes) == 1
    assert list(job_states(tmp_path / "var").values()) == ["reported"]


async def test_kill9_right_after_250(simulator: Simulator, relay: RelaySink,
                                     tmp_path: Path) -> None:
    daemon = DaemonProcess(daemon_env(tmp_path, simulator, relay), tmp_path / "daemon.log")
    try:
        await daemon.start()
        [job_id] = await send_pdf(daemon.smtp_port)
        await daemon.kill9()
        await daemon.start()
        await finish(daemon, simulator, relay, 1)
    finally:
        await daemon.close()
    assert len(simulator.state.faxes) == 1
    assert job_states(tmp_path / "var") == {job_id: "reported"}


async def test_kill9_while_the_send_post_is_unanswered(simulator: Simulator, relay: RelaySink,
                                                       tmp_path: Path) -> None:
    """SignalWire got the POST and queued the fax, the answer never reached us."""
    simulator.state.hang_next_send = 1
    daemon = DaemonProcess(daemon_env(tmp_path, simulator, relay), tmp_path / "daemon.log")
    try:
        await daemon.start()
        await send_pdf(daemon.smtp_port)
        await simulator.state.wait_faxes(1)
        await daemon.kill9()
        await daemon.start()
        simulator.state.release_hung()  # SignalWire goes on: fetches the media, calls back
        [report] = await finish(daemon, simulator, relay, 1)
    finally:
        simulator.state.release_hung()
        await daemon.close()
    assert "delivered" in report["Subject"]
    assert len(simulator.state.send_requests) == 1
    assert len(simulator.state.faxes) == 1


async def test_sigterm_finishes_open_transaction_refuses_new_and_resumes(
        simulator: Simulator, relay: RelaySink, tmp_path: Path) -> None:
    daemon = DaemonProcess(daemon_env(tmp_path, simulator, relay), tmp_path / "daemon.log")
    try:
        await daemon.start()
        client = await asyncio.to_thread(smtplib.SMTP, "127.0.0.1", daemon.smtp_port,
                                         timeout=30)
        try:
            await asyncio.to_thread(client.ehlo, "mfp.test")
            assert (await asyncio.to_thread(client.mail, "alice@example.com"))[0] == 250
            assert (await asyncio.to_thread(client.rcpt, "15551234567@fax.local"))[0] == 250
            daemon.proc.send_signal(signal.SIGTERM)
            await daemon.wait_log("shutting down")
            # A new session is turned away with 421 while the open one may finish.
            with pytest.raises(smtplib.SMTPConnectError) as refused:
                await asyncio.to_thread(smtplib.SMTP, "127.0.0.1", daemon.smtp_port, timeout=10)
            assert refused.value.smtp_code == 421
            assert refused.value.smtp_error.startswith(b"4.3.2 ")
            msg = pdf_mail("15551234567@fax.local")
            data = msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))
            code, text = await asyncio.to_thread(client.data, data)
            assert code == 250, text
        finally:
            await asyncio.to_thread(client.close)
        assert await daemon.wait_exit() == 0
        assert "faxgw stopped" in daemon.log_tail()
        await daemon.start()
        await finish(daemon, simulator, relay, 1)
    finally:
        await daemon.close()
    assert len(simulator.state.faxes) == 1


@pytest.mark.slow
@pytest.mark.timeout(900)  # 40 mails through random kills; reports may each wait up to 120 s
async def test_chaos_random_kills_lose_nothing_and_send_nothing_twice(
        simulator: Simulator, relay: RelaySink, tmp_path: Path) -> None:
    """Many mails, the daemon killed with SIGKILL at random moments, then left to finish."""
    rng = random.Random(20261126)
    numbers = [f"1555123{n:04d}" for n in range(5, 45)]
    daemon = DaemonProcess(daemon_env(tmp_path, simulator, relay), tmp_path / "daemon.log")
    accepted: list[str] = []
    kills = 0
    try:
        await daemon.start()
        for number in numbers:
            try:
                reply = await asyncio.to_thread(
                    _send_blocking, daemon.smtp_port, pdf_mail(f"{number}@fax.local"),
                    "alice@example.com", [f"{number}@fax.local"])
                if reply.code == 250:
                    accepted += job_ids(reply.text)
            except (smtplib.SMTPException, ConnectionError):
                pass  # died mid-transaction: no 250, so the sender would retry
            if rng.random() < 0.3:
                await asyncio.sleep(rng.uniform(0, 0.5))  # let work get under way, then...
                await daemon.kill9()
                kills += 1
                await daemon.start()
        states = job_states(tmp_path / "var")
        reports = []
        while {r["X-Faxgw-Job"] for r in reports} != set(states):  # a report for every job
            reports.append(await relay.next(120))
        await simulator.state.wait_idle(60)
        assert await daemon.terminate() == 0
    finally:
        await daemon.close()
    states = job_states(tmp_path / "var")
    while not relay.messages.empty():
        reports.append(relay.messages.get_nowait())
    sent_to = [f.to for f in simulator.state.faxes.values()]
    by_job: dict[str, set[str]] = {}
    for report in reports:
        by_job.setdefault(report["X-Faxgw-Job"], set()).add(report["Message-ID"])
    print(f"\nchaos: {len(numbers)} mails, {len(accepted)} answered 250, {len(states)} jobs, "
          f"{kills} kills, {len(sent_to)} faxes, {len(reports)} reports "
          f"({len(reports) - len(by_job)} repeated)")
    assert set(accepted) <= set(states)  # every 250 became a job
    assert set(states.values()) == {"reported"}
    assert len(sent_to) == len(set(sent_to)) == len(states)  # one fax per job, none twice
    # Every job reported. A kill between the relay's 250 and our commit repeats a report (SMTP
    # cannot do exactly-once): the copy carries the same Message-ID, so mail systems fold it.
    assert set(by_job) == set(states)
    assert all(len(ids) == 1 for ids in by_job.values())
