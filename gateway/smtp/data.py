"""SMTP DATA to a file as it arrives: dot-unstuffed, size-bounded, end marker found strictly.

The message never sits whole in the daemon's memory: chunks are read with StreamReader's public
`read()`, the complete lines of each chunk are unstuffed in bulk and written to a file under
DATA_DIR/incoming, and only the unfinished last line is carried over (a line longer than
`MAX_CARRY_BYTES` is written out in pieces, so one huge line costs no more than many short ones).

Line endings, decided like a careful server (and with SMTP smuggling in mind):
- Only <CR><LF>.<CR><LF> ends the message. A line holding just "." that ends or starts with a
  bare LF (`\\n.\\n`, `\\r\\n.\\n`, `\\n.\\r\\n`, `.\\r\\r\\n`) is either a legacy client's end
  marker or a smuggling attempt; it is refused at once (`550 5.6.0`) and the connection closed,
  so the legacy client learns why instead of hanging, and nothing after it is ever read as a
  command.
- Lines ending in <CR><CR><LF> (a doubled CR, as some Windows programs write) are stored with a
  single <CR><LF>: otherwise the parser sees an empty line after the first header and faxes the
  rest of the mail as text.
- Other bare LFs inside the content are kept (the MIME parser reads them as line ends).

`Incoming` owns the directory: files are created there per message, removed once intake has the
document (or refused it), and any left by a killed daemon are removed at start.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import secrets
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger(__name__)

READ_BYTES = 256 * 1024
MAX_CARRY_BYTES = 64 * 1024

# A line that is a lone dot, with whatever CRs; its first "\n" is the previous line's end.
_DOT_LINE = re.compile(rb"\n\.\r*\n")
_MULTI_CR = re.compile(rb"\r\r+\n")
# What the two cheap scans look for. `re` finds a literal of two bytes twice as fast as
# `bytes.find`/`in` (a 64 KB chunk: 25 us against 55 us), and most chunks hold neither.
_DOT_START = re.compile(rb"\n\.")
_DOUBLE_CR = re.compile(rb"\r\r")


class Outcome(Enum):
    DONE = "done"            # the end marker was read; the message is in the file
    TOO_BIG = "too_big"      # the end marker was read; the message was over the limit
    BARE_LF = "bare_lf"      # a lone-dot line with a bare LF: refuse and close
    EOF = "eof"              # the client went away in the middle of the message


@dataclass
class Result:
    outcome: Outcome
    size: int                # bytes received (before unstuffing), up to the end marker


class DataWriter:
    """The pure part: feed chunks as they arrive, get the unstuffed message written to `out`.

    `feed` returns None while the message goes on, else the Outcome and how many bytes of the
    chunk were consumed (the rest belongs to the next command, pipelined by the client).
    """

    def __init__(self, out: BinaryIO | None, limit: int, keep_head: int = 0) -> None:
        self.out = out
        self.limit = limit
        self.received = 0
        self.written = 0
        # The first `keep_head` bytes written, kept: intake reads the header block from here
        # rather than from the file (a thread hop that waited ~8 ms behind the spool's fsyncs
        # in a burst, on every mail's way to its 250).
        self.keep_head = keep_head
        self.head = bytearray()
        self._carry = b""
        self._prev_crlf = True   # DATA's own line ended with CRLF
        self._mid_line = False   # the carry is the tail of a line whose start was written
        self.error: OSError | None = None  # the file could not be written (disk full)

    def _write(self, data: bytes | memoryview) -> None:
        if not data:
            return
        if self.limit and self.written + len(data) > self.limit:
            self.out = None  # over the limit: keep reading to the end marker, store nothing
        if len(self.head) < self.keep_head:
            self.head += data[:self.keep_head - len(self.head)]
        if self.out is not None:
            try:
                self.out.write(data)
            except OSError as exc:  # keep reading to the end marker; the edge answers 451
                self.error, self.out = exc, None
        self.written += len(data)

    @property
    def too_big(self) -> bool:
        return bool(self.limit) and self.written > self.limit

    def feed(self, chunk: bytes) -> tuple[Outcome, int] | None:
        data = self._carry + chunk if self._carry else chunk
        base = len(self._carry)  # bytes of `data` that came from earlier chunks
        self.received += len(chunk)
        start = 0
        if self._mid_line:
            nl = data.find(b"\n")
            if nl < 0:
                self._carry = data
                self._flush_partial()
                return None
            head = data[:nl + 1]
            self._write(_MULTI_CR.sub(b"\r\n", head))
            self._prev_crlf = head.endswith(b"\r\n")
            self._mid_line = False
            start = nl + 1
        last_nl = data.rfind(b"\n", start)
        if last_nl < 0:
            self._carry = data[start:]
            if len(self._carry) > MAX_CARRY_BYTES and self._flush_partial():
                return Outcome.BARE_LF, len(chunk)
            return None
        end = last_nl + 1
        if data[start:start + 1] != b"." and _DOT_START.search(data, start, end) is None \
                and _DOUBLE_CR.search(data, start, end) is None:
            # No line starts with a dot (so no end marker either) and no CR is doubled: the
            # lines go to the file as they are, without the three copies of the chunk the
            # general path below makes (a 100 KB mail fed a 64 KB piece at a time: ~0.3 ms
            # of CPU instead of ~0.45 ms, in a loop on this machine).
            self._write(memoryview(data)[start:end])
            self._prev_crlf = end - start >= 2 and data[end - 2:end] == b"\r\n"
            self._carry = data[end:]
            if len(self._carry) > MAX_CARRY_BYTES and self._flush_partial():
                return Outcome.BARE_LF, len(chunk)
            return None
        lead = b"\r\n" if self._prev_crlf else b"\n"
        view = lead + data[start:last_nl + 1]
        dot = _DOT_START.search(view)  # no line starts with a dot: no end marker either
        match = _DOT_LINE.search(view, dot.start()) if dot is not None else None
        if match is not None:
            proper = match.group() == b"\n.\r\n" and match.start() > 0 \
                and view[match.start() - 1:match.start()] == b"\r"
            if not proper:
                return Outcome.BARE_LF, self._consumed(start, len(lead), match.end(), base)
            self._write(self._clean(view[:match.start() + 1], len(lead), stuffed=True))
            self._carry = b""
            outcome = Outcome.TOO_BIG if self.too_big else Outcome.DONE
            return outcome, self._consumed(start, len(lead), match.end(), base)
        self._write(self._clean(view, len(lead), stuffed=dot is not None))
        self._prev_crlf = view.endswith(b"\r\n")
        self._carry = data[last_nl + 1:]
        if len(self._carry) > MAX_CARRY_BYTES and self._flush_partial():
            return Outcome.BARE_LF, len(chunk)
        return None

    @staticmethod
    def _consumed(start: int, lead: int, end_in_view: int, base: int) -> int:
        """Bytes of the new chunk used up to the end of the marker line."""
        return max(0, start + end_in_view - lead - base)

    @staticmethod
    def _clean(view: bytes, lead: int, stuffed: bool) -> bytes:
        """Unstuff (a leading dot of every line goes; `stuffed`: some line starts with one)
        and fold doubled CRs; drop the lead."""
        out = view.replace(b"\n.", b"\n") if stuffed else view
        if _DOUBLE_CR.search(out):
            out = _MULTI_CR.sub(b"\r\n", out)
        return out[lead:]

    def _flush_partial(self) -> bool:
        """Write most of the unfinished long line in the carry, keeping its trailing CRs (they
        may turn out to be a doubled CR before the LF). True: the line is a lone dot followed
        by a run of CRs, a broken end marker."""
        data = self._carry
        keep = len(data) - len(data.rstrip(b"\r"))
        body = data[:len(data) - keep] if keep else data
        if not self._mid_line and body.startswith(b"."):
            if body == b".":
                return True
            body = body[1:]  # RFC 5321 4.5.2: the client doubled a leading dot
        self._write(body)
        self._carry = data[len(data) - keep:] if keep else b""
        self._mid_line = True
        self._prev_crlf = False
        return False


async def receive(reader: asyncio.StreamReader, writer: DataWriter) -> Result:
    """Read one message from `reader` into `writer`, never past the end marker (a pipelining
    client's next command stays in the reader for aiosmtpd).

    Only public StreamReader calls: `readuntil(b"\\n.")` returns at every line that starts with
    a dot (rare: stuffed lines and the end marker), then the rest of that line is read with
    `readuntil(b"\\n")`, so a lone-dot line is seen whole, whichever way it ends, without reading
    beyond it; between such lines `LimitOverrunError` hands over what is buffered, up to the
    reader's limit at a time.
    """
    separator: bytes | None = None  # None: at the start of a line
    done = None
    while done is None:
        if separator is None:
            try:
                piece = await reader.readexactly(1)
            except asyncio.IncompleteReadError:
                return Result(Outcome.EOF, writer.received)
            separator = b"\n" if piece == b"." else b"\n."
            if piece == b"\n":
                separator = None  # an empty line (bare LF): the next byte starts a line
            done = writer.feed(piece)
            continue
        try:
            piece = await reader.readuntil(separator)
            line_done = True
        except asyncio.LimitOverrunError as exc:
            piece = await reader.read(exc.consumed)
            line_done = False
        except asyncio.IncompleteReadError:
            return Result(Outcome.EOF, writer.received)
        if not piece:
            return Result(Outcome.EOF, writer.received)
        done = writer.feed(piece)
        if line_done:
            # After "\n." the rest of that dot line; after a line's "\n", a new line starts.
            separator = b"\n" if separator == b"\n." else None
    return Result(done[0], writer.received)


class Incoming:
    """DATA_DIR/incoming: one file per message being received or handed to intake."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def start(self) -> None:
        """Remove what a killed daemon left (the senders got no 250 for them and will retry)."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o750)
        stale = 0
        for path in self.root.glob("*.part"):
            path.unlink(missing_ok=True)
            stale += 1
        if stale:
            log.info("removed %d unfinished incoming message(s) left by an earlier run", stale)

    def create(self) -> tuple[Path, BinaryIO]:
        path = self.root / f"{secrets.token_hex(8)}.eml.part"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        return path, os.fdopen(fd, "wb", buffering=READ_BYTES)

    def count(self) -> int:
        return sum(1 for _ in self.root.glob("*.part"))
