"""The background deliverer of received faxes: download, (TIFF to PDF), one mail per recipient,
then delete the document at SignalWire.

Every step is resumable from the database alone: a recipient counts as served only once the
relay accepted its mail (`InboundStore.mark_sent`), the media is deleted only after every
recipient was served, and an outage (SignalWire, the relay) is retried with the same capped
exponential backoff as outbound reports until GIVE_UP_HOURS.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Callable

from gateway.config import Settings
from gateway.constants import MAX_INBOUND_MEDIA_BYTES
from gateway.documents.pool import CpuPool, TaskLimitError, call
from gateway.inbound.metrics import InboundMetrics
from gateway.mail.received import MailPart, render_given_up
from gateway.mail.sender import Notifier, NotifyError
from gateway.ops.faults import crash_point
from gateway.outbound.states import backoff_s
from gateway.signalwire.client import MediaRefused, SignalWireClient, SignalWireError
from gateway.store.inbound import DELETING, DELIVERING, DONE, GAVE_UP, InboundFax, InboundStore
from gateway.store.base import Store

log = logging.getLogger(__name__)

CONCURRENCY = 4
MAX_RECEIVED_PAGES = 2000


class PermanentFailure(Exception):
    """This fax can never be delivered as it is (no document, not a PDF or TIFF)."""


def document_kind(data: bytes) -> str | None:
    """What the bytes are, from their first bytes (never the name or the type header)."""
    head = data[:1024]
    if b"%PDF-" in head:
        return "pdf"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    return None


async def fetch_document(signalwire: SignalWireClient, cpu: CpuPool, settings: Settings,
                         row: InboundFax) -> bytes:
    """A received fax's document as PDF, downloaded from SignalWire (a TIFF converted in a
    document worker). Shared by the deliverer and the dashboard's picture of page 1, so both
    fetch the same way (SignalWire's hosts only, bounded size). PermanentFailure when it can
    never work (a TIFF that cannot be converted too: the same bytes fail the same way);
    MediaRefused, SignalWireError or TaskLimitError otherwise."""
    url = row.media_url
    if not url and row.media_sid:
        # The fax resource may lack media_url (undocumented): the media instance serves it.
        url = signalwire.media_instance_url(row.fax_sid, row.media_sid)
    if not url:
        raise PermanentFailure("SignalWire gave no media URL for this fax")
    data, _type = await signalwire.fetch_media(url, MAX_INBOUND_MEDIA_BYTES)
    kind = document_kind(data)
    if kind == "pdf":
        return data
    if kind == "tiff":
        try:
            pdf, _pages, why = await cpu.run(
                call, "gateway.mail.received:tiff_to_pdf", data,
                "a4" if settings.inbound_page_size == "a4" else "letter", MAX_RECEIVED_PAGES)
        except TaskLimitError as exc:
            # Conversion is frame by frame within a memory bound; a TIFF that still takes more
            # time or memory than a document worker is given will take it again.
            raise PermanentFailure(f"the received TIFF could not be converted: it {exc}"
                                   ) from None
        if pdf is None:
            # The same bytes fail the same way every time: final at once, never retried.
            raise PermanentFailure(f"the received TIFF could not be converted: {why}")
        return pdf
    raise PermanentFailure(f"the document is neither PDF nor TIFF ({len(data)} bytes)")


class Deliverer:
    def __init__(self, *, settings: Settings, store: Store, inbound: InboundStore,
                 signalwire: SignalWireClient, notifier: Notifier, cpu: CpuPool,
                 metrics: InboundMetrics, clock: Callable[[], float]) -> None:
        self.s = settings
        self.store = store
        self.inbound = inbound
        self.signalwire = signalwire
        self.notifier = notifier
        self.cpu = cpu
        self.metrics = metrics
        self.clock = clock
        self.jitter: Callable[[], float] = random.random
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._running: dict[str, asyncio.Task[None]] = {}
        self._sem = asyncio.Semaphore(CONCURRENCY)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="inbound-deliverer")

    def wake(self) -> None:
        self._wake.set()

    async def stop(self, grace_s: float) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        running = list(self._running.values())
        if running:
            _done, pending = await asyncio.wait(running, timeout=grace_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)

    async def _lead(self) -> bool:
        """One node delivers (several gateways on one database): the holder of the `inbound`
        lease, which moves when its holder stops renewing it. A single gateway always leads."""
        if not self.s.shared:
            return True
        return await self.store.run(self.store.take_lead, "inbound", self.clock(),
                                    3 * self.s.lease_seconds)

    async def _loop(self) -> None:
        while True:
            try:
                if await self._lead():
                    await self.run_due()
                nxt = await self.store.run(self.inbound.next_due_at)
            except asyncio.CancelledError:
                raise
            except Exception:  # task boundary: log, wait a little, go on
                if self.store.damage is None:  # else said once; the daemon stops
                    log.exception("inbound deliverer: unexpected error")
                nxt = self.clock() + self.s.retry_base_s
            longest = self.s.lease_seconds if self.s.shared else 60.0  # renew the lease in time
            delay = longest if nxt is None else max(0.0, min(longest, nxt - self.clock()))
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), delay if delay > 0 else 0.01)
            except asyncio.TimeoutError:
                pass

    async def run_due(self) -> int:
        """Start every due fax not already running; returns how many were started."""
        rows = await self.store.run(self.inbound.due, self.clock(), 50, list(self._running))
        for row in rows:
            task = asyncio.create_task(self._guarded(row), name=f"inbound-{row.fax_sid}")
            self._running[row.fax_sid] = task
            task.add_done_callback(lambda _t, sid=row.fax_sid: self._running.pop(sid, None))
        return len(rows)

    async def run_until_idle(self, max_rounds: int = 100) -> None:
        """Tests: deliver everything due now, and wait for it."""
        for _ in range(max_rounds):
            await self.run_due()
            if not self._running:
                return
            await asyncio.gather(*list(self._running.values()), return_exceptions=True)

    async def _guarded(self, row: InboundFax) -> None:
        async with self._sem:
            try:
                await self.step(row)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # task boundary: retried like an outage
                if self.store.damage is not None:  # said once; the daemon stops
                    return
                log.exception("inbound fax %s: unexpected error", row.fax_sid)
                await self._later(row, f"{type(exc).__name__}: {exc}")

    def _gave_up(self, row: InboundFax) -> bool:
        return self.clock() - row.created_at > self.s.give_up_hours * 3600

    async def _give_up(self, row: InboundFax, reason: str, outcome: str = "gave_up") -> None:
        """End a fax undelivered: recorded, counted once under `outcome`, and the
        administrator (INBOUND_ADMIN_ADDRESS) told by mail, so it is not lost in a log. The
        alert is tried once: when the relay itself is what failed, it fails too (logged)."""
        sid = row.fax_sid
        now = self.clock()
        await self.store.run(lambda: self.inbound.set_state(
            sid, GAVE_UP, now, next_run_at=None, detail=reason))
        self.metrics.faxes.labels(outcome).inc()
        admin = self.s.inbound_admin_address
        if not admin:
            log.error("inbound fax %s: given up: %s (no INBOUND_ADMIN_ADDRESS to tell)", sid,
                      reason)
            return
        log.error("inbound fax %s: given up: %s; telling %s", sid, reason, admin)
        mailed = sorted(await self.store.run(self.inbound.delivered_to, sid))
        part = render_given_up(row, admin, reason, mailed, from_addr=self.s.notify_from,
                               hostname=self.s.smtp_hostname)
        try:
            where = await self.notifier.send_rendered(part.rendered, part.outbox_name)
        except NotifyError as exc:
            self.metrics.mails.labels("retry").inc()
            log.error("inbound fax %s: the administrator %s could not be told either: %s",
                      sid, admin, exc)
            return
        self.metrics.mails.labels("sent").inc()
        log.info("inbound fax %s: administrator %s told %s", sid, admin, where)

    async def _later(self, row: InboundFax, reason: str, delay_s: float | None = None) -> None:
        now = self.clock()
        if self._gave_up(row):
            if row.state == DELETING:  # every mail went out: delivered, whatever the media
                await self._end_delivered(row, reason)
            else:
                await self._give_up(row, f"gave up after {self.s.give_up_hours:g} hours: "
                                         f"{reason}")
            return
        delay = delay_s if delay_s is not None else backoff_s(
            row.tries + 1, self.s.retry_base_s, self.s.retry_max_s, self.jitter())
        log.warning("inbound fax %s: %s; retry %d in %.1f s", row.fax_sid, reason,
                    row.tries + 1, delay)
        await self.store.run(self.inbound.later, row.fax_sid, now + delay, reason, now)

    async def step(self, row: InboundFax) -> None:
        if row.state == DELIVERING:
            if not await self._deliver(row):
                return
            row = await self.store.run(self.inbound.get, row.fax_sid) or row
        if row.state == DELETING or (row.state == DELIVERING and self._wants_delete(row)):
            await self._delete_media(row)

    def _wants_delete(self, row: InboundFax) -> bool:
        return (row.outcome == "received" and bool(row.media_sid)
                and not self.s.inbound_keep_media)

    async def _document(self, row: InboundFax) -> bytes:
        return await fetch_document(self.signalwire, self.cpu, self.s, row)

    async def _deliver(self, row: InboundFax) -> bool:
        """Mail every recipient not yet served; True when all are."""
        sid = row.fax_sid
        done = await self.store.run(self.inbound.delivered_to, sid)
        pending = [r for r in row.recipient_list if r not in done]
        if pending:
            pdf: bytes | None = None
            if row.outcome == "received":
                try:
                    pdf = await self._document(row)
                except MediaRefused as exc:
                    await self._give_up(row, f"media URL refused ({exc}): nothing mailed",
                                        "media_refused")
                    return False
                except PermanentFailure as exc:
                    await self._give_up(row, f"{exc}: nothing mailed")
                    return False
                except (SignalWireError, TaskLimitError) as exc:
                    await self._later(row, f"media download: {exc}")
                    return False
            admin = self.s.inbound_admin_address
            routed = set(self.s.inbound_routes.recipients(row.to_number))
            try:
                parts: list[MailPart] = await self.cpu.run(
                    call, "gateway.mail.received:render_received", row,
                    [(r, r == admin and r not in routed) for r in pending], pdf,
                    from_addr=self.s.notify_from, hostname=self.s.smtp_hostname,
                    attach=self.s.inbound_attach_document, thumbnail=self.s.report_thumbnail)
            except TaskLimitError as exc:
                await self._later(row, f"building the mail: {exc}")
                return False
            for index, part in enumerate(parts):
                try:
                    where = await self.notifier.send_rendered(part.rendered, part.outbox_name)
                except NotifyError as exc:
                    self.metrics.mails.labels("retry").inc()
                    await self._later(row, f"mail to {part.recipient}: {exc}")
                    return False
                crash_point("inbound-after-mail")
                await self.store.run(self.inbound.mark_sent, sid, part.recipient,
                                     part.message_id, where, self.clock())
                self.metrics.mails.labels("sent").inc()
                log.info("inbound fax %s: mail to %s %s", sid, part.recipient, where)
                if index + 1 < len(parts):
                    crash_point("inbound-between-mails")
        nxt = DELETING if self._wants_delete(row) else DONE
        now = self.clock()
        await self.store.run(lambda: self.inbound.set_state(
            sid, nxt, now, next_run_at=now if nxt == DELETING else None))
        if nxt == DONE:
            self._count_done(row)
            log.info("inbound fax %s: done (%s)", sid,
                     "media kept at SignalWire" if row.outcome == "received" else row.outcome)
        return True

    def _count_done(self, row: InboundFax) -> None:
        """A fax is counted once, by its final outcome, when it is finished (so one that is
        given up later is never counted twice)."""
        self.metrics.faxes.labels(row.outcome or "received").inc()

    async def _end_delivered(self, row: InboundFax, reason: str) -> None:
        """Every mail went out: a deletion that keeps failing until GIVE_UP_HOURS leaves the
        document at SignalWire (said in the log) and the fax ends delivered, not given up."""
        now = self.clock()
        await self.store.run(lambda: self.inbound.set_state(
            row.fax_sid, DONE, now, next_run_at=None, detail=reason))
        self._count_done(row)
        log.error("inbound fax %s: delivered, but its document could not be deleted at "
                  "SignalWire for %g hours (%s): left there; delete it in SignalWire's "
                  "dashboard", row.fax_sid, self.s.give_up_hours, reason)

    async def _delete_media(self, row: InboundFax) -> None:
        sid = row.fax_sid
        assert row.media_sid is not None
        try:
            status = await self.signalwire.delete_media(sid, row.media_sid)
        except SignalWireError as exc:
            await self._later(row, f"media delete: {exc}")
            return
        if status == 409:
            await self._later(row, "media delete: the fax is still in progress (409)")
            return
        now = self.clock()
        self._count_done(row)
        await self.store.run(lambda: self.inbound.set_state(sid, DONE, now, next_run_at=None,
                                                            media_deleted=True))
        self.metrics.media_deleted.inc()
        log.info("inbound fax %s: done; media deleted at SignalWire (%d)", sid, status)
