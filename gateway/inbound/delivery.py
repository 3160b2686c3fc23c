"""The background deliverer of received faxes: download, (TIFF to PDF), one mail per recipient,
then delete the document at SignalWire.

Every step is resumable from the database alone: a recipient counts as served only once the
relay accepted its mail (`InboundStore.settle_send`), the media is deleted only after every
recipient was served, and an outage (SignalWire, the relay) is retried with the same capped
exponential backoff as outbound reports until GIVE_UP_HOURS.

Several gateways on one database: each node claims due faxes for itself, like jobs (a lease per
fax, renewed every LEASE_SECONDS/3 while it works them), so a dead node's faxes are taken over
once its leases run out. Each mail and each media DELETE is preceded by a statement that proves
this node still holds the fax at the epoch of its claim; a node that stalled past its lease
finds it lost there and sends nothing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
from collections.abc import Callable

from gateway import defaults
from gateway.config import Settings
from gateway.constants import MAX_INBOUND_MEDIA_BYTES
from gateway.documents.pool import CpuPool, TaskLimitError, call
from gateway.inbound.counters import InboundMetrics
from gateway.jobs.inbound_states import InEv
from gateway.jobs.outbound_states import backoff_s
from gateway.mail.received import MailPart, render_given_up
from gateway.mail.sender import Notifier, NotifyError
from gateway.runtime.faults import crash_point, pause_point
from gateway.signalwire.client import MediaRefused, SignalWireClient, SignalWireError
from gateway.store.base import Store
from gateway.store.inbound import (
    AGAIN,
    DELETING,
    DELIVERING,
    DONE,
    GIVEN_UP,
    LOST,
    SENT,
    WAIT,
    InboundFax,
    InboundStore,
)

log = logging.getLogger(__name__)

CONCURRENCY = 4
# Several gateways: how long a mail another node started (and never recorded as accepted or
# failed) may still be under way at that node, which may only have stalled. After it the mail
# is sent again, with the same Message-ID. One gateway: a started mail not settled is a dead
# run's, sent again at once.
SEND_SETTLE_S = 3 * defaults.NOTIFY_TIMEOUT_S
# The whole of one mail's send (connect, EHLO, STARTTLS, AUTH, MAIL, RCPT, DATA: each may wait
# NOTIFY_TIMEOUT_S on its own) is given up after this, well inside SEND_SETTLE_S, so the settle
# window really bounds a send that is still under way at a live node.
SEND_TIMEOUT_S = 2 * defaults.NOTIFY_TIMEOUT_S
assert SEND_TIMEOUT_S < SEND_SETTLE_S
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
                "a4" if settings.inbound.page_size == "a4" else "letter", MAX_RECEIVED_PAGES)
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
        self._heartbeat: asyncio.Task[None] | None = None
        self._running: dict[str, asyncio.Task[None]] = {}
        self._epochs: dict[str, int] = {}  # fax sid -> the epoch of this node's claim
        self._sem = asyncio.Semaphore(CONCURRENCY)
        self.settle_s = SEND_SETTLE_S if settings.shared else 0.0
        self.send_timeout_s = SEND_TIMEOUT_S

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="inbound-deliverer")
        self._heartbeat = asyncio.create_task(self._beat(), name="inbound-heartbeat")

    def wake(self) -> None:
        self._wake.set()

    async def stop(self, grace_s: float) -> None:
        """Claim nothing more, let the running faxes finish up to `grace_s` (their leases still
        renewed meanwhile), cancel the rest: each resumes from the database."""
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
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
            self._heartbeat = None

    async def _beat(self) -> None:
        """Extend the leases of the faxes this node works, every LEASE_SECONDS/3: a live node
        keeps its faxes; a dead (or stalled) one stops beating and another node claims them."""
        while True:
            await asyncio.sleep(self.s.cluster.lease_seconds / 3)
            sids = list(self._running)
            if not sids:
                continue
            try:
                held = await self.store.run(self.inbound.renew, sids, self.clock())
            except asyncio.CancelledError:
                raise
            except Exception:  # task boundary: the next beat tries again
                log.exception("inbound heartbeat: cannot extend the fax leases")
                continue
            for sid in sids:
                if sid in self._running and held.get(sid) != self._epochs.get(sid):
                    log.warning("inbound fax %s: lease lost (this node stalled past "
                                "LEASE_SECONDS); another node may have taken it over", sid)

    async def _loop(self) -> None:
        while True:
            try:
                await self.run_due()
                nxt = await self.store.run(self.inbound.next_due_at)
            except asyncio.CancelledError:
                raise
            except Exception:  # task boundary: log, wait a little, go on
                if self.store.damage is None:  # else said once; the daemon stops
                    log.exception("inbound deliverer: unexpected error")
                nxt = self.clock() + self.s.queue.retry_base_s
            # Several gateways: another node's callbacks and released faxes do not wake us.
            longest = (min(self.s.cluster.lease_seconds, defaults.SHARED_POLL_S)
                       if self.s.shared else 60.0)
            delay = longest if nxt is None else max(0.0, min(longest, nxt - self.clock()))
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), delay if delay > 0 else 0.01)
            except TimeoutError:
                pass

    async def run_due(self) -> int:
        """Claim every due fax no live node holds and start it; returns how many."""
        free = max(0, 50 - len(self._running))
        if not free:
            return 0
        rows = await self.store.run(self.inbound.claim_due, self.clock(), free,
                                    list(self._running))
        for row in rows:
            self._epochs[row.fax_sid] = row.lease_epoch
            task = asyncio.create_task(self._guarded(row), name=f"inbound-{row.fax_sid}")
            self._running[row.fax_sid] = task
        return len(rows)

    async def run_until_idle(self, max_rounds: int = 100) -> None:
        """Tests: deliver everything due now, and wait for it."""
        for _ in range(max_rounds):
            await self.run_due()
            if not self._running:
                return
            await asyncio.gather(*list(self._running.values()), return_exceptions=True)

    async def _guarded(self, row: InboundFax) -> None:
        sid = row.fax_sid
        try:
            async with self._sem:
                try:
                    await self.step(row)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # task boundary: retried like an outage
                    if self.store.damage is not None:  # said once; the daemon stops
                        return
                    log.exception("inbound fax %s: unexpected error", sid)
                    await self._later(row, f"{type(exc).__name__}: {exc}")
        finally:
            self._running.pop(sid, None)
            self._epochs.pop(sid, None)
            try:
                await self.store.run(self.inbound.release, sid)
            except Exception:  # noqa: BLE001 - the lease runs out by itself
                log.warning("inbound fax %s: lease not released; it runs out in %.0f s", sid,
                            self.s.cluster.lease_seconds)

    def _lost(self, row: InboundFax, what: str) -> None:
        log.warning("inbound fax %s: lease lost (this node stalled past LEASE_SECONDS, or "
                    "another node took the fax over): %s not done here", row.fax_sid, what)

    def _gave_up(self, row: InboundFax) -> bool:
        return self.clock() - row.created_at > self.s.queue.give_up_hours * 3600

    async def _give_up(self, row: InboundFax, reason: str, outcome: str = "gave_up") -> None:
        """End a fax undelivered: recorded, counted once under `outcome`, and the
        administrator (INBOUND_ADMIN_ADDRESS) told by mail, so it is not lost in a log. The
        alert is tried once: when the relay itself is what failed, it fails too (logged)."""
        sid = row.fax_sid
        now = self.clock()
        if not await self.store.run(lambda: self.inbound.move(
                sid, [DELIVERING], GIVEN_UP, InEv.GIVEN_UP, reason, now, fence=row.lease_epoch,
                next_run_at=None, tries=0, last_error=reason[:500], done_at=now)):
            self._lost(row, "giving up")
            return
        self.metrics.faxes.labels(outcome).inc()
        admin = self.s.inbound.admin_address
        if not admin:
            log.error("inbound fax %s: given up: %s (no INBOUND_ADMIN_ADDRESS to tell)", sid,
                      reason)
            return
        log.error("inbound fax %s: given up: %s; telling %s", sid, reason, admin)
        mailed = sorted(await self.store.run(self.inbound.delivered_to, sid))
        part = render_given_up(row, admin, reason, mailed, from_addr=self.s.notify.sender,
                               hostname=self.s.smtp.hostname)
        try:
            where = await self._send(part)
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
                await self._give_up(row, f"gave up after {self.s.queue.give_up_hours:g} hours: "
                                         f"{reason}")
            return
        delay = delay_s if delay_s is not None else backoff_s(
            row.tries + 1, self.s.queue.retry_base_s, self.s.queue.retry_max_s, self.jitter())
        if not await self.store.run(self.inbound.later, row.fax_sid, row.lease_epoch,
                                    now + delay, reason, now):
            self._lost(row, f"retry ({reason})")
            return
        log.warning("inbound fax %s: %s; retry %d in %.1f s", row.fax_sid, reason,
                    row.tries + 1, delay)

    async def step(self, row: InboundFax) -> None:
        """One turn on a fax this node claimed (`row.lease_epoch`: the epoch of the claim,
        which every fenced step names)."""
        if row.state == DELIVERING:
            if not await self._deliver(row):
                return
            fresh = await self.store.run(self.inbound.get, row.fax_sid)
            if fresh is not None:
                row = dataclasses.replace(fresh, lease_epoch=row.lease_epoch)
        if row.state == DELETING:
            await self._delete_media(row)

    def _wants_delete(self, row: InboundFax) -> bool:
        return (row.outcome == "received" and bool(row.media_sid)
                and not self.s.inbound.keep_media)

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
            admin = self.s.inbound.admin_address
            routed = set(self.s.inbound.routes.recipients(row.to_number))
            try:
                parts: list[MailPart] = await self.cpu.run(
                    call, "gateway.mail.received:render_received", row,
                    [(r, r == admin and r not in routed) for r in pending], pdf,
                    from_addr=self.s.notify.sender, hostname=self.s.smtp.hostname,
                    attach=self.s.inbound.attach_document, thumbnail=self.s.reports.thumbnail)
            except TaskLimitError as exc:
                await self._later(row, f"building the mail: {exc}")
                return False
            waits: list[tuple[str, float]] = []
            for index, part in enumerate(parts):
                served = await self._mail(row, part)
                if served is False:
                    return False
                if served is not True:
                    waits.append((part.recipient, served))
                elif index + 1 < len(parts):
                    crash_point("inbound-between-mails")
                    pause_point("inbound-between-mails", f"inbound fax {sid}")
            if waits:
                # Looked at again soon: the node that started the mail settles it as soon
                # as it runs again; it is sent again only once that node cannot be sending.
                recipient, settle_at = min(waits, key=lambda w: w[1])
                await self._later(row, f"mail to {recipient}: another node started it and "
                                       "may still be sending it",
                                  max(0.0, min(settle_at - self.clock(),
                                               self.s.cluster.lease_seconds)))
                return False
        nxt = DELETING if self._wants_delete(row) else DONE
        now = self.clock()
        if not await self.store.run(lambda: self.inbound.move(
                sid, [DELIVERING], nxt, InEv.DELIVERED,
                f"{len(row.recipient_list)} recipient(s) mailed", now, fence=row.lease_epoch,
                tries=0, next_run_at=now if nxt == DELETING else None,
                done_at=now if nxt == DONE else None)):
            self._lost(row, "recording the delivery")
            return False
        if nxt == DONE:
            self._count_done(row)
            log.info("inbound fax %s: done (%s)", sid,
                     "media kept at SignalWire" if row.outcome == "received" else row.outcome)
        return True

    async def _send(self, part: MailPart) -> str:
        """Relay one mail, the whole of it bounded by `send_timeout_s` (well inside the settle
        window, so a send still under way at a live node cannot outlast it): where it went,
        or NotifyError."""
        try:
            async with asyncio.timeout(self.send_timeout_s):
                return await self.notifier.send_rendered(part.rendered, part.outbox_name)
        except TimeoutError:
            raise NotifyError(f"the relay took longer than {self.send_timeout_s:g} s in all; "
                              "given up") from None

    async def _mail(self, row: InboundFax, part: MailPart) -> bool | float:
        """One recipient's mail, only after the statement that records it as started proved
        this node still holds the fax; True when it is served (now or before), False when the
        fax is left (lease lost, or retried later), or the time until which another node may
        still be sending it."""
        sid, epoch = row.fax_sid, row.lease_epoch
        verdict, settle_at = await self.store.run(self.inbound.begin_send, sid, epoch,
                                                  part.recipient, self.clock(), self.settle_s)
        if verdict == SENT:
            return True
        if verdict == LOST:
            self._lost(row, f"the mail to {part.recipient}")
            return False
        if verdict == WAIT:
            assert settle_at is not None
            return settle_at
        if verdict == AGAIN:
            log.warning("inbound fax %s: the mail to %s may have gone already (its sender "
                        "never recorded the relay's answer): sent again, same Message-ID %s",
                        sid, part.recipient, part.message_id)
        try:
            where = await self._send(part)
        except NotifyError as exc:
            self.metrics.mails.labels("retry").inc()
            await self.store.run(lambda: self.inbound.settle_send(
                sid, epoch, part.recipient, self.clock()))
            await self._later(row, f"mail to {part.recipient}: {exc}")
            return False
        crash_point("inbound-after-mail")
        await self.store.run(lambda: self.inbound.settle_send(
            sid, epoch, part.recipient, self.clock(), message_id=part.message_id, detail=where))
        self.metrics.mails.labels("sent").inc()
        log.info("inbound fax %s: mail to %s %s", sid, part.recipient, where)
        return True

    def _count_done(self, row: InboundFax) -> None:
        """A fax is counted once, by its final outcome, when it is finished (so one that is
        given up later is never counted twice)."""
        self.metrics.faxes.labels(row.outcome or "received").inc()

    async def _end_delivered(self, row: InboundFax, reason: str) -> None:
        """Every mail went out: a deletion that keeps failing until GIVE_UP_HOURS leaves the
        document at SignalWire (said in the log) and the fax ends delivered, not given up."""
        now = self.clock()
        if not await self.store.run(lambda: self.inbound.move(
                row.fax_sid, [DELETING], DONE, InEv.MEDIA_KEPT, reason, now,
                fence=row.lease_epoch, next_run_at=None, tries=0, last_error=reason[:500],
                done_at=now)):
            self._lost(row, "ending the fax")
            return
        self._count_done(row)
        log.error("inbound fax %s: delivered, but its document could not be deleted at "
                  "SignalWire for %g hours (%s): left there; delete it in SignalWire's "
                  "dashboard", row.fax_sid, self.s.queue.give_up_hours, reason)

    async def _delete_media(self, row: InboundFax) -> None:
        sid = row.fax_sid
        assert row.media_sid is not None
        if not await self.store.run(self.inbound.begin_delete, sid, row.lease_epoch,
                                    self.clock()):
            self._lost(row, "the media DELETE")
            return
        try:
            status = await self.signalwire.delete_media(sid, row.media_sid)
        except SignalWireError as exc:
            await self._later(row, f"media delete: {exc}")
            return
        if status == 409:
            await self._later(row, "media delete: the fax is still in progress (409)")
            return
        now = self.clock()
        # It is gone (204), or was already (404): a fact, recorded whoever holds the fax now.
        if not await self.store.run(lambda: self.inbound.move(
                sid, [DELETING], DONE, InEv.MEDIA_DELETED, f"SignalWire answered {status}",
                now, next_run_at=None, tries=0, media_deleted_at=now, done_at=now)):
            return  # another node that took the fax over finished it
        self._count_done(row)
        self.metrics.media_deleted.inc()
        log.info("inbound fax %s: done; media deleted at SignalWire (%d)", sid, status)
