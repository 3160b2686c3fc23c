"""A bare aiosmtpd server whose DATA handler only answers 250: the framework's ceiling, and
the bench's report relay.

    python -m bench.sink [--port 0] [--announce]

Runs aiosmtpd's SMTP protocol on this process's own loop through ``loop.create_server`` (no
threaded Controller), with the limits the gateway uses. Prints ``READY <port>`` once bound;
with ``--announce`` also ``MSG <n>`` after each accepted message (the bench counts reports).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from typing import Any

from aiosmtpd.smtp import SMTP


class Answer250:
    def __init__(self, announce: bool) -> None:
        self.count = 0
        self.announce = announce

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.count += 1
        if self.announce:
            sys.stdout.write(f"MSG {self.count}\n")
            sys.stdout.flush()
        return "250 2.0.0 OK"


async def serve(host: str, port: int, data_size_limit: int, announce: bool) -> None:
    handler = Answer250(announce)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = await loop.create_server(
        lambda: SMTP(handler, data_size_limit=data_size_limit, enable_SMTPUTF8=True,
                     hostname="sink.bench", ident="bench sink", timeout=300),
        host, port)
    print(f"READY {server.sockets[0].getsockname()[1]}", flush=True)
    try:
        await stop.wait()
    finally:
        server.close()
        await server.wait_closed()
        print(f"DONE {handler.count}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.sink")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--data-size-limit", type=int, default=32 * 1024 * 1024)
    parser.add_argument("--announce", action="store_true")
    args = parser.parse_args()
    # As in the gateway: aiosmtpd's per-command log stays at warning level.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    asyncio.run(serve(args.host, args.port, args.data_size_limit, args.announce))


if __name__ == "__main__":
    main()
