"""What the test suite and the benchmark both need to run the gateway against the sandbox.

One place for it, so tests/ and bench/ cannot drift apart: the simulator's credentials, the
simulator as an HTTP server on a loopback port, the SignalWire settings that point a gateway
at it, free loopback ports, the line a starting daemon logs once it is ready, and the daemon
as a real process (`python -m gateway run`) for kill -9, SIGTERM and restart tests. Nothing
here runs in production, so it is outside the installed package; it is not in tests/ because
bench/ must not import the test suite.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from aiohttp import web

from gateway.sandbox.simulator import SIM_STATE, SimulatorState, create_simulator_app
from testsupport.s3server import ephemeral_range

# The simulator's account; any values work, the gateway is given the same ones.
PROJECT_ID = "0b6f2a1e-5d0c-4a6e-9a51-7e7c1f1d9a00"
API_TOKEN = "PTtesttokenvalue"
SIGNING_KEY = "PSKtestsigningkey0000"
FROM_NUMBER = "+15557654321"

# Logged by the daemon once its listeners are bound (gateway/daemon.py).
READY_LINE = "faxgw started"

# A job id as the 250 reply to DATA quotes it ("Queued as fax job(s) a, b").
JOB_ID = re.compile(r"\b[0-9a-f]{16}\b")


def free_port() -> int:
    """A loopback port free right now, for a process that must keep one port across restarts
    (the callback URLs handed to SignalWire name it); in-process servers bind port 0.

    Drawn below the kernel's ephemeral range, as SeaweedFS's ports are (s3server.py): a port
    that binding port 0 hands out lies in that range, where every outgoing connection takes
    its source port, so one of those could take it before the child process binds it (seen in
    CI as "SMTP_LISTEN=...: Address already in use"). Below the range only another explicit
    bind can, and the port is drawn at random among ~12,000."""
    low, _high = ephemeral_range()
    pool_low, pool_high = (20000, low - 1) if low > 21000 else (11000, 19999)
    rng = secrets.SystemRandom()
    for _ in range(2000):
        port = rng.randint(pool_low, pool_high)
        with socket.socket() as probe:
            # As the child's listener will (asyncio's default): a port in TIME_WAIT is free.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free loopback port in {pool_low}-{pool_high}")


def job_ids(reply_text: str) -> list[str]:
    """The job ids from a '250 2.0.0 Queued as fax job(s) a, b (N pages)' reply."""
    return JOB_ID.findall(reply_text)


def simulator_env(space_url: str) -> dict[str, str]:
    """The settings that send a gateway's faxes to a simulator at `space_url`."""
    return {"SIGNALWIRE_SPACE_URL": space_url, "SIGNALWIRE_PROJECT_ID": PROJECT_ID,
            "SIGNALWIRE_API_TOKEN": API_TOKEN, "SIGNALWIRE_SIGNING_KEY": SIGNING_KEY,
            "FAX_FROM_NUMBER": FROM_NUMBER}


async def start_runner(runner: web.AppRunner, port: int = 0) -> str:
    """Set up `runner` and serve it on 127.0.0.1:`port` (0: a free one); its base URL."""
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return f"http://127.0.0.1:{runner.addresses[0][1]}"


async def serve(app: web.Application, port: int = 0) -> tuple[web.AppRunner, str]:
    """`app` on a loopback port: the runner (to clean up) and the base URL."""
    runner = web.AppRunner(app, access_log=None)
    return runner, await start_runner(runner, port)


class SimulatorServer:
    """The SignalWire simulator as its own HTTP server on a loopback port (port 0).

    `app` may be given middlewares before `start()` (the bench timestamps send POSTs)."""

    def __init__(self, **kwargs: Any) -> None:
        self.app = create_simulator_app(project_id=PROJECT_ID, api_token=API_TOKEN,
                                        signing_key=SIGNING_KEY, **kwargs)
        self.state: SimulatorState = self.app[SIM_STATE]
        self.runner = web.AppRunner(self.app, access_log=None)
        self.url = ""

    async def start(self, port: int = 0) -> None:
        """Serve on `port` (0: a free one); a stopped server may start again on its port."""
        self.url = await start_runner(self.runner, port)

    async def stop(self) -> None:
        await self.runner.cleanup()


def _process_state(pid: int) -> str | None:
    """The process's state letter from /proc (Linux): "T" when stopped by a signal; None once
    it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    return fields[0] if fields else None


class DaemonProcess:
    """`python -m gateway run` as a child process, its stderr kept in a log file and in memory.

    SMTP and HTTP ports are chosen once and kept across restarts, so callback URLs given to
    SignalWire stay valid. FAXGW_* and SIGNALWIRE_* variables of the calling environment are
    not inherited (nor those starting with one of `hide`): the daemon sees only the settings it
    is given, in `env` or in a file named by `args` (`--config PATH`)."""

    def __init__(self, env: dict[str, str], log_path: Path, *, args: tuple[str, ...] = (),
                 hide: tuple[str, ...] = ()) -> None:
        self.args = args
        self.hide = ("FAXGW_", "SIGNALWIRE_", *hide)
        self.smtp_port = free_port()
        self.http_port = free_port()
        self.env = dict(env, SMTP_LISTEN=f"127.0.0.1:{self.smtp_port}",
                        HTTP_LISTEN=f"127.0.0.1:{self.http_port}")
        self.log_path = log_path
        self.proc: asyncio.subprocess.Process | None = None
        self._pump: asyncio.Task[None] | None = None
        self.starts = 0
        self.lines: list[str] = []
        self._new_line = asyncio.Condition()

    async def start(self, crash_at: str | None = None, timeout_s: float = 30,
                    pause_at: str | None = None) -> None:
        """Start and wait for READY_LINE; `crash_at` names a FAXGW_CRASH_AT point, `pause_at`
        a FAXGW_PAUSE_AT point (see wait_paused)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(self.hide)}
        env.update(self.env)
        if crash_at:
            env["FAXGW_CRASH_AT"] = crash_at
        if pause_at:
            env["FAXGW_PAUSE_AT"] = pause_at
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "run", *self.args, env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        self.starts += 1
        ready = asyncio.get_running_loop().create_future()
        self._pump = asyncio.create_task(self._read_log(ready))
        try:
            await asyncio.wait_for(asyncio.shield(ready), timeout_s)
        except TimeoutError:
            raise AssertionError(f"daemon not ready; log:\n{self.log_tail()}") from None

    async def _read_log(self, ready: asyncio.Future[None]) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        with open(self.log_path, "a", encoding="utf-8") as log:  # noqa: ASYNC230 - a pump task
            log.write(f"--- start {self.starts} ---\n")
            async for raw in self.proc.stderr:
                line = raw.decode("utf-8", "replace")
                log.write(line)
                log.flush()
                async with self._new_line:
                    self.lines.append(line)
                    self._new_line.notify_all()
                if READY_LINE in line and not ready.done():
                    ready.set_result(None)
        if not ready.done():
            ready.set_exception(AssertionError(f"daemon exited early:\n{self.log_tail()}"))

    async def wait_log(self, text: str, timeout_s: float = 30) -> str:
        """Wait for a log line containing `text` (from any start of this daemon)."""
        def found() -> str | None:
            return next((line for line in self.lines if text in line), None)

        async with asyncio.timeout(timeout_s):
            async with self._new_line:
                await self._new_line.wait_for(lambda: found() is not None)
        line = found()
        assert line is not None
        return line

    async def wait_paused(self, point: str, timeout_s: float = 30) -> str:
        """Wait until the daemon has stopped itself at the FAXGW_PAUSE_AT point `point` (it was
        started with pause_at=point): its log line says so, and the kernel shows the process
        stopped. Returns what it holds there, as the line names it ("job ...",
        "inbound fax ..."). `resume` continues it."""
        mark = f"FAXGW_PAUSE_AT={point} ("
        line = await self.wait_log(mark, timeout_s)
        assert self.proc is not None
        async with asyncio.timeout(timeout_s):  # the line is said just before the SIGSTOP
            while (state := _process_state(self.proc.pid)) != "T":
                assert state not in (None, "Z"), f"daemon gone while pausing:\n{self.log_tail()}"
                await asyncio.sleep(0.005)
        return line.split(mark, 1)[1].split(")", 1)[0]

    def resume(self) -> None:
        """SIGCONT: a paused (stopped) daemon runs on from where it stopped."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "".join(self.log_path.read_text().splitlines(True)[-lines:])
        except OSError:
            return ""

    async def wait_exit(self, timeout_s: float = 30) -> int:
        assert self.proc is not None
        code = await asyncio.wait_for(self.proc.wait(), timeout_s)
        if self._pump is not None:
            await self._pump
        return code

    async def kill9(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)
            await self.wait_exit()

    async def terminate(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return await self.wait_exit()

    async def close(self) -> None:
        await self.kill9()
