"""The outbound direction's housekeeping: documents deleted once their reports are out and
their retention is over, spool files nobody needs, split mails that never completed, old jobs
and old rate-limit hits pruned. Runs on the node holding the `housekeeping` lease.

`Housekeeping` is a part of the job runner's `Worker` (gateway/outbound/job_runner.py), kept
apart because it changes for its own reasons (retention, what is left behind); the deletion
after a job's report (`_purge`) is the same code, under that job's claim.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from gateway import defaults
from gateway.config import Settings
from gateway.jobs.outbound_states import Job
from gateway.mail.sender import Notifier
from gateway.media_store import MediaError, MediaStore
from gateway.smtp.intake import expire_partials
from gateway.spool import Spool
from gateway.store.base import Store

log = logging.getLogger(__name__)


class Housekeeping:
    # Set by Worker.__init__.
    s: Settings
    store: Store
    spool: Spool
    media: MediaStore
    notifier: Notifier
    clock: Callable[[], float]
    _next_housekeeping: float
    _purging: set[str]

    def _holds(self, job: Job) -> bool:
        raise NotImplementedError

    async def purge_documents(self, cutoff: float) -> int:
        """Delete spool files and media objects of messages fully reported before `cutoff`."""
        messages = await self.store.run(self.store.unpurged_done_messages, cutoff)
        for message in messages:
            await self._purge(message.id, await self.store.run(self.store.message_jobs,
                                                               message.id))
        return len(messages)

    async def _purge(self, message_id: str, jobs: list[Job], job: Job | None = None,
                     claimed: bool = False) -> None:
        """`job`: the purge follows that job's report, under its claim. `claimed`: the purge
        is claimed already (`claim_purge`, in the report's own record)."""
        if message_id in self._purging:
            return  # another report's clean-up, or housekeeping, is purging it now
        self._purging.add(message_id)
        try:
            await self._purge_now(message_id, jobs, job, claimed)
        finally:
            self._purging.discard(message_id)

    async def _purge_now(self, message_id: str, jobs: list[Job], job: Job | None,
                         claimed: bool = False) -> None:
        # Recorded first, checked in the same statement: every job of the message reported
        # (a resend made meanwhile needs the document) and, after a report, the job still
        # ours. A resend is refused from here on.
        if not (claimed or await self.store.run(self.store.claim_purge, message_id, job)) \
                or (job is not None and not self._holds(job)):
            log.debug("message %s: documents not deleted here: purged already, a job of it is "
                      "under way again, or its job was taken over", message_id)
            return
        # Asked for together, so the media store can delete them in one call.
        keys = {j.media_key for j in jobs if j.media_key}
        outcomes = await asyncio.gather(*(self.media.delete(k) for k in keys),
                                        return_exceptions=True)
        errors = [o for o in outcomes if isinstance(o, BaseException)]
        for error in errors:
            if not isinstance(error, MediaError):
                raise error
        if errors:
            log.warning("message %s: media not deleted yet: %s", message_id, errors[0])
            return
        store, spool = self.store, self.spool

        def purged() -> None:  # one trip to the store thread, not a thread of its own too
            spool.remove(message_id)  # this node's spool file (an unlink), then the record
            store.mark_purged(message_id)

        await store.run(purged)

    async def sweep_spool(self, min_age_s: float | None = None) -> int:
        """Delete this node's spool files whose message is purged or gone. With several
        gateways the node that purges a message is not always the one that spooled it; on one
        gateway this catches a file left by a crash between the spool write and the commit.
        Only files older than any intake could still be working on (by their mtime)."""
        if min_age_s is None:
            min_age_s = max(3600.0, 4 * self.s.documents.timeout_s)
        cutoff = time.time() - min_age_s

        def candidates() -> dict[str, Path]:
            found: dict[str, Path] = {}
            try:
                entries = list(os.scandir(self.spool.root))
            except FileNotFoundError:
                return found
            for entry in entries:
                if entry.name.endswith(".pdf") and entry.is_file() and \
                        entry.stat().st_mtime < cutoff:
                    found[entry.name[:-4]] = Path(entry.path)
            return found

        files = await asyncio.to_thread(candidates)
        removed = 0
        ids = sorted(files)
        for i in range(0, len(ids), 200):
            for message_id in await self.store.run(self.store.gone_messages, ids[i:i + 200]):
                await asyncio.to_thread(files[message_id].unlink, missing_ok=True)
                removed += 1
        if removed:
            log.info("housekeeping: %d spool file(s) of purged or unknown messages deleted",
                     removed)
        return removed

    async def housekeeping_if_leader(self) -> None:
        """Once, not once per node: housekeeping runs on the node holding the `housekeeping`
        lease; it moves to another node when its holder stops renewing it (dies)."""
        now = self.clock()
        ttl = defaults.HOUSEKEEPING_INTERVAL_S + 3 * self.s.cluster.lease_seconds
        if await self.store.run(self.store.take_lead, "housekeeping", now, ttl):
            await self.housekeeping()
        else:
            self._next_housekeeping = now + defaults.HOUSEKEEPING_INTERVAL_S / 4
            # Split mails and spool files are this node's own: every node tidies its own.
            await expire_partials(self.s, self.notifier, now)
            await self.sweep_spool()

    async def housekeeping(self) -> None:
        """Purge documents past their retention; prune jobs past theirs (in batches)."""
        now = self.clock()
        self._next_housekeeping = now + defaults.HOUSEKEEPING_INTERVAL_S
        purged = await self.purge_documents(now - self.s.queue.document_retention_hours * 3600)
        await self.sweep_spool()
        await expire_partials(self.s, self.notifier, now, self.store, self.media)  # split mail
        pruned = 0
        cutoff = now - self.s.queue.job_retention_days * 86400
        while batch := await self.store.run(self.store.prune, cutoff):
            pruned += batch
        # Shared rate-limit and lockout hits older than any window that counts them.
        await self.store.run(self.store.prune_hits,
                             now - max(3600.0, self.s.access.auth_lockout_minutes * 60))
        if purged or pruned:
            log.info("housekeeping: %d document(s) deleted, %d old job(s) pruned", purged,
                     pruned)
