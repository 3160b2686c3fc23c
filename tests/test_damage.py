"""The database file damaged under a running daemon (issue 15, item 3, after start): a query in
intake or the worker that meets SQLITE_CORRUPT takes the deleted-database path: 451 to mail,
one log line, /readyz 503, and the daemon stops with EXIT_DATA (65), without a traceback.

The damage is real: pages in the middle of the live SQLite file are overwritten with random
bytes, after another connection's write and checkpoint (as the CLI's would) made the daemon's
connection drop its page cache, so its next query reads the damaged pages from disk."""

from __future__ import annotations

import asyncio
import logging
import os
import smtplib
import sqlite3
from pathlib import Path

import aiohttp
import pytest

from gateway.constants import EXIT_DATA
from testsupport.harness import DaemonProcess

from .conftest import Simulator, base_env, pdf_mail, production_env, smtp_send

UNAVAILABLE = (451, "4.3.0 Temporary failure: the gateway's job database is unavailable; "
                    "please try again later")


def damage_live_database(path: Path) -> None:
    """Another connection writes and checkpoints everything into the main file (the daemon's
    connection sees the WAL changed and drops its cache); then every page but the first and
    the last is overwritten with random bytes."""
    db = sqlite3.connect(path, timeout=10)
    try:
        db.execute("CREATE TABLE IF NOT EXISTS filler (x TEXT)")
        db.executemany("INSERT INTO filler VALUES (?)", [("x" * 500,)] * 50)
        db.commit()
        busy, _log, _done = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        assert busy == 0, "the checkpoint could not finish"
        page = db.execute("PRAGMA page_size").fetchone()[0]
    finally:
        db.close()
    pages = path.stat().st_size // page
    assert pages > 4, pages
    with open(path, "r+b") as f:
        f.seek(page)
        f.write(os.urandom(page * (pages - 2)))
        f.flush()
        os.fsync(f.fileno())


async def send(port: int) -> tuple[int, str]:
    reply = await smtp_send(port, pdf_mail("15551234567@fax.local"), ["15551234567@fax.local"])
    return reply.code, reply.text


async def readyz(port: int) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/readyz") as resp:
            return resp.status, await resp.json()


async def test_damage_found_by_intake_refuses_mail_and_stops(
        make_gateway, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    gw = await make_gateway(base_env(tmp_path / "var"))
    stopped = asyncio.Event()
    fatal: list[str] = []
    gw.on_fatal = lambda reason: (fatal.append(reason), stopped.set())
    code, text = await send(gw.smtp.port)
    assert code == 250, text
    await gw.worker.stop(grace_s=5)  # intake alone meets the damage here
    path = tmp_path / "var" / "faxgw.sqlite3"
    damage_live_database(path)
    with caplog.at_level(logging.DEBUG):
        for _ in range(3):
            assert await send(gw.smtp.port) == UNAVAILABLE
        await asyncio.wait_for(stopped.wait(), 10)
        status, body = await readyz(gw.web.port)
    assert status == 503
    detail = body["checks"]["store"]["detail"]
    assert detail.startswith(f"the job database {path} is damaged (") and "while the gateway ran" \
        in detail
    # One line says it (not one per mail, no traceback); the daemon is told to stop once.
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    assert errors[0].name == "gateway.store.health" and "refusing mail (451)" in \
        errors[0].getMessage() and "restore the database" in errors[0].getMessage()
    assert not [r for r in caplog.records if r.exc_info]
    assert fatal == [detail]
    assert len(list((tmp_path / "var" / "spool").rglob("*.pdf"))) == 1  # only the first mail's


async def test_damage_found_by_the_worker_stops_the_daemon(
        make_gateway, tmp_path: Path, simulator: Simulator,
        caplog: pytest.LogCaptureFixture) -> None:
    gw = await make_gateway(production_env(tmp_path / "var", simulator))
    stopped = asyncio.Event()
    gw.on_fatal = lambda reason: stopped.set()
    damage_live_database(tmp_path / "var" / "faxgw.sqlite3")
    with caplog.at_level(logging.DEBUG):
        gw.worker.wake()  # its next look at the queue reads the damaged pages
        await asyncio.wait_for(stopped.wait(), 30)
    assert gw.guard.database_problem is not None and "is damaged" in gw.guard.database_problem
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.name for r in errors] == ["gateway.store.health"]
    assert not [r for r in caplog.records if r.exc_info]
    assert await send(gw.smtp.port) == UNAVAILABLE


async def test_the_daemon_exits_65_when_its_database_is_damaged(simulator: Simulator,
                                                                tmp_path: Path) -> None:
    daemon = DaemonProcess(production_env(tmp_path / "var", simulator), tmp_path / "d.log")
    await daemon.start()
    try:
        damage_live_database(tmp_path / "var" / "faxgw.sqlite3")
        # The mail meets the damage, unless the daemon's own first look at its queue just
        # did (then it is already stopping, and its listener closed): never a 250.
        try:
            assert await send(daemon.smtp_port) == UNAVAILABLE
        except (ConnectionError, smtplib.SMTPServerDisconnected):
            pass
        except smtplib.SMTPConnectError as exc:  # greeted while stopping: 421, no 250 either
            assert exc.smtp_code == 421, exc
        assert await daemon.wait_exit(60) == EXIT_DATA
        line = await daemon.wait_log("faxgw stopped because")
        assert "is damaged" in line and "restore the database" in line
        tail = daemon.log_tail(200)
        assert "Traceback" not in tail
        assert tail.count("refusing mail (451)") == 1
    finally:
        await daemon.close()
