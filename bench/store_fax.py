"""The store's CPU per fax: every store call a 100 KB fax makes on its way (intake commit,
claim, send, callback, report, purge), in the order the daemon makes them, on one thread with
nothing else running, SQLite beside PostgreSQL.

    python -m bench.store_fax [--faxes 300] [--rounds 3] [--database-url postgresql://...]

Prints, per backend, the CPU time of the calling thread per fax (user + system: the driver's
work and its system calls; the server's own CPU is beside it for PostgreSQL) and the wall time
per fax. The PostgreSQL database is created for the run and dropped after. A pair of runs
(`--gateway-source`-style) is done by running it from two checkouts.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg

from gateway.jobs.outbound_states import State
from gateway.store.base import Store
from gateway.store.postgres import PostgresStore
from gateway.store.rows import Message, NewJob
from gateway.store.sql import SqlStore
from gateway.store.sqlite import SqliteStore

from .procs import postgres_cpu_s


def _message(i: int, tag: str) -> tuple[Message, list[NewJob]]:
    message = Message(id=f"m{tag}{i:012d}", created_at=time.time(), envelope_from="a@example.com",
                      header_from="a@example.com", report_to="a@example.com", subject="bench",
                      message_id_header=f"<bench-{tag}-{i}@example.com>", references_header=None,
                      peer="127.0.0.1", document_path=f"/spool/{i}.pdf", document_bytes=100_000,
                      document_sha256=f"{i:064x}", pages=1, filenames="scan.pdf")
    return message, [NewJob(f"j{tag}{i:012d}", f"+1555{i:07d}", "+15550100000", "fine",
                            f"t{tag}{i}", f"k{tag}{i}")]


def one_fax(store: Store, i: int, tag: str) -> None:
    """The calls of one fax, as the daemon's intake, worker and callback handler make them."""
    now = time.time()
    message, jobs = _message(i, tag)
    store.add_hit("mail-sender", "a@example.com", now, now - 3600)
    store.add_message(message, jobs, stored=True, dedup_since=now - 86400)
    due, _ = store.release_and_claim([], time.time(), 8, [])
    job = next(j for j in due if j.id == jobs[0].id)
    _, current = store.take_send_slot_and_submit(job, time.time(), 0.001,
                                                 f"http://gw/cb/{job.callback_token}",
                                                 time.time() + 40)
    assert current is not None
    job = current
    assert store.mark_submitted(job, f"FX{tag}{i}", "queued", time.time() + 600, "accepted")
    found, action = store.record_callback(job.callback_token, lambda _: True, f"FX{tag}{i}",
                                          "delivered", pages=1, error_code=None,
                                          error_message=None)
    assert found is not None and action is not None
    due, _ = store.release_and_claim([job.id], time.time(), 8, [])
    job = next(j for j in due if j.id == job.id)
    assert job.state is State.COMPLETED
    store.message(job.message_id), store.events(job.id), store.attempts(job.id)
    assert store.mark_reporting(job, 1, "report 1: mailing it")
    recorded, claimed = store.mark_reported_and_claim_purge(job, "report sent")
    assert recorded and claimed is not None
    store.mark_purged(job.message_id)
    store.release(job.id)


def run(store: SqlStore, faxes: int, rounds: int, database: str | None) -> dict[str, float]:
    store.open()
    if isinstance(store, PostgresStore):
        store.open_thread()  # as on the daemon's store threads
    try:
        for i in range(20):  # warm: prepared statements, caches
            one_fax(store, i, "w")
        cpu, wall, server = [], [], []
        for r in range(rounds):
            pg0 = postgres_cpu_s(database) if database else 0.0
            c0, w0 = time.thread_time(), time.perf_counter()
            for i in range(faxes):
                one_fax(store, i, f"r{r}")
            cpu.append((time.thread_time() - c0) * 1000 / faxes)
            wall.append((time.perf_counter() - w0) * 1000 / faxes)
            if database:
                server.append((postgres_cpu_s(database) - pg0) * 1000 / faxes)
    finally:
        if isinstance(store, PostgresStore):
            store.close_thread()
        store.close()
    return {"cpu_ms": statistics.median(cpu), "cpu_min_ms": min(cpu),
            "wall_ms": statistics.median(wall),
            "server_ms": statistics.median(server) if server else float("nan")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--faxes", type=int, default=300)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--database-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    p.add_argument("--only", choices=["sqlite", "postgresql"])
    p.add_argument("--log-statements", action="store_true",
                   help="PostgreSQL logs every statement of the run (its server log)")
    args = p.parse_args()
    rows = []
    if args.only != "postgresql":
        with tempfile.TemporaryDirectory() as tmp:
            rows.append(("sqlite", run(SqliteStore(Path(tmp) / "bench.sqlite3"), args.faxes,
                                       args.rounds, None)))
    if args.only != "sqlite":
        name = f"faxgw_store_fax_{int(time.time())}"
        with psycopg.connect(args.database_url, autocommit=True) as db:
            db.execute(f'CREATE DATABASE "{name}"')
            if args.log_statements:  # the server's log gets every statement of the run
                db.execute(f'ALTER DATABASE "{name}" SET log_min_duration_statement = 0')
        try:
            url = urlunsplit(urlsplit(args.database_url)._replace(path=f"/{name}"))
            rows.append(("postgresql", run(PostgresStore(url), args.faxes, args.rounds, name)))
        finally:
            with psycopg.connect(args.database_url, autocommit=True) as db:
                db.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    print(f"{'backend':<11} {'CPU ms/fax':>10} {'(min)':>7} {'wall ms/fax':>11} "
          f"{'server CPU ms/fax':>17}")
    for name, r in rows:
        print(f"{name:<11} {r['cpu_ms']:>10.2f} {r['cpu_min_ms']:>7.2f} {r['wall_ms']:>11.2f} "
              f"{r['server_ms']:>17.2f}")


if __name__ == "__main__":
    main()
