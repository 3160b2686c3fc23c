"""The store's interfaces, one per concern: what a caller may ask of the job store, typed.

A caller is typed against the interface it uses: the SMTP side's rate limits against `Leases`,
the metrics and the dashboard's job list against `Listings`, the heartbeat against `Nodes`, a
document's download against `Jobs`; the worker, intake, the callbacks and the CLI, which use
several, against the whole `Store` (gateway/store/base.py), which is all of them; the dashboard
and inbound faxes, which keep tables of their own beside the jobs, against `SqlStore`. Both
backends (gateway/store/sqlite.py, gateway/store/postgres.py) implement every one through
`SqlStore` (gateway/store/sql.py).

The tables kept beside the jobs (inbound faxes, split mail, dashboard sessions: inbound.py,
partials.py, sessions.py) are written over `SqlAccess`, the SQL store's public surface for
running portable SQL in its transactions, on its thread and connection.

Every call is synchronous and runs on the store's own thread (`run`; `read` for the
dashboard's reads on a connection of their own), so the event loop never waits on the disk.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from typing import Any, TypeVar

from gateway.jobs.outbound_states import CallbackAction, Job, State
from gateway.store.rows import Attempt, Event, JobListing, Message, NewJob, UnderWay

T = TypeVar("T")

# A shared rate-limit rule: (kind, key, most hits allowed in the window).
Rule = tuple[str, str, int]


class Calls(abc.ABC):
    """How any store call is made: on the store's own thread, awaited from the loop."""

    clock: Callable[[], float]
    # Who claims work (NODE_ID) and how long a claim lasts without a heartbeat (LEASE_SECONDS).
    node_id: str
    lease_s: float

    @abc.abstractmethod
    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a synchronous store call on the store's own thread."""

    @abc.abstractmethod
    async def run_first(self, fn: Callable[..., T], *args: Any) -> T:
        """`run`, ahead of the calls `run` queued: for what a mail's sender waits on."""

    @abc.abstractmethod
    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a read-only call on the reader's own thread and connection (the dashboard),
        never queued behind intake's commits and the worker's steps."""

    @abc.abstractmethod
    def is_db_error(self, exc: BaseException) -> bool:
        """Whether `exc` is the database driver's own error (the store could not answer)."""


class Jobs(Calls):
    """Outbound jobs: the intake commit, reads, the one guarded transition, the worker's
    steps (each fenced by the lease epoch the job was claimed with: `Job.lease_epoch`), the
    document's purge, and the operator's actions."""

    # -- intake ------------------------------------------------------------------------------

    @abc.abstractmethod
    def add_message(self, message: Message, jobs: Iterable[NewJob], *, stored: bool = False,
                    dedup_since: float | None = None) -> list[str] | None:
        """Commit a message and its jobs in one transaction (durable once this returns), and
        return None; `stored`: the document is in the media store already, the jobs start
        there. `dedup_since`: a mail with a Message-ID that was accepted for these same
        numbers with the same document at or after this time (a client that lost our 250
        and sent again, to any node) is not committed again: the earlier copy's job ids come
        back instead, in the order of `jobs`. The check is part of the commit, so two copies
        committing at once on two nodes make one job. None: never merged."""

    @abc.abstractmethod
    def add_messages(self, mails: Sequence[tuple[Message, list[NewJob], bool, float | None]]
                     ) -> list[list[str] | None | BaseException]:
        """`add_message` of several mails (message, jobs, stored, dedup_since) in one
        transaction; per mail its result, or the error that kept them all uncommitted."""

    # -- reads -------------------------------------------------------------------------------

    @abc.abstractmethod
    def job(self, job_id: str) -> Job | None: ...

    @abc.abstractmethod
    def message(self, message_id: str) -> Message | None: ...

    @abc.abstractmethod
    def events(self, job_id: str) -> list[Event]: ...

    @abc.abstractmethod
    def attempts(self, job_id: str) -> list[Attempt]: ...

    @abc.abstractmethod
    def jobs(self, *, state: State | str | None = None, limit: int = 100) -> list[Job]: ...

    @abc.abstractmethod
    def message_jobs(self, message_id: str, unpurged: bool = False) -> list[Job]:
        """The message's jobs; `unpurged`: none once its documents are purged."""

    @abc.abstractmethod
    def taken_sids(self, job: Job, sids: Iterable[str]) -> set[str]:
        """Of these fax sids, those that belong to another job (or to an earlier attempt of
        this one): a sid is one job's only, never to be adopted by another."""

    # -- the one guarded change --------------------------------------------------------------

    @abc.abstractmethod
    def transition(self, job_id: str, sources: Iterable[State], target: State | None,
                   event: str, detail: str | None, *, at: float | None = None,
                   fence: int | None = None, **values: Any) -> bool:
        """Move a job from one of `sources` to `target` (None: it stays where it is), setting
        `values` and recording `event`, only if the table allows every (source, target, event)
        (else IllegalTransition, nothing written) and the job is still in one of `sources`
        (else False, nothing written). `fence`: the lease epoch of the worker's claim; the
        change is made only while no other claim came since."""

    # -- worker steps ------------------------------------------------------------------------

    @abc.abstractmethod
    def add_event(self, job_id: str, kind: str, detail: str | None = None) -> None:
        """History only (a refused or ignored callback): no change to the job."""

    @abc.abstractmethod
    def mark_stored(self, job: Job, media_key: str) -> bool: ...

    @abc.abstractmethod
    def mark_submitting(self, job: Job, callback_url: str, recheck_at: float) -> bool:
        """Committed durably before the send POST."""

    @abc.abstractmethod
    def mark_submitted(self, job: Job, sid: str, status: str, poll_at: float,
                       detail: str) -> bool: ...

    @abc.abstractmethod
    def mark_outcome_unknown(self, job: Job, recheck_at: float, detail: str) -> bool: ...

    @abc.abstractmethod
    def back_to_stored(self, job: Job, run_at: float, detail: str) -> bool: ...

    @abc.abstractmethod
    def schedule_retry(self, job: Job, run_at: float, quality: str, detail: str) -> bool: ...

    @abc.abstractmethod
    def retry_later(self, job: Job, run_at: float, detail: str) -> bool: ...

    @abc.abstractmethod
    def mark_given_up(self, job: Job, reason: str, error_code: str | None = None,
                      error_message: str | None = None) -> bool: ...

    @abc.abstractmethod
    def record_status(self, job: Job, sid: str | None, status: str | None, *,
                      pages: int | None, duration_s: int | None, error_code: str | None,
                      error_message: str | None, source: str) -> CallbackAction:
        """Apply a fax status (callback or poll) idempotently; returns what it did."""

    @abc.abstractmethod
    def record_callback(self, token: str, accept: Callable[[Job], bool], sid: str | None,
                        status: str | None, *, pages: int | None, error_code: str | None,
                        error_message: str | None) -> tuple[Job | None, CallbackAction | None]:
        """A status callback: the job of `token` looked up, checked by `accept` (the
        request's signature against the job) and `record_status`, in one call. (None, None):
        no such job; (job, None): `accept` refused it, nothing recorded."""

    @abc.abstractmethod
    def mark_reporting(self, job: Job, n: int, detail: str) -> bool:
        """Report `n` is about to be mailed; False (nothing mailed) when the job moved on or
        another node claimed it since `job` was claimed (its fencing token, `lease_epoch`)."""

    @abc.abstractmethod
    def mark_reported(self, job: Job, detail: str) -> bool: ...

    @abc.abstractmethod
    def mark_reported_and_claim_purge(self, job: Job,
                                      detail: str) -> tuple[bool, list[Job] | None]:
        """`mark_reported` and, in the same transaction, `claim_purge` of the job's message:
        (recorded, the message's jobs when the purge is now this node's to do)."""

    # -- the document's end ------------------------------------------------------------------

    @abc.abstractmethod
    def gone_messages(self, ids: Sequence[str]) -> set[str]:
        """Of these message ids, those whose document may go (purged, or no such message)."""

    @abc.abstractmethod
    def unpurged_done_messages(self, cutoff: float, limit: int = 100) -> list[Message]:
        """Messages whose jobs were all reported before `cutoff` and whose document remains."""

    @abc.abstractmethod
    def claim_purge(self, message_id: str, job: Job | None = None) -> bool:
        """The message's document is about to be deleted: only if every job of it is
        reported (and `job` is still held); no resend takes the document from then on."""

    @abc.abstractmethod
    def mark_purged(self, message_id: str) -> None: ...

    @abc.abstractmethod
    def prune(self, cutoff: float, limit: int = 1000) -> int:
        """Delete reported jobs (and their history) reported before `cutoff`."""

    # -- operator actions --------------------------------------------------------------------

    # Each takes `by`: who asked (a dashboard administrator's name), written into the job's
    # history in the one event the action makes; None means "the operator" (the CLI).

    @abc.abstractmethod
    def add_resend(self, job: Job, new: NewJob, now: float, *, stored: bool = False,
                   by: str | None = None) -> str | UnderWay | None:
        """A new job for the message and number of `job`; None when done, else why not
        (`UnderWay`: another job of the message to the number is not yet reported). The check
        and the insert are one step across nodes: of resends asked at the same moment, one
        is made. `stored`: it sends the media object `new.media_key` already in the media
        store."""

    @abc.abstractmethod
    def cancel_unsent(self, job_id: str, reason: str, now: float, *,
                      by: str | None = None) -> bool: ...

    @abc.abstractmethod
    def note_cancel(self, job_id: str, detail: str, now: float, *,
                    by: str | None = None) -> bool: ...

    @abc.abstractmethod
    def report_again(self, job_id: str, state: State, now: float, *,
                     by: str | None = None) -> bool: ...

    @abc.abstractmethod
    def report_now(self, job_id: str, now: float, *, by: str | None = None) -> bool: ...


class Leases(Calls):
    """Shared decisions across nodes: claims of due jobs and their renewal, named leases,
    the account's send slot, and hits (rate limits, failed logins)."""

    # -- claims ------------------------------------------------------------------------------

    @abc.abstractmethod
    def claim_due(self, now: float, limit: int, exclude: Iterable[str] = ()) -> list[Job]:
        """Active jobs whose next step is due, oldest first, each leased to this node until
        now + lease_s, in the same transaction: no other node gets it while the lease lives.
        At most one stored job per destination number, and none to a number in flight."""

    @abc.abstractmethod
    def next_due_at(self, exclude: Iterable[str] = ()) -> float | None:
        """When the next step of a job not in `exclude` (running now) falls due."""

    @abc.abstractmethod
    def release_and_claim(self, released: Sequence[str], now: float, limit: int,
                          exclude: Sequence[str]) -> tuple[list[Job], float | None]:
        """`release` of `released`, `claim_due` (up to `limit`; none when 0) and
        `next_due_at`, in one transaction: the worker's trip after its steps end."""

    @abc.abstractmethod
    def renew_leases(self, job_ids: Iterable[str], now: float) -> set[str]:
        """The heartbeat: extend this node's leases; returns the ids it still holds."""

    @abc.abstractmethod
    def release(self, *job_ids: str, wake_others: bool = False) -> None:
        """This node is done with these jobs' steps: any node may claim their next ones.
        `wake_others`: and the other nodes are told at once (a stopping node hands its jobs
        back; see `Wakeups`)."""

    @abc.abstractmethod
    def release_all(self, everyone: bool = False) -> int:
        """At start: drop leases a previous run of this node (or, `everyone`, any) left."""

    @abc.abstractmethod
    def lease_of(self, job_id: str) -> tuple[str | None, float | None]:
        """Who holds the job's lease, and until when (None, None: nobody)."""

    @abc.abstractmethod
    def take_lead(self, name: str, now: float, ttl_s: float) -> bool:
        """Hold the named lease (once-only tasks); False while another live node holds it."""

    @abc.abstractmethod
    def take_send_slot(self, now: float, interval_s: float) -> float:
        """The time of the next free send slot, reserved for this node (shared send rate)."""

    @abc.abstractmethod
    def take_send_slot_and_submit(self, job: Job, now: float, interval_s: float,
                                  callback_url: str, recheck_at: float) -> tuple[float, Job | None]:
        """`take_send_slot`, and when the slot is now, `mark_submitting` in the same
        transaction: (the slot's time, the job's row when it is now `submitting`)."""

    # -- hits --------------------------------------------------------------------------------

    @abc.abstractmethod
    def add_hit(self, kind: str, key: str, now: float, forget_before: float) -> int:
        """Count a hit (a mail, a failed login) shared across nodes; hits since then."""

    @abc.abstractmethod
    def count_hits(self, kind: str, key: str, since: float) -> int: ...

    @abc.abstractmethod
    def take_hits(self, rules: Sequence[Rule], now: float, window_s: float,
                  count: int = 1) -> float:
        """A shared sliding-window rate limit: record `count` hits under every rule or none;
        0.0, or the seconds until they would fit."""

    @abc.abstractmethod
    def hits_wait(self, rules: Sequence[Rule], count: int, now: float,
                  window_s: float) -> float:
        """`take_hits` without recording: would `count` more fit now?"""

    @abc.abstractmethod
    def hit_counts(self, rules: Sequence[Rule], now: float,
                   window_s: float) -> dict[tuple[str, str], int]:
        """Each rule's (kind, key) hits in the window now (absent: none)."""

    @abc.abstractmethod
    def give_back_hits(self, keys: Sequence[tuple[str, str]], count: int) -> None:
        """Remove the newest `count` hits of each (kind, key) (a refused message's charge)."""

    @abc.abstractmethod
    def prune_hits(self, before: float) -> int:
        """Delete every hit older than `before` (housekeeping)."""

    @abc.abstractmethod
    def last_hit(self, kind: str, key: str) -> float | None: ...

    @abc.abstractmethod
    def clear_hits(self, kind: str, key: str) -> None: ...


class Listings(Calls):
    """The reads of the dashboard, the metrics and the CLI over all jobs."""

    @abc.abstractmethod
    def queue_depth(self) -> int:
        """Jobs not yet reported, all nodes together."""

    @abc.abstractmethod
    def counts_by_state(self) -> dict[str, int]: ...

    @abc.abstractmethod
    def oldest_active_created_at(self) -> float | None: ...

    @abc.abstractmethod
    def job_listing(self, *, states: Iterable[State] | None = None,
                    fax_status: str | None = None, to_digits: str | None = None,
                    sender: str | None = None, since: float | None = None,
                    limit: int = 50, gave_up: bool = False) -> list[JobListing]:
        """Jobs with their message and last event, newest first (`faxgw jobs`)."""

    @abc.abstractmethod
    def job_search(self, *, states: Iterable[State] | None = None,
                   fax_status: str | None = None, to_digits: str | None = None,
                   sender: str | None = None, since: float | None = None,
                   until: float | None = None, text: str | None = None, offset: int = 0,
                   limit: int = 25) -> tuple[list[JobListing], int]:
        """One page of jobs matching the filters (the dashboard), and how many match."""

    @abc.abstractmethod
    def job_ids_by_prefix(self, prefix: str, limit: int = 5) -> list[str]: ...

    @abc.abstractmethod
    def job_ids_by_fax_sid(self, sid: str) -> list[str]: ...


class Nodes(Calls):
    """Which gateways are running: each writes a heartbeat row."""

    @abc.abstractmethod
    def node_seen(self, node_id: str, started_at: float, now: float, detail: str) -> None: ...

    @abc.abstractmethod
    def node_gone(self, node_id: str) -> None: ...

    @abc.abstractmethod
    def live_nodes(self, since: float, limit: int = 100) -> list[dict[str, Any]]:
        """Nodes seen at or after `since`: node_id, started_at, seen_at, detail."""


class Wakeups(abc.ABC):
    """Wake-ups from the other nodes of a shared queue (`Store.wakeups`; PostgreSQL's
    LISTEN/NOTIFY, gateway/store/pg_wakeups.py; none on SQLite, one node that wakes itself):
    calls the `wake` it was made with whenever another node says that work is due. A hint,
    never the only way work is found: the worker still looks at the queue every
    SHARED_POLL_S. Started and stopped by the daemon, on its event loop."""

    @abc.abstractmethod
    async def start(self) -> None:
        """Begin listening in the background; returns at once (a database that cannot be
        reached, or notifications that do not arrive, leave the node polling)."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Stop listening and close what it holds."""

    @abc.abstractmethod
    def status(self) -> tuple[bool, int, str]:
        """For /readyz, the dashboard and /metrics: whether other nodes' wake-ups reach this
        node now, how many it has heard since start, and what it is doing, in words."""


class SqlAccess(abc.ABC):
    """The SQL store's public surface for the tables kept beside the jobs (inbound faxes,
    split mail, dashboard sessions): portable SQL with `?` placeholders, run in the store's
    transactions on its thread and connection, whatever the backend."""

    clock: Callable[[], float]
    node_id: str
    lease_s: float
    # Appended to a SELECT that claims rows: " FOR UPDATE SKIP LOCKED" on PostgreSQL (each
    # node takes other rows), nothing on SQLite (one writer at a time).
    SKIP_LOCKED: str

    @abc.abstractmethod
    def tx(self, durable: bool = False) -> AbstractContextManager[None]:
        """A write transaction that takes the write lock at once (see `SqlStore._tx`)."""

    @abc.abstractmethod
    def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        """Run one statement; the number of rows it changed."""

    @abc.abstractmethod
    def execute_later(self, sql: str, args: Sequence[Any] = ()) -> Callable[[], int]:
        """Run one statement whose row count nobody waits for (PostgreSQL sends it with the
        next statement or the commit); the count, once the transaction has ended."""

    @abc.abstractmethod
    def rows(self, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """Run one query; its rows as dicts keyed by column name."""

    @abc.abstractmethod
    def one(self, sql: str, args: Sequence[Any] = ()) -> dict[str, Any] | None: ...

    @abc.abstractmethod
    def scalar(self, sql: str, args: Sequence[Any] = ()) -> Any: ...

    @abc.abstractmethod
    def lock(self, what: str) -> None:
        """Inside a transaction: serialise one kind of shared decision across nodes."""

    @abc.abstractmethod
    def is_db_error(self, exc: BaseException) -> bool:
        """Whether `exc` is the database driver's own error (the store could not answer)."""
