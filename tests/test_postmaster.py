"""postmaster@ the fax domain (RFC 5321 4.5.1): accepted and forwarded to the administrator
address (INBOUND_ADMIN_ADDRESS) through the report relay, never faxed; a real gateway, a real
relay sink, smtplib over loopback."""

from __future__ import annotations

import asyncio
import smtplib
from email.message import EmailMessage
from pathlib import Path

from gateway.constants import SMTP_LINE_TIMEOUT_S

from .conftest import RelaySink, base_env, pdf_mail, relay_env

ADMIN = "fax-admin@example.com"


def admin_env(tmp_path: Path, relay: RelaySink, **extra: str) -> dict[str, str]:
    return base_env(tmp_path / "var", **relay_env(relay), INBOUND_ADMIN_ADDRESS=ADMIN, **extra)


def session(port: int, mail_from: str, rcpts: list[str],
            data: bytes | None) -> list[tuple[int, str]]:
    """MAIL, each RCPT, DATA (when given): every reply, as (code, text)."""
    out: list[tuple[int, str]] = []
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("mx.remote.test")
        code, text = client.mail(mail_from)
        out.append((code, text.decode()))
        for rcpt in rcpts:
            code, text = client.rcpt(rcpt)
            out.append((code, text.decode()))
        if data is not None:
            try:
                code, text = client.data(data)
            except smtplib.SMTPDataError as exc:
                code, text = exc.smtp_code, exc.smtp_error
            out.append((code, text.decode()))
    return out


def note(subject: str) -> bytes:
    msg = EmailMessage()
    msg["From"] = "hostmaster@remote.test"
    msg["To"] = "postmaster@fax.local"
    msg["Subject"] = subject
    msg["Message-ID"] = "<note-1@remote.test>"
    msg.set_content("Your gateway's TLS certificate expires next week.\n")
    return msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))


async def test_postmaster_is_accepted_and_forwarded(relay: RelaySink, make_gateway,
                                                    tmp_path: Path) -> None:
    gw = await make_gateway(admin_env(tmp_path, relay))
    replies = await asyncio.to_thread(session, gw.smtp.port, "hostmaster@remote.test",
                                      ["Postmaster@FAX.local"], note("Certificate"))
    assert replies == [(250, "2.1.0 Sender OK"),
                       (250, "2.1.5 Recipient OK, postmaster@fax.local (forwarded to the "
                             "administrator)"),
                       (250, "2.0.0 Forwarded to the administrator of fax.local")]
    forwarded = await relay.next()
    assert relay.envelopes[-1] == ("faxgw@faxgw.test", [ADMIN])
    assert forwarded["Subject"] == ("Mail to postmaster@fax.local from hostmaster@remote.test: "
                                    "Certificate")
    assert forwarded["Auto-Submitted"] == "auto-forwarded"
    [original] = [p for p in forwarded.iter_attachments()
                  if p.get_content_type() == "message/rfc822"]
    inner = original.get_content()
    assert inner["Message-ID"] == "<note-1@remote.test>"
    assert "certificate expires" in inner.get_content()
    assert await gw.store.run(gw.store.jobs) == []  # nothing faxed


async def test_bare_postmaster_and_bounces_are_forwarded(relay: RelaySink, make_gateway,
                                                         tmp_path: Path) -> None:
    """`RCPT TO:<postmaster>` with no domain (RFC 5321 4.5.1), from the null sender: a bounce
    for the administrator, which a fax recipient would refuse as automatic mail."""
    gw = await make_gateway(admin_env(tmp_path, relay))
    replies = await asyncio.to_thread(session, gw.smtp.port, "", ["<postmaster>"],
                                      note("Undelivered Mail Returned to Sender"))
    assert [code for code, _ in replies] == [250, 250, 250], replies
    forwarded = await relay.next()
    assert forwarded["Subject"] == ("Mail to postmaster@fax.local from <>: Undelivered Mail "
                                    "Returned to Sender")


async def test_postmaster_and_numbers_travel_apart(relay: RelaySink, make_gateway,
                                                   tmp_path: Path) -> None:
    gw = await make_gateway(admin_env(tmp_path, relay))
    port = gw.smtp.port
    replies = await asyncio.to_thread(session, port, "alice@example.com",
                                      ["15551234567@fax.local", "postmaster@fax.local"], None)
    assert replies[2] == (452, "4.5.3 Too many recipients: mail to postmaster travels alone; "
                               "send it to this recipient in a separate message")
    replies = await asyncio.to_thread(session, port, "alice@example.com",
                                      ["postmaster@fax.local", "15551234567@fax.local"], None)
    assert replies[1][0] == 250 and replies[2][0] == 452


async def test_without_an_administrator_postmaster_is_refused_saying_why(
        relay: RelaySink, make_gateway, tmp_path: Path) -> None:
    gw = await make_gateway(base_env(tmp_path / "var", **relay_env(relay)))
    replies = await asyncio.to_thread(session, gw.smtp.port, "alice@example.com",
                                      ["postmaster@fax.local"], None)
    assert replies[1] == (550, "5.1.1 postmaster@fax.local has no mailbox on this fax gateway: "
                               "its administrator has not set INBOUND_ADMIN_ADDRESS")


async def test_relay_down_is_a_temporary_failure(relay: RelaySink, make_gateway,
                                                 tmp_path: Path) -> None:
    gw = await make_gateway(admin_env(tmp_path, relay))
    await relay.stop()
    replies = await asyncio.to_thread(session, gw.smtp.port, "alice@example.com",
                                      ["postmaster@fax.local"], bytes(pdf_mail(
                                          "postmaster@fax.local").as_bytes()))
    assert replies[-1][0] == 451 and replies[-1][1].startswith("4.4.0 Temporary failure: the "
                                                               "mail cannot be forwarded")


async def test_a_stalled_relay_is_answered_451_before_the_session_times_out(
        relay: RelaySink, make_gateway, tmp_path: Path) -> None:
    """The forward is handed to the relay inside DATA. A relay that never answers DATA is
    given up within the forward's bound (451, the client tries again), well before the
    session's own timer would close it with a 421 (after which a forward the relay did take
    would come again)."""
    gw = await make_gateway(admin_env(tmp_path, relay))
    postmaster = gw.smtp_handler.postmaster
    processing_timer_s = max(SMTP_LINE_TIMEOUT_S, 2 * gw.s.documents.timeout_s)  # server.py's
    assert postmaster.forward_timeout_s <= processing_timer_s / 2
    postmaster.forward_timeout_s = 1.0  # the bound, short for the test
    relay.stall_data = True
    replies = await asyncio.to_thread(session, gw.smtp.port, "hostmaster@remote.test",
                                      ["postmaster@fax.local"], note("Certificate"))
    assert relay.stalled.is_set()
    assert replies[-1] == (451, "4.4.0 Temporary failure: the mail cannot be forwarded to the "
                                "administrator right now; please try again later")
