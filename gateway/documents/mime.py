"""From a received mail to the documents to fax and the text around them.

Pure functions over ``email.message.Message`` (parsed with ``email.policy.compat32``: the walk
reads raw header values through its own tolerant parsers), so they run in a document worker
and the tests need no sockets.

The mail comes from scanners, ERP systems, T.37 fax machines and people's mail clients, and
each gets MIME wrong in its own way (see the field notes).  The walk is therefore tolerant:
documents are recognised by their content, not by the declared type or name; damaged base64
is decoded as far as it goes; unknown charsets fall back instead of raising.  What cannot be
used is not silently dropped: it is described in ``ParsedMail.notes`` in words the sender
can act on.  The only exception raised is ``MimeError``, for mail that is too deeply nested
or has too many parts to be worth walking.
"""

from __future__ import annotations

import base64
import binascii
import io
import mimetypes
import quopri
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from email import policy
from email.message import Message
from email.parser import BytesFeedParser, BytesHeaderParser, BytesParser

import pybase64

from gateway.documents.body_text import html_to_text, tidy_text
from gateway.sanitise import sanitize_header_text

__all__ = [
    "KINDS",
    "MimeError",
    "ParsedMail",
    "Part",
    "delimiter_lines",
    "detect_kind",
    "header_block",
    "parse_mail",
    "read_message",
    "read_message_file",
    "sanitize_header_text",
]

# Every value Part.kind can take besides None.  "text" is a text attachment, re-encoded to
# UTF-8; the others come from detect_kind.
KINDS = ("pdf", "tiff", "jpeg", "png", "gif", "zip", "ole", "tnef", "text")

# Some PDF writers (and some mail relays) put bytes before the header; readers accept the
# header within the first 1024 bytes, and so do we.
PDF_HEADER_WINDOW = 1024
MAX_SUBJECT_CHARS = 998  # RFC 5322 line limit
MAX_FILENAME_CHARS = 255
MAX_ADDRESS_CHARS = 254  # RFC 5321 path limit less the brackets
MAX_MSGID_CHARS = 250
MAX_REFERENCES = 20
MAX_NOTES = 20

_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"PK\x03\x04", "zip"),
    (b"PK\x05\x06", "zip"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "ole"),
    (b"\x78\x9f\x3e\x22", "tnef"),  # 0x223E9F78 stored little-endian
)

_TNEF_TYPES = frozenset({"application/ms-tnef", "application/vnd.ms-tnef"})
_SIGNATURE_TYPES = frozenset(
    {"application/pkcs7-signature", "application/x-pkcs7-signature", "application/pgp-signature"}
)
_ENCRYPTED_TYPES = frozenset({"application/pkcs7-mime", "application/x-pkcs7-mime"})
_BODY_SUBTYPES = frozenset({"plain", "html"})
_TEXT_ATTACHMENT_SUBTYPES = frozenset({"plain", "html", "csv", "tab-separated-values"})
_FORWARD_TYPES = frozenset({"message/rfc822", "message/global", "message/news"})
# Charsets that legacy systems use for Western text; real "ISO-8859-1" mail often holds
# Windows-1252 quotes and dashes, and mislabelled UTF-8 is common, hence the UTF-8 attempt.
_WESTERN_CHARSETS = frozenset(
    {"", "us-ascii", "ascii", "iso-8859-1", "iso8859-1", "latin1", "latin-1", "l1",
     "windows-1252", "cp1252", "x-unknown", "unknown-8bit"}
)

_SURROGATE = re.compile(r"[\ud800-\udfff]")
_ENCODED_WORD = re.compile(r"=\?([^?\s]{1,40})\?([bBqQ])\?([^?\s]*)\?=")
_ENCODED_WORD_GAP = re.compile(r"(=\?[^?\s]{1,40}\?[bBqQ]\?[^?\s]*\?=)\s+(?==\?)")
_MSGID = re.compile(rf"<[!-;=?-~]{{1,{MAX_MSGID_CHARS - 2}}}>")
_BASE64_ALPHABET_AND_SPACE = (b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="
                              b" \t\r\n\x0b\x0c")


class MimeError(ValueError):
    """The mail cannot be walked at all; ``str(err)`` is a plain-words reason for the sender."""


@dataclass(frozen=True)
class Part:
    """One attachment or inline document, decoded, in order of appearance.

    ``kind`` is what the bytes are (see KINDS), not what the mail claimed; None means
    unrecognised.  ``inline`` marks images referenced from an HTML body (logos, signature
    pictures) so the caller can leave small ones out of the fax.  ``index`` is the 1-based
    position in ``ParsedMail.parts``, as senders count ("attachment 2"), and matches the
    numbers used in ``ParsedMail.notes``.
    """

    data: bytes
    content_type: str
    filename: str | None
    kind: str | None
    index: int
    inline: bool = False


@dataclass(frozen=True)
class ParsedMail:
    """What the gateway needs from a mail; all text is safe to show (no CR/LF in headers)."""

    parts: list[Part]
    text_body: str | None
    subject: str
    from_addr: str | None
    reply_to: str | None
    message_id: str | None
    references: list[str]
    notes: list[str]


def detect_kind(data: bytes) -> str | None:
    """Name the document type from its first bytes.

    Scanners and legacy systems send documents as application/octet-stream, with no name,
    or with a wrong type; gateways that trust the label drop them.  Office formats come out
    as "zip" (docx, xlsx, odt) or "ole" (doc, xls, msg): the caller decides what to say.
    """
    for magic, kind in _MAGIC:
        if data.startswith(magic):
            return kind
    if b"%PDF-" in data[:PDF_HEADER_WINDOW]:
        return "pdf"
    return None


# --- text decoding -------------------------------------------------------------------------


def _decode_bytes(data: bytes, charset: str | None) -> str:
    """Decode text whatever the label says; never raises.

    Western labels (and none) try UTF-8 first, then Windows-1252, because that is what the
    bytes usually are.  Unknown or non-text codec names fall back the same way.
    """
    name = (charset or "").strip().strip('"').lower()
    if name not in _WESTERN_CHARSETS:
        try:
            return data.decode(name, "replace")
        except (LookupError, ValueError):
            pass  # unknown charset, or a codec that is not a text encoding
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("cp1252", "replace")


def _unsurrogate(s: str) -> str:
    """Turn a header value parsed from 8-bit bytes (surrogateescape) back into text."""
    if not _SURROGATE.search(s):
        return s
    return _decode_bytes(s.encode("utf-8", "surrogateescape"), None)


def _decode_encoded_word(charset: str, encoding: str, text: str) -> str:
    charset = charset.split("*", 1)[0]  # RFC 2231 language suffix: "utf-8*en"
    if encoding in "bB":
        data = _lenient_b64decode(text.encode("ascii", "ignore"))[0]
    else:
        raw = re.sub(r"=([0-9A-Fa-f]{2})", lambda m: chr(int(m.group(1), 16)),
                     text.replace("_", " "))
        data = raw.encode("latin-1", "replace")
    return _decode_bytes(data, charset)


def _decode_rfc2047(value: str) -> str:
    """Decode RFC 2047 encoded words leniently (own code: the stdlib variants raise on damage)."""
    value = _ENCODED_WORD_GAP.sub(r"\1", value)  # whitespace between encoded words is not text
    return _ENCODED_WORD.sub(
        lambda m: _decode_encoded_word(m.group(1), m.group(2), m.group(3)), value
    )


# --- the walk ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Piece:
    text: str
    html: bool
    forwarded: bool


@dataclass(frozen=True)
class _Found:
    data: bytes
    content_type: str
    filename: str | None
    kind: str | None
    inline: bool


@dataclass
class _Walk:
    max_depth: int
    max_parts: int
    entities: int = 0
    found: list[_Found] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)


def _raw_header(entity: Message, name: str) -> str | None:
    """First raw value of a header, unfolded, decoded from 8-bit; no structured parsing.

    Structured header parsing in the stdlib has raised on hostile input in the past; raw
    values plus small tolerant parsers here keep the walk total.
    """
    lname = name.lower()
    for key, value in entity.raw_items():
        if key.lower() == lname:
            return _unsurrogate(re.sub(r"\r?\n[ \t]*", " ", str(value)))
    return None


raw_header = _raw_header  # for the sender check (gateway.smtp.verify), which must read alike


def _content_type(entity: Message) -> str:
    ctype = entity.get_content_type().lower()
    if re.fullmatch(r"[a-z0-9!#$&^_.+-]+/[a-z0-9!#$&^_.+-]+", ctype):
        return ctype
    return "application/octet-stream"


def _filename(entity: Message) -> str | None:
    """The attachment's name (RFC 2231 and 2047 decoded), without any directory part."""
    name = entity.get_filename()
    if name is None:
        return None
    name = _decode_rfc2047(_unsurrogate(str(name)))
    name = re.split(r"[/\\]", name)[-1]
    name = sanitize_header_text(name, MAX_FILENAME_CHARS)
    return name or None


def _lenient_b64decode(raw: bytes) -> tuple[bytes, bool]:
    """Decode base64 as far as it goes; returns (data, damaged).

    Handles lines of any length, missing padding, stray characters and padded chunks glued
    together.  A chunk one character too long (input cut mid-quantum) loses that character
    and is reported as damaged.
    """
    damaged = False
    out: list[bytes] = []
    # Fast path (C speed) for the usual case: clean base64 in lines. The regex path below costs
    # a quarter of the document workers' time on large scans.
    compact = raw.translate(None, b" \t\r\n")
    if len(compact) % 4 == 0 and b"=" not in compact.rstrip(b"="):
        try:
            return base64.b64decode(compact, validate=True), False
        except binascii.Error:
            pass
    for chunk in re.split(rb"=+", re.sub(rb"[^A-Za-z0-9+/=]", b"", raw)):
        if len(chunk) % 4 == 1:
            chunk = chunk[:-1]
            damaged = True
        out.append(base64.b64decode(chunk + b"=" * (-len(chunk) % 4)))
    return b"".join(out), damaged


_B64_SPACE = b" \t\r\n"
_B64_SLICE_CHARS = 1 << 20


def _clean_base64(payload: object) -> bytes | None:
    """Decode clean base64 in lines (what every scanner and mail program sends) a slice at a
    time: a 20 MB scan is 27 MB of base64 text, and copies of all of it (encoded, then
    without line breaks) cost more memory than the document. Every step is a C-speed copy of
    one slice. None when the text is not clean (stray characters, padding in the middle, a
    length that is not a whole number of quanta): the lenient decoder then takes over.
    pybase64 (SIMD) checks and decodes in one pass: 7 us for a 100 KB fax, where the stdlib's
    check and a2b_base64 took 330 us (and ~100 ms for a 20 MB scan)."""
    if not isinstance(payload, str):
        return None
    # Each slice's bytes go into one buffer as they come (a list joined at the end held the
    # document twice); getvalue() hands that buffer over without a copy.
    out = io.BytesIO()
    carry = b""
    total = len(payload)
    for start in range(0, total, _B64_SLICE_CHARS):
        end = start + _B64_SLICE_CHARS
        try:
            piece = payload[start:end].encode("ascii")
        except UnicodeEncodeError:
            return None
        compact = carry + piece.translate(None, _B64_SPACE)
        whole = len(compact) - len(compact) % 4
        try:  # strict: only the alphabet, padding only at the end
            out.write(pybase64.b64decode(compact[:whole], validate=True))
        except binascii.Error:
            return None  # junk, or padding in the middle
        if (compact[whole - 1:whole] == b"=" and end < total
                and payload[end:].strip("= \t\r\n")):
            return None  # padding, then more: glued chunks, for the lenient path
        carry = compact[whole:]
    return None if carry else out.getvalue()


def _payload_bytes(entity: Message, label: str, walk: _Walk) -> bytes:
    cte = (_raw_header(entity, "content-transfer-encoding") or "").strip().lower()
    if cte == "base64":
        payload = entity.get_payload()
        if (clean := _clean_base64(payload)) is not None:
            return clean
        raw = payload if isinstance(payload, bytes) else str(payload).encode("ascii", "ignore")
        data, damaged = _lenient_b64decode(raw)
        if damaged:
            walk.note(f"{label}: the base64 data is cut short or damaged;"
                      " the document may be incomplete")
        elif raw.translate(None, _BASE64_ALPHABET_AND_SPACE):  # anything left is junk
            walk.note(f"{label}: the base64 data contains stray characters, which were skipped")
        return data
    decoded = entity.get_payload(decode=True)
    return decoded if isinstance(decoded, bytes) else b""


def _leaf(entity: Message, ctype: str, walk: _Walk, related: bool) -> list[_Piece]:
    maintype, _, subtype = ctype.partition("/")
    disposition_header = _raw_header(entity, "content-disposition") or ""
    disposition = disposition_header.split(";", 1)[0].strip().lower()
    filename = _filename(entity)
    if ctype in _SIGNATURE_TYPES:
        return []  # a signature is not a document; the signed content is walked separately
    if ctype in _ENCRYPTED_TYPES or (filename or "").lower().endswith(".p7m"):
        walk.note("the message is encrypted or signed with S/MIME and cannot be read;"
                  " send it unencrypted")
        return []
    if maintype == "text" and disposition != "attachment" and filename is None:
        if subtype not in _BODY_SUBTYPES:
            return []  # text/calendar, text/enriched and the like: not a body we can show
        data = _payload_bytes(entity, "the message text", walk)
        text = _decode_bytes(data, entity.get_content_charset())
        text = html_to_text(text) if subtype == "html" else tidy_text(text)
        return [_Piece(text, subtype == "html", False)]
    label = f"attachment '{filename}'" if filename else f"attachment {len(walk.found) + 1}"
    data = _payload_bytes(entity, label, walk)
    kind = detect_kind(data)
    if kind is None and maintype == "text" and subtype in _TEXT_ATTACHMENT_SUBTYPES:
        text = _decode_bytes(data, entity.get_content_charset())
        text = html_to_text(text) if subtype == "html" else tidy_text(text)
        data, kind = text.encode("utf-8"), "text"
    if kind is None and (ctype in _TNEF_TYPES or (filename or "").lower() == "winmail.dat"):
        kind = "tnef"
    if kind == "tnef" and _unpack_tnef(data, label, walk):
        return []  # the files inside were found instead
    if not data:
        walk.note(f"{label} is empty")
    inline = (
        maintype == "image"
        and related
        and disposition != "attachment"
        and _raw_header(entity, "content-id") is not None
    )
    walk.found.append(_Found(data, ctype, filename, kind, inline))
    return []


def _unpack_tnef(data: bytes, label: str, walk: _Walk, depth: int = 0) -> bool:
    """Outlook's winmail.dat: the files inside become attachments of their own, as if the
    mail had carried them (their kind from their bytes, office files by their names). False
    (noted why) when it is damaged or holds no files: then it stays, unreadable, in the list."""
    from gateway.documents.tnef import TnefError, extract  # tnefparse only for such mail

    try:
        files, _ = extract(data)
    except TnefError as exc:
        walk.note(f"{label}: {exc}; send it again from a mail in HTML or plain-text format")
        return False
    if not files:
        walk.note(f"{label} is an Outlook winmail.dat (TNEF) with no files in it; send the "
                  "document again from a mail in HTML or plain-text format")
        return False
    for inner in files:
        # Each file counts as a part: nested winmail.dat (up to 50 files each, three deep)
        # could otherwise yield ~127,000 of them past the MIME part limit.
        walk.entities += 1
        if walk.entities > walk.max_parts:
            raise MimeError(f"the message has more than {walk.max_parts} MIME parts "
                            "(counting the files inside winmail.dat)")
        kind = detect_kind(inner.data)
        name = sanitize_header_text(inner.name, MAX_FILENAME_CHARS) if inner.name else None
        guessed = mimetypes.guess_type(name or "")[0] or "application/octet-stream"
        payload = inner.data
        if kind == "tnef" and depth < 2:  # an Outlook item attached to an Outlook item
            if _unpack_tnef(inner.data, f"'{name}' in {label}", walk, depth + 1):
                continue
        if kind is None and guessed.startswith("text/") and \
                guessed.partition("/")[2] in _TEXT_ATTACHMENT_SUBTYPES:
            text = _decode_bytes(inner.data, None)
            text = html_to_text(text) if guessed == "text/html" else tidy_text(text)
            payload, kind = text.encode("utf-8"), "text"
        # A picture Outlook's HTML shows in place (a signature logo) has a content id.
        inline = inner.content_id and kind in ("jpeg", "png", "gif")
        walk.found.append(_Found(payload, guessed, name, kind, inline))
    return True


def _walk_forwarded(
    entity: Message, ctype: str, payload: object, depth: int, walk: _Walk
) -> list[_Piece]:
    if ctype == "message/partial":
        walk.note(
            "message/partial fragments cannot be reassembled when they come inside another"
            " mail (split mails sent on their own are); send the document in one message"
        )
        return []
    if ctype == "message/external-body":
        walk.note("a message/external-body part points to a document elsewhere,"
                  " which is not fetched")
        return []
    if ctype not in _FORWARD_TYPES:
        return []  # delivery reports and the like carry no document
    cte = (_raw_header(entity, "content-transfer-encoding") or "").strip().lower()
    if isinstance(payload, list) and cte in ("base64", "quoted-printable"):
        # Not allowed by RFC 2046, but Exchange does it; the parser then reads the encoded
        # text as a header-less message.  Decode that text and parse it again.
        text = "".join(str(m.get_payload()) for m in payload if isinstance(m, Message))
        encoded = text.encode("ascii", "ignore")
        raw = _lenient_b64decode(encoded)[0] if cte == "base64" else quopri.decodestring(encoded)
        inner = [read_message(raw)]
    elif isinstance(payload, list):
        inner = [m for m in payload if isinstance(m, Message)]
    else:
        # message/global (RFC 6532) is left unparsed by the stdlib parser.
        decoded = entity.get_payload(decode=True)
        inner = [read_message(decoded)] if isinstance(decoded, bytes) else []
    pieces: list[_Piece] = []
    for message in inner:
        pieces.extend(_Piece(p.text, p.html, True) for p in _walk(message, depth + 1, walk, False))
    return pieces


def _walk_alternative(
    children: list[Message], depth: int, walk: _Walk, related: bool
) -> list[_Piece]:
    """Keep the body of one alternative, but the documents of all of them.

    Plain text is preferred (it faxes as it was written); HTML only when there is no
    non-blank plain alternative.  Documents found in more than one alternative are kept
    once.
    """
    start = len(walk.found)
    options = [_walk(child, depth + 1, walk, related) for child in children]
    seen: set[bytes] = set()
    kept: list[_Found] = []
    for found in walk.found[start:]:
        if found.data not in seen:
            seen.add(found.data)
            kept.append(found)
    walk.found[start:] = kept
    filled = [o for o in options if any(p.text.strip() for p in o)]
    plain = [o for o in filled if not any(p.html for p in o)]
    if plain:
        return plain[0]
    return filled[0] if filled else []


def _walk(entity: Message, depth: int, walk: _Walk, related: bool) -> list[_Piece]:
    if depth > walk.max_depth:
        raise MimeError(f"the message is nested more than {walk.max_depth} levels deep")
    walk.entities += 1
    if walk.entities > walk.max_parts:
        raise MimeError(f"the message has more than {walk.max_parts} MIME parts")
    ctype = _content_type(entity)
    payload = entity.get_payload()
    if ctype.startswith("message/"):
        return _walk_forwarded(entity, ctype, payload, depth, walk)
    if not isinstance(payload, list):
        if ctype.startswith("multipart/"):
            walk.note(
                "the MIME structure is broken (a multipart boundary was not found);"
                " attachments inside it cannot be read"
            )
            return []
        return _leaf(entity, ctype, walk, related)
    children = [child for child in payload if isinstance(child, Message)]
    if ctype == "multipart/encrypted":
        walk.note("the message is encrypted (PGP or S/MIME) and cannot be read;"
                  " send it unencrypted")
        return []
    if ctype == "multipart/alternative":
        return _walk_alternative(children, depth, walk, related)
    inner_related = related or ctype == "multipart/related"
    pieces: list[_Piece] = []
    for child in children:
        pieces.extend(_walk(child, depth + 1, walk, inner_related))
    return pieces


def _blank_quotes_and_comments(text: str) -> str:
    """`text` with each quoted string made '""' and each comment a blank, as RFC 5322 reads
    them: comments nest, a backslash quotes the next character in both; an unclosed one runs
    to the end. The stdlib's getaddresses reads them so too (the sender check uses it), so
    '(a (b) x@y) z@w' is z@w for both, never x@y for one of them."""
    out: list[str] = []
    depth = 0
    quoted = False
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if quoted:
            if c == "\\":
                i += 1
            elif c == '"':
                quoted = False
                out.append('""')
        elif depth:
            if c == "\\":
                i += 1
            elif c == "(":
                depth += 1
            elif c == ")":
                depth -= 1
                if not depth:
                    out.append(" ")
        elif c == '"':
            quoted = True
        elif c == "(":
            depth = 1
        else:
            out.append(c)
        i += 1
    if quoted:
        out.append('""')
    return "".join(out)


def header_address(raw: str | None) -> str | None:
    """The addr-spec of the first mailbox in a raw (unfolded) address header value, or None.

    Quoted display names and comments are blanked first, so '"a@b" <real@x>' yields real@x;
    a quoted local part in the address itself is not supported (no sender uses one). The
    sender check (SENDER_VERIFY) verifies the domain of this very address.
    """
    if raw is None:
        return None
    text = _blank_quotes_and_comments(raw[:4096])
    match = re.search(r"<\s*([^<>\s]+@[^<>\s]+?)\s*>|([^\s<>,;:\"()]+@[^\s<>,;:\"()]+)", text)
    if match is None:
        return None
    addr = sanitize_header_text(match.group(1) or match.group(2), MAX_ADDRESS_CHARS)
    addr = addr.replace(" ", "")
    return addr if "@" in addr else None


def _message_id(raw: str | None) -> str | None:
    if raw is None:
        return None
    match = _MSGID.search(raw)
    return match.group(0) if match else None


def _references(raw: str | None) -> list[str]:
    """Message-ids of References, bounded: the first and the most recent ones (RFC 5322 3.6.4)."""
    if raw is None:
        return []
    ids = _MSGID.findall(raw[:65536])
    if len(ids) > MAX_REFERENCES:
        ids = ids[:1] + ids[-(MAX_REFERENCES - 1):]
    return ids


# compat32: headers stay the raw strings the walk reads (``_raw_header`` and small tolerant
# parsers); policy.default would build a header-registry object per header fetched, which was
# the largest single cost of a 100 KB mail in the document workers.
_PARSE_POLICY = policy.compat32


_BLANK_LINE = re.compile(rb"\r?\n\r?\n")


def header_block(data: bytes) -> bytes:
    """The header section of `data` (up to its first empty line): what a header parser should
    be given. Handed the body too, the stdlib's parser splits all of it into lines for
    nothing (on the event loop, for every mail, that was a third of the daemon's own CPU)."""
    blank = _BLANK_LINE.search(data)
    return data if blank is None else data[:blank.end()]


def read_message(data: bytes) -> Message:
    """Parse raw mail bytes (raw headers, see _PARSE_POLICY); MimeError instead of
    RecursionError.

    The stdlib parser recurses once per nesting level and overflows the stack at a few
    hundred levels, which a hostile sender reaches in about 50 kB.  Callers that parse DATA
    should use this so that such mail gets a 5xx with a reason, like other unreadable mail.
    """
    if (split := _split_entity(data, 0)) is not None:
        return split
    try:
        return BytesParser(policy=_PARSE_POLICY).parsebytes(data)
    except RecursionError:
        raise MimeError("the message is nested too deeply to be read") from None


# Mail of the usual shape is split at its MIME boundaries (_split_entity), within these
# bounds; any other mail goes to the stdlib's feed parser.
_FAST_MAX_DEPTH = 4
_FAST_MAX_PARTS = 100
_HEAD_PARSER = BytesHeaderParser(policy=_PARSE_POLICY)


def _split_entity(data: bytes, depth: int, start: int = 0,
                  end: int | None = None) -> Message | None:
    """One entity (headers, body), `data[start:end]`, as the feed parser would build it, or
    None when it is not of the plain shape this handles (the caller then uses the feed
    parser): headers without defects and a blank line after them; a leaf, or a multipart with
    a boundary whose parts all close; no message/* parts and no multipart/digest.

    Nothing is sliced but the header blocks: the parts are offsets into `data`, and a leaf's
    body is decoded from a view of it, so a 27 MB mail costs its bytes and its body's string
    (the feed parser holds the body as lines and then joins them: ~2.7x the mail)."""
    if end is None:
        end = len(data)
    if data.startswith((b"\r\n", b"\n"), start, end):
        return None  # no header fields at all: rare, left to the feed parser
    blank = _BLANK_LINE.search(data, start, end)
    if blank is None:
        return None
    msg = _HEAD_PARSER.parsebytes(data[start:blank.end()])
    if msg.defects or msg.get_payload():
        return None  # a line that is no header field: the feed parser's recovery decides
    body = blank.end()
    ctype = msg.get_content_type()
    if ctype.startswith("message/") or ctype == "multipart/digest":
        return None
    if msg.get_content_maintype() != "multipart":
        with memoryview(data) as view, view[body:end] as payload:
            msg.set_payload(str(payload, "ascii", "surrogateescape"))
        return msg
    boundary = msg.get_boundary()
    if not boundary or depth >= _FAST_MAX_DEPTH:
        return None
    parts = _split_parts(data, body, end, b"--" + boundary.encode("ascii", "surrogateescape"))
    if parts is None:
        return None
    children: list[Message | str] = []  # the list type Message.set_payload takes
    for part_start, part_end in parts:
        child = _split_entity(data, depth + 1, part_start, part_end)
        if child is None:
            return None
        children.append(child)
    msg.set_payload(children)  # a multipart's payload is its list of parts
    return msg


def delimiter_lines(body: bytes, delimiter: bytes, start: int = 0, end: int | None = None,
                    max_lines: int | None = None) -> Iterator[tuple[int, int, bool]]:
    """The delimiter lines ("--boundary", RFC 2046 5.1.1) of a multipart body (`body[start:
    end]`), found with `bytes.find` (no regex compiled from each mail's own boundary): for
    each, where it starts, where its line break is (-1: none, the body ends on it), and
    whether it is the closing one ("--boundary--"). It must start a line and be followed by
    blanks only. Positions are indexes into `body`. With `max_lines`, no more than that many
    lines that start with the delimiter are looked at (a caller on the event loop bounds its
    work so: a mail can hold tens of thousands of "--boundary x" lines)."""
    if end is None:
        end = len(body)
    # Only a line's start can hold a delimiter, so "\n--boundary" is what is searched for
    # (C-speed): a hostile mail of one long line of "--boundary" made the old search, which
    # looked at the rest of the line after every one of them, quadratic (a 255 KB header block
    # held the event loop for 0.9 s in the automatic-mail check).
    at_line_start = b"\n" + delimiter
    at = start if body.startswith(delimiter, start, end) else _after_newline(
        body.find(at_line_start, start, end))
    while at != -1:
        if max_lines is not None:
            if max_lines <= 0:
                return
            max_lines -= 1
        after = at + len(delimiter)
        # What may follow a delimiter: "--", blanks, the line break, or the end. Anything else
        # (a longer boundary, "--boundaryX") is no delimiter, told without reading the line.
        if after >= end or body[after] in _AFTER_DELIMITER:
            line_end = body.find(b"\n", after, end)
            rest = body[after:line_end if line_end != -1 else end].removesuffix(b"\r")
            rest = rest.rstrip(b" \t")
            if rest in (b"", b"--"):
                yield at, line_end, rest == b"--"
        at = _after_newline(body.find(at_line_start, after - 1, end))


_AFTER_DELIMITER = frozenset(b"-\r\n \t")


def _after_newline(found: int) -> int:
    return found + 1 if found != -1 else -1


def _split_parts(data: bytes, start: int, end: int,
                 delimiter: bytes) -> list[tuple[int, int]] | None:
    """Where the parts between the delimiter lines of the multipart body `data[start:end]`
    start and end (the line break before a delimiter belongs to it), or None without a
    closing delimiter."""
    parts: list[tuple[int, int]] = []
    begin: int | None = None  # where the current part begins
    for at, line_end, closing in delimiter_lines(data, delimiter, start, end):
        if begin is not None:
            if len(parts) >= _FAST_MAX_PARTS:
                return None  # hostile or absurd: the feed parser and the walk's limits
            stop = at - 2 if data.startswith(b"\r\n", max(begin, at - 2), at) else at - 1
            parts.append((begin, max(begin, stop)))
        if closing:
            return parts if begin is not None else None
        if line_end == -1:
            return None
        begin = line_end + 1
    return None


def _split_mail(path: str) -> Message | None:
    """The mail in `path` split at its boundaries in one pass (C-speed finds), when it has the
    usual shape; None to use the feed parser. The feed parser reads a 100 KB scan line by line
    (~1,800 lines of base64): most of a small fax's parse time; and it holds a 27 MB mail's
    encoded part as lines, then joined: +75 MB at its peak, where this holds the file's bytes
    and the part's string (+55 MB), then the string alone."""
    with open(path, "rb") as fh:
        data = fh.read()
    return _split_entity(data, 0)


def read_message_file(path: str, chunk_bytes: int = 1 << 20) -> Message:
    """`read_message` for a mail in a file: split at its boundaries when it has the usual
    shape (`_split_mail`), else fed to the stdlib parser a chunk at a time.

    `parsebytes` needs the whole mail as bytes, then as a str, then copies it into a StringIO
    (four bytes a character): about 8x the message at once, 230 MB for a 20 MB scan. Fed in
    chunks, the parser holds the lines of one part and the part itself."""
    if (split := _split_mail(path)) is not None:
        return split
    parser = BytesFeedParser(policy=_PARSE_POLICY)
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(chunk_bytes):
                parser.feed(chunk)
        return parser.close()
    except RecursionError:
        raise MimeError("the message is nested too deeply to be read") from None


def parse_mail(msg: Message, *, max_depth: int = 20, max_parts: int = 500) -> ParsedMail:
    """Walk a mail into documents, one body text, and the header facts reports need.

    Documents come in order of appearance, from any depth and from forwarded messages
    (message/rfc822).  The body is the mail's own text (plain preferred over HTML, one
    alternative only, inline pieces joined); a forwarded message's text is used only when
    the mail has none of its own.  Raises MimeError when the nesting exceeds ``max_depth``
    or the entity count ``max_parts``: such mail is either hostile or not worth the work.
    """
    walk = _Walk(max_depth=max_depth, max_parts=max_parts)
    pieces = _walk(msg, 0, walk, False)
    own = [p.text for p in pieces if not p.forwarded and p.text.strip()]
    body_texts = own or [p.text for p in pieces if p.forwarded and p.text.strip()]
    text_body = "\n\n".join(body_texts) if body_texts else None
    parts = [
        Part(f.data, f.content_type, f.filename, f.kind, index, f.inline)
        for index, f in enumerate(walk.found, start=1)
    ]
    notes = walk.notes
    if len(notes) > MAX_NOTES:
        notes = notes[: MAX_NOTES - 1] + [f"... and {len(notes) - MAX_NOTES + 1} more problems"]
    subject_raw = _raw_header(msg, "subject")
    return ParsedMail(
        parts=parts,
        text_body=text_body,
        subject=sanitize_header_text(_decode_rfc2047(subject_raw or ""), MAX_SUBJECT_CHARS),
        from_addr=header_address(_raw_header(msg, "from")),
        reply_to=header_address(_raw_header(msg, "reply-to")),
        message_id=_message_id(_raw_header(msg, "message-id")),
        references=_references(_raw_header(msg, "references")),
        notes=notes,
    )
