"""Fax number parsing: the forms senders and fax machines really use, and the refusals."""

from __future__ import annotations

import asyncio
import smtplib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.phone import (
    MAX_INPUT_CHARS,
    NumberError,
    format_number,
    parse_fax_number,
    parse_recipient,
    quote_rcpt_local_part,
)

from .conftest import base_env


@pytest.mark.parametrize(
    ("local_part", "region", "expected"),
    [
        ("+15551234567", "US", "+15551234567"),
        ("15551234567", "US", "+15551234567"),
        ("1-555-123-4567", "US", "+15551234567"),
        ("(555) 123-4567", "US", "+15551234567"),
        ("5551234567", "US", "+15551234567"),
        ("555.123.4567", "US", "+15551234567"),
        ("555 123 4567", "US", "+15551234567"),
        (" +1 555 123 4567 ", "US", "+15551234567"),
        ("+15551230000", "US", "+15551230000"),  # the sandbox simulator's range
        ("FAX=+15551234567", "US", "+15551234567"),  # RFC 2303 internet fax
        ("fax=+15551234567", "US", "+15551234567"),
        ("Fax=1-555-123-4567", "US", "+15551234567"),
        ("/FAX=+15551234567/", "US", "+15551234567"),
        ("+12125550123", "US", "+12125550123"),
        ("2125550123", "US", "+12125550123"),
        ("+1 800 555 1234", "US", "+18005551234"),
        ("011 44 20 7946 0000", "US", "+442079460000"),
        ("+44 20 7946 0000", "US", "+442079460000"),
        ("020 7946 0000", "GB", "+442079460000"),
        ("0044 20 7946 0000", "DE", "+442079460000"),
        ("030 1234567", "de", "+49301234567"),
        ("+1 (310) 555-0100", "US", "+13105550100"),
        ("(555)123-4567", "US", "+15551234567"),
        # Vanity numbers: keypad digits (E.161), words after an area code in digits.
        ("1-800-FLOWERS", "US", "+18003569377"),
        ("1-800-flowers", "US", "+18003569377"),
        ("800-GOT-JUNK", "US", "+18004685865"),
        ("FAX=1-800-FLOWERS", "US", "+18003569377"),
    ],
)
def test_accepts(local_part: str, region: str, expected: str) -> None:
    assert parse_fax_number(local_part, region) == expected


@pytest.mark.parametrize(
    ("local_part", "message"),
    [
        ("12", "'12' is not a valid phone number for region US (too short)"),
        ("", "the fax number is empty"),
        ("   ", "the fax number is empty"),
        ("FAX=", "the fax number is empty"),
        ("john.smith", "'john.smith' is not a fax number: address the mail to the number"),
        ("555-123-456O", "(the letter 'O' is among the digits; write the number in digits)"),
        ("Jenny 867-5309", "letters only as words after the area code (1-800-FLOWERS)"),
        ("5551234567x12", "'5551234567x12' has an extension, which a fax machine cannot "
                          "dial: remove 'x12'"),
        ("(555) 123-4567 ext. 89", "remove 'ext. 89'"),
        ("5551234567;ext=123", "remove ';ext=123'"),
        ("5551234567 extension 7", "remove 'extension 7'"),
        ("5551234567#12", "remove '#12'"),
        ("555_123_4567", "characters other than digits"),
        ("555-1234", "a local number needs its area code"),
        ("+1555123456789", "too long"),
        ("+999 1234567", "unknown country code"),
        ("+", "it is not a number"),
        ("()", "it is not a number"),
        ("1+5551234567", "a + may only appear at the start"),
        ("+1 212 011 0123", "no such number range is in use"),
        ("0044 20 7946 0000", "write an international number as + and the country code"),
        ("FAX=+15551234567/T33S=1234", "sub-address"),
        ("1" * (MAX_INPUT_CHARS + 1), "too long to be a phone number"),
        ("\u0661\u0662\u0663", "characters other than digits"),  # Arabic-Indic digits
    ],
)
def test_rejects_with_reason(local_part: str, message: str) -> None:
    with pytest.raises(NumberError) as info:
        parse_fax_number(local_part, "US")
    assert message in str(info.value)


def test_rejection_message_is_one_ascii_line() -> None:
    with pytest.raises(NumberError) as info:
        parse_fax_number("55\r\n5-\u00e9'x", "US")
    text = str(info.value)
    assert text.isascii() and "\r" not in text and "\n" not in text


def test_unknown_region_is_a_configuration_error() -> None:
    with pytest.raises(ValueError) as info:
        parse_fax_number("5551234567", "XX")
    assert not isinstance(info.value, NumberError)


@pytest.mark.parametrize(
    ("e164", "expected"),
    [
        ("+15551234567", "+1 555-123-4567"),
        ("+12125550123", "+1 212-555-0123"),
        ("+442079460000", "+44 20 7946 0000"),
        ("+9991234567", "+9991234567"),  # unknown country code: shown as stored
    ],
)
def test_format_number(e164: str, expected: str) -> None:
    assert format_number(e164) == expected


@pytest.mark.parametrize("bad", ["", "15551234567", "+1555abc", "+1\r\n555", "+" + "1" * 16])
def test_format_number_refuses_non_e164(bad: str) -> None:
    with pytest.raises(NumberError):
        format_number(bad)


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("+15551234567@fax.example.com", ("+15551234567", "fax.example.com")),
        ("<+15551234567@Fax.Example.COM>", ("+15551234567", "fax.example.com")),
        ('"(555) 123-4567"@fax.example.com', ("(555) 123-4567", "fax.example.com")),
        ('<"555 \\"123\\" 4567"@fax.example.com>', ('555 "123" 4567', "fax.example.com")),
        ("FAX=+15551234567@fax.example.com.", ("FAX=+15551234567", "fax.example.com")),
        ("<@relay.example:5551234567@fax.example.com>", ("5551234567", "fax.example.com")),
        ("@fax.example.com", ("", "fax.example.com")),
    ],
)
def test_parse_recipient(address: str, expected: tuple[str, str]) -> None:
    assert parse_recipient(address, "fax.example.com") == expected


@pytest.mark.parametrize("address", ["5551234567", "<5551234567>", "5551234567@", "", "<>"])
def test_parse_recipient_rejects(address: str) -> None:
    with pytest.raises(ValueError):
        parse_recipient(address, "fax.example.com")


def test_recipient_round_trip_to_e164() -> None:
    local, _domain = parse_recipient('<"(555) 123-4567"@fax.example.com>', "fax.example.com")
    assert parse_fax_number(local) == "+15551234567"


@pytest.mark.parametrize(
    ("arg", "expected"),
    [
        ("TO:<(555) 123-4567@fax.local>", 'TO:<"(555) 123-4567"@fax.local>'),
        ("to: <+1 (310) 555-0100@fax.local> SIZE=10",
         'to: <"+1 (310) 555-0100"@fax.local> SIZE=10'),
        ("TO:<5551234567;ext=1@fax.local>", 'TO:<"5551234567;ext=1"@fax.local>'),
        ("TO:<5551234567@fax.local>", "TO:<5551234567@fax.local>"),
        ('TO:<"(555) 123-4567"@fax.local>', 'TO:<"(555) 123-4567"@fax.local>'),
        ("TO:<@relay:(555) 1@fax.local>", "TO:<@relay:(555) 1@fax.local>"),
        ("TO:<a\\b c@fax.local>", "TO:<a\\b c@fax.local>"),
    ],
)
def test_quote_rcpt_local_part(arg: str, expected: str) -> None:
    assert quote_rcpt_local_part(arg) == expected


_NUMBERISH = st.text(alphabet="0123456789+-.() /=FAXfax\u0661x", max_size=30)


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.text(max_size=80), _NUMBERISH), st.sampled_from(["US", "GB", "DE", "FR", "CA"]))
def test_parse_fax_number_only_raises_number_error(text: str, region: str) -> None:
    try:
        result = parse_fax_number(text, region)
    except NumberError as exc:
        message = str(exc)
        assert message.isascii() and "\r" not in message and "\n" not in message
    else:
        assert result.startswith("+") and result[1:].isdigit()
        assert parse_fax_number(result, region) == result  # E.164 is a fixed point
        format_number(result)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80))
def test_parse_recipient_only_raises_value_error(text: str) -> None:
    try:
        local, domain = parse_recipient(text, "fax.example.com")
    except ValueError:
        return
    assert domain == domain.lower() and domain


def _rcpt_replies(port: int, addresses: list[str]) -> list[tuple[int, str]]:
    """RCPT as written, unquoted (smtplib's rcpt() would rewrite the address itself)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("client.test")
        client.mail("alice@example.com")
        return [(code, text.decode()) for code, text in
                (client.docmd(f"RCPT TO:<{a}>") for a in addresses)]


async def test_numbers_as_people_write_them_over_smtp(make_gateway, tmp_path: Path) -> None:
    gw = await make_gateway(base_env(tmp_path / "var"))
    replies = await asyncio.to_thread(_rcpt_replies, gw.smtp.port, [
        "(555) 123-4567@fax.local", "+1 (310) 555-0100@fax.local", "1-800-FLOWERS@fax.local",
        "5551234567;ext=123@fax.local", "555-123-4567 x12@fax.local",
        "(555) 123-4567@elsewhere.example"])
    assert replies == [
        (250, "2.1.5 Recipient OK, fax to +15551234567"),
        (250, "2.1.5 Recipient OK, fax to +13105550100"),
        (250, "2.1.5 Recipient OK, fax to +18003569377"),
        (553, "5.1.3 '5551234567;ext=123' has an extension, which a fax machine cannot dial: "
              "remove ';ext=123' and send to the fax line's own number"),
        (553, "5.1.3 '555-123-4567 x12' has an extension, which a fax machine cannot dial: "
              "remove 'x12' and send to the fax line's own number"),
        (550, "5.7.1 Relaying denied: this gateway only accepts mail for <number>@fax.local"),
    ]
