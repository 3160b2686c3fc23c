"""The store on every backend: SQLite (one file), PostgreSQL (a real server) and PostgreSQL
behind PgBouncer; `node` makes several stores on one database, one per NODE_ID, as several
gateways would be. The fixtures are imported by the modules that use them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gateway.store.postgres import PostgresStore
from gateway.store.rows import Message, NewJob
from gateway.store.sql import SqlStore
from gateway.store.sqlite import SqliteStore

from ..conftest import FakeClock, pg_reset

NodeFactory = Callable[[str], SqlStore]


class PgUrl(str):
    """A PostgreSQL URL, whether the store prepares its frequent queries there, and the
    server's own URL (not through PgBouncer) for a test's look at its locks."""

    prepared: bool = True
    direct: str = ""


def open_backend(backend: str, clock: FakeClock) -> SqlStore:
    """A store (not yet opened) on the test's database, as the backend says."""
    if backend.startswith("postgresql"):
        return PostgresStore(backend, clock,
                             prepared_statements=getattr(backend, "prepared", True))
    return SqliteStore(Path(backend), clock)


# PostgreSQL twice more behind PgBouncer in transaction mode (tests/pgbouncer.py), as many sites
# run it: with DATABASE_PREPARED_STATEMENTS=no, and with the default `yes`.
@pytest.fixture(params=["sqlite", "postgresql", "pgbouncer", "pgbouncer-prepared"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "faxgw.sqlite3")
    direct = request.getfixturevalue("pg_url")
    pg_reset(direct)
    url = PgUrl(request.getfixturevalue("pgbouncer_url")
                if request.param.startswith("pgbouncer") else direct)
    url.prepared, url.direct = request.param != "pgbouncer", direct
    return url


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def node(backend: str, clock: FakeClock) -> Iterator[NodeFactory]:
    """A factory of opened stores on the test's database, one per node id; all closed after."""
    opened: list[SqlStore] = []

    def factory(node_id: str = "node-a") -> SqlStore:
        store = open_backend(backend, clock)
        store.node_id = node_id
        store.lease_s = 30.0
        store.open()
        opened.append(store)
        return store

    yield factory
    for store in opened:
        store.close()


_counter = iter(range(1, 1_000_000))


def new_mail(store: SqlStore, *numbers: str, msgid: str | None = "<a@x>",
             sha: str = "ab" * 32) -> tuple[Message, list[NewJob]]:
    n = next(_counter)
    message = Message(id=f"m{n:015d}", created_at=store.clock(), envelope_from="a@example.com",
                      header_from="a@example.com", report_to="a@example.com", subject="s",
                      message_id_header=msgid, references_header=None, peer="127.0.0.1",
                      document_path=f"/spool/{n}.pdf", document_bytes=10, document_sha256=sha,
                      pages=1, filenames="a.pdf")
    return message, [NewJob(f"j{n:07d}{i:08d}", number, "+15550100000", "fine",
                            f"tok-{n}-{i}", f"key-{n}") for i, number in enumerate(numbers)]


def add_mail(store: SqlStore, *numbers: str, msgid: str | None = None, sha: str = "ab" * 32,
             stored: bool = False) -> list[str]:
    message, jobs = new_mail(store, *(numbers or ("+15551230000",)), msgid=msgid, sha=sha)
    store.add_message(message, jobs, stored=stored)
    return [j.id for j in jobs]


