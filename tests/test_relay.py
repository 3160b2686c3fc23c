"""Reports through the relay on connections kept open between reports (a real aiosmtpd sink)."""

from __future__ import annotations

import asyncio
import threading
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP as AioSMTP

from gateway.config import settings_from
from gateway.mail.sender import (
    MAIL_POLICY,
    NotifyError,
    OutboxNotifier,
    RelayNotifier,
    Rendered,
    on_the_wire,
)

from .conftest import RelaySink, base_env, relay_env


def report(n: int) -> Rendered:
    data = (f"From: faxgw@faxgw.test\r\nTo: a@example.com\r\nSubject: report {n}\r\n"
            f"Message-ID: <r{n}@faxgw.test>\r\n\r\nFax {n} delivered.\r\n").encode()
    return Rendered(data, ("a@example.com",))


def notifier(tmp_path: Path, relay: RelaySink, **kw: float) -> RelayNotifier:
    settings = settings_from(base_env(tmp_path, **relay_env(relay)))
    return RelayNotifier(settings, 10.0, **kw)  # type: ignore[arg-type]


async def test_reports_share_one_connection_and_quit_on_stop(tmp_path: Path,
                                                             relay: RelaySink) -> None:
    relay_out = notifier(tmp_path, relay)
    for n in range(5):
        assert "relayed via 127.0.0.1" in await relay_out.send_rendered(report(n), f"j{n}")
    subjects = [(await relay.next())["Subject"] for _ in range(5)]
    assert subjects == [f"report {n}" for n in range(5)]
    assert len(relay.sessions) == 1 and relay_out.connections_made == 1
    await relay_out.stop()
    assert relay.quits == 1


async def test_a_connection_the_relay_dropped_costs_a_connection_not_a_report(
        tmp_path: Path, relay: RelaySink) -> None:
    relay_out = notifier(tmp_path, relay)
    await relay_out.send_rendered(report(1), "j1")
    relay.drop_connections()  # the relay's idle timeout, while the connection waited
    await relay_out.send_rendered(report(2), "j2")
    assert [(await relay.next())["Subject"] for _ in range(2)] == ["report 1", "report 2"]
    assert relay_out.connections_made == 2
    await relay_out.stop()


async def test_idle_connection_is_closed_with_quit(tmp_path: Path, relay: RelaySink) -> None:
    relay_out = notifier(tmp_path, relay, idle_s=0.05)
    await relay_out.send_rendered(report(1), "j1")
    await relay.quits_reach(1)
    await relay_out.send_rendered(report(2), "j2")  # a new connection after the idle one went
    assert relay_out.connections_made == 2
    await relay_out.stop()


async def test_concurrent_reports_keep_at_most_the_pool(tmp_path: Path,
                                                        relay: RelaySink) -> None:
    relay_out = notifier(tmp_path, relay, keep=2)
    await asyncio.gather(*(relay_out.send_rendered(report(n), f"j{n}") for n in range(6)))
    made = relay_out.connections_made
    assert 1 <= made <= 6
    await relay.quits_reach(made - 2)  # the connections beyond the 2 kept: QUIT
    for n in range(6, 10):  # one after another: the kept connections, no new one
        await relay_out.send_rendered(report(n), f"j{n}")
    assert relay_out.connections_made == made
    assert len({(await relay.next())["Subject"] for _ in range(10)}) == 10
    await relay_out.stop()


async def test_relay_down_is_a_notify_error_and_then_recovers(tmp_path: Path,
                                                               relay: RelaySink) -> None:
    relay_out = notifier(tmp_path, relay)
    await relay_out.send_rendered(report(1), "j1")
    await relay.stop()
    try:
        await relay_out.send_rendered(report(2), "j2")
    except NotifyError as exc:
        assert "relay 127.0.0.1" in str(exc)
    else:
        raise AssertionError("a report went out with the relay down")
    await relay.start(relay.port)
    await relay_out.send_rendered(report(3), "j3")
    assert [(await relay.next())["Subject"] for _ in range(2)] == ["report 1", "report 3"]
    await relay_out.stop()


class _MailRule(RelaySink):
    """The relay sink, with a rule for MAIL on a connection that sent mail already."""

    def __init__(self, again: str | None) -> None:
        super().__init__()
        self.again = again  # the reply to MAIL on a connection's second transaction, if any
        self.mail_options: list[list[str]] = []
        self._mails: dict[int, int] = {}

    async def handle_MAIL(self, server, session, envelope, address, mail_options) -> str:
        self.mail_options.append(list(mail_options))
        seen = self._mails.get(id(server), 0)
        self._mails[id(server)] = seen + 1
        if seen and self.again is not None:
            return self.again
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"


async def _sink(rule: _MailRule):
    await rule.start()
    return rule


async def test_a_421_to_mail_on_a_waiting_connection_costs_a_connection_not_a_report(
        tmp_path: Path) -> None:
    """A relay that closes idle connections says 421 first; read as MAIL's reply, it means a
    new connection, and the report goes once, on it."""
    relay = await _sink(_MailRule("421 4.4.2 sink.test idle too long, closing"))
    try:
        relay_out = notifier(tmp_path, relay)
        await relay_out.send_rendered(report(1), "j1")
        await relay_out.send_rendered(report(2), "j2")
        assert [(await relay.next())["Subject"] for _ in range(2)] == ["report 1", "report 2"]
        assert relay_out.connections_made == 2 and len(relay.envelopes) == 2
        await relay_out.stop()
    finally:
        await relay.stop()


async def test_a_refused_sender_on_a_waiting_connection_is_an_error_not_a_retry(
        tmp_path: Path) -> None:
    relay = await _sink(_MailRule("550 5.7.1 sender not allowed"))
    try:
        relay_out = notifier(tmp_path, relay)
        await relay_out.send_rendered(report(1), "j1")
        with pytest.raises(NotifyError, match="550"):  # not taken as delivered
            await relay_out.send_rendered(report(2), "j2")
        assert relay_out.connections_made == 1 and len(relay.envelopes) == 1
        await relay_out.stop()
    finally:
        await relay.stop()


async def test_a_waiting_connection_sends_the_reports_size(tmp_path: Path) -> None:
    """RFC 1870 SIZE, once the connection's EHLO showed it (aiosmtpd offers it)."""
    relay = await _sink(_MailRule(None))
    try:
        relay_out = notifier(tmp_path, relay)
        await relay_out.send_rendered(report(1), "j1")
        await relay_out.send_rendered(report(2), "j2")
        assert relay.mail_options[0] == []  # the first, before EHLO told: SIZE is optional
        assert relay.mail_options[1] == [f"SIZE={len(report(2).data)}"]
        assert [(await relay.next())["Subject"] for _ in range(2)] == ["report 1", "report 2"]
        await relay_out.stop()
    finally:
        await relay.stop()


class _RefusesNobody(RelaySink):
    async def handle_RCPT(self, server, session, envelope, address, rcpt_options) -> str:
        if address.startswith("nobody@"):
            return "550 5.1.1 no such user"
        envelope.rcpt_tos.append(address)
        return "250 OK"


async def test_some_recipients_refused_is_an_error_after_the_others_got_it(
        tmp_path: Path) -> None:
    relay = _RefusesNobody()
    await relay.start()
    try:
        relay_out = notifier(tmp_path, relay)
        two = Rendered(report(1).data, ("a@example.com", "nobody@example.com"))
        with pytest.raises(NotifyError,
                           match=r"^relay refused recipients: \['nobody@example.com'\]$"):
            await relay_out.send_rendered(two, "j1")
        assert [rcpts for _, rcpts in relay.envelopes] == [["a@example.com"]]
        nobody = Rendered(report(2).data, ("nobody@example.com",))
        with pytest.raises(NotifyError, match="SMTPRecipientsRefused"):
            await relay_out.send_rendered(nobody, "j2")
        assert len(relay.envelopes) == 1
        await relay_out.stop()
    finally:
        await relay.stop()


class _Recorded(EmailMessage):
    """A real report mail that notes which thread serialises it."""

    threads: list[threading.Thread] = []

    def as_bytes(self, *args: object, **kwargs: object) -> bytes:  # type: ignore[override]
        type(self).threads.append(threading.current_thread())
        return super().as_bytes(*args, **kwargs)


@pytest.mark.parametrize("kind", ["relay", "outbox"])
async def test_send_serialises_the_mail_off_the_event_loop(tmp_path: Path, relay: RelaySink,
                                                           kind: str) -> None:
    """A postmaster forward holds up to 10 MiB and a DSN up to 1 MiB of mail: turning it into
    bytes (~0.2 s for 10 MiB) must not hold the event loop (every SMTP session, the web)."""
    out = (notifier(tmp_path, relay) if kind == "relay"
           else OutboxNotifier(tmp_path / "outbox"))
    (tmp_path / "outbox").mkdir()
    mail = _Recorded(policy=MAIL_POLICY)
    mail["From"] = "faxgw@faxgw.test"
    mail["To"] = "admin@example.com"
    mail["Subject"] = "forward"
    mail.set_content("body\n")
    _Recorded.threads = []
    await out.send(mail, "forward-1")
    assert _Recorded.threads and threading.current_thread() not in _Recorded.threads
    if kind == "relay":
        assert (await relay.next())["Subject"] == "forward"
        await out.stop()


class _Raw(RelaySink):
    """The sink, keeping each message as the relay read it (dots undone, as received)."""

    def __init__(self, data_reply: str | None = None) -> None:
        super().__init__()
        self.raw: list[bytes] = []
        self.data_reply = data_reply

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.data_reply is not None:
            return self.data_reply
        self.raw.append(envelope.original_content)
        return await super().handle_DATA(server, session, envelope)


_HEAD = b"From: faxgw@faxgw.test\r\nTo: a@example.com\r\nSubject: dots\r\n\r\n"


@pytest.mark.parametrize("body, received", [
    # As render writes it: sent as it is.
    (b"Fax delivered.\r\n", b"Fax delivered.\r\n"),
    # Lines that start with a dot (one alone would end DATA early): doubled on the wire.
    (b".\r\n..two\r\n.hidden\r\nend.\r\n", b".\r\n..two\r\n.hidden\r\nend.\r\n"),
    # Lone LF and CR, no line ending at the end: CRLF, as aiosmtplib's own DATA sends it.
    (b"one\ntwo\rthree\r\n.four\nfive", b"one\r\ntwo\r\nthree\r\n.four\r\nfive\r\n"),
])
async def test_data_reaches_the_relay_as_written(tmp_path: Path, body: bytes,
                                                 received: bytes) -> None:
    assert on_the_wire(_HEAD + body) == (body == received and not body.startswith(b"."))
    relay = _Raw()
    await relay.start()
    try:
        relay_out = notifier(tmp_path, relay)
        await relay_out.send_rendered(Rendered(_HEAD + body, ("a@example.com",)), "j1")
        # The connection is in step afterwards: the next report on it goes as well.
        await relay_out.send_rendered(report(2), "j2")
        assert relay.raw == [_HEAD + received, report(2).data]
        assert relay_out.connections_made == 1
        await relay_out.stop()
    finally:
        await relay.stop()


async def test_a_refused_message_is_an_error_and_its_connection_is_not_kept(
        tmp_path: Path) -> None:
    """The relay refuses the message after DATA: NotifyError (the report is not recorded as
    sent), and the next report goes on a new connection."""
    relay = _Raw("554 5.6.0 message refused")
    await relay.start()
    try:
        relay_out = notifier(tmp_path, relay)
        with pytest.raises(NotifyError, match="554"):
            await relay_out.send_rendered(report(1), "j1")
        relay.data_reply = None
        await relay_out.send_rendered(report(2), "j2")
        assert relay.raw == [report(2).data] and relay_out.connections_made == 2
        await relay_out.stop()
    finally:
        await relay.stop()


def test_on_the_wire() -> None:
    assert on_the_wire(b"a\r\nb\r\n")
    for data in (b"a\r\nb", b"a\nb\r\n", b"a\rb\r\n", b".a\r\n", b"a\r\n.b\r\n", b"a\r\r\n"):
        assert not on_the_wire(data), data


def _self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (its own CA) and its key, as PEM files."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "relay.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(__import__("ipaddress").ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "relay.pem", folder / "relay.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


class _TlsAuthSink(RelaySink):
    """A relay that wants STARTTLS, then AUTH, before MAIL: its EHLO after TLS is what MAIL
    goes after."""

    def __init__(self, context: Any) -> None:
        super().__init__()
        self.context = context
        self.logins: list[bytes] = []
        self.raw: list[bytes] = []

    def _session(self) -> AioSMTP:
        from aiosmtpd.smtp import AuthResult

        def authenticate(server: Any, session: Any, envelope: Any, mechanism: str,
                         data: Any) -> AuthResult:
            self.logins.append(data.login)
            return AuthResult(success=data.login == b"faxgw" and data.password == b"s3cret")

        session = AioSMTP(self, hostname="sink.test", tls_context=self.context,
                          require_starttls=True, auth_required=True,
                          authenticator=authenticate)
        self.sessions.append(session)
        return session

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.raw.append(envelope.original_content)
        return await super().handle_DATA(server, session, envelope)


async def test_reports_over_starttls_and_auth(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """STARTTLS, AUTH, then MAIL (after the EHLO that follows TLS), RCPT and DATA, on one
    connection for several reports."""
    import ssl

    cert, key = _self_signed(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # the relay's certificate, trusted
    relay = _TlsAuthSink(context)
    await relay.start()
    try:
        settings = settings_from(base_env(tmp_path, **relay_env(
            relay, NOTIFY_SMTP_TLS="starttls", NOTIFY_SMTP_USERNAME="faxgw",
            NOTIFY_SMTP_PASSWORD="s3cret")))
        relay_out = RelayNotifier(settings, 10.0)
        for n in range(3):
            await relay_out.send_rendered(report(n), f"j{n}")
        assert relay.raw == [report(n).data for n in range(3)]
        assert relay.logins == [b"faxgw"] and relay_out.connections_made == 1
        assert [rcpts for _, rcpts in relay.envelopes] == [["a@example.com"]] * 3
        await relay_out.stop()
    finally:
        await relay.stop()
