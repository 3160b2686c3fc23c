"""Who may send, to which numbers, and how many: the decisions behind the SMTP replies.

A client may send when it logged in (SMTP AUTH), connects from a trusted network, or uses an
allowed sender address (checked on the envelope and again on the From: header). Everyone else
is refused at MAIL time and gets no report mail (no backscatter). Destinations go through the
destination policy (premium-rate and unwanted international numbers) and the rate limits.
Each check returns None when allowed, or the refusal as a `Reply`.

Rate limits charge faxes actually accepted: RCPT only looks (so recipients named and then
dropped with RSET, QUIT or a refused DATA cost nothing), DATA reserves the faxes of the message
and gives them back if the message is refused. What RCPT churn costs the gateway is bounded
separately, per sender (the user, else the envelope sender from its address), so one sender
trying thousands of recipients locks out only itself, not the others behind the same NAT or
relay; a looser bound per address catches a client that makes up sender after sender.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import parseaddr
from typing import TYPE_CHECKING, Any, TypeVar

from gateway.config import Settings
from gateway.constants import RCPT_CHURN_PER_IP_HOUR, RCPT_CHURN_PER_SENDER_HOUR
from gateway.rules.policy import (
    DestinationPolicy,
    RateLimiter,
    SenderPolicy,
    TrustedNetworks,
    try_acquire_all,
)
from gateway.sanitise import one_line
from gateway.smtp import replies
from gateway.smtp.replies import Reply
from gateway.store.base import StoreError
from gateway.users import LoginThrottle, User, UsersFile, authenticate, client_key

# A From: header's (name, address), as email.utils.parseaddr reads it: pure, and the same few
# senders write most mail; intake reads each mail's From: twice (here, and for the report's
# address), ~10 us each (in a loop; several times that on the daemon's busy event loop).
header_address = functools.lru_cache(maxsize=256)(parseaddr)

log = logging.getLogger(__name__)

T = TypeVar("T")

# scrypt costs ~160 ms of CPU: a few at a time, off the loop, so a login flood cannot starve it.
MAX_CONCURRENT_LOGINS = 2


@dataclass(frozen=True)
class Client:
    """What we know of the sender of one SMTP transaction."""

    ip: str
    user: User | None
    trusted: bool
    envelope_from: str
    auth_results: str | None = None  # SENDER_VERIFY: how the sender was proven, kept on the job

    @property
    def rate_key(self) -> str:
        if self.user is not None:
            return f"user:{self.user.name}"
        return f"sender:{self.envelope_from.lower()}" if self.envelope_from else f"ip:{self.ip}"

    @property
    def churn_key(self) -> str:
        """Whose RCPT churn this is: the user, else the envelope sender at this address (a
        sender name alone is anyone's to write)."""
        if self.user is not None:
            return f"user:{self.user.name}"
        return f"sender:{self.envelope_from.lower()} ip:{self.ip}"

    @property
    def churn_who(self) -> str:
        if self.user is not None:
            return f"by user {one_line(self.user.name, 100)}"
        return f"by <{one_line(self.envelope_from, 100)}> from {self.ip}"


if TYPE_CHECKING:
    from gateway.store.interfaces import Leases

# Shared across nodes (DATABASE_URL): hit kinds in the store's `hits` table.
_AUTH_FAIL, _AUTH_LOCK, _RATE_TOTAL, _RATE_SENDER = "auth-fail", "auth-lock", "rate-all", "rate"
# RCPT on a shared store: counts read from the database are trusted this long (seconds), but
# only while a limit has a tenth of itself to spare beyond what is asked; nearer to it every
# RCPT reads. DATA's charge, in the database, always decides.
RCPT_COUNTS_S = 1.0
_COUNTS_KEPT = 4096  # (kind, key) counts kept at most (senders are the client's to choose)


class Access:
    def __init__(self, settings: Settings, clock: Callable[[], float] = time.monotonic, *,
                 store: Leases | None = None) -> None:
        self.s = settings
        self.clock = clock
        # Several gateways (DATABASE_URL): rate limits and login lockouts are counted in the
        # shared database, on wall-clock time, so a sender cannot get N times the limit by
        # spreading over N nodes. None: in this process's memory, as for a single gateway.
        self.store = store
        self.wall_clock: Callable[[], float] = time.time
        self.trusted = TrustedNetworks(settings.access.trusted_networks)
        self.senders = SenderPolicy(settings.access.allowed_senders)
        self.destinations = DestinationPolicy(
            settings.fax.default_region, settings.destinations.allow_prefixes,
            settings.destinations.block_prefixes, settings.destinations.allow_international)
        self.users = UsersFile(settings.access.users_file) if settings.access.users_file else None
        self.throttle = LoginThrottle(settings.access.auth_max_failures,
                                      lockout_s=settings.access.auth_lockout_minutes * 60)
        self.per_sender = RateLimiter(settings.destinations.rate_per_sender_hour, 3600)
        self.total = RateLimiter(settings.destinations.rate_total_hour, 3600)
        # Recipients named but not (yet) faxed, per sender and (a backstop) per address: given
        # back when the fax is accepted, so only churn counts.
        self.rcpt_churn = RateLimiter(RCPT_CHURN_PER_SENDER_HOUR, 3600)
        self.rcpt_churn_ip = RateLimiter(RCPT_CHURN_PER_IP_HOUR, 3600)
        self._logins = asyncio.Semaphore(MAX_CONCURRENT_LOGINS)
        # Shared: (kind, key) -> (when read, on self.clock; the hits counted then).
        self._counts: dict[tuple[str, str], tuple[float, int]] = {}
        self.refused_strangers = 0

    @property
    def auth_enabled(self) -> bool:
        return self.users is not None

    def reload(self) -> None:
        """SIGHUP: re-read the users file (a broken file keeps the previous users)."""
        if self.users is not None:
            self.users.refresh("SMTP AUTH")

    # -- AUTH --------------------------------------------------------------------------------

    def locked_out_s(self, ip: str) -> float:
        return self.throttle.check(ip, self.clock())

    async def _db(self, fn: Callable[..., T], *args: Any) -> T:
        """A call to the shared store; the driver's own error (the database did not answer)
        becomes StoreError, which the SMTP side answers with 451 "database unavailable"."""
        assert self.store is not None
        try:
            return await self.store.run_first(fn, *args)
        except StoreError:
            raise
        except Exception as exc:  # noqa: BLE001 - only the driver's errors are converted
            if self.store.is_db_error(exc):
                raise StoreError(f"the shared database did not answer: "
                                 f"{type(exc).__name__}") from exc
            raise

    async def locked_out(self, ip: str) -> float:
        """Seconds `ip` stays locked out of AUTH, across every node when the store is shared."""
        if self.store is None:
            return self.locked_out_s(ip)
        last = await self._db(self.store.last_hit, _AUTH_LOCK, client_key(ip))
        if last is None:
            return 0.0
        return max(0.0, last + self.throttle.lockout_s - self.wall_clock())

    async def _failed_login(self, ip: str) -> float:
        if self.store is None:
            return self.throttle.failure(ip, self.clock())
        key, now = client_key(ip), self.wall_clock()
        failures = await self._db(self.store.add_hit, _AUTH_FAIL, key, now,
                                        now - self.throttle.window_s)
        if failures < self.throttle.max_failures:
            return 0.0
        await self._db(self.store.add_hit, _AUTH_LOCK, key, now,
                             now - self.throttle.lockout_s)
        await self._db(self.store.clear_hits, _AUTH_FAIL, key)
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
            await self._db(self.store.clear_hits, _AUTH_FAIL, client_key(ip))
        log.info("AUTH ok: user %s from %s", user.name, ip)
        return user

    # -- MAIL, RCPT, DATA --------------------------------------------------------------------

    def client(self, ip: str, user: User | None, envelope_from: str) -> Client:
        return Client(ip=ip, user=user, trusted=self.trusted.contains(ip),
                      envelope_from=envelope_from)

    def check_mail(self, client: Client) -> Reply | None:
        if client.user is not None:
            if client.user.senders and not client.user.allows_sender(client.envelope_from):
                return replies.user_may_not_send_as(client.user.name, client.envelope_from)
            return None
        if client.trusted or (client.envelope_from and self.senders.allows(client.envelope_from)):
            return None
        self.refused_strangers += 1
        log.warning("refused sender <%s> from %s: not authenticated, not trusted, not allowed",
                    client.envelope_from[:200], client.ip)
        if self.auth_enabled:
            return replies.AUTH_REQUIRED
        return replies.sender_not_allowed(client.envelope_from)

    def _rules(self, client: Client) -> list[tuple[RateLimiter, str]]:
        return [(self.total, "all"), (self.per_sender, client.rate_key)]

    def _rate_refusal(self, client: Client, wait: float) -> Reply:
        if math.isinf(wait):
            return replies.RATE_NEVER
        log.warning("rate limit hit by %s", client.rate_key)
        return replies.rate_limited(self.s.destinations.rate_per_sender_hour,
                                    self.s.destinations.rate_total_hour, wait)

    def check_destination(self, client: Client, number: str, already: int = 0) -> Reply | None:
        """RCPT: the destination rules, then whether this fax (with the `already` numbers of
        the same message) would fit the rate limits now, without charging anything."""
        reason = self.destinations.check(number)
        if reason:
            log.warning("destination %s refused for %s: %s", number, client.rate_key, reason)
            return replies.destination_refused(reason)
        now = self.clock()
        wait = max(limiter.wait_s(key, already + 1, now) for limiter, key in self._rules(client))
        if math.isinf(wait) and already:
            # This number alone would fit; with the message's others it is over the hourly
            # limit: the sender can fax it in a later message.
            wait = max(limiter.window_s for limiter, _ in self._rules(client))
        if wait:
            return self._rate_refusal(client, wait)
        return self._churn(client, now)

    def _churn(self, client: Client, now: float) -> Reply | None:
        """Count one recipient named towards the sender's churn, then its address's."""
        wait = self.rcpt_churn.try_acquire(client.churn_key, 1, now)
        if wait:
            log.warning("recipient churn limit hit %s", client.churn_who)
            return replies.recipient_churn(client.churn_who, wait)
        wait = self.rcpt_churn_ip.try_acquire(client.ip, 1, now)
        if wait:
            self.rcpt_churn.give_back(client.churn_key, 1, now)
            log.warning("recipient churn limit hit from %s (all its senders)", client.ip)
            return replies.recipient_churn(f"from {client.ip}", wait)
        return None

    def reserve(self, client: Client, faxes: int) -> Reply | None:
        """DATA: charge the message's faxes to the rate limits (all or nothing); `release` them
        if the message is then refused, `accepted` once it is queued."""
        wait = try_acquire_all(self._rules(client), faxes, self.clock())
        return self._rate_refusal(client, wait) if wait else None

    def release(self, client: Client, faxes: int) -> None:
        """Give back a reservation: the message was refused at DATA."""
        for limiter, key in self._rules(client):
            limiter.give_back(key, faxes, self.clock())

    def accepted(self, client: Client, faxes: int) -> None:
        """The faxes were queued: their recipients were not churn."""
        now = self.clock()
        self.rcpt_churn.give_back(client.churn_key, faxes, now)
        self.rcpt_churn_ip.give_back(client.ip, faxes, now)

    # Several gateways (DATABASE_URL): the same three steps, with the rate limits counted in
    # the shared database so that N nodes do not give a sender N times the limit. RCPT churn
    # stays per node: it bounds what one address costs this node.

    def _shared_rules(self, client: Client) -> list[tuple[str, str, int]]:
        return [(_RATE_TOTAL, "all", self.s.destinations.rate_total_hour),
                (_RATE_SENDER, client.rate_key, self.s.destinations.rate_per_sender_hour)]

    async def check_destination_async(self, client: Client, number: str,
                                      already: int = 0) -> Reply | None:
        """`check_destination`; when shared, the rate limits are looked up (not charged) in
        the database."""
        if self.store is None:
            return self.check_destination(client, number, already)
        reason = self.destinations.check(number)
        if reason:
            log.warning("destination %s refused for %s: %s", number, client.rate_key, reason)
            return replies.destination_refused(reason)
        wait = await self._shared_wait(self._shared_rules(client), already + 1)
        if wait:
            return self._rate_refusal(client, wait)
        return self._churn(client, self.clock())

    def charge(self, client: Client, faxes: int) -> asyncio.Future[Reply | None]:
        """DATA: start `reserve`. In memory the answer is there at once (a refused message is
        never converted); shared, the database decides while the document is converted, and
        the intake waits for that answer before it stores anything. Over-limit senders are
        refused at RCPT already (a read), so conversions started for a charge that is then
        refused are only the races between a sender's own sessions."""
        if self.store is None:
            decided: asyncio.Future[Reply | None] = asyncio.get_running_loop().create_future()
            decided.set_result(self.reserve(client, faxes))
            return decided
        return asyncio.ensure_future(self.reserve_async(client, faxes))

    async def give_back(self, charge: asyncio.Future[Reply | None], client: Client,
                        faxes: int) -> None:
        """Release what `charge` reserved, once it is decided; nothing if it was refused or
        failed (the failure, a StoreError, is the intake's to report)."""
        try:
            refused = await asyncio.shield(charge)
        except Exception:  # noqa: BLE001 - nothing was charged
            return
        if refused is None:
            await self.release_async(client, faxes)

    async def _shared_wait(self, rules: list[tuple[str, str, int]], wanted: int) -> float:
        """RCPT's look at the shared limits: from counts read in the last RCPT_COUNTS_S while
        every limit has room to spare (no round trip for most recipients), else read again."""
        now = self.clock()
        if all(self._room_to_spare(rule, wanted, now) for rule in rules):
            return 0.0
        assert self.store is not None
        counts = await self._db(self.store.hit_counts, rules, self.wall_clock(), 3600.0)
        if len(self._counts) >= _COUNTS_KEPT:
            self._counts = {k: v for k, v in self._counts.items()
                            if now - v[0] <= RCPT_COUNTS_S}
            if len(self._counts) >= _COUNTS_KEPT:
                self._counts.clear()
        for kind, key, _ in rules:
            self._counts[(kind, key)] = (now, counts.get((kind, key), 0))
        if all(limit - counts.get((kind, key), 0) >= wanted for kind, key, limit in rules):
            return 0.0
        return await self._db(self.store.hits_wait, rules, wanted, self.wall_clock(), 3600.0)

    def _room_to_spare(self, rule: tuple[str, str, int], wanted: int, now: float) -> bool:
        kind, key, limit = rule
        seen = self._counts.get((kind, key))
        return seen is not None and now - seen[0] <= RCPT_COUNTS_S and \
            limit - seen[1] - wanted >= max(1, limit // 10)

    def _counted(self, rules: list[tuple[str, str, int]], faxes: int) -> None:
        """This node's own charges (and give-backs) in the counts it keeps."""
        for kind, key, _ in rules:
            if (seen := self._counts.get((kind, key))) is not None:
                self._counts[(kind, key)] = (seen[0], max(0, seen[1] + faxes))

    async def reserve_async(self, client: Client, faxes: int) -> Reply | None:
        if self.store is None:
            return self.reserve(client, faxes)
        rules = self._shared_rules(client)
        wait = await self._db(self.store.take_hits, rules, self.wall_clock(), 3600.0, faxes)
        if wait:
            return self._rate_refusal(client, wait)
        self._counted(rules, faxes)
        return None

    async def release_async(self, client: Client, faxes: int) -> None:
        if self.store is None:
            self.release(client, faxes)
            return
        rules = self._shared_rules(client)
        await self._db(self.store.give_back_hits, [(kind, key) for kind, key, _ in rules],
                       faxes)
        self._counted(rules, -faxes)

    def check_header_from(self, client: Client, header_from: str | None) -> Reply | None:
        """The From: header must be allowed too, unless the client logged in or is trusted
        (then it is only checked against a user's own sender list)."""
        _, addr = header_address(header_from or "")
        if client.user is not None:
            if client.user.senders and addr and not client.user.allows_sender(addr):
                return replies.user_may_not_send_as(client.user.name, addr)
            return None
        if client.trusted or not addr or self.senders.allows(addr):
            return None
        log.warning("refused From: <%s> from %s (envelope <%s>)", addr[:200], client.ip,
                    client.envelope_from[:200])
        return replies.sender_not_allowed(addr)
