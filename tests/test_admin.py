"""Operator commands: list, describe, resend, cancel and re-report, over a real SQLite store and,
for the end-to-end ones, a real gateway with the SignalWire simulator and a relay sink."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import time
from pathlib import Path
from typing import Any

import pytest

from gateway.commands import jobs as commands
from gateway.config import settings_from
from gateway.daemon import Gateway
from gateway.jobs.outbound_states import RetryPolicy, State
from gateway.outbound import actions as admin
from gateway.outbound.actions import AdminError
from gateway.sanitise import one_line
from gateway.store.factory import open_store
from gateway.store.sqlite import SqliteStore as Store

from .conftest import (
    FakeClock,
    GatewayFactory,
    RelaySink,
    Simulator,
    base_env,
    drive,
    production_env,
    relay_env,
    send_one,
)
from .helpers.jobs import add_mail, to_final, to_reported, to_submitted

POLICY = RetryPolicy(3, 600.0, 3600.0)  # the defaults, as a daemon configured so uses them
T0 = 1_700_000_000.0
Clock = FakeClock


# -- a store filled through its own API ---------------------------------------------------------

@pytest.fixture
def clock() -> Clock:
    return Clock(T0)


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> Any:
    s = Store(tmp_path / "faxgw.sqlite3", clock)
    s.open()
    yield s
    s.close()


# -- listing ------------------------------------------------------------------------------------

def test_list_jobs_newest_first_with_status_and_last_event(store: Store, tmp_path: Path,
                                                           clock: Clock) -> None:
    [a] = add_mail(store, tmp_path, ["+15551234567"])
    clock.advance(60)
    [b] = add_mail(store, tmp_path, ["+15551230000"], report_to=None,
                   envelope_from="copier@branch.example.org")
    clock.advance(60)
    [c] = add_mail(store, tmp_path, ["+442071234567"])
    to_reported(store, a, "sid-a-000000000000")
    to_submitted(store, b, "sid-b-000000000000")

    rows = admin.list_jobs(store)
    assert [r.id for r in rows] == [c, b, a]
    by_id = {r.id: r for r in rows}
    assert by_id[a].status == "reported/delivered" and by_id[a].result == "delivered"
    assert by_id[a].last_event.startswith("reported: report written to")
    assert by_id[a].attempts == 1 and by_id[a].pages == 2
    assert by_id[b].status == "submitted/queued" and by_id[b].result == "in progress"
    assert by_id[b].sender == "copier@branch.example.org"  # no From: address: the envelope
    assert by_id[c].status == "spooled" and by_id[c].last_event.startswith("received: from")
    assert by_id[c].created == T0 + 120

    assert [r.id for r in admin.list_jobs(store, status="delivered")] == [a]
    assert [r.id for r in admin.list_jobs(store, status="reported")] == [a]
    assert [r.id for r in admin.list_jobs(store, status="active")] == [c, b]
    assert [r.id for r in admin.list_jobs(store, to="(555) 123-4567")] == [a]
    assert [r.id for r in admin.list_jobs(store, to="0000")] == [b]
    assert [r.id for r in admin.list_jobs(store, sender="BRANCH.example")] == [b]
    assert [r.id for r in admin.list_jobs(store, since=T0 + 60)] == [c, b]
    assert [r.id for r in admin.list_jobs(store, limit=1)] == [c]
    assert admin.list_jobs(store, sender="nobody@") == []


def test_list_filters_refuse_nonsense_and_escape_wildcards(store: Store, tmp_path: Path) -> None:
    add_mail(store, tmp_path, ["+15551234567"], envelope_from="a_b@example.com",
             report_to="a_b@example.com", header_from=None)
    add_mail(store, tmp_path, ["+15551234568"], envelope_from="axb@example.com",
             report_to="axb@example.com", header_from=None)
    assert [r.sender for r in admin.list_jobs(store, sender="a_b")] == ["a_b@example.com"]
    assert admin.list_jobs(store, sender="%") == []
    with pytest.raises(AdminError, match="unknown status 'sent'; use one of: active"):
        admin.list_jobs(store, status="sent")
    with pytest.raises(AdminError, match="no digits"):
        admin.list_jobs(store, to="bob")
    with pytest.raises(AdminError, match="at least 1"):
        admin.list_jobs(store, limit=0)


def test_table_json_and_csv(store: Store, tmp_path: Path) -> None:
    [a] = add_mail(store, tmp_path, ["+15551234567"], subject="=HYPERLINK(\"http://x\")",
                   header_from="Mallory \x1b[31m<m@example.com>", report_to=None,
                   envelope_from="m\x1b]0;pwned\x07@example.com")
    [b] = add_mail(store, tmp_path, ["+15551230002"])
    to_reported(store, a, "sid-a-000000000000")
    to_final(store, b, "sid-b-000000000000", "failed", error_code="30003",
             error_message="The call dropped prematurely")
    rows = admin.list_jobs(store)

    table = admin.format_table(rows)
    lines = table.splitlines()
    assert lines[0].split() == ["ID", "CREATED", "(UTC)", "SENDER", "TO", "STATUS", "PAGES",
                                "TRIES", "LAST", "EVENT"]
    assert len(lines) == 3 and "\x1b" not in table and "\x07" not in table
    assert any(a in line and "reported/delivered" in line for line in lines)
    assert any(b in line and "completed/failed" in line for line in lines)
    assert admin.format_table([]) == "no jobs found\n"

    data = json.loads(admin.rows_to_json(rows))
    assert {d["id"] for d in data} == {a, b}
    [da] = [d for d in data if d["id"] == a]
    assert da["created"] == "2023-11-14T22:13:20Z" and da["reported_at"].endswith("Z")
    assert da["destination"] == "+15551234567" and da["peer"] == "192.0.2.10"

    records = list(csv.DictReader(io.StringIO(admin.rows_to_csv(rows))))
    assert tuple(records[0].keys()) == admin.CSV_COLUMNS
    by_id = {r["job_id"]: r for r in records}
    ra, rb = by_id[a], by_id[b]
    assert ra["subject"].startswith("'=HYPERLINK")  # no formula in a spreadsheet
    assert "\x1b" not in ra["envelope_from"] and ra["peer"] == "192.0.2.10"
    assert ra["destination"] == "+15551234567" and ra["pages"] == "2"
    assert ra["result"] == "delivered" and ra["fax_status"] == "delivered"
    assert ra["received_at"] == "2023-11-14T22:13:20Z" and ra["reported_at"]
    assert rb["result"] == "not delivered: the transmission failed"
    assert rb["error"] == "The call dropped prematurely (code 30003)"
    assert rb["report_to"] == "alice@example.com" and rb["reported_at"] == ""


def test_parse_since() -> None:
    assert admin.parse_since("90m", T0) == T0 - 5400
    assert admin.parse_since("2d", T0) == T0 - 172800
    assert admin.parse_since("2023-11-14", T0) == 1699920000.0
    assert admin.parse_since("2023-11-14T22:13:20Z", T0) == T0
    with pytest.raises(AdminError, match="cannot read 'yesterday' as a time"):
        admin.parse_since("yesterday", T0)


# -- one job ------------------------------------------------------------------------------------

def test_describe_by_prefix_and_by_fax_sid(store: Store, tmp_path: Path, clock: Clock) -> None:
    [a, b] = add_mail(store, tmp_path, ["+15551234567", "+15557654321"],
                      ids=["abcdef0123456789", "abcdef9876543210"])
    to_reported(store, a, "6f1c1c2e-1111-4f0e-9c44-0123456789ab")

    text = admin.describe_job(store, "abcdef01", clock.now)
    assert text.startswith("Job abcdef0123456789\n")
    for expected in ("reported/delivered", "+1 555-123-4567 (+15551234567)",
                     "Invoice 42", "192.0.2.10", "invoice.pdf", "scanner@example.com",
                     "Alice <alice@example.com>", "6f1c1c2e-1111-4f0e-9c44-0123456789ab",
                     "report written to /var/outbox/x.eml", "abcdef9876543210",
                     "Other jobs of this message"):
        assert expected in text, expected
    assert "   1  2023-11-14 22:13:20  fine       delivered" in text
    history = text.split("History (UTC)\n", 1)[1]
    assert [line.split()[2] for line in history.splitlines()] == [
        "received", "stored", "submitting", "submitted", "final", "reported"]

    assert admin.resolve_job_id(store, "ABCDEF98") == b
    assert admin.resolve_job_id(store, "6f1c1c2e-1111-4f0e-9c44-0123456789ab") == a
    with pytest.raises(AdminError, match="matches several jobs"):
        admin.describe_job(store, "abcdef")
    with pytest.raises(AdminError, match="at least 6 characters"):
        admin.describe_job(store, "abcde")
    with pytest.raises(AdminError, match="no job with an id starting with 'ffffff'"):
        admin.describe_job(store, "ffffff")
    with pytest.raises(AdminError, match="no job sent a fax with id"):
        admin.describe_job(store, "00000000-0000-0000-0000-000000000000")
    with pytest.raises(AdminError, match="is not a job id"):
        admin.describe_job(store, "job%42")


def test_describe_job_in_progress_and_failed(store: Store, tmp_path: Path, clock: Clock) -> None:
    [a] = add_mail(store, tmp_path, ["+15551234567"])
    text = admin.describe_job(store, a, clock.now)
    assert "Result:        in progress" in text and "(due now)" in text
    assert "Attempts\n  (none)" in text and "when the fax is finished" in text
    assert store.mark_given_up(store.job(a), "the gateway gave up after 24 hours of trying")
    text = admin.describe_job(store, a, clock.now)
    assert "given-up/not sent" in text
    assert "Result:        not sent: the gateway gave up after 24 hours" in text
    assert "Delivery:      due" in text


# -- resend -------------------------------------------------------------------------------------

def test_resend_makes_a_new_job_for_the_same_document(store: Store, tmp_path: Path,
                                                      clock: Clock) -> None:
    [a] = add_mail(store, tmp_path, ["+15551234567"])
    to_reported(store, a, "sid-a-000000000000")
    clock.advance(3600)
    new_id = admin.resend_job(store, a[:8], clock.now, retry_policy=POLICY)
    old, new = store.job(a), store.job(new_id)
    assert new_id != a and len(new_id) == 16
    assert (new.state, new.next_run_at, new.created_at) == (State.SPOOLED, clock.now, clock.now)
    assert (new.message_id, new.to_number, new.from_number, new.quality, new.pages) == (
        old.message_id, old.to_number, old.from_number, old.quality, old.pages)
    assert new.callback_token != old.callback_token and new.media_key != old.media_key
    assert new.attempt == 0 and new.fax_sid is None and new.reported_at is None
    assert store.events(new_id)[0].detail == f"resend of job {a} by the operator"
    assert store.events(a)[-1].kind == "resent"
    # The first resend is under way: a second one would fax the document twice.
    with pytest.raises(admin.AlreadyResent, match=f"job {a} is already being resent, as job "
                                                  f"{new_id} \\(spooled\\)") as err:
        admin.resend_job(store, a, clock.now, retry_policy=POLICY)
    assert err.value.job_id == new_id
    with pytest.raises(AdminError, match="still in progress"):
        admin.resend_job(store, new_id, clock.now, retry_policy=POLICY)


def test_a_named_operator_is_written_into_each_action_event_once(store: Store, tmp_path: Path,
                                                                 clock: Clock) -> None:
    """The dashboard passes the administrator's name; the store writes it into the action's
    own event (one line per action, no extra "operator" line), made one plain line."""
    [a, b, c] = add_mail(store, tmp_path, ["+15551234567", "+15551234568", "+15551234569"])
    name = "ann\r\nkind: forged\x1b[31m" + "x" * 200
    shown = one_line(name, 80)
    assert "\n" not in shown and "\x1b" not in shown and len(shown) == 80
    to_reported(store, a, "sid-a-000000000000")
    new_id = admin.resend_job(store, a, clock.now, retry_policy=POLICY, by=name)
    assert [(e.kind, e.detail) for e in store.events(a)][-1] == (
        "resent", f"sent again as job {new_id} by {shown}")
    assert store.events(new_id)[0].detail == f"resend of job {a} by {shown}"
    admin.request_report(store, a, clock.now, by="ann")
    assert store.events(a)[-1].detail == "report requested again by ann"
    admin.request_report(store, a, clock.now, by="ann")  # due already: tried now
    assert store.events(a)[-1].detail == "report retry requested by ann"
    admin.request_cancel(store, b, clock.now, by="ann")
    job = store.job(b)
    assert job.failure_reason == "canceled by the operator"  # the sender's report
    assert store.events(b)[-1].detail == "canceled by ann"
    to_submitted(store, c, "sid-c-000000000000")
    admin.note_cancel(store, c, clock.now, "sid-c-000000000000", by="ann")
    assert store.events(c)[-1].detail == "fax sid-c-000000000000 canceled at SignalWire by ann"
    for job_id in (a, b, c, new_id):
        assert not [e for e in store.events(job_id) if e.kind == "operator"]
    # No name (the CLI): "the operator", as before.
    admin.request_report(store, a, clock.now)
    assert store.events(a)[-1].detail == "report retry requested by the operator"


def test_resend_uses_the_given_caller_number(store: Store, tmp_path: Path) -> None:
    [a] = add_mail(store, tmp_path, ["+15551234567"])
    to_reported(store, a, "sid-a-000000000000")
    new_id = admin.resend_job(store, a, T0, from_number="+15550109999",
                              retry_policy=POLICY)
    assert store.job(new_id).from_number == "+15550109999"


def test_resend_refuses_when_the_document_is_gone(store: Store, tmp_path: Path) -> None:
    [a] = add_mail(store, tmp_path, ["+15551234567"])
    [b] = add_mail(store, tmp_path, ["+15551234568"])
    to_reported(store, a, "sid-a-000000000000")
    to_reported(store, b, "sid-b-000000000000")
    store.mark_purged(store.job(a).message_id)
    with pytest.raises(AdminError, match="its document was deleted from the spool at "
                                         ".*DOCUMENT_RETENTION_HOURS.*mail it again"):
        admin.resend_job(store, a, T0, retry_policy=POLICY)
    Path(store.message(store.job(b).message_id).document_path).unlink()
    with pytest.raises(AdminError, match="missing from the spool"):
        admin.resend_job(store, b, T0, retry_policy=POLICY)
    assert len(store.jobs()) == 2


def test_resend_of_a_completed_job_waits_for_its_automatic_retry(store: Store,
                                                                  tmp_path: Path) -> None:
    [a] = add_mail(store, tmp_path, ["+15551230000"])
    to_final(store, a, "sid-a-000000000000", "busy")
    with pytest.raises(AdminError, match="will be retried automatically \\(line busy\\)"):
        admin.resend_job(store, a, T0, retry_policy=POLICY)
    # Past the kill time no retry comes: a resend by hand is the way.
    new_id = admin.resend_job(store, a, T0 + 2 * 3600,
                              retry_policy=RetryPolicy(3, 600.0, 3600.0))
    assert store.job(new_id).state is State.SPOOLED


def test_faxgw_resend_decides_with_the_configured_retry_policy(tmp_path: Path, capsys) -> None:
    """`faxgw resend` once used the built-in policy (3 attempts): with FAX_MAX_ATTEMPTS=1 a busy
    fax gets no automatic retry, so the operator's resend must go through; with the default
    policy it would be refused as "will be retried automatically"."""
    data = tmp_path / "var"
    s = Store(data / "faxgw.sqlite3", time.time)
    s.open()
    try:
        [a] = add_mail(s, tmp_path, ["+15551230000"])
        to_final(s, a, "sid-a-000000000000", "busy")
    finally:
        s.close()
    strict = settings_from(base_env(data, FAX_MAX_ATTEMPTS="1"))
    assert commands.resend(strict, a) == 0, capsys.readouterr().err
    assert f"job {a} will be sent again as job" in capsys.readouterr().out
    [b] = add_mail_in(data, tmp_path, ["+15551230001"])
    lenient = settings_from(base_env(data, FAX_MAX_ATTEMPTS="3",
                                     FAX_RETRY_DELAY_SECONDS="120"))
    assert commands.resend(lenient, b) == 1
    assert "will be retried automatically (line busy)" in capsys.readouterr().err


def add_mail_in(data: Path, tmp_path: Path, numbers: list[str]) -> list[str]:
    s = Store(data / "faxgw.sqlite3", time.time)
    s.open()
    try:
        ids = add_mail(s, tmp_path, numbers)
        for job_id in ids:
            to_final(s, job_id, f"sid-{job_id}-0000", "busy")
        return ids
    finally:
        s.close()


# -- cancel and report again (store level) ------------------------------------------------------

def test_cancel_before_submission_fails_the_job_for_its_report(store: Store,
                                                               tmp_path: Path) -> None:
    [a, b] = add_mail(store, tmp_path, ["+15551234567", "+15551234568"])
    assert store.mark_stored(store.job(b), "key-b.pdf")
    for job_id in (a, b):
        result = admin.request_cancel(store, job_id, T0 + 5)
        assert result.fax_sid is None and "canceled" in result.text
        job = store.job(job_id)
        assert (job.state, job.failure_reason, job.next_run_at) == (
            State.GIVEN_UP, "canceled by the operator", T0 + 5)
        assert store.events(job_id)[-1].detail == "canceled by the operator"
    with pytest.raises(AdminError, match="already finished \\(given-up/canceled\\)"):
        admin.request_cancel(store, a, T0 + 6)


def test_cancel_of_a_submitted_job_names_the_fax(store: Store, tmp_path: Path) -> None:
    [a, b] = add_mail(store, tmp_path, ["+15551234567", "+15551234568"])
    to_submitted(store, a, "sid-a-000000000000")
    result = admin.request_cancel(store, a, T0)
    assert (result.job_id, result.fax_sid) == (a, "sid-a-000000000000")
    assert store.job(a).state is State.SUBMITTED  # only SignalWire can stop it now
    admin.note_cancel(store, a, T0 + 1, "sid-a-000000000000")
    job = store.job(a)
    assert job.next_run_at == T0 + 1  # the worker fetches the status now
    assert store.events(a)[-1].kind == "cancel"
    store.mark_stored(store.job(b), "key-b.pdf")
    store.mark_submitting(store.job(b), "http://gw.test/cb", T0 + 40)
    with pytest.raises(AdminError, match="being handed to SignalWire right now"):
        admin.request_cancel(store, b, T0)


def test_request_report_puts_a_reported_job_back(store: Store, tmp_path: Path) -> None:
    [a, b, c] = add_mail(store, tmp_path, ["+15551234567", "+15551234568", "+15551234569"])
    to_reported(store, a, "sid-a-000000000000")
    assert store.mark_given_up(store.job(b), "SignalWire refused the fax: bad number")
    assert store.mark_reported(store.job(b), "report written to x")
    reported_at = store.job(a).reported_at

    assert "sent again" in admin.request_report(store, a, T0 + 100)
    job = store.job(a)
    assert (job.state, job.next_run_at, job.reported_at) == (State.COMPLETED, T0 + 100,
                                                             reported_at)
    admin.request_report(store, b, T0 + 100)
    assert store.job(b).state is State.GIVEN_UP
    # Already due (say, the relay is down): tried now.
    assert "already due" in admin.request_report(store, a, T0 + 200)
    assert store.job(a).next_run_at == T0 + 200
    with pytest.raises(AdminError, match="still in progress \\(spooled\\)"):
        admin.request_report(store, c, T0)


# -- against a live gateway ---------------------------------------------------------------------

class Cli:
    """The operator's side: its own connection to the daemon's database, as `faxgw` opens it,
    used from a thread like a separate process would."""

    def __init__(self, gw: Gateway) -> None:
        self.store = open_store(gw.s)
        self.store.open()

    async def __call__(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return await asyncio.to_thread(fn, self.store, *args, **kwargs)

    def close(self) -> None:
        self.store.close()


async def test_cancel_a_queued_fax_at_signalwire(simulator: Simulator, relay: RelaySink,
                                                 tmp_path: Path,
                                                 manual_gateway: GatewayFactory) -> None:
    clock = Clock(1_800_000_000.0)
    gw = await manual_gateway(production_env(tmp_path / "var", simulator, **relay_env(relay)),
                              clock)
    cli = Cli(gw)
    simulator.state.hold_queue()
    try:
        job_id = await send_one(gw)
        await gw.worker.run_until_idle()
        request = await cli(admin.request_cancel, job_id, clock.now)
        assert request.fax_sid == next(iter(simulator.state.faxes))
        await admin.cancel_fax(gw.signalwire, request.fax_sid)
        await cli(admin.note_cancel, job_id, clock.now, request.fax_sid)
        await drive(gw, simulator)
        report = await relay.next()
        with pytest.raises(AdminError, match="^too late to cancel: the fax is already being "
                                             "sent$"):
            await admin.cancel_fax(gw.signalwire, request.fax_sid)
        with pytest.raises(AdminError, match="already finished \\(reported/canceled\\)"):
            await cli(admin.request_cancel, job_id, clock.now)
        with pytest.raises(AdminError, match="SignalWire did not cancel fax nope.*not found"):
            await admin.cancel_fax(gw.signalwire, "nope")
        text = await cli(admin.describe_job, job_id, clock.now)
    finally:
        cli.close()
        await gw.stop()
    assert report["Subject"] == "Fax to +1 555-123-4567 not delivered: the fax was canceled"
    assert "canceled at SignalWire by the operator" in text
    assert simulator.state.faxes[request.fax_sid].status == "canceled"


async def test_cancel_before_submission_reports_to_the_sender(
        simulator: Simulator, relay: RelaySink, tmp_path: Path,
        manual_gateway: GatewayFactory) -> None:
    clock = Clock(1_800_000_000.0)
    gw = await manual_gateway(production_env(tmp_path / "var", simulator, **relay_env(relay)),
                              clock)
    cli = Cli(gw)
    try:
        job_id = await send_one(gw)
        request = await cli(admin.request_cancel, job_id[:6], clock.now)
        assert request.fax_sid is None
        await drive(gw, simulator)
        report = await relay.next()
    finally:
        cli.close()
        await gw.stop()
    assert report["Subject"] == "Fax to +1 555-123-4567 not sent: canceled by the operator"
    assert simulator.state.send_requests == []


async def test_resend_and_report_again_end_to_end(simulator: Simulator, relay: RelaySink,
                                                  tmp_path: Path,
                                                  manual_gateway: GatewayFactory) -> None:
    clock = Clock(1_800_000_000.0)
    gw = await manual_gateway(production_env(tmp_path / "var", simulator,
                                             DOCUMENT_RETENTION_HOURS="24", **relay_env(relay)),
                              clock)
    cli = Cli(gw)
    try:
        job_id = await send_one(gw)
        await drive(gw, simulator)
        first = await relay.next()
        clock.advance(600)
        new_id = await cli(admin.resend_job, job_id, clock.now,
                               retry_policy=gw.worker.retry_policy)
        await drive(gw, simulator)
        second = await relay.next()
        assert await cli(admin.request_report, job_id, clock.now)
        await drive(gw, simulator)
        third = await relay.next()
        rows = await cli(admin.list_jobs)
        old = await gw.store.run(gw.store.job, job_id)
    finally:
        cli.close()
        await gw.stop()
    assert first["X-Faxgw-Job"] == third["X-Faxgw-Job"] == job_id
    assert second["X-Faxgw-Job"] == new_id
    assert all("delivered" in m["Subject"] for m in (first, second, third))
    assert len(simulator.state.faxes) == 2  # the resend; the second report sent no fax
    assert [r.id for r in rows] == [new_id, job_id]
    assert [r.status for r in rows] == ["reported/delivered"] * 2
    assert old.reported_at == clock.now


async def test_resend_refused_once_the_document_is_purged(simulator: Simulator, relay: RelaySink,
                                                          tmp_path: Path,
                                                          manual_gateway: GatewayFactory) -> None:
    clock = Clock(1_800_000_000.0)
    gw = await manual_gateway(production_env(tmp_path / "var", simulator, **relay_env(relay)),
                              clock)
    cli = Cli(gw)
    try:
        job_id = await send_one(gw)
        await drive(gw, simulator)
        await relay.next()
        with pytest.raises(AdminError, match="deleted from the spool"):
            await cli(admin.resend_job, job_id, clock.now,
                               retry_policy=gw.worker.retry_policy)
    finally:
        cli.close()
        await gw.stop()


async def test_report_again_never_dials_again(simulator: Simulator, relay: RelaySink,
                                              tmp_path: Path,
                                              manual_gateway: GatewayFactory) -> None:
    clock = Clock(1_800_000_000.0)
    gw = await manual_gateway(production_env(tmp_path / "var", simulator,
                                             FAX_MAX_ATTEMPTS="1", **relay_env(relay)), clock)
    cli = Cli(gw)
    try:
        job_id = await send_one(gw, "15551230000")  # always busy
        await drive(gw, simulator)
        assert "busy" in (await relay.next())["Subject"]
        # The operator raised FAX_MAX_ATTEMPTS and restarted: the old busy job now qualifies
        # for another attempt, but a report sent again must not dial.
        gw.worker.retry_policy = RetryPolicy(3, 600.0, 3600.0)
        await cli(admin.request_report, job_id, clock.now)
        await drive(gw, simulator)
        job = await gw.store.run(gw.store.job, job_id)
    finally:
        cli.close()
        await gw.stop()
    assert len(simulator.state.faxes) == 1
    assert job.state is State.REPORTED
