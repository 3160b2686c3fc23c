"""Split mail (message/partial) in the job store, where every gateway node sees it.

One `partial_sets` row per set (sender and id, hashed: `set_key`), one `partials` row per part
held; the part's bytes are an object in the media store (smtp/partials.py). The tables come from
migration 6. Like InboundStore, the queries run through the SQL store's public surface
(`SqlAccess`) on its thread and connection (`await store.run(partials.method, ...)`).

Exactly once: a part is recorded in a transaction that first locks its set's row (an UPDATE of
it: a row lock on PostgreSQL, the write lock on SQLite), so the commits of one set's parts are
serialised across nodes; the one that completes the set also marks it `joining` for its node
(`owner`, a token of that node and that join), and every later step on the set (given back
after a temporary failure, finished, expired) names that owner in the statement that makes it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from gateway.documents.partial import PartialError, PartialInfo, SetsFull, check_part
from gateway.store.base import StoreError
from gateway.store.interfaces import SqlAccess

T = TypeVar("T")

OPEN, JOINING, CLOSED = "open", "joining", "closed"


def sender_key(sender: str) -> str:
    return hashlib.sha256(sender.lower().encode()).hexdigest()[:40]


def stale(held: HeldSet, before: float | None) -> bool:
    """Claimed for a join so long ago that the node joining it must have died."""
    return (before is not None and held.state == JOINING and held.claimed_at is not None
            and held.claimed_at <= before)


@dataclass(frozen=True)
class HeldSet:
    set_id: str
    sender_key: str
    total: int | None
    recipients: list[str]
    meta: dict[str, Any]
    first_seen: float
    state: str
    owner: str | None
    claimed_at: float | None
    numbers: tuple[int, ...]  # the part numbers held, in order
    keys: tuple[str, ...]  # their media keys, in the same order
    size: int


@dataclass(frozen=True)
class Added:
    """A part recorded: the set as it stands. `joining`: the set was complete already (being
    joined by a node): nothing was recorded. `owner` (with `keys` in part order): this
    commit completed the set and claimed it. `replaced`: the media key of a twin of this
    part that the commit replaced (its object is to be deleted)."""

    numbers: tuple[int, ...] = ()
    total: int | None = None
    size: int = 0
    joining: bool = False
    owner: str | None = None
    keys: tuple[str, ...] = ()
    replaced: str | None = None


class PartialsStore:
    """Synchronous methods: call them through `store.run(...)`."""

    def __init__(self, store: SqlAccess) -> None:
        self.store = store
        self._tx = store.tx
        self._exec = store.execute
        self._rows = store.rows
        self._one = store.one

    def _db(self, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except (StoreError, PartialError, SetsFull):
            raise
        except Exception as exc:
            if self.store.is_db_error(exc):
                raise StoreError(str(exc)) from exc
            raise

    def get(self, set_id: str) -> HeldSet | None:
        return self._db(lambda: self._get(set_id))

    def _get(self, set_id: str) -> HeldSet | None:
        head = self._one("SELECT * FROM partial_sets WHERE set_id = ?", (set_id,))
        if head is None:
            return None
        parts = self._rows("SELECT number, media_key, size FROM partials WHERE set_id = ?"
                           " ORDER BY number", (set_id,))
        return HeldSet(set_id, head["sender_key"], head["total"],
                       [n for n in head["recipients"].split(",") if n],
                       json.loads(head["meta"]), float(head["first_seen"]), head["state"],
                       head["owner"], head["claimed_at"], tuple(int(p["number"]) for p in parts),
                       tuple(p["media_key"] for p in parts),
                       sum(int(p["size"]) for p in parts))

    def open_sets(self, sender: str) -> tuple[int, int]:
        """(this sender's sets held, everyone's)."""
        return self._db(lambda: self._open_sets(sender_key(sender)))

    def _open_sets(self, key: str) -> tuple[int, int]:
        row = self._one("SELECT COUNT(*) AS n, SUM(CASE WHEN sender_key = ? THEN 1 ELSE 0 END)"
                        " AS mine FROM partial_sets", (key,))
        return (int(row["mine"] or 0), int(row["n"] or 0)) if row else (0, 0)

    def add(self, set_id: str, sender: str, info: PartialInfo, recipients: list[str],
            media_key: str, size: int, meta: dict[str, Any], now: float, *, owner: str,
            max_bytes: int, max_sets: int, max_sets_per_sender: int,
            stale_before: float | None = None) -> Added:
        """Record one part (its object `media_key` is in the media store already) and return
        the set as it stands; when this commit completes the set, it is claimed for `owner`.
        `stale_before`: a set claimed for a join before then is joined again (the node
        joining it died: see Partials).

        Raises PartConflict for a part that contradicts the set, PartialError when the parts
        would together exceed `max_bytes`, SetsFull when a new set finds no room (this
        sender's `max_sets_per_sender`, everyone's `max_sets`); nothing is recorded then."""
        return self._db(lambda: self._add(set_id, sender_key(sender), info, recipients,
                                          media_key, size, meta, now, owner, max_bytes,
                                          max_sets, max_sets_per_sender, stale_before))

    def _lock(self, set_id: str) -> bool:
        return bool(self._exec("UPDATE partial_sets SET first_seen = first_seen"
                               " WHERE set_id = ?", (set_id,)))

    def _add(self, set_id: str, skey: str, info: PartialInfo, recipients: list[str],
             media_key: str, size: int, meta: dict[str, Any], now: float, owner: str,
             max_bytes: int, max_sets: int, max_sets_per_sender: int,
             stale_before: float | None) -> Added:
        with self._tx(durable=True):
            if not self._lock(set_id):
                # A new set: counted under a lock of its own, so two nodes opening sets for
                # one sender at once do not both pass the bound.
                self.store.lock("partials")
                mine, everyone = self._open_sets(skey)
                if mine >= max_sets_per_sender:
                    raise SetsFull(True, mine)
                if everyone >= max_sets:
                    raise SetsFull(False, everyone)
                self._exec("INSERT INTO partial_sets (set_id, sender_key, total, recipients,"
                           " meta, first_seen, state) VALUES (?, ?, ?, ?, ?, ?, ?)"
                           " ON CONFLICT (set_id) DO NOTHING",
                           (set_id, skey, info.total, ",".join(recipients), json.dumps(meta),
                            now, OPEN))
                self._lock(set_id)
            held = self._get(set_id)
            assert held is not None
            if stale(held, stale_before):
                self._exec("UPDATE partial_sets SET state = ?, owner = NULL, claimed_at = NULL"
                           " WHERE set_id = ? AND state = ?", (OPEN, set_id, JOINING))
                held = replace(held, state=OPEN, owner=None, claimed_at=None)
            if held.state != OPEN:
                return Added(held.numbers, held.total, held.size, joining=True)
            check_part(info, recipients, held.total, held.recipients, list(held.numbers))
            twins = dict(zip(held.numbers, held.keys, strict=True))
            replaced = twins.get(info.number)
            twin_size = 0
            if replaced is not None:
                twin_size = int(self.store.scalar("SELECT size FROM partials WHERE set_id = ?"
                                                  " AND number = ?", (set_id, info.number)))
            if held.size - twin_size + size > max_bytes:
                raise PartialError(f"the parts of this message together are larger than "
                                   f"{max_bytes} bytes, the most this gateway accepts")
            if replaced is not None:
                self._exec("UPDATE partials SET media_key = ?, size = ?, received_at = ?"
                           " WHERE set_id = ? AND number = ?",
                           (media_key, size, now, set_id, info.number))
            else:
                self._exec("INSERT INTO partials (set_id, number, media_key, size, received_at)"
                           " VALUES (?, ?, ?, ?, ?)", (set_id, info.number, media_key, size, now))
            total = held.total or info.total
            if held.total is None and info.total is not None:
                self._exec("UPDATE partial_sets SET total = ? WHERE set_id = ?",
                           (info.total, set_id))
            twins[info.number] = media_key
            numbers = tuple(sorted(twins))
            held_size = held.size - twin_size + size
            if total is None or len(numbers) < total:
                return Added(numbers, total, held_size, replaced=replaced)
            # Every number 1..total is here (none is above total: check_part).
            self._exec("UPDATE partial_sets SET state = ?, owner = ?, claimed_at = ?"
                       " WHERE set_id = ? AND state = ?", (JOINING, owner, now, set_id, OPEN))
            return Added(numbers, total, held_size, owner=owner,
                         keys=tuple(twins[n] for n in numbers), replaced=replaced)

    def give_back(self, set_id: str, owner: str) -> bool:
        """The join failed for now: the set waits again (the sender retries its last part)."""
        def step() -> bool:
            with self._tx():
                return bool(self._exec(
                    "UPDATE partial_sets SET state = ?, owner = NULL, claimed_at = NULL"
                    " WHERE set_id = ? AND owner = ? AND state = ?",
                    (OPEN, set_id, owner, JOINING)))
        return self._db(step)

    def finish(self, set_id: str, owner: str) -> list[str]:
        """The joined mail was queued or refused for good: the set's rows go; its media keys
        come back (to delete), only while `owner` still holds it (else [])."""
        def step() -> list[str]:
            with self._tx():
                if not self._exec("UPDATE partial_sets SET state = ? WHERE set_id = ?"
                                  " AND owner = ? AND state = ?",
                                  (CLOSED, set_id, owner, JOINING)):
                    return []
                return self._drop(set_id)
        return self._db(step)

    def _drop(self, set_id: str) -> list[str]:
        keys = [r["media_key"] for r in self._rows(
            "SELECT media_key FROM partials WHERE set_id = ?", (set_id,))]
        self._exec("DELETE FROM partials WHERE set_id = ?", (set_id,))
        self._exec("DELETE FROM partial_sets WHERE set_id = ?", (set_id,))
        return keys

    def expire(self, before: float, stale_before: float, limit: int) -> list[HeldSet]:
        """Take out the sets whose first part came before `before` and are still waiting,
        and those claimed for a join before `stale_before` (a node died joining them: whether
        their fax was queued is unknown, so they are never retried). Each is taken in a
        statement that checks it is still so: a part completing it meanwhile wins, or loses
        whole (it then starts a new set)."""
        def step() -> list[HeldSet]:
            out = []
            for row in self._rows(
                    "SELECT set_id FROM partial_sets WHERE (state = ? AND first_seen <= ?)"
                    " OR (state = ? AND claimed_at <= ?) ORDER BY first_seen LIMIT ?",
                    (OPEN, before, JOINING, stale_before, limit)):
                with self._tx():
                    if not self._exec(
                            "UPDATE partial_sets SET first_seen = first_seen WHERE set_id = ?"
                            " AND ((state = ? AND first_seen <= ?)"
                            " OR (state = ? AND claimed_at <= ?))",
                            (row["set_id"], OPEN, before, JOINING, stale_before)):
                        continue
                    held = self._get(row["set_id"])
                    assert held is not None
                    self._drop(held.set_id)
                out.append(held)
            return out
        return self._db(step)
