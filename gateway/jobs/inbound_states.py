"""The received-fax state machine as plain data (no I/O), like gateway/jobs/outbound_states.py.

A received fax is one row of `inbound_faxes`. Every arrow below is a row of `TRANSITIONS` (the
event it records in brackets); the store refuses any change that is not in the table, and every
change leaves a row in `inbound_events`. Arrows that keep the state (a mail about to go, a mail
accepted, retry later, taken over) are in the table too but not drawn.

    the webhook's answer   --[called]-->                     ringing, or rejected
    ringing                --[completed]-->                  delivering, or done
    delivering             --[delivered]-->                  deleting, or done
    deleting               --[media-deleted, media-kept]-->  done
    ringing, delivering    --[given-up]-->                   given-up

`delivering` and `deleting` are worked by whichever node holds the fax's lease (claimed like a
job, renewed by a heartbeat, taken over once it runs out). A side effect that outlives a lease
(a recipient's mail, the DELETE of the media at SignalWire) is preceded by a `mailing` or
`deleting-media` event whose statement proves the lease (owner and epoch) is still held.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass


class InState(enum.StrEnum):
    RINGING = "ringing"         # the webhook was answered with <Receive>; no outcome yet
    REJECTED = "rejected"       # answered with <Reject/> (unrouted, blocked)
    DELIVERING = "delivering"   # the outcome is recorded; mail is due to each recipient
    DELETING = "deleting"       # every recipient mailed; the media is to go at SignalWire
    DONE = "done"
    GIVEN_UP = "given-up"       # the gateway gave up (the administrator is told)


DUE_STATES = (InState.DELIVERING, InState.DELETING)
FINISHED = frozenset({InState.REJECTED, InState.DONE, InState.GIVEN_UP})


class InEv(enum.StrEnum):
    """Event kinds (the `inbound_events.kind` column)."""

    CALLED = "called"                  # the webhook's answer
    COMPLETED = "completed"            # SignalWire's first final word (callback or listing)
    TAKEN_OVER = "taken-over"          # claimed after another node's lease ran out
    MAILING = "mailing"                # a recipient's mail is about to go (lease proven)
    MAILED = "mailed"                  # the relay accepted it
    UNCERTAIN = "uncertain"            # a mail whose fate is unknown: sent again, same id
    RETRY = "retry"                    # an outage: same step, later
    DELIVERED = "delivered"            # every recipient mailed
    DELETING_MEDIA = "deleting-media"  # the media DELETE is about to go (lease proven)
    MEDIA_DELETED = "media-deleted"
    MEDIA_KEPT = "media-kept"          # the DELETE kept failing until GIVE_UP_HOURS
    GIVEN_UP = "given-up"


@dataclass(frozen=True)
class Transition:
    source: InState | None
    target: InState
    event: InEv
    why: str


def _rows() -> tuple[Transition, ...]:
    S, E = InState, InEv
    rows = [
        Transition(None, S.RINGING, E.CALLED, "answered with <Receive>"),
        Transition(None, S.REJECTED, E.CALLED, "answered with <Reject/>"),
        Transition(S.RINGING, S.DELIVERING, E.COMPLETED, "final word; someone to mail"),
        Transition(S.RINGING, S.DONE, E.COMPLETED, "final word; nobody to mail"),
        Transition(S.DELIVERING, S.DELETING, E.DELIVERED, "every recipient mailed"),
        Transition(S.DELIVERING, S.DONE, E.DELIVERED, "every recipient mailed; media kept"),
        Transition(S.DELETING, S.DONE, E.MEDIA_DELETED, "media deleted at SignalWire"),
        Transition(S.DELETING, S.DONE, E.MEDIA_KEPT, "the DELETE failed until GIVE_UP_HOURS"),
        Transition(S.RINGING, S.GIVEN_UP, E.GIVEN_UP, "no outcome from SignalWire"),
        Transition(S.DELIVERING, S.GIVEN_UP, E.GIVEN_UP, "undeliverable, or outage too long"),
        Transition(S.DELIVERING, S.DELIVERING, E.MAILING, "a recipient's mail is about to go"),
        Transition(S.DELIVERING, S.DELIVERING, E.MAILED, "the relay accepted a mail"),
        Transition(S.DELIVERING, S.DELIVERING, E.UNCERTAIN, "a mail's fate is unknown"),
        Transition(S.DELETING, S.DELETING, E.DELETING_MEDIA, "the media DELETE is about to go"),
    ]
    for state in DUE_STATES:
        rows.append(Transition(state, state, E.RETRY, "an outage: same step, later"))
        rows.append(Transition(state, state, E.TAKEN_OVER, "another node's lease ran out"))
    return tuple(rows)


TRANSITIONS: tuple[Transition, ...] = _rows()
_ALLOWED = frozenset((t.source, t.target, t.event) for t in TRANSITIONS)


class IllegalTransition(ValueError):
    """A change the table does not allow: a bug in the caller, never data."""


def allowed(source: InState | None, target: InState, event: str) -> bool:
    return (source, target, event) in _ALLOWED


def check_transition(sources: Iterable[InState | None], target: InState, event: str) -> None:
    """Raise IllegalTransition unless every (source, target, event) is in the table."""
    bad = [s for s in sources if not allowed(s, target, event)]
    if bad:
        raise IllegalTransition(
            f"{', '.join(str(s) for s in bad)} -> {target} [{event}] is not in the table")


def sources_of(target: InState, event: str) -> tuple[InState, ...]:
    """The states a fax may be in for `event` to move it to `target`."""
    return tuple(t.source for t in TRANSITIONS
                 if t.target is target and t.event == event and t.source is not None)
