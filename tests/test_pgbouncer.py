"""The gateway behind a real PgBouncer in transaction mode (Debian's pgbouncer, tests/pgbouncer.py),
as many sites run PostgreSQL. Each transaction may run on another server connection, so the store
keeps nothing on the server between transactions: its migration lock is transaction-scoped, and
prepared statements (DATABASE_PREPARED_STATEMENTS, on by default) are turned off, with a warning,
where the pooler does not carry them (PgBouncer before 1.21). The store's own tests run behind it
too, both ways (tests/test_store_backends.py, backends `pgbouncer` and `pgbouncer-prepared`).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import psycopg
import pytest

from gateway.store import migrations
from gateway.store.postgres import PREPARE_THRESHOLD, PostgresStore
from testsupport.s3server import SeaweedS3

from .conftest import GatewayFactory, RelaySink, Simulator, job_ids, pdf_mail, pg_reset, smtp_send
from .helpers.cluster import all_reported, shared_env
from .pgbouncer import POOL_SIZE


def test_prepared_statements_are_turned_off_behind_a_transaction_pooler(
        pg_url: str, pgbouncer_url: str, caplog: pytest.LogCaptureFixture) -> None:
    pg_reset(pg_url)
    direct = PostgresStore(pg_url)
    direct.open()
    try:
        assert direct.prepare_threshold == PREPARE_THRESHOLD  # a plain server keeps them
    finally:
        direct.close()
    assert not [r for r in caplog.records if "prepared statements" in r.getMessage()]

    pooled = PostgresStore(pgbouncer_url)
    pooled.open()
    try:
        assert pooled.prepare_threshold is None
        for _ in range(3 * PREPARE_THRESHOLD):  # would be prepared by now, and fail
            assert pooled.schema_version() == migrations.LATEST
    finally:
        pooled.close()
    [warning] = [r for r in caplog.records if "prepared statements" in r.getMessage()]
    assert warning.levelno == logging.WARNING
    assert "DATABASE_PREPARED_STATEMENTS=no" in warning.getMessage()


def _on_every_server_connection(pgbouncer_url: str, *statements: str) -> None:
    """Run `statements` on each of PgBouncer's server connections: one client a connection, each
    holding a transaction open until all have run theirs."""
    clients = [psycopg.connect(pgbouncer_url, autocommit=True) for _ in range(POOL_SIZE)]
    try:
        for client in clients:
            client.execute("BEGIN")
            for statement in statements:
                client.execute(statement)
        for client in clients:
            client.execute("COMMIT")
    finally:
        for client in clients:
            client.close()


def test_a_pooler_the_start_test_missed_costs_one_failed_call(
        pg_url: str, pgbouncer_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Should the test at start miss the pooler, the first call that meets a lost prepared
    statement fails as a database error (its caller retries, as after any), and preparing is
    off from then on. Here every server connection already has a statement of the name the
    store's first prepared query gets, as it would after another client's."""
    pg_reset(pg_url)
    schema = PostgresStore(pg_url)  # the schema, made straight on the server
    schema.open()
    schema.close()
    monkeypatch.setattr(PostgresStore, "_server_keeps_prepared", lambda self: True)
    store = PostgresStore(pgbouncer_url, max_connections=1)
    store.open()
    _on_every_server_connection(pgbouncer_url, "DEALLOCATE ALL",
                                "PREPARE _pg3_0 AS SELECT 1 AS other")
    try:
        assert store.prepare_threshold == PREPARE_THRESHOLD
        failures = []
        for _ in range(3 * PREPARE_THRESHOLD):
            try:
                assert store.schema_version() == migrations.LATEST
            except psycopg.Error as exc:
                failures.append(type(exc).__name__)
        assert failures == ["DuplicatePreparedStatement"]
        assert store.prepare_threshold is None
    finally:
        store.close()
        _on_every_server_connection(pgbouncer_url, "DEALLOCATE ALL")


def test_nodes_starting_together_behind_pgbouncer_migrate_once_and_hold_no_lock(
        pg_url: str, pgbouncer_url: str) -> None:
    """A session advisory lock taken and released through a transaction pooler can be taken on
    one server connection and 'released' on another, stranding it; the migration lock is held
    by each migration's transaction instead."""
    pg_reset(pg_url)
    start = threading.Barrier(6)
    errors: list[BaseException] = []

    def node(n: int) -> None:
        store = PostgresStore(pgbouncer_url, prepared_statements=False)
        store.node_id = f"node-{n}"
        try:
            start.wait(30)
            store.open()
            assert store.schema_version() == migrations.LATEST
        except BaseException as exc:  # noqa: BLE001 (reported by the test below)
            errors.append(exc)
        finally:
            store.close()

    threads = [threading.Thread(target=node, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not any(t.is_alive() for t in threads), "a node hung starting"
    assert errors == []
    with psycopg.connect(pg_url, autocommit=True) as db:
        versions = [v for (v,) in db.execute("SELECT version FROM schema_version ORDER BY 1")]
        held = db.execute("SELECT COUNT(*) FROM pg_locks WHERE locktype = 'advisory' AND"
                          " database = (SELECT oid FROM pg_database"
                          "             WHERE datname = current_database())").fetchone()
    assert versions == [m.version for m in migrations.MIGRATIONS]
    assert held == (0,)


async def test_two_gateways_behind_pgbouncer_fax_and_report_once(
        make_gateway: GatewayFactory, pg_url: str, pgbouncer_url: str, seaweed: SeaweedS3,
        simulator: Simulator, relay: RelaySink, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Two gateways on one database through PgBouncer, prepared statements left at the default:
    every mail faxed once and reported once."""
    pg_reset(pg_url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweed.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweed.secret_key)
    nodes = [await make_gateway(shared_env(tmp_path, name, pgbouncer_url, seaweed, simulator,
                                           relay))
             for name in ("node-a", "node-b")]
    sent: list[str] = []
    for i in range(6):
        number = f"155513{i + 10:05d}"
        reply = await smtp_send(nodes[i % 2].smtp.port, pdf_mail(f"{number}@fax.local"),
                                [f"{number}@fax.local"])
        assert reply.code == 250, reply.text
        sent += job_ids(reply.text)
    reports = [await relay.next(60) for _ in sent]
    assert all("delivered" in r["Subject"] for r in reports)
    await simulator.state.wait_idle()
    assert sorted(r["To"] for r in simulator.state.send_requests) == sorted(
        f"+155513{i + 10:05d}" for i in range(6))
    assert await all_reported(pg_url) == {"reported"}
