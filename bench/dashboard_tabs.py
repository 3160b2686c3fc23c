"""SMTP '.'->250 while dashboard tabs are open on a big job list (issue 26, item 8).

    .venv/bin/python -m bench.dashboard_tabs                      # ~2 minutes on 2 cores
    .venv/bin/python -m bench.dashboard_tabs --tabs 0,4,8 --jobs 50000
    .venv/bin/python -m bench.dashboard_tabs --gateway-source HEAD~5   # an older commit

A data directory is filled with `--jobs` finished jobs (written through the store of the
code under test, then marked reported in one statement: bench only), and `python -m gateway
run` starts on it in sandbox mode (the built-in SignalWire simulator, reports to the outbox
folder) with the dashboard on. For each tab count the driver logs in that many dashboard
sessions, each polling what an open /jobs tab polls (/jobs/rows and /health/live every 5 s,
as dash.js does), while `bench.loadgen`'s client sends 100 KB mails at a steady rate; the
'.'->250 of every mail is timed (CLOCK_MONOTONIC, from the final '.' handed to the kernel to
the reply), and so is every tab's request. Printed: per tab count, '.'->250 p50/p90/max and
the tabs' page times p50/p90; raw numbers in bench/results/<stamp>-dashboard-tabs.json.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import re
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
POLL_S = 5.0          # dash.js's PERIOD_MS
PASSWORD = "bench-admin-password"
PER_MESSAGE = 100


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.dashboard_tabs", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tabs", default="0,4,8", help="open tab counts, one phase each")
    p.add_argument("--jobs", type=int, default=50_000, help="finished jobs in the store")
    p.add_argument("--rate", type=float, default=5.0, help="mails per second")
    p.add_argument("--seconds", type=float, default=20.0, help="per phase")
    p.add_argument("--warmup", type=int, default=20,
                   help="mails sent first, not measured (workers start, caches fill)")
    p.add_argument("--gateway-source", default="worktree",
                   help="'worktree' (a copy taken at start) or a git revision such as HEAD")
    p.add_argument("--results-dir", default=str(BENCH / "results"))
    p.add_argument("--keep-tmp", action="store_true")
    a = p.parse_args(argv)
    a.tab_counts = [int(n) for n in a.tabs.split(",") if n != ""]
    a.stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return a


def seed(data_dir: Path, count: int) -> None:
    """`count` reported jobs, PER_MESSAGE to a mail, one mail a second apart in the past."""
    from gateway.store.rows import Message, NewJob
    from gateway.store.sqlite import SqliteStore

    data_dir.mkdir(parents=True, exist_ok=True)
    start = time.time() - count // PER_MESSAGE - 60
    clock = [start]
    store = SqliteStore(data_dir / "faxgw.sqlite3", lambda: clock[0])
    store.open()
    store.tune_for_bulk_load()
    try:
        for n in range(-(-count // PER_MESSAGE)):
            k = min(PER_MESSAGE, count - n * PER_MESSAGE)
            message = Message(
                id=secrets.token_hex(8), created_at=clock[0],
                envelope_from=f"scanner{n % 50}@example.com", header_from=None,
                report_to=f"scanner{n % 50}@example.com", subject=f"Scan batch {n}",
                message_id_header=None, references_header=None, peer="127.0.0.1",
                document_path=str(data_dir / "spool" / "gone.pdf"), document_bytes=1,
                document_sha256=hashlib.sha256(b"x").hexdigest(), pages=1,
                filenames="scan.pdf", purged_at=clock[0])
            store.add_message(message, [NewJob(
                secrets.token_hex(8), f"+1555{n % 1000:03d}{i:04d}", "+15550100000", "fine",
                secrets.token_urlsafe(18), secrets.token_hex(8)) for i in range(k)])
            clock[0] += 1
        store.execute("UPDATE jobs SET state = 'reported', fax_status = 'delivered',"
                      " next_run_at = NULL, reported_at = created_at")
        store.checkpoint()
    finally:
        store.close()


class Tab:
    """One open /jobs tab: logged in, polling what dash.js polls."""

    def __init__(self, base: str) -> None:
        import aiohttp

        self.base = base
        self.http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
        self.times_ms: list[float] = []
        self.errors = 0

    async def login(self) -> None:
        async with self.http.get(self.base + "/login") as r:
            token = re.search(r'name="login_token" value="([^"]+)"', await r.text())
        assert token, "no login form"
        async with self.http.post(self.base + "/login", allow_redirects=False, data={
                "login_token": token.group(1), "name": "bench", "password": PASSWORD}) as r:
            assert r.status == 303, f"login refused: {r.status}"

    async def get(self, path: str, fetch: bool) -> None:
        t0 = time.monotonic()
        headers = {"X-Requested-With": "fetch"} if fetch else {}
        try:
            async with self.http.get(self.base + path, headers=headers) as r:
                await r.read()
                if r.status != 200:
                    self.errors += 1
        except Exception:  # noqa: BLE001 - counted, the bench goes on
            self.errors += 1
        self.times_ms.append((time.monotonic() - t0) * 1000)

    async def run(self, offset_s: float, until: float) -> None:
        await asyncio.sleep(offset_s)
        await self.get("/jobs", fetch=False)
        while time.monotonic() < until:
            await asyncio.sleep(POLL_S)
            await asyncio.gather(self.get("/jobs/rows", True),
                                 self.get("/health/live?brief=1", True))

    async def close(self) -> None:
        await self.http.close()


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def phase(args: argparse.Namespace, daemon: Any, tabs_n: int, mail: bytes,
                first_number: int) -> dict[str, Any]:
    from .loadgen import Client

    base = f"http://127.0.0.1:{daemon.admin_port}"
    tabs = [Tab(base) for _ in range(tabs_n)]
    try:
        for tab in tabs:
            await tab.login()
        until = time.monotonic() + args.seconds + 2 * POLL_S
        pollers = [asyncio.create_task(t.run(i * POLL_S / max(1, tabs_n), until))
                   for i, t in enumerate(tabs)]
        await asyncio.sleep(POLL_S)  # every tab open and polling
        client = Client("127.0.0.1", daemon.smtp_port, mail, "+1555900", "fax.local")
        count = int(args.rate * args.seconds)
        start = time.monotonic()
        sends = []
        for i in range(count):
            due = start + i / args.rate
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            sends.append(asyncio.create_task(client.session(first_number + i)))
        records = await asyncio.gather(*sends)
        await asyncio.gather(*pollers)
    finally:
        for tab in tabs:
            await tab.close()
    d250 = [(r["t_reply"] - r["t_dot"]) * 1000 for r in records
            if r.get("code") == 250 and r.get("t_dot") and r.get("t_reply")]
    pages = [ms for t in tabs for ms in t.times_ms]
    return {"tabs": tabs_n, "mails": len(records), "accepted": len(d250),
            "dot_to_250_ms": {"p50": pct(d250, 0.5), "p90": pct(d250, 0.9),
                              "max": max(d250, default=None),
                              "mean": statistics.fmean(d250) if d250 else None},
            "page_ms": {"n": len(pages), "p50": pct(pages, 0.5), "p90": pct(pages, 0.9)},
            "refused": [r.get("code") or r.get("error") for r in records
                        if r.get("code") != 250][:5],
            "tab_errors": sum(t.errors for t in tabs), "raw_dot_to_250_ms": d250}


async def run(args: argparse.Namespace, root: Path, src: Path) -> list[dict[str, Any]]:
    from gateway.users import passwd_command
    from testsupport.harness import DaemonProcess, free_port

    from .documents import write_documents

    data = root / "var"
    t0 = time.monotonic()
    # In a process of its own on the snapshot: this one has the checkout's gateway loaded
    # (bench.run imports it), and the schema must be the one of the code under test.
    seeder = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import sys; from pathlib import Path; "
        "from bench.dashboard_tabs import seed; seed(Path(sys.argv[1]), int(sys.argv[2]))",
        str(data), str(args.jobs), cwd=root,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(src), str(REPO)])))
    if await seeder.wait() != 0:
        raise RuntimeError("seeding the jobs failed")
    print(f"[tabs] {args.jobs} jobs seeded in {time.monotonic() - t0:.0f} s", file=sys.stderr)
    users = root / "users"
    passwd_command(users, "bench", PASSWORD, role="admin")
    docs = write_documents(root / "docs", {"100k": 100_000})
    mail = Path(str(docs["100k"]["mail"])).read_bytes()
    admin_port = free_port()
    env = {"DATA_DIR": str(data), "ADMIN_LISTEN": f"127.0.0.1:{admin_port}",
           "USERS_FILE": str(users), "FAX_DOMAIN": "fax.local",
           # One sender at a steady rate for minutes: not the abuse the limits are for.
           "RATE_LIMIT_PER_SENDER": "100000", "RATE_LIMIT_TOTAL": "100000",
           "SEND_RATE_PER_SECOND": "100",
           "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")])}
    daemon = DaemonProcess(env, root / "gateway.log")
    daemon.admin_port = admin_port  # type: ignore[attr-defined]
    await daemon.start(timeout_s=120)
    out = []
    try:
        from .loadgen import Client

        warm = Client("127.0.0.1", daemon.smtp_port, mail, "+1555800", "fax.local")
        await asyncio.gather(*(warm.session(i) for i in range(args.warmup)))
        for n, tabs_n in enumerate(args.tab_counts):
            row = await phase(args, daemon, tabs_n, mail, n * 1000)
            d = row["dot_to_250_ms"]
            print(f"[tabs] {tabs_n} tabs: '.'->250 p50 {d['p50'] or 0:.0f} ms, p90 "
                  f"{d['p90'] or 0:.0f} ms", file=sys.stderr, flush=True)
            out.append(row)
    finally:
        try:
            await daemon.terminate()
        finally:
            await daemon.close()
    return out


def render(results: dict[str, Any]) -> str:
    lines = [f"faxgw dashboard tabs bench {results['stamp']}: {results['jobs']} jobs, "
             f"{results['rate']:g} mails/s of 100 KB for {results['seconds']:g} s per phase, "
             f"gateway {results['gateway_source']}",
             f"{'tabs':>4s} {'ok/sent':>8s} {'.->250 p50':>10s} {'p90':>6s} {'max':>6s} "
             f"{'page p50':>8s} {'p90':>6s} {'tab errors':>10s}",
             f"{'':4s} {'':8s} {'ms':>10s} {'ms':>6s} {'ms':>6s} {'ms':>8s} {'ms':>6s}"]
    for r in results["phases"]:
        d, p = r["dot_to_250_ms"], r["page_ms"]

        def f(v: float | None) -> str:
            return "-" if v is None else f"{v:.0f}"

        lines.append(f"{r['tabs']:4d} {r['accepted']:>3d}/{r['mails']:<4d} {f(d['p50']):>10s} "
                     f"{f(d['p90']):>6s} {f(d['max']):>6s} {f(p['p50']):>8s} {f(p['p90']):>6s} "
                     f"{r['tab_errors']:10d}")
    lines.append(f"load average after: {os.getloadavg()[0]:.1f} (2 cores shared: repeat a run "
                 "when it is high)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    Path(args.results_dir).mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="faxgw-tabs-"))
    from .run import snapshot_gateway

    src = root / "src"
    code_id = snapshot_gateway(args.gateway_source, src)
    sys.path.insert(0, str(src))  # gateway.*: the snapshot, in this process too (the seeding)
    from . import documents, loadgen  # noqa: F401 - imported before the chdir below
    # `python -m gateway` puts its working directory first on sys.path: the daemon must not
    # start in this checkout, or it would run the checkout's code, not the snapshot's.
    os.chdir(root)
    try:
        phases = asyncio.run(run(args, root, src))
        results = {"stamp": args.stamp, "jobs": args.jobs, "rate": args.rate,
                   "seconds": args.seconds, "gateway_source": args.gateway_source,
                   "gateway_code": code_id, "phases": phases}
        out = Path(args.results_dir) / f"{args.stamp}-dashboard-tabs.json"
        out.write_text(json.dumps(results, indent=1, default=str))
        print(render(results))
        print(f"\nraw numbers: {out}")
    finally:
        if args.keep_tmp:
            print(f"kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
