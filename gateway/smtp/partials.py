"""Split mail (message/partial) kept where every gateway node sees it.

Each part's bytes go to the media store (S3 with several nodes, DATA_DIR/media with one) under
a key named after its set and number, and a row in the job store (gateway/store/partials.py)
says which parts a set holds. The node whose commit completes the set joins it; the others
answer "being faxed". With several nodes the parts of one scan may arrive at different nodes.

Ordering: the object is written before the row that names it (a 250 only once both are
durable); an object is deleted only after the commit that took its row away, and only by the
node whose commit that was.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.documents.partial import (
    MAX_OPEN_SETS,
    PartialError,
    Received,
    SetsFull,
    join,
    partial_info,
    set_key,
)
from gateway.media_store import MediaError, MediaStore
from gateway.runtime.faults import crash_point
from gateway.store.base import Store
from gateway.store.partials import Added, HeldSet, PartialsStore, stale
from gateway.store.sql import SqlStore

__all__ = ["Expired", "Partials"]

log = logging.getLogger(__name__)

EXPIRE_BATCH = MAX_OPEN_SETS  # sets taken out per expiry sweep


@dataclass(frozen=True)
class Expired:
    """The sets of one sender that expired in one sweep (the sender gets one notice)."""

    sender_key: str
    sets: list[HeldSet]


class Partials:
    def __init__(self, store: Store, media: MediaStore, node_id: str,
                 max_sets_per_sender: int, join_stale_s: float | None = None) -> None:
        """`join_stale_s`: a set claimed for a join that long ago, whose last part comes
        again, is joined again: the node joining it died (or its sender gave up waiting for
        the answer), and the sender is trying once more. Safe only where a mail queued twice
        is recognised as one (DEDUP_WINDOW_HOURS): the join may have been queued already.
        None: such a set waits for its expiry, and a retry is told it is being faxed."""
        assert isinstance(store, SqlStore), "split mail is kept in an SQL store"
        self.store = store
        self.rows = PartialsStore(store)
        self.media = media
        self.node_id = node_id
        self.max_sets_per_sender = max_sets_per_sender
        self.join_stale_s = join_stale_s

    async def receive(self, path: Path, sender: str, recipients: list[str],
                      meta: Callable[[], dict[str, Any]], *, now: float, max_bytes: int,
                      head: bytes) -> Received:
        """Keep the part in `path` (`head`: its first bytes); hand back the whole message
        when it completes its set, with this node's claim on the set (`done` ends it).

        Raises PartialError for a part that can never be reassembled (PartConflict: it
        contradicts its set), SetsFull when no new set may be opened now, and OSError,
        MediaError or StoreError when the part cannot be kept now (the sender retries)."""
        info = partial_info(head)
        if info is None:
            return Received()
        set_id = set_key(sender, info.id)
        # What can be seen refused without the upload is refused before it (the transaction
        # below checks it all again).
        held = await self.store.run(self.rows.get, set_id)
        stale_before = now - self.join_stale_s if self.join_stale_s is not None else None
        if held is not None and held.state != "open" and not stale(held, stale_before):
            return self._being_faxed(set_id, info.number)
        if held is None:
            mine, everyone = await self.store.run(self.rows.open_sets, sender)
            if mine >= self.max_sets_per_sender:
                raise SetsFull(True, mine)
            if everyone >= MAX_OPEN_SETS:
                raise SetsFull(False, everyone)
        size = (await asyncio.to_thread(path.stat)).st_size
        key = f"partial-{set_id[:16]}-{info.number}-{secrets.token_hex(6)}.eml"
        await self.media.put(key, path)
        owner = f"{self.node_id}/{secrets.token_hex(6)}"
        try:
            added: Added = await self.store.run(functools.partial(
                self.rows.add, set_id, sender, info, recipients, key, size, meta(), now,
                owner=owner, max_bytes=max_bytes, max_sets=MAX_OPEN_SETS,
                max_sets_per_sender=self.max_sets_per_sender, stale_before=stale_before))
        except (PartialError, SetsFull):
            await self._delete([key], f"message/partial {set_id[:12]}: refused part")
            raise
        # Any other failure may have come after the commit (a connection lost meanwhile):
        # the object stays, as a row may name it (an orphan costs storage, not a part).
        if added.joining:
            await self._delete([key], f"message/partial {set_id[:12]}: part of a joined set")
            return self._being_faxed(set_id, info.number)
        if added.replaced is not None:
            await self._delete([added.replaced], f"message/partial {set_id[:12]}: a twin part")
        of = f" of {added.total}" if added.total else ""
        log.info("message/partial %s: part %d%s received (%d held, %d bytes)", set_id[:12],
                 info.number, of, len(added.numbers), added.size)
        if added.owner is None:
            return Received(set_id, f"Part {info.number}{of} received; the fax is sent when "
                                    "all parts have arrived")
        crash_point("partial-claimed")
        try:
            whole = await self._join(path, added.keys)
        except BaseException:
            await self.done(set_id, added.owner, keep=True)
            raise
        log.info("message/partial %s: all %d parts here, joined (%d bytes)", set_id[:12],
                 len(added.keys), len(whole))
        return Received(set_id, whole=whole, owner=added.owner)

    @staticmethod
    def _being_faxed(set_id: str, number: int) -> Received:
        return Received(set_id, f"Part {number} received; the message it belongs to is "
                                "complete and being faxed")

    async def _join(self, path: Path, keys: tuple[str, ...]) -> bytes:
        """The parts fetched beside `path` (the mail being received), read and joined."""
        parts: list[bytes] = []
        for n, key in enumerate(keys, start=1):
            scratch = path.with_name(f"{path.name}.part{n}")
            try:
                await self.media.fetch(key, scratch)
                parts.append(await asyncio.to_thread(scratch.read_bytes))
            finally:
                await asyncio.to_thread(scratch.unlink, True)
        return await asyncio.to_thread(join, parts)

    async def done(self, set_id: str, owner: str, *, keep: bool) -> None:
        """The joined mail was queued or refused for good (its parts go), or must wait for a
        retry of its last part (`keep`: the set waits again). Only while `owner` holds it."""
        if keep:
            if not await self.store.run(self.rows.give_back, set_id, owner):
                log.warning("message/partial %s: no longer held by this node", set_id[:12])
            return
        keys = await self.store.run(self.rows.finish, set_id, owner)
        await self._delete(keys, f"message/partial {set_id[:12]}")

    async def _delete(self, keys: list[str] | tuple[str, ...], what: str) -> None:
        # Together: the S3 store deletes keys asked for at once in one call.
        outcomes = await asyncio.gather(*(self.media.delete(k) for k in keys),
                                        return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, (MediaError, OSError)):  # an orphan costs storage only
                log.warning("%s: a part's object was not deleted from the media store: %s",
                            what, outcome)
            elif isinstance(outcome, BaseException):
                raise outcome

    async def expire(self, now: float, timeout_s: float) -> list[Expired]:
        """Take out the sets that waited more than `timeout_s` (and those a node died
        joining, after twice that), delete their parts, and return them per sender."""
        found = await self.store.run(self.rows.expire, now - timeout_s, now - 2 * timeout_s,
                                     EXPIRE_BATCH)
        by_sender: dict[str, list[HeldSet]] = {}
        for held in found:
            await self._delete(held.keys, f"message/partial {held.set_id[:12]}")
            if held.state != "open":
                log.warning("message/partial %s: removing a set left half-joined",
                            held.set_id[:12])
                continue
            by_sender.setdefault(held.sender_key, []).append(held)
        return [Expired(k, v) for k, v in by_sender.items()]
