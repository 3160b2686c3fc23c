"""The pure rules of the job state machine, each on its own: the transition table (and that the
store keeps to it), callback classification, retry decisions and backoff."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from gateway.config import settings_from
from gateway.jobs.outbound_states import (
    ACTIVE_STATES,
    FINISHED,
    TRANSITIONS,
    CallbackAction,
    Ev,
    IllegalTransition,
    Job,
    RetryPolicy,
    State,
    allowed,
    backoff_s,
    check_transition,
    classify_callback,
    retry_decision,
    sources_of,
)
from gateway.store.rows import Message, NewJob
from gateway.store.sqlite import SqliteStore

from .conftest import base_env

T0 = 1_700_000_000.0


# -- the table ----------------------------------------------------------------------------------

def test_table_rows_are_unique_and_name_real_states() -> None:
    keys = [(t.source, t.target, t.event) for t in TRANSITIONS]
    assert len(keys) == len(set(keys))
    assert all(isinstance(t.event, Ev) and t.why for t in TRANSITIONS)
    assert {t.target for t in TRANSITIONS} == set(State)
    # A job is born spooled, and only born: nothing moves back into the spool.
    assert [t.source for t in TRANSITIONS if t.target is State.SPOOLED
            and t.source is not State.SPOOLED] == [None]


def test_every_state_can_end_in_a_report() -> None:
    reaches: set[State] = {State.REPORTED}
    changed = True
    while changed:
        changed = False
        for t in TRANSITIONS:
            if t.source is not None and t.target in reaches and t.source not in reaches:
                reaches.add(t.source)
                changed = True
    assert reaches == set(State)
    # Any active state can be given up on (an outage that outlasts GIVE_UP_HOURS).
    assert sources_of(State.GIVEN_UP, Ev.GIVEN_UP) == ACTIVE_STATES - {State.GIVEN_UP}
    # Reported leaves only by the operator's "report again".
    assert {t.event for t in TRANSITIONS if t.source is State.REPORTED
            and t.target is not State.REPORTED} == {Ev.REPORT_AGAIN}


def test_check_transition_refuses_what_the_table_lacks() -> None:
    check_transition([State.SPOOLED], State.STORED, Ev.STORED)
    for source, target, event in ((State.SPOOLED, State.REPORTED, Ev.REPORTED),
                                  (State.SUBMITTED, State.STORED, Ev.RETRY),
                                  (State.REPORTED, State.STORED, Ev.RETRY),
                                  (State.STORED, State.STORED, Ev.STORED),
                                  (State.SUBMITTED, State.COMPLETED, Ev.REPORTED)):
        assert not allowed(source, target, event)
        with pytest.raises(IllegalTransition, match="not in the table"):
            check_transition([source], target, event)
    # One bad source among good ones is enough to refuse.
    with pytest.raises(IllegalTransition):
        check_transition([State.COMPLETED, State.SPOOLED], State.REPORTED, Ev.REPORTED)


# -- the store keeps to the table ---------------------------------------------------------------

class RecordingStore(SqliteStore):
    """A SQLite store that notes every change it makes: (state before, state after, event)."""

    made: list[tuple[State | None, State, str]]

    def open(self) -> None:
        self.made = []
        super().open()

    def _job_inserts(self, message: Message, jobs: list[NewJob], now: float,
                     stored: bool) -> list[tuple[str, Sequence[Any]]]:
        inserts = super()._job_inserts(message, jobs, now, stored)
        for _ in jobs:
            self.made.append((None, State.SPOOLED, Ev.RECEIVED))
            if stored:
                self.made.append((State.SPOOLED, State.STORED, Ev.STORED))
        return inserts

    def _transition(self, job_id: str, sources: list[State], target: State | None,
                    event: str, detail: str | None, **kw: Any) -> bool:
        before = self._one("SELECT state FROM jobs WHERE id = ?", (job_id,))
        done = super()._transition(job_id, sources, target, event, detail, **kw)
        if done:
            after = self._one("SELECT state FROM jobs WHERE id = ?", (job_id,))
            self.made.append((State(before["state"]), State(after["state"]), event))
        return done


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        self.now += 1
        return self.now


@pytest.fixture
def store(tmp_path: Path) -> Iterator[RecordingStore]:
    s = RecordingStore(tmp_path / "faxgw.sqlite3", Clock())
    s.open()
    yield s
    s.close()


_ids = itertools.count(1)


def new_job(store: SqliteStore, tmp_path: Path) -> str:
    n = next(_ids)
    path = tmp_path / f"m{n}.pdf"
    path.write_bytes(b"%PDF-1.4\n")
    message = Message(id=f"m{n:015d}", created_at=store.clock(), envelope_from="a@example.com",
                      header_from=None, report_to="a@example.com", subject=None,
                      message_id_header=None, references_header=None, peer=None,
                      document_path=str(path), document_bytes=9, document_sha256="0" * 64,
                      pages=1, filenames=None)
    job_id = f"{n:016x}"
    store.add_message(message, [NewJob(job_id, f"+1555123{n:04d}", "+15550100000", "fine",
                                       f"tok-{job_id}", f"key-{job_id}")])
    return job_id


def bring_to(store: SqliteStore, tmp_path: Path, state: State, status: str = "busy") -> str:
    job_id = new_job(store, tmp_path)
    path = {State.SPOOLED: 0, State.STORED: 1, State.SUBMITTING: 2, State.SUBMITTED: 3,
            State.COMPLETED: 4, State.REPORTED: 5}
    if state is State.GIVEN_UP:
        assert store.mark_given_up(store.job(job_id), "refused")
        return job_id
    steps = [
        lambda j: store.mark_stored(j, f"key-{job_id}"),
        lambda j: store.mark_submitting(j, "http://gw.test/cb", store.clock() + 40),
        lambda j: store.mark_submitted(j, f"sid-{job_id}", "queued", store.clock() + 600, "ok"),
        lambda j: store.record_status(j, f"sid-{job_id}", status, pages=0, duration_s=1,
                                      error_code=None, error_message=None, source="callback")
        is CallbackAction.FINAL,
        lambda j: store.mark_reported(j, "report written"),
    ]
    for step in steps[:path[state]]:
        assert step(store.job(job_id))
    assert store.job(job_id).state is state
    return job_id


def test_every_change_the_store_makes_is_in_the_table_and_every_row_is_made(
        store: RecordingStore, tmp_path: Path) -> None:
    # The whole life, and the arrows off it.
    for state in State:
        bring_to(store, tmp_path, state)
    for state in ACTIVE_STATES:  # an outage: same step later
        job_id = bring_to(store, tmp_path, state)
        assert store.retry_later(store.job(job_id), store.clock() + 5, "outage")
    for state in ACTIVE_STATES - {State.GIVEN_UP}:
        job_id = bring_to(store, tmp_path, state)
        assert store.mark_given_up(store.job(job_id), "gave up")
    job_id = bring_to(store, tmp_path, State.SUBMITTING)
    assert store.mark_outcome_unknown(store.job(job_id), store.clock() + 5, "no answer")
    assert store.back_to_stored(store.job(job_id), store.clock(), "not found; sending again")
    job_id = bring_to(store, tmp_path, State.SUBMITTING)  # callback before the send's answer
    for status in ("sending", "delivered"):
        store.record_status(store.job(job_id), "sid-x", status, pages=1, duration_s=1,
                            error_code=None, error_message=None, source="callback")
    assert store.job(job_id).state is State.COMPLETED
    job_id = bring_to(store, tmp_path, State.SUBMITTED)
    assert store.record_status(store.job(job_id), f"sid-{job_id}", "sending", pages=None,
                               duration_s=None, error_code=None, error_message=None,
                               source="poll") is CallbackAction.PROGRESS
    assert store.note_cancel(job_id, "canceled at SignalWire", store.clock())
    job_id = bring_to(store, tmp_path, State.COMPLETED)
    assert store.schedule_retry(store.job(job_id), store.clock() + 60, "standard", "busy")
    # The operator's actions.
    for state in (State.SPOOLED, State.STORED):
        assert store.cancel_unsent(bring_to(store, tmp_path, state), "canceled", store.clock())
    for state in FINISHED:
        job_id = bring_to(store, tmp_path, state)
        new = NewJob(f"r{job_id[1:]}", "+15559990000", "+15550100000", "fine",
                     f"tok-r{job_id}", f"key-r{job_id}")
        assert store.add_resend(store.job(job_id), new, store.clock()) is None
    for state in (State.COMPLETED, State.GIVEN_UP):
        job_id = bring_to(store, tmp_path, state)
        assert store.report_now(job_id, store.clock())
        assert store.mark_reporting(store.job(job_id), 1, "report 1: mailing it")
        assert store.mark_reported(store.job(job_id), "report sent")
        assert store.report_again(job_id, state, store.clock())

    made = set(store.made)
    assert all(allowed(*change) for change in made), [c for c in made if not allowed(*c)]
    assert made == {(t.source, t.target, t.event) for t in TRANSITIONS}


def test_every_change_leaves_an_event(store: RecordingStore, tmp_path: Path) -> None:
    job_id = bring_to(store, tmp_path, State.REPORTED)
    assert [e.kind for e in store.events(job_id)] == [
        "received", "stored", "submitting", "submitted", "final", "reported"]
    assert store.report_again(job_id, State.COMPLETED, store.clock())
    assert store.report_now(job_id, store.clock())
    assert [e.kind for e in store.events(job_id)][-2:] == ["report-again", "report-now"]


def test_an_illegal_transition_is_refused_and_changes_nothing(store: RecordingStore,
                                                              tmp_path: Path) -> None:
    job_id = bring_to(store, tmp_path, State.STORED)
    before, events = store.job(job_id), store.events(job_id)
    with pytest.raises(IllegalTransition):
        store.transition(job_id, [State.STORED], State.REPORTED, Ev.REPORTED, "skip ahead",
                         reported_at=store.clock())
    with pytest.raises(IllegalTransition):
        store.transition(job_id, [State.STORED], None, Ev.FINAL, "not a same-state event")
    assert store.job(job_id) == before and store.events(job_id) == events


def test_a_transition_from_a_state_the_job_has_left_changes_nothing(
        store: RecordingStore, tmp_path: Path) -> None:
    job_id = bring_to(store, tmp_path, State.SUBMITTED)
    stale = store.job(job_id)
    assert store.mark_given_up(stale, "gave up")
    after, events = store.job(job_id), store.events(job_id)
    # A late worker step decided on the old state: refused by the guard, no event.
    assert not store.mark_submitted(stale, "sid-late", "queued", store.clock(), "late")
    assert not store.cancel_unsent(job_id, "canceled", store.clock())
    assert not store.note_cancel(job_id, "canceled at SignalWire", store.clock())
    assert not store.report_again(job_id, State.COMPLETED, store.clock())
    assert store.job(job_id) == after and store.events(job_id) == events


# -- callback classification --------------------------------------------------------------------

@pytest.mark.parametrize("state, job_sid, sid, status, expected", [
    (State.SUBMITTED, "FX1", "FX1", "delivered", CallbackAction.FINAL),
    (State.SUBMITTED, "FX1", "FX1", "failed", CallbackAction.FINAL),
    (State.SUBMITTED, "FX1", "FX1", "canceled", CallbackAction.FINAL),
    (State.SUBMITTED, "FX1", "FX1", "sending", CallbackAction.PROGRESS),
    (State.SUBMITTED, "FX1", None, "delivered", CallbackAction.FINAL),   # no sid: this fax
    (State.SUBMITTED, "FX1", "FX2", "delivered", CallbackAction.IGNORE),  # another fax
    (State.SUBMITTING, None, "FX1", "delivered", CallbackAction.FINAL),  # before the 2xx
    (State.SUBMITTING, None, None, "delivered", CallbackAction.IGNORE),  # cannot tell which
    (State.SUBMITTED, "FX1", "FX1", None, CallbackAction.IGNORE),
    (State.SUBMITTED, "FX1", "FX1", "", CallbackAction.IGNORE),
    (State.COMPLETED, "FX1", "FX1", "failed", CallbackAction.IGNORE),  # replay after final
    (State.REPORTED, "FX1", "FX1", "delivered", CallbackAction.IGNORE),
    (State.STORED, None, "FX1", "delivered", CallbackAction.IGNORE),
    (State.GIVEN_UP, None, "FX1", "delivered", CallbackAction.IGNORE),
])
def test_classify_callback(state: State, job_sid: str | None, sid: str | None,
                           status: str | None, expected: CallbackAction) -> None:
    assert classify_callback(state, job_sid, sid, status) is expected


# -- retry decisions ----------------------------------------------------------------------------

POLICY = RetryPolicy(max_attempts=3, delay_s=600.0, kill_s=3600.0)


def final_job(status: str, *, attempt: int = 1, quality: str = "fine",
              error_code: str | None = None, error_message: str | None = None,
              created_at: float = T0) -> Job:
    return Job(id="j", message_id="m", to_number="+15551234567", from_number="+15550100000",
               quality=quality, state=State.COMPLETED, callback_token="t", callback_url=None,
               media_key=None, fax_sid="FX", fax_status=status, pages=1, pages_sent=0,
               duration_s=None, error_code=error_code, error_message=error_message,
               failure_reason=None, attempt=attempt, tries=0, next_run_at=None,
               submit_started_at=None, created_at=created_at, updated_at=created_at,
               reported_at=None)


@pytest.mark.parametrize("job, expected", [
    (final_job("busy"), (T0 + 600, "fine", "line busy")),
    (final_job("no-answer"), (T0 + 600, "fine", "no answer")),
    (final_job("failed", error_code="30003", error_message="The call dropped prematurely"),
     (T0 + 600, "fine", "line trouble")),
    (final_job("failed", quality="superfine", error_code="30003",
               error_message="Far end cannot receive at the resolution of the image"),
     (T0 + 60, "standard", "resolution not supported")),
    (final_job("failed", quality="standard",
               error_message="Far end cannot receive at the resolution of the image"), None),
    (final_job("failed", error_code="12300", error_message="Invalid content type; timed out"),
     None),
    (final_job("failed", error_code="21211", error_message="line trouble"), None),
    (final_job("failed", error_message="something nobody knows"), None),
    (final_job("delivered"), None),
    (final_job("canceled"), None),
    (final_job("busy", attempt=3), None),                       # the last attempt
    (final_job("busy", created_at=T0 - 3300), None),            # would start past the kill time
    (final_job("busy", created_at=T0 - 3000), (T0 + 600, "fine", "line busy")),
])
def test_retry_decision(job: Job, expected: tuple[float, str, str] | None) -> None:
    assert retry_decision(job, POLICY, T0) == expected


def test_retry_policy_is_the_configured_one(tmp_path: Path) -> None:
    settings = settings_from(base_env(tmp_path, FAX_MAX_ATTEMPTS="5",
                                      FAX_RETRY_DELAY_SECONDS="90", FAX_KILL_MINUTES="30"))
    assert RetryPolicy.from_settings(settings) == RetryPolicy(5, 90.0, 1800.0)


# -- backoff ------------------------------------------------------------------------------------

def test_backoff_doubles_up_to_the_cap() -> None:
    assert [backoff_s(n, 5.0, 60.0) for n in range(0, 7)] == [5.0, 5.0, 10.0, 20.0, 40.0,
                                                              60.0, 60.0]
    assert backoff_s(40, 5.0, 600.0) == 600.0  # no overflow far past the cap


def test_backoff_jitter_spreads_up_to_a_quarter() -> None:
    assert backoff_s(2, 5.0, 60.0, jitter=0.0) == 10.0
    assert backoff_s(2, 5.0, 60.0, jitter=0.5) == 11.25
    assert 10.0 <= backoff_s(2, 5.0, 60.0, jitter=0.999) < 12.5
