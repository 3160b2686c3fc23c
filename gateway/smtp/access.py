"""Who may send, to which numbers, and how many: the decisions behind the SMTP replies.

A client may send when it logged in (SMTP AUTH), connects from a trusted network, or uses an
allowed sender address (checked on the envelope and again on the From: header). Everyone else
is refused at MAIL time and gets no report mail (no backscatter). Destinations go through the
destination policy (premium-rate and unwanted international numbers) and the rate limits.
Each check returns None when allowed, or the exact SMTP reply.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass
from email.utils import parseaddr
from typing import TYPE_CHECKING, Callable

from gateway.config import Settings
from gateway.users import (LoginThrottle, User, UsersFile, UsersFileError, authenticate,
                           client_key)
from gateway.smtp.policy import (DestinationPolicy, RateLimiter, SenderPolicy, TrustedNetworks,
                     try_acquire_all)

log = logging.getLogger(__name__)

# scrypt costs ~160 ms of CPU: a few at a time, off the loop, so a login flood cannot starve it.
MAX_CONCURRENT_LOGINS = 2


@dataclass(frozen=True)
class Client:
    """What we know of the sender of one SMTP transaction."""

    ip: str
    user: User | None
    trusted: bool
    envelope_from: str

    @property
    def authorised(self) -> bool:
        return self.user is not None or self.trusted

    @property
    def rate_key(self) -> str:
        if self.user is not None:
            return f"user:{self.user.name}"
        return f"sender:{self.envelope_from.lower()}" if self.envelope_from else f"ip:{self.ip}"


if TYPE_CHECKING:
    from gateway.store.base import Store

# Shared across nodes (DATABASE_URL): hit kinds in the store's `hits` table.
_AUTH_FAIL, _AUTH_LOCK, _RATE_TOTAL, _RATE_SENDER = "auth-fail", "auth-lock", "rate-all", "rate"


class Access:
    def __init__(self, settings: Settings, clock: Callable[[], float] = time.monotonic, *,
                 store: "Store | None" = None) -> None:
        self.s = settings
        self.clock = clock
        # Several gateways (DATABASE_URL): rate limits and login lockouts are counted in the
        # shared database, on wall-clock time, so a sender cannot get N times the limit by
        # spreading over N nodes. None: in this process's memory, as for a single gateway.
        self.store = store
        self.wall_clock: Callable[[], float] = time.time
        self.trusted = TrustedNetworks(settings.trusted_networks)
        self.senders = SenderPolicy(settings.allowed_senders)
        self.destinations = DestinationPolicy(
            settings.default_region, settings.fax_allow_prefixes, settings.fax_block_prefixes,
            settings.fax_allow_international)
        self.users = UsersFile(settings.users_file) if settings.users_file else None
        self.throttle = LoginThrottle(settings.auth_max_failures,
                                      lockout_s=settings.auth_lockout_minutes * 60)
        self.per_sender = RateLimiter(settings.rate_per_sender_hour, 3600)
        self.total = RateLimiter(settings.rate_total_hour, 3600)
        self._logins = asyncio.Semaphore(MAX_CONCURRENT_LOGINS)
        self.refused_strangers = 0

    @property
    def auth_enabled(self) -> bool:
        return self.users is not None

    def reload(self) -> None:
        """SIGHUP: re-read the users file (a broken file keeps the previous users)."""
        if self.users is None:
            return
        try:
            if self.users.reload_if_changed():
                log.info("users file reloaded: %d user(s)", len(self.users.users))
        except UsersFileError as exc:
            log.error("users file not reloaded, keeping the previous users: %s", exc)

    # -- AUTH --------------------------------------------------------------------------------

    def locked_out_s(self, ip: str) -> float:
        return self.throttle.check(ip, self.clock())

    async def locked_out(self, ip: str) -> float:
        """Seconds `ip` stays locked out of AUTH, across every node when the store is shared."""
        if self.store is None:
            return self.locked_out_s(ip)
        last = await self.store.run(self.store.last_hit, _AUTH_LOCK, client_key(ip))
        if last is None:
            return 0.0
        return max(0.0, last + self.throttle.lockout_s - self.wall_clock())

    async def _failed_login(self, ip: str) -> float:
        if self.store is None:
            return self.throttle.failure(ip, self.clock())
        key, now = client_key(ip), self.wall_clock()
        failures = await self.store.run(self.store.add_hit, _AUTH_FAIL, key, now,
                                        now - self.throttle.window_s)
        if failures < self.throttle.max_failures:
            return 0.0
        await self.store.run(self.store.add_hit, _AUTH_LOCK, key, now,
                             now - self.throttle.lockout_s)
        await self.store.run(self.store.clear_hits, _AUTH_FAIL, key)
        return self.throttle.lockout_s

    async def login(self, ip: str, username: str, password: str) -> User | None:
        if self.users is None:
            return None
        self.reload()
        async with self._logins:
            user = await asyncio.to_thread(authenticate, self.users.users, username, password)
        if user is None:
            locked = await self._failed_login(ip)
            log.warning("AUTH failed for user %r from %s%s", username[:64], ip,
                        f"; locked out for {locked:.0f} s" if locked else "")
            return None
        self.throttle.success(ip)
        if self.store is not None:
            await self.store.run(self.store.clear_hits, _AUTH_FAIL, client_key(ip))
        log.info("AUTH ok: user %s from %s", user.name, ip)
        return user

    # -- MAIL, RCPT, DATA --------------------------------------------------------------------

    def client(self, ip: str, user: User | None, envelope_from: str) -> Client:
        return Client(ip=ip, user=user, trusted=self.trusted.contains(ip),
                      envelope_from=envelope_from)

    def check_mail(self, client: Client) -> str | None:
        if client.user is not None:
            if client.user.senders and not client.user.allows_sender(client.envelope_from):
                return (f"550 5.7.1 User {client.user.name} may not send as "
                        f"<{client.envelope_from}>")
            return None
        if client.trusted or (client.envelope_from and self.senders.allows(client.envelope_from)):
            return None
        self.refused_strangers += 1
        log.warning("refused sender <%s> from %s: not authenticated, not trusted, not allowed",
                    client.envelope_from[:200], client.ip)
        if self.auth_enabled:
            return ("530 5.7.0 Authentication required: log in with your fax gateway account "
                    "to send faxes")
        return (f"550 5.7.1 Sender <{client.envelope_from[:200]}> is not allowed to send faxes "
                "through this gateway")

    def check_destination(self, client: Client, number: str) -> str | None:
        reason = self.destinations.check(number)
        if reason:
            log.warning("destination %s refused for %s: %s", number, client.rate_key, reason)
            return f"550 5.7.1 {reason}"
        wait = try_acquire_all([(self.total, "all"), (self.per_sender, client.rate_key)], 1,
                               self.clock())
        return self._rate_refusal(client, wait)

    async def check_destination_async(self, client: Client, number: str) -> str | None:
        """`check_destination`, with the rate limits counted across nodes when shared."""
        if self.store is None:
            return self.check_destination(client, number)
        reason = self.destinations.check(number)
        if reason:
            log.warning("destination %s refused for %s: %s", number, client.rate_key, reason)
            return f"550 5.7.1 {reason}"
        wait = await self.store.run(
            self.store.take_hits, [(_RATE_TOTAL, "all", self.s.rate_total_hour),
                                   (_RATE_SENDER, client.rate_key, self.s.rate_per_sender_hour)],
            self.wall_clock(), 3600.0)
        return self._rate_refusal(client, wait)

    def _rate_refusal(self, client: Client, wait: float) -> str | None:
        if wait:
            if math.isinf(wait):
                return "550 5.7.1 Rate limit: this sender may not send faxes"
            log.warning("rate limit hit by %s", client.rate_key)
            return (f"450 4.7.1 Rate limit reached (at most {self.s.rate_per_sender_hour} faxes "
                    f"an hour per sender, {self.s.rate_total_hour} in all); try again in "
                    f"{max(1, math.ceil(wait / 60))} minute(s)")
        return None

    def check_header_from(self, client: Client, header_from: str | None) -> str | None:
        """The From: header must be allowed too, unless the client logged in or is trusted
        (then it is only checked against a user's own sender list)."""
        _, addr = parseaddr(header_from or "")
        if client.user is not None:
            if client.user.senders and addr and not client.user.allows_sender(addr):
                return f"550 5.7.1 User {client.user.name} may not send as <{addr[:200]}>"
            return None
        if client.trusted or not addr or self.senders.allows(addr):
            return None
        log.warning("refused From: <%s> from %s (envelope <%s>)", addr[:200], client.ip,
                    client.envelope_from[:200])
        return f"550 5.7.1 Sender <{addr[:200]}> is not allowed to send faxes through this gateway"
