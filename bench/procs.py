"""Child processes the bench owns, and what /proc says about a process.

Every child gets PR_SET_PDEATHSIG (it dies with the bench, even on SIGKILL) and its own
session (a Ctrl-C at the terminal reaches only the bench, which then stops its children in
order). Children are stopped by their own pid, never by name.
"""

from __future__ import annotations

import asyncio
import atexit
import ctypes
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

CLK_TCK = os.sysconf("SC_CLK_TCK")
_LIVE: set[Child] = set()


def _die_with_parent(parent_pid: int) -> Callable[[], None]:
    def preexec() -> None:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        os.setpriority(os.PRIO_PROCESS, 0, 0)  # not the driver's raised priority
        if os.getppid() != parent_pid:
            os.kill(os.getpid(), signal.SIGTERM)
    return preexec


@atexit.register
def _kill_leftovers() -> None:
    for child in list(_LIVE):
        child.kill_now()


class Child:
    """One subprocess: stdout lines kept (and watched), stderr to a log file."""

    def __init__(self, name: str, argv: list[str], *, log_path: Path,
                 env: dict[str, str] | None = None, cwd: Path | None = None,
                 on_line: Callable[[str], None] | None = None) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.cwd = cwd
        self.log_path = log_path
        self.on_line = on_line
        self.lines: list[str] = []
        self.proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def start(self) -> Child:
        # Open for the child's whole life (its stderr); closed in _finish.
        self._log = open(self.log_path, "ab")  # noqa: ASYNC230, SIM115
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv, env=self.env, cwd=self.cwd, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=self._log, start_new_session=True,
            preexec_fn=_die_with_parent(os.getpid()))
        _LIVE.add(self)
        self._reader = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        async for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.lines.append(line)
            if self.on_line is not None:
                self.on_line(line)

    async def wait_line(self, prefix: str, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in self.lines:
                if line.startswith(prefix):
                    return line
            if not self.running:
                break
            await asyncio.sleep(0.02)
        raise RuntimeError(f"{self.name}: no '{prefix}' line within {timeout_s:.0f} s "
                           f"(exit {self.proc.returncode if self.proc else None}); "
                           f"log {self.log_path}:\n{tail(self.log_path)}")

    async def wait(self, timeout_s: float) -> int:
        assert self.proc is not None
        try:
            code = await asyncio.wait_for(self.proc.wait(), timeout_s)
        except TimeoutError:
            self.kill_now()
            await self.proc.wait()
            raise RuntimeError(f"{self.name}: still running after {timeout_s:.0f} s; "
                               "killed") from None
        await self._finish()
        return code

    async def stop(self, grace_s: float = 10.0, sig: int = signal.SIGTERM) -> int | None:
        """Signal (SIGTERM by default), wait up to grace_s, then SIGKILL."""
        if self.proc is None:
            return None
        if self.proc.returncode is None:
            try:
                self.proc.send_signal(sig)
            except ProcessLookupError:
                pass
            try:
                await asyncio.wait_for(self.proc.wait(), grace_s)
            except TimeoutError:
                self.kill_now()
                await self.proc.wait()
        await self._finish()
        return self.proc.returncode

    async def _finish(self) -> None:
        if self._reader is not None:
            try:
                await asyncio.wait_for(self._reader, 5)
            except (TimeoutError, asyncio.CancelledError):
                pass
            self._reader = None
        if self._log is not None:
            self._log.close()
            self._log = None
        _LIVE.discard(self)

    def kill_now(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            try:
                os.kill(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "<no log>"


# -- /proc --------------------------------------------------------------------------------


def status_kb(pid: int, field: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def reset_hwm(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: "5" into clear_refs)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _stat_fields(pid: int, tid: int | None = None) -> list[str] | None:
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    try:
        return Path(path).read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def main_thread_cpu_s(pid: int) -> float | None:
    """utime + stime of the process's main thread alone (the gateway's event loop)."""
    fields = _stat_fields(pid, pid)
    if fields is None:
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def cpu_s(pid: int, *, reaped_children: bool = False) -> float | None:
    """utime + stime of every thread of the process (plus, if asked, of its children that
    have exited and been waited for), in seconds."""
    fields = _stat_fields(pid)
    if fields is None:
        return None
    ticks = int(fields[11]) + int(fields[12])
    if reaped_children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / CLK_TCK


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (the gateway's document workers, for instance)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None:
            parents.setdefault(int(fields[1]), []).append(int(entry.name))
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def tree_cpu_s(pid: int) -> float:
    """CPU of the process, its live descendants and the descendants it has reaped."""
    total = cpu_s(pid, reaped_children=True) or 0.0
    return total + sum(cpu_s(p, reaped_children=True) or 0.0 for p in descendants(pid))


def thread_cpu_s(pid: int) -> dict[str, float]:
    """CPU of the process's threads by kind (the name without its number: `faxgw-store_2`
    counts as `faxgw-store`), in seconds."""
    out: dict[str, float] = {}
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return out
    for task in tasks:
        try:
            text = (task / "stat").read_text()
        except OSError:
            continue
        name = text[text.index("(") + 1:text.rindex(")")].rstrip("0123456789").rstrip("_")
        fields = text.rsplit(")", 1)[1].split()
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / CLK_TCK
    return out


def postgres_cpu_s(database: str) -> float:
    """CPU of the PostgreSQL server processes serving `database` now (their process title
    names it); a connection closed meanwhile takes its CPU with it."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if title.startswith(b"postgres: ") and f" {database} ".encode() in title:
            total += cpu_s(int(entry.name)) or 0.0
    return total


def tree_rss_kb(pid: int) -> tuple[int, int]:
    """(RSS of the process, RSS of it and every live descendant)."""
    own = status_kb(pid, "VmRSS") or 0
    return own, own + sum(status_kb(p, "VmRSS") or 0 for p in descendants(pid))


class Meter:
    """CPU time, RSS before/after and peak RSS of a process and its descendants over a phase.

    The process's own peak is VmHWM after resetting it at the start (where that reset is not
    allowed: the highest VmRSS sample). The tree's peak is the highest sum of VmRSS over the
    process and its descendants, sampled every 50 ms."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._task: asyncio.Task[None] | None = None
        self.sampled_max_kb = 0
        self.tree_max_kb = 0

    async def _sample(self) -> None:
        kids: list[int] = []
        refreshed = 0.0
        while True:
            if time.monotonic() - refreshed > 1.0:  # a /proc scan costs ms: once a second
                kids, refreshed = descendants(self.pid), time.monotonic()
            own = status_kb(self.pid, "VmRSS") or 0
            tree = own + sum(status_kb(p, "VmRSS") or 0 for p in kids)
            self.sampled_max_kb = max(self.sampled_max_kb, own)
            self.tree_max_kb = max(self.tree_max_kb, tree)
            await asyncio.sleep(0.05)

    def begin(self) -> None:
        self.threads0 = thread_cpu_s(self.pid)
        self.cpu0 = tree_cpu_s(self.pid)
        self.own_cpu0 = cpu_s(self.pid) or 0.0
        self.loop_cpu0 = main_thread_cpu_s(self.pid) or 0.0
        self.t0 = time.monotonic()
        self.rss0_kb, self.tree0_kb = tree_rss_kb(self.pid)
        self.hwm_reset = reset_hwm(self.pid)
        self.sampled_max_kb, self.tree_max_kb = self.rss0_kb, self.tree0_kb
        self._task = asyncio.create_task(self._sample())

    async def end(self) -> dict[str, Any]:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        hwm = status_kb(self.pid, "VmHWM")
        peak = hwm if (self.hwm_reset and hwm is not None) else self.sampled_max_kb
        rss1, tree1 = tree_rss_kb(self.pid)
        threads = {name: cpu - self.threads0.get(name, 0.0)
                   for name, cpu in thread_cpu_s(self.pid).items()}
        return {"cpu_s": tree_cpu_s(self.pid) - self.cpu0,
                "thread_cpu_s": {k: v for k, v in threads.items() if v > 0},
                "main_cpu_s": (cpu_s(self.pid) or 0.0) - self.own_cpu0,
                "loop_cpu_s": (main_thread_cpu_s(self.pid) or 0.0) - self.loop_cpu0,
                "wall_s": time.monotonic() - self.t0,
                "rss_before_kb": self.rss0_kb, "rss_after_kb": rss1, "peak_rss_kb": peak,
                "peak_from_hwm": bool(self.hwm_reset and hwm is not None),
                "sampled_peak_kb": self.sampled_max_kb,
                "tree_rss_before_kb": self.tree0_kb, "tree_rss_after_kb": tree1,
                "tree_peak_rss_kb": self.tree_max_kb,
                "tree_processes": 1 + len(descendants(self.pid))}


def machine_cpu_s() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine since boot, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq) / CLK_TCK, steal / CLK_TCK


class Interference:
    """CPU the machine spent outside the bench's own process tree during a phase: other
    users of a shared machine skew every figure, so each phase says how much there was."""

    def begin(self) -> None:
        self.t0 = time.monotonic()
        self.busy0, self.steal0 = machine_cpu_s()
        self.ours0 = tree_cpu_s(os.getpid())

    def end(self) -> dict[str, float]:
        wall = time.monotonic() - self.t0
        busy, steal = machine_cpu_s()
        ours = tree_cpu_s(os.getpid()) - self.ours0
        foreign = max(0.0, busy - self.busy0 - ours)
        cpus = os.cpu_count() or 1
        return {"wall_s": wall, "machine_busy_s": busy - self.busy0, "bench_cpu_s": ours,
                "foreign_cpu_s": foreign, "steal_s": steal - self.steal0,
                "foreign_pct_of_machine": 100 * foreign / (wall * cpus) if wall else 0.0}


class DiskStalls:
    """How long the disk takes to make a small write durable, sampled through a phase: a
    4 KB write and fsync every 50 ms, in a directory on the gateway's filesystem. The 250
    waits for fsyncs (the spool file, the store's commit), so a disk that stalls shows up as a
    run of slow replies with an idle event loop; this says when the disk itself stalled."""

    PERIOD_S = 0.05
    SLOW_S = 0.1

    def __init__(self, directory: Path) -> None:
        self.path = directory / f".bench-fsync-probe-{os.getpid()}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._samples: list[tuple[float, float]] = []  # (seconds into the phase, fsync s)

    def begin(self) -> None:
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="bench-fsync-probe", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        block = b"\0" * 4096
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            while not self._stop.wait(self.PERIOD_S):
                start = time.monotonic()
                os.pwrite(fd, block, 0)
                os.fsync(fd)
                self._samples.append((start - self._t0, time.monotonic() - start))
        finally:
            os.close(fd)
            self.path.unlink(missing_ok=True)

    def end(self) -> dict[str, Any]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        durations = sorted(d for _, d in self._samples)
        slow = [(round(t, 2), round(d * 1000)) for t, d in self._samples if d > self.SLOW_S]
        return {"samples": len(durations),
                "p50_ms": durations[len(durations) // 2] * 1000 if durations else None,
                "max_ms": durations[-1] * 1000 if durations else None,
                "slow_at_s_ms": slow[:50]}
