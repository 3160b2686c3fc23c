"""DATA to a file: the streaming writer against a line-by-line reference, and the reader
against a real StreamReader (pipelined commands stay unread)."""

from __future__ import annotations

import asyncio
import io

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.smtp import data as data_mod
from gateway.smtp.data import DataWriter, Incoming, Outcome, receive


def reference(stream: bytes) -> tuple[Outcome, bytes] | None:
    """RFC 5321 DATA read one line at a time, with the gateway's line-ending rules."""
    out = []
    prev_crlf = True
    rest = stream
    while b"\n" in rest:
        line, rest = rest.split(b"\n", 1)
        line += b"\n"
        if line.rstrip(b"\r\n") == b"." and line[1:].strip(b"\r") == b"\n":
            if line == b".\r\n" and prev_crlf:
                return Outcome.DONE, b"".join(out)
            return Outcome.BARE_LF, b""
        if line.startswith(b"."):
            line = line[1:]
        if line.endswith(b"\r\r\n"):
            line = line.rstrip(b"\r\n") + b"\r\n"
        out.append(line)
        prev_crlf = line.endswith(b"\r\n")
    return None


def end_offset(stream: bytes) -> int:
    """Where the bytes after the first proper end marker line start."""
    if stream.startswith(b".\r\n"):
        return 3
    return stream.index(b"\r\n.\r\n") + 5


def run(chunks: list[bytes], limit: int = 0) -> tuple[Outcome, bytes] | None:
    buf = io.BytesIO()
    writer = DataWriter(buf, limit)
    for chunk in chunks:
        done = writer.feed(chunk)
        if done is not None:
            return done[0], (buf.getvalue() if done[0] is Outcome.DONE else b"")
    return None


piece = st.sampled_from([b"a", b"b.c", b".", b"..", b"\r", b"\n", b"\r\n", b"\r\r\n", b"xyz",
                         b"\r\n.\r\n", b"\n.\n", b".\r\n", b"=2E"])


@settings(max_examples=400, deadline=None)
@given(st.lists(piece, max_size=40), st.lists(st.integers(1, 30), min_size=1, max_size=10),
       st.sampled_from([4, 64 * 1024]))
def test_writer_matches_line_reference(pieces: list[bytes], cuts: list[int], carry: int) -> None:
    stream = b"".join(pieces)
    chunks, pos, i = [], 0, 0
    while pos < len(stream):
        n = cuts[i % len(cuts)]
        chunks.append(stream[pos:pos + n])
        pos += n
        i += 1
    old = data_mod.MAX_CARRY_BYTES
    data_mod.MAX_CARRY_BYTES = carry
    try:
        got = run(chunks)
    finally:
        data_mod.MAX_CARRY_BYTES = old
    want = reference(stream)
    assert got == want, (stream, chunks)


def test_unstuffing_doubled_cr_and_empty_message() -> None:
    assert run([b".\r\n"]) == (Outcome.DONE, b"")
    assert run([b"..a\r\nb\r\r\n..\r\n.\r\n"]) == (Outcome.DONE, b".a\r\nb\r\n.\r\n")
    assert run([b"Subject: x\r\r\n\r\r\nbody\r\r\n.\r\n"]) == (
        Outcome.DONE, b"Subject: x\r\n\r\nbody\r\n")


@pytest.mark.parametrize("stream", [b"a\n.\n", b"a\r\n.\n", b"a\n.\r\n", b"a\r\n.\r\r\n",
                                    b".\n"])
def test_bare_lf_end_markers_refused(stream: bytes) -> None:
    assert run([stream]) == (Outcome.BARE_LF, b"")


@pytest.mark.parametrize("chunks, expected", [
    # Plain lines (the quick path), then what follows them in the next chunk: a stuffed line
    # or the end marker, which read the line ending the quick path left behind.
    ([b"abc\r\nde\r\n", b".\r\n"], (Outcome.DONE, b"abc\r\nde\r\n")),
    ([b"abc\n", b".\r\n"], (Outcome.BARE_LF, b"")),  # after a bare LF: refused
    ([b"abc\r\n", b"..x\r\n.\r\n"], (Outcome.DONE, b"abc\r\n.x\r\n")),
    ([b"abc\r\nd", b"ef\r\n", b".\r\n"], (Outcome.DONE, b"abc\r\ndef\r\n")),
    ([b"\n", b".\r\n"], (Outcome.BARE_LF, b"")),  # a lone LF line, then a dot line
    ([b"a\r\r\nb\r\n", b".\r\n"], (Outcome.DONE, b"a\r\nb\r\n")),  # doubled CR folded
])
def test_plain_chunks_and_what_follows_them(chunks: list[bytes],
                                            expected: tuple[Outcome, bytes]) -> None:
    assert run(chunks) == expected == reference(b"".join(chunks))


def test_over_the_limit_reads_to_the_end_and_stores_nothing_more() -> None:
    buf = io.BytesIO()
    writer = DataWriter(buf, 100)
    assert writer.feed(b"x" * 90 + b"\r\n") is None
    assert writer.feed(b"y" * 200 + b"\r\n") is None
    done = writer.feed(b".\r\n")
    assert done is not None and done[0] is Outcome.TOO_BIG
    assert len(buf.getvalue()) <= 100


def test_long_line_is_written_in_pieces() -> None:
    buf = io.BytesIO()
    writer = DataWriter(buf, 0)
    for _ in range(50):
        assert writer.feed(b"A" * 65536) is None
    assert len(writer._carry) <= data_mod.MAX_CARRY_BYTES
    done = writer.feed(b"\r\n.\r\n")
    assert done == (Outcome.DONE, 5)
    assert buf.getvalue() == b"A" * 65536 * 50 + b"\r\n"


async def feed_reader(payload: bytes, limit: int = 1001) -> asyncio.StreamReader:
    reader = asyncio.StreamReader(limit=limit)
    reader.feed_data(payload)
    reader.feed_eof()
    return reader


@pytest.mark.parametrize("limit", [1001, 64 * 1024])
async def test_receive_leaves_pipelined_commands_unread(limit: int) -> None:
    body = b"line one. with dots...\r\n..stuffed\r\n" + b"B" * 5000 + b"\r\n"
    reader = await feed_reader(body + b".\r\nQUIT\r\n", limit)
    buf = io.BytesIO()
    result = await receive(reader, DataWriter(buf, 0))
    assert result.outcome is Outcome.DONE
    assert buf.getvalue() == body.replace(b"\n..", b"\n.")
    assert await reader.read() == b"QUIT\r\n"


async def test_receive_eof_mid_message() -> None:
    reader = await feed_reader(b"half a message\r\n")
    result = await receive(reader, DataWriter(io.BytesIO(), 0))
    assert result.outcome is Outcome.EOF


def test_incoming_start_removes_leftovers(tmp_path) -> None:
    incoming = Incoming(tmp_path / "incoming")
    incoming.start()
    path, fh = incoming.create()
    fh.write(b"x")
    fh.close()
    (tmp_path / "incoming" / "keep.txt").write_text("not ours")
    Incoming(tmp_path / "incoming").start()
    assert not path.exists()
    assert (tmp_path / "incoming" / "keep.txt").exists()


def test_connection_limits_count_and_release() -> None:
    from gateway.smtp.connections import ConnectionLimits

    limits = ConnectionLimits(max_total=3, max_per_ip=2, clock=lambda: 0.0)
    assert limits.admit("a") is None and limits.admit("a") is None
    assert limits.admit("a") == "per_ip"
    assert limits.admit("b") is None
    assert limits.admit("c") == "total"
    limits.release("a")
    assert limits.admit("c") is None
    assert limits.note_refusal() is True and limits.note_refusal() is False


def test_accept_errors_become_one_line_a_minute(caplog) -> None:
    import errno
    import logging

    from gateway.smtp.connections import AcceptErrors

    passed: list[dict] = []
    loop = asyncio.new_event_loop()
    try:
        loop.set_exception_handler(lambda _loop, ctx: passed.append(ctx))
        now = [0.0]
        errors = AcceptErrors(loop, clock=lambda: now[0])
        errors.install()
        caplog.set_level(logging.WARNING, logger="gateway.smtp.connections")
        context = {"message": "socket.accept() out of system resource",
                   "exception": OSError(errno.EMFILE, "Too many open files")}
        for _ in range(100):
            loop.call_exception_handler(context)
        now[0] = 61.0
        loop.call_exception_handler(context)
        loop.call_exception_handler({"message": "something else"})
        errors.uninstall()
    finally:
        loop.close()
    lines = [r for r in caplog.records if r.name == "gateway.smtp.connections"]
    assert len(lines) == 2 and "(99 more in the last minute)" in lines[1].getMessage()
    assert all(r.exc_info is None for r in lines)
    assert passed == [{"message": "something else"}]


@settings(max_examples=300, deadline=None)
@given(st.lists(piece, max_size=40), st.sampled_from([1001, 64 * 1024]))
async def test_receive_matches_line_reference(pieces: list[bytes], limit: int) -> None:
    stream = b"".join(pieces)
    want = reference(stream)
    reader = asyncio.StreamReader(limit=limit)
    reader.feed_data(stream + b"NEXT\r\n")
    reader.feed_eof()
    buf = io.BytesIO()
    result = await receive(reader, DataWriter(buf, 0))
    if want is None:
        assert result.outcome is Outcome.EOF
        return
    assert result.outcome is want[0]
    if want[0] is Outcome.DONE:
        assert buf.getvalue() == want[1]
        # whatever followed the end marker is still in the reader, untouched
        assert await reader.read() == stream[end_offset(stream):] + b"NEXT\r\n"


async def test_receive_dot_line_right_after_a_stuffed_line() -> None:
    reader = asyncio.StreamReader(limit=1001)
    reader.feed_data(b"..a\r\n.\r\nQUIT\r\n")
    buf = io.BytesIO()
    result = await asyncio.wait_for(receive(reader, DataWriter(buf, 0)), 5)
    assert result.outcome is Outcome.DONE and buf.getvalue() == b".a\r\n"
    assert await reader.readexactly(6) == b"QUIT\r\n"


@pytest.mark.parametrize("keep", [1, 7, 20, 10_000])
def test_the_writer_keeps_the_head_of_what_it_wrote(keep: int) -> None:
    """Intake reads the header block from the writer, not from the file: it must be the
    file's own first bytes (unstuffed, doubled CRs folded), however DATA was cut."""
    stream = (b"Subject: dots\r\n..leading dot\r\nline\r\r\n" + b"x" * 50 + b"\r\n.\r\n")
    for cut in range(1, len(stream), 5):
        out = io.BytesIO()
        writer = DataWriter(out, 0, keep_head=keep)
        done = writer.feed(stream[:cut]) or writer.feed(stream[cut:])
        assert done is not None and done[0] is Outcome.DONE
        assert bytes(writer.head) == out.getvalue()[:keep]
    assert DataWriter(io.BytesIO(), 0).head == b""  # nothing kept unless asked
