"""The database deleted, replaced or damaged under the gateway (issue 15, item 3); a full disk
and ALLOWED_SENDERS='*' (item 11)."""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from gateway.cli import main
from gateway.config import ConfigError, settings_from
from gateway.constants import EXIT_CONFIG, EXIT_DATA
from gateway.store.health import Guard
from testsupport.harness import DaemonProcess

from .conftest import Simulator, base_env, job_ids, pdf_mail, production_env, smtp_send


async def readyz(port: int) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/readyz") as resp:
            return resp.status, await resp.json()


async def send(port: int) -> tuple[int, str]:
    reply = await smtp_send(port, pdf_mail("15551234567@fax.local"), ["15551234567@fax.local"])
    return reply.code, reply.text


async def test_a_deleted_database_stops_intake_and_readiness(
        make_gateway, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    gw = await make_gateway(base_env(tmp_path / "var"))
    fatal: list[str] = []
    gw.on_fatal = fatal.append
    code, text = await send(gw.smtp.port)
    assert code == 250, text
    status, body = await readyz(gw.web.port)
    assert status == 200 and body["checks"]["store"]["ok"], body

    (tmp_path / "var" / "faxgw.sqlite3").unlink()
    with caplog.at_level(logging.ERROR, logger="gateway.store.health"):
        for _ in range(3):
            code, text = await send(gw.smtp.port)
            assert (code, text) == (451, "4.3.0 Temporary failure: the gateway's job database "
                                         "is unavailable; please try again later")
    status, body = await readyz(gw.web.port)
    assert status == 503
    assert body["checks"]["store"] == {
        "ok": False, "detail": f"the job database {tmp_path / 'var' / 'faxgw.sqlite3'} was "
                               "deleted while the gateway ran"}
    # Said once, not per mail; the daemon is told to stop once.
    errors = [r for r in caplog.records if r.name == "gateway.store.health"]
    assert len(errors) == 1 and "was deleted" in errors[0].getMessage()
    assert len(fatal) == 1


async def test_a_replaced_database_is_noticed(make_gateway, tmp_path: Path) -> None:
    gw = await make_gateway(base_env(tmp_path / "var"))
    db = tmp_path / "var" / "faxgw.sqlite3"
    shutil.copy(db, tmp_path / "copy.sqlite3")
    os.replace(tmp_path / "copy.sqlite3", db)  # a restore over a running daemon
    code, text = await send(gw.smtp.port)
    assert code == 451 and "4.3.0" in text
    status, body = await readyz(gw.web.port)
    assert status == 503 and "was replaced by another file" in body["checks"]["store"]["detail"]


async def test_the_daemon_exits_65_when_its_database_goes(simulator: Simulator,
                                                          tmp_path: Path) -> None:
    daemon = DaemonProcess(production_env(tmp_path / "var", simulator), tmp_path / "d.log")
    await daemon.start()
    try:
        (tmp_path / "var" / "faxgw.sqlite3").unlink()
        code, text = await send(daemon.smtp_port)  # finds it at once (so does a 5 s check)
        assert code == 451, text
        assert await daemon.wait_exit(60) == EXIT_DATA
        line = await daemon.wait_log("faxgw stopped because")
        assert "was deleted while the gateway ran" in line and "restore the database" in line
        assert "Traceback" not in daemon.log_tail(200)
    finally:
        await daemon.close()


def corrupt(path: Path) -> None:
    """A real database with jobs in it, then a page in the middle overwritten."""
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE filler (x TEXT)")
    db.executemany("INSERT INTO filler VALUES (?)", [("x" * 500,)] * 200)
    db.commit()
    db.close()
    with open(path, "r+b") as f:
        f.seek(4096 * 3)
        f.write(os.urandom(4096 * 4))


@pytest.mark.parametrize("damage", ["garbage", "pages"])
async def test_a_damaged_database_is_named_and_not_restarted(
        simulator: Simulator, tmp_path: Path, damage: str) -> None:
    data = tmp_path / "var"
    data.mkdir()
    db = data / "faxgw.sqlite3"
    if damage == "garbage":
        db.write_bytes(b"this is not a database\n" * 500)
    else:
        corrupt(db)
    daemon = DaemonProcess(production_env(data, simulator), tmp_path / "d.log")
    with pytest.raises(AssertionError, match="exited early"):
        await daemon.start()
    assert await daemon.wait_exit() == EXIT_DATA
    line = await daemon.wait_log("cannot start")
    assert f"the job database {db} is damaged" in line and "restore the database" in line
    assert "Traceback" not in daemon.log_tail(200)
    assert not (data / "faxgw.pid").exists()

    env = {k: v for k, v in os.environ.items() if not k.startswith(("FAXGW_", "SIGNALWIRE_"))}
    env.update(daemon.env)
    cli = subprocess.run([sys.executable, "-m", "gateway", "jobs"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert cli.returncode == EXIT_DATA, cli.stderr
    assert cli.stderr.startswith("faxgw: the job database") and "damaged" in cli.stderr
    assert "Traceback" not in cli.stderr


def test_the_unit_does_not_restart_on_these_statuses() -> None:
    unit = (Path(__file__).parent.parent / "systemd" / "faxgw.service").read_text()
    [line] = [x for x in unit.splitlines() if x.startswith("RestartPreventExitStatus=")]
    assert {str(EXIT_CONFIG), str(EXIT_DATA)} <= set(line.split("=", 1)[1].split())


async def test_a_full_disk_makes_readiness_fail_and_intake_answer_451(
        make_gateway, tmp_path: Path) -> None:
    # No small filesystem can be mounted without root here: ask for more room than the real
    # filesystem has, which is the same condition seen from the gateway.
    free_mb = shutil.disk_usage(tmp_path).free // (1024 * 1024)
    gw = await make_gateway(base_env(tmp_path / "var", MIN_FREE_DISK_MB=str(free_mb + 10_000)))
    code, text = await send(gw.smtp.port)
    assert (code, text) == (451, "4.3.1 Insufficient system storage: the gateway's disk is "
                                 "nearly full; please try again later")
    status, body = await readyz(gw.web.port)
    assert status == 503 and not body["checks"]["disk"]["ok"]
    assert f"below MIN_FREE_DISK_MB={free_mb + 10_000}" in body["checks"]["disk"]["detail"]
    assert body["checks"]["store"]["ok"]
    assert list((tmp_path / "var" / "spool").iterdir()) == []

    # Room again (the operator lowered the threshold here; freeing space is the same thing).
    gw.guard.min_free_bytes = 1
    code, text = await send(gw.smtp.port)
    assert code == 250 and job_ids(text), text
    status, body = await readyz(gw.web.port)
    assert status == 200 and body["checks"]["disk"]["detail"].endswith("MB free in DATA_DIR")


def test_the_disk_check_logs_once_per_change(tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    free_mb = shutil.disk_usage(tmp_path).free // (1024 * 1024)
    guard = Guard(tmp_path / "db", tmp_path, free_mb + 10_000)
    with caplog.at_level(logging.INFO, logger="gateway.store.health"):
        assert all(guard.check_disk() for _ in range(5))
        guard.min_free_bytes = 1
        assert guard.check_disk() is None and guard.check_disk() is None
    assert [r.levelname for r in caplog.records] == ["ERROR", "INFO"]


@pytest.mark.parametrize("pattern", ["*", "*@*", "*.*", "example.com,*"])
def test_allowed_senders_matching_everyone_is_refused(tmp_path: Path, pattern: str) -> None:
    with pytest.raises(ConfigError) as err:
        settings_from(base_env(tmp_path, ALLOWED_SENDERS=pattern))
    [problem] = [p for p in err.value.problems if p.startswith("ALLOWED_SENDERS")]
    assert "lets anyone fax who writes any sender address" in problem


@pytest.mark.parametrize("pattern", ["*@example.com", "*.example.com", "scan-*@x.com"])
def test_allowed_senders_for_a_domain_still_pass(tmp_path: Path, pattern: str) -> None:
    assert settings_from(base_env(tmp_path, ALLOWED_SENDERS=pattern)).access.allowed_senders


def test_allowed_senders_star_exits_78(tmp_path: Path, monkeypatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    env_file = tmp_path / "faxgw.env"
    env_file.write_text("ALLOWED_SENDERS=*\n")
    monkeypatch.delenv("FAXGW_ENV_FILE", raising=False)
    monkeypatch.delenv("ALLOWED_SENDERS", raising=False)
    with pytest.raises(SystemExit) as exited:
        main(["run", "--check", "--config", str(env_file)])
    assert exited.value.code == EXIT_CONFIG
    assert "ALLOWED_SENDERS: '*' lets anyone fax" in capsys.readouterr().err


def test_min_free_disk_mb_is_a_setting(tmp_path: Path) -> None:
    assert settings_from(base_env(tmp_path)).queue.min_free_disk_mb == 100
    assert settings_from(base_env(tmp_path, MIN_FREE_DISK_MB="0")).queue.min_free_disk_mb == 0
    with pytest.raises(ConfigError, match="MIN_FREE_DISK_MB"):
        settings_from(base_env(tmp_path, MIN_FREE_DISK_MB="-1"))
