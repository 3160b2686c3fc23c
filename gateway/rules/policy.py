"""Who may send and what they may cost: sender patterns, trusted networks, destination
rules and rate limits.

Pure decisions over plain values; the SMTP edge asks and turns a refusal into a reply.
The From: address is forgeable, so a sender pattern is only worth something combined with
SMTP AUTH or a trusted network; the destination rules and rate limits are what bound the
bill when one of those is wrong.
"""

from __future__ import annotations

import fnmatch
import functools
import ipaddress
import math
import re
import time
from collections import OrderedDict, deque
from collections.abc import Iterable

import phonenumbers
from phonenumbers import NumberParseException, PhoneNumberType

__all__ = [
    "DEFAULT_BLOCKED_PREFIXES",
    "DEFAULT_BLOCKED_TYPES",
    "DestinationPolicy",
    "RateLimiter",
    "SenderPolicy",
    "TrustedNetworks",
    "try_acquire_all",
]


# -- senders --------------------------------------------------------------------------


def _split_address(address: str) -> tuple[str, str] | None:
    """(local, domain), lower-cased, of an envelope address; None if it has no usable
    form (the null sender "<>", no "@", an empty part)."""
    text = address.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1].strip()
    if text.startswith("@") and ":" in text:  # obsolete source route "<@relay:a@b>"
        text = text.split(":", 1)[1]
    local, at, domain = text.rpartition("@")
    domain = domain.rstrip(".")
    if not at or not local or not domain:
        return None
    return local.lower(), domain.lower()


class SenderPolicy:
    """Envelope senders allowed to have faxes sent, as a list of patterns.

    - ``alice@example.com``: that address.
    - ``example.com``, ``@example.com`` or ``*@example.com``: any address at exactly that
      domain (not its subdomains).
    - ``*.example.com``: any address at a subdomain of example.com.
    - anything else with ``*``, ``?`` or ``[...]``: fnmatch-style, against the domain when
      the pattern has no local part, else against the whole address (``fax-*@example.com``);
      ``*`` alone allows every sender (the configuration refuses it: see config.py).

    Matching ignores case (local parts included: senders do not keep their case).  No
    patterns: nothing is allowed.  Malformed patterns raise ValueError naming the pattern;
    ``allows`` never raises, whatever the sender wrote.
    """

    def __init__(self, allowed: Iterable[str]) -> None:
        self._addresses: set[tuple[str, str]] = set()
        self._domains: set[str] = set()
        self._globs: list[tuple[re.Pattern[str] | None, re.Pattern[str]]] = []
        self.patterns: tuple[str, ...] = tuple(allowed)
        for raw in self.patterns:
            self._add(raw)

    def _add(self, raw: str) -> None:
        pattern = raw.strip().lower()
        if not pattern:
            raise ValueError("sender pattern is empty")
        if any(ch.isspace() or not ch.isprintable() for ch in pattern):
            raise ValueError(f"sender pattern {raw!r} contains spaces or control characters")
        local, at, domain = pattern.rpartition("@")
        if at and not domain:
            raise ValueError(f"sender pattern {raw!r} has no domain after the @")
        domain = domain.rstrip(".")
        if not domain:
            raise ValueError(f"sender pattern {raw!r} has no domain")
        if local == "*":
            local = ""
        if not _is_glob(domain) and not _is_glob(local):
            if local:
                self._addresses.add((local, domain))
            else:
                self._domains.add(domain)
            return
        local_re = re.compile(fnmatch.translate(local)) if local else None
        self._globs.append((local_re, re.compile(fnmatch.translate(domain))))

    def allows(self, address: str) -> bool:
        parts = _split_address(address) if isinstance(address, str) else None
        if parts is None:
            return False
        local, domain = parts
        if domain in self._domains or parts in self._addresses:
            return True
        return any(dom_re.match(domain) and (local_re is None or local_re.match(local))
                   for local_re, dom_re in self._globs)

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def __repr__(self) -> str:
        return f"SenderPolicy({list(self.patterns)!r})"


def _is_glob(text: str) -> bool:
    return any(ch in text for ch in "*?[")


# -- trusted networks -----------------------------------------------------------------


class TrustedNetworks:
    """Client networks trusted without SMTP AUTH (old scanners that cannot log in).

    Entries are CIDRs or bare addresses ("10.0.0.0/8", "192.168.1.20", "2001:db8::/32");
    host bits are tolerated ("10.1.2.3/8" means 10.0.0.0/8).  A client connecting over
    IPv6 with an IPv4-mapped address (::ffff:10.0.0.5, as dual-stack listeners report
    IPv4 clients) is matched against the IPv4 entries.  ``contains`` never raises: a peer
    that is not an IP address is simply not trusted.
    """

    def __init__(self, cidrs: Iterable[str]) -> None:
        networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for raw in cidrs:
            try:
                networks.append(ipaddress.ip_network(raw.strip(), strict=False))
            except ValueError:
                raise ValueError(f"{raw!r} is not an IP network (e.g. 192.168.1.0/24, "
                                 "10.0.0.5 or 2001:db8::/32)") from None
        self.networks = tuple(networks)

    def contains(self, ip: str) -> bool:
        if not isinstance(ip, str):
            return False
        try:
            addr = ipaddress.ip_address(ip.split("%", 1)[0].strip())
        except ValueError:
            return False
        candidates: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [addr]
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            candidates.append(addr.ipv4_mapped)
        return any(a.version == net.version and a in net
                   for a in candidates for net in self.networks)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def __repr__(self) -> str:
        return f"TrustedNetworks({[str(n) for n in self.networks]!r})"


# -- destinations ---------------------------------------------------------------------

# Built-in blocked ranges: prefix -> (kind, what it is).  They sit below the operator's own
# allow list (an operator who really wants +1900 can allow it) and above the region rule.
# phonenumbers' number types catch most of these as well; the list is here for ranges its
# metadata types differently or not at all, and so the rule can be read in one place.
DEFAULT_BLOCKED_PREFIXES: dict[str, tuple[str, str]] = {
    # North America (NANP).  +1555 (fictional; the product's test numbers and the
    # sandbox) is deliberately not here.
    "+1900": ("premium-rate", "NANP 900 premium-rate services"),
    "+1976": ("premium-rate", "NANP 976 premium-rate services"),
    # United Kingdom.
    "+449": ("premium-rate", "UK 09 premium-rate services"),
    "+4487": ("premium-rate", "UK 087 revenue-sharing service numbers"),
    "+4470": ("personal (call-forwarding)", "UK 070, a common premium-rate scam range"),
    # Germany.
    "+49900": ("premium-rate", "German 0900 premium-rate services"),
    "+49137": ("premium-rate", "German 0137 mass-call and televoting services"),
    "+49118": ("premium-rate", "German 0118 directory enquiry services"),
    # Austria, Switzerland, the Netherlands.
    "+43900": ("premium-rate", "Austrian 0900 premium-rate services"),
    "+43901": ("premium-rate", "Austrian 0901 premium-rate services"),
    "+43930": ("premium-rate", "Austrian 0930 premium-rate services"),
    "+43931": ("premium-rate", "Austrian 0931 premium-rate services"),
    "+41900": ("premium-rate", "Swiss 0900 premium-rate services"),
    "+41901": ("premium-rate", "Swiss 0901 premium-rate services"),
    "+41906": ("premium-rate", "Swiss 0906 premium-rate services"),
    "+31900": ("premium-rate", "Dutch 0900 premium-rate services"),
    "+31906": ("premium-rate", "Dutch 0906 premium-rate services"),
    "+31909": ("premium-rate", "Dutch 0909 premium-rate services"),
    # France, Italy, Spain (Italian fixed lines are +390..., so +3989 is only 89x).
    "+3389": ("premium-rate", "French 089 premium-rate services"),
    "+3989": ("premium-rate", "Italian 89x premium-rate services"),
    "+34803": ("premium-rate", "Spanish 803 premium-rate services"),
    "+34806": ("premium-rate", "Spanish 806 premium-rate services"),
    "+34807": ("premium-rate", "Spanish 807 premium-rate services"),
    "+34905": ("premium-rate", "Spanish 905 mass-call services"),
    # Australia.
    "+61190": ("premium-rate", "Australian 190 premium-rate services"),
    # ITU non-geographic codes: expensive and the usual targets of revenue-share fraud.
    "+979": ("premium-rate", "International Premium Rate Service"),
    "+808": ("shared-cost", "International Shared Cost Service"),
    "+870": ("satellite", "Inmarsat satellite service"),
    "+881": ("satellite", "Global Mobile Satellite System (Iridium, Globalstar, ...)"),
    "+882": ("international-network", "International Networks code"),
    "+883": ("international-network", "International Networks code"),
}

# Number types refused worldwide, per phonenumbers' metadata.  Pagers and voicemail cannot
# take a fax at all; the others cost the caller more than a call and pay the callee.
# UAN (company "universal access" numbers, e.g. UK 03) is mostly charged like a normal
# call and is not blocked.
DEFAULT_BLOCKED_TYPES: dict[int, str] = {
    PhoneNumberType.PREMIUM_RATE: "premium-rate",
    PhoneNumberType.SHARED_COST: "shared-cost",
    PhoneNumberType.PERSONAL_NUMBER: "personal (call-forwarding)",
    PhoneNumberType.PAGER: "pager",
    PhoneNumberType.VOICEMAIL: "voicemail",
}

# Regions billed as domestic from one another although phonenumbers gives them their own
# region code.  Inside the NANP (+1) only the US, Canada and the US territories are; the
# Caribbean countries (+1 809, +1 876, +1 284, ...) are international calls and the home of
# the classic "call this +1 number back" scam, so they are not.
_SAME_TARIFF_GROUPS: tuple[frozenset[str], ...] = (
    frozenset({"US", "CA", "PR", "VI", "GU", "MP", "AS"}),
    frozenset({"GB", "GG", "JE", "IM"}),
    frozenset({"AU", "CX", "CC"}),
    frozenset({"IT", "VA"}),
    frozenset({"FI", "AX"}),
    frozenset({"NO", "SJ"}),
)


def _shown(text: str, limit: int = 40) -> str:
    """Sender-supplied text for a reason: printable ASCII, bounded (it ends up in an SMTP
    reply line, where CR/LF would end the reply early)."""
    clipped = text if len(text) <= limit else text[:limit] + "..."
    escaped = clipped.encode("ascii", "backslashreplace").decode("ascii")
    return "".join(ch if " " <= ch <= "~" else "?" for ch in escaped)


def _normalise_prefix(raw: str) -> str:
    prefix = "".join(ch for ch in raw if ch not in " -.()")
    digits = prefix[1:]
    if not (prefix.startswith("+") and digits.isascii() and digits.isdigit()
            and 1 <= len(digits) <= 15):
        raise ValueError(f"{raw!r} is not a number prefix (+ and 1 to 15 digits, e.g. +44 or "
                         "+1900)")
    return prefix


def _a(kind: str) -> str:
    return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"


def _region_name(region: str | None) -> str:
    # Region codes, not country names: phonenumbers' geocoder costs ~100 MB of memory.
    if not region or region == "001":
        return "a non-geographic international service"
    return f"region {region}"


# Pay-per-call exchange codes inside any NANP area code (+1 NPA 976 XXXX).
NANP_PREMIUM_EXCHANGES = frozenset({"976"})


class DestinationPolicy:
    """Which fax numbers this gateway dials.

    Precedence, first match wins:

    1. ``block_prefixes`` (the operator's block list): refused.
    2. ``allow_prefixes`` (the operator's allow list): allowed, whatever follows.
    3. Built-in premium and special ranges: ``DEFAULT_BLOCKED_PREFIXES``, then the number
       types in ``DEFAULT_BLOCKED_TYPES`` (premium-rate, shared-cost, personal, pager,
       voicemail) as phonenumbers classifies the number: refused.
    4. Region: numbers of ``default_region`` (and regions billed as domestic with it, see
       ``_SAME_TARIFF_GROUPS``) are allowed; others only with ``allow_international``.

    A number of the default country code that phonenumbers cannot place in a region (the
    fictional NANP 555 range of the sandbox and test numbers) counts as domestic.
    """

    def __init__(self, default_region: str, allow_prefixes: Iterable[str] = (),
                 block_prefixes: Iterable[str] = (), allow_international: bool = False) -> None:
        region = default_region.upper()
        if region not in phonenumbers.SUPPORTED_REGIONS:
            raise ValueError(f"unknown default region {default_region!r}")
        self.default_region = region
        self.country_code = phonenumbers.country_code_for_region(region)
        self.domestic_regions = next((g for g in _SAME_TARIFF_GROUPS if region in g),
                                     frozenset({region}))
        self.allow_prefixes = tuple(_normalise_prefix(p) for p in allow_prefixes)
        self.block_prefixes = tuple(_normalise_prefix(p) for p in block_prefixes)
        self.allow_international = allow_international
        # The answer depends only on the number and this policy's settings (fixed): cached,
        # like parse_fax_number, for the numbers a gateway faxes again and again.
        self._cached = functools.lru_cache(maxsize=1024)(self._check)

    def check(self, e164: str) -> str | None:
        """None if the number may be dialled, else the reason in plain ASCII words (fit
        for an SMTP reply).  Never raises."""
        if not isinstance(e164, str):
            return "the fax number is not an E.164 number"
        return self._cached(e164)

    def _check(self, e164: str) -> str | None:
        if not isinstance(e164, str):
            return "the fax number is not an E.164 number"
        digits = e164[1:]
        if not (e164.startswith("+") and digits.isascii() and digits.isdigit()
                and 1 <= len(digits) <= 15):
            return f"'{_shown(e164)}' is not an E.164 number"
        for prefix in self.block_prefixes:
            if e164.startswith(prefix):
                return (f"{e164} is in the range {prefix}, which is blocked on this gateway")
        if any(e164.startswith(prefix) for prefix in self.allow_prefixes):
            return None
        for prefix, (kind, what) in DEFAULT_BLOCKED_PREFIXES.items():
            if e164.startswith(prefix):
                return (f"{e164} is {_a(kind)} number ({what}); faxes to {kind} numbers "
                        "are blocked")
        if len(digits) == 11 and digits.startswith("1") and digits[4:7] in NANP_PREMIUM_EXCHANGES:
            # 976 is an exchange (NXX) code, not an area code: +1 NPA 976 XXXX in any area.
            return (f"{e164} is a premium-rate number (NANP {digits[4:7]} exchange "
                    "pay-per-call services); faxes to premium-rate numbers are blocked")
        try:
            number = phonenumbers.parse(e164, None)
        except NumberParseException:
            return f"{e164} has no known country code"
        number_kind = DEFAULT_BLOCKED_TYPES.get(phonenumbers.number_type(number))
        if number_kind is not None:
            return (f"{e164} is {_a(number_kind)} number; faxes to {number_kind} numbers are "
                    "blocked")
        if self.allow_international or self._is_domestic(number):
            return None
        region = phonenumbers.region_code_for_number(number)
        return (f"{e164} is an international number (+{number.country_code}, "
                f"{_region_name(region)}); this gateway sends faxes only within its home "
                f"region {self.default_region}")

    def _is_domestic(self, number: phonenumbers.PhoneNumber) -> bool:
        if number.country_code != self.country_code:
            return False
        region = phonenumbers.region_code_for_number(number)
        return region is None or region in self.domestic_regions


# -- rate limits ----------------------------------------------------------------------


class _Window:
    __slots__ = ("events", "total")

    def __init__(self) -> None:
        self.events: deque[tuple[float, int]] = deque()
        self.total = 0


class RateLimiter:
    """At most ``limit`` units (faxes) per key in any sliding ``window_s``.

    One instance per rule: per sender (key: the login name or the envelope sender), or
    overall (one fixed key such as "*").  Times are monotonic seconds,
    ``time.monotonic()`` unless ``now`` is passed.  Memory is bounded: a key holds at most
    ``limit`` events, and at most ``max_keys`` keys are kept, the least recently used
    forgotten first (for the overall rule, a global limiter keeps the bill bounded even
    when per-sender keys are churned through).
    """

    def __init__(self, limit: int, window_s: float, max_keys: int = 10_000) -> None:
        if limit < 1 or window_s <= 0 or max_keys < 1:
            raise ValueError("limit, window_s and max_keys must be positive")
        self.limit = limit
        self.window_s = window_s
        self.max_keys = max_keys
        self._windows: OrderedDict[str, _Window] = OrderedDict()

    def __len__(self) -> int:
        return len(self._windows)

    def _window(self, key: str, now: float) -> _Window | None:
        window = self._windows.get(key)
        if window is None:
            return None
        cutoff = now - self.window_s
        while window.events and window.events[0][0] <= cutoff:
            window.total -= window.events.popleft()[1]
        if not window.events:
            del self._windows[key]
            return None
        return window

    def wait_s(self, key: str, count: int = 1, now: float | None = None) -> float:
        """Seconds until ``count`` more units fit for ``key`` (0.0: now), without recording
        anything; ``math.inf`` when ``count`` exceeds the limit and never will fit."""
        if count < 1:
            raise ValueError("count must be at least 1")
        if count > self.limit:
            return math.inf
        now = time.monotonic() if now is None else now
        window = self._window(key, now)
        if window is None:
            return 0.0
        excess = window.total + count - self.limit
        if excess <= 0:
            return 0.0
        freed = 0
        for stamp, n in window.events:
            freed += n
            if freed >= excess:
                return max(0.0, stamp + self.window_s - now)
        return self.window_s  # unreachable: the whole window frees at least `excess`

    def _record(self, key: str, count: int = 1, now: float | None = None) -> None:
        """Count ``count`` units for ``key`` at ``now``, whether or not they fit."""
        now = time.monotonic() if now is None else now
        window = self._window(key, now)
        if window is None:
            window = self._windows[key] = _Window()
            while len(self._windows) > self.max_keys:
                self._windows.popitem(last=False)
        else:
            self._windows.move_to_end(key)
        if window.events and window.events[-1][0] == now:
            stamp, n = window.events.pop()
            window.events.append((stamp, n + count))
        else:
            window.events.append((now, count))
        window.total += count

    def try_acquire(self, key: str, count: int = 1, now: float | None = None) -> float:
        """0.0 if ``count`` units fit now (and records them), else the seconds until they
        will (``math.inf``: never; the message has more faxes than the limit)."""
        now = time.monotonic() if now is None else now
        wait = self.wait_s(key, count, now)
        if wait == 0.0:
            self._record(key, count, now)
        return wait


    def give_back(self, key: str, count: int = 1, now: float | None = None) -> None:
        """Return up to ``count`` units recorded for ``key``, newest first (a reservation that
        was not used: a message refused after its faxes were counted)."""
        now = time.monotonic() if now is None else now
        window = self._window(key, now)
        while window is not None and count > 0 and window.events:
            stamp, n = window.events.pop()
            taken = min(n, count)
            count -= taken
            window.total -= taken
            if n > taken:
                window.events.append((stamp, n - taken))
        if window is not None and not window.events:
            del self._windows[key]


def try_acquire_all(rules: Iterable[tuple[RateLimiter, str]], count: int = 1,
                    now: float | None = None) -> float:
    """Acquire ``count`` from every (limiter, key) or from none: 0.0 if all fit (and
    records them in all), else the longest wait.  So a message refused by the overall
    limit does not use up its sender's allowance."""
    now = time.monotonic() if now is None else now
    rules = list(rules)
    wait = max((limiter.wait_s(key, count, now) for limiter, key in rules), default=0.0)
    if wait == 0.0:
        for limiter, key in rules:
            limiter._record(key, count, now)
    return wait
