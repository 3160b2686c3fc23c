"""PostgreSQL's one-statement transition (gateway/store/postgres.py `transition`): what belongs
to a transition happens only if its guarded UPDATE did, and a statement it cannot guard is
run as a transaction of statements (as on SQLite), never unguarded."""

from __future__ import annotations

from pathlib import Path

import psycopg

from gateway.jobs.outbound_states import State
from gateway.store.postgres import PostgresStore, _only_if_moved

from .conftest import pg_reset
from .helpers.jobs import add_mail


def test_the_statements_a_transition_carries_are_made_conditional() -> None:
    assert _only_if_moved("INSERT INTO attempts (job_id, n) VALUES (?, ?)") == (
        "INSERT INTO attempts (job_id, n) SELECT ?, ? FROM moved")
    assert _only_if_moved("UPDATE attempts SET a = ? WHERE job_id = ? OR n = ?") == (
        "UPDATE attempts SET a = ? WHERE (job_id = ? OR n = ?) AND EXISTS (SELECT 1 FROM moved)")
    assert _only_if_moved("DELETE FROM attempts WHERE job_id = ?") == (
        "DELETE FROM attempts WHERE (job_id = ?) AND EXISTS (SELECT 1 FROM moved)")
    # A NOTIFY selects from `moved` (the event's row reads it: `_moved`).
    assert _only_if_moved("SELECT pg_notify(?, ?)") == "SELECT pg_notify(?, ?) FROM moved"
    assert _only_if_moved("SELECT pg_notify(?, ?) WHERE EXISTS (SELECT 1 FROM jobs)") == (
        "SELECT pg_notify(?, ?) FROM moved WHERE EXISTS (SELECT 1 FROM jobs)")
    # So does a lock taken with the transition (`_locking`): only if it applied.
    assert _only_if_moved("SELECT pg_advisory_xact_lock(?)") == (
        "SELECT pg_advisory_xact_lock(?) FROM moved")
    for unguardable in ("SELECT pg_notify(?, ?) FROM jobs", "UPDATE attempts SET a = 1",
                        "UPDATE attempts SET a = (SELECT n FROM x WHERE y) WHERE job_id = ?",
                        "DELETE FROM attempts WHERE n = 1 RETURNING n",
                        "INSERT INTO attempts (job_id) SELECT id FROM jobs"):
        assert _only_if_moved(unguardable) is None  # such a transition is a transaction


def test_a_transition_that_does_not_apply_writes_nothing_that_belongs_to_it(
        pg_url: str, tmp_path: Path) -> None:
    pg_reset(pg_url)
    store = PostgresStore(pg_url)
    store.open()
    try:
        (job_id,) = add_mail(store, tmp_path, ["+15551230001"])  # type: ignore[arg-type]
        job = store.job(job_id)
        assert job is not None and job.state is State.SPOOLED
        events_before = len(store.events(job_id))
        # From `stored` only: the job is `spooled`, so neither the attempt nor the event.
        assert not store.transition(
            job_id, [State.STORED], State.SUBMITTING, "submitting", "should not be",
            also=[("INSERT INTO attempts (job_id, n, quality, started_at) VALUES (?, ?, ?, ?)",
                   (job_id, 1, "fine", 1.0))], attempt=1)
        assert store.attempts(job_id) == [] and len(store.events(job_id)) == events_before
        # From where it is: the row moves, the attempt and the event are written with it.
        assert store.transition(
            job_id, [State.SPOOLED], State.STORED, "stored", "in the media store",
            also=[("DELETE FROM attempts WHERE job_id = ? AND n = ?", (job_id, 99))],
            media_key="k.pdf")
        job = store.job(job_id)
        assert job is not None and job.state is State.STORED and job.media_key == "k.pdf"
        assert [e.kind for e in store.events(job_id)][-1] == "stored"
        # A NOTIFY goes out with a transition that applied, and only then (its condition
        # too), alone and inside a caller's transaction.
        with psycopg.connect(pg_url, autocommit=True) as listener:
            listener.execute("LISTEN faxgw_test")

            def heard() -> list[str]:
                return [n.payload for n in listener.notifies(timeout=0.5)]

            def notify(payload: str, cond: str = "1 = 1") -> list[tuple[str, tuple[str, ...]]]:
                return [(f"SELECT pg_notify(?, ?) WHERE {cond}", ("faxgw_test", payload))]

            assert not store.transition(job_id, [State.SPOOLED], State.STORED, "stored",
                                        "again", also=notify("not moved"))
            assert store.transition(job_id, [State.STORED], None, "retry", "later",
                                    also=notify("moved"))
            assert store.transition(job_id, [State.STORED], None, "retry", "later",
                                    also=notify("condition false", "1 = 0"))
            with store.tx():
                assert store.transition(job_id, [State.STORED], None, "retry", "in a tx",
                                        also=notify("in a transaction"))
                assert not store.transition(job_id, [State.SPOOLED], None, "retry", "no",
                                            also=notify("not moved in a transaction"))
            assert heard() == ["moved", "in a transaction"]
        assert [e.kind for e in store.events(job_id)][-4:] == ["stored", "retry", "retry",
                                                                "retry"]
        # A statement it cannot guard: the transition is a transaction, and still only what
        # belongs to a transition that applied is written.
        odd = [("INSERT INTO attempts (job_id, n, quality, started_at)"
                " SELECT ?, 7, 'fine', 1.0 FROM jobs WHERE id = ?", (job_id, job_id))]
        assert not store.transition(job_id, [State.SPOOLED], None, "retry", "no", also=odd)
        assert store.attempts(job_id) == []
        assert store.transition(job_id, [State.STORED], None, "retry", "yes", also=odd)
        assert [a.n for a in store.attempts(job_id)] == [7]
    finally:
        store.close()
