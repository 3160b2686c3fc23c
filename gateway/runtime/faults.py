"""Fault points for fault-injection tests, inert unless their variable is set.

`FAXGW_CRASH_AT=<point>` makes the daemon kill itself with SIGKILL at that point, as a power cut
or OOM kill would. `FAXGW_PAUSE_AT=<point>` makes it stop itself with SIGSTOP at that point, the
first time it gets there, as a stall would (a paused VM, a node swapping): it goes on from there
when it is sent SIGCONT. A test so knows exactly where the node stands while it is stopped,
instead of trying to catch it there from outside. Unset, every call is a no-op."""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger(__name__)

POINTS = frozenset({"after-commit", "after-upload", "after-send", "before-report",
                    "after-report",
                    # inbound: after the relay accepted a recipient's mail, before its commit;
                    # after one recipient's mail is committed, before the next one's.
                    "inbound-after-mail", "inbound-between-mails",
                    # split mail: its set claimed for the join, nothing queued yet.
                    "partial-claimed"})
PAUSE_POINTS = frozenset({
    # a report rendered; its mailing not yet recorded (mark_reporting) nor the lease checked.
    "report-rendered",
    # inbound: one recipient's mail committed, the next one's not begun (as the crash point).
    "inbound-between-mails"})
_armed = os.environ.get("FAXGW_CRASH_AT", "")
_pause_armed = os.environ.get("FAXGW_PAUSE_AT", "")


def crash_point(name: str) -> None:
    assert name in POINTS, name
    if _armed == name:
        log.warning("FAXGW_CRASH_AT=%s: killing the process now", name)
        os.kill(os.getpid(), signal.SIGKILL)


def pause_point(name: str, what: str) -> None:
    """Stop the whole process here (SIGSTOP) if FAXGW_PAUSE_AT names this point, once: `what`
    (the job or fax at hand) goes in the log line said just before, for the test to read."""
    global _pause_armed
    assert name in PAUSE_POINTS, name
    if _pause_armed == name:
        _pause_armed = ""  # once: after SIGCONT the process runs on as usual
        log.warning("FAXGW_PAUSE_AT=%s (%s): stopping the process with SIGSTOP until SIGCONT",
                    name, what)
        os.kill(os.getpid(), signal.SIGSTOP)
