"""The store's interfaces (gateway/store/interfaces.py): each concern a small typed interface,
both backends behind every one of them with the signatures they declare, and the tables kept
beside the jobs written through the SQL store's public surface, never its private hooks."""

from __future__ import annotations

import ast
import inspect
from collections.abc import Iterator
from pathlib import Path

import pytest

import gateway
from gateway.store.base import Store
from gateway.store.inbound import Completion, InboundStore
from gateway.store.interfaces import Calls, Jobs, Leases, Listings, Nodes, SqlAccess
from gateway.store.partials import PartialsStore
from gateway.store.postgres import PostgresStore
from gateway.store.sessions import SessionStore
from gateway.store.sql import SqlStore
from gateway.store.sqlite import SqliteStore

from .conftest import FakeClock, pg_reset

CONCERNS = (Jobs, Leases, Listings, Nodes, SqlAccess)
# What a backend provides SqlStore: named only inside the SQL store and its backends.
PRIVATE_HOOKS = {"_tx", "_batch_tx", "_exec", "_exec_later", "_rows", "_rows_later", "_one",
                 "_scalar", "_claim_lock", "_relaxed_commit", "_is_db_error", "_transition",
                 "_event"}
SQL_STORE_MODULES = {"sql.py", "sql_core.py", "sql_intake.py", "sql_jobs.py", "sql_leases.py",
                     "sql_listings.py", "sql_nodes.py", "sqlite.py", "postgres.py"}


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SqlStore]:
    clock = FakeClock()
    db: SqlStore
    if request.param == "sqlite":
        db = SqliteStore(tmp_path / "faxgw.sqlite3", clock)
    else:
        url = request.getfixturevalue("pg_url")
        pg_reset(url)  # the run's database: an empty schema, as a new database
        db = PostgresStore(url, clock)
    db.node_id = "node-a"
    db.open()
    try:
        yield db
    finally:
        db.close()


# Each helper sees the store only as the one interface a caller of that concern is given.

def lead_twice(leases: Leases, now: float) -> tuple[bool, bool]:
    return leases.take_lead("janitor", now, 60.0), leases.take_lead("janitor", now + 1, 60.0)


def heartbeat(nodes: Nodes, now: float) -> list[str]:
    nodes.node_seen(nodes.node_id, now, now, "up")
    return [n["node_id"] for n in nodes.live_nodes(now - 1)]


def idle_queue(listings: Listings) -> tuple[int, dict[str, int], list[str]]:
    return listings.queue_depth(), listings.counts_by_state(), listings.job_ids_by_prefix("0")


def test_both_backends_answer_through_each_interface(store: SqlStore) -> None:
    for concern in CONCERNS:
        assert isinstance(store, concern), concern.__name__
    now = store.clock()
    assert lead_twice(store, now) == (True, True)
    assert heartbeat(store, now) == ["node-a"]
    assert idle_queue(store) == (0, {}, [])
    assert store.job("no-such-job") is None
    # The inbound rows on the SQL store's public surface, on this backend.
    inbound = InboundStore(store)
    assert inbound.record_completion(Completion(
        "FX1", None, "+15550001111", "+15550002222", "received", "received", 1, None, None,
        None, None, None, ("a@example.com",), "callback", now), now)
    assert inbound.get("FX1") is not None and inbound.known(["FX1", "FX2"]) == {
        "FX1": inbound.get("FX1").state}  # type: ignore[union-attr]
    assert PartialsStore(store).get("no-such-set") is None
    assert SessionStore(store).get("no-such-session", now) is None


def test_the_sql_store_implements_every_interface_with_its_signatures() -> None:
    for backend in (SqliteStore, PostgresStore):
        assert not backend.__abstractmethods__, backend.__name__
    for concern in (Calls, *CONCERNS):
        for name in concern.__abstractmethods__:
            declared = inspect.signature(getattr(concern, name))
            made = inspect.signature(getattr(SqlStore, name))
            for param in declared.parameters.values():
                assert param.name in made.parameters, f"{concern.__name__}.{name}: {param}"
                got = made.parameters[param.name]
                assert (got.kind, got.default) == (param.kind, param.default), (
                    f"{concern.__name__}.{name}: {param} declared, {got} made")
            for extra in made.parameters.values():
                assert (extra.name in declared.parameters or extra.kind is extra.VAR_KEYWORD
                        or extra.default is not extra.empty), f"SqlStore.{name}: {extra}"
    # Store is every concern and nothing besides: each job method belongs to one interface.
    concerned = set().union(*(c.__abstractmethods__ for c in (Jobs, Leases, Listings, Nodes)))
    own = {n for n in Store.__abstractmethods__ if n not in concerned}
    assert own == {"open", "close", "where", "schema_version", "check_writable"}
    for concern in (Jobs, Leases, Listings, Nodes):
        assert not (concern.__abstractmethods__ - Calls.__abstractmethods__) & set().union(
            *(c.__abstractmethods__ - Calls.__abstractmethods__
              for c in (Jobs, Leases, Listings, Nodes) if c is not concern))


def test_what_nothing_called_is_gone() -> None:
    from gateway.smtp.access import Client
    from gateway.smtp.connections import ConnectionLimits
    from gateway.smtp.data import Incoming

    for owner, name in ((SqlStore, "due_jobs"), (Store, "due_jobs"),
                        (InboundStore, "counts_by_outcome"), (ConnectionLimits, "open_from"),
                        (Incoming, "pdf_path_for"), (Client, "authorised")):
        assert not hasattr(owner, name), f"{owner.__name__}.{name}"


def test_nothing_outside_the_sql_store_uses_its_private_hooks() -> None:
    root = Path(gateway.__file__).parent
    found = []
    for path in sorted(root.rglob("*.py")):
        if path.parent.name == "store" and path.name in SQL_STORE_MODULES:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not (isinstance(node, ast.Attribute) and node.attr in PRIVATE_HOOKS):
                continue
            owner = node.value
            if ((isinstance(owner, ast.Name) and owner.id in ("store", "s", "db"))
                    or (isinstance(owner, ast.Attribute) and owner.attr == "store")):
                found.append(f"{path.relative_to(root)}:{node.lineno} .{node.attr}")
    assert found == []
