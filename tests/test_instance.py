"""One daemon per DATA_DIR (issue 15, item 4) and a pid file the CLI can trust (item 5)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.constants import EXIT_CONFIG
from gateway.runtime.instance import (
    AlreadyRunning,
    DataDirLock,
    process_start_time,
    read_pid_file,
    running_daemon,
)
from testsupport.harness import DaemonProcess

from .conftest import Simulator, job_ids, pdf_mail, production_env, smtp_send


def test_start_time_reads_this_process_and_nothing_for_a_dead_pid(tmp_path: Path) -> None:
    mine = process_start_time(os.getpid())
    assert isinstance(mine, int) and mine > 0
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert process_start_time(child.pid) is None


def test_the_lock_is_exclusive_and_released(tmp_path: Path) -> None:
    first, second = DataDirLock(tmp_path), DataDirLock(tmp_path)
    first.acquire()
    with pytest.raises(AlreadyRunning, match=rf"pid {os.getpid()}\).*DATA_DIR {tmp_path}"):
        second.acquire()
    first.release()
    second.acquire()
    second.release()


async def cli(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("FAXGW_", "SIGNALWIRE_"))}
    full.update(env)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", *args, env=full, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_a_second_daemon_on_the_same_data_dir_is_refused(
        simulator: Simulator, tmp_path: Path) -> None:
    env = production_env(tmp_path / "var", simulator)
    first = DaemonProcess(env, tmp_path / "first.log")
    second = DaemonProcess(dict(env, FAX_QUALITY="standard"), tmp_path / "second.log")
    await first.start()
    try:
        pid_before = read_pid_file(tmp_path / "var")
        assert first.proc is not None and pid_before[0] == first.proc.pid
        with pytest.raises(AssertionError, match="daemon exited early"):
            await second.start(timeout_s=30)
        assert await second.wait_exit() == EXIT_CONFIG
        line = await second.wait_log("cannot start")
        assert f"another faxgw daemon (pid {first.proc.pid}) is already using DATA_DIR" in line
        assert "Traceback" not in second.log_tail()
        # The first daemon keeps its pid file and keeps working; the CLI runs beside it.
        assert read_pid_file(tmp_path / "var") == pid_before
        assert running_daemon(tmp_path / "var") == first.proc.pid
        reply = await smtp_send(first.smtp_port, pdf_mail("15551234567@fax.local"),
                                ["15551234567@fax.local"])
        assert reply.code == 250, reply.text
        code, out, err = await cli(env, "jobs")
        assert code == 0 and job_ids(reply.text)[0] in out, err
    finally:
        await first.close()


async def test_a_stale_pid_file_never_signals_a_stranger(simulator: Simulator,
                                                          tmp_path: Path) -> None:
    data = tmp_path / "var"
    env = production_env(data, simulator, DOCUMENT_RETENTION_HOURS="1")  # resend needs it
    daemon = DaemonProcess(env, tmp_path / "daemon.log")
    await daemon.start()
    reply = await smtp_send(daemon.smtp_port, pdf_mail("15551234567@fax.local"),
                            ["15551234567@fax.local"])
    [job_id] = job_ids(reply.text)
    await daemon.wait_log(f"job {job_id}: reported")
    await daemon.kill9()
    pid, start = read_pid_file(data)
    assert pid is not None and start is not None  # left behind by kill -9
    # The pid now belongs to someone else: a process that SIGUSR1 would kill.
    stranger = subprocess.Popen(["sleep", "60"])
    try:
        for first, content in ((True, f"{stranger.pid} {start}\n"),  # another pid's start
                               (False, f"{stranger.pid}\n")):  # an old file: no start time
            (data / "faxgw.pid").write_text(content)
            outputs = [await cli(env, "report", job_id)]
            if first:  # once is enough: resend makes a new job, which cancel takes back
                outputs.append(await cli(env, "resend", job_id))
                assert outputs[-1][0] == 0, outputs
                outputs.append(await cli(env, "cancel", outputs[-1][1].split()[8]))
            for code, out, err in outputs:
                assert code == 0, err
                assert out.endswith("(the daemon is not running: this takes effect when it "
                                    "next starts)\n"), out
            assert stranger.poll() is None, "the CLI signalled a process that is not faxgw"
    finally:
        stranger.send_signal(signal.SIGTERM)
        stranger.wait()
