"""The CLI side of inbound faxes: `faxgw received` (the list, direction "in") and
`faxgw receive-sample` (make the sandbox's simulator ring the running gateway)."""

from __future__ import annotations

import base64
import json
import sys
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlencode

from gateway.commands.jobs import open_existing_store
from gateway.config import Settings
from gateway.inbound.service import SANDBOX_INFO
from gateway.outbound.actions import AdminError
from gateway.store.inbound import InboundStore

RING_PATH = "/_inbound/ring"


def _when(ts: float | None) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts, UTC).strftime(
        "%Y-%m-%d %H:%M:%S")


def received(settings: Settings, *, since: float | None, limit: int, as_json: bool) -> int:
    try:
        store = open_existing_store(settings)
    except AdminError as exc:
        print(f"faxgw: {exc}", file=sys.stderr)
        return 1
    try:
        inbound = InboundStore(store)
        rows = inbound.listing(since=since, limit=limit)
        sent = {r.fax_sid: inbound.deliveries(r.fax_sid) for r in rows}
    finally:
        store.close()
    if as_json:
        print(json.dumps([{"direction": "in", "fax_sid": r.fax_sid, "from": r.from_number,
                           "to": r.to_number, "state": r.state, "outcome": r.outcome,
                           "pages": r.num_pages, "created_at": r.created_at,
                           "error": r.error_message or r.last_error,
                           "recipients": list(r.recipient_list),
                           "mailed": [d["recipient"] for d in sent[r.fax_sid]]}
                          for r in rows], indent=2))
        return 0
    header = (f"{'DIR':<4} {'FAX SID':<36}  {'CREATED (UTC)':<19}  {'FROM':<14} {'TO':<14} "
              f"{'STATE':<20} {'PAGES':>5}  MAILED")
    print(header)
    for r in rows:
        state = f"{r.state}/{r.outcome}" if r.outcome else r.state
        mailed = f"{len(sent[r.fax_sid])}/{len(r.recipient_list)}"
        note = r.last_error if r.state not in ("done",) and r.last_error else ""
        print(f"{'in':<4} {r.fax_sid:<36}  {_when(r.created_at):<19}  "
              f"{(r.from_number or '-'):<14} {(r.to_number or '-'):<14} {state:<20} "
              f"{(r.num_pages if r.num_pages is not None else '-'):>5}  {mailed}"
              + (f"  {note[:80]}" if note else ""))
    return 0


def receive_sample(settings: Settings, *, to: str, caller: str, document: bytes,
                   wait_s: float = 20.0) -> int:
    """Ring the running sandbox gateway through its simulator, as SignalWire would."""
    info_path = settings.queue.data_dir / SANDBOX_INFO
    if not settings.sandbox:
        print("faxgw receive-sample works with the sandbox only (SIGNALWIRE_SPACE_URL is "
              "set); call the number from a fax machine instead", file=sys.stderr)
        return 2
    try:
        info = json.loads(info_path.read_text())
    except (OSError, ValueError):
        print(f"faxgw: no running sandbox gateway found ({info_path} missing): start "
              "`faxgw run` first", file=sys.stderr)
        return 69
    query = urlencode({"To": to, "From": caller, "Url": info["inbound_url"],
                       "StationId": "faxgw sample"})
    auth = base64.b64encode(f"{info['project_id']}:{info['api_token']}".encode()).decode()
    request = urllib.request.Request(
        f"{info['simulator_url']}{RING_PATH}?{query}", data=document, method="POST",
        headers={"Authorization": f"Basic {auth}", "Content-Type": "application/octet-stream"})
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            result = json.loads(resp.read())
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"faxgw: cannot reach the sandbox simulator at {info['simulator_url']}: {exc}",
              file=sys.stderr)
        return 69
    sid = result.get("fax_sid", "?")
    if result.get("answer") != "receive":
        print(f"fax {sid} from {caller} to {to}: the gateway answered "
              f"{'<Reject/>' if result.get('answer') == 'reject' else 'with an error'}"
              f" (is {to} in INBOUND_ROUTES?)")
        return 1
    print(f"fax {sid} from {caller} to {to}: received by the gateway "
          f"(action callback HTTP {result.get('action_statuses')})")
    outbox = Path(info.get("outbox") or settings.queue.data_dir / "outbox")
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        found = sorted(outbox.glob(f"inbound-{sid}-*.eml"))
        if found:
            for path in found:
                print(f"mail written to {path}")
            return 0
        time.sleep(0.2)
    print(f"no mail in {outbox} yet; with a relay (NOTIFY_SMTP_HOST) it went there; "
          f"see `faxgw received`")
    return 0
