"""Report mail: content, threading, thumbnail, proof PDF, Bcc, receipts, templates, injection."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

from gateway.mail.reports import Templates, build_report
from gateway.store.rows import Attempt, Event

from .conftest import (
    RelaySink,
    Simulator,
    base_env,
    job_ids,
    pdf_mail,
    production_env,
    relay_env,
    smtp_send,
)
from .helpers.jobs import make_job, make_message


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
    (tmp_path / "report.txt").write_text("Bericht: {{ headline }} ({{ job_id }})\n")
    report = build_report(make_job(), make_message(), [], from_addr="gw@x.test",
                          hostname="gw.test", templates=Templates(tmp_path))
    text = report.get_body(("plain",)).get_content()
    assert text == ("Bericht: Your fax to +1 555-123-4567 was not delivered: the line was "
                    "busy. (0123456789abcdef)\n")
    # The HTML part still comes from the packaged template.
    assert "Destination" in report.get_body(("html",)).get_content()


def test_operator_html_template_is_autoescaped_and_edits_apply_to_the_next_report(
        tmp_path: Path) -> None:
    """An operator's report.html gets the same escaping as ours: a subject or file name from
    mail cannot become markup. The text template is not escaped (a mail client shows it as is)."""
    (tmp_path / "report.html").write_text("<h1>{{ subject }}</h1><p>{{ documents }}</p>\n")
    (tmp_path / "report.txt").write_text("{{ subject }}\n")
    message = make_message(subject='<script>alert(1)</script> & "co"',
                           filenames="<img src=x onerror=alert(1)>.pdf")
    report = build_report(make_job(), message, [], from_addr="gw@x.test", hostname="gw.test",
                          templates=Templates(tmp_path))
    html = report.get_body(("html",)).get_content()
    assert html == ("<h1>&lt;script&gt;alert(1)&lt;/script&gt; &amp; &#34;co&#34;</h1>"
                    "<p>&lt;img src=x onerror=alert(1)&gt;.pdf</p>\n")
    assert report.get_body(("plain",)).get_content() == '<script>alert(1)</script> & "co"\n'

    page = tmp_path / "report.html"
    page.write_text("<h2>{{ job_id }}</h2>\n")
    later = page.stat().st_mtime + 5
    os.utime(page, (later, later))
    again = build_report(make_job(), message, [], from_addr="gw@x.test", hostname="gw.test",
                         templates=Templates(tmp_path))
    assert again.get_body(("html",)).get_content() == "<h2>0123456789abcdef</h2>\n"


def test_old_dollar_templates_and_broken_ones_are_refused_at_start(tmp_path: Path) -> None:
    """Templates are jinja2 now: an operator's folder still holding string.Template files
    ($headline) is refused when the daemon starts, exit 78 (the unit does not restart), with
    the file and what to write instead; so is a template jinja2 cannot parse. Nothing is
    mailed with "$headline" in it."""
    folder = tmp_path / "templates"
    folder.mkdir()
    (folder / "report.txt").write_text("Bericht: $headline (${job_id})\n")
    (folder / "accepted.txt").write_text("Angenommen: {{ destination }\n")
    (folder / "refused.txt").write_text("Abgelehnt: {{ reason }} ($5 for a stamp)\n")
    env_file = tmp_path / "faxgw.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in base_env(
        tmp_path / "var", REPORT_TEMPLATE_DIR=str(folder)).items()))
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("FAXGW_", "SIGNALWIRE_"))}
    done = subprocess.run([sys.executable, "-m", "gateway", "run", "--config", str(env_file)],
                          env=environ, capture_output=True, text=True, timeout=60)
    assert done.returncode == 78, done.stderr
    problems = [line.strip() for line in done.stderr.splitlines()
                if line.strip().startswith("REPORT_TEMPLATE_DIR")]
    assert problems == [
        f"REPORT_TEMPLATE_DIR: {folder / 'report.txt'} is a $name template (string.Template); "
        "report templates are jinja2 now: write {{ headline }} for $headline (found: "
        "$headline, $job_id; see docs/report-templates.md)",
        f"REPORT_TEMPLATE_DIR: {folder / 'accepted.txt'} line 1: unexpected '}}'",
    ], done.stderr
    assert "Traceback" not in done.stderr

    # Fixed, the same folder starts (`run --check` reads the configuration and stops).
    (folder / "report.txt").write_text("Bericht: {{ headline }} ({{ job_id }})\n")
    (folder / "accepted.txt").write_text("Angenommen: {{ destination }}\n")
    done = subprocess.run([sys.executable, "-m", "gateway", "run", "--check", "--config",
                           str(env_file)], env=environ, capture_output=True, text=True,
                          timeout=60)
    assert "REPORT_TEMPLATE_DIR" not in done.stderr, done.stderr


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
