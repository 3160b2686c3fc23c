"""Report delivery: through an SMTP relay (aiosmtplib), or as .eml files in an outbox folder."""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import getaddresses
from pathlib import Path
from typing import Protocol, Sequence

import aiosmtplib

from gateway.config import Settings
from gateway.store.spool import fsync_dir, write_temp

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rendered:
    """A report ready for the wire: CRLF bytes and the envelope recipients."""

    data: bytes
    recipients: tuple[str, ...]


def render(report: EmailMessage, bcc: Sequence[str] = ()) -> Rendered:
    """Serialise with the report's own policy (unfolded headers), not aiosmtplib's. Bcc
    recipients are envelope-only: no header shows them to the sender."""
    data = report.as_bytes(policy=report.policy.clone(linesep="\r\n"))
    recipients = [a for _, a in getaddresses(report.get_all("To", []))] + list(bcc)
    return Rendered(data, tuple(recipients))


class NotifyError(Exception):
    """The report could not be handed over (an outage: retried with backoff)."""


class Notifier(Protocol):
    async def send(self, report: EmailMessage, name: str, bcc: Sequence[str] = ()) -> str: ...

    async def send_rendered(self, rendered: Rendered, name: str) -> str: ...


MAX_OUTBOX_COPIES = 1000


def write_new(root: Path, name: str, data: bytes, mode: int = 0o640) -> Path:
    """Write `data` durably as `<name>.eml`, or `<name>-2.eml`, `<name>-3.eml`... when that
    exists: an earlier report is never overwritten. The file is complete before it has its
    name (written under a temporary name, fsync'ed, then hard-linked, which fails rather than
    replaces), so a reader of the outbox never sees half a report."""
    tmp = write_temp(root, name, data, mode)
    try:
        for n in range(1, MAX_OUTBOX_COPIES + 1):
            path = root / (f"{name}.eml" if n == 1 else f"{name}-{n}.eml")
            try:
                os.link(tmp, path)
            except FileExistsError:
                continue
            break
        else:
            raise OSError(f"{MAX_OUTBOX_COPIES} copies of {name}.eml already in the outbox")
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(root)
    return path


class OutboxNotifier:
    """Sandbox and relay-less installs: each report is a file, named by job, written durably.

    A report sent again (`faxgw report`, or after a crash between writing it and recording
    it, as a relay would deliver it twice too) is kept beside the first as `<job>-2.eml`:
    the outbox is a record of what was sent, and nothing in it is overwritten.
    """

    def __init__(self, root: Path) -> None:
        self.root = root

    async def send(self, report: EmailMessage, name: str, bcc: Sequence[str] = ()) -> str:
        return await self.send_rendered(render(report, bcc), name)

    async def send_rendered(self, rendered: Rendered, name: str) -> str:
        """Bcc has no meaning for files; copies for the admin need a relay."""
        try:
            path = await asyncio.to_thread(write_new, self.root, name, rendered.data, 0o640)
        except OSError as exc:
            raise NotifyError(f"outbox write failed: {exc.strerror or exc}") from exc
        return f"written to {path}"


class RelayNotifier:
    def __init__(self, settings: Settings, timeout_s: float) -> None:
        self.settings = settings
        self.timeout_s = timeout_s

    async def send(self, report: EmailMessage, name: str, bcc: Sequence[str] = ()) -> str:
        return await self.send_rendered(render(report, bcc), name)

    async def send_rendered(self, rendered: Rendered, name: str) -> str:
        s = self.settings
        try:
            errors, reply = await aiosmtplib.send(
                rendered.data, sender=s.notify_from, recipients=list(rendered.recipients),
                hostname=s.notify_smtp_host, port=s.notify_smtp_port,
                username=s.notify_smtp_username, password=s.notify_smtp_password,
                use_tls=s.notify_smtp_tls == "tls", start_tls=s.notify_smtp_tls == "starttls",
                timeout=self.timeout_s)
        except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError) as exc:
            raise NotifyError(f"relay {s.notify_smtp_host}:{s.notify_smtp_port}: "
                              f"{type(exc).__name__}: {str(exc)[:200]}") from exc
        if errors:
            raise NotifyError(f"relay refused recipients: {sorted(errors)}")
        return f"relayed via {s.notify_smtp_host}: {reply[:120]}"
