"""Split mail (message/partial, RFC 2046 5.2.2): copiers' "divided sending" reassembled and faxed.

Pure tests of the join and the on-disk store an earlier version kept parts in, then the live
gateway: parts in any order, a duplicate, two senders with the same id, the size and part
limits, parts that contradict their set, one sender's flood, and expiry through the worker's
housekeeping with a refusal mail to the sender (one per sender). Where the store matters, on
SQLite (parts in DATA_DIR/media) and on PostgreSQL (parts in S3). Parts of one mail at two
gateway nodes: tests/test_several_gateways.py.
"""

from __future__ import annotations

import io
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from email import policy
from email.parser import BytesParser
from pathlib import Path

import pytest
from pypdf import PdfReader

from gateway.daemon import Gateway
from gateway.documents.partial import (
    MAX_PARTS,
    PartialError,
    PartialInfo,
    PartialStore,
    join,
    partial_info,
    set_key,
)
from testsupport.s3server import SeaweedS3

from .conftest import (
    FakeClock,
    GatewayFactory,
    RelaySink,
    Simulator,
    base_env,
    job_ids,
    make_pdf,
    pdf_mail,
    pg_reset,
    production_env,
    relay_env,
    smtp_send,
)
from .helpers.partial import NUMBER, split

RCPT = [f"{NUMBER}@fax.local"]


async def held(gw: Gateway) -> tuple[int, int]:
    """(sets, parts) the gateway's store holds."""
    sets = await gw.store.run(gw.store._scalar, "SELECT COUNT(*) AS n FROM partial_sets")
    parts = await gw.store.run(gw.store._scalar, "SELECT COUNT(*) AS n FROM partials")
    return int(sets), int(parts)


def media_parts(data_dir: Path) -> list[str]:
    """The parts' objects in a local media store."""
    return sorted(p.name for p in (data_dir / "media").glob("partial-*"))


def s3_parts(seaweed: SeaweedS3, prefix: str) -> list[str]:
    """The parts' objects under a gateway's S3_PREFIX."""
    listing = seaweed.client().list_objects_v2(Bucket="faxgw-test", Prefix=prefix)
    return sorted(o["Key"] for o in listing.get("Contents", [])
                  if o["Key"].rsplit("/", 1)[-1].startswith("partial-"))


@dataclass
class Node:
    env: dict[str, str]  # where the node keeps things (merged into a test's settings)
    parts: Callable[[], list[str]]  # the parts' objects in its media store


@pytest.fixture(params=["sqlite", "postgres"])
def node(request: pytest.FixtureRequest, tmp_path: Path,
         monkeypatch: pytest.MonkeyPatch) -> Node:
    """One gateway node: SQLite and the local media store, or PostgreSQL and S3 (SeaweedFS),
    as several nodes have them."""
    if request.param == "sqlite":
        return Node({"DATA_DIR": str(tmp_path / "var")}, lambda: media_parts(tmp_path / "var"))
    pg_url = request.getfixturevalue("pg_url")
    seaweed = request.getfixturevalue("seaweed")
    pg_reset(pg_url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweed.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweed.secret_key)
    prefix = f"p-{tmp_path.name}"
    return Node({"DATA_DIR": str(tmp_path / "var"), "DATABASE_URL": pg_url,
                 "NODE_ID": "node-a", "MEDIA_STORE": "s3", "S3_BUCKET": "faxgw-test",
                 "S3_PREFIX": prefix, "S3_ENDPOINT_URL": seaweed.endpoint_url,
                 "S3_REGION": seaweed.region}, lambda: s3_parts(seaweed, prefix))


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
    assert await held(gw) == (0, 0) and media_parts(tmp_path / "var") == []
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
    assert await held(gw) == (1, 1)  # bob's
    assert len(media_parts(tmp_path / "var")) == 1


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
    assert await held(gw) == (1, 2)
    clock.advance(2 * 60)
    await gw.worker.housekeeping()
    refusal = await relay.next()
    assert refusal["To"] == "alice@example.com"
    text = " ".join(str(refusal.get_body(("plain",)).get_content()).split())
    assert "only 2 of 3 part(s) arrived within 30 minutes (missing: 2)" in text, text
    assert re.search(r"not sent", str(refusal["Subject"]))
    assert await held(gw) == (0, 0) and media_parts(tmp_path / "var") == []
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


# --------------------------------------------------------------------------- parts that do not fit


async def test_a_part_to_other_numbers_is_refused(node: Node,
                                                  make_gateway: GatewayFactory,
                                                  tmp_path: Path) -> None:
    """The numbers come from the set's first part: a later part (from anyone who may send
    here, with the same id) cannot redirect the scan; it was taken from the last part."""
    gw = await make_gateway(base_env(tmp_path / "var", **node.env))
    parts = split(original(pages=2), 2)
    assert (await smtp_send(gw.smtp.port, parts[0], RCPT)).code == 250
    other = ["15559999999@fax.local"]
    for rcpts in (other, [*RCPT, *other]):
        reply = await smtp_send(gw.smtp.port, parts[1], rcpts)
        assert (reply.code, reply.text) == (
            554, "5.6.0 This part is addressed to other fax numbers than the earlier parts of "
                 "the same split message; every part must be sent to the same numbers")
    assert await gw.store.run(gw.store.jobs) == [] and await held(gw) == (1, 1)
    assert len(node.parts()) == 1  # the refused parts' objects are gone again
    reply = await smtp_send(gw.smtp.port, parts[1], RCPT)
    assert reply.code == 250 and "Queued as fax job" in reply.text, reply.text
    [job] = await gw.store.run(gw.store.jobs)
    assert job.to_number == "+" + NUMBER
    assert await held(gw) == (0, 0) and node.parts() == []


async def test_a_part_whose_total_contradicts_is_refused(node: Node,
                                                         make_gateway: GatewayFactory,
                                                         tmp_path: Path) -> None:
    gw = await make_gateway(base_env(tmp_path / "var", **node.env))
    parts = split(original(pages=3), 3)
    assert (await smtp_send(gw.smtp.port, parts[0], RCPT)).code == 250
    two = parts[1].replace(b"number=2; total=3", b"number=2; total=2")
    reply = await smtp_send(gw.smtp.port, two, RCPT)
    assert (reply.code, reply.text) == (
        554, "5.6.0 This part says the message has 2 parts, but an earlier part said 3; the "
             "parts cannot be put together")
    # A total given only now, below a part already held.
    bare = split(original(pages=3), 3, ident="scan-0002@copier.example",
                 total_on_every_part=False)
    assert (await smtp_send(gw.smtp.port, bare[2].replace(b"; total=3", b""), RCPT)).code == 250
    reply = await smtp_send(gw.smtp.port, bare[1].replace(b"number=2", b"number=2; total=2"),
                            RCPT)
    assert (reply.code, reply.text) == (
        554, "5.6.0 This part says the message has 2 parts, but part 3 was sent; the parts "
             "cannot be put together")
    assert await gw.store.run(gw.store.jobs) == []
    for part in parts[1:]:
        reply = await smtp_send(gw.smtp.port, part, RCPT)
    assert "Queued as fax job" in reply.text and "(3 pages)" in reply.text, reply.text


async def test_one_senders_flood_does_not_block_another(
        node: Node, simulator: Simulator, relay: RelaySink, tmp_path: Path,
        manual_gateway: GatewayFactory) -> None:
    """Mallory's many "part 1 of 2" mails: once she has PARTIAL_MAX_SETS_PER_SENDER sets
    waiting, her next new set gets a 451 (Alice's parts were all 451 for an hour once), and
    their expiry mails her once, not once per set (she got 1000 mails)."""
    clock = FakeClock()
    gw = await manual_gateway(production_env(tmp_path / "var", simulator, **relay_env(relay),
                                             **node.env, PARTIAL_MAX_SETS_PER_SENDER="3"),
                              clock)
    mallory = "mallory@example.com"
    flood = [split(original(pages=1), 2, ident=f"flood-{i}", sender=mallory)[0]
             for i in range(5)]
    replies = [await smtp_send(gw.smtp.port, part, RCPT, mail_from=mallory) for part in flood]
    assert [r.code for r in replies] == [250, 250, 250, 451, 451]
    assert replies[3].text == ("4.7.0 Too many split messages from this sender are waiting for "
                               "their other parts (3); send their missing parts first, or try "
                               "again later")
    # Her waiting sets still take their other parts (a second copy of a part, here).
    assert (await smtp_send(gw.smtp.port, flood[0], RCPT, mail_from=mallory)).code == 250
    alice = split(original(pages=2), 2)
    assert (await smtp_send(gw.smtp.port, alice[0], RCPT)).code == 250
    reply = await smtp_send(gw.smtp.port, alice[1], RCPT)
    assert reply.code == 250 and "Queued as fax job" in reply.text, reply.text
    assert await held(gw) == (3, 3)
    clock.advance(61 * 60)
    await gw.worker.housekeeping()
    assert relay.messages.qsize() == 1  # housekeeping waited for each relay's 250
    notice = await relay.next()
    assert notice["To"] == mallory
    text = " ".join(str(notice.get_body(("plain",)).get_content()).split())
    assert "only 1 of 2 part(s) arrived within 60 minutes (missing: 2)" in text, text
    assert "2 other scan(s) you sent in parts did not arrive complete either" in text, text
    assert await held(gw) == (0, 0) and node.parts() == []


async def test_parts_an_earlier_version_kept_on_disk_still_expire(
        simulator: Simulator, relay: RelaySink, tmp_path: Path,
        manual_gateway: GatewayFactory) -> None:
    """Parts kept in DATA_DIR/spool/partial by the version before the shared store are never
    completed now (new parts go to the store): they expire as before, sender told."""
    clock = FakeClock()
    legacy = PartialStore(tmp_path / "var" / "spool" / "partial")
    parts = split(original(), 2)
    target = {"to": "alice@example.com", "subject": "Scan", "msgid": None}
    legacy.add(set_key("|alice@example.com", "scan-0001@copier.example"),
               partial_info(parts[0]), parts[0],  # type: ignore[arg-type]
               {"numbers": ["+" + NUMBER], "envelope_from": "alice@example.com",
                "report": target}, now=clock(), max_bytes=10**6)
    gw = await manual_gateway(production_env(tmp_path / "var", simulator, **relay_env(relay)),
                              clock)
    clock.advance(61 * 60)
    await gw.worker.housekeeping()
    refusal = await relay.next()
    text = " ".join(str(refusal.get_body(("plain",)).get_content()).split())
    assert "only 1 of 2 part(s) arrived within 60 minutes (missing: 2)" in text, text
    assert list(legacy.root.iterdir()) == []
