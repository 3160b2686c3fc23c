"""The reconciler: SignalWire does not retry the <Receive> action webhook, so a fax that ended
while every gateway was down (or whose callback was lost) would never be heard of. Every
INBOUND_RECONCILE_SECONDS the received faxes of the routed numbers are listed
(`GET .../Faxes?To=...&DateCreatedAfter=...`, inbound only) and any that has no recorded outcome
is recorded and delivered like a callback. The store's "first final word wins" rule makes a
race with a late callback harmless.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime

from gateway.config import Settings
from gateway.constants import IN_PROGRESS_STATUSES
from gateway.inbound.counters import InboundMetrics
from gateway.inbound.webhook import FINAL, classify
from gateway.jobs.inbound_states import InEv
from gateway.signalwire.client import Fax, SignalWireClient, SignalWireError
from gateway.store.base import Store
from gateway.store.inbound import GIVEN_UP, RINGING, Completion, InboundStore

log = logging.getLogger(__name__)


class Reconciler:
    def __init__(self, *, settings: Settings, store: Store, inbound: InboundStore,
                 signalwire: SignalWireClient, metrics: InboundMetrics,
                 on_completion: Callable[[], None], clock: Callable[[], float]) -> None:
        self.s = settings
        self.store = store
        self.inbound = inbound
        self.signalwire = signalwire
        self.metrics = metrics
        self.on_completion = on_completion
        self.clock = clock
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self.s.inbound.routes.enabled:
            self._task = asyncio.create_task(self._loop(), name="inbound-reconciler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _loop(self) -> None:
        while True:
            try:
                # Several gateways: one node lists SignalWire's faxes at a time.
                if not self.s.shared or await self.store.run(
                        self.store.take_lead, "inbound-reconcile", self.clock(),
                        self.s.inbound.reconcile_s + 3 * self.s.cluster.lease_seconds):
                    await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # task boundary
                log.exception("inbound reconciler: unexpected error")
            await asyncio.sleep(self.s.inbound.reconcile_s)

    async def run_once(self) -> int:
        """One pass; returns how many faxes it recorded (0 when all were known)."""
        routes = self.s.inbound.routes
        if not routes.enabled:
            return 0
        await self._housekeeping()
        now = self.clock()
        enabled = await self.store.run(self.inbound.enabled_since, now)
        # A minute of slack: a fax that was ringing when inbound was switched on.
        since = datetime.fromtimestamp(
            max(now - self.s.inbound.lookback_hours * 3600, enabled - 60), UTC)
        targets: list[str | None] = [None] if routes.has_wildcard else list(routes.numbers)
        found: dict[str, Fax] = {}
        for to in targets:
            try:
                for fax in await self.signalwire.list_received(to=to, created_after=since):
                    found.setdefault(fax.sid, fax)
            except SignalWireError as exc:
                log.warning("inbound reconciler: listing faxes to %s failed: %s", to or "*",
                            exc)
        finished = {sid: fax for sid, fax in found.items()
                    if fax.sid and fax.status not in IN_PROGRESS_STATUSES
                    and fax.status in FINAL}
        if not finished:
            return 0
        known = await self.store.run(self.inbound.known, list(finished))
        recorded = 0
        for sid, fax in finished.items():
            if known.get(sid, RINGING) != RINGING:
                continue
            outcome, recipients = classify(self.s, fax.status, fax.error_message,
                                           fax.num_pages, fax.to)
            completion = Completion(
                fax_sid=sid, account_sid=self.s.signalwire.project_id, from_number=fax.from_,
                to_number=fax.to, fax_status=fax.status, outcome=outcome,
                num_pages=fax.num_pages, media_url=fax.media_url, media_sid=fax.media_sid,
                remote_station_id=fax.remote_station_id, error_code=fax.error_code,
                error_message=fax.error_message, recipients=recipients, source="reconciler",
                completed_at=(fax.date_created.timestamp() if fax.date_created
                              else self.clock()))
            if await self.store.run(self.inbound.record_completion, completion, self.clock()):
                recorded += 1
                if not recipients:  # finished now; otherwise counted when it ends
                    self.metrics.faxes.labels(outcome).inc()
                log.info("inbound fax %s: found by the reconciler (%s, no callback seen), for "
                         "%d recipient(s)", sid, outcome, len(recipients))
        if recorded:
            self.on_completion()
        return recorded

    async def _housekeeping(self) -> None:
        """Answered calls that never got an outcome, not even in the listing, within the
        look-back are given up (logged); finished faxes past JOB_RETENTION_DAYS are pruned."""
        now = self.clock()
        stale = await self.store.run(self.inbound.stale_ringing,
                                     now - self.s.inbound.lookback_hours * 3600)
        for row in stale:
            log.warning("inbound fax %s from %s: answered, but SignalWire never reported an "
                        "outcome; given up", row.fax_sid, row.from_number or "-")
            if await self.store.run(lambda sid=row.fax_sid: self.inbound.move(
                    sid, [RINGING], GIVEN_UP, InEv.GIVEN_UP, "no outcome from SignalWire", now,
                    next_run_at=None, last_error="no outcome from SignalWire", done_at=now)):
                self.metrics.faxes.labels("gave_up").inc()
        pruned = await self.store.run(self.inbound.prune,
                                      now - self.s.queue.job_retention_days * 86400)
        if pruned:
            log.info("inbound: %d finished fax record(s) pruned", pruned)
