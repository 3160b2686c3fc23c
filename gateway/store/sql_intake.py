"""The intake commit: a mail's message and jobs in one durable transaction, and the merge of a
copy sent again (a client that lost our 250) into the jobs of the first, decided inside it."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from gateway.jobs.outbound_states import Ev, State, check_transition
from gateway.store.base import StoreError
from gateway.store.rows import Message, NewJob
from gateway.store.sql_core import _MESSAGE_COLUMNS, SqlCore, _marks

# A mail's dedup claim on its way (`_send_dedup`): its (number, job id) pairs in key order,
# and its rows once read.
_Claim = tuple[list[tuple[str, str]], Callable[[], list[dict[str, Any]]]]


class SqlIntake(SqlCore):
    """`add_message` of the `Jobs` interface."""

    _JOB_INSERT = ("id", "message_id", "to_number", "from_number", "quality", "state",
                   "callback_token", "media_key", "pages", "attempt", "tries", "next_run_at",
                   "created_at", "updated_at")

    # Columns of migration 6 (DSN, AUTH=), written only when a mail has them: a mail without
    # is the same INSERT as before (tests/test_store_backends.py writes to older schemas).
    _DSN_JOB_COLUMNS = ("dsn_notify", "dsn_orcpt")

    _DSN_MESSAGE_COLUMNS = frozenset({"dsn_ret", "dsn_envid", "auth_submitter", "dsn_headers",
                                      "dsn_full"})

    def add_message(self, message: Message, jobs: Iterable[NewJob], *, stored: bool = False,
                    dedup_since: float | None = None) -> list[str] | None:
        """`stored`: the document is already in the media store (a shared queue uploads it
        before the 250), so the jobs start in `stored`. `dedup_since`: see `_send_dedup`.

        A few statements whatever the number of jobs (one per table), in a batch transaction:
        PostgreSQL sends them together and waits once for the dedup claim and once for the
        commit, which is most of the 250's wait on a database across the network."""
        (result,) = self.add_messages([(message, list(jobs), stored, dedup_since)])
        if isinstance(result, BaseException):
            raise result
        return result

    def add_messages(self, mails: Sequence[tuple[Message, list[NewJob], bool, float | None]]
                     ) -> list[list[str] | None | BaseException]:
        """`add_message` of several mails in one transaction and one commit: what a burst's
        mails that end DATA together wait for (`Store.add_message_soon`). Per mail, in order:
        None (committed), the earlier copy's jobs (a copy sent again: nothing of it kept), or
        the error that kept the whole transaction from committing (the same for every mail:
        none of them is kept)."""
        results: list[list[str] | None | BaseException] = []
        try:
            with self._batch_tx(durable=True):
                # Every mail's dedup claim first, sent together (PostgreSQL waits once for
                # all of them, not once a mail); each is read where its mail is written.
                claims = [self._send_dedup(message, jobs, dedup_since)
                          for message, jobs, _, dedup_since in mails]
                for (message, jobs, stored, _), claim in zip(mails, claims, strict=True):
                    results.append(self._add_one(message, jobs, stored, claim))
        except StoreError as exc:
            return [exc] * len(mails)
        except Exception as exc:
            if self._is_db_error(exc):
                error = StoreError(str(exc))
                error.__cause__ = exc
                return [error] * len(mails)
            raise
        return results

    def _add_one(self, message: Message, jobs: list[NewJob], stored: bool,
                 claim: _Claim | None) -> list[str] | None:
        """One mail inside the intake transaction. Its dedup claim came first (`_send_dedup`):
        a copy sent again (every key held by an earlier copy, which may be a mail earlier in
        this same transaction) writes nothing at all, so nothing needs undoing."""
        if claim is not None:
            earlier = self._claimed(message, jobs, claim)
            if earlier is not None:
                return earlier
        columns = [c for c in _MESSAGE_COLUMNS if c not in self._DSN_MESSAGE_COLUMNS
                   or getattr(message, c) is not None]
        writes: list[tuple[str, Sequence[Any]]] = [(
            f"INSERT INTO messages ({', '.join(columns)})"
            f" VALUES ({_marks(columns)})",
            [getattr(message, c) for c in columns])]
        if jobs:
            writes += self._job_inserts(message, jobs, self.clock(), stored)
            # Another node may be free to send them (at COMMIT).
            writes += self._announcing()
        self._write_together(writes)
        return None

    def _write_together(self, writes: Sequence[tuple[str, Sequence[Any]]]) -> None:
        """Statements whose counts nobody reads, in order, inside the caller's transaction
        (PostgreSQL: one statement, see PostgresStore)."""
        for sql, args in writes:
            self._exec_later(sql, args)

    def _job_inserts(self, message: Message, jobs: list[NewJob], now: float,
                     stored: bool) -> list[tuple[str, Sequence[Any]]]:
        """A new message's jobs and their first events, in two statements: each job born
        `spooled` (received) and, `stored`, moved on to `stored` at once: both changes checked
        against the table, made by the insert itself."""
        check_transition([None], State.SPOOLED, Ev.RECEIVED)
        events = [(j.id, Ev.RECEIVED,
                   f"from {message.report_to or message.envelope_from or '-'}"
                   f" peer {message.peer or '-'}, {message.pages} page(s),"
                   f" {message.document_bytes} bytes") for j in jobs]
        state = State.SPOOLED
        if stored:
            check_transition([State.SPOOLED], State.STORED, Ev.STORED)
            state = State.STORED
            events += [(j.id, Ev.STORED, "document in the media store before the 250")
                       for j in jobs]
        dsn = any(j.dsn_notify is not None or j.dsn_orcpt is not None for j in jobs)
        columns = self._JOB_INSERT + (self._DSN_JOB_COLUMNS if dsn else ())
        return [
            (f"INSERT INTO jobs ({', '.join(columns)}) VALUES "
             + ", ".join(f"({_marks(columns)})" for _ in jobs),
             [v for j in jobs for v in (
                 j.id, message.id, j.to_number, j.from_number, j.quality, state.value,
                 j.callback_token, j.media_key, message.pages, 0, 0, now, now, now,
                 *((j.dsn_notify, j.dsn_orcpt) if dsn else ()))]),
            ("INSERT INTO events (job_id, at, kind, detail) VALUES "
             + ", ".join("(?, ?, ?, ?)" for _ in events),
             [v for job_id, kind, detail in events for v in (job_id, now, kind, detail)])]

    def _send_dedup(self, message: Message, jobs: list[NewJob],
                    since: float | None) -> _Claim | None:
        """Inside the intake commit: claim this mail's dedup key for each number (Message-ID,
        number, document), unless an earlier copy accepted at or after `since` holds it. None
        for a mail that is not deduplicated (no Message-ID, no jobs, no window).

        One upsert for all numbers, in key order (two copies committing at once on two nodes
        lock the keys in the same order: the second waits for the first and then finds its
        keys; SQLite serialises the commits). A key older than `since` is taken over, so the
        window's end lets a later copy through. Its rows are read by `_claimed`."""
        if not jobs or since is None or not message.message_id_header:
            return None
        mine = sorted((j.to_number, j.id) for j in jobs)
        rows = self._rows_later(
            "INSERT INTO dedup_keys (message_id_header, to_number, document_sha256, job_id, at)"
            f" VALUES {', '.join('(?, ?, ?, ?, ?)' for _ in mine)}"
            " ON CONFLICT (message_id_header, to_number, document_sha256) DO UPDATE SET"
            " job_id = CASE WHEN dedup_keys.at < ? THEN excluded.job_id"
            " ELSE dedup_keys.job_id END,"
            " at = CASE WHEN dedup_keys.at < ? THEN excluded.at ELSE dedup_keys.at END"
            " RETURNING to_number, job_id",
            [*(v for number, job_id in mine
               for v in (message.message_id_header, number, message.document_sha256, job_id,
                         message.created_at)), since, since])
        return mine, rows

    def _claimed(self, message: Message, jobs: list[NewJob], claim: _Claim) -> list[str] | None:
        """None when this mail is new (every key now ours: a mail with a new recipient is a
        new mail and takes the others over too), or the jobs of the earlier copy, in the
        order of `jobs`, when it holds every key."""
        mine, later = claim
        rows = later()
        holders = {r["to_number"]: r["job_id"] for r in rows}
        taken = [(number, job_id) for number, job_id in mine if holders[number] != job_id]
        if len(taken) == len(mine):
            return [holders[j.to_number] for j in jobs]
        for number, job_id in taken:
            self._exec_later("UPDATE dedup_keys SET job_id = ?, at = ? WHERE message_id_header = ?"
                             " AND to_number = ? AND document_sha256 = ?",
                             (job_id, message.created_at, message.message_id_header, number,
                              message.document_sha256))
        return None
