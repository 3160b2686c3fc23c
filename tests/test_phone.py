"""Fax number parsing: the forms senders and fax machines really use, and the refusals."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.phone import (
    MAX_INPUT_CHARS,
    NumberError,
    format_number,
    parse_fax_number,
    parse_recipient,
)


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
        ("1-800-FLOWERS", "(it contains letters; write the number in digits)"),
        ("john.smith", "contains letters"),
        ("5551234567x12", "contains letters"),
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
