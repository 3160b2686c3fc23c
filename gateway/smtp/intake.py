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
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email import policy
from email.message import EmailMessage
from email.parser import BytesHeaderParser
from email.utils import format_datetime
from pathlib import Path
from typing import Any

from gateway.config import Settings
from gateway.documents.mime import MimeError, ParsedMail
from gateway.documents.model import DocOptions, DocumentError
from gateway.documents.partial import PartConflict, PartialError, PartialStore, Received, SetsFull
from gateway.documents.pool import CpuPool, NoTurnError, TaskLimitError, call
from gateway.mail.loop_guard import automatic_mail, in_domain
from gateway.mail.reports import Templates, build_receipt, build_refusal
from gateway.mail.sender import Notifier, NotifyError
from gateway.media_store import MediaError, MediaStore, new_media_key
from gateway.runtime.faults import crash_point
from gateway.runtime.metrics import Metrics
from gateway.sanitise import one_line
from gateway.smtp import esmtp_params as dsn_params
from gateway.smtp import replies
from gateway.smtp.access import Access, Client, header_address
from gateway.smtp.partials import Expired, Partials
from gateway.smtp.replies import Reply
from gateway.spool import Spool, copy_durable, fsync_dir
from gateway.store.base import Store, StoreError
from gateway.store.rows import Message, NewJob

log = logging.getLogger(__name__)

HEAD_BYTES = 256 * 1024  # enough for any real header block


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
    """A refusal with its SMTP reply."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


class RateRefused(Refused):
    """The message's DATA rate charge (`Access.charge`) was refused: nothing was charged."""


class PartStored(Refused):
    """Not a refusal: one part of a split mail (message/partial) was kept, reply 250.

    A Refused only because the SMTP handler answers with Refused.reply as it is; the handler
    tells it apart (no job yet, so nothing is charged and there is no job id to name).
    """


def partial_store(settings: Settings) -> PartialStore:
    """Where an earlier version kept split mail's parts (its sets are only expired now)."""
    return PartialStore(settings.queue.data_dir / "spool" / "partial")


def _address(candidate: str) -> str | None:
    _, addr = header_address(candidate)
    if "@" in addr and not any(c in addr for c in "\r\n<>,; "):
        return addr
    return None


def join_stale_s(settings: Settings) -> float | None:
    """After how long a split mail claimed for a join by a node that never finished it is
    joined again when its last part comes once more: well past the longest a join takes (a
    turn at the document workers, the conversion, the upload); never without the dedup check,
    which recognises the fax queued already if that node got so far."""
    if settings.cluster.dedup_window_hours <= 0:
        return None
    return max(900.0, 4 * settings.documents.timeout_s)


def report_address(parsed: ParsedMail, envelope_from: str | None) -> str | None:
    """Where the report goes: the From: header, else the envelope sender; None for bounces."""
    for candidate in (parsed.from_addr, envelope_from):
        if candidate and (addr := _address(candidate)):
            return addr
    return None


def doc_options(settings: Settings) -> DocOptions:
    return DocOptions(paper=settings.documents.paper, body=settings.documents.body_policy,
                      cover=settings.documents.cover,
                      quality=settings.fax.quality, max_pages=settings.fax.max_pages,
                      office_timeout_s=max(5.0, settings.documents.timeout_s - 5))


class Intake:
    def __init__(self, settings: Settings, store: Store, spool: Spool, cpu: CpuPool,
                 on_new_jobs: Callable[[], None], clock: Callable[[], float] = time.time,
                 notifier: Notifier | None = None, access: Access | None = None,
                 metrics: Metrics | None = None, media: MediaStore | None = None,
                 part_media: MediaStore | None = None) -> None:
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
        self.templates = Templates(settings.reports.template_dir)
        self.access = access
        self.metrics = metrics or Metrics(process=False)
        self._tasks: set[asyncio.Task[None]] = set()
        # Split mail's parts: in the media store (`part_media`: the daemon's, shared or not)
        # and the job store, so that any node may receive the last part.
        parts_in = part_media or media
        self.partials = (Partials(store, parts_in, settings.cluster.node_id,
                                  settings.documents.partial_max_sets_per_sender,
                                  join_stale_s(settings))
                         if parts_in is not None else None)
        # The daemon's check that a 250 can still be kept (database file, free disk): a
        # refusal, or None.
        self.durability_check: Callable[[], Reply | None] = lambda: None
        self.active = 0  # mails being accepted now (the worker yields CPU to them)

    async def accept(self, path: Path, envelope_from: str | None, numbers: Sequence[str],
                     peer: str | None, client: Client | None = None,
                     charge: asyncio.Future[Reply | None] | None = None,
                     head: bytes | None = None,
                     dsn: tuple[dsn_params.MailParams, list[dsn_params.RcptParams]] | None = None
                     ) -> Accepted:
        """Queue the message in `path` (which stays the caller's to remove) or raise Refused.

        `head`: the file's first HEAD_BYTES, when the caller kept them as it wrote the file
        (else they are read back from it).

        `dsn`: the MAIL command's RET, ENVID, AUTH= and each number's NOTIFY, ORCPT (in the
        order of `numbers`), kept with the message and its jobs.

        `charge`: the rate limits' answer for this message (`Access.charge`), decided while the
        document is converted; nothing is stored, and no refusal mail sent, before it says yes
        (RateRefused when it says no).

        The document worker writes the PDF beside it (`<name>.pdf.part`, fsync'ed); it is
        renamed into the spool, so the daemon holds neither the mail nor the document."""
        self.active += 1
        try:
            return await self._accept_mail(path, envelope_from, numbers, peer, client,
                                           charge, head, dsn)
        finally:
            self.active -= 1
            if not self.active:
                self.on_new_jobs()  # the worker goes back to its full concurrency

    async def _accept_mail(self, path: Path, envelope_from: str | None,
                           numbers: Sequence[str], peer: str | None, client: Client | None,
                           charge: asyncio.Future[Reply | None] | None,
                           head: bytes | None,
                           dsn: tuple[dsn_params.MailParams, list[dsn_params.RcptParams]] | None
                           = None) -> Accepted:
        if head is None:
            head = await asyncio.to_thread(_read_head, path, HEAD_BYTES)
        if (automatic := automatic_mail(head, envelope_from)) is not None:
            # No refusal mail: answering automatic mail is how loops and backscatter start.
            raise Refused(replies.automatic_mail(automatic))
        # A copier's "divided sending" (message/partial): keep each part; the last one brings
        # the whole message, which then goes through intake like any other mail.
        part = await self._partial(path, head, envelope_from, numbers, client, charge)
        if part.whole is None:
            return await self._accept_file(path, envelope_from, numbers, peer, client, charge,
                                           dsn)
        assert part.key is not None and part.owner is not None and self.partials is not None
        owner = part.owner
        whole = path.with_name(path.name.replace(".eml.part", "") + ".whole.eml.part")
        try:
            await asyncio.to_thread(whole.write_bytes, part.whole)
            accepted = await self._accept_file(whole, envelope_from, numbers, peer, client,
                                               charge, dsn)
        except Refused as exc:  # 4xx: the parts wait for the sender's retry of the last one
            await self.partials.done(part.key, owner, keep=exc.reply.temporary)
            raise
        except OSError as exc:
            await self.partials.done(part.key, owner, keep=True)
            log.error("message/partial %s: the joined message cannot be written: %s",
                      part.key[:12], exc)
            raise Refused(replies.CANNOT_RECEIVE) from exc
        except BaseException:  # anything else: the parts wait for the retry of the last one
            await self.partials.done(part.key, owner, keep=True)
            raise
        finally:
            whole.unlink(missing_ok=True)
        await self.partials.done(part.key, owner, keep=False)
        return accepted

    async def _partial(self, path: Path, head: bytes, envelope_from: str | None,
                       numbers: Sequence[str], client: Client | None,
                       charge: asyncio.Future[Reply | None] | None) -> Received:
        """Received() for ordinary mail; raises PartStored (250) for a part kept for later."""
        user = client.user.name if client is not None and client.user is not None else ""

        def meta() -> dict[str, Any]:
            return {"numbers": list(numbers), "envelope_from": envelope_from,
                    "report": self._refusal_target(head, envelope_from, client)}

        if self.partials is None:
            return Received()
        try:
            part = await self.partials.receive(
                path, f"{user}|{envelope_from or ''}", list(numbers), meta, now=self.clock(),
                max_bytes=self.settings.smtp.max_message_bytes, head=head)
        except PartConflict as exc:  # no refusal mail: the set's expiry tells the sender once
            reason = one_line(str(exc), 400, ascii_only=True)
            log.warning("message/partial part from %s refused: %s", envelope_from, reason)
            raise Refused(replies.bad_document(reason)) from exc
        except SetsFull as exc:  # no refusal mail either: a flood would be answered in kind
            log.warning("message/partial part from %s refused: %s", envelope_from, exc)
            raise Refused(replies.too_many_partial_sets(exc.held) if exc.per_sender
                          else replies.CANNOT_STORE_PART) from exc
        except PartialError as exc:
            reason = one_line(str(exc), 400, ascii_only=True)
            await self._report_refusal(path, envelope_from, client, numbers, reason, charge)
            raise Refused(replies.bad_document(reason)) from exc
        except (OSError, MediaError, StoreError) as exc:
            log.error("message/partial part from %s not stored: %s", envelope_from, exc)
            raise Refused(replies.CANNOT_STORE_PART) from exc
        if part.reply is not None:
            raise PartStored(replies.part_stored(part.reply))
        return part

    async def _accept_file(self, path: Path, envelope_from: str | None, numbers: Sequence[str],
                           peer: str | None, client: Client | None,
                           charge: asyncio.Future[Reply | None] | None,
                           dsn: tuple[dsn_params.MailParams, list[dsn_params.RcptParams]] | None
                           = None) -> Accepted:
        pdf_part = path.with_name(path.name.replace(".eml.part", "") + ".pdf.part")
        try:
            return await self._accept(path, pdf_part, envelope_from, numbers, peer, client,
                                      charge, dsn)
        finally:
            pdf_part.unlink(missing_ok=True)

    async def _accept(self, path: Path, pdf_part: Path, envelope_from: str | None,
                      numbers: Sequence[str], peer: str | None, client: Client | None,
                      charge: asyncio.Future[Reply | None] | None,
                      dsn: tuple[dsn_params.MailParams, list[dsn_params.RcptParams]] | None
                      = None) -> Accepted:
        date = format_datetime(datetime.fromtimestamp(self.clock(), UTC))
        size = path.stat().st_size
        try:
            # Large mail is converted one at a time (CpuPool.turn); the wait is bounded so the
            # sender's DATA timeout does not run out: a 451 instead, and the scanner retries.
            async with self.cpu.turn(size, self.settings.documents.timeout_s):
                prepared = await self.cpu.run(call, "gateway.documents.build:prepare",
                                              str(path), self.doc_options, list(numbers),
                                              envelope_from or "", date, str(pdf_part))
        except NoTurnError:
            log.warning("message from %s (peer %s, %d bytes): no turn at the document workers "
                        "within %.0f s", envelope_from, peer, size,
                        self.settings.documents.timeout_s)
            raise Refused(replies.CONVERSIONS_BUSY) from None
        except (MimeError, DocumentError, TaskLimitError) as exc:
            if isinstance(exc, TaskLimitError):
                log.warning("message from %s (peer %s): document work %s", envelope_from, peer,
                            exc)
                reason = f"The attached documents could not be converted: the work {exc}"
            else:
                reason = one_line(str(exc), 400, ascii_only=True)
            await self._report_refusal(path, envelope_from, client, numbers, reason, charge)
            raise Refused(replies.bad_document(reason)) from exc
        await _charged(charge)
        parsed, document, options = prepared.parsed, prepared.document, prepared.options
        if client is not None and self.access is not None:
            refusal = self.access.check_header_from(client, parsed.from_addr)
            if refusal:
                raise Refused(refusal)
        user = client.user if client is not None else None

        if prepared.pdf_path is not None:
            size, sha256 = prepared.pdf_bytes, prepared.pdf_sha256
        else:
            size, sha256 = len(document.data), hashlib.sha256(document.data).hexdigest()
        message_id = new_id()
        from_number = (user.from_number if user and user.from_number
                       else self.settings.fax.from_number)
        shared_key = new_media_key() if self.media is not None else None
        mail_params, rcpt_params = dsn if dsn is not None else (dsn_params.MailParams(), [])
        rcpt_params = list(rcpt_params) + [dsn_params.RcptParams()] * (len(numbers)
                                                                       - len(rcpt_params))
        jobs = [NewJob(id=new_id(), to_number=n, from_number=from_number,
                       quality=options.quality, callback_token=secrets.token_urlsafe(24),
                       media_key=shared_key or new_media_key(),
                       dsn_notify=r.notify, dsn_orcpt=r.orcpt)
                for n, r in zip(numbers, rcpt_params, strict=True)]
        returned: tuple[str | None, str | None] = (None, None)
        if any(r.notify not in (None, "NEVER") for r in rcpt_params):
            # What a DSN returns of the mail (RFC 3461 RET): the spool keeps only the PDF, so
            # the header block is kept now, and the whole mail for RET=FULL within a bound.
            returned = await asyncio.to_thread(dsn_params.returned_content, path,
                                               mail_params.ret == "FULL")
        if (refusal := self.durability_check()) is not None:
            raise Refused(refusal)
        upload: asyncio.Future[None] | None = None
        if shared_key is not None and prepared.pdf_path is not None:
            # The PUT reads the worker's file while the spool links it in: neither waits for
            # the other, and both are done before the commit.
            assert self.media is not None
            upload = asyncio.ensure_future(self.media.put(shared_key, Path(prepared.pdf_path)))
            # A session that ends meanwhile leaves it to finish alone (its error is not news).
            upload.add_done_callback(lambda done: done.cancelled() or done.exception())
        try:
            if prepared.pdf_path is not None:
                path = await asyncio.to_thread(self._spool_file, Path(prepared.pdf_path),
                                               message_id, upload is not None)
            else:
                path = await asyncio.to_thread(self.spool.put, message_id, document.data)
        except OSError as exc:
            log.error("spool write failed for message %s: %s", message_id, exc)
            await self._forget_upload(upload, shared_key, message_id)
            raise Refused(replies.CANNOT_STORE) from exc
        report_to = (user.report_to if user and user.report_to
                     else report_address(parsed, envelope_from))
        notes = list(document.notes)
        if report_to and in_domain(report_to, self.settings.fax.domain):
            # A report there would be faxed, and its report mailed there again.
            log.warning("message %s: no report will be sent: the sender address %s is in the "
                        "fax domain %s", message_id, one_line(report_to, 120),
                        self.settings.fax.domain)
            notes.append(f"no report: the sender address {one_line(report_to, 120)}"
                         " is in the fax domain")
            report_to = None
        message = Message(
            id=message_id, created_at=self.clock(), envelope_from=envelope_from or None,
            header_from=parsed.from_addr,
            report_to=report_to,
            subject=options.subject, message_id_header=parsed.message_id,
            references_header=" ".join(parsed.references) or None, peer=peer,
            document_path=str(path), document_bytes=size,
            document_sha256=sha256, pages=document.pages,
            filenames=", ".join(document.filenames),
            notes="; ".join(notes)[:2000] or None,
            dsn_ret=mail_params.ret, dsn_envid=mail_params.envid,
            auth_submitter=mail_params.auth, dsn_headers=returned[0], dsn_full=returned[1],
            auth_results=client.auth_results if client is not None else None)
        # The same mail (Message-ID, recipients, document) accepted within DEDUP_WINDOW_HOURS
        # is a client that lost our 250 and sent again: its jobs, not new ones. Decided in the
        # commit, so copies arriving at two nodes at once still make one job each.
        window_s = self.settings.cluster.dedup_window_hours * 3600
        dedup_since = message.created_at - window_s if window_s > 0 else None
        try:
            if upload is not None:
                await upload
            elif shared_key is not None:
                assert self.media is not None
                await self.media.put(shared_key, path)
            earlier = await self.store.add_message_soon(
                message, list(jobs), stored=shared_key is not None, dedup_since=dedup_since)
        except (StoreError, OSError, MediaError) as exc:
            await asyncio.to_thread(self.spool.remove, message_id)
            await self._forget_upload(upload, shared_key, message_id)
            if (refusal := self.durability_check()) is not None:
                raise Refused(refusal) from exc  # the database is gone or damaged: said once
            log.error("job store write failed for message %s: %s", message_id, exc)
            raise Refused(replies.CANNOT_QUEUE) from exc
        if earlier is not None:
            return await self._resent(message, earlier, shared_key)
        crash_point("after-commit")
        for job in jobs:
            log.info("job %s: accepted to %s, %d page(s), message %s from %s (peer %s)",
                     job.id, job.to_number, document.pages, message_id,
                     one_line(message.report_to or "-", 120), peer or "-")
        self.on_new_jobs()
        self.metrics.mail_accepted(len(jobs))
        if self.settings.reports.accepted and message.report_to and self.notifier is not None:
            self._background(self._send_receipts(message, [j.id for j in jobs]))
        return Accepted(message_id, tuple(j.id for j in jobs), document.pages)

    def _spool_file(self, pdf: Path, message_id: str, keep: bool = False) -> Path:
        """Move the worker's fsync'ed PDF into the spool and fsync the directory (blocking);
        `keep`: link it instead (the media store's PUT is reading it meanwhile; the caller
        removes the worker's name). A spool on another file system, or one without hard
        links, gets a durable copy instead."""
        final = self.spool.path_for(message_id)
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            (os.link if keep else os.replace)(pdf, final)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            copy_durable(pdf, final)
            return final
        fsync_dir(final.parent)
        return final

    async def _forget_upload(self, upload: asyncio.Future[None] | None, key: str | None,
                             message_id: str) -> None:
        """The mail was not accepted after all: its concurrent PUT, if it got through, leaves
        no orphan in the media store (best effort)."""
        if upload is None or key is None:
            return
        try:
            await asyncio.shield(upload)
        except (MediaError, OSError):
            return  # nothing stored
        except asyncio.CancelledError:
            if not upload.cancelled():
                raise
            return
        await self._delete_shared(key, f"message {message_id} not accepted")

    async def _delete_shared(self, key: str, what: str) -> None:
        assert self.media is not None
        try:
            await self.media.delete(key)
        except MediaError as exc:  # an orphan object costs storage, not a second fax
            log.warning("%s: its copy in the media store was not deleted: %s", what, exc)

    async def _resent(self, message: Message, job_ids: list[str],
                      shared_key: str | None) -> Accepted:
        """The mail was accepted before (the commit found its jobs): nothing new is kept."""
        await asyncio.to_thread(self.spool.remove, message.id)
        if shared_key is not None:
            await self._delete_shared(
                shared_key, f"message {one_line(message.message_id_header or '-', 200)} resent")
        log.info("message %s resent (same Message-ID and document): already jobs %s",
                 one_line(message.message_id_header or "-", 200), ", ".join(job_ids))
        return Accepted("", tuple(job_ids), message.pages, duplicate=True)

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _report_refusal(self, path: Path, envelope_from: str | None,
                              client: Client | None, numbers: Sequence[str], reason: str,
                              charge: asyncio.Future[Reply | None] | None) -> None:
        """Tell an authorised sender why their mail cannot be faxed (a scanner shows no SMTP
        error to the person at it). Strangers never get here: they are refused at MAIL. A
        sender over the rate limits gets that refusal instead, and no mail (as before the
        conversion started)."""
        await _charged(charge)
        if self.notifier is None or client is None or not self.settings.reports.refusals:
            return
        try:
            head = await asyncio.to_thread(_read_head, path, HEAD_BYTES)
        except OSError as exc:
            log.warning("refusal report not sent: cannot read the message back: %s", exc)
            return
        target = self._refusal_target(head, envelope_from, client)
        if target is None or target["to"] is None:
            return
        refusal = build_refusal(
            to=target["to"], numbers=numbers, reason=reason, subject=target["subject"] or "",
            original_msgid=target["msgid"], from_addr=self.settings.notify.sender,
            hostname=self.settings.smtp.hostname, now=self.clock(), templates=self.templates)
        self._background(self._send_refusal(refusal, target["to"]))

    def _refusal_target(self, head: bytes, envelope_from: str | None,
                        client: Client | None) -> dict[str, str | None] | None:
        """Where a refusal may go ({to, subject, msgid}), or None: only to an authorised
        sender, not when the From: header is one that sender may not use, and never into the
        fax domain (it would be faxed)."""
        if client is None:
            return None
        headers = BytesHeaderParser(policy=policy.default).parsebytes(head)
        header_from = str(headers.get("From", "") or "")
        user = client.user
        to = (user.report_to if user and user.report_to else None) or \
            _address(header_from) or _address(envelope_from or "")
        if not to or (self.access is not None
                      and self.access.check_header_from(client, header_from)):
            return None
        if in_domain(to, self.settings.fax.domain):
            log.warning("refusal report not sent: %s is in the fax domain", one_line(to, 120))
            return None
        return {"to": to,
                "subject": one_line(str(headers.get("Subject", "") or ""), 200),
                "msgid": str(headers.get("Message-ID", "") or "").strip() or None}

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
            receipt = build_receipt(job, message, from_addr=self.settings.notify.sender,
                                    hostname=self.settings.smtp.hostname, now=self.clock(),
                                    templates=self.templates)
            try:
                await self.notifier.send(receipt, f"{job_id}.accepted")
            except NotifyError as exc:
                log.warning("job %s: accepted receipt not sent: %s", job_id, exc)


async def _charged(charge: asyncio.Future[Reply | None] | None) -> None:
    """Wait for the rate limits' answer; RateRefused when it is no. Shielded: a mail whose
    session ends meanwhile leaves the charge to be given back (Access.give_back)."""
    if charge is not None and (refusal := await asyncio.shield(charge)) is not None:
        raise RateRefused(refusal)


def _read_head(path: Path, max_bytes: int) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(max_bytes)


async def expire_partials(settings: Settings, notifier: Notifier | None, now: float,
                          store: Store | None = None, media: MediaStore | None = None) -> int:
    """Housekeeping: split mails whose parts did not all arrive in PARTIAL_TIMEOUT_MINUTES.

    Each is logged and deleted; its sender, when it was allowed a refusal mail at the time,
    is told which parts were missing: one mail per sender and sweep, however many of their
    sets expired. `store` and `media`: where the parts are kept (every node's; the node
    holding the housekeeping lease sweeps them); without them only the sets an earlier
    version left in this node's DATA_DIR are swept. Returns how many sets expired.
    """
    minutes = settings.documents.partial_timeout_minutes
    legacy = partial_store(settings)
    count = 0
    for found in await asyncio.to_thread(legacy.expired, now, minutes * 60):
        await _expired_notice(settings, notifier, now, found.key, found.meta,
                              [(found.numbers, found.total)])
        await asyncio.to_thread(legacy.discard, found.key)
        count += 1
    if store is None or media is None:
        return count
    partials = Partials(store, media, settings.cluster.node_id,
                        settings.documents.partial_max_sets_per_sender)
    expired: list[Expired] = await partials.expire(now, minutes * 60)
    for sender in expired:
        # The notice goes where a set says it may (one sent while the sender may have been
        # refused mail does not say so).
        sets = sorted(sender.sets, key=lambda s: not s.meta.get("report"))
        await _expired_notice(settings, notifier, now, sets[0].set_id, sets[0].meta,
                              [(s.numbers, s.total) for s in sets])
        count += len(sender.sets)
    return count


async def _expired_notice(settings: Settings, notifier: Notifier | None, now: float, key: str,
                          meta: dict[str, Any],
                          sets: list[tuple[tuple[int, ...], int | None]]) -> None:
    """Log the sets of one sender that expired, and tell the sender once (`meta`: the first
    set's, which says whether and where)."""
    minutes = settings.documents.partial_timeout_minutes
    numbers, total = sets[0]
    missing = [n for n in range(1, total + 1) if n not in numbers] if total else None
    reason = (f"Your scan was sent in parts (message/partial), but only {len(numbers)} "
              f"of {total or '?'} part(s) arrived within {minutes} minutes"
              + (f" (missing: {', '.join(map(str, missing[:20]))})" if missing else
                 " (the last part, which says how many there are, never came)")
              + "; nothing was faxed, please send it again")
    if len(sets) > 1:
        reason += (f". {len(sets) - 1} other scan(s) you sent in parts did not arrive "
                   "complete either; please send them again too")
    target = meta.get("report")
    told = bool(target and notifier is not None and settings.reports.refusals)
    log.warning("message/partial %s from %s: %d of %s part(s) after %d minutes; discarded%s%s",
                key[:12], one_line(str(meta.get("envelope_from")), 120), len(numbers),
                total or "?", minutes,
                f" (and {len(sets) - 1} other set(s) of this sender)" if len(sets) > 1 else "",
                ", sender told" if told else "")
    if not told:
        return
    assert target is not None and notifier is not None
    refusal = build_refusal(
        to=target["to"], numbers=meta.get("numbers") or [], reason=reason,
        subject=target.get("subject") or "", original_msgid=target.get("msgid"),
        from_addr=settings.notify.sender, hostname=settings.smtp.hostname, now=now,
        templates=Templates(settings.reports.template_dir))
    try:
        await notifier.send(refusal, f"partial-{key[:16]}")
    except NotifyError as exc:  # the parts go anyway: they can never be completed
        log.warning("message/partial %s: refusal to %s not sent: %s", key[:12],
                    one_line(target["to"], 120), exc)
