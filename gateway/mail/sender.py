"""Report delivery: through an SMTP relay (aiosmtplib), or as .eml files in an outbox folder."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import Sequence
from email.message import EmailMessage
from pathlib import Path
from typing import Protocol

import aiosmtplib
from aiosmtplib.email import quote_address
from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings

from gateway import defaults
from gateway.config import Settings
from gateway.mail.outgoing import MAIL_POLICY, Rendered, render
from gateway.spool import fsync_dir, write_temp

__all__ = ["MAIL_POLICY", "MAX_OUTBOX_COPIES", "Notifier", "NotifyError", "OutboxNotifier",
           "RelayNotifier", "Rendered", "render", "write_new"]

log = logging.getLogger(__name__)


class NotifyError(Exception):
    """The report could not be handed over (an outage: retried with backoff)."""


class Notifier(Protocol):
    async def send(self, report: EmailMessage, name: str, bcc: Sequence[str] = ()) -> str: ...

    async def send_rendered(self, rendered: Rendered, name: str) -> str: ...

    async def stop(self) -> None: ...


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
        # Off the loop: a postmaster forward holds up to 10 MiB, a DSN up to 1 MiB of mail.
        return await self.send_rendered(await asyncio.to_thread(render, report, bcc), name)

    async def send_rendered(self, rendered: Rendered, name: str) -> str:
        """Bcc has no meaning for files; copies for the admin need a relay."""
        try:
            path = await asyncio.to_thread(write_new, self.root, name, rendered.data, 0o640)
        except OSError as exc:
            raise NotifyError(f"outbox write failed: {exc.strerror or exc}") from exc
        return f"written to {path}"

    async def stop(self) -> None:
        return None


class RelayNotifier:
    """Reports through the SMTP relay, on connections kept open between reports.

    A burst of reports goes over a few connections instead of one each: no TCP, EHLO,
    STARTTLS handshake, AUTH and QUIT per report (for the relay too). A connection unused
    for RELAY_IDLE_S is closed with QUIT; at most RELAY_CONNECTIONS wait. One taken up again
    is checked with NOOP first, so a connection the relay dropped while it waited costs a new
    connection, never a report: nothing of the mail was sent on it yet."""

    def __init__(self, settings: Settings, timeout_s: float,
                 idle_s: float = defaults.RELAY_IDLE_S,
                 keep: int = defaults.RELAY_CONNECTIONS) -> None:
        self.settings = settings
        self.timeout_s = timeout_s
        self.idle_s = idle_s
        self.keep = keep
        self._idle: list[tuple[aiosmtplib.SMTP, asyncio.TimerHandle]] = []
        self.connections_made = 0  # for tests and metrics: how often a new one was needed

    async def send(self, report: EmailMessage, name: str, bcc: Sequence[str] = ()) -> str:
        # Off the loop: a postmaster forward holds up to 10 MiB, a DSN up to 1 MiB of mail.
        return await self.send_rendered(await asyncio.to_thread(render, report, bcc), name)

    async def send_rendered(self, rendered: Rendered, name: str) -> str:
        s = self.settings
        client: aiosmtplib.SMTP | None = None
        try:
            client = await self._mail_from(rendered)
            errors, reply = await self._rest(client, rendered)
        except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
            if client is not None:
                client.close()  # in an unknown state: never used again
            raise NotifyError(f"relay {s.notify.host}:{s.notify.port}: "
                              f"{type(exc).__name__}: {str(exc)[:200]}") from exc
        except BaseException:
            if client is not None:
                client.close()
            raise
        self._give_back(client)
        if errors:
            raise NotifyError(f"relay refused recipients: {sorted(errors)}")
        return f"relayed via {s.notify.host}: {reply[:120]}"

    async def _mail_from(self, rendered: Rendered) -> aiosmtplib.SMTP:
        """A connection on which MAIL FROM was accepted: a waiting one, else a new one.

        MAIL is what tells whether a waiting connection still answers (the relay may have
        dropped it at its idle timeout, perhaps with a 421 that is read as MAIL's reply);
        nothing of the mail was sent on it yet, so a new connection is taken then and no
        report is lost or sent twice. (A NOOP before each report told the same at the cost
        of a round trip; and aiosmtplib's sendmail normalises the line endings of the whole
        report twice when the relay offers SIZE: the transaction is written out here.)"""
        s = self.settings
        while True:
            client, reused = await self._take()
            # RFC 1870 SIZE, once the connection's EHLO told us it is offered (the first mail
            # on a connection goes without: SIZE is optional). The report is written with CRLF.
            size = ([f"SIZE={len(rendered.data)}"] if not client.is_ehlo_or_helo_needed
                    and client.supports_extension("size") else [])
            try:
                await _mail(client, s.notify.sender, size, self.timeout_s)
                return client
            except (TimeoutError, aiosmtplib.SMTPServerDisconnected,
                    aiosmtplib.SMTPResponseException, OSError) as exc:
                client.close()
                stale = (not isinstance(exc, aiosmtplib.SMTPResponseException)
                         or exc.code == 421)  # "closing the connection"
                if not (reused and stale):
                    raise
            except BaseException:
                client.close()
                raise

    async def _rest(self, client: aiosmtplib.SMTP,
                    rendered: Rendered) -> tuple[dict[str, aiosmtplib.SMTPResponse], str]:
        """RCPT for each recipient and DATA, as aiosmtplib's sendmail does after MAIL: the
        refused recipients, and the relay's reply to the message."""
        errors: dict[str, aiosmtplib.SMTPResponse] = {}
        refusals: list[aiosmtplib.SMTPRecipientRefused] = []
        for recipient in rendered.recipients:
            try:
                await _rcpt(client, recipient, self.timeout_s)
            except aiosmtplib.SMTPRecipientRefused as exc:
                errors[recipient] = aiosmtplib.SMTPResponse(exc.code, exc.message)
                refusals.append(exc)
        if len(refusals) == len(rendered.recipients):
            raise aiosmtplib.SMTPRecipientsRefused(refusals)
        response = await _data(client, rendered.data, self.timeout_s)
        return errors, response.message

    async def _take(self) -> tuple[aiosmtplib.SMTP, bool]:
        """A waiting connection (True), else a new one (False)."""
        while self._idle:
            client, timer = self._idle.pop()
            timer.cancel()
            if client.is_connected:
                return client, True
            client.close()
        s = self.settings
        client = aiosmtplib.SMTP(
            hostname=s.notify.host, port=s.notify.port,
            username=s.notify.username, password=s.notify.password,
            use_tls=s.notify.tls == "tls", start_tls=s.notify.tls == "starttls",
            timeout=self.timeout_s)
        self.connections_made += 1
        await client.connect()
        return client, False

    def _give_back(self, client: aiosmtplib.SMTP) -> None:
        if len(self._idle) >= self.keep or not client.is_connected:
            self._quit_later(client)
            return
        timer = asyncio.get_running_loop().call_later(self.idle_s, self._expire, client)
        self._idle.append((client, timer))

    def _expire(self, client: aiosmtplib.SMTP) -> None:
        self._idle = [(c, t) for c, t in self._idle if c is not client]
        self._quit_later(client)

    def _quit_later(self, client: aiosmtplib.SMTP) -> None:
        task = asyncio.ensure_future(_quit(client, self.timeout_s))
        _QUITTING.add(task)
        task.add_done_callback(_QUITTING.discard)

    async def stop(self) -> None:
        """Close the waiting connections (QUIT), as the daemon stops."""
        idle, self._idle = self._idle, []
        for _, timer in idle:
            timer.cancel()
        await asyncio.gather(*(_quit(c, min(self.timeout_s, 5.0)) for c, _ in idle))


_QUITTING: set[asyncio.Future[None]] = set()


@functools.lru_cache(maxsize=256)
def _path(address: str) -> bytes:
    """An address as MAIL FROM and RCPT TO carry it, written as aiosmtplib's `mail` and `rcpt`
    write it (quote_address, ASCII), which parses it with email.utils for every command: the
    sender is the same for every report, and the recipients are the same few senders."""
    return quote_address(address).encode("ascii")


async def _hello(client: aiosmtplib.SMTP) -> None:
    """EHLO (HELO if EHLO is refused) on a connection that has not said it yet, as aiosmtplib
    does before MAIL and RCPT."""
    if client.is_ehlo_or_helo_needed:
        try:
            await client.ehlo()
        except aiosmtplib.SMTPHeloError:
            if not client.is_connected:
                raise
            await client.helo()


async def _mail(client: aiosmtplib.SMTP, sender: str, options: list[str],
                timeout_s: float) -> aiosmtplib.SMTPResponse:
    """aiosmtplib's SMTP.mail, the sender's path written once (`_path`)."""
    await _hello(client)
    response = await client.execute_command(
        b"MAIL", b"FROM:" + _path(sender), *(o.encode("ascii") for o in options),
        timeout=timeout_s)
    if response.code != aiosmtplib.SMTPStatus.completed:
        raise aiosmtplib.SMTPSenderRefused(response.code, response.message, sender)
    return response


async def _rcpt(client: aiosmtplib.SMTP, recipient: str,
                timeout_s: float) -> aiosmtplib.SMTPResponse:
    """aiosmtplib's SMTP.rcpt, the recipient's path written once per address (`_path`)."""
    await _hello(client)
    response = await client.execute_command(b"RCPT", b"TO:" + _path(recipient),
                                            timeout=timeout_s)
    if response.code not in (aiosmtplib.SMTPStatus.completed,
                             aiosmtplib.SMTPStatus.will_forward):
        raise aiosmtplib.SMTPRecipientRefused(response.code, response.message, recipient)
    return response


def on_the_wire(data: bytes) -> bool:
    """Whether `data` goes through DATA as it is: CRLF line endings only (no lone CR or LF),
    a CRLF at the end, and no line that starts with a "." (RFC 5321 4.5.2 would double it).
    What `render` writes, as a rule; a few scans of the bytes in C, no copy."""
    crlf = data.count(b"\r\n")
    return (data.endswith(b"\r\n") and data.count(b"\r") == crlf
            and data.count(b"\n") == crlf and not data.startswith(b".")
            and b"\n." not in data)


async def _data(client: aiosmtplib.SMTP, data: bytes,
                timeout_s: float) -> aiosmtplib.SMTPResponse:
    """DATA, the message and its end marker, with aiosmtplib's replies and errors
    (SMTP.data): the message is written as it is when it is `on_the_wire` already, instead
    of aiosmtplib's two regex passes and a copy over the whole report on the event loop
    (execute_data_command normalises the line endings and doubles leading dots every time:
    ~2% of the loop's CPU per fax). Anything else gets aiosmtplib's own treatment."""
    response = await client.execute_command(b"DATA", timeout=timeout_s)
    if response.code != aiosmtplib.SMTPStatus.start_input:
        raise aiosmtplib.SMTPDataError(response.code, response.message)
    protocol = client.protocol
    if protocol is None:  # the relay closed meanwhile (a 421 closes it in execute_command)
        raise aiosmtplib.SMTPServerDisconnected("Connection lost")
    if not on_the_wire(data):
        data = PERIOD_REGEX.sub(b"..", normalize_message_line_endings(data))
    try:
        protocol.write(data + b".\r\n")
        # The connection is this report's alone (taken from the pool, nothing else writes on
        # it), as aiosmtplib's command lock would make it.
        response = await protocol.read_response(timeout=timeout_s)
    except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError):
        client.close()
        raise
    if response.code != aiosmtplib.SMTPStatus.completed:
        raise aiosmtplib.SMTPDataError(response.code, response.message)
    return response


async def _quit(client: aiosmtplib.SMTP, timeout_s: float) -> None:
    try:
        await client.quit(timeout=timeout_s)
    except (TimeoutError, aiosmtplib.SMTPException, OSError):
        client.close()
