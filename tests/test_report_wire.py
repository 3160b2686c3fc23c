"""Report mails written straight to bytes (gateway/mail/report_mime.py) against the same report
built with the email package (report_message): a mail client must see the same mail."""

from __future__ import annotations

from email import policy
from email.message import EmailMessage
from email.parser import BytesParser

import pytest

from gateway.jobs.outbound_states import State
from gateway.mail.report_mime import write_report
from gateway.mail.reports import report_content, report_message
from gateway.mail.sender import render
from gateway.store.rows import Attempt, Event

from .helpers.jobs import make_job, make_message

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8
PDF = b"%PDF-1.4\n" + bytes(range(256)) * 40
REFS = " ".join(f"<ref{n}.{'x' * 180}@example.com>" for n in range(12))
EVENTS = [Event("j", 1.0 + n, "status", f"step {n}") for n in range(6)]
ATTEMPTS = [Attempt(job_id="j", n=1, started_at=2.0, quality="fine", status="busy", fax_sid="s",
                    error_code=None, error_message="Far end busy", pages=None, duration_s=None,
                    ended_at=3.0)]

CASES = {
    "delivered, plain": (dict(fax_status="delivered", pages_sent=2), {}, {}),
    "busy, thumbnail and PDF": ({}, {}, dict(thumbnail_png=PNG, pdf=PDF)),
    "thumbnail only": ({}, {}, dict(thumbnail_png=PNG)),
    "non-Latin subject and notes": (
        {}, dict(subject="\u0421\u0447\u0451\u0442 \u2116 42 \u2014 \u8acb\u6c42\u66f8",
                 notes="\u00e9t\u00e9 " * 40), {}),
    "gave up, reason in the subject line": (
        dict(state=State.GIVEN_UP, failure_reason="Zielger\u00e4t antwortet nicht"), {}, {}),
    "display name not ASCII": ({}, {}, dict(from_addr="Faxger\u00e4t <fax@gw.test>")),
    "long References": ({}, dict(references_header=REFS), {}),
}


def both(job_kw: dict, msg_kw: dict, kw: dict) -> tuple[EmailMessage, EmailMessage]:
    options = dict(from_addr="Fax Gateway <fax@gw.test>", hostname="gw.test", now=1.8e9)
    options.update(kw)
    content = report_content(make_job(**job_kw), make_message(**msg_kw), EVENTS, ATTEMPTS,
                             **options)  # type: ignore[arg-type]
    wire = write_report(content)
    assert wire is not None
    assert all(len(line) <= 998 for line in wire.split(b"\r\n"))
    assert b"\n" not in wire.replace(b"\r\n", b"")
    parse = BytesParser(policy=policy.default).parsebytes
    return (parse(wire), parse(render(report_message(content)).data))  # type: ignore[return-value]


def leaves(mail: EmailMessage) -> list[tuple[str, object, str | None, str | None, str]]:
    out = []
    for part in mail.walk():
        if part.is_multipart():
            out.append((part.get_content_type(), None, None, None, ""))
            continue
        content = part.get_content()
        if isinstance(content, str):  # a line end is a line end to a mail client
            content = content.replace("\r\n", "\n")
        out.append((part.get_content_type(), content, part.get_filename(),
                    part["Content-ID"], part.get_content_disposition() or ""))
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_written_report_reads_as_the_email_package_builds_it(case: str) -> None:
    fast, slow = both(*CASES[case])
    names = ["From", "To", "Subject", "Date", "Message-ID", "Auto-Submitted", "In-Reply-To",
             "References", "X-Faxgw-Job", "X-Faxgw-Report", "X-Faxgw-Status", "MIME-Version"]
    assert [str(fast[n]) for n in names] == [str(slow[n]) for n in names]
    assert leaves(fast) == leaves(slow)
    assert not fast.defects and all(not p.defects for p in fast.walk())


def test_an_address_that_is_not_ascii_is_left_to_the_email_package() -> None:
    content = report_content(make_job(), make_message(report_to="m\u00fcller@example.com"),
                             EVENTS, from_addr="fax@gw.test", hostname="gw.test", now=1.8e9)
    assert write_report(content) is None
