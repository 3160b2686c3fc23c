"""Sender patterns, trusted networks, destination rules and rate limits."""

from __future__ import annotations

import math

import phonenumbers
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from phonenumbers import PhoneNumberFormat, PhoneNumberType

from gateway.rules.policy import (
    DEFAULT_BLOCKED_PREFIXES,
    DestinationPolicy,
    RateLimiter,
    SenderPolicy,
    TrustedNetworks,
    try_acquire_all,
)

# -- senders --------------------------------------------------------------------------


@pytest.mark.parametrize(("patterns", "address", "allowed"), [
    (["alice@example.com"], "alice@example.com", True),
    (["alice@example.com"], "ALICE@Example.COM", True),
    (["alice@example.com"], "<alice@example.com>", True),
    (["alice@example.com"], "alice@example.com.", True),
    (["alice@example.com"], "bob@example.com", False),
    (["alice@example.com"], "alice@example.com.evil.net", False),
    (["alice@example.com"], "alice@example.com@evil.net", False),
    (["alice@example.com"], '"alice@example.com"@evil.net', False),
    (["example.com"], "bob@example.com", True),
    (["example.com"], "bob@sub.example.com", False),
    (["example.com"], "bob@notexample.com", False),
    (["@example.com"], "bob@EXAMPLE.com", True),
    (["*@example.com"], "bob@example.com", True),
    (["*@example.com"], "bob@sub.example.com", False),
    (["*.example.com"], "bob@sub.example.com", True),
    (["*.example.com"], "bob@a.b.example.com", True),
    (["*.example.com"], "bob@example.com", False),
    (["@*.example.com"], "bob@sub.example.com", True),
    (["*@*.example.com"], "bob@sub.example.com", True),
    (["scan-*@example.com"], "scan-3f@example.com", True),
    (["scan-*@example.com"], "scan@example.com", False),
    (["scan-?@example.com"], "SCAN-7@example.com", True),
    (["*"], "anyone@anywhere.test", True),
    (["*"], "<>", False),
    (["example.com", "lab@other.org"], "lab@other.org", True),
    ([], "alice@example.com", False),
    (["example.com"], "", False),
    (["example.com"], "<>", False),
    (["example.com"], "no-at-sign", False),
    (["example.com"], "@example.com", False),
    (["example.com"], "<@relay.test:bob@example.com>", True),
    (["b\u00fccher.example"], "Anna@B\u00dcCHER.example", True),
])
def test_sender_policy(patterns: list[str], address: str, allowed: bool) -> None:
    assert SenderPolicy(patterns).allows(address) is allowed


@pytest.mark.parametrize("pattern", ["", "  ", "alice@", "a b@example.com", "x@.", "@"])
def test_sender_policy_rejects_bad_patterns(pattern: str) -> None:
    with pytest.raises(ValueError, match="sender pattern"):
        SenderPolicy([pattern])


def test_sender_policy_bool() -> None:
    assert not SenderPolicy([])
    assert SenderPolicy(["example.com"])


@settings(max_examples=300)
@given(st.lists(st.sampled_from(["example.com", "*.example.com", "a@b.c", "[x-z]*@*", "*",
                                 "?@?"]), max_size=4),
       st.text(max_size=80))
def test_sender_policy_never_raises(patterns: list[str], address: str) -> None:
    assert SenderPolicy(patterns).allows(address) in (True, False)


@given(st.text(max_size=40))
def test_sender_policy_construction_raises_only_value_error(pattern: str) -> None:
    try:
        policy = SenderPolicy([pattern])
    except ValueError:
        return
    assert policy.allows("someone@example.com") in (True, False)


# -- trusted networks -----------------------------------------------------------------


def test_trusted_networks() -> None:
    nets = TrustedNetworks(["10.0.0.0/8", "192.168.1.20", "2001:db8::/32", " 172.16.5.9/12 "])
    assert nets.contains("10.1.2.3")
    assert nets.contains("192.168.1.20")
    assert not nets.contains("192.168.1.21")
    assert nets.contains("172.31.255.255")  # host bits in the entry are tolerated
    assert nets.contains("2001:db8:ffff::1")
    assert not nets.contains("2001:db9::1")
    assert nets.contains("::ffff:10.0.0.5")  # IPv4-mapped, as a dual-stack socket reports it
    assert not nets.contains("::ffff:11.0.0.5")
    assert not nets.contains("::10.0.0.5")  # IPv4-compatible is not mapped
    for junk in ("", "localhost", "10.0.0", "unix:/tmp/sock", "10.0.0.1/8"):
        assert not nets.contains(junk)
    assert not nets.contains(None)  # type: ignore[arg-type]


def test_trusted_networks_scoped_and_mapped_entries() -> None:
    nets = TrustedNetworks(["fe80::/10", "::ffff:192.0.2.0/120"])
    assert nets.contains("fe80::1%eth0")
    assert nets.contains("::ffff:192.0.2.9")
    assert not TrustedNetworks([]).contains("127.0.0.1")
    assert not TrustedNetworks([])


@pytest.mark.parametrize("bad", ["10.0.0.0/33", "example.com", "", "10.0.0.0/8,10.1.0.0/16"])
def test_trusted_networks_invalid_entry_named(bad: str) -> None:
    with pytest.raises(ValueError) as info:
        TrustedNetworks(["127.0.0.1", bad])
    assert repr(bad) in str(info.value)


# -- destinations ---------------------------------------------------------------------


@pytest.mark.parametrize("number", [
    "+15551234567",  # the product's test number
    "+15550100000",  # the sandbox's from number
    "+15551230000",  # the simulator's range
    "+12125550123",
    "+18005551234",  # toll-free
    "+14165550123",  # Canada: billed as domestic from the US
    "+17875550123",  # Puerto Rico
])
def test_us_domestic_allowed(number: str) -> None:
    assert DestinationPolicy("US").check(number) is None


@pytest.mark.parametrize(("number", "words"), [
    ("+19005551234", "+19005551234 is a premium-rate number (NANP 900 premium-rate services); "
                     "faxes to premium-rate numbers are blocked"),
    ("+19765551234", "NANP 976"),
    ("+15002345678", "personal (call-forwarding) number"),  # NANP 500 personal services
    ("+18765551234", "international number (+1, region JM)"),  # Caribbean: not domestic
    ("+442079460000", "international number (+44, region GB); this gateway sends faxes only "
                      "within its home region US"),
    ("+80012345678", "a non-geographic international service"),
])
def test_us_refusals(number: str, words: str) -> None:
    reason = DestinationPolicy("US").check(number)
    assert reason is not None and words in reason
    assert reason.isascii() and "\n" not in reason


@pytest.mark.parametrize(("number", "kind"), [
    ("+448712345678", "premium-rate"),  # UK 087
    ("+449012345678", "premium-rate"),  # UK 09
    ("+447012345678", "personal"),  # UK 070
    ("+499001234567", "premium-rate"),  # DE 0900
    ("+491801234567", "shared-cost"),  # DE 0180 (type rule)
    ("+33891234567", "premium-rate"),  # FR 089
    ("+33812345678", "premium-rate"),  # FR 081x (type rule)
    ("+39899123456", "premium-rate"),  # IT 899
    ("+611900123456", "premium-rate"),  # AU 1900
    ("+611300123456", "shared-cost"),  # AU 1300 (type rule)
    ("+43900123456", "premium-rate"),  # AT
    ("+4916412345", "pager"),
    ("+49177991234567", "voicemail"),
    ("+97912345678", "premium-rate"),  # ITU international premium rate
    ("+8816123456789", "satellite"),
    ("+88216123456", "an international-network number"),
])
def test_premium_and_special_blocked_even_with_international(number: str, kind: str) -> None:
    reason = DestinationPolicy("US", allow_international=True).check(number)
    assert reason is not None and kind in reason and "blocked" in reason


@pytest.mark.parametrize("number", [
    "+442079460000", "+447624123456", "+4930123456", "+390891234567",  # IT fixed 089 = Salerno
    "+33142685300", "+61291234567", "+443001234567",  # UK 03 (UAN) is charged like a call
])
def test_international_allowed_when_enabled(number: str) -> None:
    assert DestinationPolicy("US", allow_international=True).check(number) is None
    assert DestinationPolicy("US").check(number) is not None


def test_home_region_and_its_tariff_group() -> None:
    gb = DestinationPolicy("GB")
    assert gb.check("+442079460000") is None
    assert gb.check("+447624123456") is None  # Isle of Man mobile: +44, billed as UK
    assert gb.check("+12125550123") is not None
    de = DestinationPolicy("de")
    assert de.check("+4930123456") is None
    assert de.check("+4315123456") is not None


def test_precedence_block_over_allow_over_premium_over_region() -> None:
    policy = DestinationPolicy("US", allow_prefixes=["+44", "+1 900 555"],
                               block_prefixes=["+449", "+1212"])
    # 1. the operator's block list wins over everything
    assert "+1212, which is blocked" in (policy.check("+12125550123") or "")
    assert "+449, which is blocked" in (policy.check("+449012345678") or "")
    # 2. the operator's allow list wins over premium rules and the region rule
    assert policy.check("+19005551234") is None
    assert policy.check("+442079460000") is None
    assert policy.check("+448712345678") is None  # allowed +44 beats the built-in +4487
    # 3. premium rules still apply outside the allow list
    assert "premium-rate" in (policy.check("+19005561234") or "")
    # 4. region rule
    assert "international" in (policy.check("+33142685300") or "")


@pytest.mark.parametrize("bad", ["44", "+", "+44a", "+1234567890123456", ""])
def test_bad_prefixes_named(bad: str) -> None:
    with pytest.raises(ValueError) as info:
        DestinationPolicy("US", allow_prefixes=[bad])
    assert repr(bad) in str(info.value)


def test_unknown_region() -> None:
    with pytest.raises(ValueError, match="XX"):
        DestinationPolicy("XX")


@pytest.mark.parametrize("junk", ["", "+", "15551234567", "+1555\n123", "+\u0661\u0662\u0663",
                                  "+1234567890123456", "+999123456", "+0123"])
def test_check_never_raises_on_junk(junk: str) -> None:
    reason = DestinationPolicy("US").check(junk)
    assert reason is not None and reason.isascii() and "\n" not in reason


def test_default_prefixes_do_not_hit_ordinary_numbers() -> None:
    """No example fixed-line, mobile, toll-free or UAN number of any region falls in a
    built-in blocked range (a guard against a prefix written too short)."""
    ordinary = (PhoneNumberType.FIXED_LINE, PhoneNumberType.MOBILE,
                PhoneNumberType.FIXED_LINE_OR_MOBILE, PhoneNumberType.TOLL_FREE,
                PhoneNumberType.UAN)
    hits = []
    for region in phonenumbers.SUPPORTED_REGIONS:
        for kind in ordinary:
            example = phonenumbers.example_number_for_type(region, kind)
            if example is None:
                continue
            e164 = phonenumbers.format_number(example, PhoneNumberFormat.E164)
            hits += [(region, e164, p) for p in DEFAULT_BLOCKED_PREFIXES if e164.startswith(p)]
    assert hits == []
    assert not any("+1555".startswith(p) or p.startswith("+1555") for p in DEFAULT_BLOCKED_PREFIXES)


def _example_numbers() -> list[str]:
    numbers = []
    for region in sorted(phonenumbers.SUPPORTED_REGIONS):
        for kind in range(0, 11):
            example = phonenumbers.example_number_for_type(region, kind)
            if example is not None:
                numbers.append(phonenumbers.format_number(example, PhoneNumberFormat.E164))
    for code in sorted(phonenumbers.COUNTRY_CODES_FOR_NON_GEO_REGIONS):
        example = phonenumbers.example_number_for_non_geo_entity(code)
        if example is not None:
            numbers.append(phonenumbers.format_number(example, PhoneNumberFormat.E164))
    return numbers


EXAMPLES = _example_numbers()


@settings(max_examples=400)
@given(st.sampled_from(EXAMPLES), st.sampled_from(sorted(phonenumbers.SUPPORTED_REGIONS)),
       st.booleans(), st.integers(min_value=0, max_value=9))
def test_check_never_raises_on_example_numbers(number: str, region: str, international: bool,
                                               last_digit: int) -> None:
    policy = DestinationPolicy(region, allow_international=international)
    for candidate in (number, number[:-1] + str(last_digit)):
        reason = policy.check(candidate)
        assert reason is None or (reason.isascii() and candidate in reason)


def test_every_example_premium_or_shared_cost_number_is_blocked() -> None:
    policy = DestinationPolicy("US", allow_international=True)
    for region in phonenumbers.SUPPORTED_REGIONS:
        for kind in (PhoneNumberType.PREMIUM_RATE, PhoneNumberType.SHARED_COST):
            example = phonenumbers.example_number_for_type(region, kind)
            if example is not None:
                e164 = phonenumbers.format_number(example, PhoneNumberFormat.E164)
                assert policy.check(e164) is not None, (region, e164)


# -- rate limits ----------------------------------------------------------------------


def test_sliding_window() -> None:
    limiter = RateLimiter(limit=3, window_s=3600)
    assert limiter.try_acquire("alice", 1, now=0.0) == 0.0
    assert limiter.try_acquire("alice", 2, now=10.0) == 0.0
    assert limiter.try_acquire("alice", 1, now=20.0) == 3580.0  # until the first one ages out
    assert limiter.try_acquire("bob", 3, now=20.0) == 0.0  # keys are independent
    assert limiter.try_acquire("alice", 1, now=3600.0) == 0.0
    assert limiter.try_acquire("alice", 2, now=3601.0) == 9.0  # both of t=10 must age out
    assert limiter.try_acquire("alice", 2, now=3610.0) == 0.0


def test_refusal_records_nothing() -> None:
    limiter = RateLimiter(limit=2, window_s=60)
    limiter.try_acquire("k", 2, now=0.0)
    for t in range(1, 60):
        assert limiter.try_acquire("k", 1, now=float(t)) > 0
    assert limiter.try_acquire("k", 2, now=60.0) == 0.0


def test_more_than_the_limit_never_fits() -> None:
    limiter = RateLimiter(limit=5, window_s=60)
    assert limiter.try_acquire("k", 6, now=0.0) == math.inf
    assert limiter.try_acquire("k", 5, now=0.0) == 0.0
    with pytest.raises(ValueError):
        limiter.try_acquire("k", 0, now=0.0)


def test_keys_are_bounded_and_expired_windows_dropped() -> None:
    limiter = RateLimiter(limit=1, window_s=10, max_keys=50)
    for i in range(200):
        limiter.try_acquire(f"sender{i}", 1, now=float(i) / 100)
    assert len(limiter) == 50
    assert limiter.try_acquire("sender199", 1, now=3.0) > 0
    assert limiter.try_acquire("sender0", 1, now=3.0) == 0.0  # evicted, so forgotten
    assert len(limiter) == 50
    assert limiter.wait_s("sender199", 1, now=100.0) == 0.0
    assert len(limiter) == 49  # an expired window is dropped when next looked at


def test_try_acquire_all_is_all_or_nothing() -> None:
    per_sender = RateLimiter(limit=10, window_s=3600)
    overall = RateLimiter(limit=3, window_s=3600)
    rules = [(per_sender, "alice"), (overall, "*")]
    assert try_acquire_all(rules, 2, now=0.0) == 0.0
    assert try_acquire_all(rules, 2, now=1.0) == 3599.0  # overall is full
    assert per_sender.wait_s("alice", 8, now=1.0) == 0.0  # alice was not charged for it
    assert try_acquire_all([(per_sender, "bob"), (overall, "*")], 1, now=2.0) == 0.0
    assert try_acquire_all([], 1, now=0.0) == 0.0


@settings(max_examples=100)
@given(st.lists(st.tuples(st.sampled_from("abc"), st.integers(1, 4),
                          st.floats(0, 50, allow_nan=False)), max_size=60))
def test_never_more_than_limit_in_any_window(events: list[tuple[str, int, float]]) -> None:
    limiter = RateLimiter(limit=5, window_s=10)
    granted: list[tuple[str, int, float]] = []
    now = 0.0
    for key, count, step in events:
        now += step
        if limiter.try_acquire(key, count, now=now) == 0.0:
            granted.append((key, count, now))
    for key, _, t in granted:
        in_window = sum(c for k, c, s in granted if k == key and t - 10 < s <= t)
        assert in_window <= 5


def test_rate_limiter_rejects_nonsense_settings() -> None:
    with pytest.raises(ValueError):
        RateLimiter(limit=0, window_s=1)


def test_give_back_returns_the_newest_units() -> None:
    limiter = RateLimiter(limit=3, window_s=3600)
    assert limiter.try_acquire("a", 2, now=0.0) == 0.0
    assert limiter.try_acquire("a", 1, now=10.0) == 0.0
    assert limiter.wait_s("a", 1, now=20.0) > 0
    limiter.give_back("a", 2, now=20.0)  # the newest (at 10.0) and one of the two at 0.0
    assert limiter.wait_s("a", 2, now=20.0) == 0.0
    assert limiter.wait_s("a", 3, now=20.0) > 0
    limiter.give_back("a", 5, now=20.0)  # more than recorded: nothing left, nothing negative
    assert len(limiter) == 0
    assert limiter.wait_s("a", 3, now=20.0) == 0.0


def test_access_charges_faxes_at_data_not_at_rcpt() -> None:
    from gateway.config import AccessSettings, DestinationSettings, Settings
    from gateway.smtp.access import Access

    now = [0.0]
    access = Access(Settings(destinations=DestinationSettings(rate_per_sender_hour=2,
                                                              rate_total_hour=100),
                             access=AccessSettings(trusted_networks=())), clock=lambda: now[0])
    client = access.client("192.0.2.1", None, "a@example.com")
    for _ in range(50):  # named, never sent: costs the sender nothing
        assert access.check_destination(client, "+15551234567") is None
    assert access.reserve(client, 2) is None
    access.release(client, 2)  # refused at DATA: given back
    assert access.reserve(client, 2) is None
    access.accepted(client, 2)
    refusal = access.check_destination(client, "+15551234567")
    assert refusal is not None and (refusal.code, refusal.enhanced) == (450, "4.7.1")
    assert refusal.metric_reason == "rate_limited"
    other = access.client("192.0.2.1", None, "b@example.com")
    assert access.check_destination(other, "+15551234567") is None
