"""The job state machine as plain data and pure functions (no I/O), so every rule is testable alone.

A job is one fax to one number. Its life:

    received --upload--> stored --POST--> submitting --2xx--> submitted --final status--> completed
                                              |                                               |
                                  (outcome unknown: look the                                  v
                                   fax up before resending)           failed --report--> reported

`failed` is the gateway giving up (SignalWire refused the request, an outage outlasted the limit);
`completed` means SignalWire reported a final fax status, whatever it was. Both end in a report.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from gateway.constants import FINAL_STATUSES


class State(enum.StrEnum):
    RECEIVED = "received"      # document durable in the spool, not yet in the media store
    STORED = "stored"          # document in the media store, ready to submit
    SUBMITTING = "submitting"  # send POST started; its outcome is unknown until answered
    SUBMITTED = "submitted"    # SignalWire accepted it (fax sid known); waiting for a final status
    COMPLETED = "completed"    # final fax status known; report due
    FAILED = "failed"          # the gateway gave up; report due
    REPORTED = "reported"      # report sent; nothing left to do


ACTIVE_STATES = frozenset({State.RECEIVED, State.STORED, State.SUBMITTING, State.SUBMITTED,
                           State.COMPLETED, State.FAILED})
AWAITING_FAX = frozenset({State.SUBMITTING, State.SUBMITTED})


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


# Errors about the document or the numbers: another attempt cannot succeed.
NEVER_RETRY_CODES = frozenset({"12300", "53603", "63019", "21210", "21211", "21212", "21217",
                               "21601", "21620"})
# T.30 result texts (spandsp wording, as SignalWire passes them on) that describe the line or
# the far machine, not the document: worth another attempt.
LINE_TROUBLE = ("dropped prematurely", "timed out", "disconnected", "no carrier", "training",
                "line", "unexpected", "invalid response", "no response")
RESOLUTION_TROUBLE = "cannot receive at the resolution"


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
    elif status == "failed" and job.error_code not in NEVER_RETRY_CODES:
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
