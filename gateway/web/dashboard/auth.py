"""Who is at the dashboard: logins against USERS_FILE, sessions, form tokens, the proxy's word.

Sessions live in memory only (a restart logs everyone out, which is acceptable for a handful of
administrators and leaves nothing on disk to steal). The cookie carries a random token and
nothing else; it is HttpOnly and SameSite=Strict, Secure when the request came over HTTPS, and
it expires. Every form that changes something carries the session's own token, compared in
constant time, so a page on another site cannot make an administrator's browser act.

A reverse proxy is believed about the scheme (X-Forwarded-Proto) and the client address
(X-Forwarded-For) only when the connection comes from ADMIN_TRUSTED_PROXIES; anyone else could
write those headers themselves.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Callable

from aiohttp import web

from gateway.smtp.policy import TrustedNetworks
from gateway.users import LoginThrottle, ROLES, User, UsersFile, authenticate

log = logging.getLogger(__name__)

SESSION_COOKIE = "faxgw_session"
LOGIN_COOKIE = "faxgw_login"   # double-submit token of the login form (no session yet)
MAX_SESSIONS = 1000            # bounded memory; the oldest session goes first
MAX_CONCURRENT_LOGINS = 2      # scrypt is ~100 ms of CPU: a few at a time, in threads
MAX_FIELD_CHARS = 1024


@dataclass
class Session:
    token: str
    user: str
    role: str
    csrf: str
    created: float
    expires: float
    flash: list[str] = field(default_factory=list)

    @property
    def admin(self) -> bool:
        return self.role == "admin"


class Sessions:
    """Live sessions by cookie token; expired ones are forgotten when seen."""

    def __init__(self, lifetime_s: float, clock: Callable[[], float] = time.time) -> None:
        self.lifetime_s = lifetime_s
        self.clock = clock
        self._by_token: OrderedDict[str, Session] = OrderedDict()

    def __len__(self) -> int:
        return len(self._by_token)

    def create(self, user: str, role: str) -> Session:
        now = self.clock()
        session = Session(token=secrets.token_urlsafe(32), user=user, role=role,
                          csrf=secrets.token_urlsafe(32), created=now,
                          expires=now + self.lifetime_s)
        self._by_token[session.token] = session
        while len(self._by_token) > MAX_SESSIONS:
            self._by_token.popitem(last=False)
        return session

    def get(self, token: str | None) -> Session | None:
        if not token or len(token) > 100:
            return None
        session = self._by_token.get(token)
        if session is None:
            return None
        if session.expires <= self.clock():
            del self._by_token[token]
            return None
        return session

    def drop(self, token: str) -> None:
        self._by_token.pop(token, None)

    def drop_user(self, user: str) -> None:
        for token in [t for t, s in self._by_token.items() if s.user == user]:
            del self._by_token[token]


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


class Logins:
    """Password checks for the dashboard: USERS_FILE users with role=admin or role=viewer,
    with the same lockout rules (AUTH_MAX_FAILURES, AUTH_LOCKOUT_MINUTES) as SMTP AUTH."""

    def __init__(self, users: UsersFile | None, throttle: LoginThrottle,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.users = users
        self.throttle = throttle
        self.monotonic = monotonic
        self._slots = asyncio.Semaphore(MAX_CONCURRENT_LOGINS)

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

    def locked_out_s(self, ip: str) -> float:
        return self.throttle.check(ip, self.monotonic())

    async def login(self, ip: str, name: str, password: str) -> User | None:
        """The user if the name and password are right, else None (counted towards the
        lockout). A user without a dashboard role comes back with its role None, to be told
        so (NO_DASHBOARD_ROLE): only someone who knows the password learns it."""
        if self.users is None:
            return None
        self.reload()
        async with self._slots:
            user = await asyncio.to_thread(authenticate, self.users.users,
                                           name[:MAX_FIELD_CHARS], password[:MAX_FIELD_CHARS])
        if user is not None and user.role not in ROLES:
            log.warning("dashboard login refused for user %r from %s: no dashboard role",
                        user.name, ip)
            return replace(user, role=None)
        if user is None:
            locked = self.throttle.failure(ip, self.monotonic())
            log.warning("dashboard login failed for user %r from %s%s", name[:64], ip,
                        f"; locked out for {locked:.0f} s" if locked else "")
            return None
        self.throttle.success(ip)
        log.info("dashboard login: %s (%s) from %s", user.name, user.role, ip)
        return user
