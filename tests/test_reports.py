"""Report mail: content, threading, thumbnail, proof PDF, Bcc, receipts, templates, injection."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

from gateway.jobs.outbound_states import Job, State
from gateway.mail.reports import Templates, build_report
from gateway.store.rows import Attempt, Event, Message

from .conftest import (RelaySink, Simulator, job_ids, pdf_mail, production_env, relay_env,
                       smtp_send)


def make_job(**overrides: object) -> Job:
    values: dict[str, object] = dict(
        id="0123456789abcdef", message_id="m1", to_number="+15551234567",
        from_number="+15550100000", quality="fine", state=State.COMPLETED, callback_token="t",
        callback_url="http://x/cb", media_key="k.pdf", fax_sid="sid-1", fax_status="busy",
        pages=2, pages_sent=0, duration_s=None, error_code=None, error_message=None,
        failure_reason=None, attempt=3, tries=0, next_run_at=None, submit_started_at=1.0,
        created_at=1.0, updated_at=2.0, reported_at=None)
    values.update(overrides)
    return Job(**values)  # type: ignore[arg-type]


def make_message(**overrides: object) -> Message:
    values: dict[str, object] = dict(
        id="m1", created_at=1.0, envelope_from="a@example.com", header_from="a@example.com",
        report_to="a@example.com", subject="Invoice", message_id_header="<o@example.com>",
        references_header="<r1@example.com>", peer="127.0.0.1", document_path="/nonexistent",
        document_bytes=10, document_sha256="x", pages=2, filenames="a.pdf")
    values.update(overrides)
    return Message(**values)  # type: ignore[arg-type]


def test_failed_report_lists_attempts_with_advice_and_threads() -> None:
    attempts = [Attempt("0123456789abcdef", n, "fine", 1.0 + n, f"s{n}", "busy", None, None,
                        0, None, 2.0 + n) for n in (1, 2, 3)]
    report = build_report(make_job(), make_message(), [Event("j", 1.0, "received", "x")],
                          attempts, from_addr="gw@x.test", hostname="gw.test", now=5.0)
    assert report["Subject"] == ("Fax to +1 555-123-4567 not delivered: the line was busy "
                                 "after 3 attempts")
    assert report["In-Reply-To"] == "<o@example.com>"
    assert report["References"] == "<r1@example.com> <o@example.com>"
    # The job's and the report's number at NOTIFY_FROM's domain, not the node's name: the
    # same report mailed by another node (after a stall or a crash) has the same Message-ID.
    assert report["Message-ID"] == "<faxgw-report.0123456789abcdef@x.test>"
    again = [build_report(make_job(report_n=2), make_message(), [], attempts,
                          from_addr="gw@x.test", hostname=node, now=9.0)["Message-ID"]
             for node in ("node-a.test", "node-b.test")]
    assert again == ["<faxgw-report.0123456789abcdef.2@x.test>"] * 2
    text = report.get_body(("plain",)).get_content()
    assert text.startswith("Your fax to +1 555-123-4567 was not delivered: the line was busy.")
    assert "The line was busy; try again later." in text
    assert text.count("not delivered: the line was busy") == 4  # headline + 3 attempts
    html = report.get_body(("html",)).get_content()
    assert "<td>3</td>" in html and "#b42318" in html


def test_text_from_mail_cannot_inject_headers_or_markup() -> None:
    message = make_message(subject="x\r\nBcc: victim@example.com <script>alert(1)</script>",
                           filenames="<img src=x onerror=alert(1)>.pdf")
    job = make_job(fax_status="failed", error_message="bad\r\nX-Evil: 1 <b>")
    report = build_report(job, message, [], from_addr="gw@x.test", hostname="gw.test")
    raw = bytes(report)
    assert b"\nBcc:" not in raw and b"\nX-Evil:" not in raw
    html = report.get_body(("html",)).get_content()
    assert "<script>" not in html and "<img src=x" not in html
    assert "&lt;script&gt;" in html


def test_template_override(tmp_path: Path) -> None:
    (tmp_path / "report.txt").write_text("Bericht: $headline ($job_id)\n")
    report = build_report(make_job(), make_message(), [], from_addr="gw@x.test",
                          hostname="gw.test", templates=Templates(tmp_path))
    text = report.get_body(("plain",)).get_content()
    assert text == ("Bericht: Your fax to +1 555-123-4567 was not delivered: the line was "
                    "busy. (0123456789abcdef)\n")
    # The HTML part still comes from the packaged template.
    assert "Destination" in report.get_body(("html",)).get_content()


async def test_report_carries_thumbnail_and_proof_pdf_and_bcc(
        make_gateway, simulator: Simulator, relay: RelaySink, tmp_path: Path) -> None:
    gw = await make_gateway(production_env(
        tmp_path / "var", simulator,
        **relay_env(relay, REPORT_ATTACH_PDF="yes", REPORT_BCC="audit@example.com")))
    from gateway.cli import sample_pdf

    pdf = sample_pdf("proof of transmission")
    reply = await smtp_send(gw.smtp.port, pdf_mail("15551234567@fax.local", pdf=pdf),
                            ["15551234567@fax.local"])
    [job_id] = job_ids(reply.text)
    report = await relay.next()
    assert relay.envelopes[-1] == ("faxgw@faxgw.test", ["alice@example.com",
                                                        "audit@example.com"])
    assert "audit@example.com" not in str(report)  # Bcc is envelope-only
    [image] = [p for p in report.walk() if p.get_content_type() == "image/png"]
    cid = image["Content-ID"].strip("<>")
    assert f'src="cid:{cid}"' in report.get_body(("html",)).get_content()
    thumb = Image.open(io.BytesIO(image.get_content())).convert("L")
    assert thumb.width == 300
    assert thumb.getextrema()[0] < 128  # the page's text is there, not a blank page
    [attached] = [p for p in report.iter_attachments() if p.get_content_type() ==
                  "application/pdf"]
    assert attached.get_content() == pdf
    assert attached.get_filename() == f"fax-{job_id}.pdf"


async def test_thumbnail_and_pdf_can_be_switched_off(
        make_gateway, simulator: Simulator, relay: RelaySink, tmp_path: Path) -> None:
    gw = await make_gateway(production_env(tmp_path / "var", simulator,
                                           **relay_env(relay, REPORT_THUMBNAIL="no")))
    await smtp_send(gw.smtp.port, pdf_mail("15551234567@fax.local"), ["15551234567@fax.local"])
    report = await relay.next()
    assert [p.get_content_type() for p in report.walk()] == [
        "multipart/alternative", "text/plain", "text/html"]


async def test_accepted_receipt_then_final_report(make_gateway, simulator: Simulator,
                                                  relay: RelaySink, tmp_path: Path) -> None:
    gw = await make_gateway(production_env(tmp_path / "var", simulator,
                                           **relay_env(relay, REPORT_ACCEPTED="yes")))
    reply = await smtp_send(gw.smtp.port, pdf_mail("15551234567@fax.local"),
                            ["15551234567@fax.local"])
    [job_id] = job_ids(reply.text)
    subjects = {(await relay.next())["Subject"] for _ in range(2)}
    assert subjects == {"Fax to +1 555-123-4567 accepted, 2 pages",
                        "Fax to +1 555-123-4567 delivered, 2 pages"}
