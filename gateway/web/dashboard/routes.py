"""The dashboard's routes: login, the jobs list, one job, the actions on it, received faxes,
health.

Server-rendered HTML (jinja2, autoescaping on: subjects, names and file names come from mail
and are shown as text, never as markup). One small stylesheet and one small script, shipped in
the package; the script only refreshes the parts of a page marked `data-live` so the list and a
job's history update while the page is open. A Content-Security-Policy allows nothing but our
own files, so even a missed escape could not run a script.

The dashboard has its own listener (ADMIN_LISTEN), never the public one SignalWire reaches. It
reads jobs only through `queries` (over `gateway.outbound.actions` and the store's public methods)
and acts through `gateway.outbound.actions`, naming the administrator in the job's history.
Received faxes are read through `gateway.store.inbound.InboundStore` (also via `queries`).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jinja2
from aiohttp import web

from gateway.config import Settings
from gateway.documents.pool import CpuPool, call
from gateway.inbound.delivery import PermanentFailure, fetch_document
from gateway.jobs.outbound_states import RetryPolicy
from gateway.outbound import actions
from gateway.outbound.actions import AdminError, AlreadyResent
from gateway.runtime.logs import redact
from gateway.runtime.nodes import LIVE_S
from gateway.signalwire.client import SignalWireClient, SignalWireError
from gateway.store.base import StoreError
from gateway.store.inbound import InboundFax, InboundStore
from gateway.store.sql import SqlStore
from gateway.users import LoginThrottle, UsersFile
from gateway.web.dashboard import queries
from gateway.web.dashboard.auth import (
    LOGIN_COOKIE,
    NO_DASHBOARD_ROLE,
    SESSION_COOKIE,
    Logins,
    Proxy,
    Session,
    Sessions,
    password_tag,
    same_token,
)
from gateway.web.dashboard.filters import day_range, job_filters, received_filters, safe_next
from gateway.web.dashboard.formatting import ago, shown_number, when
from gateway.web.dashboard.thumbs import THUMB_WIDTH_PX

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
PAGE_SIZE = 25
MAX_FORM_BYTES = 16 * 1024
THUMB_CACHE_ENTRIES = 64
MEDIA_GONE_ENTRIES = 1000
RECENT_ERRORS = 20
ACTIONS = {
    "resend": ("Resend", "Send this document to the same number again, as a new job?"),
    "cancel": ("Cancel", "Stop this fax? Not yet sent: it is not sent, and the sender gets a "
                         "report saying so. At SignalWire: canceled only while still queued."),
    "report": ("Send the report again", "Send the report mail to the sender again?"),
}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
       "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
_JOB_ID = "{job_id:[0-9a-f]{6,16}}"
_FAX_SID = "{fax_sid:[A-Za-z0-9-]{1,64}}"

# The session of the request (aiohttp >= 3.12 wants typed keys for request storage).
SESSION: Any = (web.RequestKey("faxgw_session", Session) if hasattr(web, "RequestKey")
                else "faxgw_session")


class RecentErrors(logging.Handler):
    """The last warnings and errors of the gateway's loggers, redacted, for the health panel."""

    def __init__(self, size: int = RECENT_ERRORS) -> None:
        super().__init__(logging.WARNING)
        self.records: deque[tuple[float, str, str]] = deque(maxlen=size)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = redact(record.getMessage())[:500]
        except Exception:  # a bad format string must not break logging
            text = str(record.msg)[:500]
        self.records.append((record.created, record.levelname.lower(), text))


class Dashboard:
    """The dashboard application and its listener; `start()` / `stop()` like the others."""

    def __init__(self, settings: Settings, store: SqlStore, *, clock: Callable[[], float],
                 wake: Callable[[], None],
                 ready: Callable[[], Awaitable[dict[str, dict[str, object]]]],
                 cpu: CpuPool, signalwire: SignalWireClient, retry_policy: RetryPolicy,
                 users: UsersFile | None = None,
                 contact: Callable[[str], tuple[bool, float, str] | None] | None = None
                 ) -> None:
        self.s = settings
        # This node's last contact with a service by name ("relay": the last report mailed);
        # the health page says what this node saw, never another node's.
        self.contact = contact or (lambda name: None)
        self.store = store
        self.clock = clock
        self.wake = wake
        self.ready = ready
        self.cpu = cpu
        self.signalwire = signalwire
        self.retry_policy = retry_policy
        if users is None and settings.access.users_file is not None:
            users = UsersFile(settings.access.users_file)
        self.logins = Logins(users, LoginThrottle(
                                 settings.access.auth_max_failures,
                                 lockout_s=settings.access.auth_lockout_minutes * 60),
                             store, clock)
        self.sessions = Sessions(store, settings.admin.session_minutes * 60, clock)
        self.proxy = Proxy(settings.admin.trusted_proxies)
        self.errors = RecentErrors()
        self.inbound = InboundStore(store)
        self._thumbs: OrderedDict[str, bytes] = OrderedDict()
        self._thumb_tasks: dict[str, asyncio.Task[bytes]] = {}
        # Received faxes whose document SignalWire answered it no longer has (404/410).
        self._media_gone: OrderedDict[str, float] = OrderedDict()
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
            trim_blocks=True, lstrip_blocks=True)
        self.env.filters.update(when=when, number=shown_number, ago=ago)
        self.app = web.Application(client_max_size=MAX_FORM_BYTES,
                                   middlewares=[self._headers, self._guard])
        r = self.app.router
        r.add_static("/static", HERE / "static", show_index=False, append_version=False)
        r.add_get("/login", self.login_page)
        r.add_post("/login", self.login)
        r.add_post("/logout", self.logout)
        r.add_get("/", self.home)
        r.add_get("/jobs", self.jobs_page)
        r.add_get("/jobs/rows", self.jobs_rows)
        r.add_get(f"/jobs/{_JOB_ID}", self.job_page)
        r.add_get(f"/jobs/{_JOB_ID}/live", self.job_live)
        r.add_get(f"/jobs/{_JOB_ID}/actions", self.job_actions)
        r.add_get(f"/jobs/{_JOB_ID}/first-page.png", self.first_page)
        r.add_get(f"/jobs/{_JOB_ID}/fax.pdf", self.document)
        r.add_get(f"/jobs/{_JOB_ID}/{{action:resend|cancel|report}}", self.confirm_page)
        r.add_post(f"/jobs/{_JOB_ID}/{{action:resend|cancel|report}}", self.act)
        r.add_get("/received", self.received_page)
        r.add_get("/received/rows", self.received_rows)
        r.add_get(f"/received/{_FAX_SID}", self.received_fax_page)
        r.add_get(f"/received/{_FAX_SID}/live", self.received_fax_live)
        r.add_get(f"/received/{_FAX_SID}/first-page.png", self.received_first_page)
        r.add_get("/health", self.health_page)
        r.add_get("/health/live", self.health_live)
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self.port = 0

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        listen = self.s.admin.listen
        assert listen is not None
        logging.getLogger("gateway").addHandler(self.errors)
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False,
                                     shutdown_timeout=5)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, listen.host, listen.port)
        await self._site.start()
        self.port = int(self._runner.addresses[0][1])  # aiohttp's public view of the sockets
        if not self.logins.enabled:
            log.info("dashboard on %s:%d: no one can log in until USERS_FILE names an "
                     "administrator (faxgw passwd NAME --admin)", listen.host, self.port)
        else:
            log.info("dashboard on %s:%d", listen.host, self.port)

    async def stop(self) -> None:
        logging.getLogger("gateway").removeHandler(self.errors)
        for task in self._thumb_tasks.values():
            task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- middleware --------------------------------------------------------------------------

    @web.middleware
    async def _headers(self, request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            response = exc
            self._secure_headers(response)
            raise
        self._secure_headers(response, request.path.startswith("/static/"))
        return response

    @staticmethod
    def _secure_headers(response: web.StreamResponse, static: bool = False) -> None:
        h = response.headers
        if static and response.status == 200:
            h.setdefault("Cache-Control", "private, max-age=3600")  # no job data in there
        h.setdefault("Content-Security-Policy", CSP)
        h.setdefault("X-Content-Type-Options", "nosniff")
        h.setdefault("Referrer-Policy", "same-origin")
        h.setdefault("X-Frame-Options", "DENY")
        h.setdefault("Cache-Control", "no-store")

    @web.middleware
    async def _guard(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """No job data of any kind without a live session of a current administrator/viewer."""
        path = request.path
        if path == "/login" or path.startswith("/static/"):
            return await handler(request)
        # A page (not a part the script fetches, a picture or a PDF) shows the messages.
        page = (request.method == "GET" and request.headers.get("X-Requested-With") != "fetch"
                and not path.endswith((".png", ".pdf")))
        try:
            session = await self.sessions.get(request.cookies.get(SESSION_COOKIE), page=page)
            if session is not None:
                session = await self._still_valid(session)
        except Exception as exc:  # noqa: BLE001 - only the store's own errors are answered
            if not (isinstance(exc, StoreError) or self.store.is_db_error(exc)):
                raise
            log.warning("dashboard: sessions not readable: the database did not answer (%s)",
                        type(exc).__name__)
            raise web.HTTPServiceUnavailable(
                text="the database did not answer; try again in a moment") from None
        if session is None:
            if request.method != "GET":
                raise web.HTTPForbidden(text="not logged in: nothing was changed")
            if request.headers.get("X-Requested-With") == "fetch":
                raise web.HTTPUnauthorized(text="log in again")
            target = request.path_qs if request.path != "/" else "/jobs"
            raise web.HTTPSeeOther("/login?" + urlencode({"next": target}))
        request[SESSION] = session
        return await handler(request)

    async def _still_valid(self, session: Session) -> Session | None:
        """The session if its user is still in the users file with the same role and the
        same password; otherwise it ends (and so do the user's other stale ones)."""
        current = self.logins.current(session.user)
        if current is None:  # removed from the file, or the dashboard role taken away
            await self.sessions.drop_user(session.user)
            log.info("dashboard: sessions of %s ended: no longer a dashboard user", session.user)
            return None
        tag = password_tag(current)
        if current.role != session.role or tag != session.password_tag:
            # Role changed, or a new password: log in again (a session opened with the
            # new password stays).
            dropped = await self.sessions.drop_user(session.user, unless_tag=tag)
            if current.role != session.role:
                await self.sessions.drop(session)
            log.info("dashboard: %d session(s) of %s ended: its password or role changed",
                     dropped, session.user)
            return None
        return session

    # -- rendering ---------------------------------------------------------------------------

    def _render(self, request: web.Request, template: str, status: int = 200,
                **context: Any) -> web.Response:
        session = request.get(SESSION)
        flash: list[str] = []
        if session is not None and session.flash:
            flash, session.flash = session.flash, []
        html = self.env.get_template(template).render(
            session=session, flash=flash, sandbox=self.s.sandbox, **context)
        return web.Response(text=html, status=status, content_type="text/html", charset="utf-8")

    # -- login -------------------------------------------------------------------------------

    def _safe_next(self, target: str | None) -> str:
        return safe_next(target)

    async def login_page(self, request: web.Request, error: str | None = None,
                         status: int = 200) -> web.Response:
        token = request.cookies.get(LOGIN_COOKIE) or ""
        if not re.fullmatch(r"[A-Za-z0-9_-]{20,64}", token):
            import secrets

            token = secrets.token_urlsafe(24)
        response = self._render(request, "login.html", status=status, login_token=token,
                                error=error, enabled=self.logins.enabled,
                                next=self._safe_next(request.query.get("next")))
        response.set_cookie(LOGIN_COOKIE, token, httponly=True, samesite="Strict",
                            secure=self.proxy.is_https(request), path="/login", max_age=3600)
        return response

    async def _locked_page(self, request: web.Request, locked: float) -> web.Response:
        minutes = max(1, int(locked // 60) + (1 if locked % 60 else 0))
        return await self.login_page(
            request, f"Too many failed logins from your address. Try again in "
            f"{minutes} minute{'s' if minutes != 1 else ''}.", status=429)

    async def login(self, request: web.Request) -> web.Response:
        ip = self.proxy.client_ip(request)
        locked = await self.logins.locked_out_s(ip)
        if locked:
            return await self._locked_page(request, locked)
        form = await request.post()
        if not same_token(request.cookies.get(LOGIN_COOKIE, ""), form.get("login_token")):
            return await self.login_page(request, "The login form had expired; please try "
                                         "again.", status=403)
        name, password = form.get("name"), form.get("password")
        if not isinstance(name, str) or not isinstance(password, str) or not name:
            return await self.login_page(request, "Give your name and password.", status=400)
        result = await self.logins.login(ip, name.strip(), password)
        if result.busy:
            response = await self.login_page(
                request, "Too many logins at once. Try again in a minute.", status=503)
            response.headers["Retry-After"] = "60"
            return response
        user = result.user
        if user is not None and user.role is None:
            return await self.login_page(request, NO_DASHBOARD_ROLE, status=403)
        if user is None:
            if result.wrong:
                words = ("Wrong name or password. Too many failed logins: try again later."
                         if result.locked_s else "Wrong name or password.")
                return await self.login_page(request, words,
                                             status=429 if result.locked_s else 401)
            if result.locked_s:  # locked by other logins while this one waited or was checked
                return await self._locked_page(request, result.locked_s)
            return await self.login_page(request, "Wrong name or password.", status=401)
        session = await self.sessions.create(user)
        nxt = form.get("next")
        response = web.Response(status=303, headers={
            "Location": self._safe_next(nxt if isinstance(nxt, str) else None)})
        response.set_cookie(SESSION_COOKIE, session.token, httponly=True, samesite="Strict",
                            secure=self.proxy.is_https(request), path="/",
                            max_age=int(self.sessions.lifetime_s))
        response.del_cookie(LOGIN_COOKIE, path="/login")
        return response

    async def logout(self, request: web.Request) -> web.Response:
        session = request[SESSION]
        form = await request.post()
        if not same_token(session.csrf, form.get("csrf")):
            raise web.HTTPForbidden(text="the form token is missing or wrong: nothing changed")
        await self.sessions.drop(session)
        log.info("dashboard logout: %s", session.user)
        response = web.Response(status=303, headers={"Location": "/login"})
        response.del_cookie(SESSION_COOKIE, path="/")
        return response

    # -- jobs --------------------------------------------------------------------------------

    async def home(self, request: web.Request) -> web.Response:
        raise web.HTTPSeeOther("/jobs")

    async def _page(self, request: web.Request) -> dict[str, Any]:
        f = job_filters(request)
        error = None
        try:
            since, until = day_range(f.date_from, f.date_until)
            page = await self.store.read(lambda: queries.search_jobs(
                self.store, status=f.status or None, to=f.to or None, sender=f.sender or None,
                since=since, until=until, text=f.q or None, offset=(f.page - 1) * PAGE_SIZE,
                limit=PAGE_SIZE))
        except AdminError as exc:
            error, page = str(exc), queries.Page([], 0)
        pages = max(1, -(-page.total // PAGE_SIZE))
        return dict(filters=f, rows=page.rows, total=page.total,
                    pages=pages, error=error, statuses=actions.STATUS_FILTERS,
                    first=(f.page - 1) * PAGE_SIZE + 1,
                    last=(f.page - 1) * PAGE_SIZE + len(page.rows))

    async def jobs_page(self, request: web.Request) -> web.Response:
        context = await self._page(request)
        context["health"] = await self._health()
        return self._render(request, "jobs.html", **context)

    async def jobs_rows(self, request: web.Request) -> web.Response:
        return self._render(request, "_rows.html", **await self._page(request))

    async def _detail(self, request: web.Request) -> queries.JobDetail:
        ref = request.match_info["job_id"]
        try:
            return await self.store.read(queries.job_detail, self.store, ref)
        except AdminError as exc:
            raise web.HTTPNotFound(text=str(exc)) from None

    def _offers(self, d: queries.JobDetail) -> list[tuple[queries.Offer, str]]:
        return [(o, ACTIONS[o.key][0]) for o in queries.offers(
            d, self.clock(), self.retry_policy, self.s.shared)]

    async def job_page(self, request: web.Request) -> web.Response:
        d = await self._detail(request)
        return self._render(request, "job.html", d=d, offers=self._offers(d), now=self.clock())

    async def job_live(self, request: web.Request) -> web.Response:
        return self._render(request, "_job_live.html", d=await self._detail(request),
                            now=self.clock())

    async def job_actions(self, request: web.Request) -> web.Response:
        """The actions part of a job's page, refreshed with it: what is offered changes as
        the job moves on."""
        d = await self._detail(request)
        return self._render(request, "_job_actions.html", d=d, offers=self._offers(d))

    async def first_page(self, request: web.Request) -> web.Response:
        """The first page as a PNG, drawn by a document worker (never on the event loop) and
        cached per document; gone once the document is deleted (DOCUMENT_RETENTION_HOURS)."""
        found = await self.store.read(queries.document_of, self.store,
                                     request.match_info["job_id"])
        if found is None:
            raise web.HTTPNotFound(text="the document is no longer kept")
        message_id, path = found
        return await self._picture(message_id, f"message {message_id}", lambda: self.cpu.run(
            call, "gateway.web.dashboard.thumbs:render_first_page", path, THUMB_WIDTH_PX))

    async def _picture(self, key: str, what: str,
                       draw: Callable[[], Awaitable[bytes]]) -> web.Response:
        """A first-page PNG from the cache, or drawn once however many ask at the same time
        (one task per key, shielded from a viewer who goes away), then cached."""
        png = self._thumbs.get(key)
        if png is None:
            task = self._thumb_tasks.get(key)
            if task is None:
                task = asyncio.ensure_future(draw())
                self._thumb_tasks[key] = task
            try:
                png = await asyncio.shield(task)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # TaskLimitError, ConvertError, SignalWire down, ...
                log.warning("dashboard: first page of %s not drawn: %s", what,
                            redact(str(exc)))
                raise web.HTTPNotFound(text="the first page could not be drawn") from None
            finally:
                if task.done():
                    self._thumb_tasks.pop(key, None)
            self._thumbs[key] = png
            while len(self._thumbs) > THUMB_CACHE_ENTRIES:
                self._thumbs.popitem(last=False)
        else:
            self._thumbs.move_to_end(key)
        return web.Response(body=png, content_type="image/png",
                            headers={"Cache-Control": "private, max-age=300"})

    async def document(self, request: web.Request) -> web.StreamResponse:
        job_id = request.match_info["job_id"]
        found = await self.store.read(queries.document_of, self.store, job_id)
        if found is None:
            raise web.HTTPNotFound(text="the document is no longer kept")
        log.info("dashboard: %s opened the document of job %s", request[SESSION].user, job_id)
        return web.FileResponse(found[1], headers={
            "Content-Type": "application/pdf",
            "Content-Disposition": f'inline; filename="fax-{job_id}.pdf"'})

    # -- actions -----------------------------------------------------------------------------

    async def confirm_page(self, request: web.Request) -> web.Response:
        d = await self._detail(request)
        action = request.match_info["action"]
        label, question = ACTIONS[action]
        offer = next(o for o, _ in self._offers(d) if o.key == action)
        return self._render(request, "confirm.html", d=d, action=action, label=label,
                            question=question, offer=offer)

    async def act(self, request: web.Request) -> web.Response:
        session: Session = request[SESSION]
        form = await request.post()
        if not same_token(session.csrf, form.get("csrf")):
            log.warning("dashboard: %s posted %s without a valid form token: refused",
                        session.user, request.path)
            raise web.HTTPForbidden(text="the form token is missing or wrong: nothing changed")
        if not session.admin:
            raise web.HTTPForbidden(text="read-only access: nothing changed")
        ref = request.match_info["job_id"]
        action = request.match_info["action"]
        now, by = self.clock(), session.user
        target = f"/jobs/{ref}"
        try:
            if action == "resend":
                try:
                    new = await self.store.run(lambda: actions.resend_job(
                        self.store, ref, now, from_number=self.s.fax.from_number,
                        retry_policy=self.retry_policy, by=by, shared=self.s.shared))
                except AlreadyResent as exc:  # a double click: show the job that was made
                    await self.sessions.flash(session, f"Not done: job {ref} is already being "
                                              f"resent, as this job, {exc.job_id}.")
                    log.info("dashboard: %s resend job %s refused: already being resent as "
                             "%s", by, ref, exc.job_id)
                    raise web.HTTPSeeOther(f"/jobs/{exc.job_id}") from None
                text = f"Job {ref} is being sent again as this job, {new}."
                target = f"/jobs/{new}"
            elif action == "cancel":
                req = await self.store.run(lambda: actions.request_cancel(
                    self.store, ref, now, by=by))
                text = req.text
                if req.fax_sid is not None:
                    await actions.cancel_fax(self.signalwire, req.fax_sid)
                    await self.store.run(lambda: actions.note_cancel(
                        self.store, req.job_id, self.clock(), req.fax_sid or "", by=by))
                    text = f"Fax {req.fax_sid} canceled at SignalWire."
            else:
                text = await self.store.run(lambda: actions.request_report(
                    self.store, ref, now, by=by))
        except AdminError as exc:
            await self.sessions.flash(session, f"Not done: {exc}")
            log.info("dashboard: %s %s job %s refused: %s", by, action, ref, exc)
        else:
            await self.sessions.flash(session, text)
            log.info("dashboard: %s did %s on job %s", by, action, ref)
            self.wake()
        raise web.HTTPSeeOther(target)

    # -- received faxes ----------------------------------------------------------------------

    async def _received(self, request: web.Request) -> dict[str, Any]:
        f = received_filters(request)
        error = None
        try:
            since, until = day_range(f.date_from, f.date_until)
            page = await self.store.read(lambda: queries.search_received(
                self.inbound, to=f.to or None, caller=f.caller or None, since=since,
                until=until, offset=(f.page - 1) * PAGE_SIZE, limit=PAGE_SIZE))
        except AdminError as exc:
            error, page = str(exc), queries.ReceivedPage([], 0)
        pages = max(1, -(-page.total // PAGE_SIZE))
        return dict(filters=f, rows=page.rows, total=page.total, pages=pages, error=error,
                    first=(f.page - 1) * PAGE_SIZE + 1,
                    last=(f.page - 1) * PAGE_SIZE + len(page.rows),
                    inbound_on=self.s.inbound.routes.enabled)

    async def received_page(self, request: web.Request) -> web.Response:
        return self._render(request, "received.html", **await self._received(request))

    async def received_rows(self, request: web.Request) -> web.Response:
        return self._render(request, "_received_rows.html", **await self._received(request))

    async def _received_detail(self, request: web.Request) -> queries.ReceivedDetail:
        sid = request.match_info["fax_sid"]
        d = await self.store.read(queries.received_detail, self.inbound, sid)
        if d is None:
            raise web.HTTPNotFound(text="no received fax with this id")
        if d.picture and sid in self._media_gone:
            d = queries.document_gone(d)
        return d

    async def received_fax_page(self, request: web.Request) -> web.Response:
        return self._render(request, "received_fax.html", d=await self._received_detail(request))

    async def received_fax_live(self, request: web.Request) -> web.Response:
        return self._render(request, "_received_live.html",
                            d=await self._received_detail(request))

    async def received_first_page(self, request: web.Request) -> web.Response:
        """Page 1 of a received fax, drawn from SignalWire's copy (the gateway keeps none)
        while SignalWire still has it; fetched the deliverer's way, drawn in a document
        worker, cached like a job's picture."""
        d = await self._received_detail(request)
        fax = d.row.fax
        if not d.picture:
            raise web.HTTPNotFound(text=d.no_picture)
        return await self._picture("in:" + fax.fax_sid, f"received fax {fax.fax_sid}",
                                   lambda: self._draw_received(fax))

    async def _draw_received(self, fax: InboundFax) -> bytes:
        try:
            pdf = await fetch_document(self.signalwire, self.cpu, self.s, fax)
        except (PermanentFailure, SignalWireError) as exc:
            if isinstance(exc, SignalWireError) and exc.status in (404, 410):
                # Deleted at SignalWire (by hand, or by its retention): the page says so
                # from now on instead of offering a picture that cannot come.
                self._media_gone[fax.fax_sid] = self.clock()
                while len(self._media_gone) > MEDIA_GONE_ENTRIES:
                    self._media_gone.popitem(last=False)
            raise RuntimeError(f"document not fetched: {exc}") from None
        return await self.cpu.run(call, "gateway.web.dashboard.thumbs:render_first_page_of",
                                  pdf, THUMB_WIDTH_PX)

    # -- health ------------------------------------------------------------------------------

    async def _health(self) -> dict[str, Any]:
        checks = await self.ready()
        names = {"store": "Database", "listeners": "Listeners",
                 "media": "Media store (S3)" if self.s.media.store == "s3"
                 else "Media store (local)", "signalwire": "SignalWire"}
        items = [(names.get(n, n), bool(c["ok"]), str(c["detail"])) for n, c in checks.items()]
        now = self.clock()
        relay = self.contact("relay")
        if relay is not None:
            relay_ok: bool | None = relay[0]
            relay_words = f"{relay[2]} ({ago(now - relay[1])} ago)"
        elif self.s.shared:  # the store's newest reports may be any node's
            relay_ok, relay_words = None, "no report sent by this node yet"
        else:
            relay_ok, relay_words = await self.store.read(queries.relay_state, self.store)
        relay_name = (f"Report relay ({self.s.notify.host})" if self.s.notify.host
                      else f"Reports (outbox folder {self.s.queue.data_dir / 'outbox'})")
        items.append((relay_name, relay_ok is not False, relay_words))
        depth, counts, oldest = await self.store.read(queries.queue_depth, self.store)
        nodes = await self.store.read(self.store.live_nodes, now - LIVE_S)
        return dict(items=items, all_ok=all(ok for _, ok, _ in items), depth=depth,
                    counts=counts, oldest_age=None if oldest is None else now - oldest,
                    errors=list(reversed(self.errors.records)), nodes=nodes,
                    node_id=self.s.cluster.node_id, now=now)

    async def health_page(self, request: web.Request) -> web.Response:
        return self._render(request, "health.html", health=await self._health())

    async def health_live(self, request: web.Request) -> web.Response:
        return self._render(request, "_health.html", health=await self._health(),
                            full=request.query.get("brief") != "1")

