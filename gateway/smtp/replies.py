"""SMTP replies as values: the code, the RFC 3463 enhanced code, the plain words, and the
reason counted in the metrics, decided in one place.

Handlers return `str(reply)` to aiosmtpd; the metrics read `reply.metric_reason` instead of
parsing the reply string back. A scanner shows the words to the person at it, so they say what
was wrong and what to do, in plain ASCII.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["Reply"]


@dataclass(frozen=True)
class Reply:
    """One SMTP reply line. `metric_reason` is one of metrics.REFUSAL_REASONS for refusals,
    None for positive replies (which are not counted as refusals)."""

    code: int
    enhanced: str
    words: str
    metric_reason: str | None = None

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced} {self.words}" if self.enhanced else \
            f"{self.code} {self.words}"

    @property
    def refusal(self) -> bool:
        return self.code >= 400

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500


# -- positive ---------------------------------------------------------------------------------

SENDER_OK = Reply(250, "2.1.0", "Sender OK")
AUTH_OK = Reply(235, "2.7.0", "Authentication successful")


def recipient_ok(number: str) -> Reply:
    return Reply(250, "2.1.5", f"Recipient OK, fax to {number}")


def recipient_duplicate(number: str) -> Reply:
    return Reply(250, "2.1.5", f"Recipient OK (duplicate of {number}, faxed once)")


def already_queued(job_ids: tuple[str, ...] | list[str]) -> Reply:
    """The same mail again (Message-ID, recipients, document): a client that lost our 250."""
    plural = "s" if len(job_ids) > 1 else ""
    return Reply(250, "2.0.0", f"Already queued as fax job{plural} {', '.join(job_ids)} (the "
                 "same mail was received before; not faxed twice)")


def queued(job_ids: tuple[str, ...] | list[str], pages: int) -> Reply:
    jobs = ", ".join(job_ids)
    return Reply(250, "2.0.0", f"Queued as fax job{'s' if len(job_ids) > 1 else ''} {jobs} "
                 f"({pages} page{'s' if pages != 1 else ''})")


# -- session and connection -----------------------------------------------------------------

SHUTTING_DOWN = Reply(421, "4.3.2", "The fax gateway is shutting down; please try again later",
                      "shutting_down")
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections to the fax gateway; please "
                             "try again later", "too_many_connections")


def too_many_connections_from(ip: str, limit: int) -> Reply:
    return Reply(421, "4.7.0", f"Too many connections from {ip} (at most {limit}); please try "
                 "again later", "too_many_connections")


def idle_timeout(seconds: float) -> Reply:
    return Reply(421, "4.4.2", f"No command for {seconds:.0f} seconds; closing the connection",
                 "timeout")


def data_timeout(seconds: float) -> Reply:
    return Reply(421, "4.4.2", f"The message took longer than {seconds:.0f} seconds to send; "
                 "closing the connection", "timeout")


STARTTLS_FIRST = Reply(530, "5.7.0", "Must issue a STARTTLS command first", "auth")

# -- AUTH -------------------------------------------------------------------------------------

AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid", "auth")
AUTH_NOT_OFFERED = Reply(504, "5.5.4", "Authentication is not offered here", "auth")
AUTH_UNKNOWN_MECHANISM = Reply(504, "5.5.4",
                               "Unrecognized authentication type (use PLAIN or LOGIN)", "auth")
AUTH_MALFORMED_PLAIN = Reply(501, "5.5.2", "Malformed AUTH PLAIN response", "auth")


def auth_locked_out(ip: str, seconds: float) -> Reply:
    return Reply(454, "4.7.0", f"Too many failed logins from {ip}; try again in "
                 f"{max(1, int(seconds // 60))} minute(s)", "auth")


# -- MAIL -------------------------------------------------------------------------------------

AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required: log in with your fax gateway "
                      "account to send faxes", "auth")


def sender_not_allowed(address: str) -> Reply:
    return Reply(550, "5.7.1", f"Sender <{address[:200]}> is not allowed to send faxes through "
                 "this gateway", "policy")


def user_may_not_send_as(user: str, address: str) -> Reply:
    return Reply(550, "5.7.1", f"User {user} may not send as <{address[:200]}>", "policy")


def bad_parameter(words: str) -> Reply:
    """A MAIL or RCPT parameter (RFC 3461 DSN, RFC 4954 AUTH=) that is not well formed."""
    return Reply(501, "5.5.4", f"Invalid parameter: {words}", "protocol")


# -- RCPT -------------------------------------------------------------------------------------

RECIPIENT_TOO_LONG = Reply(501, "5.1.3", "Recipient address too long", "bad_number")
RECIPIENT_NOT_NUMBER_AT_DOMAIN = Reply(553, "5.1.3",
                                       "Recipient address is not of the form number@domain",
                                       "bad_number")


def relay_denied(domain: str) -> Reply:
    return Reply(550, "5.7.1", "Relaying denied: this gateway only accepts mail for "
                 f"<number>@{domain}", "relay_denied")


def too_many_recipients(limit: int) -> Reply:
    return Reply(452, "4.5.3", f"Too many recipients: at most {limit} fax numbers per message",
                 "too_many_recipients")


def bad_number(reason: str) -> Reply:
    return Reply(553, "5.1.3", reason, "bad_number")


def destination_refused(reason: str) -> Reply:
    return Reply(550, "5.7.1", reason, "policy")


RATE_NEVER = Reply(550, "5.7.1", "Rate limit: this sender may not send faxes", "rate_limited")


def rate_limited(per_sender: int, total: int, wait_s: float) -> Reply:
    return Reply(450, "4.7.1", f"Rate limit reached (at most {per_sender} faxes an hour per "
                 f"sender, {total} in all); try again in {max(1, math.ceil(wait_s / 60))} "
                 "minute(s)", "rate_limited")


def recipient_churn(who: str, wait_s: float) -> Reply:
    """`who`: "by <sender> from 192.0.2.1", "by user NAME" or "from 192.0.2.1" (one line)."""
    return Reply(450, "4.7.1", f"Too many recipients tried {who} without sending; try again "
                 f"in {max(1, math.ceil(wait_s / 60))} minute(s)", "rate_limited")


# -- DATA -------------------------------------------------------------------------------------

NO_VALID_RECIPIENTS = Reply(554, "5.5.1", "No valid fax recipients", "bad_number")


def too_big(limit: int) -> Reply:
    return Reply(552, "5.3.4", f"Message too big for this fax gateway (at most {limit} bytes)",
                 "too_big")


BARE_LF = Reply(550, "5.6.0", "Bare LF line endings are not accepted here: end lines with "
                "<CR><LF> and the message with <CR><LF>.<CR><LF>", "protocol")


def bad_document(reason: str) -> Reply:
    return Reply(554, "5.6.0", reason, "bad_document")


def automatic_mail(why: str) -> Reply:
    return Reply(550, "5.7.1", f"Not faxed: {why}", "policy")


def part_stored(words: str) -> Reply:
    """One part of a split mail (message/partial) kept until the others arrive."""
    return Reply(250, "2.0.0", words)


def too_many_partial_sets(held: int) -> Reply:
    """A part that would open one more split mail than its sender may have waiting."""
    return Reply(451, "4.7.0", f"Too many split messages from this sender are waiting for their "
                 f"other parts ({held}); send their missing parts first, or try again later",
                 "rate_limited")


CANNOT_STORE_PART = Reply(451, "4.3.0", "Temporary failure: the gateway cannot store this part "
                          "right now; please try again later", "temp_failure")
DATABASE_UNAVAILABLE = Reply(451, "4.3.0", "Temporary failure: the gateway's job database is "
                             "unavailable; please try again later", "temp_failure")
DISK_LOW = Reply(451, "4.3.1", "Insufficient system storage: the gateway's disk is nearly full; "
                 "please try again later", "temp_failure")
CANNOT_STORE = Reply(451, "4.3.0", "Temporary failure: the gateway cannot store the document "
                     "right now; please try again later", "temp_failure")
CANNOT_QUEUE = Reply(451, "4.3.0", "Temporary failure: the gateway cannot queue the fax right "
                     "now; please try again later", "temp_failure")
CANNOT_RECEIVE = Reply(451, "4.3.0", "Temporary failure: the gateway cannot receive the "
                       "message right now; please try again later", "temp_failure")
CONVERSIONS_BUSY = Reply(451, "4.3.0", "Temporary failure: the gateway is busy converting other "
                         "large documents; please try again in a few minutes", "temp_failure")
INTERNAL_ERROR = Reply(451, "4.3.0", "Temporary failure: an internal error in the fax gateway; "
                       "please try again later", "other")
