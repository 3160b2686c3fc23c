"""Protocol facts and hard limits that no operator tunes (tunables live in defaults.py)."""

from typing import Final

API_PATH: Final = "/api/laml/2010-04-01"

# SignalWire fax statuses (signalwire-fax-facts.md, "Statuses").
IN_PROGRESS_STATUSES: Final = frozenset({"queued", "processing", "sending", "receiving"})
SUCCESS_STATUSES: Final = frozenset({"delivered", "received"})
FAILURE_STATUSES: Final = frozenset({"no-answer", "busy", "failed", "canceled"})
FINAL_STATUSES: Final = SUCCESS_STATUSES | FAILURE_STATUSES

QUALITIES: Final = ("standard", "fine", "superfine")
TTL_MIN_MINUTES: Final = 5
TTL_MAX_MINUTES: Final = 300

# Bounds on things that arrive from the network.
MAX_CALLBACK_BODY_BYTES: Final = 64 * 1024
MAX_RCPT_ADDRESS_CHARS: Final = 320
SMTP_LINE_TIMEOUT_S: Final = 300.0
# Recipients a client address may name in an hour without them becoming faxes (RSET, QUIT,
# refused DATA): bounds RCPT churn per address without touching anyone else's quota. Twenty
# full-size messages' worth; accepted faxes give theirs back.
RCPT_CHURN_PER_IP_HOUR: Final = 400

# Config problems exit with EX_CONFIG so systemd's RestartPreventExitStatus=78 stops a crash loop.
EXIT_CONFIG: Final = 78
EXIT_UNAVAILABLE: Final = 69
