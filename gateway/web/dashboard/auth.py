"""Who is at the dashboard: logins against USERS_FILE, sessions, form tokens, the proxy's word.

Sessions and login lockouts live in the job store (gateway/store/sessions.py), so every node of
a shared store knows them (a load balancer may send each request to another node) and a restart
logs no one out. The cookie carries a random token and nothing else; the store keeps only its
SHA-256. It is HttpOnly and SameSite=Strict, Secure when the request came over HTTPS, and it
expires. A session ends at its expiry, at logout, when its user leaves the users file or loses
the role, and when the user's password changes (`faxgw passwd`). Every form that changes
something carries the session's own token (derived from the cookie's, never stored), compared
in constant time, so a page on another site cannot make an administrator's browser act.

A reverse proxy is believed about the scheme (X-Forwarded-Proto) and the client address
(X-Forwarded-For) only when the connection comes from ADMIN_TRUSTED_PROXIES; anyone else could
write those headers themselves.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from aiohttp import web

from gateway.rules.policy import TrustedNetworks
from gateway.store.interfaces import Calls
from gateway.store.sessions import SessionStore
from gateway.users import ROLES, LoginThrottle, User, UsersFile, authenticate, client_key

log = logging.getLogger(__name__)

SESSION_COOKIE = "faxgw_session"
LOGIN_COOKIE = "faxgw_login"   # double-submit token of the login form (no session yet)
MAX_SESSIONS_PER_USER = 50     # bounded table; a user's oldest session goes first
MAX_CONCURRENT_LOGINS = 2      # scrypt is ~100 ms of CPU: a few at a time, in threads
MAX_QUEUED_LOGINS = 8          # logins being checked or waiting on this node; more: 503
MAX_FIELD_CHARS = 1024
_TOKEN = re.compile(r"[A-Za-z0-9_-]{43}")  # secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    """How the store knows a session: the SHA-256 of its cookie's token."""
    return hashlib.sha256(token.encode()).hexdigest()


def csrf_token(token: str) -> str:
    """The session's form token: derived from the cookie's token, so it is bound to the
    session and stored nowhere (a page shows it; the cookie cannot be worked back from it)."""
    return hmac.new(token.encode(), b"faxgw form token", hashlib.sha256).hexdigest()


def password_tag(user: User) -> str:
    """Which password a session was opened with: a new hash (`faxgw passwd`) ends it."""
    return hashlib.sha256(user.password_hash.encode()).hexdigest()[:32]


@dataclass
class Session:
    token: str
    user: str
    role: str
    csrf: str
    created: float
    expires: float
    password_tag: str = ""
    flash: list[str] = field(default_factory=list)   # this page's messages, taken from the store

    @property
    def admin(self) -> bool:
        return self.role == "admin"

    @property
    def key(self) -> str:
        return token_hash(self.token)


class Sessions:
    """Sessions in the job store, by the hash of their cookie token; expired ones are not
    found (and are deleted when the next session is made)."""

    def __init__(self, store: Calls, lifetime_s: float,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.db = SessionStore(store)
        self.lifetime_s = lifetime_s
        self.clock = clock

    async def create(self, user: User) -> Session:
        assert user.role is not None
        now = self.clock()
        token = secrets.token_urlsafe(32)
        session = Session(token=token, user=user.name, role=user.role, csrf=csrf_token(token),
                          created=now, expires=now + self.lifetime_s,
                          password_tag=password_tag(user))
        await self.store.run(self.db.create, session.key, user.name, user.role,
                             session.password_tag, now, session.expires, MAX_SESSIONS_PER_USER)
        return session

    async def get(self, token: str | None, *, page: bool = False) -> Session | None:
        """The live session of this cookie token; `page`: a page is being shown, so the
        session's messages are taken from the store for it."""
        if not token or not _TOKEN.fullmatch(token):
            return None
        row = await self.store.run(self.db.get, token_hash(token), self.clock())
        if row is None:
            return None
        session = Session(token=token, user=row.user_name, role=row.role,
                          csrf=csrf_token(token), created=row.created_at,
                          expires=row.expires_at, password_tag=row.password_tag)
        if page and row.has_flash:
            session.flash = await self.store.run(self.db.take_flash, session.key)
        return session

    async def flash(self, session: Session, text: str) -> None:
        """A message for the session's next page, on whichever node serves it."""
        await self.store.run(self.db.add_flash, session.key, text, self.clock())

    async def drop(self, session: Session) -> None:
        await self.store.run(self.db.drop, session.key)

    async def drop_user(self, user: str, *, unless_tag: str | None = None) -> int:
        return await self.store.run(lambda: self.db.drop_user(user, unless_tag=unless_tag))


def same_token(expected: str, given: object) -> bool:
    """Constant-time comparison of a form token; anything but a non-empty string fails."""
    if not isinstance(given, str) or not given or len(given) > 200:
        return False
    return hmac.compare_digest(expected.encode(), given.encode())


class Proxy:
    """What a request says about itself, believing forwarded headers only from our proxies."""

    def __init__(self, trusted: tuple[str, ...]) -> None:
        self.trusted = TrustedNetworks(trusted)

    def _from_proxy(self, request: web.Request) -> bool:
        return bool(request.remote) and self.trusted.contains(request.remote or "")

    def client_ip(self, request: web.Request) -> str:
        """The address a lockout is counted against: the proxy's last X-Forwarded-For entry
        (the one it appended itself) when the request came through a trusted proxy."""
        remote = request.remote or "unknown"
        forwarded = request.headers.get("X-Forwarded-For")
        if forwarded and self._from_proxy(request):
            last = forwarded.split(",")[-1].strip()
            if last:
                return last[:64]
        return remote

    def is_https(self, request: web.Request) -> bool:
        if request.secure:
            return True
        proto = request.headers.get("X-Forwarded-Proto")
        if proto and self._from_proxy(request):
            return proto.split(",")[-1].strip().lower() == "https"
        return False


NO_DASHBOARD_ROLE = ("Your name and password are right, but this user may only send faxes by "
                     "mail, not use the dashboard. An administrator can allow it with "
                     "faxgw passwd NAME --viewer (or --admin).")


@dataclass(frozen=True)
class LoginResult:
    """What a login came to: `user` in; else `wrong` (the name or password was checked and is
    wrong), `locked_s` > 0 (the address is locked out now: by this failure, or by others
    while this login waited or was checked), `busy` (too many logins at once on this node)."""

    user: User | None = None
    wrong: bool = False
    locked_s: float = 0.0
    busy: bool = False


class Logins:
    """Password checks for the dashboard: USERS_FILE users with role=admin or role=viewer,
    with the same lockout rules (AUTH_MAX_FAILURES, AUTH_LOCKOUT_MINUTES) as SMTP AUTH,
    counted in the job store so every node (and a restarted one) sees them.

    At most MAX_CONCURRENT_LOGINS passwords are checked at a time, and at most
    MAX_QUEUED_LOGINS logins wait for that on a node: more are refused at once, so a flood
    costs neither CPU nor memory. A login that waited looks at the lockout again before its
    password is checked, and once more after: one whose address was locked meanwhile (by
    another login of the flood, on any node) is refused even with the right password."""

    def __init__(self, users: UsersFile | None, throttle: LoginThrottle, store: Calls,
                 clock: Callable[[], float] = time.time) -> None:
        self.users = users
        self.throttle = throttle
        self.store = store
        self.db = SessionStore(store)
        self.clock = clock
        self._slots = asyncio.Semaphore(MAX_CONCURRENT_LOGINS)
        self._queued = 0

    @property
    def enabled(self) -> bool:
        return self.users is not None

    def reload(self) -> None:
        if self.users is not None:
            self.users.refresh("dashboard")

    def current(self, name: str) -> User | None:
        """The user behind a session as the users file says now: a removed user, or one whose
        role was taken away, is out at the next request."""
        if self.users is None:
            return None
        self.reload()
        user = self.users.users.get(name)
        return user if user is not None and user.role in ROLES else None

    async def locked_out_s(self, ip: str) -> float:
        """Seconds this address stays locked out, across every node; 0.0 when it may try."""
        now = self.clock()
        until = await self.store.run(self.db.locked_until, client_key(ip), now,
                                     self.throttle.lockout_s)
        return 0.0 if until is None else max(until - now, 1e-3)

    async def login(self, ip: str, name: str, password: str) -> LoginResult:
        """The user if the name, password and role are right. A user without a dashboard role
        whose password is right comes back with its role None, to be told so
        (NO_DASHBOARD_ROLE): only someone who knows the password learns it; a wrong password
        counts towards the lockout."""
        if self.users is None:
            return LoginResult()
        if self._queued >= MAX_QUEUED_LOGINS:
            log.warning("dashboard login of %r from %s refused: %d logins already waiting",
                        name[:64], ip, self._queued)
            return LoginResult(busy=True)
        self._queued += 1
        try:
            async with self._slots:
                return await self._check(ip, name, password)
        finally:
            self._queued -= 1

    async def _check(self, ip: str, name: str, password: str) -> LoginResult:
        locked = await self.locked_out_s(ip)  # locked while this one waited its turn
        if locked:
            return LoginResult(locked_s=locked)
        self.reload()
        assert self.users is not None
        user = await asyncio.to_thread(authenticate, self.users.users, name[:MAX_FIELD_CHARS],
                                       password[:MAX_FIELD_CHARS])
        key = client_key(ip)
        if user is not None and user.role not in ROLES:
            log.warning("dashboard login refused for user %r from %s: no dashboard role",
                        user.name, ip)
            return LoginResult(user=replace(user, role=None))
        if user is None:
            started = await self.store.run(self.db.failed, key, self.clock(),
                                           self.throttle.window_s, self.throttle.max_failures)
            log.warning("dashboard login failed for user %r from %s%s", name[:64], ip,
                        f"; locked out for {self.throttle.lockout_s:.0f} s" if started else "")
            locked = self.throttle.lockout_s if started else await self.locked_out_s(ip)
            return LoginResult(wrong=True, locked_s=locked)
        locked = await self.locked_out_s(ip)  # locked during the check, on any node
        if locked:
            log.warning("dashboard login of %s from %s refused: the address was locked out "
                        "while the password was checked", user.name, ip)
            return LoginResult(locked_s=locked)
        await self.store.run(self.db.succeeded, key)
        log.info("dashboard login: %s (%s) from %s", user.name, user.role, ip)
        return LoginResult(user=user)
