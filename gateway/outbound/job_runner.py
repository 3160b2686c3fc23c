"""The worker: moves every due job one step along its state machine (see
gateway/jobs/outbound_states.py).

Each job carries `next_run_at`; the worker runs what is due, at most `worker_concurrency` at a
time, and sleeps until the next due time or until woken (new mail, a final callback). Every step
is safe to repeat after a crash: the store only applies a transition from the state it expects,
and a send whose outcome is unknown is looked up at SignalWire before anything is sent again.
A finished fax's step (retry or report, then clean-up) is in gateway/outbound/reporting.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import random
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

from gateway import defaults
from gateway.config import Settings
from gateway.constants import FINAL_STATUSES
from gateway.documents.pool import CpuPool
from gateway.jobs.outbound_states import Job, RetryPolicy, State, backoff_s
from gateway.mail.sender import Notifier
from gateway.media_store import MediaError, MediaStore, new_media_key
from gateway.outbound.reporting import Reporting
from gateway.runtime.faults import crash_point
from gateway.runtime.metrics import Metrics
from gateway.sanitise import exception_line
from gateway.signalwire.client import (
    SendOutcomeUnknown,
    SendRefused,
    SendRetryable,
    SignalWireClient,
    SignalWireError,
)
from gateway.spool import Spool
from gateway.store.base import Store, StoreError

log = logging.getLogger(__name__)

IDLE_WAKE_S = 30.0           # look at the queue at least this often, even when nothing is due
DISPATCH_GATHER_S = 0.01     # after a wake, what else happens this soon is claimed in one trip
UNKNOWN_RECHECK_S = 10.0     # after a send with no answer, look the fax up this much later
LOOKUP_SKEW_S = 120.0        # clock skew allowed when matching a looked-up fax to a send


class Worker(Reporting):
    def __init__(self, *, settings: Settings, store: Store, spool: Spool, media: MediaStore,
                 signalwire: SignalWireClient, notifier: Notifier, cpu: CpuPool,
                 callback_url: Callable[[str], str], clock: Callable[[], float] = time.time,
                 jitter: Callable[[], float] = random.random,
                 metrics: Metrics | None = None) -> None:
        self.s = settings
        self.store = store
        self.spool = spool
        self.media = media
        self.sw = signalwire
        self.notifier = notifier
        self.cpu = cpu
        self.metrics = metrics or Metrics(process=False)
        # Last contact with each outside service, for /readyz: name -> (ok, when, detail).
        self.contact: dict[str, tuple[bool, float, str]] = {}
        self.callback_url = callback_url
        self.clock = clock
        self.jitter = jitter
        self._wake = asyncio.Event()
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._dialling: dict[str, str] = {}  # job id -> number, for stored jobs being submitted
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.retry_policy = RetryPolicy.from_settings(settings)
        self._next_housekeeping = 0.0
        self._heartbeat: asyncio.Task[None] | None = None
        # With a shared queue other nodes add and free work: look at it often.
        self._idle_wake_s = defaults.SHARED_POLL_S if settings.shared else IDLE_WAKE_S
        self._recheck_s = min(UNKNOWN_RECHECK_S, settings.signalwire.timeout_s)
        # Notified after every step: lets tests and the CLI wait for a job without polling.
        self.progress = asyncio.Condition()
        self._released: list[str] = []  # jobs whose step ended: their leases go next trip
        self._purging: set[str] = set()  # messages whose documents this node is deleting
        # job id -> its message's jobs when recording its report claimed the message's purge
        # (None: not this report's to do), for the step's `_cleanup`.
        self._purge_claimed: dict[str, list[Job] | None] = {}
        # job id -> until when (time.monotonic) this node surely holds the job's lease: from
        # just before its claim or last renewal. A stall (SIGSTOP, a VM paused) moves the
        # monotonic clock on, so a node that wakes up past it knows before its next side
        # effect, not only at the fenced record after it.
        self._held_until: dict[str, float] = {}
        # How many mails intake is working on now (the daemon wires in Intake's count): while
        # any, fewer steps run at once, so senders get their 250 first.
        self.intake_active: Callable[[], int] = lambda: 0

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="faxgw-worker")
        self._heartbeat = asyncio.create_task(self._beat(), name="faxgw-heartbeat")

    async def _beat(self) -> None:
        """Extend the leases of the jobs this node is working, every LEASE_SECONDS/3, so no
        other node takes a live node's job; a dead node stops beating and its jobs are
        claimed by the others once its leases run out."""
        interval = self.s.cluster.lease_seconds / 3
        while True:
            await asyncio.sleep(interval)
            ids = list(self._inflight)
            if not ids:
                continue
            asked = time.monotonic()
            try:
                held = await self.store.run(self.store.renew_leases, ids, self.clock())
            except Exception as exc:  # a task boundary: the next beat tries again
                log.warning("heartbeat: cannot extend the job leases: %s", exception_line(exc))
                continue
            for job_id in held:
                if job_id in self._held_until:
                    self._held_until[job_id] = asked + self.s.cluster.lease_seconds
            for job_id in set(ids) - held:
                self._held_until[job_id] = 0.0  # lost: no side effect of it from here on
                if job_id in self._inflight:
                    log.warning("job %s: lease lost (this node stalled past LEASE_SECONDS); "
                                "another node may have taken the job over", job_id)

    def wake(self) -> None:
        self._wake.set()

    async def stop(self, grace_s: float = defaults.SHUTDOWN_GRACE_S) -> None:
        """Stop taking work, let running steps finish up to grace_s, cancel the rest.

        A cancelled step leaves its job in a state the next start resumes from.
        """
        self._stopping = True
        self._wake.set()
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
            self._heartbeat = None
        if self._task is not None:
            await self._task
            self._task = None
        running = list(self._inflight.values())
        if running:
            done, pending = await asyncio.wait(running, timeout=grace_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            log.info("worker stopped: %d step(s) finished, %d cancelled", len(done),
                     len(pending))
        released, self._released = self._released, []
        try:
            # Handed back: the other nodes are told at once (a shared queue), not when they
            # next look.
            await self.store.run(functools.partial(self.store.release, *released,
                                                   wake_others=True))
        except Exception:  # noqa: BLE001 - the leases run out by themselves
            log.warning("%d job lease(s) not released; they run out in %.0f s", len(released),
                        self.s.cluster.lease_seconds)

    async def _loop(self) -> None:
        while not self._stopping:
            self._wake.clear()
            started: list[asyncio.Task[None]] = []
            try:
                if self.clock() >= self._next_housekeeping:
                    await self.housekeeping_if_leader()
                started, nxt = await self._dispatch()
            except Exception as exc:
                if self.store.damage is None and self._store_failed(exc):
                    log.warning("worker: cannot read the job store (%s); retrying",
                                exception_line(exc))
                elif self.store.damage is None:
                    log.exception("worker: cannot read the job store; retrying")
                # else: the database is damaged; said once (store health), the daemon stops
                nxt = self.clock() + self.s.queue.retry_base_s
            idle = self._idle_wake_s
            timeout = idle if nxt is None else min(idle, max(0.0, nxt - self.clock()))
            if timeout == 0 and not started:
                # What is due waits on a running step (same number, or no free slot): the
                # step's end wakes us.
                timeout = idle
            if timeout > 0 and not self._stopping:
                try:
                    # asyncio.timeout, not wait_for: no task of its own around the wait at
                    # every wake (several a fax in a burst).
                    async with asyncio.timeout(timeout):
                        await self._wake.wait()
                except TimeoutError:
                    continue
            if not self._stopping:
                # Woken (a step ended, a mail came in): what else ends or comes in over the
                # next few milliseconds goes to the store in the same trip. In a burst every
                # fax wakes the loop about four times; one claim per wake cost a third of the
                # store's work per fax.
                await asyncio.sleep(DISPATCH_GATHER_S)

    async def _dispatch(self) -> tuple[list[asyncio.Task[None]], float | None]:
        """Start the due steps there is room for; (their tasks, when the next one is due)."""
        limit = self.s.queue.worker_concurrency
        if self.intake_active():
            limit = min(limit, defaults.WORKER_CONCURRENCY_DURING_INTAKE)
        free = limit - len(self._inflight)
        inflight = list(self._inflight)
        store = self.store
        released, self._released = self._released, []
        asked = time.monotonic()

        try:
            # One trip to the store and one transaction (the loop comes here after every step
            # that ends): the ended steps' leases go, the due jobs are claimed, not merely read
            # (each comes leased to this node, see _beat), and the next due time is read.
            due, nxt = await store.run(store.release_and_claim, released, self.clock(),
                                       max(free, 0), inflight)
        except BaseException:
            self._released.extend(released)  # tried again on the next trip
            raise
        started = []
        for job in due:
            self._held_until[job.id] = asked + self.s.cluster.lease_seconds
            if job.state is State.STORED:
                self._dialling[job.id] = job.to_number
            task = asyncio.create_task(self._step(job), name=f"faxgw-job-{job.id}")
            self._inflight[job.id] = task
            started.append(task)
        return started, nxt

    async def run_due(self) -> int:
        """Run every due step to completion once (tests drive the queue with this)."""
        tasks, _ = await self._dispatch()
        if tasks:
            await asyncio.gather(*tasks)
        return len(tasks)

    async def run_until_idle(self, max_rounds: int = 1000) -> None:
        for _ in range(max_rounds):
            if await self.run_due() == 0 and not self._inflight:
                return
        raise RuntimeError("queue did not become idle")

    # -- steps -------------------------------------------------------------------------------

    async def _step(self, job: Job) -> None:
        steps: dict[State, Callable[[Job], Awaitable[None]]] = {
            State.SPOOLED: self._upload,
            State.STORED: self._submit,
            State.SUBMITTING: self._reconcile,
            State.SUBMITTED: self._poll,
            State.COMPLETED: self._report,
            State.GIVEN_UP: self._report,
        }
        try:
            await steps[job.state](job)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a step boundary: log, keep the job, try again later
            if self.store.damage is not None:
                # The database is damaged (said once, by the store's health): the daemon is
                # stopping, and nothing more can be written for this job.
                log.debug("job %s: step stopped by the damaged database: %s", job.id, exc)
                return
            if self._store_failed(exc):
                log.warning("job %s: %s step stopped: the job store did not answer: %s",
                            job.id, job.state.value, exception_line(exc))
            else:
                log.exception("job %s: %s step crashed", job.id, job.state.value)
            try:
                await self._later(job, f"internal error: {type(exc).__name__}")
            except Exception as again:  # the store is down: the job's lease runs out, and
                # the step is tried again then (by this node or another)
                log.warning("job %s: the failed step could not be recorded either (%s); it "
                            "runs again once its lease is out", job.id, exception_line(again))
        finally:
            self._held_until.pop(job.id, None)
            self._purge_claimed.pop(job.id, None)
            # Released on the loop's next trip to the store (which this step's end wakes),
            # with the claim of what comes next: not a trip of its own per step.
            self._released.append(job.id)
            self._inflight.pop(job.id, None)
            self._dialling.pop(job.id, None)
            self._wake.set()
            async with self.progress:
                self.progress.notify_all()

    async def wait_for(self, predicate: Callable[[], Awaitable[bool]], timeout_s: float) -> None:
        """Return once `predicate()` holds, re-checking after each step; TimeoutError if not."""
        async def _wait() -> None:
            async with self.progress:  # held while checking, so no notification is missed
                while not await predicate():
                    await self.progress.wait()
        await asyncio.wait_for(_wait(), timeout_s)

    def _store_failed(self, exc: BaseException) -> bool:
        return isinstance(exc, StoreError) or self.store.is_db_error(exc)

    def _holds(self, job: Job) -> bool:
        """Whether this node surely still holds the job's lease, by its own clock: checked
        just before a side effect (a send, a report, a deletion), after the fenced record of
        it. A job run outside a claim (a test driving a step) counts as held."""
        until = self._held_until.get(job.id)
        return until is None or time.monotonic() < until - self.s.cluster.lease_seconds / 10

    def _lost(self, job: Job, what: str) -> None:
        log.warning("job %s: %s not done: another node holds the job now (this node stalled "
                    "past LEASE_SECONDS, or the job moved on)", job.id, what)

    async def _reread(self, job: Job) -> Job:
        """The job as stored now, still under the claim `job` was taken with."""
        current = await self.store.run(self.store.job, job.id)
        assert current is not None
        return dataclasses.replace(current, lease_epoch=job.lease_epoch)

    def _delay(self, job: Job) -> float:
        return backoff_s(job.tries + 1, self.s.queue.retry_base_s, self.s.queue.retry_max_s,
                         self.jitter())

    def _gave_up(self, job: Job) -> bool:
        return self.clock() - job.created_at > self.s.queue.give_up_hours * 3600

    async def _later(self, job: Job, reason: str, delay_s: float | None = None) -> None:
        """An outage: keep the job where it is and come back later, or give up past the limit."""
        if self._gave_up(job):
            if job.state in (State.COMPLETED, State.GIVEN_UP):
                await self.store.run(self.store.mark_reported, job,
                                     f"report NOT delivered, gave up: {reason}")
                self.metrics.report_done("gave_up")
                self.metrics.fax_finished(job, self.clock())
                log.error("job %s: report could not be delivered, gave up: %s", job.id, reason)
                return
            words = (f"the gateway gave up after {self.s.queue.give_up_hours:g} hours of trying "
                     f"({reason})")
            await self.store.run(self.store.mark_given_up, job, words)
            log.error("job %s: gave up in state %s: %s", job.id, job.state.value, reason)
            return
        delay = self._delay(job) if delay_s is None else delay_s
        await self.store.run(self.store.retry_later, job, self.clock() + delay,
                             f"{reason}; next try in {delay:.0f} s")
        log.warning("job %s: %s; retry %d in %.1f s", job.id, reason, job.tries + 1, delay)

    async def _upload(self, job: Job) -> None:
        message = await self.store.run(self.store.message, job.message_id)
        assert message is not None
        source = Path(message.document_path)
        if not source.is_file():
            await self.store.run(self.store.mark_given_up, job,
                                 "the document is missing from the gateway's spool")
            log.error("job %s: spool file %s is missing", job.id, source)
            return
        key = job.media_key or new_media_key()
        try:
            await self.media.put(key, source)
        except MediaError as exc:
            self.contact["media"] = (False, self.clock(), str(exc))
            await self._later(job, str(exc))
            return
        self.contact["media"] = (True, self.clock(), "upload ok")
        crash_point("after-upload")
        await self.store.run(self.store.mark_stored, job, key)
        log.info("job %s: document stored", job.id)

    async def _submit(self, job: Job) -> None:
        assert job.media_key is not None
        try:
            media_url = await self.media.url(job.media_key, self.s.media.url_ttl_s)
        except MediaError as exc:
            await self._later(job, str(exc))
            return
        callback = self.callback_url(job.callback_token)
        store = self.store
        # SignalWire's account send rate (SEND_RATE_PER_SECOND, all nodes together): a slot
        # is reserved in the database; a send whose slot is later waits for it.
        interval = 1.0 / self.s.cluster.send_rate_per_second
        answer_s = self.s.signalwire.timeout_s + self._recheck_s

        def row() -> Job:
            current = store.job(job.id)
            assert current is not None
            return dataclasses.replace(current, lease_epoch=job.lease_epoch)

        def slot_and_submitting() -> tuple[float | None, Job | None]:
            # One trip to the store thread and, when the slot is free now (the usual case),
            # one commit: the slot, the change and the row.
            now = self.clock()
            at, current = store.take_send_slot_and_submit(job, now, interval, callback,
                                                          now + answer_s)
            if at > now:
                return at, None
            return None, (None if current is None
                          else dataclasses.replace(current, lease_epoch=job.lease_epoch))

        def submitting() -> Job | None:  # after waiting for the slot: the change, the row
            if not store.mark_submitting(job, callback, self.clock() + answer_s):
                return None
            return row()

        slot, current = await store.run(slot_and_submitting)
        if slot is not None:
            wait = slot - self.clock()
            if wait > 0:
                await asyncio.sleep(wait)
            current = await store.run(submitting)
        if current is None or not self._holds(job):
            # Not sent: the job moved on, or another node took it (a send recorded as started
            # and not made is looked up, not found, and sent by that node).
            self._lost(job, "send")
            return
        job = current
        self.metrics.attempt_started()
        # One line per send, after it (the store's events say when it began).
        try:
            with self.metrics.api_call("send"):
                fax = await self.sw.send_fax(to=job.to_number, from_=job.from_number,
                                             media_url=media_url, quality=job.quality,
                                             ttl_min=self.s.fax.ttl_minutes,
                                             status_callback=callback)
        except SendRetryable as exc:
            self.contact["signalwire"] = (False, self.clock(), exc.words)
            delay = exc.retry_after_s if exc.retry_after_s is not None else self._delay(job)
            delay = min(max(delay, 0.0), self.s.queue.retry_max_s)
            if self._gave_up(job):
                await self.store.run(self.store.mark_given_up, job, exc.words,
                                     str(exc.code or ""), str(exc))
                return
            await self.store.run(self.store.back_to_stored, job, self.clock() + delay,
                                 f"not sent ({exc.words}); next try in {delay:.0f} s")
            log.warning("job %s attempt %d: SignalWire did not take the fax to %s (%s); retry "
                        "in %.1f s", job.id, job.attempt, job.to_number, exc.words, delay)
        except SendRefused as exc:
            await self.store.run(self.store.mark_given_up, job,
                                 f"SignalWire refused the fax: {exc.words}",
                                 str(exc.code) if exc.code else None, str(exc))
            log.warning("job %s attempt %d: the fax to %s refused by SignalWire: %s", job.id,
                        job.attempt, job.to_number, exc.words)
        except SendOutcomeUnknown as exc:
            words = f"send outcome unknown ({exc.words})"
            if not await self.store.run(self.store.mark_outcome_unknown, job,
                                        self.clock() + self._recheck_s,
                                        f"{words}; will look it up"):
                # A status callback came first and moved the job on: history only.
                await self.store.run(self.store.add_event, job.id, "unknown",
                                     f"{words}; the job moved on meanwhile")
            log.warning("job %s attempt %d: send to %s, outcome unknown (%s); looking it up "
                        "in %.0f s", job.id, job.attempt, job.to_number, exc.words,
                        self._recheck_s)
        else:
            self.contact["signalwire"] = (True, self.clock(), "send ok")
            crash_point("after-send")
            if not await self.store.run(self.store.mark_submitted, job, fax.sid, fax.status,
                                        self.clock() + self.s.queue.status_poll_s,
                                        f"SignalWire accepted: sid {fax.sid}, status "
                                        f"{fax.status}"):
                # Its final status came first (the callback overtook the answer), or another
                # node holds the job now: what is recorded stands.
                log.info("job %s attempt %d: sent to %s, sid %s; the job had moved on "
                         "meanwhile", job.id, job.attempt, job.to_number, fax.sid)
                return
            log.info("job %s attempt %d: submitted to %s, sid %s", job.id, job.attempt,
                     job.to_number, fax.sid)

    async def _reconcile(self, job: Job) -> None:
        """A send whose answer never came: find the fax at SignalWire, resend only if absent."""
        started = job.submit_started_at or job.updated_at
        since = datetime.fromtimestamp(started - LOOKUP_SKEW_S, UTC)
        try:
            with self.metrics.api_call("list"):
                faxes = await self.sw.list_faxes(to=job.to_number, from_=job.from_number,
                                                 created_after=since)
        except SignalWireError as exc:
            await self._later(job, f"cannot look up the fax at SignalWire: {exc.words}")
            return
        # A fax another job sent to the same number (or an earlier attempt of this one) is
        # never this job's: a sid belongs to one job.
        taken = await self.store.run(self.store.taken_sids, job, [f.sid for f in faxes])
        faxes = [f for f in faxes if f.sid not in taken]
        if not faxes:
            await self.store.run(self.store.back_to_stored, job, self.clock(),
                                 "the unanswered send did not reach SignalWire; sending again")
            log.info("job %s: unanswered send not found at SignalWire; resending", job.id)
            return
        fax = max(faxes, key=lambda f: f.date_created or since)
        await self.store.run(self.store.mark_submitted, job, fax.sid, fax.status,
                             self.clock() + self.s.queue.status_poll_s,
                             f"found at SignalWire after an unanswered send: sid {fax.sid}")
        log.info("job %s: unanswered send found at SignalWire as %s (%s)", job.id, fax.sid,
                 fax.status)
        if fax.status in FINAL_STATUSES:
            job = await self._reread(job)
            await self._apply_fax(job, fax.sid, fax.status, fax.num_pages, fax.duration_s,
                                  fax.error_code, fax.error_message, "lookup")

    async def _poll(self, job: Job) -> None:
        """No final callback yet: ask SignalWire (callbacks are best effort)."""
        assert job.fax_sid is not None
        try:
            with self.metrics.api_call("fetch"):
                fax = await self.sw.fetch_fax(job.fax_sid)
        except SignalWireError as exc:
            if exc.code == 20404 or exc.status == 404:
                await self.store.run(self.store.mark_given_up, job,
                                     "SignalWire no longer knows this fax", None, str(exc))
                return
            await self._later(job, f"cannot fetch the fax status: {exc.words}")
            return
        if fax.status in FINAL_STATUSES:
            await self._apply_fax(job, job.fax_sid, fax.status, fax.num_pages, fax.duration_s,
                                  fax.error_code, fax.error_message, "poll")
            return
        await self._later(job, f"fax still {fax.status or 'unknown'} at SignalWire",
                          delay_s=min(self.s.queue.status_poll_s, self._delay(job)))

    async def _apply_fax(self, job: Job, sid: str | None, status: str | None,
                         pages: int | None, duration_s: int | None, error_code: str | None,
                         error_message: str | None, source: str) -> None:
        action = await self.store.run(
            lambda: self.store.record_status(job, sid, status, pages=pages,
                                             duration_s=duration_s, error_code=error_code,
                                             error_message=error_message, source=source))
        log.info("job %s: %s status %s -> %s", job.id, source, status, action.value)

