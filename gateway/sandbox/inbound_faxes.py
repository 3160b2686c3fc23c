"""The simulator's inbound side: a fax "comes in" on one of the project's numbers.

`InboundSimulator.ring` does what SignalWire does when a fax calls a number set to "LaML
webhooks": a signed form POST (`AccountSid`, `ApiVersion`, `FaxSid`, `From`, `To`) to the
number's webhook URL, obeys the LaML answer (`<Receive action=...>` or `<Reject/>`), keeps the
document as the fax's media (behind the API's Basic auth, like "Protect Fax Media URLs"), and
posts the signed action callback once (the action webhook is not retried). The fax then shows
in the list call with `direction` inbound and its media can be deleted.

Knobs for tests: `outcome` ("received", or "failed:<T.30 text>"), `media_url_override` (a
MediaUrl on another host), `skip_action` (the callback is lost: only the reconciler can find
the fax), `action_repeats` (duplicate callbacks), `delete_conflicts` (media DELETEs answered
409). `POST <base>/_inbound/ring` (Basic auth with
the project's credentials; query To, From, Url, StationId; the document as the body) lets
`faxgw receive-sample` ring the running sandbox from another process.
"""

from __future__ import annotations

import hmac
import io
import logging
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urlsplit

import aiohttp
from aiohttp import web
from yarl import URL

from gateway.constants import API_PATH
from gateway.signalwire.signature import SIGNATURE_HEADER

log = logging.getLogger(__name__)

RING_PATH = "/_inbound/ring"
MAX_RING_BYTES = 20 * 1024 * 1024
WEBHOOK_TIMEOUT = aiohttp.ClientTimeout(total=None, connect=2.0, sock_connect=2.0, sock_read=5.0)


@dataclass
class InboundCall:
    """One simulated incoming fax and what the gateway answered."""

    fax_sid: str
    to: str
    from_: str
    webhook_url: str
    webhook_status: int | None = None
    answer: str = "none"          # receive, reject, error
    laml: str = ""
    receive_attrs: dict[str, str] = field(default_factory=dict)
    action_statuses: list[int | None] = field(default_factory=list)
    action_params: dict[str, str] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {"fax_sid": self.fax_sid, "to": self.to, "from": self.from_,
                "webhook_status": self.webhook_status, "answer": self.answer,
                "action_statuses": self.action_statuses,
                "media_type": self.receive_attrs.get("mediaType"),
                "page_size": self.receive_attrs.get("pageSize")}


def _pages(document: bytes) -> int:
    if document[:5] == b"%PDF-":
        from pypdf import PdfReader

        return len(PdfReader(io.BytesIO(document)).pages)
    try:
        from PIL import Image

        with Image.open(io.BytesIO(document)) as im:
            return int(getattr(im, "n_frames", 1))
    except Exception:  # not an image either: one page, the gateway will judge it
        return 1


class InboundSimulator:
    def __init__(self, state: Any, base_path: str) -> None:
        self.state = state
        self.base_path = base_path
        self.calls: list[InboundCall] = []
        self.outcome = "received"
        self.media_url_override: str | None = None
        self.skip_action = False
        self.action_repeats = 1
        self.media_deletes: list[str] = []
        # The next media DELETEs answer 409 (in progress), as SignalWire does mid-fax.
        self.delete_conflicts = 0

    async def ring(self, *, sim_url: str, webhook_url: str, to: str, from_: str,
                   document: bytes, station_id: str | None = None) -> InboundCall:
        """`sim_url`: the simulator's base URL (origin + base path), where the media lives."""
        from gateway.sandbox.fax_records import SimFax, utc_now

        state = self.state
        sid = str(uuid.uuid4())
        now = utc_now()
        origin = f"{urlsplit(sim_url).scheme}://{urlsplit(sim_url).netloc}"
        uri = f"{urlsplit(sim_url).path.rstrip('/')}{API_PATH}/Accounts/{state.project_id}" \
              f"/Faxes/{sid}"
        fax = SimFax(sid=sid, seq=state._next_seq(), account_sid=state.project_id, to=to,
                     from_=from_, media_url="", quality="fine", ttl_min=60,
                     status_callback=None, store_media=True, uri=uri, media_base_url=origin,
                     date_created=now, date_updated=now, direction="inbound",
                     status="receiving")
        fax.finished.set()
        state.faxes[sid] = fax
        call = InboundCall(fax_sid=sid, to=to, from_=from_, webhook_url=webhook_url)
        self.calls.append(call)
        params = {"AccountSid": state.project_id, "ApiVersion": "v1", "FaxSid": sid,
                  "From": from_, "To": to}
        status, text = await self._post(webhook_url, params)
        call.webhook_status, call.laml = status, text
        verb = self._parse(text, call) if status == 200 else None
        if verb != "Receive":
            call.answer = "reject" if verb == "Reject" else "error"
            fax.set_status("canceled" if verb == "Reject" else "failed",
                           code=None if verb == "Reject" else "30001",
                           message=None if verb == "Reject" else "Webhook failed")
            fax.num_pages = "0"
            log.info("inbound fax %s: %s", sid, call.answer)
            return call
        call.answer = "receive"
        kind, _, message = self.outcome.partition(":")
        if kind == "failed":
            fax.set_status("failed", code="30003", message=message or "The call dropped "
                           "prematurely")
            fax.num_pages = "0"
        else:
            fax.media_bytes = document
            fax.media_url = fax.stored_media_url or ""
            fax.num_pages = str(_pages(document))
            fax.set_status("received")
            fax.remote_station_id = station_id or from_
        action = {**params, "FaxStatus": fax.status, "NumPages": fax.num_pages or "0",
                  "Timestamp": now.strftime("%Y-%m-%dT%H:%M:%SZ")}
        if fax.media_bytes is not None:
            action["MediaUrl"] = self.media_url_override or fax.media_url
            action["MediaSid"] = fax.media_sid
        if fax.remote_station_id:
            action["RemoteStationId"] = fax.remote_station_id
        if fax.error_code:
            action["ErrorCode"] = fax.error_code
            action["ErrorMessage"] = fax.error_message or ""
        call.action_params = action
        if not self.skip_action and call.receive_attrs.get("action"):
            for _ in range(self.action_repeats):
                status, _text = await self._post(call.receive_attrs["action"], action)
                call.action_statuses.append(status)
        return call

    def _parse(self, text: str, call: InboundCall) -> str | None:
        try:
            root = ET.fromstring(text)
        except ET.ParseError:
            return None
        if root.tag != "Response" or len(root) == 0:
            return None
        verb = root[0]
        if verb.tag == "Receive":
            call.receive_attrs = dict(verb.attrib)
        return verb.tag

    async def _post(self, url: str, params: dict[str, str]) -> tuple[int | None, str]:
        headers = {"Content-Type": "application/x-www-form-urlencoded",
                   SIGNATURE_HEADER: self.state.sign(url, params)}
        try:
            async with self.state._client().post(URL(url, encoded=True),
                                                 data=urlencode(params).encode("ascii"),
                                                 headers=headers, allow_redirects=False,
                                                 timeout=WEBHOOK_TIMEOUT) as resp:
                return resp.status, (await resp.text())[:65536]
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.info("inbound webhook %s failed: %s", urlsplit(url).path, exc)
            return None, ""


def install_inbound(app: web.Application, state: Any, api: Any, base_path: str) -> None:
    sim = InboundSimulator(state, base_path)
    state.inbound = sim

    async def ring(request: web.Request) -> web.Response:
        """Ring the gateway from another process (faxgw receive-sample)."""
        from gateway.sandbox.fax_records import basic_credentials

        user, password = basic_credentials(request.headers.get("Authorization", ""))
        if not (hmac.compare_digest(user, api._user)
                and hmac.compare_digest(password, api._password)):
            raise web.HTTPUnauthorized()
        q = request.query
        if not all(q.get(k) for k in ("To", "From", "Url")):
            raise web.HTTPBadRequest(text="To, From and Url are required")
        body = bytearray()
        async for chunk in request.content.iter_chunked(64 * 1024):
            body += chunk
            if len(body) > MAX_RING_BYTES:
                raise web.HTTPRequestEntityTooLarge(max_size=MAX_RING_BYTES,
                                                    actual_size=len(body))
        path = request.path[: -len(RING_PATH)]
        call = await sim.ring(sim_url=f"{request.url.origin()}{path}", webhook_url=q["Url"],
                              to=q["To"], from_=q["From"], document=bytes(body),
                              station_id=q.get("StationId"))
        return web.json_response(call.summary())

    app.router.add_post(f"{base_path}{RING_PATH}", ring)
