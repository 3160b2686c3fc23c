"""Typed rows the store hands out and takes in: frozen dataclasses, no SQL column names.

`Job` lives with the state machine (the pure rules read it); it is re-exported here so every
caller of the store finds its rows in one place.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.jobs.outbound_states import Job

__all__ = ["Attempt", "Event", "Job", "JobListing", "Message", "NewJob", "UnderWay"]


@dataclass(frozen=True)
class Message:
    id: str
    created_at: float
    envelope_from: str | None
    header_from: str | None
    report_to: str | None
    subject: str | None
    message_id_header: str | None
    references_header: str | None
    peer: str | None
    document_path: str
    document_bytes: int
    document_sha256: str
    pages: int
    filenames: str | None
    notes: str | None = None
    purged_at: float | None = None
    # RFC 3461 DSN and RFC 4954 AUTH= of the MAIL command (migration 6): RET, ENVID, the
    # submitter AUTH= named (a record, not an identity), and what a DSN returns of the mail:
    # its header block, and the whole mail for RET=FULL within DSN_FULL_MAX_BYTES.
    dsn_ret: str | None = None
    dsn_envid: str | None = None
    auth_submitter: str | None = None
    dsn_headers: str | None = None
    dsn_full: str | None = None
    auth_results: str | None = None  # SENDER_VERIFY: the Authentication-Results we found


@dataclass(frozen=True)
class Attempt:
    job_id: str
    n: int
    quality: str
    started_at: float
    fax_sid: str | None
    status: str | None
    error_code: str | None
    error_message: str | None
    pages: int | None
    duration_s: int | None
    ended_at: float | None


@dataclass(frozen=True)
class Event:
    job_id: str
    at: float
    kind: str
    detail: str | None


@dataclass(frozen=True)
class NewJob:
    id: str
    to_number: str
    from_number: str
    quality: str
    callback_token: str
    media_key: str
    dsn_notify: str | None = None  # RCPT's NOTIFY (RFC 3461): NEVER, or SUCCESS,FAILURE,DELAY
    dsn_orcpt: str | None = None   # RCPT's ORCPT, "rfc822;address"


@dataclass(frozen=True)
class JobListing:
    """One line of `faxgw jobs`: the job, the message fields a listing shows, its last event."""

    job: Job
    envelope_from: str | None
    header_from: str | None
    report_to: str | None
    subject: str | None
    peer: str | None
    filenames: str | None
    last_event: Event | None


@dataclass(frozen=True)
class UnderWay:
    """Why a resend was not made: another job of the mail to the same number is under way.
    `resend`: that job is itself a resend (a double click, or another operator, a moment
    earlier), so the answer is "already being resent" and names it."""

    job_id: str
    state: str
    resend: bool
