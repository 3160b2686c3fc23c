"""Fill a fresh gateway data directory with jobs waiting for their fax's final callback.

Pushing 10,000 mails through S3 and the simulator would take minutes on a 2-core machine, so
the jobs are written through the gateway's own `Store` transitions (the same rows, events and
attempts a real submit leaves behind): message -> spooled -> stored -> submitting ->
submitted, with the next status poll far in the future. Only the fsyncs are skipped
(``synchronous=OFF`` on this one bulk connection); the daemon later opens the file with its
own settings.
"""

from __future__ import annotations

import hashlib
import secrets
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from gateway.media_store import new_media_key
from gateway.smtp.intake import new_id
from gateway.store.rows import Message, NewJob
from gateway.store.sqlite import SqliteStore as Store


@dataclass(frozen=True)
class WaitingJob:
    job_id: str
    callback_url: str
    fax_sid: str
    to: str
    from_: str


def seed_waiting_jobs(data_dir: Path, count: int, *, public_base_url: str, from_number: str,
                      poll_in_s: float, per_message: int = 20) -> list[WaitingJob]:
    data_dir.mkdir(parents=True, exist_ok=True)
    spool = data_dir / "spool"
    spool.mkdir(exist_ok=True)
    store = Store(data_dir / "faxgw.sqlite3")
    store.open()
    store.tune_for_bulk_load()
    document = b"%PDF-1.4 placeholder: waiting jobs never read their document\n"
    out: list[WaitingJob] = []
    try:
        made = 0
        while made < count:
            n = min(per_message, count - made)
            message_id = new_id()
            path = spool / f"{message_id}.pdf"
            path.write_bytes(document)
            message = Message(
                id=message_id, created_at=time.time(), envelope_from="scanner@example.com",
                header_from="Office Scanner <scanner@example.com>",
                report_to="scanner@example.com", subject="Scan to fax",
                message_id_header="<bench-seed@example.com>", references_header=None,
                peer="127.0.0.1", document_path=str(path), document_bytes=len(document),
                document_sha256=hashlib.sha256(document).hexdigest(), pages=1,
                filenames="scan.pdf")
            jobs = [NewJob(id=new_id(), to_number=f"+1555{300 + (made + k) // 9000:03d}"
                           f"{(made + k) % 9000 + 1000:04d}", from_number=from_number,
                           quality="fine", callback_token=secrets.token_urlsafe(24),
                           media_key=new_media_key()) for k in range(n)]
            store.add_message(message, jobs)
            for new in jobs:
                job = store.job(new.id)
                assert job is not None
                store.mark_stored(job, new.media_key)
                job = store.job(new.id)
                assert job is not None
                url = f"{public_base_url}/signalwire/status/{new.callback_token}"
                store.mark_submitting(job, url, time.time() + 60)
                job = store.job(new.id)
                assert job is not None
                sid = str(uuid.uuid4())
                store.mark_submitted(job, sid, "queued", time.time() + poll_in_s,
                                     f"SignalWire accepted: sid {sid}, status queued")
                out.append(WaitingJob(new.id, url, sid, new.to_number, from_number))
            made += n
        store.checkpoint()
    finally:
        store.close()
    return out
