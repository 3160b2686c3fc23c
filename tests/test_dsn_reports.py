"""The DSN builder and the parameter parser, pure (no sockets): RFC 3464 status codes per
outcome, what each NOTIFY asks for, the report without NOTIFY left as it was, xtext."""

from __future__ import annotations

import re
from email import message_from_bytes, policy

import pytest

from gateway.jobs.outbound_states import State
from gateway.mail import dsn_values
from gateway.mail.dsn import asked, status_of
from gateway.mail.reports import render_final_report
from gateway.smtp import esmtp_params as dsn
from gateway.smtp.replies import Reply

from .helpers.jobs import make_job, make_message

RENDER = dict(from_addr="gw@x.test", hostname="gw.test", now=5.0, template_dir=None,
              thumbnail=False, bcc=(), fax_domain="fax.local")


@pytest.mark.parametrize(("overrides", "expected"), [
    (dict(fax_status="delivered"), ("delivered", "2.0.0", None)),
    (dict(fax_status="busy"), ("failed", "4.4.1", "X-SignalWire; busy")),
    (dict(fax_status="no-answer"), ("failed", "4.4.1", "X-SignalWire; no-answer")),
    (dict(fax_status="failed", error_code="30003", error_message="Far end hung up"),
     ("failed", "4.4.2", "X-SignalWire; 30003 Far end hung up")),
    (dict(state=State.GIVEN_UP, fax_status=None, error_code="21211",
          error_message="Invalid 'To' Phone Number", failure_reason="SignalWire refused"),
     ("failed", "5.1.1", "X-SignalWire; 21211 Invalid 'To' Phone Number; SignalWire refused")),
    (dict(state=State.GIVEN_UP, fax_status=None, error_code="21212", failure_reason="x"),
     ("failed", "5.7.1", "X-SignalWire; 21212; x")),
    (dict(state=State.GIVEN_UP, fax_status=None, error_code="12300", error_message="bad pdf",
          failure_reason="bad pdf"), ("failed", "5.6.0", "X-SignalWire; 12300 bad pdf")),
    (dict(state=State.GIVEN_UP, fax_status=None,
          failure_reason="the gateway gave up after 24 hours of trying (media down)"),
     ("failed", "4.4.7",
      "X-SignalWire; the gateway gave up after 24 hours of trying (media down)")),
])
def test_status_of_each_outcome(overrides: dict, expected: tuple) -> None:
    job = make_job(**overrides)
    assert status_of(job, overrides.get("fax_status") == "delivered") == expected


def test_the_diagnostic_is_one_ascii_line() -> None:
    job = make_job(fax_status="failed", error_code="30003",
                   error_message="line\r\nBcc: x@example.com é")
    _action, _status, diagnostic = status_of(job, False)
    assert diagnostic is not None and "\r" not in diagnostic and "\n" not in diagnostic
    assert diagnostic.isascii()


@pytest.mark.parametrize(("notify", "delivered", "wanted"), [
    (None, True, True), (None, False, True),
    ("NEVER", True, False), ("NEVER", False, False),
    ("SUCCESS", True, True), ("SUCCESS", False, False),
    ("FAILURE", True, False), ("FAILURE", False, True),
    ("SUCCESS,FAILURE", False, True), ("DELAY", False, False), ("FAILURE,DELAY", False, True),
])
def test_what_notify_asks_for(notify: str | None, delivered: bool, wanted: bool) -> None:
    assert asked(make_job(dsn_notify=notify), delivered) is wanted


def unbounded(data: bytes) -> bytes:
    """The mail with its random MIME boundaries named in order instead."""
    for n, boundary in enumerate(dict.fromkeys(re.findall(rb'boundary="([^"]+)"', data))):
        data = data.replace(boundary, b"boundary-%d" % n)
    return data


def test_without_notify_the_report_is_as_before() -> None:
    """Copiers that cannot read multipart/report: without NOTIFY nothing about the report
    changes, RET and ENVID or not."""
    message = make_message(dsn_ret="HDRS", dsn_envid="x", dsn_headers="Subject: a\r\n")
    plain = render_final_report(make_job(), make_message(), [], [], attach_pdf=False, **RENDER)
    with_mail_params = render_final_report(make_job(), message, [], [], attach_pdf=False,
                                           **RENDER)
    assert unbounded(with_mail_params.data) == unbounded(plain.data)
    parsed = message_from_bytes(plain.data, policy=policy.default)
    assert parsed.get_content_type() == "multipart/alternative"


def test_dsn_keeps_the_proof_pdf_inside_the_part_people_read(tmp_path) -> None:
    pdf = tmp_path / "doc.pdf"
    pdf.write_bytes(b"%PDF-1.4 not really\n")
    rendered = render_final_report(
        make_job(dsn_notify="FAILURE"), make_message(document_path=str(pdf),
                                                     dsn_headers="Subject: Invoice\r\n"),
        [], [], attach_pdf=True, **RENDER)
    assert rendered.recipients == ("a@example.com",)
    parsed = message_from_bytes(rendered.data, policy=policy.default)
    human, status, returned = parsed.iter_parts()
    assert human.get_content_type() == "multipart/mixed"
    [attachment] = list(human.iter_attachments())
    assert attachment.get_content() == pdf.read_bytes()
    assert status.get_content_type() == "message/delivery-status"
    assert returned.get_content().splitlines() == ["Subject: Invoice"]
    assert b"\r\r\n" not in rendered.data


@pytest.mark.parametrize(("raw", "decoded"), [
    ("abc", "abc"), ("a+2Bb", "a+b"), ("+3D", "="), ("a+20b", "a b"),
    ("a+2bb", None), ("a+", None), ("a=b", None), ("a+0Db", None), ("é", None),
])
def test_xtext(raw: str, decoded: str | None) -> None:
    assert dsn_values.xtext_decode(raw) == decoded
    if decoded is not None:
        assert dsn_values.xtext_decode(dsn_values.xtext_encode(decoded)) == decoded


def test_parameters_parse_and_refuse() -> None:
    assert dsn.parse_mail(["ret=hdrs", "ENVID=a+2Bb", "AUTH=u+40x"], True) == \
        dsn.MailParams(ret="HDRS", envid="a+b", auth="u@x")
    assert dsn.parse_mail(["AUTH=u@x"], False) == dsn.MailParams(auth="<>")  # not logged in
    assert dsn.parse_rcpt(["notify=delay,success", "ORCPT=RFC822;a+40b"]) == \
        dsn.RcptParams(notify="SUCCESS,DELAY", orcpt="rfc822;a@b")
    for words in (["NOTIFY="], ["NOTIFY=,"], ["ORCPT=rfc822;"], ["ORCPT=;a@b"],
                  ["ORCPT=rfc822;" + "a" * 600]):
        refused = dsn.parse_rcpt(words)
        assert isinstance(refused, Reply) and str(refused).startswith("501 5.5.4 "), words
