"""From an accepted SMTP transaction to durable jobs: parse, build the PDF, spool, commit.

The reply string is the SMTP answer: 250 only once the document is fsync'ed in the spool and the
job rows are committed; 451 when the disk or the store cannot take it (the sender retries); 554
when the mail itself can never become a fax.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from email import policy
from email.message import EmailMessage
from email.parser import BytesHeaderParser
from email.utils import format_datetime, parseaddr
from typing import Any, Callable, Coroutine, Sequence

from gateway.smtp.access import Access, Client
from gateway.config import Settings
from gateway.documents.pool import CpuPool, TaskLimitError, call
from gateway.documents.model import DocOptions, DocumentError
from gateway.ops.faults import crash_point
from gateway.signalwire.media import MediaError, MediaStore, new_media_key
from gateway.ops.metrics import Metrics
from gateway.documents.mime import MimeError, ParsedMail
from gateway.text import one_line
from gateway.mail.sender import Notifier, NotifyError
from gateway.mail.reports import Templates, build_receipt, build_refusal
from gateway.store.spool import Spool
from gateway.store.base import Store, StoreError
from gateway.store.rows import Message, NewJob

log = logging.getLogger(__name__)


def new_id() -> str:
    """A short random id for messages and jobs: 64 bits, printable in an SMTP reply."""
    return secrets.token_hex(8)


@dataclass(frozen=True)
class Accepted:
    message_id: str
    job_ids: tuple[str, ...]
    pages: int
    duplicate: bool = False  # the same mail was accepted before: these are its jobs


class Refused(Exception):
    """A refusal with its full SMTP reply line."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


def _address(candidate: str) -> str | None:
    _, addr = parseaddr(candidate)
    if "@" in addr and not any(c in addr for c in "\r\n<>,; "):
        return addr
    return None


def report_address(parsed: ParsedMail, envelope_from: str | None) -> str | None:
    """Where the report goes: the From: header, else the envelope sender; None for bounces."""
    for candidate in (parsed.from_addr, envelope_from):
        if candidate and (addr := _address(candidate)):
            return addr
    return None


def doc_options(settings: Settings) -> DocOptions:
    return DocOptions(paper=settings.paper, body=settings.body_policy, cover=settings.cover,
                      quality=settings.quality, max_pages=settings.max_pages,
                      office_timeout_s=max(5.0, settings.doc_timeout_s - 5))


class Intake:
    def __init__(self, settings: Settings, store: Store, spool: Spool, cpu: CpuPool,
                 on_new_jobs: Callable[[], None], clock: Callable[[], float] = time.time,
                 notifier: Notifier | None = None, access: Access | None = None,
                 metrics: Metrics | None = None, media: MediaStore | None = None) -> None:
        self.settings = settings
        # A shared queue (DATABASE_URL): the document goes to the media store before the 250,
        # so any node can send it if this one dies.
        self.media = media
        self.store = store
        self.spool = spool
        self.cpu = cpu
        self.on_new_jobs = on_new_jobs
        self.clock = clock
        self.doc_options = doc_options(settings)
        self.notifier = notifier
        self.templates = Templates(settings.report_template_dir)
        self.access = access
        self.metrics = metrics or Metrics(process=False)
        self._tasks: set[asyncio.Task[None]] = set()

    async def accept(self, content: bytes, envelope_from: str | None, numbers: Sequence[str],
                     peer: str | None, client: Client | None = None) -> Accepted:
        date = format_datetime(datetime.fromtimestamp(self.clock(), timezone.utc))
        try:
            prepared = await self.cpu.run(call, "gateway.documents.build:prepare", content,
                                          self.doc_options, list(numbers), envelope_from or "",
                                          date)
        except (MimeError, DocumentError, TaskLimitError) as exc:
            if isinstance(exc, TaskLimitError):
                log.warning("message from %s (peer %s): document work %s", envelope_from, peer,
                            exc)
                reason = f"The attached documents could not be converted: the work {exc}"
            else:
                reason = one_line(str(exc), 400, ascii_only=True)
            self._report_refusal(content, envelope_from, client, numbers, reason)
            raise Refused(f"554 5.6.0 {reason}") from exc
        parsed, document, options = prepared.parsed, prepared.document, prepared.options
        if client is not None and self.access is not None:
            refusal = self.access.check_header_from(client, parsed.from_addr)
            if refusal:
                raise Refused(refusal)
        user = client.user if client is not None else None

        sha256 = hashlib.sha256(document.data).hexdigest()
        duplicate = await self._duplicate(parsed.message_id, numbers, sha256, document.pages)
        if duplicate is not None:
            return duplicate
        message_id = new_id()
        from_number = (user.from_number if user and user.from_number
                       else self.settings.from_number)
        shared_key = new_media_key() if self.media is not None else None
        jobs = [NewJob(id=new_id(), to_number=n, from_number=from_number,
                       quality=options.quality, callback_token=secrets.token_urlsafe(24),
                       media_key=shared_key or new_media_key())
                for n in numbers]
        try:
            path = await asyncio.to_thread(self.spool.put, message_id, document.data)
        except OSError as exc:
            log.error("spool write failed for message %s: %s", message_id, exc)
            raise Refused("451 4.3.0 Temporary failure: the gateway cannot store the document "
                          "right now; please try again later") from exc
        message = Message(
            id=message_id, created_at=self.clock(), envelope_from=envelope_from or None,
            header_from=parsed.from_addr,
            report_to=(user.report_to if user and user.report_to
                       else report_address(parsed, envelope_from)),
            subject=options.subject, message_id_header=parsed.message_id,
            references_header=" ".join(parsed.references) or None, peer=peer,
            document_path=str(path), document_bytes=len(document.data),
            document_sha256=sha256, pages=document.pages,
            filenames=", ".join(document.filenames),
            notes="; ".join(document.notes)[:2000] or None)
        try:
            if shared_key is not None:
                assert self.media is not None
                await self.media.put(shared_key, path)
            await self.store.run(functools.partial(self.store.add_message, message, jobs,
                                                   stored=shared_key is not None))
        except (StoreError, OSError, MediaError) as exc:
            log.error("job store write failed for message %s: %s", message_id, exc)
            await asyncio.to_thread(self.spool.remove, message_id)
            raise Refused("451 4.3.0 Temporary failure: the gateway cannot queue the fax right "
                          "now; please try again later") from exc
        crash_point("after-commit")
        for job in jobs:
            log.info("job %s: accepted to %s, %d page(s), message %s from %s (peer %s)",
                     job.id, job.to_number, document.pages, message_id,
                     one_line(message.report_to or "-", 120), peer or "-")
        self.on_new_jobs()
        self.metrics.mail_accepted(len(jobs))
        if self.settings.report_accepted and message.report_to and self.notifier is not None:
            self._background(self._send_receipts(message, [j.id for j in jobs]))
        return Accepted(message_id, tuple(j.id for j in jobs), document.pages)

    async def _duplicate(self, message_id_header: str | None, numbers: Sequence[str],
                         sha256: str, pages: int) -> Accepted | None:
        """The same mail (Message-ID, recipients, document) accepted within DEDUP_WINDOW_HOURS:
        a client that lost our 250 and sent again. Its jobs, not new ones; a mail with no
        Message-ID is never merged."""
        if not message_id_header or self.settings.dedup_window_hours <= 0:
            return None
        since = self.clock() - self.settings.dedup_window_hours * 3600
        try:
            found = await self.store.run(self.store.find_duplicates, message_id_header,
                                         list(numbers), sha256, since)
        except (StoreError, OSError) as exc:
            log.error("job store read failed (duplicate check): %s", exc)
            raise Refused("451 4.3.0 Temporary failure: the gateway cannot queue the fax right "
                          "now; please try again later") from exc
        if not found or set(found) != set(numbers):
            return None  # a new recipient makes it a new mail
        job_ids = tuple(found[n] for n in numbers)
        log.info("message %s resent (same Message-ID and document): already jobs %s",
                 one_line(message_id_header, 200), ", ".join(job_ids))
        return Accepted("", job_ids, pages, duplicate=True)

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _report_refusal(self, content: bytes, envelope_from: str | None, client: Client | None,
                        numbers: Sequence[str], reason: str) -> None:
        """Tell an authorised sender why their mail cannot be faxed (a scanner shows no SMTP
        error to the person at it). Strangers never get here: they are refused at MAIL."""
        if self.notifier is None or client is None or not self.settings.report_refusals:
            return
        headers = BytesHeaderParser(policy=policy.default).parsebytes(content[:256 * 1024])
        header_from = str(headers.get("From", "") or "")
        user = client.user
        to = (user.report_to if user and user.report_to else None) or \
            _address(header_from) or _address(envelope_from or "")
        if not to or (self.access is not None
                      and self.access.check_header_from(client, header_from)):
            return
        refusal = build_refusal(
            to=to, numbers=numbers, reason=reason,
            subject=one_line(str(headers.get("Subject", "") or ""), 200),
            original_msgid=str(headers.get("Message-ID", "") or "").strip() or None,
            from_addr=self.settings.notify_from, hostname=self.settings.smtp_hostname,
            now=self.clock(), templates=self.templates)
        self._background(self._send_refusal(refusal, to))

    async def _send_refusal(self, refusal: EmailMessage, to: str) -> None:
        assert self.notifier is not None
        try:
            await self.notifier.send(refusal, f"refused-{new_id()}")
            log.info("refusal report sent to %s", one_line(to, 120))
        except NotifyError as exc:
            log.warning("refusal report to %s not sent: %s", one_line(to, 120), exc)


    async def _send_receipts(self, message: Message, job_ids: list[str]) -> None:
        """Best effort: a receipt that cannot be sent is logged; the final report still comes."""
        assert self.notifier is not None
        for job_id in job_ids:
            job = await self.store.run(self.store.job, job_id)
            if job is None:
                continue
            receipt = build_receipt(job, message, from_addr=self.settings.notify_from,
                                    hostname=self.settings.smtp_hostname, now=self.clock(),
                                    templates=self.templates)
            try:
                await self.notifier.send(receipt, f"{job_id}.accepted")
            except NotifyError as exc:
                log.warning("job %s: accepted receipt not sent: %s", job_id, exc)
