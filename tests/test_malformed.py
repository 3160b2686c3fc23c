"""Hostile and broken mail through the live gateway: every message gets a clear SMTP answer and
the daemon keeps serving."""

from __future__ import annotations

import base64
import io
import smtplib
from pathlib import Path

import pytest
from PIL import Image

from .conftest import make_pdf, pdf_mail, smtp_send

RCPT = "15551234567@fax.local"
PDF = make_pdf(1)
B64_PDF = base64.encodebytes(PDF).decode().strip()


def mail(head: str, body: str) -> bytes:
    return (head.strip("\n").replace("\n", "\r\n") + "\r\n\r\n" +
            body.replace("\r\n", "\n").replace("\n", "\r\n")).encode("utf-8", "surrogateescape")


def bomb_png() -> bytes:
    """A small file that decodes to 40,000 x 40,000 pixels (1.6 gigapixels)."""
    out = io.BytesIO()
    Image.new("1", (40_000, 40_000), 1).save(out, "PNG", optimize=True)
    return out.getvalue()


def nested(depth: int) -> bytes:
    head = ('From: a@example.com\nSubject: deep\nMIME-Version: 1.0\n'
            'Content-Type: multipart/mixed; boundary="b0"')
    body = "--b0\n"
    for i in range(1, depth):
        body += f'Content-Type: multipart/mixed; boundary="b{i}"\n\n--b{i}\n'
    body += "Content-Type: application/pdf\nContent-Transfer-Encoding: base64\n\n"
    body += B64_PDF + "\n"
    for i in reversed(range(depth)):
        body += f"--b{i}--\n"
    return mail(head, body)


def b64_lines(data: bytes) -> str:
    return base64.encodebytes(data).decode()


CASES: list[tuple[str, bytes, int, str]] = [
    # A body with words and nothing attached is a legacy system's text: it is faxed.
    ("no headers at all", b"\r\njust a line\r\n", 250, "2.0.0"),
    ("only a blank body", b"Subject: x\r\n\r\n\r\n", 554, "5.6.0"),
    ("NUL bytes in body", b"Subject: x\r\n\r\nabc\x00def\r\n", 554, "5.6.0"),
    ("missing closing boundary", mail(
        'From: a@example.com\nMIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="zz"',
        f"--zz\nContent-Type: application/pdf\nContent-Transfer-Encoding: base64\n\n{B64_PDF}\n"),
     250, "2.0.0"),
    ("boundary never used", mail(
        'From: a@example.com\nMIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="q"',
        "no parts here\n"), 554, "5.6.0"),
    ("undecodable base64 PDF", mail(
        'From: a@example.com\nMIME-Version: 1.0\nContent-Type: application/pdf\n'
        'Content-Transfer-Encoding: base64', "%%%% not base64 at all !!!!\n"), 554, "5.6.0"),
    ("unknown charset and transfer encoding", mail(
        "From: a@example.com\nMIME-Version: 1.0\nContent-Type: text/plain; charset=x-klingon\n"
        "Content-Transfer-Encoding: x-unknown", "qapla' this is real text for the fax page\n"),
     250, "2.0.0"),
    ("header injection in subject", mail(
        "From: a@example.com\nSubject: =?utf-8?q?hi=0D=0ABcc:_victim@example.com?=",
        "This legacy system text becomes the fax page.\n"), 250, "2.0.0"),
    ("PDF truncated half-way", mail(
        'From: a@example.com\nMIME-Version: 1.0\nContent-Type: application/pdf\n'
        'Content-Transfer-Encoding: base64',
        b64_lines(PDF[: len(PDF) // 2])), 554, "5.6.0"),
    ("decompression bomb image", mail(
        'From: a@example.com\nMIME-Version: 1.0\nContent-Type: image/png\n'
        'Content-Transfer-Encoding: base64',
        b64_lines(bomb_png())), 554, "5.6.0"),
    ("multiparts nested 15 deep", nested(15), 250, "2.0.0"),
    ("multiparts nested 200 deep", nested(200), 554, "5.6.0"),
    ("multiparts nested 2000 deep", nested(2000), 554, "5.6.0"),
]


@pytest.mark.parametrize("name,raw,code,enhanced", CASES, ids=[c[0] for c in CASES])
async def test_malformed_mail_gets_a_clear_answer(make_gateway, tmp_path: Path, name: str,
                                                  raw: bytes, code: int, enhanced: str) -> None:
    gw = await make_gateway()
    reply = await smtp_send(gw.smtp.port, raw, [RCPT])
    assert (reply.code, reply.text[:5]) == (code, enhanced), reply.text
    if code >= 500:
        assert len(reply.text) > 10 and "\n" not in reply.text
        assert await gw.store.run(gw.store.jobs) == []
    # The daemon still serves the next, good message.
    good = await smtp_send(gw.smtp.port, pdf_mail(RCPT), [RCPT])
    assert good.code == 250


async def test_overlong_lines_are_read_not_fatal(make_gateway) -> None:
    """Lines over 1000 octets are accepted (RFC 5321 lets a server) and judged by content."""
    gw = await make_gateway()
    raw = b"Subject: " + b"x" * 5000 + b"\r\n\r\nbody\r\n"
    reply = await smtp_send(gw.smtp.port, raw, [RCPT])
    assert (reply.code, reply.text[:5]) == (554, "5.6.0")  # nothing to fax in it
    long_text = (b"Subject: report\r\n\r\n" +
                 b"A long line of real text for the fax page. " * 100 + b"\r\n")
    reply = await smtp_send(gw.smtp.port, long_text, [RCPT])
    assert reply.code == 250
    good = await smtp_send(gw.smtp.port, pdf_mail(RCPT), [RCPT])
    assert good.code == 250


async def test_commands_out_of_order_and_garbage(make_gateway) -> None:
    gw = await make_gateway()

    def run() -> list[tuple[int, bytes]]:
        with smtplib.SMTP("127.0.0.1", gw.smtp.port, timeout=20) as client:
            before_helo = client.docmd("MAIL FROM:<a@example.com>")
            client.ehlo("x")
            return [before_helo, client.docmd("RCPT TO:<15551234567@fax.local>"),
                    client.docmd("DATA"), client.docmd("\x01\x02 garbage"),
                    client.docmd("MAIL FROM:<a@example.com>")]

    import asyncio

    replies = await asyncio.to_thread(run)
    codes = [c for c, _ in replies]
    assert codes == [503, 503, 503, 500, 250], replies  # and the session is still usable


async def test_dot_stuffing_pipelining_and_empty_data(make_gateway) -> None:
    """The bulk DATA reader keeps SMTP's rules: dots unstuffed, the end marker found across
    reads, pipelined commands after it still answered, an empty message judged empty."""
    import socket as sock

    gw = await make_gateway()
    body = (b"From: a@example.com\r\nSubject: dots\r\n\r\n"
            b"..leading dot line of a legacy report\r\n" + b"plain text line\r\n" * 3000)

    def run() -> list[bytes]:
        with sock.create_connection(("127.0.0.1", gw.smtp.port), timeout=20) as s:
            f = s.makefile("rb")
            replies = [f.readline()]
            # Everything pipelined in one write, the message split at odd places by TCP.
            s.sendall(b"EHLO x\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<" + RCPT.encode() +
                      b">\r\nDATA\r\n")
            while not (line := f.readline()).startswith(b"354"):
                replies.append(line)
            replies.append(line)
            s.sendall(body + b".\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<" + RCPT.encode() +
                      b">\r\nDATA\r\n")
            for _ in range(4):
                replies.append(f.readline())
            s.sendall(b".\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<" + RCPT.encode() +
                      b">\r\nDATA\r\n")
            for _ in range(4):
                replies.append(f.readline())
            s.sendall(b"x\r\n.\r\nQUIT\r\n")  # a one-line message, marker right after it
            replies += [f.readline(), f.readline()]
            return replies

    import asyncio

    replies = await asyncio.to_thread(run)
    queued = [r for r in replies if r.startswith(b"250 2.0.0 Queued")]
    assert len(queued) == 1, replies
    assert replies[-6].startswith(b"554 5.6.0")  # the empty message: nothing to fax
    assert replies[-2].startswith(b"554 5.6.0")  # "x": nothing to fax, but read and answered
    assert replies[-1].startswith(b"221")
    [job] = await gw.store.run(gw.store.jobs)
    message = await gw.store.run(gw.store.message, job.message_id)
    from pypdf import PdfReader

    text = PdfReader(message.document_path).pages[0].extract_text()
    assert ".leading dot line" in text and "..leading" not in text
