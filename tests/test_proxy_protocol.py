"""SMTP_PROXY_PROTOCOL: behind a TCP load balancer, the PROXY header names the real client, and
trusted networks (and rate limits and logs) see that address, not the balancer's."""

from __future__ import annotations

import asyncio

from .conftest import GatewayFactory, base_env


async def smtp_dialogue(port: int, proxy_line: str | None, lines: list[str]) -> list[str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        if proxy_line is not None:
            writer.write(proxy_line.encode() + b"\r\n")
        replies = [(await reader.readline()).decode()]
        for line in lines:
            writer.write(line.encode() + b"\r\n")
            await writer.drain()
            reply = await reader.readline()
            while reply[3:4] == b"-":
                reply = await reader.readline()
            replies.append(reply.decode().strip())
        return replies
    finally:
        writer.close()


async def test_the_proxy_header_names_the_client(make_gateway: GatewayFactory, tmp_path) -> None:
    gw = await make_gateway(base_env(tmp_path / "var", SMTP_PROXY_PROTOCOL="yes",
                                     TRUSTED_NETWORKS="203.0.113.0/24"))
    steps = ["EHLO lb.test", "MAIL FROM:<scanner@example.com>", "RCPT TO:<15551234567@fax.local>"]
    trusted = await smtp_dialogue(gw.smtp.port, "PROXY TCP4 203.0.113.5 10.0.0.1 40000 25",
                                  steps)
    assert trusted[0].startswith("220") and trusted[2].startswith("250")
    # The balancer itself (127.0.0.1) is not trusted here: the header decides.
    stranger = await smtp_dialogue(gw.smtp.port, "PROXY TCP4 198.51.100.7 10.0.0.1 40000 25",
                                   steps)
    assert stranger[2].startswith("550 5.7.1")
    # No header at all: the connection is closed without a greeting.
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.smtp.port)
    writer.write(b"EHLO direct.test\r\n")
    assert await asyncio.wait_for(reader.read(), 40) == b""
    writer.close()
