"""The SMTP edge: aiosmtpd on the daemon's own loop, every hook answering with an exact code.

Recipients are checked at RCPT time (relay denied, bad number) so a sender learns about a typo
before sending the document; the document is checked and queued at DATA time.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from .config import Settings
from .constants import MAX_RCPT_ADDRESS_CHARS, SMTP_LINE_TIMEOUT_S
from .intake import Intake, Refused
from .phone import NumberError, parse_fax_number, parse_recipient

log = logging.getLogger(__name__)

SHUTDOWN_REPLY = "421 4.3.2 The fax gateway is shutting down; please try again later"


class FaxHandler:
    """aiosmtpd handler hooks; the normalised numbers ride along on the envelope."""

    def __init__(self, settings: Settings, intake: Intake) -> None:
        self.settings = settings
        self.intake = intake
        self.accepting = True

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        if not self.accepting:
            return SHUTDOWN_REPLY
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        _numbers(envelope).clear()
        return "250 2.1.0 Sender OK"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        if len(address) > MAX_RCPT_ADDRESS_CHARS:
            return "501 5.1.3 Recipient address too long"
        try:
            local, domain = parse_recipient(address, self.settings.fax_domain)
        except ValueError:
            return "553 5.1.3 Recipient address is not of the form number@domain"
        if domain != self.settings.fax_domain:
            log.warning("relay denied: %s from %s to domain %s", _peer(session),
                        envelope.mail_from, domain[:100])
            return (f"550 5.7.1 Relaying denied: this gateway only accepts mail for "
                    f"<number>@{self.settings.fax_domain}")
        if len(envelope.rcpt_tos) >= self.settings.smtp_max_recipients:
            return (f"452 4.5.3 Too many recipients: at most "
                    f"{self.settings.smtp_max_recipients} fax numbers per message")
        try:
            number = parse_fax_number(local, self.settings.default_region)
        except NumberError as exc:
            return f"553 5.1.3 {exc}"
        numbers = _numbers(envelope)
        if number in numbers:
            return f"250 2.1.5 Recipient OK (duplicate of {number}, faxed once)"
        numbers.append(number)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return f"250 2.1.5 Recipient OK, fax to {number}"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        numbers = list(_numbers(envelope))
        if not numbers:
            return "554 5.5.1 No valid fax recipients"
        content = envelope.original_content or b""
        try:
            accepted = await self.intake.accept(content, envelope.mail_from, numbers,
                                                _peer(session))
        except Refused as exc:
            log.info("refused message from %s (peer %s): %s", envelope.mail_from,
                     _peer(session), exc.reply)
            return exc.reply
        jobs = ", ".join(accepted.job_ids)
        return (f"250 2.0.0 Queued as fax job{'s' if len(accepted.job_ids) > 1 else ''} {jobs} "
                f"({accepted.pages} page{'s' if accepted.pages != 1 else ''})")


def _numbers(envelope: Envelope) -> list[str]:
    numbers = getattr(envelope, "fax_numbers", None)
    if numbers is None:
        numbers = []
        envelope.fax_numbers = numbers  # type: ignore[attr-defined]
    return numbers


def _peer(session: Session) -> str:
    peer: Any = session.peer
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return str(peer or "-")


class FaxSMTP(SMTP):
    """aiosmtpd's protocol, answering new connections with 421 while the gateway shuts down."""

    def __init__(self, handler: FaxHandler, connections: set["FaxSMTP"], **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._connections = connections

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._connections.add(self)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        self._connections.discard(self)
        super().connection_lost(error)

    async def _handle_client(self) -> None:
        # aiosmtpd sends its 220 greeting in _handle_client; this is the one place to refuse.
        if not self.event_handler.accepting:
            await self.push(SHUTDOWN_REPLY)
            if self.transport is not None:
                self.transport.close()
            return
        await super()._handle_client()

    @property
    def in_transaction(self) -> bool:
        """Between MAIL and the end of DATA (aiosmtpd resets the envelope after DATA/RSET)."""
        return self.envelope is not None and self.envelope.mail_from is not None

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class SMTPListener:
    """One listening socket, aiosmtpd's protocol on the running loop (no second loop/thread)."""

    def __init__(self, settings: Settings, handler: FaxHandler) -> None:
        self.settings = settings
        self.handler = handler
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[FaxSMTP] = set()

    def _factory(self) -> SMTP:
        return FaxSMTP(self.handler, self._connections,
                       data_size_limit=self.settings.smtp_max_message_bytes,
                       enable_SMTPUTF8=True, hostname=self.settings.smtp_hostname,
                       ident="faxgw ESMTP", timeout=SMTP_LINE_TIMEOUT_S)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        listen = self.settings.smtp_listen
        self._server = await loop.create_server(self._factory, host=listen.host,
                                                port=listen.port)

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self, grace_s: float) -> None:
        """Refuse new sessions and transactions with 421, let DATA in progress finish (up to
        grace_s), then close every connection."""
        self.handler.accepting = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while any(c.in_transaction for c in self._connections):
            if loop.time() >= deadline:
                log.warning("SMTP: closing %d session(s) still in a transaction after %.0f s",
                            sum(c.in_transaction for c in self._connections), grace_s)
                break
            await asyncio.sleep(0.05)  # shutdown only: checks open transactions 20 times a second
        if self._server is not None:
            self._server.close()
            self._server = None
        for conn in list(self._connections):
            conn.close()
