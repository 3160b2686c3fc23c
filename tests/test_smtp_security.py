"""Who may send, with real clients over loopback: STARTTLS, implicit TLS, legacy TLS, AUTH quirks
of scanners, trusted networks, strangers, open-relay attempts, destination policy, rate limits,
size limits, refusal reports. Every refusal checks its exact reply code."""

from __future__ import annotations

import asyncio
import base64
import logging
import shutil
import smtplib
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.users import User, hash_password, write_user

from .conftest import RelaySink, Simulator, base_env, job_ids, pdf_mail, production_env
from .helpers.tls import cert  # noqa: F401 - a fixture

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None,
                                reason="the openssl command is needed to make test certificates")

RCPT = "15551234567@fax.local"


@pytest.fixture(scope="module")
def users(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("users") / "users"
    write_user(path, User("scanner", hash_password("s3cret pass")))
    write_user(path, User("bob", hash_password("bobpw"), from_number="+15550109999",
                          report_to="bob-reports@example.com", senders=("bob@example.com",)))
    return path


def client_tls(version: str | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if version == "TLSv1":
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    return ctx


def secure_env(tmp_path: Path, cert: tuple[Path, Path], users: Path, **extra: str) -> dict:
    return base_env(tmp_path / "var", TLS_CERT_FILE=str(cert[0]), TLS_KEY_FILE=str(cert[1]),
                    USERS_FILE=str(users), TRUSTED_NETWORKS="", SMTPS_LISTEN="127.0.0.1:0",
                    **extra)


async def in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    return await asyncio.to_thread(fn, *args)


def data_of(msg: Any) -> bytes:
    return msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))


def session(port: int, *, starttls: bool = True) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", port, timeout=20)
    client.ehlo("mfp.test")
    if starttls:
        client.starttls(context=client_tls())
        client.ehlo("mfp.test")
    return client


async def test_starttls_auth_plain_then_fax(make_gateway, cert, users, tmp_path: Path) -> None:
    gw = await make_gateway(secure_env(tmp_path, cert, users))

    def run() -> tuple[Any, ...]:
        with session(gw.smtp.port, starttls=False) as plain:
            features_plain = dict(plain.esmtp_features)
        with session(gw.smtp.port) as client:
            features_tls = dict(client.esmtp_features)
            client.login("scanner", "s3cret pass")
            return features_plain, features_tls, client.sendmail(
                "scan@anywhere.example", [RCPT], data_of(pdf_mail(RCPT)))

    plain, secured, refused = await in_thread(run)
    assert "starttls" in plain and "auth" not in plain  # no AUTH on plaintext by default
    assert secured["auth"].split() == ["LOGIN", "PLAIN"]
    assert refused == {}
    [job] = await gw.store.run(gw.store.jobs)
    assert job.from_number == gw.s.fax.from_number


async def test_auth_login_quirks_of_scanners(make_gateway, cert, users, tmp_path: Path) -> None:
    gw = await make_gateway(secure_env(tmp_path, cert, users))
    b64 = lambda s: base64.b64encode(s.encode()).decode()  # noqa: E731

    def run() -> list[tuple[int, bytes]]:
        replies = []
        with session(gw.smtp.port) as client:
            # lower case mechanism, Username: / Password: prompts
            replies.append(client.docmd("auth login"))
            replies.append(client.docmd(b64("scanner")))
            replies.append(client.docmd(b64("s3cret pass")))
        with session(gw.smtp.port) as client:
            # initial response with the user name, then the password prompt
            replies.append(client.docmd("AUTH LOGIN", b64("scanner")))
            replies.append(client.docmd(b64("wrong")))
        with session(gw.smtp.port) as client:
            replies.append(client.docmd("auth plain", b64("\0scanner\0s3cret pass")))
        return replies

    replies = await in_thread(run)
    assert replies[0] == (334, b64("Username:").encode())
    assert replies[1] == (334, b64("Password:").encode())
    assert replies[2][0] == 235
    assert replies[3] == (334, b64("Password:").encode())
    assert replies[4] == (535, b"5.7.8 Authentication credentials invalid")
    assert replies[5][0] == 235


async def test_failed_logins_lock_the_address_out(make_gateway, cert, users,
                                                  tmp_path: Path) -> None:
    gw = await make_gateway(secure_env(tmp_path, cert, users, AUTH_MAX_FAILURES="3"))

    def plain(user: str, password: str) -> str:
        return base64.b64encode(f"\0{user}\0{password}".encode()).decode()

    def run() -> list[int]:
        with session(gw.smtp.port) as client:
            codes = [client.docmd("AUTH PLAIN", plain("scanner", "guess"))[0] for _ in range(4)]
            # the right password, but the address is locked out
            codes.append(client.docmd("AUTH PLAIN", plain("scanner", "s3cret pass"))[0])
        return codes

    assert await in_thread(run) == [535, 535, 535, 454, 454]


async def test_implicit_tls_listener(make_gateway, cert, users, tmp_path: Path) -> None:
    gw = await make_gateway(secure_env(tmp_path, cert, users))

    def run() -> dict:
        with smtplib.SMTP_SSL("127.0.0.1", gw.smtps.port, context=client_tls(),
                              timeout=20) as client:
            client.ehlo("mfp.test")
            assert "auth" in client.esmtp_features  # offered on implicit TLS
            client.login("scanner", "s3cret pass")
            return client.sendmail("scan@x.example", [RCPT], data_of(pdf_mail(RCPT)))

    assert await in_thread(run) == {}


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1 is deprecated")
async def test_tls10_only_client_needs_the_legacy_setting(make_gateway, cert, users,
                                                          tmp_path: Path) -> None:
    modern = await make_gateway(secure_env(tmp_path, cert, users))
    legacy = await make_gateway(secure_env(tmp_path / "legacy", cert, users,
                                           TLS_MIN_VERSION="TLSv1"))

    def handshake(port: int) -> str:
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
            client.ehlo("old-mfp.test")
            client.starttls(context=client_tls("TLSv1"))
            return client.sock.version()

    with pytest.raises((ssl.SSLError, smtplib.SMTPServerDisconnected, ConnectionError)):
        await in_thread(handshake, modern.smtp.port)
    assert await in_thread(handshake, legacy.smtp.port) == "TLSv1"


async def test_strangers_are_refused_and_get_no_report(make_gateway, cert, users, relay: RelaySink,
                                                       simulator: Simulator,
                                                       tmp_path: Path) -> None:
    env = production_env(tmp_path / "var", simulator, TRUSTED_NETWORKS="",
                         NOTIFY_SMTP_HOST="127.0.0.1", NOTIFY_SMTP_PORT=str(relay.port),
                         NOTIFY_SMTP_TLS="none")
    gw = await make_gateway(env)

    def run() -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", gw.smtp.port, timeout=20) as client:
            client.ehlo("stranger.test")
            return client.mail("someone@stranger.example")

    assert await in_thread(run) == (550, b"5.7.1 Sender <someone@stranger.example> is not "
                                         b"allowed to send faxes through this gateway")
    with_auth = await make_gateway(secure_env(tmp_path / "b", cert, users))

    def run_auth() -> tuple[int, bytes]:
        with session(with_auth.smtp.port) as client:
            return client.mail("someone@stranger.example")

    code, text = await in_thread(run_auth)
    assert (code, text[:6]) == (530, b"5.7.0 ")
    assert gw.access.refused_strangers == 1
    assert relay.messages.empty()


async def test_open_relay_attempts_are_refused(make_gateway, tmp_path: Path) -> None:
    gw = await make_gateway()  # loopback is trusted: even a trusted client cannot relay

    def run() -> list[tuple[int, bytes]]:
        with smtplib.SMTP("127.0.0.1", gw.smtp.port, timeout=20) as client:
            client.ehlo("relay-test")
            client.mail("alice@example.com")
            return [client.rcpt(address) for address in (
                "victim@example.org", "victim%example.org@fax.local",
                "<@fax.local:victim@example.org>",
                "victim@example.org@fax.local", "15551234567@fax.local.example.org",
                "\"15551234567@example.org\"@fax.local")]

    replies = await in_thread(run)
    assert all(code >= 500 for code, _ in replies), replies
    assert replies[0] == (550, b"5.7.1 Relaying denied: this gateway only accepts mail for "
                               b"<number>@fax.local")
    assert await gw.store.run(gw.store.jobs) == []


async def test_allowed_sender_checked_on_envelope_and_header(make_gateway,
                                                             tmp_path: Path) -> None:
    gw = await make_gateway(base_env(tmp_path / "var", TRUSTED_NETWORKS="",
                                     ALLOWED_SENDERS="*@example.com"))

    def run(header_from: str) -> tuple[int, str]:
        msg = pdf_mail(RCPT)
        del msg["From"]
        msg["From"] = header_from
        with smtplib.SMTP("127.0.0.1", gw.smtp.port, timeout=20) as client:
            client.ehlo("erp.test")
            client.mail("erp@example.com")
            client.rcpt(RCPT)
            code, text = client.data(data_of(msg))
            return code, text.decode()

    code, text = await in_thread(run, "ERP <erp@example.com>")
    assert code == 250
    code, text = await in_thread(run, "Mallory <mallory@evil.example>")
    assert (code, text) == (550, "5.7.1 Sender <mallory@evil.example> is not allowed to send "
                                 "faxes through this gateway")


async def test_user_limited_to_own_senders_with_own_caller_number_and_report_address(
        make_gateway, cert, users, tmp_path: Path) -> None:
    gw = await make_gateway(secure_env(tmp_path, cert, users))

    def run() -> tuple[tuple[int, bytes], str]:
        with session(gw.smtp.port) as client:
            client.login("bob", "bobpw")
            refused = client.mail("mallory@example.com")
            client.rset()
            client.mail("bob@example.com")
            client.rcpt(RCPT)
            code, text = client.data(data_of(pdf_mail(RCPT, sender="bob@example.com")))
            assert code == 250, text
            return refused, text.decode()

    refused, text = await in_thread(run)
    assert refused == (550, b"5.7.1 User bob may not send as <mallory@example.com>")
    [job_id] = job_ids(text)
    job = await gw.store.run(gw.store.job, job_id)
    message = await gw.store.run(gw.store.message, job.message_id)
    assert job.from_number == "+15550109999"
    assert message.report_to == "bob-reports@example.com"


async def test_destination_policy_at_rcpt(make_gateway, tmp_path: Path) -> None:
    gw = await make_gateway(base_env(tmp_path / "var", FAX_BLOCK_PREFIXES="+1555777"))

    def run() -> list[tuple[int, bytes]]:
        with smtplib.SMTP("127.0.0.1", gw.smtp.port, timeout=20) as client:
            client.ehlo("x")
            client.mail("alice@example.com")
            return [client.rcpt(f"{n}@fax.local") for n in
                    ("+19005551234", "+12129765555", "+442079460000", "+15557771234",
                     "+15551234567")]

    premium, premium976, uk, blocked, ok = await in_thread(run)
    assert premium[0] == 550 and b"premium-rate" in premium[1]
    assert premium976[0] == 550
    assert uk[0] == 550 and b"international" in uk[1].lower()
    assert blocked[0] == 550 and b"+1555777" in blocked[1]
    assert ok[0] == 250


async def test_international_allowed_when_configured(make_gateway, tmp_path: Path) -> None:
    gw = await make_gateway(base_env(tmp_path / "var", FAX_ALLOW_INTERNATIONAL="yes"))

    def run() -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", gw.smtp.port, timeout=20) as client:
            client.ehlo("x")
            client.mail("alice@example.com")
            return client.rcpt("+442079460000@fax.local")

    assert (await in_thread(run))[0] == 250


async def test_rate_limit_per_sender(make_gateway, tmp_path: Path) -> None:
    gw = await make_gateway(base_env(tmp_path / "var", RATE_LIMIT_PER_SENDER="2"))

    def run() -> list[tuple[int, bytes]]:
        with smtplib.SMTP("127.0.0.1", gw.smtp.port, timeout=20) as client:
            client.ehlo("x")
            client.mail("alice@example.com")
            replies = [client.rcpt(f"155512345{n:02d}@fax.local") for n in range(3)]
            client.rset()
            client.mail("carol@example.com")  # another sender has its own allowance
            replies.append(client.rcpt("15551234599@fax.local"))
            return replies

    replies = await in_thread(run)
    assert [c for c, _ in replies] == [250, 250, 450, 250]
    assert replies[2][1].startswith(b"4.7.1 Rate limit reached")


async def test_too_many_recipients_and_oversized_mail(make_gateway, tmp_path: Path) -> None:
    gw = await make_gateway(base_env(tmp_path / "var", SMTP_MAX_RECIPIENTS="2",
                                     SMTP_MAX_MESSAGE_BYTES="65536"))

    def run() -> list[Any]:
        with smtplib.SMTP("127.0.0.1", gw.smtp.port, timeout=20) as client:
            client.ehlo("x")
            out: list[Any] = [client.esmtp_features["size"]]
            out.append(client.mail("alice@example.com", ["SIZE=10000000"]))  # declared too big
            client.mail("alice@example.com")
            out += [client.rcpt(f"155512345{n:02d}@fax.local") for n in range(3)]
            # not declared: refused once the data outgrows the limit, not stored
            out.append(client.data(b"Subject: big\r\n\r\n" + b"x" * 100 + b"\r\n" * 1000 +
                                   (b"y" * 900 + b"\r\n") * 100))
            return out

    size, declared, r1, r2, r3, data = await in_thread(run)
    assert size == "65536"
    assert declared[0] == 552
    assert (r1[0], r2[0]) == (250, 250)
    assert r3 == (452, b"4.5.3 Too many recipients: at most 2 fax numbers per message")
    assert data[0] == 552
    assert await gw.store.run(gw.store.jobs) == []


async def test_authorised_sender_gets_a_refusal_report(make_gateway, simulator: Simulator,
                                                       relay: RelaySink, tmp_path: Path) -> None:
    gw = await make_gateway(production_env(tmp_path / "var", simulator,
                                           NOTIFY_SMTP_HOST="127.0.0.1",
                                           NOTIFY_SMTP_PORT=str(relay.port),
                                           NOTIFY_SMTP_TLS="none"))
    msg = pdf_mail(RCPT, pdf=b"%PDF-1.4\nbroken", message_id="<orig-1@example.com>")

    def run() -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", gw.smtp.port, timeout=20) as client:
            client.ehlo("scanner.test")
            client.mail("scanner@example.com")
            client.rcpt(RCPT)
            return client.data(data_of(msg))

    code, text = await in_thread(run)
    assert code == 554 and b"is not a readable PDF" in text
    report = await relay.next()
    assert report["To"] == "Alice Example <alice@example.com>" or report["To"] == \
        "alice@example.com"
    assert report["Subject"].startswith("Fax to +1 555-123-4567 not sent: invoice.pdf is not a "
                                        "readable PDF")
    assert report["In-Reply-To"] == "<orig-1@example.com>"
    assert "Nothing was sent" in report.get_body(("plain",)).get_content()


def test_faxgw_passwd_writes_a_usable_hash(tmp_path: Path, monkeypatch) -> None:
    import io

    from gateway.cli import main
    from gateway.users import authenticate, load_users

    path = tmp_path / "users"
    monkeypatch.setattr("sys.stdin", io.StringIO("correct horse\n"))
    assert main(["passwd", "--users-file", str(path), "--password-stdin",
                 "--from-number", "+15550101234", "copier"]) == 0
    users = load_users(path)
    assert authenticate(users, "copier", "correct horse").from_number == "+15550101234"
    assert authenticate(users, "copier", "wrong") is None
    assert oct(path.stat().st_mode & 0o777) == "0o600"


async def test_failed_starttls_handshake_is_one_log_line(make_gateway, cert, users,
                                                         tmp_path: Path, caplog) -> None:
    """An old copier whose TLS the gateway refuses: one WARNING line, no traceback at ERROR."""
    gw = await make_gateway(secure_env(tmp_path, cert, users))
    caplog.set_level(logging.INFO)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.smtp.port)
    await reader.readline()
    writer.write(b"EHLO copier.test\r\n")
    while (await reader.readline())[3:4] == b"-":
        pass
    writer.write(b"STARTTLS\r\n")
    assert (await reader.readline()).startswith(b"220")
    writer.write(b"\x16\x03\x01\x00\x05not a client hello\r\n" * 4)
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), 20) == b""  # the server closed it
    writer.close()
    handshake = [r for r in caplog.records if "STARTTLS handshake failed" in r.getMessage()]
    assert len(handshake) == 1 and handshake[0].levelno == logging.WARNING
    assert handshake[0].exc_info is None
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_starttls_required_reply_has_enhanced_code(make_gateway, cert, users,
                                                         tmp_path: Path) -> None:
    gw = await make_gateway(secure_env(tmp_path, cert, users, SMTP_REQUIRE_TLS="true"))

    def run() -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", gw.smtp.port, timeout=20) as client:
            client.ehlo("old.test")
            return client.mail("alice@example.com")

    assert await in_thread(run) == (530, b"5.7.0 Must issue a STARTTLS command first")


async def test_auth_user_name_case_insensitive(make_gateway, cert, users, tmp_path: Path) -> None:
    gw = await make_gateway(secure_env(tmp_path, cert, users))

    def run() -> tuple[int, bytes]:
        with session(gw.smtp.port) as client:
            return client.login("SCANNER", "s3cret pass")

    assert (await in_thread(run))[0] == 235
