"""DSN end to end (RFC 3461/3464, issue 25 item 2): a relay's mail with NOTIFY/RET/ENVID/ORCPT
over real SMTP, the fax at the simulator over HTTP, and the report at the relay sink parsed
with the email package and read field by field, as an ERP would: delivered, failed, NEVER (no
mail), DELAY (a `delayed` notice when a busy fax is put back for a retry), and no NOTIFY (the
usual report, unchanged); and an operator's resend, which keeps what the sender asked."""

from __future__ import annotations

import asyncio
import os
import smtplib
import subprocess
import sys
from email.message import EmailMessage
from email.utils import parsedate_to_datetime
from pathlib import Path

from gateway.jobs.outbound_states import RetryPolicy, State
from gateway.outbound import actions

from .conftest import (
    RelaySink,
    Simulator,
    job_ids,
    make_pdf,
    pdf_mail,
    production_env,
    relay_env,
    wait_state,
)

DELIVERED = "15551234567@fax.local"   # the simulator delivers
BUSY = "15551230000@fax.local"        # ...0000 busy
FAILED = "15551230002@fax.local"      # ...0002 failed "The call dropped prematurely"


def send(port: int, mail: EmailMessage, rcpts: dict[str, list[str]],
         mail_options: list[str]) -> str:
    """MAIL with `mail_options`, RCPT with each recipient's options, DATA; the DATA reply."""
    data = mail.as_bytes(policy=mail.policy.clone(linesep="\r\n"))
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("erp.example.com")
        assert client.has_extn("dsn")
        code, text = client.mail("erp@example.com", mail_options)
        assert code == 250, text
        for rcpt, options in rcpts.items():
            code, text = client.rcpt(rcpt, options)
            assert code == 250, text
        code, text = client.data(data)
        assert code == 250, text
        return text.decode()


def faxgw_job(env: dict[str, str], job_id: str) -> str:
    """What `faxgw job ID` prints, run as an operator would, against the gateway's store."""
    done = subprocess.run([sys.executable, "-m", "gateway", "job", job_id],
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def status_fields(report: EmailMessage) -> tuple[EmailMessage, EmailMessage]:
    """The per-message and the per-recipient fields of a one-recipient DSN."""
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    parts = list(report.iter_parts())
    assert parts[1].get_content_type() == "message/delivery-status"
    per_message, recipient = parts[1].get_payload()
    return per_message, recipient


async def test_delivered_and_failed_reports_are_dsns_field_by_field(
        make_gateway, simulator: Simulator, relay: RelaySink, tmp_path: Path) -> None:
    gw = await make_gateway(production_env(tmp_path / "var", simulator, FAX_MAX_ATTEMPTS="1",
                                           **relay_env(relay)))
    mail = pdf_mail([DELIVERED, FAILED], sender="erp@example.com",
                    message_id="<inv-42@erp.example.com>", subject="Invoice 42")
    reply = await asyncio.to_thread(
        send, gw.smtp.port, mail,
        {DELIVERED: ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;fax+2Bdesk@customer.example"],
         FAILED: ["NOTIFY=FAILURE"]},
        ["RET=HDRS", "ENVID=INV-42+2Bsap"])
    delivered_id, failed_id = job_ids(reply)
    reports = {}
    for _ in range(2):
        report = await relay.next()
        reports[report["X-Faxgw-Job"]] = report

    # Delivered: the report people read, then the status, then the original headers.
    report = reports[delivered_id]
    job = await gw.store.run(gw.store.job, delivered_id)
    message = await gw.store.run(gw.store.message, job.message_id)
    assert report["To"] == "erp@example.com"
    assert report["Subject"] == "Fax to +1 555-123-4567 delivered, 2 pages"
    assert report["In-Reply-To"] == "<inv-42@erp.example.com>"
    human, status, returned = report.iter_parts()
    assert human.get_content_type() == "multipart/alternative"
    assert "was delivered" in human.get_body(("plain",)).get_content()
    assert human.get_body(("html",)) is not None
    per_message, recipient = status_fields(report)
    assert per_message["Reporting-MTA"] == "dns; faxgw.test"
    assert per_message["Original-Envelope-Id"] == "INV-42+2Bsap"  # xtext, as it came
    assert parsedate_to_datetime(per_message["Arrival-Date"]).timestamp() == \
        int(message.created_at)
    assert recipient["Original-Recipient"] == "rfc822; fax+2Bdesk@customer.example"
    assert recipient["Final-Recipient"] == "rfc822; +15551234567@fax.local"
    assert recipient["Action"] == "delivered"
    assert recipient["Status"] == "2.0.0"
    assert recipient["Diagnostic-Code"] is None
    assert returned.get_content_type() == "text/rfc822-headers"
    headers = returned.get_content()
    assert "Message-ID: <inv-42@erp.example.com>" in headers
    assert "Subject: Invoice 42" in headers and "Please fax" not in headers

    # Failed: Action failed, a 4.4.2 (the line dropped), SignalWire's code and words.
    report = reports[failed_id]
    assert report["Subject"] == "Fax to +1 555-123-0002 not delivered: the transmission failed"
    per_message, recipient = status_fields(report)
    assert per_message["Original-Envelope-Id"] == "INV-42+2Bsap"
    assert recipient["Original-Recipient"] is None
    assert recipient["Final-Recipient"] == "rfc822; +15551230002@fax.local"
    assert recipient["Action"] == "failed"
    assert recipient["Status"] == "4.4.2"
    assert recipient["Diagnostic-Code"] == \
        "X-SignalWire; 30003 The call dropped prematurely"
    assert "transmission failed" in next(report.iter_parts()).get_body(
        ("plain",)).get_content()


async def test_ret_full_returns_the_original_mail(
        make_gateway, simulator: Simulator, relay: RelaySink, tmp_path: Path) -> None:
    gw = await make_gateway(production_env(tmp_path / "var", simulator, FAX_MAX_ATTEMPTS="1",
                                           **relay_env(relay)))
    pdf = make_pdf(1)
    mail = pdf_mail(FAILED, sender="erp@example.com", pdf=pdf, message_id="<full@erp.example>")
    await asyncio.to_thread(send, gw.smtp.port, mail, {FAILED: ["NOTIFY=FAILURE"]},
                            ["RET=FULL"])
    report = await relay.next()
    _per_message, recipient = status_fields(report)
    assert recipient["Action"] == "failed"
    returned = list(report.iter_parts())[2]
    assert returned.get_content_type() == "message/rfc822"
    original = returned.get_content()
    assert original["Message-ID"] == "<full@erp.example>"
    [attachment] = list(original.iter_attachments())
    assert attachment.get_content() == pdf


async def test_never_sends_no_mail_and_no_notify_keeps_the_usual_report(
        make_gateway, simulator: Simulator, relay: RelaySink, tmp_path: Path) -> None:
    gw = await make_gateway(production_env(tmp_path / "var", simulator, **relay_env(relay)))
    other = "15551234568@fax.local"
    reply = await asyncio.to_thread(
        send, gw.smtp.port, pdf_mail([DELIVERED, other], sender="erp@example.com"),
        {DELIVERED: ["NOTIFY=NEVER"], other: []}, ["RET=HDRS", "ENVID=x"])
    never_id, usual_id = job_ids(reply)
    report = await relay.next()
    # The one without NOTIFY: the usual report, not a multipart/report.
    assert report["X-Faxgw-Job"] == usual_id
    assert report.get_content_type() == "multipart/alternative"
    await wait_state(gw, never_id, State.REPORTED)
    await wait_state(gw, usual_id, State.REPORTED)
    assert relay.messages.empty() and len(relay.envelopes) == 1  # nothing for NEVER
    events = await gw.store.run(gw.store.events, never_id)
    assert events[-1].kind == "reported"
    assert events[-1].detail == "no report sent: NOTIFY=NEVER (RFC 3461)"
    # A delivered fax whose sender asked only for failures gets no mail either.
    reply = await asyncio.to_thread(
        send, gw.smtp.port, pdf_mail(DELIVERED, sender="erp@example.com"),
        {DELIVERED: ["NOTIFY=FAILURE"]}, [])
    [job_id] = job_ids(reply)
    await wait_state(gw, job_id, State.REPORTED)
    assert relay.messages.empty() and len(relay.envelopes) == 1


async def test_delay_notice_once_per_busy_retry_then_the_failure(
        make_gateway, simulator: Simulator, relay: RelaySink, tmp_path: Path) -> None:
    gw = await make_gateway(production_env(
        tmp_path / "var", simulator, FAX_MAX_ATTEMPTS="3", FAX_RETRY_DELAY_SECONDS="0.2",
        **relay_env(relay)))
    reply = await asyncio.to_thread(
        send, gw.smtp.port, pdf_mail(BUSY, sender="erp@example.com"),
        {BUSY: ["NOTIFY=DELAY,FAILURE"]}, ["ENVID=busy-1"])
    [job_id] = job_ids(reply)
    got = [await relay.next() for _ in range(3)]  # two retries, then the final report
    delays, final = got[:2], got[2]
    for n, notice in enumerate(delays, start=1):
        assert notice["Message-ID"] == f"<faxgw-delay.{job_id}.{n}@faxgw.test>"
        assert notice["Subject"].startswith("Fax to +1 555-123-0000 delayed: line busy")
        per_message, recipient = status_fields(notice)
        assert per_message["Original-Envelope-Id"] == "busy-1"
        assert recipient["Final-Recipient"] == "rfc822; +15551230000@fax.local"
        assert recipient["Action"] == "delayed"
        assert recipient["Status"] == "4.4.1"
        assert recipient["Diagnostic-Code"] == "X-SignalWire; busy"
        assert recipient["Will-Retry-Until"] is not None
        assert "tries again" in next(notice.iter_parts()).get_content()
    _per_message, recipient = status_fields(final)
    assert (recipient["Action"], recipient["Status"]) == ("failed", "4.4.1")
    await wait_state(gw, job_id, State.REPORTED)
    events = await gw.store.run(gw.store.events, job_id)
    assert [e.detail.split(" via ")[0] for e in events if e.kind == "dsn"] == [
        "delay notice after attempt 1 relayed", "delay notice after attempt 2 relayed"]
    assert relay.messages.empty()


async def test_no_delay_notice_without_delay(make_gateway, simulator: Simulator,
                                             relay: RelaySink, tmp_path: Path) -> None:
    gw = await make_gateway(production_env(
        tmp_path / "var", simulator, FAX_MAX_ATTEMPTS="2", FAX_RETRY_DELAY_SECONDS="0.2",
        **relay_env(relay)))
    reply = await asyncio.to_thread(send, gw.smtp.port, pdf_mail(BUSY, sender="e@example.com"),
                                    {BUSY: ["NOTIFY=FAILURE"]}, [])
    [job_id] = job_ids(reply)
    final = await relay.next()
    assert status_fields(final)[1]["Action"] == "failed"
    job = await gw.store.run(gw.store.job, job_id)
    assert job.attempt == 2
    await wait_state(gw, job_id, State.REPORTED)
    assert relay.messages.empty()


async def test_dsns_go_to_the_envelope_sender_not_the_from_header(
        make_gateway, simulator: Simulator, relay: RelaySink, tmp_path: Path) -> None:
    """RFC 3461/3464: a DSN goes to the return path (MAIL FROM). The From: header names
    someone else (anyone can write it): with RET=FULL the DSN carries the whole mail, so
    mailing it to the From: address would make the gateway send arbitrary mail anywhere.
    The delay notices and the final DSN go to erp@example.com; the usual report (a recipient
    without NOTIFY, same mail) still goes to the From: address, as before."""
    env = production_env(tmp_path / "var", simulator, FAX_MAX_ATTEMPTS="2",
                         FAX_RETRY_DELAY_SECONDS="0.2", **relay_env(relay))
    gw = await make_gateway(env)
    mail = pdf_mail([BUSY, DELIVERED], sender="victim@elsewhere.example")
    reply = await asyncio.to_thread(
        send, gw.smtp.port, mail, {BUSY: ["NOTIFY=DELAY,FAILURE"], DELIVERED: []},
        ["RET=FULL"])
    busy_id, usual_id = job_ids(reply)
    await wait_state(gw, busy_id, State.REPORTED)
    await wait_state(gw, usual_id, State.REPORTED)
    got = {}
    while not relay.messages.empty():
        report = relay.messages.get_nowait()
        got.setdefault(report["X-Faxgw-Job"], []).append(report)
    dsns = got[busy_id]
    assert [r["X-Faxgw-Status"] for r in dsns] == ["delayed", "busy"]
    for report in dsns:
        assert report.get_content_type() == "multipart/report"
        assert report["To"] == "erp@example.com"
    [usual] = got[usual_id]
    assert usual.get_content_type() == "multipart/alternative"
    assert usual["To"] == "victim@elsewhere.example"
    assert sorted(rcpts for _from, rcpts in relay.envelopes) == [
        ["erp@example.com"], ["erp@example.com"], ["victim@elsewhere.example"]]

    # `faxgw job` names where each report went, as the worker decided it.
    def report_to(job_id: str) -> str:
        [line] = [line for line in faxgw_job(env, job_id).splitlines()
                  if line.strip().startswith("To:")]
        return line.split(":", 1)[1].strip()

    assert await asyncio.to_thread(report_to, busy_id) == (
        "erp@example.com, as a delivery status notification (NOTIFY=FAILURE,DELAY)")
    assert await asyncio.to_thread(report_to, usual_id) == "victim@elsewhere.example"


async def test_an_operator_resend_keeps_the_senders_notify_and_orcpt(
        make_gateway, simulator: Simulator, relay: RelaySink, tmp_path: Path) -> None:
    """A resend is the same mail sent again: its report is the DSN the sender asked for
    (NOTIFY=FAILURE, naming the ORCPT), not the usual report."""
    gw = await make_gateway(production_env(tmp_path / "var", simulator, FAX_MAX_ATTEMPTS="1",
                                           DOCUMENT_RETENTION_HOURS="1", **relay_env(relay)))
    mail = pdf_mail([FAILED], sender="erp@example.com", message_id="<inv-43@erp.example.com>")
    reply = await asyncio.to_thread(
        send, gw.smtp.port, mail,
        {FAILED: ["NOTIFY=FAILURE", "ORCPT=rfc822;fax-desk@customer.example"]}, ["RET=HDRS"])
    [job_id] = job_ids(reply)
    first = await relay.next()
    assert first["X-Faxgw-Job"] == job_id
    await wait_state(gw, job_id, State.REPORTED)

    policy = RetryPolicy.from_settings(gw.s)
    new = await gw.store.run(lambda: actions.resend_job(gw.store, job_id, gw.clock(),
                                                         retry_policy=policy))
    gw.worker.wake()  # what the CLI's SIGUSR1 does
    again = await relay.next()
    assert again["X-Faxgw-Job"] == new
    per_message, recipient = status_fields(again)
    assert recipient["Original-Recipient"] == "rfc822; fax-desk@customer.example"
    assert recipient["Final-Recipient"] == "rfc822; +15551230002@fax.local"
    assert recipient["Action"] == "failed"
    job = await gw.store.run(gw.store.job, new)
    assert job is not None and job.dsn_notify == "FAILURE"
