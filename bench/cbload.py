"""Signed status-callback load: POST pre-signed callbacks at the gateway from N clients.

    python -m bench.cbload --requests FILE.json --concurrency 16 --out OUT.json

FILE.json is a list of {"url", "body", "signature"} (the body form-encoded, the signature
SignalWire's HMAC-SHA1 over URL + sorted fields, made by the bench with the signing key it
configured). Connections are kept alive, as a webhook sender's pool would.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import time
from pathlib import Path
from typing import Any

import aiohttp
from yarl import URL


async def run(requests: list[dict[str, str]], concurrency: int,
              max_s: float) -> dict[str, Any]:
    statuses: dict[str, int] = {}
    latencies: list[float] = []
    counter = iter(range(len(requests)))
    deadline = time.monotonic() + max_s
    timeout = aiohttp.ClientTimeout(total=30)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:

        async def worker() -> None:
            for i in counter:
                if time.monotonic() > deadline:
                    return
                req = requests[i]
                headers = {"Content-Type": "application/x-www-form-urlencoded",
                           "X-SignalWire-Signature": req["signature"]}
                began = time.monotonic()
                try:
                    async with http.post(URL(req["url"], encoded=True), data=req["body"],
                                         headers=headers) as resp:
                        await resp.read()
                        key = str(resp.status)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    key = type(exc).__name__
                latencies.append(time.monotonic() - began)
                statuses[key] = statuses.get(key, 0) + 1

        t0 = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        t1 = time.monotonic()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"t_start": t0, "t_end": t1, "sent": len(latencies), "statuses": statuses,
            "latencies_s": latencies, "client_cpu_s": usage.ru_utime + usage.ru_stime}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.cbload")
    parser.add_argument("--requests", required=True)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-seconds", type=float, default=30.0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    requests = json.loads(Path(args.requests).read_text())
    result = asyncio.run(run(requests, args.concurrency, args.max_seconds))
    Path(args.out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
