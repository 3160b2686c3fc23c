"""Defaults for everything an operator may tune (each has an environment variable in config.py)."""

from typing import Final

FAX_DOMAIN: Final = "fax.local"
FAX_DEFAULT_REGION: Final = "US"
SANDBOX_FROM_NUMBER: Final = "+15550100000"
FAX_QUALITY: Final = "fine"
FAX_TTL_MINUTES: Final = 60
SMTP_LISTEN: Final = "127.0.0.1:2525"
HTTP_LISTEN: Final = "127.0.0.1:8025"
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
NOTIFY_SMTP_TLS: Final = "starttls"
DATA_DIR: Final = "./var"

SMTP_MAX_MESSAGE_BYTES: Final = 25 * 1024 * 1024
SMTP_MAX_RECIPIENTS: Final = 20
MAX_PAGES: Final = 200

# Worker behaviour.
WORKER_CONCURRENCY: Final = 8
STATUS_POLL_S: Final = 600          # fetch a submitted fax with no final callback after this long
RETRY_BASE_S: Final = 5.0           # first backoff of an outage retry; doubles up to RETRY_MAX_S
RETRY_MAX_S: Final = 600.0
GIVE_UP_HOURS: Final = 24.0         # an outage longer than this fails the job (and reports it)
API_TIMEOUT_S: Final = 30.0
S3_TIMEOUT_S: Final = 60.0
NOTIFY_TIMEOUT_S: Final = 60.0
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
LETTER_REGIONS: Final = frozenset({"US", "CA", "MX", "PH", "CL", "CO", "VE", "PR"})
