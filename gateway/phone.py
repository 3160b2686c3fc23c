"""Fax numbers: from the local part of an RCPT address to E.164, and back to a human form.

The local part is the only place a sender can put the destination, so the rules here decide
which faxes are dialled at all. They are strict on purpose: a number that is merely guessed at
(letters turned into digits, a leading ``00`` read as an international prefix in a region
where it is not one, a lone letter O read as a zero) dials a stranger, and a fax sent to a
stranger cannot be called back.
Errors carry a message in plain ASCII words that the SMTP layer can put straight into a reply.
"""

from __future__ import annotations

import functools
import re

import phonenumbers
from phonenumbers import NumberParseException, PhoneNumberFormat, ValidationResult

__all__ = [
    "MAX_INPUT_CHARS",
    "NumberError",
    "format_number",
    "parse_fax_number",
    "parse_recipient",
    "quote_rcpt_local_part",
]

# An E.164 number has at most 15 digits; 64 characters leave room for separators and the
# FAX= prefix while keeping the parser away from hostile input.
MAX_INPUT_CHARS = 64

# RFC 2303/2304 internet-fax mailbox ("FAX=+15551234567"), optionally written X.400 style
# with slashes around it ("/FAX=+15551234567/").  Only the number is captured; whatever
# follows a further "/" (an RFC 2304 "/T33S=" sub-address, other X.400 attributes) is
# reported, not ignored, because dropping it would deliver to the wrong extension.
_FAX_PREFIX = re.compile(r"^/?fax=(?P<number>[^/]*)(?P<rest>/.*)?$", re.IGNORECASE)
_ALLOWED = frozenset("0123456789+-.() ")
_NANP_FICTIONAL_AREA_CODE = "555"


class NumberError(ValueError):
    """A destination that cannot be dialled; ``str(err)`` is a one-line ASCII reason."""


def _shown(text: str, limit: int = 40) -> str:
    """Render sender-supplied text for an error message: ASCII only, no CR/LF, bounded.

    The message ends up in an SMTP reply line, where a bare CR or LF would end the reply
    early and non-ASCII would break older clients.
    """
    clipped = text if len(text) <= limit else text[:limit] + "..."
    escaped = clipped.encode("ascii", "backslashreplace").decode("ascii")
    return "".join(ch if " " <= ch <= "~" else "?" for ch in escaped).replace("'", "?")


def _error(raw: str, region: str, reason: str) -> NumberError:
    return NumberError(
        f"'{_shown(raw)}' is not a valid phone number for region {region} ({reason})"
    )


def _international_hint(text: str, region: str) -> str:
    """Explain "00..." in regions (like the US) where 00 is not the international prefix.

    Europeans write international numbers as 0044...; in NANP regions (prefix 011) that
    reads as a national number and fails as "too long", which tells the sender nothing.
    """
    if text.startswith("00") and phonenumbers.country_code_for_region(region) == 1:
        return "; write an international number as + and the country code"
    return ""


def _strip_fax_prefix(text: str) -> str:
    """Drop an RFC 2303/2304 ``FAX=`` prefix, as T.37 internet-fax machines send it."""
    match = _FAX_PREFIX.match(text)
    if match is None:
        return text
    rest = match.group("rest")
    if rest is not None and rest != "/":
        raise NumberError(
            f"'{_shown(text)}' has a fax sub-address or other attribute after the number,"
            " which this gateway cannot dial"
        )
    return match.group("number").strip()


# An extension at the end, as people write it: "x123", "ext. 123", "extension 123",
# ";ext=123" (RFC 3966), "#123".
_EXTENSION = re.compile(
    r"(?:\s*;\s*ext\s*=\s*|\s*,?\s*(?:extension|ext\.?|x|\#)\s*)\d{1,10}\s*$", re.IGNORECASE)
# A vanity number: at least three digits (country and area code, "1-800-", "800 "), then words
# of letters on a phone keypad, possibly mixed with digit groups ("1-800-GOT-JUNK").
_VANITY = re.compile(r"^[+\s().-]*(?:\d[\s().-]*){3,}[A-Za-z0-9\s().-]*$")
_KEYPAD = {letter: str(digit) for digit, letters in
           ((2, "ABC"), (3, "DEF"), (4, "GHI"), (5, "JKL"), (6, "MNO"), (7, "PQRS"), (8, "TUV"),
            (9, "WXYZ")) for letter in letters}


def _refuse_extension(raw: str, text: str) -> str:
    """A fax machine answers the line itself; nobody can dial an extension for it."""
    match = _EXTENSION.search(text)
    if match is not None and any(ch.isdigit() for ch in text[:match.start()]):
        raise NumberError(
            f"'{_shown(raw)}' has an extension, which a fax machine cannot dial: remove "
            f"'{_shown(match.group().strip())}' and send to the fax line's own number"
        )
    return text


def _vanity_digits(raw: str, region: str, text: str) -> str:
    """Letters to keypad digits (ITU E.161), but only in the shape of a vanity number.

    "1-800-FLOWERS" is unambiguous: an area code in digits, then whole words. What is not in
    that shape is refused rather than guessed at: a name ("john.smith"), or one letter among
    digits ("555-123-456O", a typo for 0 that would dial a stranger).
    """
    words = re.findall(r"[A-Za-z]+", text)
    if not any(ch.isdigit() for ch in text):
        raise NumberError(
            f"'{_shown(raw)}' is not a fax number: address the mail to the number, "
            "e.g. +15551234567@..."
        )
    single = next((w for w in words if len(w) == 1), None)
    if single is not None:
        raise _error(raw, region, f"the letter '{_shown(single)}' is among the digits; "
                                  "write the number in digits")
    if not _VANITY.match(text) or not all(w.isascii() for w in words):
        raise _error(raw, region, "it contains letters; write the number in digits, or "
                                  "letters only as words after the area code (1-800-FLOWERS)")
    return "".join(_KEYPAD.get(ch.upper(), ch) for ch in text)


def _is_fictional_nanp(number: phonenumbers.PhoneNumber) -> bool:
    """True for +1 555 NXX XXXX, which phonenumbers rightly calls invalid.

    Area code 555 is not assigned to any place, so phonenumbers reports such numbers as
    possible but not valid (number type UNKNOWN, no region).  The product documents
    +15551234567 as its test number and the SignalWire sandbox simulator answers on
    +1555123xxxx, so these must be accepted; no real subscriber can be reached on them.
    """
    national = str(number.national_number)
    return (
        number.country_code == 1
        and len(national) == 10
        and national.startswith(_NANP_FICTIONAL_AREA_CODE)
        and not number.italian_leading_zero
    )


# Pure (phonenumbers' metadata is fixed), and a gateway's senders fax the same few numbers
# over and over: the parse costs more CPU than the rest of a RCPT command. Refusals raise and
# are not cached, so hostile input cannot fill the cache beyond its size either way.
@functools.lru_cache(maxsize=1024)
def parse_fax_number(local_part: str, default_region: str = "US") -> str:
    """Turn the local part of a fax RCPT address into an E.164 number such as "+15551234567".

    Accepted: "+15551234567", "15551234567", "1-555-123-4567", "(555) 123-4567",
    "555.123.4567", "5551234567" (the last ones in ``default_region``), and the internet-fax
    form "FAX=+15551234567" (any case, optionally "/FAX=.../").  International numbers must
    use "+" or the international prefix of ``default_region`` ("011" in the US, "00" in most
    of Europe); phonenumbers decides which, so "0044..." is not international in the US.

    The number must be *possible* (right length for its country, no local-only short form)
    and *valid* (an assigned range, per phonenumbers' metadata).  One exception: NANP
    numbers in area code 555 are accepted although phonenumbers marks them invalid, because
    they are the fictional range used by the product's test number and the sandbox.

    Vanity numbers ("1-800-FLOWERS", "800-GOT-JUNK") are dialled as their keypad digits
    (ITU E.161), but only in that shape: digits first (at least three), then whole words.
    Other letters are refused rather than guessed at: a single letter among digits is more
    likely a typo for 0 or 1, and a mail address with a typo in it must not dial someone.
    Extensions ("x123", "ext. 123", ";ext=123") are refused: a fax machine cannot dial them.
    ``default_region`` is a two-letter region code; an unknown one is a configuration bug and
    raises plain ``ValueError``.
    """
    region = default_region.upper()
    if region not in phonenumbers.SUPPORTED_REGIONS:
        raise ValueError(f"unknown default region {default_region!r}")
    raw = local_part
    if len(raw) > MAX_INPUT_CHARS:
        raise NumberError(
            f"'{_shown(raw)}' is too long to be a phone number"
            f" (more than {MAX_INPUT_CHARS} characters)"
        )
    text = _strip_fax_prefix(raw.strip())
    if not text:
        raise NumberError(
            "the fax number is empty; address the mail to the number, e.g. +15551234567@..."
        )
    text = _refuse_extension(raw, text)
    if any(ch.isalpha() for ch in text):
        text = _vanity_digits(raw, region, text)
    if any(ch not in _ALLOWED for ch in text):
        raise _error(
            raw, region, "it contains characters other than digits, +, -, ., (, ) and spaces"
        )
    if "+" in text.lstrip()[1:]:
        raise _error(raw, region, "a + may only appear at the start")
    try:
        number = phonenumbers.parse(text, region)
    except NumberParseException as exc:
        raise _error(raw, region, _parse_reason(exc) + _international_hint(text, region)) from None
    possible = phonenumbers.is_possible_number_with_reason(number)
    if possible != ValidationResult.IS_POSSIBLE:
        raise _error(raw, region, _possible_reason(possible) + _international_hint(text, region))
    if not (phonenumbers.is_valid_number(number) or _is_fictional_nanp(number)):
        reason = "no such number range is in use" + _international_hint(text, region)
        raise _error(raw, region, reason)
    return phonenumbers.format_number(number, PhoneNumberFormat.E164)


def _parse_reason(exc: NumberParseException) -> str:
    reasons = {
        NumberParseException.INVALID_COUNTRY_CODE: "unknown country code",
        NumberParseException.NOT_A_NUMBER: "it is not a number",
        NumberParseException.TOO_SHORT_AFTER_IDD: "too short after the international prefix",
        NumberParseException.TOO_SHORT_NSN: "too short",
        NumberParseException.TOO_LONG: "too long",
    }
    return reasons.get(exc.error_type, "it cannot be read as a number")


def _possible_reason(result: int) -> str:
    reasons = {
        ValidationResult.INVALID_COUNTRY_CODE: "unknown country code",
        ValidationResult.TOO_SHORT: "too short",
        ValidationResult.TOO_LONG: "too long",
        ValidationResult.INVALID_LENGTH: "wrong number of digits",
        ValidationResult.IS_POSSIBLE_LOCAL_ONLY: "a local number needs its area code",
    }
    return reasons.get(result, "wrong number of digits")


def format_number(e164: str) -> str:
    """Human form for reports ("+1 555-123-4567"), as phonenumbers' INTERNATIONAL format.

    Takes what ``parse_fax_number`` returned.  Text that is not "+" and digits raises
    NumberError rather than being echoed, since report text goes to the sender; a well-formed
    E.164 string that phonenumbers cannot place (unknown country code) is returned as is, so
    a report is never lost over formatting.
    """
    digits = e164[1:]
    if not (e164.startswith("+") and digits.isascii() and digits.isdigit() and len(digits) <= 15):
        raise NumberError(f"'{_shown(e164)}' is not an E.164 number")
    try:
        number = phonenumbers.parse(e164, None)
    except NumberParseException:
        return e164
    return phonenumbers.format_number(number, PhoneNumberFormat.INTERNATIONAL)


def parse_recipient(address: str, fax_domain: str) -> tuple[str, str]:
    """Split an RCPT TO address into (local part, lower-cased domain).

    The envelope, not the To: header, names the destinations (Bcc'd fax recipients are not
    in the headers), so this is what the SMTP edge calls for each RCPT.  It undoes what
    SMTP syntax adds around a number: angle brackets, an obsolete source route
    ("<@relay:+1555...@fax.example>"), and quoting ('"(555) 123-4567"@fax.example', with
    backslash escapes).  A trailing dot on the domain is dropped.  Deciding whether the
    domain is ``fax_domain`` (case-insensitively) stays with the caller, which knows what
    to reply for foreign domains; ``fax_domain`` is part of the signature so call sites
    read as one step and so a future per-domain rule has a home.

    Raises ValueError when there is no "@" or no domain.
    """
    del fax_domain  # see docstring: comparison is the caller's
    text = address.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1].strip()
    if text.startswith("@") and ":" in text:
        text = text.split(":", 1)[1]
    if "@" not in text:
        raise ValueError(f"{_shown(address)!s} has no @domain part")
    local, domain = text.rsplit("@", 1)
    domain = domain.strip().rstrip(".").lower()
    if not domain:
        raise ValueError(f"{_shown(address)!s} has an empty domain")
    if len(local) >= 2 and local.startswith('"') and local.endswith('"'):
        local = re.sub(r"\\(.)", r"\1", local[1:-1])
    return local, domain


# "TO:<local@domain> params" where the local part holds what RFC 5321 would misread: "(555)"
# parsed as a comment and dropped, a space, a ";ext=" read as the start of parameters.
_RCPT_ARG = re.compile(r'^(?P<head>\s*TO:\s*<)(?P<local>[^<>"@\\]*)(?P<tail>@[^<>@\s]+>.*)$',
                       re.IGNORECASE | re.DOTALL)
_DOT_ATOM = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]*$")


def quote_rcpt_local_part(arg: str) -> str:
    """Quote a fax number written as people write it in the RCPT argument, so the SMTP
    parser keeps it whole: ``TO:<(555) 123-4567@fax.example>`` becomes
    ``TO:<"(555) 123-4567"@fax.example>``. Mail clients send such addresses unquoted; parsed
    as RFC 5321/5322 the parenthesised area code is a comment, and the number arrives as
    "123-4567". Anything else (already quoted, a source route, no angle brackets) is
    returned unchanged; the domain is still checked afterwards like any other.
    """
    match = _RCPT_ARG.match(arg)
    if match is None or _DOT_ATOM.match(match.group("local")):
        return arg
    return f'{match.group("head")}"{match.group("local")}"{match.group("tail")}'
