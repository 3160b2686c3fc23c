"""The SMTP edge under hostile and careless clients, over raw sockets on loopback: bare-LF end
markers and smuggling, doubled CRs, connection caps, a trickling sender, idle sessions, the rate
limit attack of issue 15, DATA on disk while it arrives, HELP, and failed STARTTLS handshakes."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from .conftest import base_env, make_pdf, pdf_mail

RCPT = "15551234567@fax.local"


class Raw:
    """A line-level SMTP client on a raw socket: sends exactly the bytes it is given."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int, source: str = "127.0.0.1") -> Raw:
        reader, writer = await asyncio.open_connection("127.0.0.1", port,
                                                       local_addr=(source, 0))
        return cls(reader, writer)

    async def reply(self, timeout_s: float = 20.0) -> tuple[int, str]:
        """One (possibly multi-line) reply; (0, "") when the server closed the connection."""
        lines = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), timeout_s)
            if not line:
                return 0, ""
            lines.append(line.decode().rstrip("\r\n"))
            if line[3:4] != b"-":
                return int(lines[-1][:3]), "\n".join(lines)

    async def cmd(self, line: bytes | str) -> tuple[int, str]:
        self.writer.write(line.encode() + b"\r\n" if isinstance(line, str) else line)
        await self.writer.drain()
        return await self.reply()

    async def closed(self, timeout_s: float = 20.0) -> bool:
        return await asyncio.wait_for(self.reader.read(), timeout_s) == b""

    async def start_mail(self, sender: str = "alice@example.com", rcpt: str = RCPT) -> None:
        assert (await self.reply())[0] == 220
        assert (await self.cmd("EHLO client.test"))[0] == 250
        assert (await self.cmd(f"MAIL FROM:<{sender}>"))[0] == 250
        assert (await self.cmd(f"RCPT TO:<{rcpt}>"))[0] == 250
        assert (await self.cmd("DATA"))[0] == 354

    def close(self) -> None:
        self.writer.close()


def crlf(msg_bytes: bytes) -> bytes:
    return re.sub(rb"\r?\n", b"\r\n", msg_bytes)


async def test_bare_lf_end_marker_is_answered_at_once_not_after_300_s(make_gateway,
                                                                      tmp_path: Path) -> None:
    gw = await make_gateway(base_env(tmp_path / "var"))
    client = await Raw.connect(gw.smtp.port)
    await client.start_mail()
    body = b"Subject: legacy\nFrom: alice@example.com\n\nplain text from a unix program\n.\n"
    code, text = await client.cmd(body)
    assert code == 550 and text.startswith("550 5.6.0 Bare LF"), text
    assert await client.closed()


async def test_smuggled_message_after_bare_lf_marker_is_never_read(make_gateway,
                                                                    tmp_path: Path) -> None:
    gw = await make_gateway(base_env(tmp_path / "var"))
    client = await Raw.connect(gw.smtp.port)
    await client.start_mail()
    smuggled = (b"Subject: real\r\n\r\nhello\r\n\n.\n"
                b"MAIL FROM:<ceo@example.com>\r\nRCPT TO:<15557654321@fax.local>\r\nDATA\r\n"
                b"Subject: forged\r\n\r\nwire the money\r\n.\r\nQUIT\r\n")
    code, text = await client.cmd(smuggled)
    assert (code, text[:9]) == (550, "550 5.6.0")
    assert await client.closed()  # no 250 for the smuggled MAIL/RCPT/DATA
    assert not list((tmp_path / "var" / "incoming").glob("*.part"))


async def test_doubled_cr_lines_keep_headers_and_attachment(make_gateway, tmp_path: Path) -> None:
    gw = await make_gateway(base_env(tmp_path / "var"))
    mail = pdf_mail(RCPT, pdf=make_pdf(2) + b"\0" * 100_000)
    raw = crlf(mail.as_bytes()).replace(b"\r\n", b"\r\r\n")
    client = await Raw.connect(gw.smtp.port)
    await client.start_mail()
    code, text = await client.cmd(raw + b"\r\n.\r\n")
    # Without folding the CRs the header block ends after the first line and the base64 of the
    # PDF is faxed as dozens of text pages.
    assert code == 250 and text.endswith("(2 pages)"), text
    client.close()


async def test_connection_caps_per_address_and_in_total(make_gateway, tmp_path: Path) -> None:
    gw = await make_gateway(base_env(tmp_path / "var", SMTP_MAX_CONNECTIONS="3",
                                     SMTP_MAX_CONNECTIONS_PER_IP="2"))
    port = gw.smtp.port
    held = [await Raw.connect(port), await Raw.connect(port)]
    for c in held:
        assert (await c.reply())[0] == 220
    third = await Raw.connect(port)
    code, text = await third.reply()
    assert code == 421 and text.startswith("421 4.7.0 Too many connections from 127.0.0.1"), text
    assert await third.closed()
    other = await Raw.connect(port, source="127.0.0.2")  # another address still gets in
    assert (await other.reply())[0] == 220
    held.append(other)
    fourth = await Raw.connect(port, source="127.0.0.3")  # but not past the total
    code, text = await fourth.reply()
    assert code == 421 and text.startswith("421 4.7.0 Too many connections"), text
    held.pop(0).close()
    await held[0].cmd("NOOP")  # the server has seen the close once a later command is answered
    for _ in range(100):
        again = await Raw.connect(port, source="127.0.0.3")
        code, _ = await again.reply()
        again.close()
        if code == 220:
            break
        await asyncio.sleep(0.05)  # the closed session's slot is freed on the loop, not by us
    assert code == 220
    for c in held:
        c.close()


async def test_trickling_data_is_cut_off_with_421(make_gateway, tmp_path: Path) -> None:
    gw = await make_gateway(base_env(tmp_path / "var", SMTP_DATA_TIMEOUT_SECONDS="1"))
    client = await Raw.connect(gw.smtp.port)
    await client.start_mail()
    loop = asyncio.get_running_loop()
    started = loop.time()

    async def trickle() -> None:  # one byte every 0.1 s: the sender's behaviour under test
        client.writer.write(b"Subject: slow\r\n\r\n")
        try:
            while True:
                client.writer.write(b"x")
                await client.writer.drain()
                await asyncio.sleep(0.1)
        except ConnectionError:
            return

    sender = asyncio.create_task(trickle())
    code, text = await client.reply()
    cut = loop.time() - started
    sender.cancel()
    assert code == 421 and text.startswith("421 4.4.2 The message took longer than 1 seconds")
    assert cut < 5
    assert await client.closed()
    assert not list((tmp_path / "var" / "incoming").glob("*.part"))


async def test_idle_session_gets_421_before_close(make_gateway, tmp_path: Path) -> None:
    gw = await make_gateway(base_env(tmp_path / "var", SMTP_IDLE_TIMEOUT_SECONDS="1"))
    client = await Raw.connect(gw.smtp.port)
    assert (await client.reply())[0] == 220
    assert (await client.cmd("EHLO client.test"))[0] == 250
    code, text = await client.reply(timeout_s=10)  # sent by the server on its own
    assert (code, text[:9]) == (421, "421 4.4.2"), text
    assert await client.closed()


async def test_each_command_moves_the_idle_timeout_on(make_gateway, tmp_path: Path) -> None:
    """The idle timer counts from the last command: a session that sends a command every
    0.4 s outlives a 1 s idle timeout many times over, then gets its 421 a second after its
    last command (the timer is moved on, not made anew, per command)."""
    gw = await make_gateway(base_env(tmp_path / "var", SMTP_IDLE_TIMEOUT_SECONDS="1"))
    client = await Raw.connect(gw.smtp.port)
    loop = asyncio.get_running_loop()
    assert (await client.reply())[0] == 220
    assert (await client.cmd("EHLO client.test"))[0] == 250
    for _ in range(7):  # the client's pace is what is under test
        await asyncio.sleep(0.4)
        assert (await client.cmd("NOOP"))[0] == 250
    last = loop.time()
    code, text = await client.reply(timeout_s=10)
    assert (code, text[:9]) == (421, "421 4.4.2"), text
    assert 0.9 <= loop.time() - last < 5
    assert await client.closed()


async def test_rate_limit_attack_without_data_locks_out_no_one(make_gateway,
                                                               tmp_path: Path) -> None:
    """Issue 15 item 1: 30 sessions of 20 RCPT from one made-up sender, no DATA. The churn
    bound is that sender's at that address (issue 26 item 15), so it stops the attacker and
    no one else."""
    gw = await make_gateway(base_env(tmp_path / "var", TRUSTED_NETWORKS="",
                                     ALLOWED_SENDERS="example.org"))
    port = gw.smtp.port

    async def session(n: int) -> list[int]:
        c = await Raw.connect(port)
        assert (await c.reply())[0] == 220
        await c.cmd("EHLO attacker.test")
        await c.cmd("MAIL FROM:<made-up-3@example.org>")
        codes = [(await c.cmd(f"RCPT TO:<155520{n:02d}{r:03d}@fax.local>"))[0]
                 for r in range(20)]
        await c.cmd("QUIT")
        c.close()
        return codes

    codes = [code for n in range(30) for code in await session(n)]
    assert codes.count(250) == 400  # the churn bound per sender: the attacker's own
    assert set(codes[400:]) == {450}
    # Everyone else, a new sender or one the attacker named, still gets through.
    for sender in ("new-sender@example.org", "made-up-3@example.org"):
        c = await Raw.connect(port, source="127.0.0.2")
        await c.start_mail(sender=sender)
        code, text = await c.cmd(crlf(pdf_mail(RCPT, sender=sender).as_bytes()) + b".\r\n")
        assert code == 250 and "Queued" in text, text
        c.close()


async def test_data_goes_to_disk_as_it_arrives(make_gateway, tmp_path: Path) -> None:
    gw = await make_gateway(base_env(tmp_path / "var"))
    client = await Raw.connect(gw.smtp.port)
    await client.start_mail()
    client.writer.write(b"Subject: big\r\nContent-Type: text/plain\r\n\r\n")
    line = b"A" * 998 + b"\r\n"
    client.writer.write(line * 4096)  # 4 MB, then the sender pauses
    await client.writer.drain()
    incoming = tmp_path / "var" / "incoming"
    size = 0
    for _ in range(200):
        files = list(incoming.glob("*.eml.part"))
        size = files[0].stat().st_size if files else 0
        if size >= 3_000_000:
            break
        await asyncio.sleep(0.05)  # polling the file the server writes
    assert size >= 3_000_000
    client.close()
    for _ in range(200):
        if not list(incoming.glob("*.eml.part")):
            break
        await asyncio.sleep(0.05)
    assert not list(incoming.glob("*.eml.part"))  # the sender went away: the file is gone


async def test_leftover_incoming_files_are_removed_at_start(make_gateway, tmp_path: Path) -> None:
    incoming = tmp_path / "var" / "incoming"
    incoming.mkdir(parents=True)
    (incoming / "0123456789abcdef.eml.part").write_bytes(b"half a message")
    await make_gateway(base_env(tmp_path / "var"))
    assert not list(incoming.glob("*.eml.part"))


async def test_oversized_message_refused_while_receiving(make_gateway, tmp_path: Path) -> None:
    gw = await make_gateway(base_env(tmp_path / "var", SMTP_MAX_MESSAGE_BYTES="65536"))
    client = await Raw.connect(gw.smtp.port)
    await client.start_mail()
    code, text = await client.cmd(b"Subject: x\r\n\r\n" + (b"B" * 998 + b"\r\n") * 200
                                  + b".\r\n")
    assert code == 552 and text.startswith("552 5.3.4 Message too big"), text
    assert (await client.cmd("NOOP"))[0] == 250  # the session goes on
    client.close()


async def test_help_lists_data_and_auth_and_starttls_first_has_enhanced_code(
        make_gateway, tmp_path: Path) -> None:
    gw = await make_gateway(base_env(tmp_path / "var"))
    client = await Raw.connect(gw.smtp.port)
    assert (await client.reply())[0] == 220
    await client.cmd("EHLO client.test")
    code, text = await client.cmd("HELP")
    assert code == 250 and " DATA" in text and " MAIL" in text, text
    client.close()


async def test_text_body_over_the_length_limit_gets_554_not_500(make_gateway,
                                                                 tmp_path: Path) -> None:
    """Issue 15 item 8: a ConvertError from the body used to escape as `500 Error: (...)`."""
    gw = await make_gateway(base_env(tmp_path / "var"))
    client = await Raw.connect(gw.smtp.port)
    await client.start_mail()
    body = (b"word " * 19 + b"\r\n") * 2200  # 220,000 characters of real text
    code, text = await client.cmd(b"Subject: long\r\nFrom: alice@example.com\r\n\r\n" + body
                                  + b".\r\n")
    assert code == 554 and text.startswith("554 5.6.0 The message text is too long"), text
    client.close()


async def test_a_multi_line_reply_is_one_write(make_gateway, tmp_path: Path) -> None:
    """EHLO's reply (a line per extension) goes out in one write, not one per line; its lines
    are what they were, and the session goes on as before."""
    gw = await make_gateway(base_env(tmp_path / "var"))
    raw = await Raw.connect(gw.smtp.port)
    assert (await raw.reply())[0] == 220
    [session] = gw.smtp._connections  # noqa: SLF001 - the server's end of this connection
    writes: list[bytes] = []
    transport = session._writer.transport  # noqa: SLF001
    real_write = transport.write

    def counted(data: bytes) -> None:
        writes.append(bytes(data))
        real_write(data)

    transport.write = counted  # type: ignore[method-assign]
    code, text = await raw.cmd("EHLO client.test")
    lines = text.splitlines()
    assert code == 250 and len(lines) >= 4 and lines[0].startswith("250-")
    assert lines[-1] == "250 HELP" and all(line.startswith("250-") for line in lines[:-1])
    assert "250-8BITMIME" in lines and "250-ENHANCEDSTATUSCODES" in lines
    assert writes == ["\r\n".join(lines).encode() + b"\r\n"]
    assert (await raw.cmd("NOOP"))[0] == 250 and len(writes) == 2
    raw.close()
