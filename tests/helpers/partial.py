"""Split mail (message/partial, RFC 2046 5.2.2) as a copier's "divided sending" makes it."""

from __future__ import annotations

NUMBER = "15551234567"


def split(raw: bytes, parts: int, ident: str = "scan-0001@copier.example", *,
          sender: str = "alice@example.com", total_on_every_part: bool = True) -> list[bytes]:
    """Split a mail as a Canon or Ricoh copier does: each piece a mail of its own whose body
    is the next slice of the original (headers included in the first)."""
    size = -(-len(raw) // parts)
    slices = [raw[i * size:(i + 1) * size] for i in range(parts)]
    out = []
    for number, piece in enumerate(slices, start=1):
        total = f"; total={parts}" if total_on_every_part or number == parts else ""
        head = (f"From: Copier <{sender}>\r\nTo: {NUMBER}@fax.local\r\n"
                f"Subject: Scan ({number}/{parts})\r\nMessage-ID: <part{number}.{ident}>\r\n"
                f"MIME-Version: 1.0\r\nContent-Type: message/partial; id=\"{ident}\"; "
                f"number={number}{total}\r\n\r\n")
        out.append(head.encode() + piece)
    return out


