"""Received faxes on both stores: the transition table guards every change and leaves an event,
a fax is claimed per node with a lease whose epoch fences each mail and media DELETE, and a mail
whose fate is unknown is recorded as uncertain rather than sent again blindly.

"Nodes" are several store objects on one database, each with its own NODE_ID and the one
injected clock, as several gateways would be (see tests/test_store_backends.py).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from gateway.jobs.inbound_states import TRANSITIONS, IllegalTransition, InEv, InState, allowed
from gateway.store import migrations
from gateway.store.inbound import AGAIN, GO, LOST, SENT, WAIT, Completion, InboundStore
from gateway.store.sqlite import SqliteStore

from .conftest import FakeClock
from .helpers.store import NodeFactory, backend, clock, node  # noqa: F401 - fixtures

R1, R2 = "a@example.com", "b@example.com"


def completion(sid: str, recipients: tuple[str, ...] = (R1, R2), media_sid: str | None = "ME1",
               ) -> Completion:
    return Completion(fax_sid=sid, account_sid="AC", from_number="+12125550147",
                      to_number="+13103383454", fax_status="received", outcome="received",
                      num_pages=1, media_url="https://example.signalwire.com/m.pdf",
                      media_sid=media_sid, remote_station_id="X", error_code=None,
                      error_message=None, recipients=recipients, source="callback",
                      completed_at=0.0)


def received(db: InboundStore, sid: str, now: float, **kw: object) -> None:
    db.record_call(sid, "AC", "+12125550147", "+13103383454", InState.RINGING, None, now)
    assert db.record_completion(completion(sid, **kw), now)  # type: ignore[arg-type]


def kinds(db: InboundStore, sid: str) -> list[str]:
    return [e["kind"] for e in db.events(sid)]


def test_a_received_fax_mail_is_the_same_message_from_any_node() -> None:
    """Two nodes with their own SMTP_HOSTNAME (the host's name by default) mail the same fax
    to the same recipient: one Message-ID, so a copy that escapes is one message."""
    from gateway.mail.received import render_given_up, render_received

    from .helpers.inbound import fax

    ids = [render_received(fax(), [(R1, False)], None, from_addr="Fax <faxgw@example.org>",
                           hostname=host, attach=False, thumbnail=False)[0].message_id
           for host in ("node-a.internal", "node-b.internal")]
    assert ids[0] == ids[1] and ids[0].endswith("@example.org>")
    alerts = [render_given_up(fax(), R1, "down", [], from_addr="faxgw@example.org",
                              hostname=host).message_id for host in ("n1", "n2")]
    assert alerts[0] == alerts[1]


def test_the_table_uses_outbounds_word_for_giving_up() -> None:
    assert InState.GIVEN_UP.value == "given-up" and InEv.GIVEN_UP.value == "given-up"
    assert all(t.target is not InState.RINGING or t.source is None for t in TRANSITIONS)
    assert not allowed(InState.DONE, InState.DELIVERING, InEv.COMPLETED)
    assert not any(t.source in (InState.DONE, InState.GIVEN_UP, InState.REJECTED)
                   for t in TRANSITIONS)  # finished is finished


def test_a_state_change_not_in_the_table_is_refused(node: NodeFactory,
                                                    clock: FakeClock) -> None:
    db = InboundStore(node("node-a"))
    received(db, "FX1", clock())
    with pytest.raises(IllegalTransition):
        db.move("FX1", [InState.DELIVERING], InState.RINGING, InEv.RETRY, "back", clock())
    with pytest.raises(IllegalTransition):  # a real event, but not for this arrow
        db.move("FX1", [InState.DELIVERING], InState.DONE, InEv.MEDIA_DELETED, "x", clock())
    # In the table, but the fax is not in the source state: nothing changes, no event.
    assert not db.move("FX1", [InState.DELETING], InState.DONE, InEv.MEDIA_DELETED, "x",
                       clock())
    fax = db.get("FX1")
    assert fax is not None and fax.state == "delivering"
    assert kinds(db, "FX1") == ["called", "completed"]
    # The webhook cannot make a fax in a state the table does not start one in.
    with pytest.raises(IllegalTransition):
        db.record_call("FX2", "AC", None, None, InState.DONE, None, clock())
    assert db.get("FX2") is None


def test_every_step_of_a_delivery_leaves_an_event(node: NodeFactory, clock: FakeClock) -> None:
    db = InboundStore(node("node-a"))
    received(db, "FX1", clock())
    [fax] = db.claim_due(clock(), 10)
    epoch = fax.lease_epoch
    for r in (R1, R2):
        assert db.begin_send("FX1", epoch, r, clock(), 0) == (GO, None)
        db.settle_send("FX1", epoch, r, clock(), message_id=f"<{r}>", detail="relayed")
    assert db.move("FX1", [InState.DELIVERING], InState.DELETING, InEv.DELIVERED, "2", clock(),
                   fence=epoch, next_run_at=clock())
    assert db.begin_delete("FX1", epoch, clock())
    assert db.move("FX1", [InState.DELETING], InState.DONE, InEv.MEDIA_DELETED, "204",
                   clock(), media_deleted_at=clock())
    assert kinds(db, "FX1") == ["called", "completed", "mailing", "mailed", "mailing", "mailed",
                                "delivered", "deleting-media", "media-deleted"]
    assert db.delivered_to("FX1") == {R1, R2}
    # A repeated final word changes nothing and records nothing.
    assert not db.record_completion(completion("FX1"), clock())
    assert len(db.events("FX1")) == 9


def test_a_node_past_its_lease_can_neither_mail_nor_delete(node: NodeFactory,
                                                           clock: FakeClock) -> None:
    a, b = InboundStore(node("node-a")), InboundStore(node("node-b"))
    received(a, "FX1", clock())
    received(a, "FX2", clock())
    claimed = {f.fax_sid: f.lease_epoch for f in a.claim_due(clock(), 10)}
    assert set(claimed) == {"FX1", "FX2"}
    assert b.claim_due(clock(), 10) == []  # live leases: nothing for node-b
    # FX2 gets to `deleting` while node-a still holds it.
    for r in (R1, R2):
        assert a.begin_send("FX2", claimed["FX2"], r, clock(), 0)[0] == GO
        a.settle_send("FX2", claimed["FX2"], r, clock(), message_id=f"<{r}>")
    assert a.move("FX2", [InState.DELIVERING], InState.DELETING, InEv.DELIVERED, "2", clock(),
                  fence=claimed["FX2"], next_run_at=clock())
    clock.advance(31)  # node-a stalls past LEASE_SECONDS (30 here)
    taken = {f.fax_sid: f.lease_epoch for f in b.claim_due(clock(), 10)}
    assert set(taken) == {"FX1", "FX2"}
    assert all(taken[s] > claimed[s] for s in taken)
    # node-a wakes up: every fenced step finds the fax is no longer its own.
    assert a.begin_send("FX1", claimed["FX1"], R1, clock(), 0) == (LOST, None)
    assert not a.begin_delete("FX2", claimed["FX2"], clock())
    assert not a.later("FX1", claimed["FX1"], clock() + 5, "relay down", clock())
    assert a.renew(["FX1", "FX2"], clock()) == {}
    assert b.begin_send("FX1", taken["FX1"], R1, clock(), 0) == (GO, None)
    assert b.begin_delete("FX2", taken["FX2"], clock())
    assert "taken-over" in kinds(b, "FX1")
    # A lease that merely ran out, with nobody taking it, is still the node's own.
    received(a, "FX3", clock())
    [fax3] = a.claim_due(clock(), 10, exclude=["FX1", "FX2"])
    clock.advance(31)
    assert a.renew(["FX3"], clock()) == {"FX3": fax3.lease_epoch}
    assert b.claim_due(clock(), 10, exclude=["FX1", "FX2"]) == []


def test_a_mail_whose_fate_is_unknown_is_recorded_as_uncertain(node: NodeFactory,
                                                               clock: FakeClock) -> None:
    a, b = InboundStore(node("node-a")), InboundStore(node("node-b"))
    received(a, "FX1", clock(), recipients=(R1,))
    [fa] = a.claim_due(clock(), 10)
    started = clock()
    assert a.begin_send("FX1", fa.lease_epoch, R1, started, 180) == (GO, None)
    clock.advance(31)  # node-a stalls between starting the mail and hearing the relay
    [fb] = b.claim_due(clock(), 10)
    # node-a may still be sending it: node-b waits, and does not send it too.
    assert b.begin_send("FX1", fb.lease_epoch, R1, clock(), 180) == (WAIT, started + 180)
    clock.advance(150)
    assert b.renew(["FX1"], clock()) == {"FX1": fb.lease_epoch}  # node-b's heartbeat
    # node-a comes back: the relay took it. That is recorded whoever holds the fax now.
    a.settle_send("FX1", fa.lease_epoch, R1, clock(), message_id="<m1>", detail="relayed")
    assert b.begin_send("FX1", fb.lease_epoch, R1, clock(), 180) == (SENT, None)
    assert a.delivered_to("FX1") == {R1}

    received(a, "FX2", clock(), recipients=(R1,))
    [f2] = a.claim_due(clock(), 10, exclude=["FX1"])
    started = clock()
    assert a.begin_send("FX2", f2.lease_epoch, R1, started, 180)[0] == GO
    clock.advance(31)  # and this time node-a never comes back
    [g2] = b.claim_due(clock(), 10, exclude=["FX1"])
    assert b.begin_send("FX2", g2.lease_epoch, R1, clock(), 180)[0] == WAIT
    clock.advance(180)
    assert b.renew(["FX2"], clock()) == {"FX2": g2.lease_epoch}
    assert b.begin_send("FX2", g2.lease_epoch, R1, clock(), 180) == (AGAIN, None)
    [event] = [e for e in b.events("FX2") if e["kind"] == "uncertain"]
    assert "node-a" in event["detail"] and "same Message-ID" in event["detail"]
    b.settle_send("FX2", g2.lease_epoch, R1, clock(), message_id="<m2>")
    assert b.delivered_to("FX2") == {R1}


def test_a_failed_try_is_settled_and_the_next_one_need_not_wait(node: NodeFactory,
                                                                clock: FakeClock) -> None:
    a, b = InboundStore(node("node-a")), InboundStore(node("node-b"))
    received(a, "FX1", clock(), recipients=(R1,))
    [fa] = a.claim_due(clock(), 10)
    assert a.begin_send("FX1", fa.lease_epoch, R1, clock(), 180)[0] == GO
    a.settle_send("FX1", fa.lease_epoch, R1, clock())  # the relay failed
    a.release("FX1")
    [fb] = b.claim_due(clock(), 10)
    assert b.begin_send("FX1", fb.lease_epoch, R1, clock(), 180) == (AGAIN, None)


def test_migration_renames_gave_up_and_keeps_the_rows(tmp_path: Path) -> None:
    """A database one migration before this one, with a fax given up under the old word."""
    path = tmp_path / "faxgw.sqlite3"
    mine = next(m for m in migrations.MIGRATIONS if "gave_up -> given-up" in m.description)
    db = sqlite3.connect(path)
    db.execute(migrations.SCHEMA_VERSION_DDL.format(**SqliteStore.DDL_TYPES))
    for m in migrations.MIGRATIONS:
        if m.version >= mine.version:
            break
        for statement in m.statements:
            db.execute(statement.format(**SqliteStore.DDL_TYPES))
        db.execute("INSERT INTO schema_version VALUES (?, 0, ?)", (m.version, m.description))
    db.execute("INSERT INTO inbound_faxes (fax_sid, state, created_at, updated_at) "
               "VALUES ('FX1', 'gave_up', 1, 1), ('FX2', 'done', 1, 1)")
    db.commit()
    db.close()
    store = SqliteStore(path, FakeClock())
    store.open()
    try:
        inbound = InboundStore(store)
        states = [inbound.get(s).state for s in ("FX1", "FX2")]  # type: ignore[union-attr]
        assert states == ["given-up", "done"]
        assert store.schema_version() >= mine.version
    finally:
        store.close()
