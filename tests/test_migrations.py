"""Schema versioning: a database from before versioning upgrades in place and its jobs resume.

The old database is built here from the DDL the gateway shipped before `schema_version` existed
(copied verbatim, as an installed gateway has it), with rows in the old state names.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from gateway.jobs.outbound_states import State
from gateway.store import migrations
from gateway.store.base import StoreError
from gateway.store.sqlite import SqliteStore

from .conftest import RelaySink, Simulator, make_pdf, production_env, relay_env, wait_state

# gateway/store/sqlite.py SCHEMA before schema versioning (commit 9859e24).
OLD_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id TEXT PRIMARY KEY, created_at REAL NOT NULL, envelope_from TEXT, header_from TEXT,
    report_to TEXT, subject TEXT, message_id_header TEXT, references_header TEXT, peer TEXT,
    document_path TEXT NOT NULL, document_bytes INTEGER NOT NULL, document_sha256 TEXT NOT NULL,
    pages INTEGER NOT NULL, filenames TEXT, notes TEXT, purged_at REAL
);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, message_id TEXT NOT NULL REFERENCES messages(id),
    to_number TEXT NOT NULL, from_number TEXT NOT NULL, quality TEXT NOT NULL,
    state TEXT NOT NULL, callback_token TEXT NOT NULL UNIQUE, callback_url TEXT, media_key TEXT,
    fax_sid TEXT, fax_status TEXT, pages INTEGER, pages_sent INTEGER, duration_s INTEGER,
    error_code TEXT, error_message TEXT, failure_reason TEXT,
    attempt INTEGER NOT NULL DEFAULT 0, tries INTEGER NOT NULL DEFAULT 0, next_run_at REAL,
    submit_started_at REAL, created_at REAL NOT NULL, updated_at REAL NOT NULL, reported_at REAL
);
CREATE INDEX IF NOT EXISTS jobs_due ON jobs (next_run_at);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state);
CREATE INDEX IF NOT EXISTS jobs_message ON jobs (message_id);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY, job_id TEXT NOT NULL, at REAL NOT NULL, kind TEXT NOT NULL,
    detail TEXT
);
CREATE INDEX IF NOT EXISTS events_job ON events (job_id, id);
CREATE TABLE IF NOT EXISTS attempts (
    job_id TEXT NOT NULL, n INTEGER NOT NULL, quality TEXT NOT NULL, started_at REAL NOT NULL,
    fax_sid TEXT, status TEXT, error_code TEXT, error_message TEXT, pages INTEGER,
    duration_s INTEGER, ended_at REAL, PRIMARY KEY (job_id, n)
);
"""

SPOOLED_JOB = "00aa00aa00aa00a1"
GAVE_UP_JOB = "00aa00aa00aa00a2"


def build_old_database(data_dir: Path) -> None:
    """A gateway's DATA_DIR as the old version left it: one mail, two jobs, one still in the
    spool ('received') and one the gateway gave up on ('failed'), its report due."""
    spool = data_dir / "spool"
    spool.mkdir(parents=True)
    pdf = make_pdf(1)
    document = spool / "m0001.pdf"
    document.write_bytes(pdf)
    now = time.time()
    db = sqlite3.connect(data_dir / "faxgw.sqlite3")
    db.executescript(OLD_SCHEMA)
    db.execute("INSERT INTO messages (id, created_at, envelope_from, header_from, report_to,"
               " subject, peer, document_path, document_bytes, document_sha256, pages,"
               " filenames) VALUES ('m0001', ?, 'alice@example.com', 'alice@example.com',"
               " 'alice@example.com', 'old mail', '127.0.0.1', ?, ?, 'x', 1, 'a.pdf')",
               (now, str(document), len(pdf)))
    for job_id, number, state, reason in (
            (SPOOLED_JOB, "+15551234567", "received", None),
            (GAVE_UP_JOB, "+15551234568", "failed", "SignalWire refused the fax: bad number")):
        db.execute("INSERT INTO jobs (id, message_id, to_number, from_number, quality, state,"
                   " callback_token, media_key, pages, failure_reason, next_run_at, created_at,"
                   " updated_at) VALUES (?, 'm0001', ?, '+15557654321', 'fine', ?, ?, ?, 1, ?,"
                   " ?, ?, ?)", (job_id, number, state, f"tok-{job_id}", f"key-{job_id}",
                                 reason, now, now, now))
        db.execute("INSERT INTO events (job_id, at, kind, detail) VALUES (?, ?, 'received', 'x')",
                   (job_id, now))
    db.execute("INSERT INTO events (job_id, at, kind, detail) VALUES (?, ?, 'failed', ?)",
               (GAVE_UP_JOB, now, "SignalWire refused the fax: bad number"))
    db.commit()
    db.close()


def test_old_database_is_upgraded_in_place(tmp_path: Path) -> None:
    build_old_database(tmp_path)
    store = SqliteStore(tmp_path / "faxgw.sqlite3")
    store.open()
    try:
        assert store.schema_version() == migrations.LATEST
        assert store.job(SPOOLED_JOB).state is State.SPOOLED
        given_up = store.job(GAVE_UP_JOB)
        assert (given_up.state, given_up.failure_reason) == (
            State.GIVEN_UP, "SignalWire refused the fax: bad number")
        assert [e.kind for e in store.events(GAVE_UP_JOB)] == ["received", "given-up"]
        assert store.counts_by_state() == {"spooled": 1, "given-up": 1}
    finally:
        store.close()
    # Opening again applies nothing more.
    store.open()
    try:
        assert store.schema_version() == migrations.LATEST
        assert [r["version"] for r in store._rows(
            "SELECT version FROM schema_version ORDER BY version")] == list(
                range(1, migrations.LATEST + 1))
    finally:
        store.close()


def test_new_database_starts_at_the_latest_version(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "faxgw.sqlite3")
    store.open()
    try:
        assert store.schema_version() == migrations.LATEST
        assert store.counts_by_state() == {}
    finally:
        store.close()


def test_database_from_a_newer_gateway_is_refused(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "faxgw.sqlite3")
    store.open()
    with store._tx():
        store._exec("INSERT INTO schema_version (version, applied_at, description)"
                    " VALUES (?, ?, 'from the future')", (migrations.LATEST + 1, 0.0))
    store.close()
    with pytest.raises(StoreError, match="newer than this gateway knows"):
        store.open()


def test_a_failing_migration_leaves_the_database_at_its_version(tmp_path: Path,
                                                               monkeypatch) -> None:
    build_old_database(tmp_path)
    broken = migrations.Migration(2, "broken", (
        "UPDATE jobs SET state = 'spooled' WHERE state = 'received'",
        "UPDATE no_such_table SET x = 1"))
    monkeypatch.setattr(migrations, "MIGRATIONS", (migrations.MIGRATIONS[0], broken))
    store = SqliteStore(tmp_path / "faxgw.sqlite3")
    with pytest.raises(sqlite3.OperationalError):
        store.open()
    db = sqlite3.connect(tmp_path / "faxgw.sqlite3")
    try:
        assert db.execute("SELECT MAX(version) FROM schema_version").fetchone()[0] == 1
        # Half of the broken step did not stick: the whole step rolled back.
        assert db.execute("SELECT state FROM jobs WHERE id = ?",
                          (SPOOLED_JOB,)).fetchone()[0] == "received"
    finally:
        db.close()


async def test_jobs_of_an_old_database_resume(make_gateway, simulator: Simulator,
                                              relay: RelaySink, tmp_path: Path) -> None:
    data = tmp_path / "var"
    build_old_database(data)
    gw = await make_gateway(production_env(data, simulator, **relay_env(relay)))
    await wait_state(gw, SPOOLED_JOB, State.REPORTED, 30)
    await wait_state(gw, GAVE_UP_JOB, State.REPORTED, 30)
    subjects = sorted([(await relay.next())["Subject"], (await relay.next())["Subject"]])
    assert subjects == ["Fax to +1 555-123-4567 delivered, 1 page",
                        "Fax to +1 555-123-4568 not sent: SignalWire refused the fax: "
                        "bad number"]
    assert len(simulator.state.faxes) == 1


def test_the_cli_does_not_upgrade_a_database_under_a_running_old_daemon(tmp_path: Path,
                                                                        capsys) -> None:
    """`faxgw jobs` of a new version against the database of a still-running old daemon: a
    clear refusal, and the database left as the old daemon needs it."""
    from gateway.commands import jobs as commands
    from gateway.config import settings_from

    from .conftest import base_env

    build_old_database(tmp_path)
    settings = settings_from(base_env(tmp_path))
    assert commands.jobs(settings, status=None, to=None, sender=None, since=None, limit=10,
                         fmt="table") == 1
    err = capsys.readouterr().err
    assert (f"is at schema version 0, this faxgw needs {migrations.LATEST}: restart the daemon"
            in err)
    db = sqlite3.connect(tmp_path / "faxgw.sqlite3")
    try:
        assert db.execute("SELECT state FROM jobs WHERE id = ?",
                          (SPOOLED_JOB,)).fetchone()[0] == "received"
        assert db.execute("SELECT name FROM sqlite_master WHERE name = 'schema_version'"
                          ).fetchone() is None
    finally:
        db.close()
    # Once the daemon (here: a store opened the daemon's way) has upgraded it, the CLI reads it.
    store = SqliteStore(tmp_path / "faxgw.sqlite3")
    store.open()
    store.close()
    assert commands.jobs(settings, status="spooled", to=None, sender=None, since=None,
                         limit=10, fmt="table") == 0
    assert SPOOLED_JOB in capsys.readouterr().out


def test_the_fencing_migration_leaves_each_fax_sid_to_its_first_job(tmp_path: Path,
                                                                     monkeypatch) -> None:
    """A database where a lookup had adopted another job's fax (issue 23): the later attempt
    loses the sid, the first keeps it, and from then on the index keeps a sid to one job."""
    [fencing] = [m for m in migrations.MIGRATIONS if "one job per fax sid" in m.description]
    monkeypatch.setattr(migrations, "MIGRATIONS", tuple(
        m for m in migrations.MIGRATIONS if m.version < fencing.version))
    monkeypatch.setattr(migrations, "LATEST", fencing.version - 1)
    store = SqliteStore(tmp_path / "faxgw.sqlite3")
    store.open()
    with store._tx():
        for job_id, started in (("j-first", 1.0), ("j-second", 2.0), ("j-own", 3.0)):
            store._exec("INSERT INTO attempts (job_id, n, quality, started_at, fax_sid)"
                        " VALUES (?, 1, 'fine', ?, ?)",
                        (job_id, started, "sid-own" if job_id == "j-own" else "sid-shared"))
    store.close()
    monkeypatch.undo()
    store.open()
    try:
        assert store.schema_version() >= fencing.version
        assert {r["job_id"]: r["fax_sid"] for r in store._rows(
            "SELECT job_id, fax_sid FROM attempts")} == {
                "j-first": "sid-shared", "j-second": None, "j-own": "sid-own"}
        with pytest.raises(sqlite3.IntegrityError):
            with store._tx():
                store._exec("UPDATE attempts SET fax_sid = 'sid-shared' WHERE job_id = ?",
                            ("j-second",))
    finally:
        store.close()
