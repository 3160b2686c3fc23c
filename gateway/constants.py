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
# Recipients a sender (the logged-in user, else the envelope sender from one address) may name
# in an hour without them becoming faxes (RSET, QUIT, refused DATA): bounds RCPT churn without
# touching anyone else's quota, also behind one office NAT or mail relay. Twenty full-size
# messages' worth; accepted faxes give theirs back.
RCPT_CHURN_PER_SENDER_HOUR: Final = 400
# The same per client address, all its senders together: only a client making up sender after
# sender reaches it (each at its own bound), so that churn stays bounded even then.
RCPT_CHURN_PER_IP_HOUR: Final = 10 * RCPT_CHURN_PER_SENDER_HOUR

# Every mail the gateway sends (reports, receipts, refusals) carries this header, valued with the
# job id (or "refusal"), so that one coming back to a fax address is recognised and refused.
REPORT_HEADER: Final = "X-Faxgw-Report"

# Config problems exit with EX_CONFIG so systemd's RestartPreventExitStatus=78 stops a crash loop.
EXIT_CONFIG: Final = 78
EXIT_UNAVAILABLE: Final = 69

# Inbound faxes: the largest received document the gateway downloads, and the hosts (besides
# the configured space) that may receive the project's credentials for a media download.
MAX_INBOUND_MEDIA_BYTES: Final = 100 * 1024 * 1024
SIGNALWIRE_FILES_HOSTS: Final = frozenset({"files.signalwire.com"})

# EX_DATAERR: the job database is damaged, deleted or replaced. Restarting cannot fix it (and a
# restart on a fresh empty database would hide the loss), so the unit does not restart on it
# either; a status of its own tells the operator "restore the database", not "fix the config".
EXIT_DATA: Final = 65

# Sender verification (SENDER_VERIFY=dmarc): DNS lookups per mail (SPF allows 10 mechanisms that
# look up, each with its own A/MX lookups; then the DKIM keys and the DMARC records), signatures
# checked per mail, and mails checked at once (each takes a thread while it waits for DNS).
MAX_DNS_LOOKUPS = 40
MAX_DKIM_SIGNATURES = 5
MAX_CONCURRENT_VERIFICATIONS = 4  # each may hold a whole mail in memory for DKIM
