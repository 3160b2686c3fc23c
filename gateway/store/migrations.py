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
    # Split mail (message/partial) kept where every node sees it: one row per set (who sent
    # it, to which numbers, how many parts, since when, and which node is joining it), one
    # per part received (its bytes are an object in the media store). The node whose commit
    # completes a set joins it; parts 1 and 3 at one node and 2 at another make one fax.
    """CREATE TABLE IF NOT EXISTS partial_sets (
    set_id TEXT PRIMARY KEY,
    sender_key TEXT NOT NULL,
    total INTEGER,
    recipients TEXT NOT NULL,
    meta TEXT NOT NULL,
    first_seen {float} NOT NULL,
    state TEXT NOT NULL,
    owner TEXT,
    claimed_at {float}
)""",
    "CREATE INDEX IF NOT EXISTS partial_sets_sender ON partial_sets (sender_key, state)",
    "CREATE INDEX IF NOT EXISTS partial_sets_first_seen ON partial_sets (first_seen)",
    """CREATE TABLE IF NOT EXISTS partials (
    set_id TEXT NOT NULL,
    number INTEGER NOT NULL,
    media_key TEXT NOT NULL,
    size INTEGER NOT NULL,
    received_at {float} NOT NULL,
    PRIMARY KEY (set_id, number)
)""",
)

_V7 = (
    # Received faxes are claimed per fax like jobs (gateway/inbound/states.py): the node working
    # one holds its lease until `lease_until`; `lease_epoch` goes up at every claim, and a mail
    # or a media DELETE goes out only after a statement that finds the node's own epoch.
    "ALTER TABLE inbound_faxes ADD COLUMN lease_owner TEXT",
    "ALTER TABLE inbound_faxes ADD COLUMN lease_until {float}",
    "ALTER TABLE inbound_faxes ADD COLUMN lease_epoch INTEGER NOT NULL DEFAULT 0",
    # The state word outbound uses.
    "UPDATE inbound_faxes SET state = 'given-up' WHERE state = 'gave_up'",
    # Every change of a received fax leaves an event, as a job's does.
    """CREATE TABLE IF NOT EXISTS inbound_events (
    id {autoid} PRIMARY KEY,
    fax_sid TEXT NOT NULL,
    at {float} NOT NULL,
    kind TEXT NOT NULL,
    detail TEXT
)""",
    "CREATE INDEX IF NOT EXISTS inbound_events_fax ON inbound_events (fax_sid, id)",
    # A recipient's mail that was started and not yet known accepted (a row in
    # inbound_deliveries): its fate is uncertain until the node that started it settles it.
    """CREATE TABLE IF NOT EXISTS inbound_sends (
    fax_sid TEXT NOT NULL,
    recipient TEXT NOT NULL,
    node TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    started_at {float} NOT NULL,
    ended_at {float},
    PRIMARY KEY (fax_sid, recipient)
)""",
)

_V8 = (
    # RFC 3461 DSN and RFC 4954 AUTH= as relays send them (gateway/smtp/dsn.py): the MAIL
    # command's RET, ENVID and AUTH= submitter, what a DSN returns of the mail, and each
    # recipient's NOTIFY and ORCPT. NULL: not asked (the usual report).
    "ALTER TABLE messages ADD COLUMN dsn_ret TEXT",
    "ALTER TABLE messages ADD COLUMN dsn_envid TEXT",
    "ALTER TABLE messages ADD COLUMN auth_submitter TEXT",
    "ALTER TABLE messages ADD COLUMN dsn_headers TEXT",
    "ALTER TABLE messages ADD COLUMN dsn_full TEXT",
    "ALTER TABLE jobs ADD COLUMN dsn_notify TEXT",
    "ALTER TABLE jobs ADD COLUMN dsn_orcpt TEXT",
)

_V9 = (
    # SENDER_VERIFY=dmarc: how the sender was proven (SPF, DKIM, DMARC, or AUTH / a trusted
    # network), as an Authentication-Results value, shown with the job.
    "ALTER TABLE messages ADD COLUMN auth_results TEXT",
)

_V10 = (
    # Dashboard sessions, in the shared store: a load balancer may send each request to any
    # node, and a restart keeps them. `token_hash` is the SHA-256 of the cookie's random token
    # (the token itself is stored nowhere); `password_tag` identifies the user's password hash
    # at login, so a new password or a deleted user ends the session.
    """CREATE TABLE IF NOT EXISTS dashboard_sessions (
    token_hash TEXT PRIMARY KEY,
    user_name TEXT NOT NULL,
    role TEXT NOT NULL,
    password_tag TEXT NOT NULL,
    created_at {float} NOT NULL,
    expires_at {float} NOT NULL
)""",
    "CREATE INDEX IF NOT EXISTS dashboard_sessions_user ON dashboard_sessions (user_name)",
    "CREATE INDEX IF NOT EXISTS dashboard_sessions_expires ON dashboard_sessions (expires_at)",
    # What an action said, shown on the session's next page (whichever node serves it).
    """CREATE TABLE IF NOT EXISTS dashboard_flash (
    id {autoid} PRIMARY KEY,
    token_hash TEXT NOT NULL,
    at {float} NOT NULL,
    text TEXT NOT NULL
)""",
    "CREATE INDEX IF NOT EXISTS dashboard_flash_session ON dashboard_flash (token_hash, id)",
)

_V11 = (
    # A fencing token: every claim of a job adds one, and a worker step records its work only
    # while the job still carries the token it was claimed with (a node that stalled past its
    # lease finds its UPDATE matching nothing, and does not send, mail or delete).
    "ALTER TABLE jobs ADD COLUMN lease_epoch INTEGER NOT NULL DEFAULT 0",
    # The report being mailed: its number (the Message-ID is the job's and this number's) and,
    # until it is recorded as sent, when its mailing began (set: its outcome is uncertain).
    "ALTER TABLE jobs ADD COLUMN report_n INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE jobs ADD COLUMN reporting_at {float}",
    # A document being deleted: no resend may take it from here on.
    "ALTER TABLE messages ADD COLUMN purging_at {float}",
    # A fax sid belongs to one job: an attempt that took another job's fax as its own (a
    # lookup after an unanswered send) loses it; then each sid is unique.
    """UPDATE attempts SET fax_sid = NULL WHERE fax_sid IS NOT NULL AND EXISTS (
    SELECT 1 FROM attempts a2 WHERE a2.fax_sid = attempts.fax_sid
        AND (a2.started_at < attempts.started_at
             OR (a2.started_at = attempts.started_at AND a2.job_id < attempts.job_id)))""",
    "CREATE UNIQUE INDEX IF NOT EXISTS attempts_fax_sid ON attempts (fax_sid)",
)

_V12 = (
    # The dashboard pages through every job newest first, and filters by fax status, in SQL.
    "CREATE INDEX IF NOT EXISTS jobs_created ON jobs (created_at, id)",
    "CREATE INDEX IF NOT EXISTS jobs_fax_status ON jobs (fax_status, created_at)",
    # Each running gateway says it is alive (gateway/runtime/nodes.py), so every node's dashboard
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
    Migration(6, "split mail (message/partial) shared by every node: partial_sets, partials",
              _V6),
    Migration(7, "received faxes: leases per fax, inbound_events, inbound_sends; "
                 "gave_up -> given-up", _V7),
    Migration(8, "DSN (RET, ENVID, NOTIFY, ORCPT) and the AUTH= submitter", _V8),
    Migration(9, "messages.auth_results: how the sender was proven", _V9),
    Migration(10, "dashboard sessions and their messages, shared by the nodes", _V10),
    Migration(11, "fencing: lease epochs, report numbers, purge marks, one job per fax sid",
              _V11),
    Migration(12, "dashboard: job list indexes (time, fax status); live nodes", _V12),
)

LATEST = MIGRATIONS[-1].version
assert [m.version for m in MIGRATIONS] == list(range(1, LATEST + 1)), "migrations out of order"
