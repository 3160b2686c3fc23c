"""Pure parts of inbound: routing, the block list, what counts as voice-call noise, the mail."""

from __future__ import annotations

from email import message_from_bytes, policy

from gateway.inbound.webhook import LAML_REJECT, laml_receive
from gateway.mail.received import (
    attachment_name,
    is_noise,
    message_id_for,
    render_received,
    subject_for,
)
from gateway.rules.inbound_routes import is_blocked, parse_routes

from .conftest import make_pdf
from .helpers.inbound import fax


def test_routes_lookup_and_wildcard() -> None:
    routes = parse_routes(" +13103383454 = a@example.com , b@example.com ; *=c@example.com ;")
    assert routes.recipients("+13103383454") == ("a@example.com", "b@example.com")
    assert routes.recipients("+15550000000") == ("c@example.com",)
    assert routes.numbers == ("+13103383454",) and routes.has_wildcard
    assert parse_routes("").recipients("+13103383454") == ()
    assert not parse_routes(None).enabled


def test_block_list() -> None:
    assert is_blocked("+19005551234", ["+1900"])
    assert not is_blocked("+12125550147", ["+1900"])
    assert is_blocked("anonymous", ["anonymous"]) and is_blocked("", ["anonymous"])
    assert is_blocked("sip:someone@example.com", ["anonymous"])
    assert not is_blocked("+12125550147", ["anonymous"])


def test_noise_is_a_voice_call_without_pages() -> None:
    assert is_noise("failed", "The call dropped prematurely", 0)
    assert is_noise("failed", "Timed out waiting for initial communication", None)
    assert not is_noise("failed", "The call dropped prematurely", 3)  # pages came: real failure
    assert not is_noise("failed", "Unexpected message received", 0)
    assert not is_noise("received", None, 1)


def test_subject_names_and_message_ids() -> None:
    assert subject_for(fax()) == "Fax from +1 212-555-0147, 2 pages"
    assert subject_for(fax(num_pages=1)) == "Fax from +1 212-555-0147, 1 page"
    assert subject_for(fax(from_number=None)) == "Fax from an unknown caller, 2 pages"
    failed = fax(fax_status="failed", error_message="Far end\r\nBcc: x@y", num_pages=0)
    assert "\n" not in subject_for(failed) and "not received" in subject_for(failed)
    assert attachment_name(fax()) == "fax-12125550147-20270115-080000.pdf"
    a = message_id_for("sid-1", "a@example.com", "gw.test")
    assert a == message_id_for("sid-1", "A@example.com", "gw.test")
    assert a != message_id_for("sid-1", "b@example.com", "gw.test")


def test_rendered_mail_is_safe_and_complete() -> None:
    [part] = render_received(fax(), [("a@example.com", False)], make_pdf(2),
                             from_addr="faxgw@gw.test", hostname="gw.test", attach=True,
                             thumbnail=True)
    mail = message_from_bytes(part.rendered.data, policy=policy.default)
    assert part.rendered.recipients == ("a@example.com",)
    assert mail["Bcc"] is None  # the station id could not inject a header
    assert mail["Message-ID"] == part.message_id
    text = mail.get_body(("plain",)).get_content()
    assert "+1 310-338-3454" in text and "2027-01-15 08:00:00 UTC" in text
    html = mail.get_body(("html",)).get_content()
    assert "&lt;FAX&gt;" in html and "<FAX>" not in html


def test_laml() -> None:
    import xml.etree.ElementTree as ET

    action = 'https://gw.example/signalwire/inbound/done?a=1&b="2"<'
    [receive] = ET.fromstring(laml_receive(action, "a4"))
    assert receive.tag == "Receive"
    assert receive.attrib == {"action": action, "method": "POST",
                              "mediaType": "application/pdf", "pageSize": "a4"}
    assert LAML_REJECT.endswith("<Response><Reject/></Response>")
