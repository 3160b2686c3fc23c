"""Mail loops and automatic mail (issue 15, item 6): refused at DATA with 550 5.7.1, never
answered; mail systems *generate* (an ERP's invoices) is still faxed."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.jobs.outbound_states import State
from gateway.mail.loop_guard import automatic_mail, in_domain

from .conftest import base_env, job_ids, pdf_mail, smtp_send, wait_state


def mail(**headers: str) -> bytes:
    msg = pdf_mail("15551234567@fax.local")
    for name, value in headers.items():
        name = name.replace("_", "-")
        del msg[name]
        msg[name] = value
    return msg.as_bytes()


def bounce(report_type: str = "delivery-status", wrapped: bool = True) -> bytes:
    """A bounce as MTAs write it: multipart/report, or (older ones) multipart/mixed with a
    message/delivery-status part."""
    top = f"multipart/report; report-type={report_type}" if wrapped else "multipart/mixed"
    part = ("delivery-status" if report_type == "delivery-status"
            else "disposition-notification")
    return (f"From: Mail Delivery System <mail@relay.example>\r\n"
            f"To: 15551234567@fax.local\r\nSubject: Undelivered Mail Returned to Sender\r\n"
            f"MIME-Version: 1.0\r\nContent-Type: {top}; boundary=\"b1\"\r\n\r\n"
            "--b1\r\nContent-Type: text/plain\r\n\r\nThis is the mail system.\r\n"
            f"--b1\r\nContent-Type: message/{part}\r\n\r\n"
            "Reporting-MTA: dns; relay.example\r\n\r\n"
            "--b1--\r\n").encode()


@pytest.mark.parametrize("content,envelope,words", [
    (mail(), "", "empty envelope sender <>"),
    (mail(), "<>", "empty envelope sender <>"),
    (mail(), "MAILER-DAEMON@relay.example", "mail system (MAILER-DAEMON)"),
    (mail(From="Mail Delivery Subsystem <MAILER-DAEMON@relay.example>"), "x@relay.example",
     "mail system (MAILER-DAEMON)"),
    (mail(From="postmaster@example.com"), "a@example.com", "mail system (POSTMASTER)"),
    (mail(Auto_Submitted="auto-replied"), "alice@example.com",
     "automatic reply (Auto-Submitted: auto-replied)"),
    (mail(Auto_Submitted="Auto-Notified; owner-email=x@y"), "alice@example.com",
     "automatic reply (Auto-Submitted: auto-notified)"),
    (mail(X_Autoreply="yes"), "alice@example.com", "automatic reply (X-Autoreply)"),
    (mail(X_Autorespond="Out of office"), "alice@example.com",
     "automatic reply (X-Autorespond)"),
    (mail(Precedence="auto_reply"), "alice@example.com", "(Precedence: auto_reply)"),
    (mail(X_Faxgw_Report="0123456789abcdef"), "faxgw@faxgw.test", "report from a fax gateway"),
    (mail(X_Faxgw_Job="0123456789abcdef"), "faxgw@faxgw.test", "report from a fax gateway"),
    (bounce(), "alice@example.com", "mail system report (delivery-status)"),
    (bounce("disposition-notification"), "alice@example.com",
     "mail system report (disposition-notification)"),
    (bounce(wrapped=False), "alice@example.com", "report (message/delivery-status)"),
    # The part's type in odd case, folded onto a second line, or after a few other parts.
    (bounce(wrapped=False).replace(b"message/delivery-status", b"Message/Delivery-Status"),
     "alice@example.com", "report (message/delivery-status)"),
    (bounce(wrapped=False).replace(b"Content-Type: message/", b"Content-Type:\r\n\tmessage/"),
     "alice@example.com", "report (message/delivery-status)"),
    (bounce(wrapped=False).replace(b"--b1\r\nContent-Type: message/",
                                   b"--b1\r\nContent-Type: image/png\r\n\r\nx\r\n" * 5
                                   + b"--b1\r\nContent-Type: message/"),
     "alice@example.com", "report (message/delivery-status)"),
])
def test_automatic_mail_is_named(content: bytes, envelope: str, words: str) -> None:
    reason = automatic_mail(content, envelope)
    assert reason is not None and words in reason, reason


@pytest.mark.parametrize("content", [
    mail(),
    mail(Auto_Submitted="auto-generated"),          # an ERP faxing its invoices
    mail(Auto_Submitted="no"),
    mail(X_Autoreply="no"),
    mail(Precedence="bulk"),
])
def test_mail_people_and_systems_send_on_purpose_is_faxed(content: bytes) -> None:
    assert automatic_mail(content, "alice@example.com") is None
    assert automatic_mail(content, None) is None


def test_a_bounce_forwarded_as_an_attachment_is_a_document() -> None:
    msg = pdf_mail("15551234567@fax.local")
    msg.add_attachment(bounce(), maintype="message", subtype="rfc822")
    assert automatic_mail(msg.as_bytes(), "alice@example.com") is None


@pytest.mark.parametrize("address,inside", [
    ("15551234567@fax.local", True), ("x@FAX.LOCAL.", True), ("x@sub.fax.local", True),
    ("<x@fax.local>", True), ("x@notfax.local", False), ("x@fax.local.example", False),
    ("fax.local@example.com", False),
])
def test_in_domain(address: str, inside: bool) -> None:
    assert in_domain(address, "fax.local") is inside


async def test_a_report_looped_back_through_the_gateway_ends_the_loop(
        make_gateway, tmp_path: Path) -> None:
    gw = await make_gateway(base_env(tmp_path / "var"))
    reply = await smtp_send(gw.smtp.port, pdf_mail("15551234567@fax.local"),
                            ["15551234567@fax.local"])
    [job_id] = job_ids(reply.text)
    await wait_state(gw, job_id, State.REPORTED)
    outbox = tmp_path / "var" / "outbox"
    report = (outbox / f"{job_id}.eml").read_bytes()
    assert f"X-Faxgw-Report: {job_id}".encode() in report

    # Someone (a forwarding rule, a typo in a report address) mails the report to a fax number.
    looped = await smtp_send(gw.smtp.port, report, ["15551239999@fax.local"],
                             mail_from="faxgw@faxgw.test")
    assert looped.code == 550, looped.text
    assert looped.text.startswith("5.7.1 Not faxed: this is a report from a fax gateway")
    # An out-of-office answer to a report: refused too, and nobody is mailed about either.
    ooo = mail(Auto_Submitted="auto-replied", Subject="Out of office: Fax delivered")
    refused = await smtp_send(gw.smtp.port, ooo, ["15551234567@fax.local"])
    assert refused.code == 550 and "automatic reply" in refused.text
    bounced = await smtp_send(gw.smtp.port, mail(), ["15551234567@fax.local"], mail_from="")
    assert bounced.code == 550 and "empty envelope sender" in bounced.text
    assert sorted(p.name for p in outbox.iterdir()) == [f"{job_id}.eml"]
    assert len(gw.simulator_state.send_requests) == 1

    # The ERP's automatically generated invoice is faxed.
    erp = await smtp_send(gw.smtp.port, mail(Auto_Submitted="auto-generated"),
                          ["15551234567@fax.local"], mail_from="erp@example.com")
    assert erp.code == 250, erp.text


async def test_no_report_is_addressed_into_the_fax_domain(make_gateway, tmp_path: Path) -> None:
    gw = await make_gateway(base_env(tmp_path / "var"))
    msg = pdf_mail("15551234567@fax.local", sender="15550001111@sub.fax.local")
    reply = await smtp_send(gw.smtp.port, msg, ["15551234567@fax.local"],
                            mail_from="15550001111@fax.local")
    assert reply.code == 250, reply.text
    [job_id] = job_ids(reply.text)
    await wait_state(gw, job_id, State.REPORTED)
    assert not (tmp_path / "var" / "outbox").exists() or \
        list((tmp_path / "var" / "outbox").iterdir()) == []
    job = await gw.store.run(gw.store.job, job_id)
    message = await gw.store.run(gw.store.message, job.message_id)
    assert message.report_to is None
    assert "no report: the sender address 15550001111@sub.fax.local is in the fax domain" \
        in (message.notes or "")
    events = await gw.store.run(gw.store.events, job_id)
    assert any("no report sent" in (e.detail or "") for e in events)
