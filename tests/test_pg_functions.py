"""PostgreSQL's functions (gateway/store/postgres.py `_FUNCTIONS`): the worker's trip as one call.
What they do is tested on both backends in test_store_backends.py; here, how they come to be."""

from __future__ import annotations

import hashlib
from pathlib import Path

import psycopg

from gateway.store import postgres
from gateway.store.postgres import PostgresStore

from .conftest import pg_reset
from .helpers.jobs import add_mail


def _functions(url: str) -> set[str]:
    with psycopg.connect(url) as db:
        return {name for (name,) in db.execute(
            "SELECT proname FROM pg_proc WHERE proname LIKE 'faxgw_%'")}


def test_each_function_is_made_at_start_once_and_named_by_its_text(
        pg_url: str, tmp_path: Path) -> None:
    pg_reset(pg_url)
    body = postgres._FUNCTIONS[postgres._CLAIM_FUNCTION][2]
    # A node of another version (another body) has a function of its own: none is replaced
    # under a running node.
    assert postgres._CLAIM_FUNCTION.endswith(hashlib.sha256(body.encode()).hexdigest()[:12])
    a, b = PostgresStore(pg_url), PostgresStore(pg_url)
    a.open()
    b.open()  # a second node starting: finds it made
    try:
        assert _functions(pg_url) == set(postgres._FUNCTIONS)
        (job_id,) = add_mail(a, tmp_path, ["+15551230001"])  # type: ignore[arg-type]
        assert [j.id for j in a.claim_due(a.clock(), 10)] == [job_id]
    finally:
        a.close()
        b.close()


def test_a_database_that_lost_the_function_gets_it_back_at_the_next_claim(
        pg_url: str, tmp_path: Path) -> None:
    """A database restored from a dump of its tables, or emptied under a running node: the
    claim makes the function again and goes on, rather than failing every trip."""
    pg_reset(pg_url)
    store = PostgresStore(pg_url)
    store.open()
    try:
        for _ in range(postgres.PREPARE_THRESHOLD + 1):  # the call is prepared by now
            assert store.release_and_claim([], store.clock(), 10, []) == ([], None)
        (job_id,) = add_mail(store, tmp_path, ["+15551230001"])  # type: ignore[arg-type]
        with psycopg.connect(pg_url, autocommit=True) as db:
            for name in postgres._FUNCTIONS:
                db.execute(f"DROP FUNCTION {name}")
        assert _functions(pg_url) == set()
        due, nxt = store.release_and_claim([], store.clock(), 10, [])
        assert [j.id for j in due] == [job_id] and nxt is None
        assert _functions(pg_url) == set(postgres._FUNCTIONS)
        with psycopg.connect(pg_url, autocommit=True) as db:
            db.execute(f"DROP FUNCTION {postgres._HITS_FUNCTION}")
        rules = [("mail-sender", "a@example.com", 1)]
        assert store.take_hits(rules, store.clock(), 3600) == 0.0
        assert store.take_hits(rules, store.clock(), 3600) > 0  # counted: the limit holds
        assert _functions(pg_url) == set(postgres._FUNCTIONS)
    finally:
        store.close()


def test_the_hits_commit_is_relaxed_as_the_statements_made_it(pg_url: str) -> None:
    """A hit lost to a server crash costs nothing (a rate limit a little looser), so its commit
    does not wait for the WAL flush: inside the function as SET LOCAL was outside it, for
    that transaction only."""
    pg_reset(pg_url)
    store = PostgresStore(pg_url)
    store.open()
    store.close()
    with psycopg.connect(pg_url) as db:  # a transaction around the call, to look inside it
        assert db.execute("SHOW synchronous_commit").fetchone() == ("on",)
        (inserted,) = db.execute(
            f"SELECT {postgres._HITS_FUNCTION}(%s, %s, %s, %s, %s, %s, 1, 0, 1)",
            (["k"], ["a"], [5], ["k"], ["a"], [10.0])).fetchone()
        assert inserted == 1
        assert db.execute("SHOW synchronous_commit").fetchone() == ("off",)
        db.commit()
        assert db.execute("SHOW synchronous_commit").fetchone() == ("on",)
