"""A small authoritative DNS server on loopback for the sender-verification tests.

Real DNS over UDP (and TCP, for answers too big for a datagram) on 127.0.0.1, port 0: the
gateway reaches it through DNS_NAMESERVERS=127.0.0.1:PORT exactly as it would reach a real
resolver. Messages are built and parsed with dnspython. `silent` makes it read queries and
never answer (a resolver that is down behind a firewall); `delay_s` makes each UDP answer come
that long after its query (a slow resolver).
"""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset


def txt_strings(text: str) -> list[str]:
    """A TXT value as DNS carries it: strings of at most 255 characters, each quoted."""
    chunks = [text[i:i + 255] for i in range(0, len(text), 255)] or [""]
    return ['"' + c.replace("\\", "\\\\").replace('"', '\\"') + '"' for c in chunks]


class DnsServer:
    def __init__(self) -> None:
        self.records: dict[tuple[str, str], list[str]] = {}
        self.queries: list[tuple[str, str]] = []
        self.silent = False
        self.delay_s = 0.0  # a slow resolver: each answer this long after its query
        self._udp: socketserver.ThreadingUDPServer | None = None
        self._tcp: socketserver.ThreadingTCPServer | None = None
        self._threads: list[threading.Thread] = []
        self.port = 0

    def add_txt(self, name: str, text: str) -> None:
        self.records.setdefault((name.lower().rstrip("."), "TXT"), []).append(
            " ".join(txt_strings(text)))

    def add(self, name: str, rdtype: str, value: str) -> None:
        self.records.setdefault((name.lower().rstrip("."), rdtype), []).append(value)

    def answer(self, wire: bytes, udp: bool) -> bytes:
        """The response to one query; over UDP cut to the client's size (TC set if needed)."""
        query = dns.message.from_wire(wire)
        max_size = (query.payload if query.edns >= 0 else 512) if udp else 65535
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        for question in query.question:
            name = question.name.to_text(omit_final_dot=True).lower()
            rdtype = dns.rdatatype.to_text(question.rdtype)
            self.queries.append((name, rdtype))
            values = self.records.get((name, rdtype))
            if values:
                response.answer.append(dns.rrset.from_text_list(
                    question.name, 300, dns.rdataclass.IN, question.rdtype, values))
            elif not any(k[0] == name for k in self.records):
                response.set_rcode(dns.rcode.NXDOMAIN)
        try:
            return response.to_wire(max_size=max_size)
        except dns.exception.TooBig:
            truncated = dns.message.make_response(query)
            truncated.flags |= dns.flags.TC
            return truncated.to_wire()

    def start(self) -> None:
        server = self

        class Udp(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                data, sock = self.request
                if server.silent:
                    return
                if server.delay_s:
                    time.sleep(server.delay_s)  # a slow upstream, not synchronisation
                sock.sendto(server.answer(data, udp=True), self.client_address)

        class Tcp(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                sock: socket.socket = self.request
                head = sock.recv(2)
                if len(head) < 2 or server.silent:
                    return
                size = int.from_bytes(head, "big")
                data = b""
                while len(data) < size:
                    chunk = sock.recv(size - len(data))
                    if not chunk:
                        return
                    data += chunk
                out = server.answer(data, udp=False)
                sock.sendall(len(out).to_bytes(2, "big") + out)

        for _ in range(50):  # a free UDP port whose TCP twin is free as well
            self._udp = socketserver.ThreadingUDPServer(("127.0.0.1", 0), Udp)
            self.port = self._udp.server_address[1]
            try:
                self._tcp = socketserver.ThreadingTCPServer(("127.0.0.1", self.port), Tcp)
                break
            except OSError:
                self._udp.server_close()
        else:
            raise OSError("no port free for both UDP and TCP")
        for srv in (self._udp, self._tcp):
            srv.daemon_threads = True
            t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05},
                                 daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        for srv in (self._udp, self._tcp):
            if srv is not None:
                srv.shutdown()
                srv.server_close()
        for t in self._threads:
            t.join(timeout=5)
        self._udp = self._tcp = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> DnsServer:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

