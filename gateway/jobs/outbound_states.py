"""The job state machine as plain data and pure functions (no I/O), so every rule is testable alone.

A job is one fax to one number. Every arrow below is a row of `TRANSITIONS` (the event it records
in brackets); the store refuses any change that is not in the table, and every change leaves an
event. Arrows that keep the state (retry later, progress, cancel at SignalWire, report now) are
in the table too but not drawn.

    new mail, or a resend --[received]--> spooled

    spooled --[stored]--> stored --[submitting]--> submitting --[submitted]--> submitted
                           ^  ^                      |     |                      |
                           |  +------[retry]---------+     | [final]              | [final]
                           |  (not taken, or not found     v                      |
                           |   at SignalWire)          completed <----------------+
                           |                            |  |  ^
                           +---------[retry]------------+  |  | [report-again]
                              (busy, no answer,            |  |
                               line trouble)    [reported] v  |
    spooled, stored --[canceled]--> given-up --[reported]--> reported
    any other active state --[given-up]--^  ^                   |
                                            +-[report-again]----+

`given-up` is the gateway giving up (SignalWire refused the request, an outage outlasted the
limit, the operator canceled before the send); `completed` means SignalWire reported a final fax
status, whatever it was. Both end in a report. State words never collide with SignalWire's fax
status words (`received`, `failed`), so `faxgw jobs --status` means one thing per word.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from gateway.constants import FINAL_STATUSES
from gateway.signalwire.errors import LINE_TROUBLE, RESOLUTION_TROUBLE, never_retry


class State(enum.StrEnum):
    SPOOLED = "spooled"        # document durable in the spool, not yet in the media store
    STORED = "stored"          # document in the media store, ready to submit
    SUBMITTING = "submitting"  # send POST started; its outcome is unknown until answered
    SUBMITTED = "submitted"    # SignalWire accepted it (fax sid known); waiting for a final status
    COMPLETED = "completed"    # final fax status known; report due
    GIVEN_UP = "given-up"      # the gateway gave up; report due
    REPORTED = "reported"      # report sent; nothing left to do


ACTIVE_STATES = frozenset({State.SPOOLED, State.STORED, State.SUBMITTING, State.SUBMITTED,
                           State.COMPLETED, State.GIVEN_UP})
AWAITING_FAX = frozenset({State.SUBMITTING, State.SUBMITTED})
REPORT_DUE = frozenset({State.COMPLETED, State.GIVEN_UP})
FINISHED = REPORT_DUE | {State.REPORTED}


class Ev(enum.StrEnum):
    """Event kinds a transition records (the `events.kind` column)."""

    RECEIVED = "received"          # the job was created (mail accepted, or resent)
    STORED = "stored"
    SUBMITTING = "submitting"
    SUBMITTED = "submitted"
    UNKNOWN = "unknown"            # the send's answer never came; look the fax up later
    RETRY = "retry"
    PROGRESS = "progress"
    FINAL = "final"
    GIVEN_UP = "given-up"
    CANCELED = "canceled"          # operator canceled before the send
    CANCEL = "cancel"              # operator canceled at SignalWire; fetch the status now
    REPORTING = "reporting"        # a report is being mailed: uncertain until `reported`
    REPORTED = "reported"
    REPORT_AGAIN = "report-again"
    REPORT_NOW = "report-now"
    RESENT = "resent"              # sent again as a new job (this job does not change)


@dataclass(frozen=True)
class Transition:
    """One allowed change: from `source` (None: the job is created) to `target`, recording
    `event`. `source == target` is a change of schedule or detail, not of state."""

    source: State | None
    target: State
    event: Ev
    why: str


def _rows() -> tuple[Transition, ...]:
    S = State
    rows = [
        Transition(None, S.SPOOLED, Ev.RECEIVED, "mail accepted, or resent by the operator"),
        Transition(S.SPOOLED, S.STORED, Ev.STORED, "document uploaded to the media store"),
        Transition(S.STORED, S.SUBMITTING, Ev.SUBMITTING, "send POST about to start"),
        Transition(S.SUBMITTING, S.SUBMITTED, Ev.SUBMITTED, "SignalWire took the fax"),
        Transition(S.SUBMITTING, S.STORED, Ev.RETRY, "send not taken, or not found at SignalWire"),
        Transition(S.SUBMITTING, S.SUBMITTING, Ev.UNKNOWN, "send answer lost: look it up later"),
        Transition(S.SUBMITTING, S.SUBMITTING, Ev.PROGRESS, "non-final status"),
        Transition(S.SUBMITTED, S.SUBMITTED, Ev.PROGRESS, "non-final status"),
        Transition(S.SUBMITTING, S.COMPLETED, Ev.FINAL, "final status before the send answer"),
        Transition(S.SUBMITTED, S.COMPLETED, Ev.FINAL, "final fax status"),
        Transition(S.SUBMITTED, S.SUBMITTED, Ev.CANCEL, "canceled at SignalWire; fetch now"),
        Transition(S.COMPLETED, S.STORED, Ev.RETRY, "busy, no answer, line trouble"),
        Transition(S.SPOOLED, S.GIVEN_UP, Ev.CANCELED, "operator canceled before the send"),
        Transition(S.STORED, S.GIVEN_UP, Ev.CANCELED, "operator canceled before the send"),
        Transition(S.COMPLETED, S.COMPLETED, Ev.REPORTING, "report about to be mailed"),
        Transition(S.GIVEN_UP, S.GIVEN_UP, Ev.REPORTING, "report about to be mailed"),
        Transition(S.COMPLETED, S.REPORTED, Ev.REPORTED, "report sent (or given up)"),
        Transition(S.GIVEN_UP, S.REPORTED, Ev.REPORTED, "report sent (or given up)"),
        Transition(S.REPORTED, S.COMPLETED, Ev.REPORT_AGAIN, "operator: report again"),
        Transition(S.REPORTED, S.GIVEN_UP, Ev.REPORT_AGAIN, "operator: report again"),
        Transition(S.COMPLETED, S.COMPLETED, Ev.REPORT_NOW, "operator: try the report now"),
        Transition(S.GIVEN_UP, S.GIVEN_UP, Ev.REPORT_NOW, "operator: try the report now"),
    ]
    for state in sorted(ACTIVE_STATES):
        rows.append(Transition(state, state, Ev.RETRY, "an outage: same step, later"))
        if state is not S.GIVEN_UP:
            rows.append(Transition(state, S.GIVEN_UP, Ev.GIVEN_UP, "refused, or outage too long"))
    for state in sorted(FINISHED):
        rows.append(Transition(state, state, Ev.RESENT, "operator: sent again as a new job"))
    return tuple(rows)


TRANSITIONS: tuple[Transition, ...] = _rows()
_ALLOWED = frozenset((t.source, t.target, t.event) for t in TRANSITIONS)


class IllegalTransition(ValueError):
    """A change the transition table does not allow: a bug in the caller, never data."""


def allowed(source: State | None, target: State, event: str) -> bool:
    return (source, target, event) in _ALLOWED


def check_transition(sources: Iterable[State | None], target: State, event: str) -> None:
    """Raise IllegalTransition unless every (source, target, event) is in the table."""
    bad = [s for s in sources if not allowed(s, target, event)]
    if bad:
        raise IllegalTransition(
            f"{', '.join(str(s) for s in bad)} -> {target} [{event}] is not in the table")


def sources_of(target: State, event: str) -> frozenset[State]:
    """The states a job may be in for `event` to move it to `target`."""
    return frozenset(t.source for t in TRANSITIONS
                     if t.target is target and t.event == event and t.source is not None)


@dataclass(frozen=True)
class Job:
    id: str
    message_id: str
    to_number: str
    from_number: str
    quality: str
    state: State
    callback_token: str
    callback_url: str | None
    media_key: str | None
    fax_sid: str | None
    fax_status: str | None
    pages: int | None
    pages_sent: int | None
    duration_s: int | None
    error_code: str | None
    error_message: str | None
    failure_reason: str | None
    attempt: int
    tries: int
    next_run_at: float | None
    submit_started_at: float | None
    created_at: float
    updated_at: float
    reported_at: float | None
    # RCPT's NOTIFY and ORCPT (RFC 3461), see gateway/smtp/esmtp_params.py
    dsn_notify: str | None = None
    dsn_orcpt: str | None = None
    # The fencing token: the claim this copy of the job was read under (see SqlStore).
    lease_epoch: int = 0
    # The report being mailed (its Message-ID), and since when while not yet recorded.
    report_n: int = 0
    reporting_at: float | None = None


class CallbackAction(enum.StrEnum):
    FINAL = "final"            # record the final status; the job completes
    PROGRESS = "progress"      # record a non-final status; nothing else changes
    IGNORE = "ignore"          # duplicate, late, or for another fax: record the event only


def classify_callback(state: State, job_sid: str | None, callback_sid: str | None,
                      status: str | None) -> CallbackAction:
    """What a status callback may do to a job.

    Callbacks carry no nonce and may be replayed, duplicated or reordered, so only the first final
    status for the fax this job is waiting on counts; everything else is history.
    """
    if state not in AWAITING_FAX or not status:
        return CallbackAction.IGNORE
    if job_sid is not None and callback_sid is not None and callback_sid != job_sid:
        return CallbackAction.IGNORE
    if job_sid is None and state is State.SUBMITTING and callback_sid is None:
        return CallbackAction.IGNORE  # cannot tell which fax it is about
    if status in FINAL_STATUSES:
        return CallbackAction.FINAL
    return CallbackAction.PROGRESS


def backoff_s(tries: int, base_s: float, max_s: float, jitter: float = 0.0) -> float:
    """Capped exponential backoff: base, 2 base, 4 base, ... max; jitter in [0, 1) spreads it."""
    delay = min(max_s, base_s * (2 ** max(0, tries - 1)))
    return delay * (1.0 + 0.25 * jitter)


@dataclass(frozen=True)
class RetryPolicy:
    """Fax-level retries, HylaFAX-like: a few tries, spaced out, within a kill time."""

    max_attempts: int
    delay_s: float
    kill_s: float

    @classmethod
    def from_settings(cls, settings: SettingsLike) -> RetryPolicy:
        """The configured policy (FAX_MAX_ATTEMPTS, FAX_RETRY_DELAY_SECONDS, FAX_KILL_MINUTES):
        the worker and the operator's `faxgw resend` must decide alike."""
        return cls(settings.fax.max_attempts, settings.fax.retry_delay_s,
                   settings.fax.kill_minutes * 60)


class SettingsLike(Protocol):
    @property
    def fax(self) -> FaxSettingsLike: ...


class FaxSettingsLike(Protocol):
    @property
    def max_attempts(self) -> int: ...
    @property
    def retry_delay_s(self) -> float: ...
    @property
    def kill_minutes(self) -> float: ...


def retry_decision(job: Job, policy: RetryPolicy, now: float) -> tuple[float, str, str] | None:
    """(when, quality, why) for another attempt after a final status, or None for "report it".

    busy and no-answer are retried; a `failed` that names line trouble is retried; a far end
    that cannot take the resolution gets one more try at standard quality; document and number
    errors never are. No attempt starts after the kill time.
    """
    if job.attempt >= policy.max_attempts:
        return None
    status = job.fax_status
    message = (job.error_message or "").lower()
    quality, delay, why = job.quality, policy.delay_s, ""
    if status in ("busy", "no-answer"):
        why = "line busy" if status == "busy" else "no answer"
    elif status == "failed" and not never_retry(job.error_code):
        if RESOLUTION_TROUBLE in message:
            if job.quality == "standard":
                return None
            quality, delay, why = "standard", min(delay, 60.0), "resolution not supported"
        elif any(fragment in message for fragment in LINE_TROUBLE):
            why = "line trouble"
        else:
            return None
    else:
        return None
    when = now + delay
    if when > job.created_at + policy.kill_s:
        return None
    return when, quality, why
