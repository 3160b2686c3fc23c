"""Defaults for everything an operator may tune (each has an environment variable in config.py).

The one place a default is written: each setting's declaration in config.py names its default
here once (the environment reader and docs/configuration.md take it from the declaration), as do
the CLI's own options.
"""

from typing import Final

FAX_DOMAIN: Final = "fax.local"
FAX_DEFAULT_REGION: Final = "US"
SANDBOX_FROM_NUMBER: Final = "+15550100000"
FAX_QUALITY: Final = "fine"
FAX_TTL_MINUTES: Final = 60
SMTP_LISTEN: Final = "127.0.0.1:2525"
HTTP_LISTEN: Final = "127.0.0.1:8025"
SANDBOX_PROJECT_ID: Final = "sandbox"
# The dashboard: loopback only unless the operator decides otherwise (an HTTPS proxy in front).
ADMIN_LISTEN: Final = "127.0.0.1:8026"
ADMIN_TRUSTED_PROXIES: Final = ("127.0.0.0/8", "::1")
ADMIN_SESSION_MINUTES: Final = 480.0
MEDIA_STORE: Final = "local"
S3_PREFIX: Final = "faxgw/"
S3_REGION: Final = "us-east-1"
# A media URL must outlive queueing at SignalWire + Ttl + transmission (30-60 s a page).
MEDIA_URL_SLACK_S: Final = 3600
NOTIFY_SMTP_PORT: Final = 587
NOTIFY_SMTPS_PORT: Final = 465        # the default port when NOTIFY_SMTP_TLS=tls
NOTIFY_SMTP_TLS: Final = "starttls"
DATA_DIR: Final = "./var"
# Below this much free space in DATA_DIR, intake answers 451 4.3.1 and /readyz is 503: the
# database and the spool need room to commit what a 250 promises.
MIN_FREE_DISK_MB: Final = 100

SMTP_MAX_MESSAGE_BYTES: Final = 25 * 1024 * 1024
SMTP_MAX_RECIPIENTS: Final = 20
# Connections: a scanner or MTA holds one or two; the caps stop one address (or a crowd) from
# taking every file descriptor. LimitNOFILE in the unit leaves room above the total.
SMTP_MAX_CONNECTIONS: Final = 100
SMTP_MAX_CONNECTIONS_PER_IP: Final = 10
# The whole DATA phase: 25 MiB at ~50 KB/s (a slow office uplink) takes about 9 minutes.
SMTP_DATA_TIMEOUT_S: Final = 600.0
# Between commands. RFC 5321 4.5.3.2.7 suggests 5 minutes, written for MTAs that think between
# commands; scanners and MTAs send the next command at once, and an idle session holds one of
# the capped connection slots, so 2 minutes (operators who want the RFC figure set 300).
SMTP_IDLE_TIMEOUT_S: Final = 120.0
MAX_PAGES: Final = 200

# Worker behaviour.
WORKER_CONCURRENCY: Final = 8
# Steps worked on at once while mail is being taken in (a sender waits for its 250; uploads,
# sends and reports can wait a moment): the CPU goes to intake first.
WORKER_CONCURRENCY_DURING_INTAKE: Final = 2
STATUS_POLL_S: Final = 600          # fetch a submitted fax with no final callback after this long
RETRY_BASE_S: Final = 5.0           # first backoff of an outage retry; doubles up to RETRY_MAX_S
RETRY_MAX_S: Final = 600.0
GIVE_UP_HOURS: Final = 24.0         # an outage longer than this fails the job (and reports it)
API_TIMEOUT_S: Final = 30.0
S3_TIMEOUT_S: Final = 60.0
NOTIFY_TIMEOUT_S: Final = 60.0
RELAY_IDLE_S: Final = 20.0          # a relay connection unused this long is closed (QUIT)
RELAY_CONNECTIONS: Final = 4        # relay connections kept open between reports, at most
SHUTDOWN_GRACE_S: Final = 20.0

# Fax-level retries (busy, no answer, line trouble), HylaFAX-like: 3 tries within an hour.
FAX_MAX_ATTEMPTS: Final = 3
FAX_RETRY_DELAY_S: Final = 600.0
FAX_KILL_MINUTES: Final = 60.0

# Housekeeping.
DOCUMENT_RETENTION_HOURS: Final = 0.0   # 0: delete the PDF as soon as every job is reported
JOB_RETENTION_DAYS: Final = 90.0        # reported jobs and their history are pruned after this
HOUSEKEEPING_INTERVAL_S: Final = 3600.0

# Documents.
FAX_BODY: Final = "auto"                # auto, always, never
DOC_TIMEOUT_S: Final = 60.0             # per mail: parsing and converting its documents
DOC_MEMORY_MB: Final = 1024             # address-space limit of a document worker process
DOC_WORKERS: Final = 2
PARTIAL_TIMEOUT_MINUTES: Final = 60     # message/partial parts wait this long for the rest
PARTIAL_MAX_SETS_PER_SENDER: Final = 20  # split mails one sender may have waiting for parts
LETTER_REGIONS: Final = frozenset({"US", "CA", "MX", "PH", "CL", "CO", "VE", "PR"})
FAX_PAPER_OUTSIDE_LETTER_REGIONS: Final = "a4"
FAX_PAPER_IN_LETTER_REGIONS: Final = "letter"
FAX_COVER: Final = False

# Reports.
REPORT_THUMBNAIL: Final = True
REPORT_ATTACH_PDF: Final = False
REPORT_ACCEPTED: Final = False
REPORT_REFUSALS: Final = True

# SMTP security and limits.
TLS_MIN_VERSION: Final = "tlsv1.2"
SMTP_REQUIRE_TLS: Final = False
SMTP_AUTH_PLAINTEXT: Final = False
TRUSTED_NETWORKS: Final = ("127.0.0.0/8", "::1")
FAX_ALLOW_INTERNATIONAL: Final = False
RATE_LIMIT_PER_SENDER: Final = 60     # mails an hour
RATE_LIMIT_TOTAL: Final = 600         # mails an hour
AUTH_MAX_FAILURES: Final = 5
AUTH_LOCKOUT_MINUTES: Final = 15.0

# Logs.
FAXGW_LOG_LEVEL: Final = "info"
FAXGW_LOG_FORMAT: Final = "text"

# The store.
STORE_BUSY_TIMEOUT_S: Final = 10.0    # a write waits this long for the CLI's lock, then 451

# Inbound faxes.
INBOUND_RECONCILE_S: Final = 300.0      # list received faxes at SignalWire this often
INBOUND_LOOKBACK_HOURS: Final = 24.0    # ... created within this many hours
INBOUND_KEEP_MEDIA: Final = False         # delete the media at SignalWire once mailed
INBOUND_ATTACH_DOCUMENT: Final = True     # attach the PDF (False: a notice only)

# Several gateways on one PostgreSQL (DATABASE_URL).
DATABASE_PREPARED_STATEMENTS: Final = True  # PostgreSQL plans each query once per connection
LEASE_SECONDS: Final = 30.0           # a dead node's jobs are taken over after this long
DEDUP_WINDOW_HOURS: Final = 24.0      # a mail resent within this window is not faxed twice
SEND_RATE_PER_SECOND: Final = 1.0     # faxes sent per second, all nodes together (SignalWire's)
SHARED_POLL_S: Final = 2.0            # with a shared queue, look at it at least this often
SMTP_PROXY_PROTOCOL: Final = False    # behind a TCP load balancer: PROXY v1/v2 header first

# Proving who sent a mail (gateway/smtp/verify.py): "off", or "dmarc" (SPF or DKIM must pass
# aligned with the From: domain for senders that neither logged in nor are on a trusted network).
SENDER_VERIFY: Final = "off"
# All the DNS lookups of one mail's check together (SPF, DKIM keys, DMARC) wait at most this long.
DNS_TIMEOUT_S: Final = 10.0
