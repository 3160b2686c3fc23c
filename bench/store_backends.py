"""Store-level intake and claim on both backends: the commit a 250 waits for (`add_message`,
durable) and a claim-and-release round, SQLite beside PostgreSQL.

    python -m bench.store_backends [--count 500] [--database-url postgresql://...]

The PostgreSQL database must exist and be disposable: the bench drops and recreates its schema.
Prints one row per backend: commits per second and latency percentiles in milliseconds.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import psycopg

from gateway.store.postgres import PostgresStore
from gateway.store.rows import Message, NewJob
from gateway.store.sql import SqlStore
from gateway.store.sqlite import SqliteStore


def _message(i: int) -> tuple[Message, list[NewJob]]:
    message = Message(id=f"m{i:015d}", created_at=time.time(), envelope_from="a@example.com",
                      header_from="a@example.com", report_to="a@example.com", subject="bench",
                      message_id_header=f"<bench-{i}@example.com>", references_header=None,
                      peer="127.0.0.1", document_path=f"/spool/{i}.pdf", document_bytes=100_000,
                      document_sha256=f"{i:064x}", pages=2, filenames="scan.pdf")
    return message, [NewJob(f"j{i:015d}", f"+1555{i:07d}", "+15550100000", "fine", f"t{i}",
                            f"k{i}")]


def _ms(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return 1000 * ordered[min(len(ordered) - 1, int(p * len(ordered)))]


def run(store: SqlStore, count: int) -> dict[str, float]:
    store.open()
    try:
        intake: list[float] = []
        started = time.perf_counter()
        for i in range(count):
            message, jobs = _message(i)
            t0 = time.perf_counter()
            store.add_message(message, jobs, stored=True, dedup_since=time.time() - 86400)
            intake.append(time.perf_counter() - t0)
        intake_s = time.perf_counter() - started
        claims: list[float] = []
        while True:
            t0 = time.perf_counter()
            got = store.claim_due(time.time(), 8)
            claims.append(time.perf_counter() - t0)
            for job in got:
                store.release(job.id)
                store.mark_given_up(job, "bench")
                store.mark_reported(store.job(job.id), "bench")  # out of the due set
            if not got:
                break
    finally:
        store.close()
    return {"intake_per_s": count / intake_s, "intake_p50": _ms(intake, 0.5),
            "intake_p99": _ms(intake, 0.99), "intake_mean": 1000 * statistics.mean(intake),
            "claim8_p50": _ms(claims, 0.5), "claim8_p99": _ms(claims, 0.99)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=500)
    p.add_argument("--database-url", default="postgresql://postgres@127.0.0.1:5432/test")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        rows.append(("sqlite", run(SqliteStore(Path(tmp) / "bench.sqlite3"), args.count)))
    with psycopg.connect(args.database_url, autocommit=True) as db:
        db.execute("DROP SCHEMA public CASCADE")
        db.execute("CREATE SCHEMA public")
    rows.append(("postgresql", run(PostgresStore(args.database_url), args.count)))
    print(f"{'backend':<11} {'intake/s':>9} {'p50 ms':>7} {'p99 ms':>7} "
          f"{'claim8 p50':>10} {'claim8 p99':>10}")
    for name, r in rows:
        print(f"{name:<11} {r['intake_per_s']:>9.0f} {r['intake_p50']:>7.2f} "
              f"{r['intake_p99']:>7.2f} {r['claim8_p50']:>10.2f} {r['claim8_p99']:>10.2f}")
    ratio = rows[1][1]["intake_mean"] / rows[0][1]["intake_mean"]
    print(f"PostgreSQL intake commit / SQLite: {ratio:.2f}x")


if __name__ == "__main__":
    main()
