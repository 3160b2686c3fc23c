"""From an accepted SMTP transaction to durable jobs: parse, build the PDF, spool, commit.

The SMTP edge hands over the path of the message as received (DATA_DIR/incoming; the edge
removes it afterwards) and the document workers read it there. A `Refused` carries the SMTP
answer as a `Reply`: 250 only once the document is fsync'ed in the spool and the job rows are
committed; 451 when the disk or the store cannot take it (the sender retries); 554 when the mail
itself can never become a fax.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from email import policy
from email.message import EmailMessage
from email.parser import BytesHeaderParser
from email.utils import format_datetime, parseaddr
from pathlib import Path
from typing import Any, Callable, Coroutine, Sequence

from gateway.smtp import replies
from gateway.smtp.access import Access, Client
from gateway.smtp.replies import Reply
from gateway.config import Settings
from gateway.documents.pool import CpuPool, TaskLimitError, call
from gateway.documents.model import DocOptions, DocumentError
from gateway.ops.faults import crash_point
from gateway.signalwire.media import new_media_key
from gateway.ops.metrics import Metrics
from gateway.documents.mime import MimeError, ParsedMail, sanitize_header_text
from gateway.mail.sender import Notifier, NotifyError
from gateway.mail.reports import Templates, build_receipt, build_refusal
from gateway.store.spool import Spool, fsync_dir
from gateway.store.sqlite import Message, NewJob, Store, StoreError

log = logging.getLogger(__name__)


def new_id() -> str:
    """A short random id for messages and jobs: 64 bits, printable in an SMTP reply."""
    return secrets.token_hex(8)


@dataclass(frozen=True)
class Accepted:
    message_id: str
    job_ids: tuple[str, ...]
    pages: int


class Refused(Exception):
    """A refusal with its SMTP reply."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
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
                 metrics: Metrics | None = None) -> None:
        self.settings = settings
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

    async def accept(self, path: Path, envelope_from: str | None, numbers: Sequence[str],
                     peer: str | None, client: Client | None = None) -> Accepted:
        """Queue the message in `path` (which stays the caller's to remove) or raise Refused.

        The document worker writes the PDF beside it (`<name>.pdf.part`, fsync'ed); it is
        renamed into the spool, so the daemon holds neither the mail nor the document."""
        pdf_part = path.with_name(path.name.replace(".eml.part", "") + ".pdf.part")
        try:
            return await self._accept(path, pdf_part, envelope_from, numbers, peer, client)
        finally:
            pdf_part.unlink(missing_ok=True)

    async def _accept(self, path: Path, pdf_part: Path, envelope_from: str | None,
                      numbers: Sequence[str], peer: str | None,
                      client: Client | None) -> Accepted:
        date = format_datetime(datetime.fromtimestamp(self.clock(), timezone.utc))
        try:
            prepared = await self.cpu.run(call, "gateway.documents.build:prepare", str(path),
                                          self.doc_options, list(numbers), envelope_from or "",
                                          date, str(pdf_part))
        except (MimeError, DocumentError, TaskLimitError) as exc:
            if isinstance(exc, TaskLimitError):
                log.warning("message from %s (peer %s): document work %s", envelope_from, peer,
                            exc)
                reason = f"The attached documents could not be converted: the work {exc}"
            else:
                reason = _one_line(str(exc))
            await self._report_refusal(path, envelope_from, client, numbers, reason)
            raise Refused(replies.bad_document(reason)) from exc
        parsed, document, options = prepared.parsed, prepared.document, prepared.options
        if client is not None and self.access is not None:
            refusal = self.access.check_header_from(client, parsed.from_addr)
            if refusal:
                raise Refused(refusal)
        user = client.user if client is not None else None

        message_id = new_id()
        from_number = (user.from_number if user and user.from_number
                       else self.settings.from_number)
        jobs = [NewJob(id=new_id(), to_number=n, from_number=from_number,
                       quality=options.quality, callback_token=secrets.token_urlsafe(24),
                       media_key=new_media_key())
                for n in numbers]
        if prepared.pdf_path is not None:
            size, sha256 = prepared.pdf_bytes, prepared.pdf_sha256
        else:
            size, sha256 = len(document.data), hashlib.sha256(document.data).hexdigest()
        try:
            if prepared.pdf_path is not None:
                path = await asyncio.to_thread(self._spool_file, Path(prepared.pdf_path),
                                               message_id)
            else:
                path = await asyncio.to_thread(self.spool.put, message_id, document.data)
        except OSError as exc:
            log.error("spool write failed for message %s: %s", message_id, exc)
            raise Refused(replies.CANNOT_STORE) from exc
        message = Message(
            id=message_id, created_at=self.clock(), envelope_from=envelope_from or None,
            header_from=parsed.from_addr,
            report_to=(user.report_to if user and user.report_to
                       else report_address(parsed, envelope_from)),
            subject=options.subject, message_id_header=parsed.message_id,
            references_header=" ".join(parsed.references) or None, peer=peer,
            document_path=str(path), document_bytes=size,
            document_sha256=sha256, pages=document.pages,
            filenames=", ".join(document.filenames),
            notes="; ".join(document.notes)[:2000] or None)
        try:
            await self.store.run(self.store.add_message, message, jobs)
        except (StoreError, OSError) as exc:
            log.error("job store write failed for message %s: %s", message_id, exc)
            await asyncio.to_thread(self.spool.remove, message_id)
            raise Refused(replies.CANNOT_QUEUE) from exc
        crash_point("after-commit")
        for job in jobs:
            log.info("job %s: accepted to %s, %d page(s), message %s from %s (peer %s)",
                     job.id, job.to_number, document.pages, message_id,
                     sanitize_header_text(message.report_to or "-", 120), peer or "-")
        self.on_new_jobs()
        self.metrics.mail_accepted(len(jobs))
        if self.settings.report_accepted and message.report_to and self.notifier is not None:
            self._background(self._send_receipts(message, [j.id for j in jobs]))
        return Accepted(message_id, tuple(j.id for j in jobs), document.pages)

    def _spool_file(self, pdf: Path, message_id: str) -> Path:
        """Move the worker's fsync'ed PDF into the spool and fsync the directory (blocking).
        A spool on another file system gets a durable copy instead."""
        final = self.spool.path_for(message_id)
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(pdf, final)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            return self.spool.put(message_id, pdf.read_bytes())
        fsync_dir(final.parent)
        return final

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _report_refusal(self, path: Path, envelope_from: str | None,
                              client: Client | None, numbers: Sequence[str], reason: str) -> None:
        """Tell an authorised sender why their mail cannot be faxed (a scanner shows no SMTP
        error to the person at it). Strangers never get here: they are refused at MAIL."""
        if self.notifier is None or client is None or not self.settings.report_refusals:
            return
        try:
            head = await asyncio.to_thread(_read_head, path, 256 * 1024)
        except OSError as exc:
            log.warning("refusal report not sent: cannot read the message back: %s", exc)
            return
        headers = BytesHeaderParser(policy=policy.default).parsebytes(head)
        header_from = str(headers.get("From", "") or "")
        user = client.user
        to = (user.report_to if user and user.report_to else None) or \
            _address(header_from) or _address(envelope_from or "")
        if not to or (self.access is not None
                      and self.access.check_header_from(client, header_from)):
            return
        refusal = build_refusal(
            to=to, numbers=numbers, reason=reason,
            subject=sanitize_header_text(str(headers.get("Subject", "") or ""), 200),
            original_msgid=str(headers.get("Message-ID", "") or "").strip() or None,
            from_addr=self.settings.notify_from, hostname=self.settings.smtp_hostname,
            now=self.clock(), templates=self.templates)
        self._background(self._send_refusal(refusal, to))

    async def _send_refusal(self, refusal: EmailMessage, to: str) -> None:
        assert self.notifier is not None
        try:
            await self.notifier.send(refusal, f"refused-{new_id()}")
            log.info("refusal report sent to %s", sanitize_header_text(to, 120))
        except NotifyError as exc:
            log.warning("refusal report to %s not sent: %s", sanitize_header_text(to, 120), exc)


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


def _read_head(path: Path, max_bytes: int) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(max_bytes)


def _one_line(text: str, limit: int = 400) -> str:
    return " ".join(text.split())[:limit].encode("ascii", "replace").decode("ascii")
