"""The boundary splitter (documents/mime.py `_split_entity`) against the stdlib's feed parser:
for mail of the usual shape both must give the same walk; anything else goes to the feed
parser. Raw mail in the shapes of tests/corpus.py."""

from __future__ import annotations

import os
import tracemalloc
from email import policy
from email.parser import BytesParser

import pytest

from gateway.documents.mime import (
    _split_entity,
    delimiter_lines,
    parse_mail,
    read_message,
    read_message_file,
)

from .corpus import CRLF, PageSpec, b64, crlf, entity, labelled_pdf, mail, multipart, qp_text

PDF = labelled_pdf([PageSpec("ONE")])
TOP = [("From", '"Office Scanner" <scanner@example.com>'), ("To", "15551234567@fax.local"),
       ("Subject", "=?utf-8?q?Rechnung_M=C3=A4rz?="), ("Message-ID", "<m1@example.com>")]


def pdf_part(name: str = "scan.pdf") -> bytes:
    return entity([("Content-Type", f'application/pdf; name="{name}"'),
                   ("Content-Transfer-Encoding", "base64"),
                   ("Content-Disposition", f'attachment; filename="{name}"')], b64(PDF))


def text_part(text: str, charset: str = "utf-8", subtype: str = "plain") -> bytes:
    return entity([("Content-Type", f"text/{subtype}; charset={charset}"),
                   ("Content-Transfer-Encoding", "quoted-printable")],
                  qp_text(crlf(text, charset)))


REGULAR = {
    "scanner": mail(TOP, multipart("mixed", "b1", [text_part("Scan attached."), pdf_part()])),
    "outlook": mail(TOP, multipart("mixed", "=_outer", [
        multipart("alternative", "=_alt", [
            text_part("Hello,\nsee attached.\n"),
            multipart("related", "=_rel", [text_part("<p>Hello</p>", subtype="html")])]),
        pdf_part("a.pdf"), pdf_part("b.pdf")])),
    "legacy plain text": mail(TOP, entity([("Content-Type", "text/plain; charset=iso-8859-1")],
                                          crlf("Caf\u00e9 order 42\n", "latin-1"))),
    "8-bit body": mail(TOP, entity([("Content-Type", "text/plain; charset=utf-8"),
                                    ("Content-Transfer-Encoding", "8bit")],
                                   crlf("\u041f\u0440\u0438\u0432\u0435\u0442\n", "utf-8"))),
    "preamble and epilogue": mail(TOP, multipart("mixed", "b2", [pdf_part()],
                                                 preamble=b"This is MIME." + CRLF)
                                  + b"epilogue text" + CRLF),
    "blanks after boundary": mail(TOP, multipart("mixed", "b3", [pdf_part()])).replace(
        b"--b3\r\n", b"--b3  \r\n"),
    "LF line ends": mail(TOP, multipart("mixed", "b4", [text_part("x"), pdf_part()])).replace(
        CRLF, b"\n"),
    "single-part PDF": mail(TOP, pdf_part()),
}

IRREGULAR = {
    "no closing boundary": mail(TOP, multipart("mixed", "c1", [pdf_part()])).replace(
        b"--c1--", b""),
    "forwarded mail": mail(TOP, multipart("mixed", "c2", [
        entity([("Content-Type", "message/rfc822")],
               mail(TOP, multipart("mixed", "c3", [pdf_part()])))])),
    "header line without a colon": mail(TOP, multipart("mixed", "c4", [pdf_part()])).replace(
        b"MIME-Version: 1.0\r\n", b"MIME-Version: 1.0\r\nnot a header\r\n"),
    "multipart without boundary": mail(TOP, entity([("Content-Type", "multipart/mixed")],
                                                   b"text")),
}


def by_feed_parser(data: bytes) -> object:
    return parse_mail(BytesParser(policy=policy.compat32).parsebytes(data))


@pytest.mark.parametrize("name", sorted(REGULAR))
def test_usual_mail_is_split_as_the_feed_parser_reads_it(name: str, tmp_path) -> None:
    data = REGULAR[name]
    split = _split_entity(data, 0)
    assert split is not None, "this shape should not need the feed parser"
    assert parse_mail(split) == by_feed_parser(data)
    path = tmp_path / "m.eml"
    path.write_bytes(data)
    assert parse_mail(read_message_file(str(path))) == by_feed_parser(data)


@pytest.mark.parametrize("name", sorted(IRREGULAR))
def test_other_mail_goes_to_the_feed_parser(name: str) -> None:
    data = IRREGULAR[name]
    assert _split_entity(data, 0) is None
    assert parse_mail(read_message(data)) == by_feed_parser(data)


def test_the_scanner_mail_walks_to_its_documents() -> None:
    parsed = parse_mail(read_message(REGULAR["outlook"]))
    assert [p.filename for p in parsed.parts] == ["a.pdf", "b.pdf"]
    assert [p.data for p in parsed.parts] == [PDF, PDF]
    assert parsed.text_body == "Hello,\nsee attached."
    assert parsed.subject == "Rechnung M\u00e4rz"


def test_a_large_scan_is_split_and_decoded_without_copies_of_the_whole(tmp_path) -> None:
    """A scan of several MB goes through the splitter too (no size limit), gives the feed
    parser's walk, and reading plus decoding it holds about twice the mail at the peak: the
    file's bytes and the part's string, then the string and the decoded document. The feed
    parser held the part as lines and then joined (~2.7x), and the decoder's list of slices
    joined at the end held the document twice."""
    scan = b"%PDF-1.4\n" + os.urandom(6 << 20)
    data = mail(TOP, multipart("mixed", "big", [text_part("Scanned."), entity(
        [("Content-Type", 'application/pdf; name="scan.pdf"'),
         ("Content-Transfer-Encoding", "base64")], b64(scan))]))
    assert _split_entity(data, 0) is not None
    path = tmp_path / "big.eml"
    path.write_bytes(data)
    tracemalloc.start()
    try:
        parsed = parse_mail(read_message_file(str(path)))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [p.data for p in parsed.parts] == [scan]
    assert peak < 2.2 * len(data), f"peak {peak / len(data):.2f}x the mail"
    assert parsed == by_feed_parser(data)


class _CountingBytes(bytes):
    """bytes that count how many bytes their find() calls look through."""

    scanned = 0

    def find(self, sub, start=0, end=None):  # type: ignore[override]
        at = super().find(sub, start, end)
        stop = len(self) if end is None else end
        type(self).scanned += (at + len(sub) if at != -1 else stop) - start
        return at


def test_finding_delimiters_in_one_long_line_of_them_is_linear() -> None:
    """A line made of "--b" repeated: only a line's start can hold a delimiter, so the rest of
    the line is not searched again for each of them (that was quadratic, and the
    automatic-mail check runs it on the event loop over the first 256 KB of every mail)."""
    body = _CountingBytes(b"x" + b"--b" * 100_000 + b"\r\n--b--\r\n")
    _CountingBytes.scanned = 0
    assert list(delimiter_lines(body, b"--b")) == [(len(body) - 7, len(body) - 1, True)]
    assert _CountingBytes.scanned <= 2 * len(body)


def test_lines_that_only_start_with_the_delimiter_are_not_delimiters() -> None:
    body = _CountingBytes(b"--bx\r\n" * 1000 + b"--b-x\r\n--b x\r\n--b \r\n--b--\t\r\n")
    _CountingBytes.scanned = 0
    found = list(delimiter_lines(body, b"--b"))
    assert [(body[at:line_end], closing) for at, line_end, closing in found] == [
        (b"--b \r", False), (b"--b--\t\r", True)]
    assert _CountingBytes.scanned <= 2 * len(body)


def test_a_caller_can_bound_how_many_lines_are_looked_at() -> None:
    """The automatic-mail check runs on the event loop: it looks at no more than so many
    lines that start with the boundary, delimiters or not."""
    body = b"--b x\r\n" * 10 + b"--b\r\n" + b"--b--\r\n"
    assert [closing for *_, closing in delimiter_lines(body, b"--b")] == [False, True]
    assert list(delimiter_lines(body, b"--b", max_lines=10)) == []
    assert len(list(delimiter_lines(body, b"--b", max_lines=11))) == 1
