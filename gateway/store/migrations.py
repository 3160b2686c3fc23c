"""Schema versions and the ordered migrations between them, shared by every SQL backend.

The database records its version in a `schema_version` table (portable, unlike SQLite's
`PRAGMA user_version`); `SqlStore.open()` applies, in order and each in its own transaction,
every migration above it. Version 1 is the schema as first released (a database from before
versioning has its tables but no `schema_version`: the `IF NOT EXISTS` DDL of version 1 leaves
it as it is and records it at 1). Never edit a released migration; append a new one.

DDL is written once with `{float}` and `{autoid}` for the two types that differ between
backends (a backend's `DDL_TYPES` fills them in).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    statements: tuple[str, ...]


SCHEMA_VERSION_DDL = (
    "CREATE TABLE IF NOT EXISTS schema_version ("
    " version INTEGER PRIMARY KEY, applied_at {float} NOT NULL, description TEXT NOT NULL)"
)

_V1 = (
    """CREATE TABLE IF NOT EXISTS messages (
    id TEXT PRIMARY KEY,
    created_at {float} NOT NULL,
    envelope_from TEXT,
    header_from TEXT,
    report_to TEXT,
    subject TEXT,
    message_id_header TEXT,
    references_header TEXT,
    peer TEXT,
    document_path TEXT NOT NULL,
    document_bytes INTEGER NOT NULL,
    document_sha256 TEXT NOT NULL,
    pages INTEGER NOT NULL,
    filenames TEXT,
    notes TEXT,
    purged_at {float}
)""",
    """CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    message_id TEXT NOT NULL REFERENCES messages(id),
    to_number TEXT NOT NULL,
    from_number TEXT NOT NULL,
    quality TEXT NOT NULL,
    state TEXT NOT NULL,
    callback_token TEXT NOT NULL UNIQUE,
    callback_url TEXT,
    media_key TEXT,
    fax_sid TEXT,
    fax_status TEXT,
    pages INTEGER,
    pages_sent INTEGER,
    duration_s INTEGER,
    error_code TEXT,
    error_message TEXT,
    failure_reason TEXT,
    attempt INTEGER NOT NULL DEFAULT 0,
    tries INTEGER NOT NULL DEFAULT 0,
    next_run_at {float},
    submit_started_at {float},
    created_at {float} NOT NULL,
    updated_at {float} NOT NULL,
    reported_at {float}
)""",
    "CREATE INDEX IF NOT EXISTS jobs_due ON jobs (next_run_at)",
    "CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state)",
    "CREATE INDEX IF NOT EXISTS jobs_message ON jobs (message_id)",
    """CREATE TABLE IF NOT EXISTS events (
    id {autoid} PRIMARY KEY,
    job_id TEXT NOT NULL,
    at {float} NOT NULL,
    kind TEXT NOT NULL,
    detail TEXT
)""",
    "CREATE INDEX IF NOT EXISTS events_job ON events (job_id, id)",
    """CREATE TABLE IF NOT EXISTS attempts (
    job_id TEXT NOT NULL,
    n INTEGER NOT NULL,
    quality TEXT NOT NULL,
    started_at {float} NOT NULL,
    fax_sid TEXT,
    status TEXT,
    error_code TEXT,
    error_message TEXT,
    pages INTEGER,
    duration_s INTEGER,
    ended_at {float},
    PRIMARY KEY (job_id, n)
)""",
)

_V2 = (
    # The two states whose names were also SignalWire fax statuses.
    "UPDATE jobs SET state = 'spooled' WHERE state = 'received'",
    "UPDATE jobs SET state = 'given-up' WHERE state = 'failed'",
    # The event the gateway recorded when it gave up was named after the old state.
    "UPDATE events SET kind = 'given-up' WHERE kind = 'failed'",
)

_V3 = (
    # Received faxes (gateway/inbound/): one row per fax, one per (fax, recipient) mail sent.
    """CREATE TABLE IF NOT EXISTS inbound_faxes (
    fax_sid TEXT PRIMARY KEY,
    account_sid TEXT,
    from_number TEXT,
    to_number TEXT,
    state TEXT NOT NULL,
    outcome TEXT,
    fax_status TEXT,
    num_pages INTEGER,
    media_url TEXT,
    media_sid TEXT,
    remote_station_id TEXT,
    error_code TEXT,
    error_message TEXT,
    recipients TEXT,
    source TEXT,
    tries INTEGER NOT NULL DEFAULT 0,
    next_run_at {float},
    last_error TEXT,
    called_at {float},
    completed_at {float},
    media_deleted_at {float},
    done_at {float},
    created_at {float} NOT NULL,
    updated_at {float} NOT NULL
)""",
    "CREATE INDEX IF NOT EXISTS inbound_faxes_due ON inbound_faxes (next_run_at)",
    "CREATE INDEX IF NOT EXISTS inbound_faxes_created ON inbound_faxes (created_at)",
    """CREATE TABLE IF NOT EXISTS inbound_meta (
    name TEXT PRIMARY KEY,
    value {float} NOT NULL
)""",
    """CREATE TABLE IF NOT EXISTS inbound_deliveries (
    fax_sid TEXT NOT NULL,
    recipient TEXT NOT NULL,
    message_id TEXT NOT NULL,
    sent_at {float} NOT NULL,
    detail TEXT,
    PRIMARY KEY (fax_sid, recipient)
)""",
)

_V4 = (
    # A job being worked is claimed by one node until `lease_until` (a heartbeat extends it);
    # another node takes it over only once the lease has run out.
    "ALTER TABLE jobs ADD COLUMN lease_owner TEXT",
    "ALTER TABLE jobs ADD COLUMN lease_until {float}",
    # The claim's "no other attempt in flight to this number" looks jobs up by number.
    "CREATE INDEX IF NOT EXISTS jobs_number ON jobs (to_number, state)",
    # A mail resent after a lost 250 is found by its Message-ID and document.
    "CREATE INDEX IF NOT EXISTS messages_dedup ON messages (message_id_header, document_sha256)",
    # Named leases: the node that runs the once-only tasks (housekeeping), and shared pacing
    # (the next free send slot under SignalWire's account rate).
    """CREATE TABLE IF NOT EXISTS leases (
    name TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    until {float} NOT NULL
)""",
    # Hits counted across nodes: mails per sender and in total, failed logins per user/address.
    """CREATE TABLE IF NOT EXISTS hits (
    kind TEXT NOT NULL,
    hkey TEXT NOT NULL,
    at {float} NOT NULL
)""",
    "CREATE INDEX IF NOT EXISTS hits_key ON hits (kind, hkey, at)",
)

_V5 = (
    # A mail resent after a lost 250 is recognised in the commit itself, atomically across
    # nodes: one row per (Message-ID, number, document) names the job it became. A row older
    # than DEDUP_WINDOW_HOURS no longer counts: the next copy takes it over in its commit.
    """CREATE TABLE IF NOT EXISTS dedup_keys (
    message_id_header TEXT NOT NULL,
    to_number TEXT NOT NULL,
    document_sha256 TEXT NOT NULL,
    job_id TEXT NOT NULL,
    at {float} NOT NULL,
    PRIMARY KEY (message_id_header, to_number, document_sha256)
)""",
    "CREATE INDEX IF NOT EXISTS dedup_keys_job ON dedup_keys (job_id)",
    # The jobs already accepted, so a copy of one resent just after the upgrade is still known:
    # per key the newest job (a mail faxed twice before version 5 has two).
    """INSERT INTO dedup_keys (message_id_header, to_number, document_sha256, job_id, at)
    SELECT m.message_id_header, j.to_number, m.document_sha256, j.id, m.created_at
    FROM jobs j JOIN messages m ON m.id = j.message_id
    WHERE m.message_id_header IS NOT NULL AND NOT EXISTS (
        SELECT 1 FROM jobs j2 JOIN messages m2 ON m2.id = j2.message_id
        WHERE m2.message_id_header = m.message_id_header
            AND m2.document_sha256 = m.document_sha256 AND j2.to_number = j.to_number
            AND (m2.created_at > m.created_at
                 OR (m2.created_at = m.created_at AND j2.id > j.id)))""",
    # Only the duplicate check of version 4 read it.
    "DROP INDEX IF EXISTS messages_dedup",
)

_V6 = (
    # The dashboard pages through every job newest first, and filters by fax status, in SQL.
    "CREATE INDEX IF NOT EXISTS jobs_created ON jobs (created_at, id)",
    "CREATE INDEX IF NOT EXISTS jobs_fax_status ON jobs (fax_status, created_at)",
    # Each running gateway says it is alive (gateway/ops/nodes.py), so every node's dashboard
    # can list the live ones.
    """CREATE TABLE IF NOT EXISTS nodes (
    node_id TEXT PRIMARY KEY,
    started_at {float} NOT NULL,
    seen_at {float} NOT NULL,
    detail TEXT
)""",
)

MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "messages, jobs, events, attempts", _V1),
    Migration(2, "states renamed: received -> spooled, failed -> given-up", _V2),
    Migration(3, "received faxes: inbound_faxes, inbound_meta, inbound_deliveries", _V3),
    Migration(4, "job leases (several nodes), dedup index, named leases, shared hit counts",
              _V4),
    Migration(5, "dedup keys: a resent mail is recognised in the commit, atomically", _V5),
    Migration(6, "dashboard: job list indexes (time, fax status); live nodes", _V6),
)

LATEST = MIGRATIONS[-1].version
assert [m.version for m in MIGRATIONS] == list(range(1, LATEST + 1)), "migrations out of order"
