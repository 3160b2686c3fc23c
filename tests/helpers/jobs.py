"""Jobs and messages: rows built by hand (make_job, make_message) for the report tests, and a
real store filled through its own API up to any state (add_mail, to_submitted, to_final,
to_reported) for the operator commands and the dashboard."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gateway.jobs.outbound_states import Job, State
from gateway.store.rows import Message, NewJob
from gateway.store.sqlite import SqliteStore as Store

from ..conftest import make_pdf


def make_job(**overrides: object) -> Job:
    values: dict[str, object] = dict(
        id="0123456789abcdef", message_id="m1", to_number="+15551234567",
        from_number="+15550100000", quality="fine", state=State.COMPLETED, callback_token="t",
        callback_url="http://x/cb", media_key="k.pdf", fax_sid="sid-1", fax_status="busy",
        pages=2, pages_sent=0, duration_s=None, error_code=None, error_message=None,
        failure_reason=None, attempt=3, tries=0, next_run_at=None, submit_started_at=1.0,
        created_at=1.0, updated_at=2.0, reported_at=None)
    values.update(overrides)
    return Job(**values)  # type: ignore[arg-type]


def make_message(**overrides: object) -> Message:
    values: dict[str, object] = dict(
        id="m1", created_at=1.0, envelope_from="a@example.com", header_from="a@example.com",
        report_to="a@example.com", subject="Invoice", message_id_header="<o@example.com>",
        references_header="<r1@example.com>", peer="127.0.0.1", document_path="/nonexistent",
        document_bytes=10, document_sha256="x", pages=2, filenames="a.pdf")
    values.update(overrides)
    return Message(**values)  # type: ignore[arg-type]


_seq = 0


def add_mail(store: Store, tmp_path: Path, numbers: list[str], *, ids: list[str] | None = None,
             envelope_from: str | None = "scanner@example.com",
             header_from: str | None = "Alice <alice@example.com>",
             report_to: str | None = "alice@example.com", subject: str = "Invoice 42",
             peer: str = "192.0.2.10", filenames: str = "invoice.pdf") -> list[str]:
    global _seq
    _seq += 1
    message_id = f"m{_seq:015d}"
    spool = tmp_path / "spool"
    spool.mkdir(exist_ok=True)
    path = spool / f"{message_id}.pdf"
    path.write_bytes(make_pdf(2))
    message = Message(id=message_id, created_at=store.clock(), envelope_from=envelope_from,
                      header_from=header_from, report_to=report_to, subject=subject,
                      message_id_header="<orig@example.com>", references_header=None,
                      peer=peer, document_path=str(path), document_bytes=path.stat().st_size,
                      document_sha256="0" * 64, pages=2, filenames=filenames)
    ids = ids or [f"{_seq:04x}{n:012x}" for n in range(len(numbers))]
    jobs = [NewJob(id=i, to_number=n, from_number="+15550100000", quality="fine",
                   callback_token=f"tok-{i}", media_key=f"key-{i}.pdf")
            for i, n in zip(ids, numbers, strict=True)]
    store.add_message(message, jobs)
    return ids


def to_submitted(store: Store, job_id: str, sid: str) -> None:
    job = store.job(job_id)
    assert store.mark_stored(job, job.media_key)
    job = store.job(job_id)
    assert store.mark_submitting(job, f"http://gw.test/signalwire/status/tok-{job_id}",
                                 store.clock() + 40)
    job = store.job(job_id)
    assert store.mark_submitted(job, sid, "queued", store.clock() + 600,
                                f"SignalWire accepted: sid {sid}, status queued")


def to_final(store: Store, job_id: str, sid: str, status: str = "delivered", **kw: Any) -> None:
    to_submitted(store, job_id, sid)
    job = store.job(job_id)
    store.record_status(job, sid, status, pages=kw.get("pages", 2 if status == "delivered" else 0),
                        duration_s=60, error_code=kw.get("error_code"),
                        error_message=kw.get("error_message"), source="callback")


def to_reported(store: Store, job_id: str, sid: str, status: str = "delivered") -> None:
    to_final(store, job_id, sid, status)
    assert store.mark_reported(store.job(job_id), "report written to /var/outbox/x.eml")


