"""The gateway as a real process (`python -m gateway run`), for kill -9 and SIGTERM tests."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from pathlib import Path

READY_LINE = "faxgw started"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class DaemonProcess:
    """Fixed ports across restarts, so callback URLs given to SignalWire stay valid."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
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

    async def start(self, crash_at: str | None = None, timeout_s: float = 30) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FAXGW_", "SIGNALWIRE_"))}
        env.update(self.env)
        if crash_at:
            env["FAXGW_CRASH_AT"] = crash_at
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "run", env=env, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        self.starts += 1
        ready = asyncio.get_running_loop().create_future()
        self._pump = asyncio.create_task(self._read_log(ready))
        try:
            await asyncio.wait_for(asyncio.shield(ready), timeout_s)
        except asyncio.TimeoutError:
            raise AssertionError(f"daemon not ready; log:\n{self.log_tail()}") from None

    async def _read_log(self, ready: asyncio.Future[None]) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        with open(self.log_path, "a", encoding="utf-8") as log:
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
