"""Every place faxgw reaches into aiosmtpd beyond its documented handler hooks, in one module.

aiosmtpd 1.4 is extended here, and only here: `FaxSMTP` (its SMTP protocol) overrides
`smtp_DATA` (DATA streamed to a file, bounded in size and time), `smtp_AUTH` (mechanisms matched
case-insensitively), `smtp_MAIL` / `smtp_RCPT` (DSN and AUTH= parameters taken off the line
before aiosmtpd's own parse, which answers 555 to them), `_handle_client` (the connection caps
and the 421 while shutting down, before aiosmtpd's greeting), `_timeout_cb` (a 421 before an idle
connection is closed), `_create_envelope` (`FaxEnvelope`), `_getaddr` (a fast path for plain
paths), `push` (enhanced status codes on aiosmtpd's own replies, the STARTTLS-required reply
rewritten, a multi-line reply written at once), `_reset_timeout` (the idle timer moved on rather
than made anew per command), `connection_made` / `connection_lost`, the class attribute
`line_length_limit`, the per-connection `command_size_limits`, and `__dir__` (the short `dir()`
aiosmtpd's __init__ finds commands and hooks by); `aiosmtpd_handler` does the same `dir()` and
the EHLO hook's signature for the handler class.

`OVERRIDES` names every aiosmtpd attribute overridden here and `LEANED_ON` every other internal
this module calls or reads; tests/test_smtp_hooks.py checks both lists against this module and
pins the source of each in aiosmtpd, so any change in aiosmtpd fails there loudly (aiosmtpd is
pinned below 1.5 in pyproject.toml). The gateway's rules themselves (who may send, which
recipients, what is queued) are the handler hooks in gateway/smtp/server.py.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import logging
import re
from pathlib import Path
from typing import Any, Protocol, TypeVar

from aiosmtpd.smtp import MISSING, SMTP, Envelope, Session, syntax

from gateway.config import Settings
from gateway.constants import SMTP_LINE_TIMEOUT_S
from gateway.phone import quote_rcpt_local_part
from gateway.smtp import esmtp_params as dsn
from gateway.smtp import replies
from gateway.smtp.access import Client
from gateway.smtp.connections import ConnectionLimits
from gateway.smtp.data import DataWriter, Incoming, Outcome, receive
from gateway.smtp.intake import HEAD_BYTES
from gateway.smtp.replies import Reply


class FaxHandler(Protocol):
    """What FaxSMTP asks of its handler (gateway/smtp/server.py's FaxHandler, which imports
    this module: a protocol here, not an import back)."""

    settings: Settings
    accepting: bool
    incoming: Incoming
    limits: ConnectionLimits

    def refuse(self, reply: Reply) -> str: ...

log = logging.getLogger("gateway.smtp.server")

# The aiosmtpd SMTP attributes FaxSMTP overrides (tests/test_smtp_hooks.py: exactly these).
OVERRIDES = ("__init__", "__dir__", "line_length_limit", "command_size_limits",
             "_create_envelope", "_getaddr", "_handle_client", "_reset_timeout", "_timeout_cb",
             "connection_made", "connection_lost", "push", "smtp_AUTH", "smtp_DATA",
             "smtp_MAIL", "smtp_RCPT")
# aiosmtpd internals used here without being overridden: methods called, attributes read
# (tests/test_smtp_hooks.py pins their source or value).
LEANED_ON = ("_timeout_handle", "_timeout_duration", "loop", "_set_post_data_state",
             "_call_handler_hook",
             "check_helo_needed", "check_auth_needed", "challenge_auth", "command_size_limit",
             "_strip_command_keyword", "_getparams", "smtp_EHLO", "smtp_STARTTLS", "__init__",
             "_cb_client_connected", "handle_exception", "_reader", "_writer", "envelope",
             "hostname", "local_part_limit", "session", "transport")

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
# (RFC 5321 4.1.2 / RFC 5322 3.4.1, ASCII only); anything else takes aiosmtpd's own parse.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_SIMPLE_PATH = re.compile(rf"<(?P<addr>{_ATEXT}(?:\.{_ATEXT})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>")


_HOOK_NAMES: dict[type, list[str]] = {}


def _hook_names(cls: type) -> list[str]:
    """What `dir()` of the session and of its handler answers: only the names aiosmtpd looks
    its commands, AUTH mechanisms and hooks up by (`smtp_*`, `auth_*`, `handle_*`).

    aiosmtpd's SMTP.__init__ finds them with `dir()` and `inspect.getmembers`, for every
    connection; over the whole class (~200 names, properties included) that cost 390 us of
    the loop per connection on a 2-core machine, ~20 us this way. tests/test_smtp_hooks.py
    checks that aiosmtpd finds the same commands, mechanisms and hooks either way."""
    names = _HOOK_NAMES.get(cls)
    if names is None:
        names = _HOOK_NAMES[cls] = sorted(
            n for n in dir(cls) if n.startswith(("smtp_", "auth_", "handle_")))
    return names


def _short_dir(self: object) -> list[str]:
    return _hook_names(type(self))


_Handler = TypeVar("_Handler", bound=type)


def aiosmtpd_handler(cls: _Handler) -> _Handler:
    """The handler class as aiosmtpd's SMTP.__init__ reads it for every connection, made cheap:
    `dir()` answers only the hook names (see `_hook_names`), and the EHLO hook carries its
    signature, which aiosmtpd inspects each time (the 4- or the 5-argument form?): 135 us each
    time; given once here (PEP 362's __signature__), it costs nothing."""
    setattr(cls, "__dir__", _short_dir)  # noqa: B010 (a method, set on the class)
    hook = cls.__dict__.get("handle_EHLO")
    if hook is not None:
        hook.__signature__ = inspect.signature(hook)
    return cls


def _fax(envelope: Envelope) -> FaxEnvelope:
    assert isinstance(envelope, FaxEnvelope), "FaxSMTP._create_envelope not used"
    return envelope


def _peer(session: Session) -> str:
    proxied = getattr(session, "proxy_data", None)  # SMTP_PROXY_PROTOCOL: the real client
    if proxied is not None and getattr(proxied, "src_addr", None):
        return str(proxied.src_addr)
    return _peer_ip(session.peer)


def _peer_ip(peer: Any) -> str:
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return str(peer or "-")


class FaxSMTP(SMTP):
    """aiosmtpd's protocol with the gateway's rules: connection caps and 421 while shutting
    down, DATA streamed to a file, a time limit on the whole DATA phase, a 421 before an idle
    connection is closed, and AUTH mechanisms matched case-insensitively (some MFPs send
    `auth login`)."""

    line_length_limit = READER_LIMIT_BYTES

    def __init__(self, handler: FaxHandler, connections: set[FaxSMTP], **kwargs: Any) -> None:
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
        self._reply_lines: list[str] = []  # the lines of a multi-line reply before its last
        self._deadline = 0.0  # when the idle timer runs out (loop time; _reset_timeout)

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

    __dir__ = _short_dir

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """The address in MAIL FROM / RCPT TO and the rest of the line, as aiosmtpd 1.4 parses
        them, with the plainest paths matched by a regex: aiosmtpd's own parse (the stdlib's
        angle-addr or addr-spec grammar, then its local-part limit) builds a typing.Protocol
        class on every call, 58 us twice per mail. Anything else is aiosmtpd's own parse
        (tests/test_smtp_hooks.py checks ours agrees with aiosmtpd's)."""
        if not arg:
            return "", ""
        simple = _SIMPLE_PATH.match(arg)
        if simple is not None:
            rest = arg[simple.end():].lstrip(" \t")
            if not rest.startswith("("):
                # <dot-atom@dot-atom>, what nearly every client sends: aiosmtpd's parse gives
                # this address, and the rest after the blanks (a comment there goes to it).
                addr = simple["addr"]
                if self.local_part_limit and len(addr.rpartition("@")[0]) > \
                        self.local_part_limit:
                    return None, None
                return addr, rest
        address, rest_of_line = super()._getaddr(arg)
        return address, rest_of_line

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
            if status[3:4] == "-" and "\n" not in status:
                # A line of a multi-line reply (EHLO's, ~7 of them): it goes with the reply's
                # last line, one write (and one send) for the reply, not one for every line.
                self._reply_lines.append(status)
                return
        if self._reply_lines:
            lines, self._reply_lines = self._reply_lines, []
            if isinstance(status, str):
                status = "\r\n".join([*lines, status])
            else:
                await super().push("\r\n".join(lines))
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

    def _reset_timeout(self, duration: float | None = None) -> None:
        """aiosmtpd's idle timer (`duration`, else the idle timeout, from now; then
        `_timeout_cb`), moved without a new timer each time: aiosmtpd cancels its timer and
        makes another for every command (~9 a mail, each left cancelled in the loop's heap
        until it is due). Here a later deadline is only noted, and the timer, when it comes,
        waits again for the rest; an earlier one takes a new timer."""
        deadline = self.loop.time() + (duration or self._timeout_duration)
        self._deadline = deadline
        handle = self._timeout_handle
        if handle is not None and not handle.cancelled() and handle.when() <= deadline:
            return
        if handle is not None:
            handle.cancel()
        self._timeout_handle = self.loop.call_at(deadline, self._timeout_due)

    def _timeout_due(self) -> None:
        if self.loop.time() < self._deadline:  # moved on meanwhile: wait for the rest
            self._timeout_handle = self.loop.call_at(self._deadline, self._timeout_due)
            return
        self._timeout_cb()

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
