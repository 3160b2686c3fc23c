"""CPU of the document workers' two tasks per fax, in a fresh process: intake's `prepare` (the
mail file to the fax PDF) and the final report's `render_final_report` (thumbnail, templates,
MIME), on the same ~100 KB scan mail bench.run sends (bench/documents.py).

    PYTHONPATH=$PWD python -m bench.worker_tasks [--size 100000] [--calls 200] [--json]

Each task is timed with time.process_time over `--calls` calls after `--warmup` calls (the
first call pays the imports: reported apart as "first call"), in the way the worker runs
them: `prepare` is handed the mail's path and writes the PDF beside it (fsync'ed, as intake
asks), `render_final_report` gets the job and message rows and the spooled PDF's path
(defaults: thumbnail on, PDF not attached). "pickle" is what goes over the worker's socket
both ways for each task (the arguments down, the result back): its bytes and the CPU of
dumping and loading it on the two sides.

Also `--first N`: a fresh worker process's CPU and resident memory bare (as it starts), for
its first prepare and its first report (their imports included: a worker starts bare, see
gateway/documents/pool_child.py), the median of N processes; and, where pool_child has
`preimport`, the same for a worker that imported ahead of its first task.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _fixtures(root: Path, size: int) -> tuple[Path, Path]:
    """The mail (CRLF, as DATA is spooled) and, for the report, the PDF prepare made of it."""
    from .documents import mail_bytes, noise_pdf

    mail = root / "mail.eml"
    mail.write_bytes(mail_bytes(noise_pdf(size), to="+15551234567"))
    return mail, root / "spooled.pdf"


def _rows(pdf_path: Path, pages: int) -> tuple[Any, Any, list[Any], list[Any]]:
    from gateway.jobs.outbound_states import Job, State
    from gateway.store.rows import Attempt, Event, Message

    job = Job(id="0123456789abcdef", message_id="m1", to_number="+15551234567",
              from_number="+15550100000", quality="fine", state=State.COMPLETED,
              callback_token="t", callback_url="http://x/cb", media_key="k.pdf",
              fax_sid="sid-1", fax_status="delivered", pages=pages, pages_sent=pages,
              duration_s=31, error_code=None, error_message=None, failure_reason=None,
              attempt=1, tries=0, next_run_at=None, submit_started_at=1.0, created_at=1.0,
              updated_at=40.0, reported_at=None, report_n=1)
    message = Message(id="m1", created_at=1.0, envelope_from="scanner@example.com",
                      header_from="Office Scanner <scanner@example.com>",
                      report_to="scanner@example.com", subject="Scan to fax",
                      message_id_header="<bench-scan@example.com>", references_header=None,
                      peer="127.0.0.1", document_path=str(pdf_path),
                      document_bytes=pdf_path.stat().st_size, document_sha256="0" * 64,
                      pages=pages, filenames="scan.pdf")
    events = [Event(job.id, 1.0, "received", None),
              Event(job.id, 2.0, "submitting", "attempt 1"),
              Event(job.id, 3.0, "submitted", "sid-1"),
              Event(job.id, 40.0, "final", "status=delivered pages=1")]
    attempts = [Attempt(job.id, 1, "fine", 2.0, "sid-1", "delivered", None, None, pages, 31,
                        40.0)]
    return job, message, events, attempts


# What the job runner passes with the defaults (REPORT_THUMBNAIL on, REPORT_ATTACH_PDF off).
REPORT_OPTIONS: dict[str, Any] = dict(
    from_addr="Fax Gateway <fax@gw.example>", hostname="gw.example", now=50.0,
    template_dir=None, thumbnail=True, attach_pdf=False, bcc=(), fax_domain="fax.local")


def _timed(fn: Any, calls: int) -> float:
    """CPU ms per call of fn() over `calls` calls."""
    start = time.process_time()
    for _ in range(calls):
        fn()
    return (time.process_time() - start) * 1000 / calls


def _pickle_cost(task: tuple[Any, ...], result: Any, calls: int) -> dict[str, float]:
    down = pickle.dumps(task, pickle.HIGHEST_PROTOCOL)
    up = pickle.dumps(result, pickle.HIGHEST_PROTOCOL)

    def both() -> None:
        pickle.loads(pickle.dumps(task, pickle.HIGHEST_PROTOCOL))
        pickle.loads(pickle.dumps(result, pickle.HIGHEST_PROTOCOL))

    return {"down_bytes": len(down), "up_bytes": len(up), "ms": round(_timed(both, calls), 3)}


def measure(size: int, calls: int, warmup: int, first_rounds: int = 0) -> dict[str, Any]:
    from gateway.documents.model import DocOptions
    from gateway.documents.pool_child import call

    results: dict[str, Any] = {"size": size, "calls": calls}
    with tempfile.TemporaryDirectory(prefix="faxgw-worker-tasks-") as tmp:
        root = Path(tmp)
        mail, spooled = _fixtures(root, size)
        results["mail_bytes"] = mail.stat().st_size
        opts = DocOptions()
        n = 0

        def prepare() -> Any:
            nonlocal n
            n += 1
            out = root / f"out-{n}.pdf"
            prepared = call("gateway.documents.build:prepare", str(mail), opts,
                            ["+15551234567"], "scanner@example.com",
                            "Mon, 07 Dec 2026 19:31:02 +0000", str(out))
            if n == 1:
                os.replace(out, spooled)
            else:
                out.unlink()
            return prepared

        start = time.process_time()
        first = prepare()
        results["prepare_first_ms"] = round((time.process_time() - start) * 1000, 2)
        for _ in range(warmup):
            prepare()
        results["prepare_ms"] = round(_timed(prepare, calls), 3)
        down: tuple[Any, ...] = (
            call, ("gateway.documents.build:prepare", str(mail), opts, ["+15551234567"],
                   "scanner@example.com", "date", str(root / "x.pdf")), {})
        results["prepare_pickle"] = _pickle_cost(down, (True, first, ""), calls)

        from gateway.mail.reports import render_final_report

        job, message, events, attempts = _rows(spooled, first.document.pages)
        options = REPORT_OPTIONS

        def report() -> Any:
            return render_final_report(job, message, events, attempts, **options)

        start = time.process_time()
        rendered = report()
        results["report_first_ms"] = round((time.process_time() - start) * 1000, 2)
        for _ in range(warmup):
            report()
        results["report_ms"] = round(_timed(report, calls), 3)
        down = (render_final_report, (job, message, events, attempts), options)
        results["report_pickle"] = _pickle_cost(down, (True, rendered, ""), calls)
        results["report_bytes"] = len(rendered.data)
        if first_rounds:
            results["first"] = first_tasks(mail, spooled, first_rounds, False)
            from gateway.documents import pool_child

            if hasattr(pool_child, "preimport"):
                results["first_preimport"] = first_tasks(mail, spooled, first_rounds, True)
    return results


_FIRST_TASKS = """
import sys, time
def rss():
    with open('/proc/self/statm') as fh:
        return int(fh.read().split()[1]) * 4096 // 1024
mail, spooled, out, preimport = sys.argv[1:5]
import gateway.documents.pool_child as pool_child
marks = [(time.process_time(), rss())]
if preimport == "1":
    pool_child.preimport()
marks.append((time.process_time(), rss()))
from gateway.documents.model import DocOptions
first = pool_child.call("gateway.documents.build:prepare", mail, DocOptions(), ["+15551234567"],
                        "scanner@example.com", "Mon, 07 Dec 2026 19:31:02 +0000", out)
marks.append((time.process_time(), rss()))
from pathlib import Path
from bench.worker_tasks import _rows, REPORT_OPTIONS
from gateway.mail.reports import render_final_report
job, message, events, attempts = _rows(Path(spooled), first.document.pages)
render_final_report(job, message, events, attempts, **REPORT_OPTIONS)
marks.append((time.process_time(), rss()))
print(" ".join(f"{cpu * 1000:.1f} {kb}" for cpu, kb in marks))
"""


def first_tasks(mail: Path, spooled: Path, rounds: int, preimport: bool) -> dict[str, Any]:
    """A fresh worker process (pool_child imported, as a worker starts): its CPU and RSS bare,
    after `preimport` (when asked), after its first prepare and after its first report."""
    rows = []
    for n in range(rounds):
        out = spooled.with_name(f"first-{n}.pdf")
        run = subprocess.run([sys.executable, "-c", _FIRST_TASKS, str(mail), str(spooled),
                              str(out), "1" if preimport else "0"],
                             capture_output=True, text=True, check=True,
                             env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
        out.unlink(missing_ok=True)
        rows.append([float(v) for v in run.stdout.split()])
    cpu = [statistics.median(r[i] for r in rows) for i in range(0, 8, 2)]
    kb = [statistics.median(r[i] for r in rows) for i in range(1, 8, 2)]
    return {"bare_cpu_ms": round(cpu[0], 1), "bare_rss_kb": int(kb[0]),
            "preimport_cpu_ms": round(cpu[1] - cpu[0], 1), "preimport_rss_kb": int(kb[1] - kb[0]),
            "first_prepare_cpu_ms": round(cpu[2] - cpu[1], 1),
            "first_report_cpu_ms": round(cpu[3] - cpu[2], 1),
            "after_both_rss_kb": int(kb[3])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=100_000, help="PDF bytes (bench.run's 100k)")
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--first", type=int, default=0, metavar="ROUNDS",
                   help="also a fresh worker's first prepare and report (CPU, RSS; imports "
                        "included), median of ROUNDS processes, with and without preimport")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    results = measure(a.size, a.calls, a.warmup, a.first)
    if a.json:
        print(json.dumps(results))
        return
    print(f"mail {results['mail_bytes']} bytes, {a.calls} calls after {a.warmup} warm-up")
    for task in ("prepare", "report"):
        pk = results[f"{task}_pickle"]
        print(f"{task:8s} {results[f'{task}_ms']:7.3f} ms CPU/call  (first call "
              f"{results[f'{task}_first_ms']:.1f} ms; pickle {pk['down_bytes']} B down, "
              f"{pk['up_bytes']} B up, {pk['ms']:.3f} ms)")
    for key in ("first", "first_preimport"):
        if key in results:
            print(f"{key:15s} " + ", ".join(f"{k} {v}" for k, v in results[key].items()))


if __name__ == "__main__":
    main()
