"""The SMTP edge: aiosmtpd on the daemon's own loop, every hook answering with an exact code.

Who may send is settled at MAIL (AUTH, trusted network, allowed sender), each recipient at RCPT
(relay denied, bad number, blocked destination, rate limit), so a sender learns of a problem
before sending the document; the document is checked and queued at DATA time. Scanner quirks
handled here: lower-case AUTH mechanisms, `AUTH LOGIN <user>` initial responses, the
`Username:` / `Password:` prompts some devices insist on, and a 535 (never silence) for a wrong
password. Every reply is a `replies.Reply`; the metrics take the refusal reason from it.

ESMTP as the relays in front of it speak it: PIPELINING (RFC 2920), ENHANCEDSTATUSCODES (RFC
2034: aiosmtpd's own replies get theirs in `push`), DSN (RFC 3461: RET, ENVID, NOTIFY, ORCPT)
and RFC 4954's `AUTH=` on MAIL, which aiosmtpd would answer with 555; see gateway/smtp/dsn.py.

Where aiosmtpd is extended beyond its handler hooks (DATA streamed to a file, AUTH mechanisms
matched case-insensitively, the 421 on timeouts, the connection caps, the DSN and AUTH=
parameters taken off MAIL and RCPT before aiosmtpd reads them), tests/test_smtp_hooks.py
fails loudly if the methods and attributes relied on change: aiosmtpd is pinned below 1.5.
"""

from __future__ import annotations

import asyncio
import binascii
import collections
import dataclasses
import functools
import inspect
import logging
import re
from email._header_value_parser import get_addr_spec, get_angle_addr
from email.errors import HeaderParseError
from base64 import b64decode
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import MISSING, SMTP, Envelope, Session, TLSSetupException, syntax

from gateway.config import HostPort, Settings
from gateway.constants import MAX_RCPT_ADDRESS_CHARS, SMTP_LINE_TIMEOUT_S
from gateway.ops.metrics import Metrics
from gateway.phone import (NumberError, parse_fax_number, parse_recipient,
                           quote_rcpt_local_part)
from gateway.smtp import dsn, replies
from gateway.smtp.access import Access, Client
from gateway.smtp.connections import AcceptErrors, ConnectionLimits
from gateway.smtp.data import DataWriter, Incoming, Outcome, receive
from gateway.smtp.intake import HEAD_BYTES, Intake, PartStored, RateRefused, Refused
from gateway.smtp.replies import Reply
from gateway.store.base import StoreError
from gateway.smtp.tls import ReloadableTLS
from gateway.smtp.verify import SenderVerifier
from gateway.smtp.postmaster import SEPARATELY, Postmaster, is_postmaster

log = logging.getLogger(__name__)

MAX_CREDENTIAL_CHARS = 1024
# aiosmtpd's StreamReader limit is its class attribute `line_length_limit` (1001 by default):
# DATA is read up to this many bytes at a time. Command lines stay bounded by
# command_size_limit (512), checked by aiosmtpd after the read.
READER_LIMIT_BYTES = 64 * 1024
# aiosmtpd's own reply when STARTTLS is required; rewritten with its enhanced code.
AIOSMTPD_STARTTLS_FIRST = "530 Must issue a STARTTLS command first"
# ENHANCEDSTATUSCODES: the code given to aiosmtpd's own replies that carry none (by reply code;
# otherwise the class with .0.0). Ours carry theirs already.
_ENHANCED_BY_CODE = {"250": "2.0.0", "221": "2.0.0", "220": "2.0.0", "252": "2.5.0",
                     "500": "5.5.2", "501": "5.5.4", "502": "5.5.1", "503": "5.5.1",
                     "504": "5.5.4", "530": "5.7.0", "552": "5.3.4", "554": "5.7.0",
                     "555": "5.5.4", "454": "4.7.0"}
_HAS_ENHANCED = re.compile(r"[245]\d\d[ -][245]\.\d{1,3}\.\d{1,3}(?: |$)")
_NEEDS_ENHANCED = re.compile(r"([245]\d\d)([ -])")


def _b64_text(blob: bytes | str) -> str | None:
    try:
        raw = b64decode(blob, validate=True)
        return raw.decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None


class FaxEnvelope(Envelope):
    """aiosmtpd's envelope with the gateway's fields, made by `FaxSMTP._create_envelope`."""

    def __init__(self) -> None:
        super().__init__()
        self.client: Client | None = None
        self.fax_numbers: list[str] = []
        self.content_path: Path | None = None  # DATA as received, in DATA_DIR/incoming
        self.content_bytes = 0
        self.content_head = b""  # its first HEAD_BYTES (the header block and more)
        self.mail_params = dsn.MailParams()  # RET, ENVID, AUTH= of MAIL
        self.rcpt_params: list[dsn.RcptParams] = []  # NOTIFY, ORCPT, one per fax number
        self.postmaster = False  # RCPT postmaster@ the fax domain: forwarded, not faxed


# An SMTP path of the plainest kind: "<", a dot-atom local part, "@", a dot-atom domain, ">"
# (RFC 5321 4.1.2 / RFC 5322 3.4.1, ASCII only); anything else takes the stdlib's parser.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_SIMPLE_PATH = re.compile(rf"<(?P<addr>{_ATEXT}(?:\.{_ATEXT})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>")


@functools.cache
def _hook_names(cls: type) -> list[str]:
    """What `dir()` of the session and of its handler answers: only the names aiosmtpd looks
    its commands, AUTH mechanisms and hooks up by (`smtp_*`, `auth_*`, `handle_*`).

    aiosmtpd's SMTP.__init__ finds them with `dir()` and `inspect.getmembers`, for every
    connection; over the whole class (~200 names, properties included) that cost 390 us of
    the loop per connection on a 2-core machine, ~20 us this way. tests/test_smtp_hooks.py
    checks that aiosmtpd finds the same commands, mechanisms and hooks either way."""
    return sorted(n for n in dir(cls) if n.startswith(("smtp_", "auth_", "handle_")))


class FaxHandler:
    """aiosmtpd handler hooks; the client and the numbers ride along on the envelope.

    Shared by every listener, so the connection caps and the incoming directory are too."""

    def __dir__(self) -> list[str]:
        return _hook_names(type(self))

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
                credentials = answer.decode("utf-8", "replace") if isinstance(answer, bytes) \
                    else None
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
        session.auth_data = user
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


# aiosmtpd reads the EHLO hook's signature for every connection (the 4- or the 5-argument
# form?): 135 us each time; given once here (PEP 362's __signature__), it costs nothing.
FaxHandler.handle_EHLO.__signature__ = inspect.signature(  # type: ignore[attr-defined]
    FaxHandler.handle_EHLO)


def _fax(envelope: Envelope) -> FaxEnvelope:
    assert isinstance(envelope, FaxEnvelope), "FaxSMTP._create_envelope not used"
    return envelope


def _taken(server: SMTP) -> list[str]:
    """The DSN / AUTH= parameter words FaxSMTP took off the command being handled."""
    return list(server.taken_params) if isinstance(server, FaxSMTP) else []


def _client(envelope: FaxEnvelope) -> Client:
    assert envelope.client is not None, "RCPT/DATA before a successful MAIL"
    return envelope.client


def _peer(session: Session) -> str:
    proxied = getattr(session, "proxy_data", None)  # SMTP_PROXY_PROTOCOL: the real client
    if proxied is not None and getattr(proxied, "src_addr", None):
        return str(proxied.src_addr)
    return _peer_ip(session.peer)


class FaxSMTP(SMTP):
    """aiosmtpd's protocol with the gateway's rules: connection caps and 421 while shutting
    down, DATA streamed to a file, a time limit on the whole DATA phase, a 421 before an idle
    connection is closed, and AUTH mechanisms matched case-insensitively (some MFPs send
    `auth login`)."""

    line_length_limit = READER_LIMIT_BYTES

    def __init__(self, handler: FaxHandler, connections: set["FaxSMTP"], **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.fax_handler = handler
        self._connections = connections
        self._refusal: Reply | None = None
        self._counted_ip: str | None = None
        self._phase = "command"  # command, data (receiving), processing (intake)
        # aiosmtpd's command_size_limits is one dict on its class, which its EHLO adds to on
        # every EHLO of every connection: each connection gets its own, set by
        # allow_long_commands.
        self.command_size_limits = collections.defaultdict(lambda: SMTP.command_size_limit)
        self.taken_params: list[str] = []  # DSN / AUTH= words of the current MAIL or RCPT

    def allow_long_commands(self) -> None:
        """After EHLO: MAIL and RCPT may be as long as the extensions offered make them (SIZE=
        26 and SMTPUTF8 10 as aiosmtpd counts them; DSN and AUTH= per RFC 3461 and 4954)."""
        base = SMTP.command_size_limit
        self.command_size_limits["MAIL"] = base + 26 + 10 + dsn.MAIL_EXTRA_CHARS
        self.command_size_limits["RCPT"] = base + dsn.RCPT_EXTRA_CHARS

    def _take_params(self, arg: str | None, keyword: str, keywords: frozenset[str]) -> str | None:
        """`arg` without the parameters in `keywords` (kept, as written, in taken_params for
        the MAIL or RCPT hook): aiosmtpd answers 555 to any parameter it does not know, and
        upper-cases the rest. A line that does not parse is left to aiosmtpd to refuse."""
        self.taken_params = []
        if arg is None or self.session is None or not self.session.extended_smtp:
            return arg
        upper = arg.upper()
        if upper[:len(keyword)] != keyword or not any(k in upper for k in keywords):
            return arg  # nothing of ours: no second parse of the address
        rest = arg[len(keyword):].strip()
        address, params = self._getaddr(rest)
        if not address or not params or not rest.endswith(params):
            return arg
        ours, kept = dsn.split_params(params.split(), keywords)
        if not ours:
            return arg
        self.taken_params = ours
        return " ".join([keyword + rest[:len(rest) - len(params)].rstrip(), *kept])

    def _create_envelope(self) -> Envelope:
        return FaxEnvelope()

    def __dir__(self) -> list[str]:
        return _hook_names(type(self))

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """The address in MAIL FROM / RCPT TO and the rest of the line, parsed as aiosmtpd
        1.4 does (the stdlib's angle-addr or addr-spec grammar, then its local-part limit),
        minus the typing.Protocol class its version builds on every call: 44 of its 58 us,
        twice per mail; and the plainest paths matched by a regex instead of the stdlib's
        parser (tests/test_smtp_hooks.py checks ours agrees with aiosmtpd's)."""
        if not arg:
            return "", ""
        simple = _SIMPLE_PATH.match(arg)
        rest = arg[simple.end():].lstrip(" \t") if simple is not None else ""
        if simple is not None and not rest.startswith("("):
            # <dot-atom@dot-atom>, what nearly every client sends: the parse below gives this
            # address, and the rest after the blanks (a comment there goes to the parser), at a
            # tenth of its cost (the test compares ours with aiosmtpd's).
            addr = simple["addr"]
        else:
            parse = get_angle_addr if arg.lstrip().startswith("<") else get_addr_spec
            try:
                address, rest = parse(arg)
            except HeaderParseError:
                return None, None
            addr = address.addr_spec
        if self.local_part_limit and len(addr.rpartition("@")[0]) > self.local_part_limit:
            return None, None
        return addr, rest

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None  # not the STARTTLS re-entry
        if first:
            self._connections.add(self)
            ip = _peer_ip(transport.get_extra_info("peername"))
            limits = self.fax_handler.limits
            over = limits.admit(ip)
            if over is None:
                self._counted_ip = ip
            else:
                self._refusal = (replies.TOO_MANY_CONNECTIONS if over == "total" else
                                 replies.too_many_connections_from(ip, limits.max_per_ip))
                if limits.note_refusal():
                    log.warning("SMTP connection from %s refused: %s (%d refused in the last "
                                "minute)", ip, self._refusal, limits.refused_recently)
                    limits.logged()
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        self._connections.discard(self)
        if self._counted_ip is not None:
            self.fax_handler.limits.release(self._counted_ip)
            self._counted_ip = None
        super().connection_lost(error)

    async def _handle_client(self) -> None:
        # aiosmtpd sends its 220 greeting in _handle_client; this is the one place to refuse.
        refusal = self._refusal
        if refusal is None and not self.fax_handler.accepting:
            refusal = replies.SHUTTING_DOWN
        if refusal is not None:
            self.fax_handler.refuse(refusal)
            await self.push(str(refusal))
            if self.transport is not None:
                self.transport.close()
            return
        await super()._handle_client()

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        # RET, ENVID (RFC 3461) and AUTH= (RFC 4954) go to the MAIL hook, not to aiosmtpd.
        await super().smtp_MAIL(self._take_params(arg, "FROM:", dsn.MAIL_KEYWORDS))

    @syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg: str | None) -> None:
        # "(555) 123-4567@fax..." would lose its area code as an RFC 5322 comment.
        arg = None if arg is None else quote_rcpt_local_part(arg)
        # NOTIFY and ORCPT (RFC 3461) go to the RCPT hook, not to aiosmtpd.
        await super().smtp_RCPT(self._take_params(arg, "TO:", dsn.RCPT_KEYWORDS))

    async def push(self, status: Any) -> None:
        if status == AIOSMTPD_STARTTLS_FIRST:
            status = self.fax_handler.refuse(replies.STARTTLS_FIRST)
        elif isinstance(status, str):
            status = self._enhanced(status)
        await super().push(status)

    def _enhanced(self, status: str) -> str:
        """ENHANCEDSTATUSCODES (RFC 2034): aiosmtpd's own replies ("503 Error: need MAIL
        command", "250 OK") with an enhanced code; not the greeting, nor HELO's and EHLO's
        replies, which RFC 2034 leaves without."""
        if _HAS_ENHANCED.match(status) or not (found := _NEEDS_ENHANCED.match(status)):
            return status
        code = found.group(1)
        if code == "250" and (found.group(2) == "-" or status in (
                f"250 {self.hostname}", "250 HELP")):
            return status
        if code == "220" and status.startswith(f"220 {self.hostname} "):
            return status
        enhanced = _ENHANCED_BY_CODE.get(code, f"{code[0]}.0.0")
        return f"{code}{found.group(2)}{enhanced} {status[4:]}"

    def _timeout_cb(self) -> None:
        """aiosmtpd's timer ran out: say why (421 4.4.2) before closing, as RFC 5321 4.2.2
        asks, whether the client was idle or too slow sending the message."""
        s = self.fax_handler.settings
        reply = (replies.data_timeout(s.smtp.data_timeout_s) if self._phase == "data"
                 else replies.idle_timeout(s.smtp.idle_timeout_s))
        if self.transport is not None and not self.transport.is_closing():
            log.info("SMTP %s: %s", _peer(self.session) if self.session else "-", reply)
            self.fax_handler.refuse(reply)
            self._writer.write(str(reply).encode("ascii") + b"\r\n")
        super()._timeout_cb()

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        """DATA streamed to a file in DATA_DIR/incoming as it arrives (gateway.smtp.data), then
        the handler's DATA hook with the path; the file is removed whatever the outcome.

        aiosmtpd's own DATA holds the whole message in memory; this keeps its replies (354,
        503, 501, 552 after the data) with enhanced codes, enforces SMTP_MAX_MESSAGE_BYTES
        while receiving, bounds the whole DATA phase by SMTP_DATA_TIMEOUT_SECONDS, and refuses
        a bare-LF end marker at once. Lines longer than 1000 octets are accepted (RFC 5321
        allows a server to).
        """
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None and self.session is not None
        env = _fax(self.envelope)
        if not env.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        handler = self.fax_handler
        s = handler.settings
        try:
            path, out = handler.incoming.create()
        except OSError as exc:
            log.error("cannot create a file in %s: %s", handler.incoming.root, exc)
            await self.push(handler.refuse(replies.CANNOT_RECEIVE))
            return
        try:
            await self.push("354 End data with <CR><LF>.<CR><LF>")
            self._phase = "data"
            self._reset_timeout(s.smtp.data_timeout_s)
            writer = DataWriter(out, s.smtp.max_message_bytes, keep_head=HEAD_BYTES)
            try:
                result = await receive(self._reader, writer)
            finally:
                try:
                    out.close()
                except OSError as exc:  # the last buffered bytes did not fit on the disk
                    writer.error = writer.error or exc
            self._phase = "processing"
            # Intake may take up to the document time limit; the idle timer must not fire.
            self._reset_timeout(max(SMTP_LINE_TIMEOUT_S, 2 * s.documents.timeout_s))
            if result.outcome is Outcome.EOF:
                return  # the client went away in the middle of the message
            if result.outcome is Outcome.BARE_LF:
                log.warning("SMTP %s: bare LF end of DATA (legacy client or smuggling "
                            "attempt); refused and closed", _peer(self.session))
                await self.push(handler.refuse(replies.BARE_LF))
                if self.transport is not None:
                    self.transport.close()
                return
            if result.outcome is Outcome.TOO_BIG:
                await self.push(handler.refuse(replies.too_big(s.smtp.max_message_bytes)))
                self._set_post_data_state()
                return
            if writer.error is not None:
                log.error("cannot write an incoming message to %s: %s", path, writer.error)
                await self.push(handler.refuse(replies.CANNOT_RECEIVE))
                self._set_post_data_state()
                return
            env.content_path = path
            env.content_bytes = writer.written
            env.content_head = bytes(writer.head)
            status = await self._call_handler_hook("DATA")
            self._set_post_data_state()
            await self.push("250 OK" if status is MISSING else status)
        finally:
            path.unlink(missing_ok=True)
            self._phase = "command"
            if self.transport is not None and not self.transport.is_closing():
                self._reset_timeout()

    @syntax("AUTH <mechanism>")
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


def _peer_ip(peer: Any) -> str:
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return str(peer or "-")


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
