"""ESMTP as the relays in front of the gateway speak it (issue 25, items 1-3): `AUTH=` on MAIL
(Exchange Online, vCenter, Postfix), the DSN parameters (RFC 3461), PIPELINING (RFC 2920) and
ENHANCEDSTATUSCODES (RFC 2034), on the wire: a raw socket writing several commands at once and
reading every reply in order, and smtplib through STARTTLS and AUTH as a relay does."""

from __future__ import annotations

import asyncio
import shutil
import smtplib
import ssl
from pathlib import Path
from typing import Any

import pytest

from gateway.users import User, hash_password, write_user

from .conftest import base_env, job_ids, make_pdf, pdf_mail, pg_reset
from .helpers.tls import cert  # noqa: F401 - a fixture

RCPT = "15551234567@fax.local"


class Wire:
    """A raw SMTP client: writes what it is given as one write, reads replies one by one."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Wire:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        wire = cls(reader, writer)
        greeting = await wire.reply()
        assert greeting[0].startswith("220 "), greeting
        return wire

    def send(self, *lines: str) -> None:
        self.writer.write("".join(f"{line}\r\n" for line in lines).encode())

    async def reply(self) -> list[str]:
        """One reply, all its lines."""
        lines = []
        while True:
            line = (await asyncio.wait_for(self.reader.readline(), 20)).decode().rstrip("\r\n")
            assert line, "connection closed"
            lines.append(line)
            if line[3:4] != "-":
                return lines

    async def one(self) -> str:
        [line] = await self.reply()
        return line

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


def data_of(msg: Any) -> bytes:
    return msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))


def message_end(data: bytes) -> bytes:
    """The mail as DATA sends it: dot-stuffed, ending in CRLF "." CRLF."""
    lines = data.split(b"\r\n")
    data = b"\r\n".join(b"." + line if line.startswith(b".") else line for line in lines)
    return data + (b".\r\n" if data.endswith(b"\r\n") else b"\r\n.\r\n")


@pytest.fixture(params=["sqlite", "postgres"])
def store_env(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, str]:
    """The gateway's settings on either store: the DSN fields must survive both."""
    if request.param == "sqlite":
        return base_env(tmp_path / "var")
    url = request.getfixturevalue("pg_url")
    pg_reset(url)
    seaweed = request.getfixturevalue("seaweed")
    mp = request.getfixturevalue("monkeypatch")
    mp.setenv("AWS_ACCESS_KEY_ID", seaweed.access_key)
    mp.setenv("AWS_SECRET_ACCESS_KEY", seaweed.secret_key)
    return base_env(tmp_path / "var", DATABASE_URL=url, NODE_ID="dsn-a", MEDIA_STORE="s3",
                    S3_BUCKET="faxgw-dsn", S3_PREFIX="dsn", S3_ENDPOINT_URL=seaweed.endpoint_url,
                    S3_REGION=seaweed.region)


async def test_pipelined_mail_with_auth_dsn_and_size_in_one_write(manual_gateway,
                                                                  store_env) -> None:
    """EHLO, MAIL with AUTH=<> BODY=8BITMIME SIZE= RET= ENVID=, RCPT with NOTIFY and ORCPT,
    and DATA in ONE write, as a pipelining relay sends them: every reply comes, in order, and
    the parameters are kept with the message and its job."""
    gw = await manual_gateway(store_env)
    wire = await Wire.open(gw.smtp.port)
    wire.send("EHLO relay.example.com",
              "MAIL FROM:<erp@example.com> AUTH=<> BODY=8BITMIME SIZE=123 RET=HDRS "
              "ENVID=INV+2B42-xyz",
              f"RCPT TO:<{RCPT}> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;Fax+2B1@erp.example.com",
              "RCPT TO:<15551230009@fax.local> NOTIFY=never",
              "DATA")
    ehlo = await wire.reply()
    keywords = {line[4:].split()[0].upper() for line in ehlo[1:]}
    assert {"PIPELINING", "DSN", "ENHANCEDSTATUSCODES", "8BITMIME", "SIZE"} <= keywords
    assert ehlo[-1] == "250 HELP"
    assert await wire.one() == "250 2.1.0 Sender OK"
    assert await wire.one() == "250 2.1.5 Recipient OK, fax to +15551234567"
    assert await wire.one() == "250 2.1.5 Recipient OK, fax to +15551230009"
    assert (await wire.one()).startswith("354 ")
    mail = pdf_mail([RCPT], sender="erp@example.com", message_id="<inv-42@erp.example.com>")
    wire.writer.write(message_end(data_of(mail)))
    done = await wire.one()
    assert done.startswith("250 2.0.0 Queued as fax jobs "), done
    wire.send("QUIT")
    assert await wire.one() == "221 2.0.0 Bye"
    await wire.close()

    first, second = job_ids(done)
    job = await gw.store.run(gw.store.job, first)
    assert (job.dsn_notify, job.dsn_orcpt) == ("SUCCESS,FAILURE", "rfc822;Fax+1@erp.example.com")
    other = await gw.store.run(gw.store.job, second)
    assert (other.dsn_notify, other.dsn_orcpt) == ("NEVER", None)
    message = await gw.store.run(gw.store.message, job.message_id)
    assert (message.dsn_ret, message.dsn_envid, message.auth_submitter) == \
        ("HDRS", "INV+42-xyz", "<>")
    # The header block is what a DSN returns of it (RET=HDRS); no whole mail kept.
    assert "Message-ID: <inv-42@erp.example.com>" in message.dsn_headers
    assert "Please fax" not in message.dsn_headers and message.dsn_full is None


async def test_a_mail_without_dsn_keeps_no_copy(manual_gateway, tmp_path: Path) -> None:
    gw = await manual_gateway(base_env(tmp_path / "var"))
    wire = await Wire.open(gw.smtp.port)
    wire.send("EHLO relay.example.com", "MAIL FROM:<a@example.com> RET=FULL",
              f"RCPT TO:<{RCPT}>", "DATA")
    await wire.reply()
    assert [await wire.one() for _ in range(2)] == ["250 2.1.0 Sender OK",
                                                      "250 2.1.5 Recipient OK, fax to "
                                                      "+15551234567"]
    assert (await wire.one()).startswith("354 ")
    wire.writer.write(message_end(data_of(pdf_mail(RCPT))))
    [job_id] = job_ids(await wire.one())
    await wire.close()
    job = await gw.store.run(gw.store.job, job_id)
    message = await gw.store.run(gw.store.message, job.message_id)
    assert job.dsn_notify is None and message.dsn_ret == "FULL"
    assert message.dsn_headers is None and message.dsn_full is None


async def test_ret_full_keeps_the_mail_within_its_bound(manual_gateway, tmp_path: Path,
                                                        monkeypatch) -> None:
    """The spool keeps only the PDF: RET=FULL keeps the whole mail up to FULL_MAX_BYTES, a
    larger one only its header block (what RET=HDRS returns)."""
    from gateway.smtp import esmtp_params as dsn

    gw = await manual_gateway(base_env(tmp_path / "var"))
    small = data_of(pdf_mail(RCPT, message_id="<small@example.com>", pdf=make_pdf(1)))
    big = data_of(pdf_mail(RCPT, message_id="<big@example.com>", pdf=make_pdf(12)))
    assert len(big) > len(small) + 1000
    monkeypatch.setattr(dsn, "FULL_MAX_BYTES", len(small) + 100)  # the bound, made small
    kept = {}
    for name, data in (("small", small), ("big", big)):
        wire = await Wire.open(gw.smtp.port)
        wire.send("EHLO r.example", "MAIL FROM:<a@example.com> RET=FULL",
                  f"RCPT TO:<{RCPT}> NOTIFY=FAILURE", "DATA")
        for _ in range(3):
            assert (await wire.reply())[-1].startswith("250 ")
        assert (await wire.one()).startswith("354 ")
        wire.writer.write(message_end(data))
        [job_id] = job_ids(await wire.one())
        await wire.close()
        job = await gw.store.run(gw.store.job, job_id)
        kept[name] = await gw.store.run(gw.store.message, job.message_id)
    assert kept["small"].dsn_full is not None
    assert kept["small"].dsn_full.encode() == small  # byte for byte as received
    assert kept["big"].dsn_full is None
    assert "Message-ID: <big@example.com>" in kept["big"].dsn_headers


@pytest.mark.parametrize(("command", "expected"), [
    ("MAIL FROM:<a@example.com> RET=BOGUS",
     "501 5.5.4 Invalid parameter: RET must be FULL or HDRS"),
    ("MAIL FROM:<a@example.com> RET=HDRS RET=FULL",
     "501 5.5.4 Invalid parameter: RET given twice"),
    ("MAIL FROM:<a@example.com> ENVID=abc+0Ddef",
     "501 5.5.4 Invalid parameter: ENVID is not valid xtext (RFC 3461)"),
    ("MAIL FROM:<a@example.com> ENVID=" + "x" * 101,
     "501 5.5.4 Invalid parameter: ENVID longer than 100 characters"),
    ("MAIL FROM:<a@example.com> AUTH=a+zz@b",
     "501 5.5.4 Invalid parameter: AUTH= is not <> or valid xtext (RFC 4954)"),
    ("MAIL FROM:<a@example.com> AUTH",
     "501 5.5.4 Invalid parameter: AUTH needs a value (AUTH=...)"),
    ("MAIL FROM:<a@example.com> FOO=1",
     "555 5.5.4 MAIL FROM parameters not recognized or not implemented"),
    # aiosmtpd's own checks still run on what is left, with their enhanced codes.
    ("MAIL FROM:<a@example.com> AUTH=<> SIZE=999999999999 RET=HDRS",
     "552 5.3.4 Error: message size exceeds fixed maximum message size"),
    ("MAIL FROM:<a@example.com> ENVID=x BODY=BINARYMIME",
     "501 5.5.4 Error: BODY can only be one of 7BIT, 8BITMIME"),
])
async def test_bad_mail_parameters_get_exact_replies(manual_gateway, tmp_path: Path,
                                                     command: str, expected: str) -> None:
    gw = await manual_gateway(base_env(tmp_path / "var"))
    wire = await Wire.open(gw.smtp.port)
    wire.send("EHLO r.example", command)
    await wire.reply()
    assert await wire.one() == expected
    await wire.close()


@pytest.mark.parametrize(("params", "expected"), [
    ("NOTIFY=NEVER,SUCCESS", "501 5.5.4 Invalid parameter: NOTIFY must be NEVER, or one or "
     "more of SUCCESS, FAILURE, DELAY separated by commas"),
    ("NOTIFY=SUCCESS,SUCCESS", "501 5.5.4 Invalid parameter: NOTIFY must be NEVER, or one or "
     "more of SUCCESS, FAILURE, DELAY separated by commas"),
    ("NOTIFY=SOMETIMES", "501 5.5.4 Invalid parameter: NOTIFY must be NEVER, or one or more "
     "of SUCCESS, FAILURE, DELAY separated by commas"),
    ("ORCPT=alice@example.com", "501 5.5.4 Invalid parameter: ORCPT must be addr-type;xtext, "
     "e.g. ORCPT=rfc822;alice@example.com"),
    ("NOTIFY=DELAY NOTIFY=DELAY", "501 5.5.4 Invalid parameter: NOTIFY given twice"),
    ("XYZZY=1", "555 5.5.4 RCPT TO parameters not recognized or not implemented"),
])
async def test_bad_rcpt_parameters_get_exact_replies(manual_gateway, tmp_path: Path,
                                                     params: str, expected: str) -> None:
    gw = await manual_gateway(base_env(tmp_path / "var"))
    wire = await Wire.open(gw.smtp.port)
    wire.send("EHLO r.example", "MAIL FROM:<a@example.com>", f"RCPT TO:<{RCPT}> {params}",
              f"RCPT TO:<{RCPT}> NOTIFY=DELAY ORCPT=rfc822;" + "a" * 400 + "@example.com")
    await wire.reply()
    assert await wire.one() == "250 2.1.0 Sender OK"
    assert await wire.one() == expected
    # A long ORCPT (RCPT up to 512 + 500 characters once DSN is offered) is taken.
    assert await wire.one() == "250 2.1.5 Recipient OK, fax to +15551234567"
    await wire.close()


async def test_enhanced_status_codes_on_aiosmtpds_own_replies(manual_gateway,
                                                              tmp_path: Path) -> None:
    """RFC 2034: every reply but the greeting and HELO/EHLO's carries an enhanced code, those
    aiosmtpd writes itself included; a HELO client gets no ESMTP parameters."""
    gw = await manual_gateway(base_env(tmp_path / "var"))
    wire = await Wire.open(gw.smtp.port)
    wire.send("HELO old.example", f"RCPT TO:<{RCPT}>", "MAIL FROM:<a@example.com> RET=HDRS",
              "NOOP", "RSET", "FOO", "MAIL FROM:<a@example.com>", "MAIL FROM:<b@example.com>",
              "QUIT")
    assert await wire.one() == "250 faxgw.test"
    assert await wire.one() == "503 5.5.1 Error: need MAIL command"
    assert await wire.one() == "501 5.5.4 Syntax: MAIL FROM: <address>"
    assert await wire.one() == "250 2.0.0 OK"
    assert await wire.one() == "250 2.0.0 OK"
    assert await wire.one() == '500 5.5.2 Error: command "FOO" not recognized'
    assert await wire.one() == "250 2.1.0 Sender OK"
    assert await wire.one() == "503 5.5.1 Error: nested MAIL command"
    assert await wire.one() == "221 2.0.0 Bye"
    await wire.close()


# -- STARTTLS and AUTH, as Exchange Online or a Postfix relay with a login ----------------------

pytestmark_tls = pytest.mark.skipif(shutil.which("openssl") is None,
                                    reason="the openssl command is needed for a certificate")


@pytest.fixture(scope="module")
def users(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("users") / "users"
    write_user(path, User("relay", hash_password("relay pw")))
    return path


def _tls() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


@pytestmark_tls
async def test_relay_through_starttls_and_auth_with_auth_and_dsn_parameters(
        manual_gateway, cert, users, tmp_path: Path) -> None:
    """As Exchange Online sends: EHLO, STARTTLS, EHLO, AUTH LOGIN, then MAIL with AUTH=<the
    submitter> BODY=8BITMIME SIZE=, RCPT with NOTIFY; before, MAIL got 555. The submitter is
    recorded; an unauthenticated client's AUTH= is recorded as <> (RFC 4954 5)."""
    gw = await manual_gateway(base_env(
        tmp_path / "var", TLS_CERT_FILE=str(cert[0]), TLS_KEY_FILE=str(cert[1]),
        USERS_FILE=str(users), TRUSTED_NETWORKS="127.0.0.1/32"))
    data = data_of(pdf_mail(RCPT, sender="clerk@example.com"))

    def run() -> tuple[dict[str, str], list[tuple[int, bytes]]]:
        out = []
        with smtplib.SMTP("127.0.0.1", gw.smtp.port, timeout=20) as client:
            client.ehlo("mail.protection.outlook.com")
            client.starttls(context=_tls())
            client.ehlo("mail.protection.outlook.com")
            features = dict(client.esmtp_features)
            client.login("relay", "relay pw")
            out.append(client.mail("clerk@example.com", [
                "AUTH=clerk+2Bfax@example.com", "BODY=8BITMIME", f"SIZE={len(data)}",
                "RET=FULL", "ENVID=m365-1"]))
            out.append(client.rcpt(RCPT, ["NOTIFY=FAILURE,DELAY"]))
            out.append(client.data(data))
        with smtplib.SMTP("127.0.0.1", gw.smtp.port, timeout=20) as client:  # trusted network
            client.ehlo("vcenter.example")
            out.append(client.mail("vcenter@example.com", ["AUTH=admin@example.com"]))
            out.append(client.rcpt(RCPT))
            out.append(client.data(data_of(pdf_mail(RCPT, sender="vcenter@example.com"))))
        return features, out

    features, out = await asyncio.to_thread(run)
    assert {"pipelining", "dsn", "enhancedstatuscodes", "auth"} <= set(features)
    assert out[0] == (250, b"2.1.0 Sender OK")
    assert out[1] == (250, b"2.1.5 Recipient OK, fax to +15551234567")
    assert out[2][0] == 250 and out[4][0] == 250 and out[5][0] == 250, out
    [job_id] = job_ids(out[2][1].decode())
    job = await gw.store.run(gw.store.job, job_id)
    message = await gw.store.run(gw.store.message, job.message_id)
    assert (message.auth_submitter, message.dsn_envid, message.dsn_ret) == \
        ("clerk+fax@example.com", "m365-1", "FULL")
    assert job.dsn_notify == "FAILURE,DELAY"
    assert message.dsn_full is not None and "clerk@example.com" in message.dsn_full
    [job_id] = job_ids(out[5][1].decode())
    job = await gw.store.run(gw.store.job, job_id)
    message = await gw.store.run(gw.store.message, job.message_id)
    assert message.auth_submitter == "<>"


@pytestmark_tls
async def test_commands_pipelined_after_starttls_are_discarded(manual_gateway, cert, users,
                                                              tmp_path: Path) -> None:
    """With PIPELINING offered, STARTTLS must still end a group (RFC 2920, RFC 3207 4.2):
    plaintext written after it in the same write is thrown away, never run inside TLS."""
    gw = await manual_gateway(base_env(
        tmp_path / "var", TLS_CERT_FILE=str(cert[0]), TLS_KEY_FILE=str(cert[1]),
        USERS_FILE=str(users), TRUSTED_NETWORKS="127.0.0.1/32"))
    wire = await Wire.open(gw.smtp.port)
    wire.send("EHLO r.example")
    assert "250-STARTTLS" in await wire.reply()
    wire.send("STARTTLS", "HELP", "MAIL FROM:<injected@example.com>")
    assert await wire.one() == "220 2.0.0 Ready to start TLS"
    await wire.writer.start_tls(_tls())
    wire.send("NOOP", "EHLO r.example", "MAIL FROM:<a@example.com>", "QUIT")
    assert await wire.one() == "250 2.0.0 OK"
    assert (await wire.reply())[-1] == "250 HELP"
    assert await wire.one() == "250 2.1.0 Sender OK"  # not "503 nested MAIL"
    assert await wire.one() == "221 2.0.0 Bye"
    await wire.close()
