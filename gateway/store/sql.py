"""`SqlStore`: every query of the store, written once in portable SQL, for all SQL backends.

Queries use `?` placeholders, plain types and no backend-only functions. What differs between
backends is a handful of small methods a backend provides: `open`/`close`, turning `?` into its
placeholder (`_sql`), a write transaction and its durability (`_tx`; `_batch_tx`, one whose
statements may go to the server together), running a statement
(`_exec`, `_rows`), `_has_table`, the DDL types (`DDL_TYPES`), a lock while migrating
(`_lock_migrations`), which driver errors mean "could not write" (`_is_db_error`) and the claim
of due work (`SKIP_LOCKED`, `_claim_lock`: SQLite has one writer; a shared PostgreSQL queue
locks and skips). That plumbing is one piece, `SqlCore` (sql_core.py).

The queries are split by what they change for: the intake commit (sql_intake.py), jobs and their
steps (sql_jobs.py), claims, leases and limits (sql_leases.py), listings (sql_listings.py) and
nodes (sql_nodes.py), one mixin each over `SqlCore`, composed here.
"""

from __future__ import annotations

from gateway.jobs.outbound_states import Job
from gateway.store.sql_core import JOB_COLUMNS, Expr, SqlCore
from gateway.store.sql_intake import SqlIntake
from gateway.store.sql_jobs import SqlJobs, operator
from gateway.store.sql_leases import SqlLeases
from gateway.store.sql_listings import SqlListings
from gateway.store.sql_nodes import SqlNodes

__all__ = ["JOB_COLUMNS", "Expr", "SqlCore", "SqlStore", "operator"]


class SqlStore(SqlIntake, SqlJobs, SqlLeases, SqlListings, SqlNodes):
    """All of the store's SQL, every interface of gateway/store/interfaces.py. Subclasses (the
    backends) provide the connection and the few dialect bits (see `SqlCore`)."""

    def take_send_slot_and_submit(self, job: Job, now: float, interval_s: float,
                                  callback_url: str, recheck_at: float) -> tuple[float, Job | None]:
        """The send slot and, when it is now, the job's `mark_submitting` and its row as it
        is then: one commit for a send that need not wait, where there were two and a read.
        A slot later than now is only reserved (the caller waits for it, then marks the
        job): (the slot's time, the job's row if it is `submitting` now, else None)."""
        with self._tx(durable=True):
            at = self._take_send_slot(now, interval_s)
            if at > now:
                return at, None
            return at, self._submitting_row(job, callback_url, recheck_at)
