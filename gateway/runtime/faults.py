"""Crash points for fault-injection tests: `FAXGW_CRASH_AT=<point>` makes the daemon kill itself
with SIGKILL at that point, as a power cut or OOM kill would. Unset, every call is a no-op."""

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
_armed = os.environ.get("FAXGW_CRASH_AT", "")


def crash_point(name: str) -> None:
    assert name in POINTS, name
    if _armed == name:
        log.warning("FAXGW_CRASH_AT=%s: killing the process now", name)
        os.kill(os.getpid(), signal.SIGKILL)
