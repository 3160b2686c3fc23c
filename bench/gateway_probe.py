"""Run the gateway exactly as ``faxgw run`` does, plus an event-loop lag probe.

    BENCH_PROBE_OUT=/tmp/probe.json python bench/gateway_probe.py [faxgw run options]

The gateway runs through its own entry point (``gateway.cli.main(["run", ...])``), so
settings, logging, signals and start/stop are the daemon's own. The only addition comes
through the event-loop policy: the loop that ``asyncio.run`` creates gets, as its first
callback, a ticker task that sleeps 10 ms at a time and records how late it wakes
(lag = actual - expected). A step that blocks the loop shows up as lag.

SNAPSHOT_SIGNAL (SIGRTMIN+5: the daemon itself uses SIGHUP and SIGUSR1) writes a snapshot
(worst lag since the previous snapshot, VmHWM, VmRSS) to BENCH_PROBE_OUT and starts a new
interval; the final snapshot is written on exit.

BENCH_CPROFILE_OUT=/tmp/prof also runs cProfile on the event-loop thread: each snapshot writes
the calls since the previous one to /tmp/prof.<seq> (pstats format), for call counts per fax.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

TICK_S = 0.01
SNAPSHOT_SIGNAL = signal.SIGRTMIN + 5


def _status_kb(field: str) -> int | None:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


class LagProbe:
    def __init__(self, out: Path | None) -> None:
        self.out = out
        self.seq = 0
        self.task: asyncio.Task[None] | None = None
        self.cprofile_out = os.environ.get("BENCH_CPROFILE_OUT")
        self.profiler: Any = None
        self._reset()

    def _reset(self) -> None:
        self.started = time.monotonic()
        self.max_lag_s = 0.0
        self.max_lag_at = 0.0
        self.ticks = 0
        self.over_20ms = 0
        self.over_50ms = 0
        self.over_100ms = 0
        self.lag_sum_s = 0.0

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        """First callback of the daemon's loop: start ticking, answer SNAPSHOT_SIGNAL. Under
        callgrind (BENCH_CALLGRIND) no ticker: its work grows with the (slowed) wall time."""
        if not os.environ.get("BENCH_CALLGRIND"):
            self.task = loop.create_task(self._tick(), name="bench-lag-probe")
        loop.add_signal_handler(SNAPSHOT_SIGNAL, self.snapshot)

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(TICK_S)
            lag = loop.time() - before - TICK_S
            self.ticks += 1
            self.lag_sum_s += lag
            if lag > self.max_lag_s:
                self.max_lag_s, self.max_lag_at = lag, time.monotonic()
            self.over_20ms += lag > 0.02
            self.over_50ms += lag > 0.05
            self.over_100ms += lag > 0.1

    def snapshot(self, final: bool = False) -> None:
        self.seq += 1
        data = {
            "seq": self.seq, "final": final, "pid": os.getpid(),
            "interval_s": time.monotonic() - self.started, "t": time.monotonic(),
            "max_lag_ms": self.max_lag_s * 1000, "max_lag_at": self.max_lag_at,
            "mean_lag_ms": self.lag_sum_s / self.ticks * 1000 if self.ticks else None,
            "ticks": self.ticks, "lags_over_20ms": self.over_20ms,
            "lags_over_50ms": self.over_50ms, "lags_over_100ms": self.over_100ms,
            "vm_hwm_kb": _status_kb("VmHWM"), "vm_rss_kb": _status_kb("VmRSS"),
        }
        self._reset()
        if self.cprofile_out:
            import cProfile

            if self.profiler is not None:
                self.profiler.disable()
                self.profiler.dump_stats(f"{self.cprofile_out}.{self.seq}")
            self.profiler = cProfile.Profile(time.thread_time)  # CPU, not waits
            self.profiler.enable()  # this thread: the event loop's
        if self.out is not None:
            tmp = self.out.with_name(self.out.name + ".tmp")
            tmp.write_text(json.dumps(data))
            os.replace(tmp, self.out)


class _ProbePolicy(asyncio.DefaultEventLoopPolicy):
    def __init__(self, probe: LagProbe) -> None:
        super().__init__()
        self.probe = probe
        self.installed = False

    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        loop = super().new_event_loop()
        if not self.installed:  # the daemon's loop is the first one created
            self.installed = True
            loop.call_soon(self.probe.install, loop)
        return loop


def main() -> int:
    out = os.environ.get("BENCH_PROBE_OUT")
    probe = LagProbe(Path(out) if out else None)
    asyncio.set_event_loop_policy(_ProbePolicy(probe))
    from gateway.cli import (
        main as faxgw,  # from PYTHONPATH (the bench's snapshot) or the venv
    )

    try:
        return faxgw(["run", *sys.argv[1:]])
    finally:
        probe.snapshot(final=True)


if __name__ == "__main__":
    raise SystemExit(main())
