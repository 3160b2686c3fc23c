"""Split mail (message/partial, RFC 2046 5.2.2): copiers' "divided sending" reassembled and faxed.

Pure tests of the join and the on-disk store, then the live gateway: parts in any order, a
duplicate, two senders with the same id, the size and part limits, and expiry through the
worker's housekeeping with a refusal mail to the sender.
"""

from __future__ import annotations

import io
import os
import re
import time
from email import policy
from email.parser import BytesParser
from pathlib import Path

import pytest
from pypdf import PdfReader

from gateway.documents.partial import (MAX_PARTS, PartialError, PartialInfo, PartialStore, join,
                                       partial_info, set_key)

from .conftest import (FakeClock, GatewayFactory, RelaySink, Simulator, base_env, job_ids,
                       make_pdf, pdf_mail, production_env, relay_env, smtp_send)

NUMBER = "15551234567"
RCPT = [f"{NUMBER}@fax.local"]


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


def original(pages: int = 3, subject: str = "Scanned contract", padding: int = 0) -> bytes:
    msg = pdf_mail(RCPT[0], pdf=make_pdf(pages), subject=subject, filename="contract.pdf",
                   message_id="<whole@copier.example>")
    if padding:  # bulk, as a real scan has
        msg.add_attachment(os.urandom(padding), maintype="application",
                           subtype="octet-stream", filename="bulk.bin")
    return msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))


# --------------------------------------------------------------------------- pure


def test_join_gives_back_the_original_message() -> None:
    raw = original()
    parts = split(raw, 3)
    whole = BytesParser(policy=policy.default).parsebytes(join(parts))
    first = BytesParser(policy=policy.default).parsebytes(raw)
    # RFC 2046 5.2.2.2: Subject, Message-ID and Content-* from the enclosed message.
    assert whole["Subject"] == "Scanned contract"
    assert whole["Message-ID"] == "<whole@copier.example>"
    assert whole.get_content_type() == "multipart/mixed"
    assert whole["From"] == "Copier <alice@example.com>"  # from the first enclosing mail
    [attachment] = list(whole.iter_attachments())
    assert attachment.get_content() == list(first.iter_attachments())[0].get_content()


def test_partial_parameters() -> None:
    parts = split(original(), 2, total_on_every_part=False)
    assert partial_info(parts[0]) == PartialInfo("scan-0001@copier.example", 1, None)
    assert partial_info(parts[1]) == PartialInfo("scan-0001@copier.example", 2, 2)
    assert partial_info(original()) is None
    bad = parts[0].replace(b"number=1", b"number=0")
    with pytest.raises(PartialError, match="no valid number"):
        partial_info(bad)
    many = parts[1].replace(b"number=2; total=2", f"number=2; total={MAX_PARTS + 1}".encode())
    with pytest.raises(PartialError, match=f"more than {MAX_PARTS} parts"):
        partial_info(many)
    with pytest.raises(PartialError, match="no usable id"):
        partial_info(parts[0].replace(b'id="scan-0001@copier.example"; ', b""))


def test_store_keeps_parts_apart_and_bounds_the_size(tmp_path: Path) -> None:
    store = PartialStore(tmp_path / "partial")
    parts = split(original(), 3)
    a, b = set_key("|alice@example.com", "x"), set_key("|bob@example.com", "x")
    assert a != b
    info = [partial_info(p) for p in parts]
    found = store.add(a, info[2], parts[2], {}, now=1.0, max_bytes=10**6)
    assert (found.numbers, found.total, found.complete) == ((3,), 3, False)
    store.add(b, info[0], parts[0], {}, now=2.0, max_bytes=10**6)
    store.add(a, info[0], parts[0], {}, now=3.0, max_bytes=10**6)
    again = store.add(a, info[0], parts[0], {}, now=4.0, max_bytes=10**6)  # a duplicate
    assert again.numbers == (1, 3) and again.meta["first_seen"] == 1.0
    assert store.add(a, info[1], parts[1], {}, now=5.0, max_bytes=10**6).complete
    assert store.get(b).numbers == (1,)  # type: ignore[union-attr]
    with pytest.raises(PartialError, match="larger than"):
        store.add(b, info[1], parts[1], {}, now=6.0, max_bytes=len(parts[0]) + 10)
    # Each set's clock starts at its first part: a at 1.0, b at 2.0.
    assert {s.key for s in store.expired(now=1.0 + 60.5, timeout_s=60)} == {a}
    assert {s.key for s in store.expired(now=2.0 + 60.5, timeout_s=60)} == {a, b}


# --------------------------------------------------------------------------- live gateway


async def test_parts_in_any_order_with_a_duplicate_are_faxed_whole(
        make_gateway, simulator: Simulator, relay: RelaySink, tmp_path: Path) -> None:
    gw = await make_gateway(production_env(tmp_path / "var", simulator, **relay_env(relay)))
    parts = split(original(pages=3), 3)
    replies = []
    for index in (2, 0, 0):  # part 3 first, then part 1 twice
        replies.append(await smtp_send(gw.smtp.port, parts[index], RCPT))
    assert [(r.code, r.text) for r in replies] == [
        (250, "2.0.0 Part 3 of 3 received; the fax is sent when all parts have arrived"),
        (250, "2.0.0 Part 1 of 3 received; the fax is sent when all parts have arrived"),
        (250, "2.0.0 Part 1 of 3 received; the fax is sent when all parts have arrived")]
    assert await gw.store.run(gw.store.jobs) == []
    last = await smtp_send(gw.smtp.port, parts[1], RCPT)
    assert last.code == 250 and "Queued as fax job" in last.text and "(3 pages)" in last.text
    [job_id] = job_ids(last.text)
    job = await gw.store.run(gw.store.job, job_id)
    assert job is not None and job.to_number == "+" + NUMBER
    message = await gw.store.run(gw.store.message, job.message_id)
    assert message is not None and message.subject == "Scanned contract"
    assert len(PdfReader(io.BytesIO(Path(message.document_path).read_bytes())).pages) == 3
    report = await relay.next()
    assert "delivered, 3 pages" in str(report["Subject"])
    assert list((tmp_path / "var" / "spool" / "partial").iterdir()) == []
    # A late duplicate of a part of the faxed message starts a new set, never a second fax.
    late = await smtp_send(gw.smtp.port, parts[0], RCPT)
    assert late.code == 250 and "Part 1 of 3 received" in late.text
    assert len(await gw.store.run(gw.store.jobs)) == 1


async def test_same_id_from_another_sender_is_kept_apart(make_gateway,
                                                          tmp_path: Path) -> None:
    gw = await make_gateway()
    alice = split(original(), 2, sender="alice@example.com")
    bob = split(original(), 2, sender="bob@example.com")
    assert (await smtp_send(gw.smtp.port, alice[0], RCPT)).code == 250
    reply = await smtp_send(gw.smtp.port, bob[1], RCPT, mail_from="bob@example.com")
    assert reply.text.startswith("2.0.0 Part 2 of 2 received; the fax is sent when"), reply.text
    assert await gw.store.run(gw.store.jobs) == []
    reply = await smtp_send(gw.smtp.port, alice[1], RCPT)
    assert reply.code == 250 and "Queued as fax job" in reply.text
    assert len(list((tmp_path / "var" / "spool" / "partial").iterdir())) == 1  # bob's


async def test_parts_over_the_size_limit_or_too_many_are_refused(make_gateway,
                                                                 tmp_path: Path) -> None:
    parts = split(original(padding=120_000), 2)
    limit = len(parts[0]) + len(parts[1]) // 2  # each part fits, both together do not
    gw = await make_gateway(base_env(tmp_path / "var", SMTP_MAX_MESSAGE_BYTES=str(limit)))
    assert (await smtp_send(gw.smtp.port, parts[0], RCPT)).code == 250
    reply = await smtp_send(gw.smtp.port, parts[1], RCPT)
    assert reply.code == 554 and reply.text.startswith("5.6.0 the parts of this message "
                                                       "together are larger than"), reply.text
    many = split(original(), 2)[1].replace(b"number=2; total=2", b"number=2; total=500")
    reply = await smtp_send(gw.smtp.port, many, RCPT)
    assert reply.code == 554 and f"more than {MAX_PARTS} parts" in reply.text


async def test_incomplete_parts_expire_with_a_refusal_mail(simulator: Simulator, relay: RelaySink,
                                                           tmp_path: Path,
                                                           manual_gateway: GatewayFactory) -> None:
    clock = FakeClock()
    gw = await manual_gateway(production_env(tmp_path / "var", simulator, **relay_env(relay),
                                             PARTIAL_TIMEOUT_MINUTES="30"), clock)
    parts = split(original(), 3)
    for index in (0, 2):
        assert (await smtp_send(gw.smtp.port, parts[index], RCPT)).code == 250
    clock.advance(29 * 60)
    await gw.worker.housekeeping()
    assert relay.messages.empty()
    assert len(list((tmp_path / "var" / "spool" / "partial").iterdir())) == 1
    clock.advance(2 * 60)
    await gw.worker.housekeeping()
    refusal = await relay.next()
    assert refusal["To"] == "alice@example.com"
    text = " ".join(str(refusal.get_body(("plain",)).get_content()).split())
    assert "only 2 of 3 part(s) arrived within 30 minutes (missing: 2)" in text, text
    assert re.search(r"not sent", str(refusal["Subject"]))
    assert list((tmp_path / "var" / "spool" / "partial").iterdir()) == []
    assert await gw.store.run(gw.store.jobs) == []


async def test_parts_survive_a_restart(tmp_path: Path, manual_gateway: GatewayFactory) -> None:
    """A part answered with 250 is on disk: a restart between parts loses nothing."""
    clock = FakeClock()
    env = base_env(tmp_path / "var")
    parts = split(original(pages=2), 2)
    first = await manual_gateway(env, clock)
    try:
        assert (await smtp_send(first.smtp.port, parts[1], RCPT)).code == 250
    finally:
        await first.stop(grace_s=5)
    second = await manual_gateway(env, clock)
    reply = await smtp_send(second.smtp.port, parts[0], RCPT)
    assert reply.code == 250 and "Queued as fax job" in reply.text and "(2 pages)" in reply.text


def test_a_set_still_being_written_is_not_expired(tmp_path: Path) -> None:
    """The set's folder exists before its meta file: housekeeping running in between took
    its age as "since 1970" and threw away the part being stored. Without meta, the
    folder's own time counts (a crash's leftover still goes, after twice the timeout)."""
    store = PartialStore(tmp_path / "partial")
    writing = store.root / "a"
    writing.mkdir(parents=True)
    (writing / "1").write_bytes(b"part one")
    assert store.expired(now=time.time() + 10 * 86400, timeout_s=60) == []
    old = time.time() - 3 * 60
    os.utime(writing, (old, old))
    assert [s.key for s in store.expired(now=time.time(), timeout_s=60)] == ["a"]
