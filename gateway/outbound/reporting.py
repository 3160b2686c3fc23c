"""The last step of an outbound job: a finished fax is tried again when its outcome allows
(`retry_decision`), or its sender is told (the report, or the DSN the mail asked for), and its
document goes once every job of its message is reported.

`Reporting` is a part of the job runner's `Worker` (gateway/outbound/job_runner.py), kept apart
because it changes for its own reasons (what a sender is told, and when): the steps before it
(upload, send, reconcile, poll) stay in job_runner.py. Each side effect here (the report mail,
the deletion) happens only under the job's claim: the fenced record before it
(`mark_reporting`, the purge's claim) and `_holds` just before it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import itertools
import logging
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.config import Settings
from gateway.documents.pool import CpuPool, TaskLimitError
from gateway.jobs.outbound_states import Job, RetryPolicy, State, retry_decision
from gateway.mail.dsn import asked, delay_notice, report_recipient
from gateway.mail.dsn_values import wants
from gateway.mail.reports import outcome, render_final_report
from gateway.mail.sender import Notifier, NotifyError
from gateway.media_store import MediaError
from gateway.outbound.housekeeping import Housekeeping
from gateway.runtime.faults import crash_point, pause_point
from gateway.runtime.metrics import Metrics
from gateway.sanitise import exception_line
from gateway.store.rows import Attempt, Event, Message

log = logging.getLogger("gateway.outbound.job_runner")  # one logger for the worker's lines


class Reporting(Housekeeping):
    # Set by Worker.__init__.
    s: Settings
    cpu: CpuPool
    notifier: Notifier
    metrics: Metrics
    retry_policy: RetryPolicy
    contact: dict[str, tuple[bool, float, str]]
    clock: Callable[[], float]
    _purge_claimed: dict[str, list[Job] | None]

    def _lost(self, job: Job, what: str) -> None:
        raise NotImplementedError

    def _store_failed(self, exc: BaseException) -> bool:
        raise NotImplementedError

    async def _later(self, job: Job, reason: str, delay_s: float | None = None) -> None:
        raise NotImplementedError

    async def _report(self, job: Job) -> None:
        # A job reported before is only reported again (operator's `faxgw report`), never
        # dialled again.
        if job.state is State.COMPLETED and job.reported_at is None:
            decision = retry_decision(job, self.retry_policy, self.clock())
            if decision is not None:
                when, quality, why = decision
                delay = when - self.clock()
                scheduled = await self.store.run(
                    self.store.schedule_retry, job, when, quality,
                    f"attempt {job.attempt} {job.fax_status} ({why}); attempt "
                    f"{job.attempt + 1} in {delay:.0f} s at {quality} quality")
                log.info("job %s attempt %d: %s (%s); next attempt in %.0f s", job.id,
                         job.attempt, job.fax_status, why, delay)
                if scheduled and wants(job.dsn_notify, "DELAY"):
                    # Fenced by the retry's own transition (completed -> stored, checked in
                    # its UPDATE): only the step that moved the job back sends the notice.
                    await self._delay_notice(job, when, why)
                return
        store = self.store

        wants_document = self._may_fetch_document(job)

        def facts() -> tuple[Message | None, list[Event], list[Attempt], bool]:
            # One store trip; and, where the document may be on another node, whether this
            # node has it (a stat on the store's thread rather than a thread of its own).
            message = store.message(job.message_id)
            here = (wants_document and message is not None
                    and Path(message.document_path).is_file())
            return message, store.events(job.id), store.attempts(job.id), here

        message, events, attempts, here = await store.run(facts)
        assert message is not None
        if not asked(job, outcome(job)[0]):
            if not await self._mark_reported(
                    job, f"no report sent: NOTIFY={job.dsn_notify} (RFC 3461)"):
                self._lost(job, "report")
                return
            self.metrics.report_done("not_asked")
            self.metrics.fax_finished(job, self.clock())
            log.info("job %s: final (%s), no report: the sender asked NOTIFY=%s", job.id,
                     job.fax_status or job.state.value, job.dsn_notify)
            await self._cleanup(job)
            return
        if not report_recipient(job, message, self.s.fax.domain):
            if not await self._mark_reported(
                    job, "no report sent: the mail had no usable sender address"):
                self._lost(job, "report")
                return
            self.metrics.report_done("no_address")
            self.metrics.fax_finished(job, self.clock())
            log.info("job %s: final (%s), no sender address to report to", job.id,
                     job.fax_status or job.state.value)
            await self._cleanup(job)
            return
        # The report's number (its Message-ID): a new one, or the same again when a mailing
        # of it began and was never recorded (it may have gone out: a crash, a stall).
        uncertain = job.reporting_at is not None
        n = job.report_n if uncertain else job.report_n + 1
        job = dataclasses.replace(job, report_n=n)
        options: dict[str, Any] = dict(
            from_addr=self.s.notify.sender, hostname=self.s.smtp.hostname, now=self.clock(),
            template_dir=self.s.reports.template_dir, attach_pdf=self.s.reports.attach_pdf,
            bcc=self.s.reports.bcc, fax_domain=self.s.fax.domain)
        message, fetched = await self._report_document(job, message, here)
        try:
            # A large document's thumbnail takes a large turn (CpuPool.turn), like its intake.
            async with self.cpu.background(), self.cpu.turn(message.document_bytes or 0):
                rendered = await self.cpu.run(render_final_report, job, message, events,
                                              attempts, thumbnail=self.s.reports.thumbnail,
                                              **options)
        except TaskLimitError as exc:
            log.warning("job %s: report rendering %s; sending it without the thumbnail",
                        job.id, exc)
            # Still off the loop: it reads the document (REPORT_ATTACH_PDF) and builds the mail.
            rendered = await asyncio.to_thread(
                functools.partial(render_final_report, job, message, events, attempts,
                                  thumbnail=False, **options))
        finally:
            if fetched is not None:
                await asyncio.to_thread(fetched.unlink, missing_ok=True)
        detail = (f"report {n}: mailing it again with the same Message-ID (an earlier try of "
                  "it was not recorded as sent)" if uncertain else f"report {n}: mailing it")
        pause_point("report-rendered", f"job {job.id}")
        if not await self.store.run(self.store.mark_reporting, job, n, detail) \
                or not self._holds(job):
            self._lost(job, "report")
            return
        crash_point("before-report")
        try:
            where = await self.notifier.send_rendered(rendered, job.id)
        except NotifyError as exc:
            self.contact["relay"] = (False, self.clock(), f"report not delivered: {exc}")
            await self._later(job, f"report not delivered: {exc}")
            return
        self.contact["relay"] = (True, self.clock(), f"reported: {where}")
        crash_point("after-report")
        if not await self._record_report(job, f"report {where}"):
            return
        self.metrics.report_done("sent")
        self.metrics.fax_finished(job, self.clock())
        log.info("job %s: reported (%s) %s", job.id, job.fax_status or job.state.value, where)
        await self._cleanup(job)

    async def _delay_notice(self, job: Job, retry_at: float, why: str) -> None:
        """NOTIFY=DELAY (RFC 3461): tell the sender the fax was put back for a retry. Best
        effort and at most once per retry: a relay that is down costs this notice, not the
        fax (the final report still comes)."""
        message = await self.store.run(self.store.message, job.message_id)
        if message is None or not report_recipient(job, message, self.s.fax.domain):
            return
        notice = await asyncio.to_thread(functools.partial(
            delay_notice, job, message, from_addr=self.s.notify.sender,
            hostname=self.s.smtp.hostname, fax_domain=self.s.fax.domain, now=self.clock(),
            retry_at=retry_at, why=why,
            retry_until=job.created_at + self.retry_policy.kill_s))
        try:
            where = await self.notifier.send(notice, f"{job.id}.delay-{job.attempt}",
                                             self.s.reports.bcc)
        except NotifyError as exc:
            log.warning("job %s attempt %d: delay notice not delivered: %s", job.id,
                        job.attempt, exc)
            return
        await self.store.run(self.store.add_event, job.id, "dsn",
                             f"delay notice after attempt {job.attempt} {where}")
        log.info("job %s attempt %d: delay notice %s", job.id, job.attempt, where)

    async def _mark_reported(self, job: Job, detail: str) -> bool:
        """Record the job reported. With no document retention, the same commit claims its
        message's purge when this was the message's last report (`_cleanup` does it)."""
        if self.s.queue.document_retention_hours != 0:
            return await self.store.run(self.store.mark_reported, job, detail)
        recorded, jobs = await self.store.run(self.store.mark_reported_and_claim_purge, job,
                                              detail)
        if recorded:
            self._purge_claimed[job.id] = jobs
        return recorded

    async def _record_report(self, job: Job, detail: str) -> bool:
        """The relay took the report: record it. A record that fails (a connection killed,
        the database restarting) is tried again, never the mail, for as long as this node
        holds the job; past that the job is left `reporting`, and the node that takes it over
        mails it again under the same Message-ID. True once recorded."""
        for tries in itertools.count(1):
            try:
                if await self._mark_reported(job, detail):
                    return True
                current = await self.store.run(self.store.job, job.id)
                if current is not None and current.state is State.REPORTED \
                        and current.lease_epoch == job.lease_epoch:
                    return True  # the failed try had committed after all
                self._lost(job, "record of the report")
                return False
            except Exception as exc:
                if not self._store_failed(exc):
                    raise
                if tries >= 3 and not self._holds(job):
                    log.warning("job %s: report %d was mailed (%s) but cannot be recorded: "
                                "%s; the node that takes the job over mails it again with the "
                                "same Message-ID", job.id, job.report_n, detail,
                                exception_line(exc))
                    return False
                log.warning("job %s: report %d mailed, recording it failed (%s); trying the "
                            "record again", job.id, job.report_n, exception_line(exc))
                await asyncio.sleep(min(0.1 * 2 ** tries, 2.0))
        raise AssertionError("unreachable")

    def _may_fetch_document(self, job: Job) -> bool:
        """Whether the report wants the document (thumbnail or PDF) and it may be on another
        node only (a shared queue: the mail may have been spooled elsewhere)."""
        return bool(self.s.shared and job.media_key
                    and (self.s.reports.thumbnail or self.s.reports.attach_pdf))

    async def _report_document(self, job: Job, message: Message,
                               here: bool) -> tuple[Message, Path | None]:
        """The message as the report renderer reads it, and a temporary file to delete after.

        With a shared queue the mail may have been spooled by another node (dead, or simply
        elsewhere): when the spool file is not on this node (`here`, looked at with the
        report's reads) and the report wants the document (thumbnail or PDF), it is fetched
        from the media store into a hidden file in this node's spool (a crash leaves it to
        `sweep_spool`, as a file of no known message). A failed fetch does not hold the
        report back: it goes without thumbnail and PDF."""
        if here or not self._may_fetch_document(job):
            return message, None
        assert job.media_key is not None  # _may_fetch_document
        tmp = self.spool.root / f".report-{job.id}.{secrets.token_hex(4)}.pdf"
        try:
            await asyncio.to_thread(functools.partial(tmp.parent.mkdir, parents=True,
                                                      exist_ok=True))
            await self.media.fetch(job.media_key, tmp)
        except (MediaError, OSError) as exc:
            await asyncio.to_thread(tmp.unlink, missing_ok=True)
            log.warning("job %s: the document is not on this node and could not be fetched "
                        "from the media store (%s); the report goes without its thumbnail and "
                        "PDF", job.id, exc)
            return message, None
        return dataclasses.replace(message, document_path=str(tmp)), tmp

    async def _cleanup(self, job: Job) -> None:
        """With no document retention, the PDF goes as soon as every job of its message is
        reported; otherwise housekeeping removes it later."""
        if self.s.queue.document_retention_hours == 0:
            if job.id in self._purge_claimed:  # decided when the report was recorded
                claimed = self._purge_claimed.pop(job.id)
                if claimed is not None:
                    await self._purge(job.message_id, claimed, job, claimed=True)
                return
            # A record that failed and had committed after all: ask again.
            # This job's message only (housekeeping catches any left behind), not a search of
            # every message: several reports ending together searched and purged alike. Its
            # last reports, ending together, purge it once: the others find it being purged
            # (_purge), or purged already.
            jobs = await self.store.run(self.store.message_jobs, job.message_id, True)
            if jobs and all(j.state is State.REPORTED for j in jobs):
                await self._purge(job.message_id, jobs, job)
