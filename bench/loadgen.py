"""The bench's SMTP load generator: an asyncio client on raw streams, one message per session.

    python -m bench.loadgen --port P --mail FILE --out OUT.json burst --count N --concurrency C
    python -m bench.loadgen --port P --mail FILE --out OUT.json rate --rate R --duration S

Each message goes to its own fax number (``--to-prefix`` + 4 digits), so the bench can match
the SMTP reply to the send POST the SignalWire simulator sees. Times are ``time.monotonic()``
(CLOCK_MONOTONIC, one clock for every process on the machine): ``t_dot`` when the final
"." has been handed to the kernel, ``t_reply`` when the reply to it has arrived.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import resource
import time
from pathlib import Path
from typing import Any

from .documents import TO_PLACEHOLDER

SESSION_TIMEOUT_S = 180.0


def split_mail(raw: bytes) -> tuple[bytes, bytes]:
    """(headers with the placeholder To, dot-stuffed body ending in CRLF)."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    body = re.sub(rb"(?m)^\.", b"..", body)  # RFC 5321 4.5.2 transparency
    return head + sep, body


class Client:
    def __init__(self, host: str, port: int, raw: bytes, to_prefix: str, domain: str) -> None:
        self.host = host
        self.port = port
        self.head, self.body = split_mail(raw)
        self.to_prefix = to_prefix
        self.domain = domain

    def number(self, i: int) -> str:
        return f"{self.to_prefix}{i + 10:04d}"

    async def session(self, i: int) -> dict[str, Any]:
        to = self.number(i)
        rec: dict[str, Any] = {"i": i, "to": to, "t_connect": time.monotonic()}
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(SESSION_TIMEOUT_S):
                reader, writer = await asyncio.open_connection(self.host, self.port)
                # drain() then returns only once every byte is in the kernel's socket buffer.
                writer.transport.set_write_buffer_limits(high=0)
                await expect(reader, 220, "greeting")
                for line, code in ((b"EHLO loadgen.bench", 250),
                                   (b"MAIL FROM:<scanner@example.com>", 250),
                                   (f"RCPT TO:<{to}@{self.domain}>".encode(), 250),
                                   (b"DATA", 354)):
                    writer.write(line + b"\r\n")
                    await expect(reader, code, line.decode())
                writer.write(self.head.replace(TO_PLACEHOLDER.encode(), to.encode()))
                writer.write(self.body)
                writer.write(b".\r\n")
                await writer.drain()
                rec["t_dot"] = time.monotonic()
                code, text = await read_reply(reader)
                rec["t_reply"] = time.monotonic()
                rec["code"], rec["text"] = code, text
                writer.write(b"QUIT\r\n")
                await writer.drain()
                await read_reply(reader)
        except Exception as exc:  # noqa: BLE001 - a session boundary: record and go on
            rec["error"] = f"{type(exc).__name__}: {exc}"[:300]
        finally:
            if writer is not None:
                writer.close()
                with contextlib.suppress(OSError, TimeoutError):
                    async with asyncio.timeout(5):
                        await writer.wait_closed()
        return rec


class ReplyError(Exception):
    pass


async def read_reply(reader: asyncio.StreamReader) -> tuple[int, str]:
    lines: list[str] = []
    while True:
        raw = await reader.readline()
        if not raw:
            raise ReplyError("connection closed")
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        lines.append(line[4:])
        if len(line) < 4 or line[3] != "-":
            return int(line[:3]), "\n".join(lines)


async def expect(reader: asyncio.StreamReader, code: int, what: str) -> None:
    got, text = await read_reply(reader)
    if got != code:
        raise ReplyError(f"{what}: {got} {text[:200]}")


async def burst(client: Client, count: int, concurrency: int) -> list[dict[str, Any]]:
    """`concurrency` sessions at all times until `count` messages are done."""
    counter = iter(range(count))
    out: list[dict[str, Any]] = []

    async def worker() -> None:
        for i in counter:
            out.append(await client.session(i))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return out


async def rate(client: Client, per_s: float, duration_s: float,
               max_sessions: int) -> list[dict[str, Any]]:
    """Open-loop: message i starts at t0 + i/rate whatever happened to the earlier ones."""
    count = int(per_s * duration_s)
    limit = asyncio.Semaphore(max_sessions)
    t0 = time.monotonic() + 0.05

    async def one(i: int, due: float) -> dict[str, Any]:
        async with limit:
            rec = await client.session(i)
        rec["t_due"] = due
        return rec

    tasks = []
    for i in range(count):
        due = t0 + i / per_s
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        tasks.append(asyncio.create_task(one(i, due)))
    return list(await asyncio.gather(*tasks))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--mail", required=True, help="message file, CRLF line ends")
    parser.add_argument("--out", required=True)
    parser.add_argument("--to-prefix", default="+1555200")
    parser.add_argument("--domain", default="fax.local")
    sub = parser.add_subparsers(dest="mode", required=True)
    b = sub.add_parser("burst")
    b.add_argument("--count", type=int, required=True)
    b.add_argument("--concurrency", type=int, default=20)
    r = sub.add_parser("rate")
    r.add_argument("--rate", type=float, required=True)
    r.add_argument("--duration", type=float, required=True)
    r.add_argument("--max-sessions", type=int, default=200)
    args = parser.parse_args()

    client = Client(args.host, args.port, Path(args.mail).read_bytes(), args.to_prefix,
                    args.domain)
    t_start = time.monotonic()
    if args.mode == "burst":
        records = asyncio.run(burst(client, args.count, args.concurrency))
    else:
        records = asyncio.run(rate(client, args.rate, args.duration, args.max_sessions))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    Path(args.out).write_text(json.dumps({
        "mode": args.mode, "t_start": t_start, "t_end": time.monotonic(),
        "client_cpu_s": usage.ru_utime + usage.ru_stime,
        "messages": sorted(records, key=lambda r: r["i"]),
    }))


if __name__ == "__main__":
    main()
