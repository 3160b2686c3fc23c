"""The SMTP edge: aiosmtpd on the daemon's own loop, every hook answering with an exact code.

Who may send is settled at MAIL (AUTH, trusted network, allowed sender), each recipient at RCPT
(relay denied, bad number, blocked destination, rate limit), so a sender learns of a problem
before sending the document; the document is checked and queued at DATA time. Scanner quirks
handled here: lower-case AUTH mechanisms, `AUTH LOGIN <user>` initial responses, the
`Username:` / `Password:` prompts some devices insist on, and a 535 (never silence) for a wrong
password. Every reply is a `replies.Reply`; the metrics take the refusal reason from it.

ESMTP as the relays in front of it speak it: PIPELINING (RFC 2920), ENHANCEDSTATUSCODES (RFC
2034: aiosmtpd's own replies get theirs in `push`), DSN (RFC 3461: RET, ENVID, NOTIFY, ORCPT)
and RFC 4954's `AUTH=` on MAIL, which aiosmtpd would answer with 555; see
gateway/smtp/esmtp_params.py.

Where aiosmtpd is extended beyond its handler hooks (DATA streamed to a file, AUTH mechanisms
matched case-insensitively, the 421 on timeouts, the connection caps, the DSN and AUTH=
parameters taken off MAIL and RCPT before aiosmtpd reads them), the code is fenced in
gateway/smtp/aiosmtpd_compat.py, and tests/test_smtp_hooks.py fails loudly if the methods and
attributes relied on change: aiosmtpd is pinned below 1.5.
"""

from __future__ import annotations

import asyncio
import binascii
import dataclasses
import logging
from base64 import b64decode
from typing import Any

from aiosmtpd.smtp import MISSING, SMTP, Envelope, Session, TLSSetupException

from gateway.config import HostPort, Settings
from gateway.constants import MAX_RCPT_ADDRESS_CHARS, SMTP_LINE_TIMEOUT_S
from gateway.phone import NumberError, parse_fax_number, parse_recipient
from gateway.runtime.metrics import Metrics
from gateway.smtp import esmtp_params as dsn
from gateway.smtp import replies
from gateway.smtp.access import Access, Client
from gateway.smtp.aiosmtpd_compat import (
    FaxEnvelope,
    FaxSMTP,
    _fax,
    _peer,
    aiosmtpd_handler,
)
from gateway.smtp.connections import AcceptErrors, ConnectionLimits
from gateway.smtp.data import Incoming
from gateway.smtp.intake import Intake, PartStored, RateRefused, Refused
from gateway.smtp.postmaster import SEPARATELY, Postmaster, is_postmaster
from gateway.smtp.replies import Reply
from gateway.smtp.tls import ReloadableTLS
from gateway.smtp.verify import SenderVerifier
from gateway.store.base import StoreError

log = logging.getLogger(__name__)

MAX_CREDENTIAL_CHARS = 1024


def _b64_text(blob: bytes | str) -> str | None:
    try:
        raw = b64decode(blob, validate=True)
        return raw.decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None


@aiosmtpd_handler
class FaxHandler:
    """aiosmtpd handler hooks; the client and the numbers ride along on the envelope.

    Shared by every listener, so the connection caps and the incoming directory are too."""

    def __init__(self, settings: Settings, intake: Intake, access: Access,
                 metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.intake = intake
        self.access = access
        self.metrics = metrics or Metrics(process=False)
        self.accepting = True
        self.incoming = Incoming(settings.queue.data_dir / "incoming")
        self.limits = ConnectionLimits(settings.smtp.max_connections,
                                       settings.smtp.max_connections_per_ip)
        self._accept_errors: AcceptErrors | None = None
        self._started = False
        self.verifier = SenderVerifier(settings)
        self.postmaster = Postmaster(settings, intake.notifier if intake is not None else None)

    def start(self) -> None:
        """Once, before the first listener binds: clear DATA_DIR/incoming of files a killed
        daemon left, and keep accept() failures out of the log's way."""
        if self._started:
            return
        self._started = True
        self.incoming.start()
        self._accept_errors = AcceptErrors(asyncio.get_running_loop())
        self._accept_errors.install()

    def stop(self) -> None:
        self.verifier.close()
        if self._accept_errors is not None:
            self._accept_errors.uninstall()
            self._accept_errors = None

    def refuse(self, reply: Reply) -> str:
        """Count a refusal under its reason and hand aiosmtpd its line."""
        if reply.metric_reason is not None:
            self.metrics.mail_refused(reply.metric_reason)
        return str(reply)

    async def handle_exception(self, error: Exception) -> str:
        """aiosmtpd calls this for an exception in a command. A failed TLS handshake (an old
        copier offering only what we refuse) is one line, not a traceback at ERROR."""
        if isinstance(error, TLSSetupException):
            cause = error.__cause__ or error.__context__
            log.warning("STARTTLS handshake failed: %s", cause or "connection closed")
            return str(replies.INTERNAL_ERROR)  # not sent: aiosmtpd closes the connection
        if isinstance(error, StoreError):  # the shared database did not answer a check
            log.warning("SMTP: %s; answered 451", error)
            return self.refuse(replies.DATABASE_UNAVAILABLE)
        log.error("SMTP session error", exc_info=error)
        return self.refuse(replies.INTERNAL_ERROR)

    async def handle_PROXY(self, server: SMTP, session: Session, envelope: Envelope,
                           proxy_data: Any) -> bool:
        """SMTP_PROXY_PROTOCOL: a well-formed header from the load balancer names the client."""
        return bool(proxy_data and proxy_data.valid)

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        if not self.access.auth_enabled:
            # No users file: no AUTH to offer (aiosmtpd would list its built-in mechanisms).
            responses = [r for r in responses if not r[4:].upper().startswith("AUTH")]
        if isinstance(server, FaxSMTP):
            server.allow_long_commands()
        # Before the last line ("250 HELP"): the extensions honoured beyond aiosmtpd's own.
        return [*responses[:-1], "250-PIPELINING", "250-DSN", "250-ENHANCEDSTATUSCODES",
                *responses[-1:]]

    async def handle_AUTH(self, server: SMTP, session: Session, envelope: Envelope,
                          args: list[str]) -> str | None:
        ip = _peer(session)
        if not self.access.auth_enabled:
            return str(replies.AUTH_NOT_OFFERED)
        locked = await self.access.locked_out(ip)
        if locked:
            return str(replies.auth_locked_out(ip, locked))
        mechanism = args[0].upper()
        initial = args[1] if len(args) > 1 else None
        if mechanism == "PLAIN":
            blob = initial if initial not in (None, "=") else None
            if blob is None:
                answer = await server.challenge_auth("", encode_to_b64=False)
                if answer is MISSING:
                    return None  # aborted with '*': aiosmtpd answered 501
                credentials: str | None = (answer.decode("utf-8", "replace")
                                           if isinstance(answer, bytes) else None)
            else:
                credentials = _b64_text(blob)
            parts = credentials.split("\0") if credentials is not None else []
            if len(parts) != 3:
                return str(replies.AUTH_MALFORMED_PLAIN)
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
            return str(replies.AUTH_UNKNOWN_MECHANISM)
        if len(username) > MAX_CREDENTIAL_CHARS or len(password) > MAX_CREDENTIAL_CHARS:
            return str(replies.AUTH_FAILED)
        user = await self.access.login(ip, username, password)
        if user is None:
            return str(replies.AUTH_FAILED)
        session.authenticated = True
        # aiosmtpd's Session.__init__ sets `auth_data = None` unannotated, so mypy types the
        # attribute as None; aiosmtpd itself stores any authenticator's result there.
        session.auth_data = user  # type: ignore[assignment]
        return str(replies.AUTH_OK)

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        if not self.accepting:
            return self.refuse(replies.SHUTTING_DOWN)
        user = session.auth_data if session.authenticated else None
        client = self.access.client(_peer(session), user, address)
        refusal = self.access.check_mail(client)
        if refusal:
            return self.refuse(refusal)
        params = dsn.parse_mail(_taken(server), bool(session.authenticated))
        if isinstance(params, Reply):
            return self.refuse(params)
        env = _fax(envelope)
        env.mail_from = address
        env.mail_options.extend(mail_options)
        env.client = client
        env.fax_numbers.clear()
        env.rcpt_params.clear()
        env.mail_params = params
        if params.auth is not None:
            log.debug("MAIL from %s (peer %s): submitter AUTH=%s (recorded, not trusted)",
                     address, _peer(session), params.auth[:200])
        env.postmaster = False
        return str(replies.SENDER_OK)

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        env = _fax(envelope)
        if len(address) > MAX_RCPT_ADDRESS_CHARS:
            return str(replies.RECIPIENT_TOO_LONG)
        params = dsn.parse_rcpt(_taken(server))
        if isinstance(params, Reply):
            return self.refuse(params)
        if is_postmaster(address, self.settings.fax.domain):  # RFC 5321 4.5.1
            reply = self.postmaster.recipient(bool(env.fax_numbers), env.postmaster)
            if reply.refusal:
                return self.refuse(reply)
            if not env.postmaster:
                env.postmaster = True
                env.rcpt_tos.append(address)
            return str(reply)
        if env.postmaster:
            return self.refuse(SEPARATELY)
        try:
            local, domain = parse_recipient(address, self.settings.fax.domain)
        except ValueError:
            return str(replies.RECIPIENT_NOT_NUMBER_AT_DOMAIN)
        if domain != self.settings.fax.domain:
            log.warning("relay denied: %s from %s to domain %s", _peer(session),
                        env.mail_from, domain[:100])
            return self.refuse(replies.relay_denied(self.settings.fax.domain))
        if len(env.rcpt_tos) >= self.settings.smtp.max_recipients:
            return self.refuse(replies.too_many_recipients(self.settings.smtp.max_recipients))
        try:
            number = parse_fax_number(local, self.settings.fax.default_region)
        except NumberError as exc:
            return self.refuse(replies.bad_number(str(exc)))
        if number in env.fax_numbers:
            return str(replies.recipient_duplicate(number))
        refusal = await self.access.check_destination_async(_client(env), number,
                                                            len(env.fax_numbers))
        if refusal:
            return self.refuse(refusal)
        env.fax_numbers.append(number)
        env.rcpt_params.append(params)
        env.rcpt_tos.append(address)
        env.rcpt_options.extend(rcpt_options)
        return str(replies.recipient_ok(number))

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        env = _fax(envelope)
        if env.postmaster and env.content_path is not None:
            reply = await self.postmaster.forward(env.content_path, env.mail_from or "",
                                                  _peer(session), session.host_name or "")
            return self.refuse(reply) if reply.refusal else str(reply)
        numbers = list(env.fax_numbers)
        if not numbers:
            return self.refuse(replies.NO_VALID_RECIPIENTS)
        assert env.content_path is not None, "DATA hook without the message file"
        client = _client(env)
        # SENDER_VERIFY: the From: domain vouches for the mail (SPF/DKIM under DMARC), or
        # 550 / 451 and no report (gateway.smtp.verify).
        verdict = await self.verifier.check(env.content_path, client, session.host_name or "")
        if verdict.reply is not None:
            return self.refuse(verdict.reply)
        if verdict.auth_results is not None:
            env.client = client = dataclasses.replace(client, auth_results=verdict.auth_results)
        charge = self.access.charge(client, len(numbers))
        if charge.done() and (refusal := charge.result()):
            return self.refuse(refusal)
        try:
            accepted = await self.intake.accept(env.content_path, env.mail_from, numbers,
                                                _peer(session), client, charge,
                                                head=env.content_head,
                                                dsn=(env.mail_params, list(env.rcpt_params)))
        except RateRefused as exc:  # the charge was refused: nothing to give back
            return self.refuse(exc.reply)
        except PartStored as exc:  # a part of a split mail, kept: nothing is faxed yet
            await self.access.give_back(charge, client, len(numbers))
            self.access.accepted(client, len(numbers))  # its recipients are not churn
            log.info("message from %s (peer %s): %s", env.mail_from, _peer(session), exc.reply)
            return str(exc.reply)
        except Refused as exc:
            await self.access.give_back(charge, client, len(numbers))
            log.info("refused message from %s (peer %s): %s", env.mail_from,
                     _peer(session), exc.reply)
            return self.refuse(exc.reply)
        except BaseException:
            await self.access.give_back(charge, client, len(numbers))
            raise
        if accepted.duplicate:  # faxed once already: nothing new is charged
            await self.access.give_back(charge, client, len(numbers))
            self.access.accepted(client, len(numbers))
            return str(replies.already_queued(accepted.job_ids))
        self.access.accepted(client, len(numbers))
        return str(replies.queued(accepted.job_ids, accepted.pages))


def _taken(server: SMTP) -> list[str]:
    """The DSN / AUTH= parameter words FaxSMTP took off the command being handled."""
    return list(server.taken_params) if isinstance(server, FaxSMTP) else []


def _client(envelope: FaxEnvelope) -> Client:
    assert envelope.client is not None, "RCPT/DATA before a successful MAIL"
    return envelope.client


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
            self.handler, self._connections, data_size_limit=s.smtp.max_message_bytes,
            enable_SMTPUTF8=True, hostname=s.smtp.hostname, ident="faxgw ESMTP",
            timeout=s.smtp.idle_timeout_s,
            proxy_protocol_timeout=SMTP_LINE_TIMEOUT_S if s.smtp.proxy_protocol else None,
            tls_context=None if self.implicit_tls or self.tls is None else self.tls.context,
            require_starttls=bool(self.tls) and not self.implicit_tls and s.tls.required,
            # aiosmtpd does not see implicit TLS as TLS: AUTH must be allowed there explicitly.
            auth_require_tls=not (self.implicit_tls or s.access.auth_plaintext),
            loop=asyncio.get_running_loop())  # else aiosmtpd looks it up, for each connection

    async def start(self) -> None:
        self.handler.start()
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
        self.handler.stop()
