"""The SMTP edge: aiosmtpd on the daemon's own loop, every hook answering with an exact code.

Who may send is settled at MAIL (AUTH, trusted network, allowed sender), each recipient at RCPT
(relay denied, bad number, blocked destination, rate limit), so a sender learns of a problem
before sending the document; the document is checked and queued at DATA time. Scanner quirks
handled here: lower-case AUTH mechanisms, `AUTH LOGIN <user>` initial responses, the
`Username:` / `Password:` prompts some devices insist on, and a 535 (never silence) for a wrong
password.
"""

from __future__ import annotations

import asyncio
import binascii
import logging
from base64 import b64decode
from typing import Any

from aiosmtpd.smtp import MISSING, SMTP, Envelope, Session

from gateway.smtp.access import Access, Client
from gateway.config import HostPort, Settings
from gateway.constants import MAX_RCPT_ADDRESS_CHARS, SMTP_LINE_TIMEOUT_S
from gateway.smtp.intake import Intake, Refused
from gateway.ops.metrics import Metrics
from gateway.phone import NumberError, parse_fax_number, parse_recipient
from gateway.smtp.tls import ReloadableTLS

log = logging.getLogger(__name__)

SHUTDOWN_REPLY = "421 4.3.2 The fax gateway is shutting down; please try again later"
AUTH_OK = "235 2.7.0 Authentication successful"
AUTH_FAILED = "535 5.7.8 Authentication credentials invalid"
MAX_CREDENTIAL_CHARS = 1024


def _b64_text(blob: bytes | str) -> str | None:
    try:
        raw = b64decode(blob, validate=True)
        return raw.decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None


class FaxHandler:
    """aiosmtpd handler hooks; the client and the numbers ride along on the envelope."""

    def __init__(self, settings: Settings, intake: Intake, access: Access,
                 metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.intake = intake
        self.access = access
        self.metrics = metrics or Metrics(process=False)
        self.accepting = True

    async def handle_PROXY(self, server: SMTP, session: Session, envelope: Envelope,
                           proxy_data: Any) -> bool:
        """SMTP_PROXY_PROTOCOL: a well-formed header from the load balancer names the client."""
        return bool(proxy_data and proxy_data.valid)

    def _refused(self, reason: str, reply: str) -> str:
        self.metrics.mail_refused(reason)
        return reply

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        if not self.access.auth_enabled:
            # No users file: no AUTH to offer (aiosmtpd would list its built-in mechanisms).
            responses = [r for r in responses if not r[4:].upper().startswith("AUTH")]
        return responses

    async def handle_AUTH(self, server: SMTP, session: Session, envelope: Envelope,
                          args: list[str]) -> str | None:
        ip = _peer(session)
        if not self.access.auth_enabled:
            return "504 5.5.4 Authentication is not offered here"
        locked = await self.access.locked_out(ip)
        if locked:
            return (f"454 4.7.0 Too many failed logins from {ip}; try again in "
                    f"{max(1, int(locked // 60))} minute(s)")
        mechanism = args[0].upper()
        initial = args[1] if len(args) > 1 else None
        if mechanism == "PLAIN":
            blob = initial if initial not in (None, "=") else None
            if blob is None:
                answer = await server.challenge_auth("", encode_to_b64=False)
                if answer is MISSING:
                    return None  # aborted with '*': aiosmtpd answered 501
                credentials = answer.decode("utf-8", "replace") if isinstance(answer, bytes) \
                    else None
            else:
                credentials = _b64_text(blob)
            parts = credentials.split("\0") if credentials is not None else []
            if len(parts) != 3:
                return "501 5.5.2 Malformed AUTH PLAIN response"
            username, password = parts[1] or parts[0], parts[2]
        elif mechanism == "LOGIN":
            if initial is not None:
                username = _b64_text(initial) or ""
            else:
                answer = await server.challenge_auth("Username:")
                if answer is MISSING:
                    return None
                username = answer.decode("utf-8", "replace") if isinstance(answer, bytes) else ""
            answer = await server.challenge_auth("Password:")
            if answer is MISSING:
                return None
            password = answer.decode("utf-8", "replace") if isinstance(answer, bytes) else ""
        else:
            return "504 5.5.4 Unrecognized authentication type (use PLAIN or LOGIN)"
        if len(username) > MAX_CREDENTIAL_CHARS or len(password) > MAX_CREDENTIAL_CHARS:
            return AUTH_FAILED
        user = await self.access.login(ip, username, password)
        if user is None:
            return AUTH_FAILED
        session.authenticated = True
        session.auth_data = user
        return AUTH_OK

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        if not self.accepting:
            return self._refused("shutting_down", SHUTDOWN_REPLY)
        user = session.auth_data if session.authenticated else None
        client = self.access.client(_peer(session), user, address)
        refusal = self.access.check_mail(client)
        if refusal:
            return self._refused("auth" if refusal.startswith("530") else "policy", refusal)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        envelope.faxgw_client = client  # type: ignore[attr-defined]
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
            return self._refused("relay_denied", "550 5.7.1 Relaying denied: this gateway only "
                                 f"accepts mail for <number>@{self.settings.fax_domain}")
        if len(envelope.rcpt_tos) >= self.settings.smtp_max_recipients:
            return self._refused("too_many_recipients", "452 4.5.3 Too many recipients: at most "
                                 f"{self.settings.smtp_max_recipients} fax numbers per message")
        try:
            number = parse_fax_number(local, self.settings.default_region)
        except NumberError as exc:
            return self._refused("bad_number", f"553 5.1.3 {exc}")
        numbers = _numbers(envelope)
        if number in numbers:
            return f"250 2.1.5 Recipient OK (duplicate of {number}, faxed once)"
        refusal = await self.access.check_destination_async(_client(envelope), number)
        if refusal:
            return self._refused("rate_limited" if refusal.startswith("450") else "policy",
                                 refusal)
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
                                                _peer(session), _client(envelope))
        except Refused as exc:
            log.info("refused message from %s (peer %s): %s", envelope.mail_from,
                     _peer(session), exc.reply)
            reason = {"451": "temp_failure", "554": "bad_document"}.get(exc.reply[:3], "policy")
            return self._refused(reason, exc.reply)
        jobs = ", ".join(accepted.job_ids)
        if accepted.duplicate:
            return (f"250 2.0.0 Already queued as fax job{'s' if len(accepted.job_ids) > 1 else ''}"
                    f" {jobs} (the same mail was received before; not faxed twice)")
        return (f"250 2.0.0 Queued as fax job{'s' if len(accepted.job_ids) > 1 else ''} {jobs} "
                f"({accepted.pages} page{'s' if accepted.pages != 1 else ''})")


def _numbers(envelope: Envelope) -> list[str]:
    numbers = getattr(envelope, "fax_numbers", None)
    if numbers is None:
        numbers = []
        envelope.fax_numbers = numbers  # type: ignore[attr-defined]
    return numbers


def _client(envelope: Envelope) -> Client:
    client = getattr(envelope, "faxgw_client", None)
    assert client is not None, "RCPT/DATA before a successful MAIL"
    return client


def _peer(session: Session) -> str:
    proxied = getattr(session, "proxy_data", None)  # SMTP_PROXY_PROTOCOL: the real client
    if proxied is not None and getattr(proxied, "src_addr", None):
        return str(proxied.src_addr)
    peer: Any = session.peer
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return str(peer or "-")


class FaxSMTP(SMTP):
    """aiosmtpd's protocol with the gateway's quirks: 421 while shutting down, and AUTH
    mechanisms matched case-insensitively (aiosmtpd compares them as sent; some MFPs send
    `auth login`)."""

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

    async def smtp_DATA(self, arg: str) -> None:
        """DATA read in bulk up to the end marker, not line by line.

        aiosmtpd reads and joins the message one line at a time, which costs most of the
        loop's time on large scans and stalls it for a second at 20 MB. This keeps its replies
        (354, 503, 501, 552 after the data, 250 or the handler's answer) and its size limit,
        and lets StreamReader find the marker in C. Lines longer than 1000 octets are accepted
        rather than refused (RFC 5321 allows a server to).
        """
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None and self.session is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        limit = self.data_size_limit or 0
        reader = self._reader
        try:
            head = await reader.readexactly(3)
            if head == b".\r\n":
                raw = b""
            else:
                # Back into the buffer: the first line may itself end right before the marker.
                reader._buffer[0:0] = head
                saved = reader._limit  # one message may be as long as the size limit allows
                reader._limit = limit + 8 if limit else 2 ** 31
                try:
                    raw = await reader.readuntil(b"\r\n.\r\n")
                finally:
                    reader._limit = saved
                raw = raw[:-3]  # keep the last line's CRLF, drop ".\r\n"
        except asyncio.LimitOverrunError:
            await self._discard_data()
            await self.push("552 Error: Too much mail data")
            self._set_post_data_state()
            return
        except asyncio.IncompleteReadError:
            return  # the client went away in the middle of the message
        if limit and len(raw) > limit:
            await self.push("552 Error: Too much mail data")
            self._set_post_data_state()
            return
        # RFC 5321 4.5.2: a leading dot was doubled by the client.
        content = raw.replace(b"\r\n..", b"\r\n.")
        if content.startswith(b".."):
            content = content[1:]
        self.envelope.content = content
        self.envelope.original_content = content
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()
        await self.push("250 OK" if status is MISSING else status)

    async def _discard_data(self) -> None:
        """Read and drop the rest of an oversized message, up to its end marker."""
        tail = b""
        while True:
            chunk = await self._reader.read(65536)
            if not chunk:
                return
            window = tail + chunk
            if b"\r\n.\r\n" in window:
                return
            tail = window[-4:]

    async def smtp_AUTH(self, arg: str) -> None:
        mechanism, sep, rest = (arg or "").partition(" ")
        await super().smtp_AUTH(mechanism.upper() + sep + rest)

    @property
    def in_transaction(self) -> bool:
        """Between MAIL and the end of DATA (aiosmtpd resets the envelope after DATA/RSET)."""
        return self.envelope is not None and self.envelope.mail_from is not None

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class SMTPListener:
    """One listening socket, aiosmtpd's protocol on the running loop (no second loop/thread).

    `implicit_tls`: TLS from the first byte (port 465 style); otherwise plain with STARTTLS
    offered when a certificate is configured.
    """

    def __init__(self, settings: Settings, handler: FaxHandler, listen: HostPort,
                 tls: ReloadableTLS | None = None, implicit_tls: bool = False) -> None:
        self.settings = settings
        self.handler = handler
        self.listen = listen
        self.tls = tls
        self.implicit_tls = implicit_tls
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[FaxSMTP] = set()

    def _factory(self) -> SMTP:
        s = self.settings
        return FaxSMTP(
            self.handler, self._connections, data_size_limit=s.smtp_max_message_bytes,
            enable_SMTPUTF8=True, hostname=s.smtp_hostname, ident="faxgw ESMTP",
            timeout=SMTP_LINE_TIMEOUT_S,
            proxy_protocol_timeout=SMTP_LINE_TIMEOUT_S if s.smtp_proxy_protocol else None,
            tls_context=None if self.implicit_tls or self.tls is None else self.tls.context,
            require_starttls=bool(self.tls) and not self.implicit_tls and s.smtp_require_tls,
            # aiosmtpd does not see implicit TLS as TLS: AUTH must be allowed there explicitly.
            auth_require_tls=not (self.implicit_tls or s.smtp_auth_plaintext))

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        ssl = self.tls.context if self.implicit_tls and self.tls is not None else None
        self._server = await loop.create_server(self._factory, host=self.listen.host,
                                                port=self.listen.port, ssl=ssl)

    @property
    def bound(self) -> bool:
        return self._server is not None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self, grace_s: float) -> None:
        """Refuse new sessions and transactions with 421, let open transactions finish (up to
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
