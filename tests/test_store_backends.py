"""The store interface on both backends: SQLite (one file) and PostgreSQL (a real server).

Every test here runs twice. "Nodes" are several store objects on one database, each with its own
NODE_ID and the one injected clock, as several gateways would be.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
from collections.abc import Callable
from dataclasses import replace

import pytest

from gateway.jobs.outbound_states import CallbackAction, State
from gateway.store import migrations, sql_intake
from gateway.store.base import StoreError
from gateway.store.postgres import PREPARE_THRESHOLD, PostgresStore
from gateway.store.rows import Message, NewJob
from gateway.store.sql import SqlStore

from .conftest import FakeClock, pg_reset
from .helpers.store import NodeFactory, add_mail, backend, clock, new_mail, node, open_backend  # noqa: F401 - fixtures


@pytest.fixture
def store(node: NodeFactory) -> SqlStore:
    return node("node-a")


# -- the interface, both backends ---------------------------------------------------------------

def test_a_job_goes_from_mail_to_report(store: SqlStore) -> None:
    assert store.schema_version() == migrations.LATEST
    [job_id] = add_mail(store, "+15551230001")
    [job] = store.claim_due(store.clock(), 10)
    assert job.id == job_id and job.state is State.SPOOLED
    assert store.mark_stored(job, "key-1")
    store.release(job_id)
    [job] = store.claim_due(store.clock(), 10)
    assert store.mark_submitting(job, "http://gw.test/cb", store.clock() + 40)
    job = store.job(job_id)
    assert store.mark_submitted(job, "sid-1", "queued", store.clock() + 600, "accepted")
    store.release(job_id)
    job = store.job(job_id)
    assert store.record_status(job, "sid-1", "delivered", pages=1, duration_s=30,
                               error_code=None, error_message=None,
                               source="callback") is CallbackAction.FINAL
    # A replayed callback is history only.
    assert store.record_status(store.job(job_id), "sid-1", "delivered", pages=1, duration_s=30,
                               error_code=None, error_message=None,
                               source="callback") is CallbackAction.IGNORE
    assert store.mark_reported(store.job(job_id), "report sent")
    assert store.job(job_id).state is State.REPORTED
    assert [e.kind for e in store.events(job_id)] == [
        "received", "stored", "submitting", "submitted", "final", "ignored", "reported"]
    [attempt] = store.attempts(job_id)
    assert (attempt.fax_sid, attempt.status, attempt.pages) == ("sid-1", "delivered", 1)
    [listing] = store.job_listing(sender="A@EXAMPLE")
    assert listing.job.id == job_id and listing.last_event.kind == "reported"
    assert store.job_ids_by_prefix(job_id[:6]) == [job_id]
    assert store.job_ids_by_fax_sid("sid-1") == [job_id]
    assert store.counts_by_state() == {"reported": 1}
    assert store.queue_depth() == 0
    store.clock.advance(10)  # type: ignore[attr-defined]
    assert store.prune(store.clock()) == 1
    assert store.job(job_id) is None


def test_a_late_word_on_an_earlier_attempts_fax_is_history_only(store: SqlStore) -> None:
    """Attempt 1 (sid-1) was busy and attempt 2 is being sent (`submitting`, its sid not known
    yet): a late "delivered" for sid-1 changes nothing; sid-2's own word does."""
    [job_id] = add_mail(store, "+15551230002")
    [job] = store.claim_due(store.clock(), 10)
    assert store.mark_stored(job, "key-1")
    assert store.mark_submitting(store.job(job_id), "http://gw.test/cb", store.clock() + 40)
    assert store.mark_submitted(store.job(job_id), "sid-1", "queued", store.clock() + 600,
                                "accepted")
    assert store.record_status(store.job(job_id), "sid-1", "busy", pages=0, duration_s=0,
                               error_code=None, error_message=None,
                               source="callback") is CallbackAction.FINAL
    assert store.schedule_retry(store.job(job_id), store.clock(), "standard", "busy")
    assert store.mark_submitting(store.job(job_id), "http://gw.test/cb", store.clock() + 40)
    job = store.job(job_id)
    assert (job.state, job.attempt, job.fax_sid) == (State.SUBMITTING, 2, None)
    late = store.record_status(job, "sid-1", "delivered", pages=1, duration_s=9,
                               error_code=None, error_message=None, source="callback")
    assert late is CallbackAction.IGNORE
    assert store.job(job_id).state is State.SUBMITTING
    assert store.mark_submitted(store.job(job_id), "sid-2", "queued", store.clock() + 600,
                                "accepted")
    assert store.record_status(store.job(job_id), "sid-2", "delivered", pages=1, duration_s=9,
                               error_code=None, error_message=None,
                               source="callback") is CallbackAction.FINAL
    assert [(a.fax_sid, a.status) for a in store.attempts(job_id)] == [
        ("sid-1", "busy"), ("sid-2", "delivered")]


def test_a_callback_is_looked_up_checked_and_recorded_in_one_call(store: SqlStore) -> None:
    """`record_callback`: an unknown token or a job not sent yet is (None, None); a job the
    caller's check refuses records nothing; one it accepts is recorded as `record_status`."""
    [job_id] = add_mail(store, "+15551230003")
    job = store.job(job_id)

    def call(accept: bool, token: str | None = None) -> tuple[object, object]:
        found, action = store.record_callback(
            token or job.callback_token, lambda j: accept and j.id == job_id, "sid-3",
            "delivered", pages=1, error_code=None, error_message=None)
        return (found.id if found else None), action

    assert call(True) == (None, None)  # no callback URL yet: never sent
    [claimed] = store.claim_due(store.clock(), 10)
    assert store.mark_stored(claimed, "key-3")
    assert store.mark_submitting(store.job(job_id), "http://gw.test/cb", store.clock() + 40)
    assert store.mark_submitted(store.job(job_id), "sid-3", "queued", store.clock() + 600, "ok")
    assert call(True, "no-such-token") == (None, None)
    events = len(store.events(job_id))
    assert call(False) == (job_id, None)
    assert store.job(job_id).state is State.SUBMITTED and len(store.events(job_id)) == events
    assert call(True) == (job_id, CallbackAction.FINAL)
    assert store.job(job_id).state is State.COMPLETED
    assert call(True) == (job_id, CallbackAction.IGNORE)  # a replay is history only


def test_a_callback_that_finds_the_job_moved_on_is_classified_again(backend: str,
                                                                     node: NodeFactory) -> None:
    """PostgreSQL records a callback without a transaction (its read, then the transition
    guarded by the state it read): the send's answer recorded meanwhile on another connection
    (the worker's, here from inside the caller's check) makes the transition miss, and the
    callback is read and classified again: the final status is recorded, not lost."""
    if not backend.startswith("postgresql"):
        pytest.skip("SQLite holds its write lock from the read to the record: nothing moves")
    a = node("node-a")
    [job_id] = add_mail(a, "+15551230004", stored=True)
    [job] = a.claim_due(a.clock(), 10)
    assert a.mark_submitting(job, "http://gw.test/cb", a.clock() + 40)
    submitting = a.job(job_id)
    seen: list[State] = []

    def accept(found: object) -> bool:
        seen.append(found.state)  # type: ignore[attr-defined]
        if len(seen) == 1:  # the send's answer lands between the read and the record
            assert a.mark_submitted(submitting, "sid-4", "queued", a.clock() + 600, "ok")
        return True

    found, action = a.record_callback(submitting.callback_token, accept, "sid-4", "delivered",
                                      pages=1, error_code=None, error_message=None)
    assert seen == [State.SUBMITTING, State.SUBMITTED]  # read again after the miss
    assert action is CallbackAction.FINAL and a.job(job_id).state is State.COMPLETED
    assert [e.kind for e in a.events(job_id)][-2:] == ["submitted", "final"]


def test_a_job_stored_before_the_250_starts_in_stored(store: SqlStore) -> None:
    [job_id] = add_mail(store, stored=True)
    job = store.job(job_id)
    assert job.state is State.STORED and job.media_key
    assert [e.kind for e in store.events(job_id)] == ["received", "stored"]


def test_a_claimed_job_is_not_claimed_again_until_released(node: NodeFactory) -> None:
    a, b = node("node-a"), node("node-b")
    [job_id] = add_mail(a)
    assert [j.id for j in a.claim_due(a.clock(), 10)] == [job_id]
    assert b.claim_due(b.clock(), 10) == []
    assert a.claim_due(a.clock(), 10, exclude=[]) == []  # not even to its holder
    a.release(job_id)
    assert [j.id for j in b.claim_due(b.clock(), 10)] == [job_id]


def test_the_workers_trip_releases_claims_and_reads_the_next_due_time_at_once(
        node: NodeFactory, clock: FakeClock) -> None:
    """`release_and_claim` (one function call on PostgreSQL, a transaction on SQLite): the
    ended steps' leases go first, so a released job that is due again is claimed in the same
    trip; one attempt in flight a number; what is excluded stays put; the next due time is read
    past what was claimed."""
    a, b = node("node-a"), node("node-b")
    [first, same_number] = add_mail(a, "+15551230001", "+15551230001", stored=True)
    [other] = add_mail(a, "+15551230002", msgid="<two@example.com>", stored=True)
    [held] = add_mail(a, "+15551230003", msgid="<three@example.com>", stored=True)
    [hers] = b.claim_due(clock(), 1, exclude=[first, same_number, other])
    assert hers.id == held and hers.lease_epoch == 1
    due, nxt = a.release_and_claim([], clock(), 10, [])
    # One of the two to +15551230001 (the other waits for it), the other number's, not b's.
    assert len([j for j in due if j.to_number == "+15551230001"]) == 1
    assert {j.id for j in due} - {first, same_number} == {other}
    assert all(j.lease_epoch == 1 and j.state is State.STORED for j in due)
    waiting = ({first, same_number} - {j.id for j in due}).pop()
    # What is left is due now but waits on its number: the next due time is b's lease end
    # (its job is the only other unclaimed one), not the waiting job's.
    assert nxt == pytest.approx(clock() + a.lease_s)
    # A step ended: its lease goes and the job, due again, comes back in the same trip with a
    # new fencing token; an excluded job is neither claimed nor counted.
    ended = next(j for j in due if j.id == other)
    due, nxt = a.release_and_claim([ended.id], clock(), 10, [])
    assert [(j.id, j.lease_epoch) for j in due] == [(other, 2)]
    assert a.lease_of(other)[0] == "node-a"
    # Excluded (a's steps in flight, b's job), they are not counted in the next due time
    # either, and the job waiting on its number has none.
    dialling = ({first, same_number} - {waiting}).pop()
    assert a.release_and_claim([], clock(), 10, [dialling, other, held]) == ([], None)
    # With no room (limit 0) the leases still go and nothing is claimed.
    due, _ = a.release_and_claim([other], clock(), 0, [])
    assert due == [] and a.lease_of(other) == (None, None)
    # Another node's lease is not released by this node.
    a.release_and_claim([held], clock(), 0, [])
    assert b.lease_of(held)[0] == "node-b"
    # Floats stay floats (PostgreSQL's function answers in JSON, where 5.0 reads as 5).
    [again] = a.release_and_claim([], float(int(clock()) + 1), 10, [])[0]
    assert again.id == other and isinstance(again.next_run_at, float)
    assert isinstance(again.created_at, float) and isinstance(again.updated_at, float)


def test_a_dead_nodes_job_is_taken_over_after_the_lease(node: NodeFactory,
                                                        clock: FakeClock) -> None:
    a, b = node("node-a"), node("node-b")
    [job_id] = add_mail(a, stored=True)
    [job] = a.claim_due(clock(), 10)
    assert a.mark_submitting(job, "http://gw.test/cb", clock() + 40)
    # node-a dies here: the send's outcome is unknown, its lease stops being renewed.
    clock.advance(29)
    assert b.claim_due(clock(), 10) == []
    assert b.next_due_at() == pytest.approx(clock() + 1)  # when the lease runs out
    clock.advance(11)  # past the lease and the recheck time
    [taken] = b.claim_due(clock(), 10)
    # Taken over in `submitting`: the worker looks the fax up at SignalWire, never resends.
    assert (taken.id, taken.state) == (job_id, State.SUBMITTING)
    assert b.lease_of(job_id)[0] == "node-b"


def test_a_live_nodes_job_is_never_taken(node: NodeFactory, clock: FakeClock) -> None:
    a, b = node("node-a"), node("node-b")
    [job_id] = add_mail(a)
    a.claim_due(clock(), 10)
    for _ in range(20):  # 200 s of heartbeats every 10 s (LEASE_SECONDS/3)
        clock.advance(10)
        assert a.renew_leases([job_id], clock()) == {job_id}
        assert b.claim_due(clock(), 10) == []


def test_a_node_that_lost_its_lease_cannot_start_the_send(node: NodeFactory,
                                                          clock: FakeClock) -> None:
    """A node that stalled past its lease must not send what the new holder is sending."""
    a, b = node("node-a"), node("node-b")
    [job_id] = add_mail(a, stored=True)
    [stale] = a.claim_due(clock(), 10)
    clock.advance(31)
    [taken] = b.claim_due(clock(), 10)
    assert a.renew_leases([job_id], clock()) == set()
    assert not a.mark_submitting(stale, "http://gw.test/cb", clock() + 40)
    assert b.mark_submitting(taken, "http://gw.test/cb", clock() + 40)
    assert len(b.attempts(job_id)) == 1


def test_a_stale_claim_records_nothing_even_once_the_new_holder_let_go(
        node: NodeFactory, clock: FakeClock) -> None:
    """The fencing token: node-b claimed the job after node-a's lease ran out, did its step
    and released it. node-a, waking up, holds an older claim: its changes (the send, the
    report, the document's deletion) match nothing, though no node holds the job now."""
    a, b = node("node-a"), node("node-b")
    [send_id] = add_mail(a, "+15551230031", stored=True)
    [report_id] = add_mail(a, "+15551230032", stored=True)
    assert a.cancel_unsent(report_id, "canceled", clock())  # given up: its report is due
    stale = {j.id: j for j in a.claim_due(clock(), 10)}
    assert set(stale) == {send_id, report_id}
    clock.advance(31)
    taken = {j.id: j for j in b.claim_due(clock(), 10)}
    assert {j.lease_epoch for j in taken.values()} == {stale[send_id].lease_epoch + 1}
    b.release(*taken)
    assert a.lease_of(send_id) == (None, None)
    assert not a.mark_submitting(stale[send_id], "http://gw.test/cb", clock() + 40)
    assert not a.mark_reporting(stale[report_id], 1, "report 1: mailing it")
    assert not a.mark_reported(stale[report_id], "report relayed")
    assert not a.mark_given_up(stale[send_id], "late")
    assert [a.job(i).state for i in (send_id, report_id)] == [State.STORED, State.GIVEN_UP]
    # Under the claim that came after, the same changes are made.
    assert b.mark_reporting(taken[report_id], 1, "report 1: mailing it")
    assert b.mark_reported(taken[report_id], "report relayed")
    assert not a.claim_purge(a.job(report_id).message_id, stale[report_id])
    assert b.claim_purge(b.job(report_id).message_id, taken[report_id])


def test_a_document_being_deleted_is_not_resent_and_a_resent_one_not_deleted(
        node: NodeFactory, clock: FakeClock) -> None:
    """The purge and a resend of the same document decide against each other in the
    database: a resend recorded first keeps the document; a purge recorded first refuses
    the resend."""
    store = node("node-a")
    first, second = add_mail(store, "+15551230033"), add_mail(store, "+15551230034")
    for job in store.claim_due(clock(), 10):
        assert store.mark_given_up(job, "canceled")
        assert store.mark_reported(store.job(job.id), "report relayed")
    one, two = store.job(first[0]), store.job(second[0])
    assert one is not None and two is not None
    resend = NewJob("r" + one.id[1:], one.to_number, one.from_number, "fine", "tok-r1",
                    one.media_key)
    assert store.add_resend(one, resend, clock(), stored=True) is None
    assert not store.claim_purge(one.message_id)  # the resend needs the document
    assert store.claim_purge(two.message_id)
    again = NewJob("r" + two.id[1:], two.to_number, two.from_number, "fine", "tok-r2",
                   two.media_key)
    assert store.add_resend(two, again, clock(), stored=True) is not None


def test_one_attempt_in_flight_per_number_across_nodes(node: NodeFactory,
                                                       clock: FakeClock) -> None:
    a, b = node("node-a"), node("node-b")
    first = add_mail(a, "+15551230009", stored=True)[0]
    second = add_mail(a, "+15551230009", stored=True)[0]
    other = add_mail(a, "+15551230010", stored=True)[0]
    claimed_a = {j.id for j in a.claim_due(clock(), 1)}
    claimed_b = {j.id for j in b.claim_due(clock(), 10)}
    # One of the two to ...0009 is claimed; the other waits while that one is in flight.
    assert len(claimed_a | claimed_b) == 2 and other in claimed_a | claimed_b
    [mine] = (claimed_a | claimed_b) - {other}
    assert mine in (first, second)
    waiting = second if mine == first else first
    holder = a if mine in claimed_a else b
    assert holder.mark_submitting(holder.job(mine), "http://gw.test/cb", clock() + 40)
    holder.release(mine)  # in flight now by its state, not its lease
    clock.advance(60)
    reclaimed = {j.id: j for j in b.claim_due(clock(), 10)}
    assert waiting not in reclaimed
    # Its lookup came due, so node-b holds `mine` now: the answer is recorded under its claim.
    owner, held = (b, reclaimed[mine]) if mine in reclaimed else (holder, holder.job(mine))
    assert owner.mark_submitted(held, "sid-9", "queued", clock() + 600, "ok")
    assert holder.record_status(holder.job(mine), "sid-9", "delivered", pages=1, duration_s=1,
                                error_code=None, error_message=None,
                                source="callback") is CallbackAction.FINAL
    assert waiting in {j.id for j in b.claim_due(clock(), 10)}


def _claim_many(make: Callable[[], SqlStore], out: list[str], rounds: int,
                start: threading.Barrier) -> None:
    store = make()
    start.wait()  # every node connected before the first claim: they really compete
    try:
        for _ in range(rounds):
            for job in store.claim_due(store.clock(), 3):
                out.append(job.id)  # never released: each job must be claimed exactly once
    finally:
        store.close()


def test_concurrent_claims_never_give_a_job_to_two_nodes(backend: str, store: SqlStore,
                                                         clock: FakeClock) -> None:
    ids = [add_mail(store, f"+1555124{i:04d}")[0] for i in range(60)]

    def make(node_id: str) -> Callable[[], SqlStore]:
        def opened() -> SqlStore:
            s = open_backend(backend, clock)
            s.node_id, s.lease_s = node_id, 30.0
            s.open()
            return s
        return opened

    results: list[list[str]] = [[] for _ in range(4)]
    start = threading.Barrier(4)
    threads = [threading.Thread(target=_claim_many,
                                args=(make(f"n{i}"), results[i], 30, start))
               for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    claimed = [job_id for r in results for job_id in r]
    assert sorted(claimed) == sorted(ids)  # every job once, none twice


def commit(store: SqlStore, *numbers: str, window_h: float = 24, **kw: str | None) -> list[str]:
    """The jobs a mail became: new ones, or an earlier copy's (a resend)."""
    message, jobs = new_mail(store, *numbers, **kw)
    earlier = store.add_message(message, jobs, dedup_since=store.clock() - window_h * 3600)
    return [j.id for j in jobs] if earlier is None else earlier


def test_a_resent_mail_is_recognised_in_the_commit(store: SqlStore, clock: FakeClock) -> None:
    one, two = "+15551230001", "+15551230002"
    first = commit(store, one, two)
    assert commit(store, two, one) == first[::-1]  # the same mail again: its jobs
    assert commit(store, one) == first[:1]  # to one of its numbers: that job
    assert len(store.jobs()) == 2  # and nothing was written
    for other in (dict(sha="cd" * 32), dict(msgid="<b@x>"), dict(msgid=None)):
        assert set(commit(store, one, **other)).isdisjoint(first)  # another mail
    assert set(commit(store, one, msgid=None)).isdisjoint(first)  # never merged: no id
    # A new recipient makes it a new mail, which the next copy then names.
    third = commit(store, one, "+15551230003")
    assert set(third).isdisjoint(first)
    assert commit(store, one, "+15551230003") == third
    # Past the window an earlier copy no longer counts: a new job, and it holds the key now.
    clock.advance(23 * 3600)
    assert commit(store, two) == first[1:]
    clock.advance(2 * 3600)
    later = commit(store, two)
    assert set(later).isdisjoint(first)
    assert commit(store, two) == later
    # Without a window nothing is merged.
    message, jobs = new_mail(store, two)
    assert store.add_message(message, jobs) is None
    # Pruned jobs take their keys with them.
    for job in store.jobs(limit=1000):
        store.mark_given_up(job, "test")
        store.mark_reported(store.job(job.id), "test")
    clock.advance(1)
    while store.prune(clock()):
        pass
    assert store._scalar("SELECT COUNT(*) AS n FROM dedup_keys") == 0


def test_a_failed_intake_commit_leaves_nothing_and_the_store_usable(store: SqlStore) -> None:
    """A statement failing inside the commit (PostgreSQL: in the middle of its pipeline) undoes
    the whole mail, says so as StoreError, and the next mail commits."""
    message, jobs = new_mail(store, "+15551230001")
    assert store.add_message(message, jobs) is None
    again, others = new_mail(store, "+15551230002")
    with pytest.raises(StoreError):
        store.add_message(replace(again, id=message.id), others, dedup_since=0.0)
    assert [j.id for j in store.jobs()] == [jobs[0].id]
    assert store.events(others[0].id) == []
    assert commit(store, "+15551230002") != []
    assert len(store.jobs()) == 2


def test_mails_committed_together_each_get_their_own_answer(store: SqlStore) -> None:
    """`add_messages` (a burst's mails that end DATA together): one transaction, and per mail
    what `add_message` would have said, a copy of a mail earlier in the same batch included."""
    since = store.clock() - 3600
    first, copy, other = (new_mail(store, "+15551230001"), new_mail(store, "+15551230001"),
                          new_mail(store, "+15551230002", msgid="<b@x>"))
    results = store.add_messages([(m, j, False, since) for m, j in (first, copy, other)])
    assert results == [None, [first[1][0].id], None]
    assert sorted(j.id for j in store.jobs()) == sorted([first[1][0].id, other[1][0].id])
    assert store.message(copy[0].id) is None  # nothing of the copy was kept
    # One mail that cannot be committed keeps the whole batch out: each says so; the next
    # batch commits.
    broken = (replace(new_mail(store, "+15551230003")[0], id=first[0].id),
              new_mail(store, "+15551230003")[1])
    fine = new_mail(store, "+15551230004", msgid="<c@x>")
    results = store.add_messages([(*fine, False, since), (*broken, False, since)])
    assert all(isinstance(r, StoreError) for r in results)
    assert store.job(fine[1][0].id) is None
    assert store.add_messages([(*fine, False, since)]) == [None]
    assert store.job(fine[1][0].id) is not None


async def test_mails_ending_data_together_share_a_commit(backend: str, clock: FakeClock) -> None:
    """`Store.add_message_soon`: mails waiting while a store thread is busy go in together."""
    store = open_backend(backend, clock)
    await store.start()
    try:
        batches: list[int] = []
        real = store.add_messages

        def counted(mails):  # type: ignore[no-untyped-def]
            batches.append(len(mails))
            return real(mails)

        store.add_messages = counted  # type: ignore[method-assign]
        gate = threading.Event()
        blockers = [asyncio.ensure_future(store.run_first(gate.wait, 30))
                    for _ in range(store.THREADS)]  # every store thread busy
        mails = [new_mail(store, f"+1555123{n:04d}", msgid=f"<{n}@x>") for n in range(10)]
        pending = [asyncio.ensure_future(store.add_message_soon(m, j, dedup_since=0.0))
                   for m, j in mails]
        await asyncio.sleep(0)  # every mail queued before the threads are free
        gate.set()
        await asyncio.gather(*blockers)
        assert await asyncio.gather(*pending) == [None] * 10
        assert sum(batches) == 10 and len(batches) < 10, batches
        assert len(await store.run(store.jobs)) == 10
    finally:
        await store.stop()


def test_two_copies_committed_at_once_make_one_job(backend: str, node: NodeFactory,
                                                   clock: FakeClock) -> None:
    """Copy A's commit has claimed its key and is still open when copy B commits on another
    connection (another node): B waits for A and then names A's job; one job in all."""
    a, b = node("node-a"), node("node-b")
    claimed, go = threading.Event(), threading.Event()
    original = a._claimed  # where the claim's rows are read: it is made by then

    def claim_and_hold(*args: object) -> list[str] | None:
        found = original(*args)  # type: ignore[arg-type]
        claimed.set()
        assert go.wait(30)
        return found

    a._claimed = claim_and_hold  # type: ignore[method-assign]
    copy_a, copy_b = new_mail(a, "+15551230001"), new_mail(b, "+15551230001")
    since = clock() - 3600
    results: dict[str, list[str] | None] = {}

    def add(name: str, store: SqlStore, mail: tuple[Message, list[NewJob]]) -> None:
        results[name] = store.add_message(*mail, dedup_since=since)

    ta = threading.Thread(target=add, args=("a", a, copy_a))
    ta.start()
    assert claimed.wait(30)
    tb = threading.Thread(target=add, args=("b", b, copy_b))
    tb.start()
    if backend.startswith("postgresql"):  # B is blocked on A's key (SQLite: on its lock)
        # Straight to the server: behind PgBouncer, A and B hold both of its connections.
        watch = PostgresStore(backend.direct, clock)
        watch.open()
        try:
            while not watch._scalar("SELECT COUNT(*) AS n FROM pg_locks WHERE NOT granted"):
                tb.join(0.01)
                assert tb.is_alive(), "B finished while A held its key"
        finally:
            watch.close()
    go.set()
    ta.join()
    tb.join()
    assert results == {"a": None, "b": [copy_a[1][0].id]}
    assert [j.id for j in a.jobs()] == [copy_a[1][0].id]


def test_mails_accepted_before_the_dedup_keys_are_still_known(
        node: NodeFactory, clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    """A database of version 4 (the same mail faxed twice, as it could be then) upgrades: the
    newest job per key is recorded, so a copy resent after the upgrade is that job."""
    with monkeypatch.context() as old:
        old.setattr(migrations, "MIGRATIONS", migrations.MIGRATIONS[:4])
        old.setattr(migrations, "LATEST", 4)
        # The message columns added since version 4 are not there to write.
        old.setattr(sql_intake, "_MESSAGE_COLUMNS",
                    tuple(c for c in sql_intake._MESSAGE_COLUMNS if c not in ("auth_results",)))
        v4 = node("old-version")
        twice = [j for _ in range(2) for j in add_mail(v4, "+15551230001", msgid="<a@x>")]
        clock.advance(1)
        newest = add_mail(v4, "+15551230001", msgid="<a@x>")
        add_mail(v4, "+15551230001", msgid=None)
        assert v4.schema_version() == 4
    store = node("node-a")
    assert store.schema_version() == migrations.LATEST
    assert commit(store, "+15551230001") == newest
    assert set(commit(store, "+15551230001", msgid=None)).isdisjoint(twice + newest)


def test_the_leader_lease_moves_only_when_its_holder_stops(node: NodeFactory,
                                                          clock: FakeClock) -> None:
    a, b = node("node-a"), node("node-b")
    assert a.take_lead("housekeeping", clock(), 90)
    assert not b.take_lead("housekeeping", clock(), 90)
    clock.advance(60)
    assert a.take_lead("housekeeping", clock(), 90)  # renewed
    clock.advance(60)
    assert not b.take_lead("housekeeping", clock(), 90)
    clock.advance(31)  # node-a stopped renewing 91 s ago
    assert b.take_lead("housekeeping", clock(), 90)
    assert not a.take_lead("housekeeping", clock(), 90)


def test_send_slots_are_shared_by_every_node(node: NodeFactory, clock: FakeClock) -> None:
    a, b = node("node-a"), node("node-b")
    slots = [a.take_send_slot(clock(), 1.0), b.take_send_slot(clock(), 1.0),
             a.take_send_slot(clock(), 1.0)]
    assert slots == [clock(), clock() + 1, clock() + 2]
    clock.advance(10)
    assert b.take_send_slot(clock(), 1.0) == clock()  # no backlog carried over an idle time


def test_send_slots_taken_at_once_by_two_nodes_are_each_their_own(
        node: NodeFactory, clock: FakeClock) -> None:
    """Slots taken at the same moment by two nodes, the first ones of a new database too:
    each its own, one interval apart, whichever node made the slot's row."""
    import concurrent.futures

    a, b = node("node-a"), node("node-b")
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        slots = [slot for taken in pool.map(
            lambda s: [s.take_send_slot(clock(), 1.0) for _ in range(10)], [a, b])
            for slot in taken]
    assert sorted(slots) == [clock() + n for n in range(20)]


def test_hits_are_counted_across_nodes(node: NodeFactory, clock: FakeClock) -> None:
    a, b = node("node-a"), node("node-b")
    assert a.add_hit("auth", "bob", clock(), clock() - 900) == 1
    assert b.add_hit("auth", "bob", clock(), clock() - 900) == 2
    assert a.count_hits("auth", "bob", clock() - 900) == 2
    clock.advance(901)
    assert b.add_hit("auth", "bob", clock(), clock() - 900) == 1
    b.clear_hits("auth", "bob")
    assert a.count_hits("auth", "bob", clock() - 900) == 0


def test_rate_hits_charge_at_data_give_back_and_age_out(node: NodeFactory,
                                                        clock: FakeClock) -> None:
    """The shared rate limit: looking charges nothing, a charge of N is all or nothing, a
    refused message gives exactly its N back, and housekeeping forgets hits past every window."""
    a, b = node("node-a"), node("node-b")
    rules = [("rate", "sender:x", 3)]
    assert a.hits_wait(rules, 3, clock(), 3600) == 0.0
    assert a.count_hits("rate", "sender:x", clock() - 3600) == 0
    assert a.take_hits(rules, clock(), 3600, 2) == 0.0
    assert b.take_hits(rules, clock(), 3600, 2) > 0  # 2 more do not fit: none recorded
    assert b.count_hits("rate", "sender:x", clock() - 3600) == 2
    b.give_back_hits([("rate", "sender:x")], 2)
    assert a.count_hits("rate", "sender:x", clock() - 3600) == 0
    assert b.take_hits(rules, clock(), 3600, 3) == 0.0
    assert a.hits_wait(rules, 1, clock(), 3600) > 0
    clock.advance(3601)
    assert a.prune_hits(clock() - 3600) == 3
    assert a.hits_wait(rules, 3, clock(), 3600) == 0.0


def test_restart_releases_leases_left_by_the_same_node(node: NodeFactory,
                                                       clock: FakeClock) -> None:
    a = node("node-a")
    [job_id] = add_mail(a)
    a.claim_due(clock(), 10)
    again = node("node-a")  # the same NODE_ID, restarted
    assert again.release_all() == 1
    assert [j.id for j in again.claim_due(clock(), 10)] == [job_id]


# -- PostgreSQL only ----------------------------------------------------------------------------

def _open_and_close(url: str) -> int:
    store = PostgresStore(url)
    store.open()
    try:
        return store.schema_version()
    finally:
        store.close()


def test_nodes_starting_together_migrate_once(pg_url: str) -> None:
    pg_reset(pg_url)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(3) as pool:
        versions = pool.map(_open_and_close, [pg_url] * 3)
    assert versions == [migrations.LATEST] * 3
    store = PostgresStore(pg_url)
    store.open()
    try:
        rows = store._rows("SELECT version FROM schema_version ORDER BY version")
        assert [r["version"] for r in rows] == list(range(1, migrations.LATEST + 1))
    finally:
        store.close()


def test_the_password_is_never_shown(pg_url: str) -> None:
    store = PostgresStore("postgresql://faxgw:s3cret-pw@127.0.0.1:1/nowhere",
                          connect_timeout_s=1)
    assert "s3cret-pw" not in store.where and "********" in store.where
    with pytest.raises(Exception) as caught:
        store.open()
    assert "s3cret-pw" not in str(caught.value)


async def test_calls_on_the_store_threads_at_once_keep_their_limits(
        node: NodeFactory, clock: FakeClock) -> None:
    """Store.run on every thread the backend has (PostgreSQL: several, each transaction on its
    own pooled connection): twenty rate-limit charges racing for ten places take exactly ten,
    and twenty mails committed at once are twenty messages, each with its job."""
    store = node("node-a")
    store.close()  # reopened by start(), with the store's own threads
    await store.start()
    try:
        rules = [("rate", "sender:race", 10)]
        waits = await asyncio.gather(*(store.run(store.take_hits, rules, clock(), 3600)
                                       for _ in range(20)))
        assert sum(1 for w in waits if w == 0.0) == 10
        assert store.count_hits("rate", "sender:race", clock() - 3600) == 10
        jobs = await asyncio.gather(*(store.run(add_mail, store, "+15551230000")
                                      for _ in range(20)))
        assert len({j for ids in jobs for j in ids}) == 20
        assert len(store.jobs()) == 20
    finally:
        await store.stop()


def test_a_thread_that_finds_no_connection_makes_the_others_give_theirs_back(
        pg_url: str) -> None:
    """Two store threads: one keeps a connection, the other holds none. The server kills the
    database's connections and refuses new ones; the thread without one finds none to be had.
    Once the server takes connections again, the first thread's next call works: it took a
    fresh connection instead of its dead kept one (a server outage costs one failed call)."""
    import concurrent.futures

    import psycopg

    pg_reset(pg_url)
    store = PostgresStore(pg_url, connect_timeout_s=1)
    store.open()
    dbname = pg_url.rsplit("/", 1)[1]
    admin_url = pg_url.rsplit("/", 1)[0] + "/postgres"
    a = concurrent.futures.ThreadPoolExecutor(1)
    b = concurrent.futures.ThreadPoolExecutor(1)
    try:
        a.submit(store.open_thread).result()
        b.submit(store.open_thread).result()
        assert a.submit(store.job, "no-such-job").result() is None  # a now keeps one
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS false')
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                          " WHERE datname = %s", (dbname,))
        try:
            with pytest.raises(Exception) as caught:
                b.submit(store.job, "no-such-job").result()
            assert store.is_db_error(caught.value)
        finally:
            with psycopg.connect(admin_url, autocommit=True) as admin:
                admin.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS true')
        # The pool tries again after a growing pause (1 s, 2 s, ...): wait for its next try.
        store.pool.wait(timeout=30)
        assert a.submit(store.job, "no-such-job").result() is None
        assert b.submit(store.job, "no-such-job").result() is None
    finally:
        a.submit(store.close_thread).result()
        b.submit(store.close_thread).result()
        a.shutdown()
        b.shutdown()
        store.close()


def _prepared_count(store: PostgresStore) -> int:
    """Prepared statements on the store's one connection (its pool holds one)."""
    return int(store._rows("SELECT COUNT(*) AS n FROM pg_prepared_statements")[0]["n"])


@pytest.mark.parametrize("prepared", [True, False])
def test_frequent_queries_are_prepared_unless_turned_off(pg_url: str, prepared: bool) -> None:
    from gateway.config import settings_from
    from gateway.store.factory import open_store

    pg_reset(pg_url)
    settings = settings_from({"DATABASE_URL": pg_url, "MEDIA_STORE": "s3", "S3_BUCKET": "faxes",
                              "DATABASE_PREPARED_STATEMENTS": "yes" if prepared else "no"})
    chosen = open_store(settings)
    assert isinstance(chosen, PostgresStore)
    store = PostgresStore(pg_url, max_connections=1, prepared_statements=prepared)
    assert store.prepare_threshold == chosen.prepare_threshold
    store.open()
    try:
        before = _prepared_count(store)
        for _ in range(PREPARE_THRESHOLD + 1):
            assert store.job("no-such-job") is None
        assert (_prepared_count(store) > before) is prepared
    finally:
        store.close()


def test_a_migration_elsewhere_costs_one_call_not_every_call(pg_url: str) -> None:
    """A node that prepared `SELECT * FROM jobs` and then sees another node add a column (a
    newer version's migration): PostgreSQL refuses the old plan once; the connection then
    forgets its prepared statements, and the next call works."""
    import psycopg

    pg_reset(pg_url)
    store = PostgresStore(pg_url, max_connections=1)
    store.open()
    try:
        [job_id] = add_mail(store)
        for _ in range(PREPARE_THRESHOLD + 1):
            assert store.job(job_id) is not None
        with psycopg.connect(pg_url, autocommit=True) as other:
            other.execute("ALTER TABLE jobs ADD COLUMN added_by_a_newer_node INTEGER")
        with pytest.raises(psycopg.errors.FeatureNotSupported):
            store.job(job_id)
        for _ in range(PREPARE_THRESHOLD + 1):  # prepared again, against the new table
            job = store.job(job_id)
            assert job is not None and job.id == job_id
    finally:
        store.close()


def test_a_purged_messages_jobs_are_not_listed_for_purging(store: SqlStore) -> None:
    [job_id] = add_mail(store, "+15551230041")
    job = store.job(job_id)
    assert job is not None
    assert [j.id for j in store.message_jobs(job.message_id, True)] == [job_id]
    store.mark_purged(job.message_id)
    assert store.message_jobs(job.message_id, True) == []
    assert [j.id for j in store.message_jobs(job.message_id)] == [job_id]  # still there


def test_the_last_report_of_a_message_claims_its_purge_with_it(node: NodeFactory,
                                                               clock: FakeClock) -> None:
    """`mark_reported_and_claim_purge`: the report is recorded under its claim; the purge is
    claimed by the report that leaves no job of the message unreported (whichever node makes
    it), with the message's jobs; a report of a lost claim records nothing."""
    a, b = node("node-a"), node("node-b")
    first, second = add_mail(a, "+15551230051", "+15551230052", stored=True)
    for job in a.claim_due(clock(), 10):  # both given up (a report is due for each)
        assert a.mark_given_up(job, "the number is not a fax")
    a.release(first, second)
    [one] = a.claim_due(clock(), 1, exclude=[second])
    [two] = b.claim_due(clock(), 1)
    assert (one.id, two.id) == (first, second)
    assert a.mark_reported_and_claim_purge(one, "report sent") == (True, None)  # one left
    stale = replace(two, lease_epoch=two.lease_epoch - 1)
    assert b.mark_reported_and_claim_purge(stale, "report sent") == (False, None)
    recorded, jobs = b.mark_reported_and_claim_purge(two, "report sent")
    assert recorded and jobs is not None
    assert sorted((j.id, j.state) for j in jobs) == [(first, State.REPORTED),
                                                     (second, State.REPORTED)]


def test_the_send_slot_and_submitting_answer_the_job_as_it_is_then(node: NodeFactory,
                                                                   clock: FakeClock) -> None:
    """`take_send_slot_and_submit`: a slot that is now marks the job `submitting` and answers
    its row as the commit left it (PostgreSQL: from the transition's own statement); a slot
    later than now is only reserved; a lost claim marks nothing."""
    a, b = node("node-a"), node("node-b")
    [first] = add_mail(a, "+15551230061", stored=True)
    [second] = add_mail(a, "+15551230062", msgid="<two@example.com>", stored=True)
    [job] = a.claim_due(clock(), 1, exclude=[second])
    at, row = a.take_send_slot_and_submit(job, clock(), 5.0, "http://gw.test/cb/1",
                                          clock() + 40)
    assert at == clock() and row is not None
    assert (row.id, row.state, row.attempt, row.callback_url) == (
        first, State.SUBMITTING, 1, "http://gw.test/cb/1")
    assert row == a.job(first) and row.lease_epoch == job.lease_epoch
    assert isinstance(row.next_run_at, float) and row.next_run_at == clock() + 40
    assert len(a.attempts(first)) == 1
    # The next send waits for its slot: reserved, nothing marked.
    [other] = b.claim_due(clock(), 1)
    at, row = b.take_send_slot_and_submit(other, clock(), 5.0, "http://gw.test/cb/2",
                                          clock() + 40)
    assert at == clock() + 5.0 and row is None
    assert b.job(second).state is State.STORED
    # A free slot, but a claim lost meanwhile (a stale fencing token): nothing is marked.
    clock.advance(20.0)
    stale = replace(other, lease_epoch=other.lease_epoch - 1)
    assert b.take_send_slot_and_submit(stale, clock(), 5.0, "http://gw.test/cb/2",
                                       clock() + 40) == (clock(), None)
    assert b.job(second).state is State.STORED and b.attempts(second) == []
