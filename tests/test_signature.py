"""The callback signature against the published test vectors, URL port variants and tampering."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import MultiDict

from gateway.signalwire.signature import (
    _with_default_port,
    _without_default_port,
    compute_signature,
    verify_signature,
)

TWILIO_KEY = "12345"
TWILIO_URL = "https://mycompany.com/myapp.php?foo=1&bar=2"
TWILIO_PARAMS = {
    "CallSid": "CA1234567890ABCDE",
    "Caller": "+14158675309",
    "Digits": "1234",
    "From": "+14158675309",
    "To": "+18005551212",
}
TWILIO_SIG = "RSOYDt4T1cUTdK1PDd93/VVr8B8="
TWILIO_SIG_443 = "kvajT1Ptam85bY51eRf/AJRuM3w="

FAX_KEY = "PSKexample0000signingkey"
FAX_URL = "https://fax-gw.example.com/signalwire/fax-status?job=42"
FAX_PARAMS = {
    "AccountSid": "b3877c40-da60-4998-90ad-b792e98472ac",
    "ApiVersion": "v1",
    "FaxSid": "b3877c40-da60-4998-90ad-b792e98472fx",
    "FaxStatus": "delivered",
    "From": "+13103383454",
    "To": "+13104456789",
    "NumPages": "2",
}
FAX_SIG = "/hiGrB3y8ToXmKoe8ebdell2C6A="


def test_twilio_vector() -> None:
    assert compute_signature(TWILIO_KEY, TWILIO_URL, TWILIO_PARAMS) == TWILIO_SIG


def test_twilio_vector_with_port() -> None:
    url = "https://mycompany.com:443/myapp.php?foo=1&bar=2"
    assert compute_signature(TWILIO_KEY, url, TWILIO_PARAMS) == TWILIO_SIG_443


def test_fax_vector() -> None:
    assert compute_signature(FAX_KEY, FAX_URL, FAX_PARAMS) == FAX_SIG
    assert verify_signature(FAX_KEY, FAX_URL, FAX_PARAMS, FAX_SIG)


def test_param_order_does_not_matter() -> None:
    reordered = list(reversed(list(FAX_PARAMS.items())))
    assert compute_signature(FAX_KEY, FAX_URL, reordered) == FAX_SIG


def test_multidict_and_pairs_agree() -> None:
    pairs = [("b", "2"), ("a", "z"), ("a", "y")]
    expected = compute_signature("k", "https://h/", [("a", "y"), ("a", "z"), ("b", "2")])
    assert compute_signature("k", "https://h/", pairs) == expected
    assert compute_signature("k", "https://h/", MultiDict(pairs)) == expected


@pytest.mark.parametrize(
    ("signed_url", "checked_url"),
    [
        ("https://mycompany.com/myapp.php?foo=1&bar=2", "https://mycompany.com:443/myapp.php?foo=1&bar=2"),
        ("https://mycompany.com:443/myapp.php?foo=1&bar=2", "https://mycompany.com/myapp.php?foo=1&bar=2"),
        ("http://gw.example/cb", "http://gw.example:80/cb"),
        ("http://gw.example:80/cb", "http://gw.example/cb"),
        ("https://[2001:db8::1]/cb?x=1", "https://[2001:db8::1]:443/cb?x=1"),
        ("https://[2001:db8::1]:443/cb", "https://[2001:db8::1]/cb"),
    ],
)
def test_default_port_variants_accepted(signed_url: str, checked_url: str) -> None:
    signature = compute_signature(TWILIO_KEY, signed_url, TWILIO_PARAMS)
    assert verify_signature(TWILIO_KEY, checked_url, TWILIO_PARAMS, signature)


def test_vectors_verify_across_port_forms() -> None:
    url_443 = "https://mycompany.com:443/myapp.php?foo=1&bar=2"
    assert verify_signature(TWILIO_KEY, TWILIO_URL, TWILIO_PARAMS, TWILIO_SIG)
    assert verify_signature(TWILIO_KEY, TWILIO_URL, TWILIO_PARAMS, TWILIO_SIG_443)
    assert verify_signature(TWILIO_KEY, url_443, TWILIO_PARAMS, TWILIO_SIG)


def test_non_default_port_is_not_interchangeable() -> None:
    signature = compute_signature("k", "https://h:8443/cb", {"a": "1"})
    assert not verify_signature("k", "https://h/cb", {"a": "1"}, signature)
    assert not verify_signature("k", "http://h:443/cb", {"a": "1"}, signature)


@pytest.mark.parametrize(
    ("url", "with_port", "without_port"),
    [
        ("https://a.example/x?y=1", "https://a.example:443/x?y=1", "https://a.example/x?y=1"),
        ("https://a.example:443/x", "https://a.example:443/x", "https://a.example/x"),
        ("http://a.example", "http://a.example:80", "http://a.example"),
        ("http://a.example?q=1", "http://a.example:80?q=1", "http://a.example?q=1"),
        ("https://a.example:8443/", "https://a.example:8443/", "https://a.example:8443/"),
        ("http://[::1]:80/p", "http://[::1]:80/p", "http://[::1]/p"),
        ("http://[::1]/p", "http://[::1]:80/p", "http://[::1]/p"),
        ("https://u:pw@h.example/p", "https://u:pw@h.example:443/p", "https://u:pw@h.example/p"),
        ("HTTPS://H.example/p", "HTTPS://H.example:443/p", "HTTPS://H.example/p"),
        # A port-like string in the query is not the authority's port.
        ("https://h.example/p?u=http://x:443/", "https://h.example:443/p?u=http://x:443/",
         "https://h.example/p?u=http://x:443/"),
        ("ftp://h.example/p", "ftp://h.example/p", "ftp://h.example/p"),
        ("not a url", "not a url", "not a url"),
    ],
)
def test_port_helpers(url: str, with_port: str, without_port: str) -> None:
    assert _with_default_port(url) == with_port
    assert _without_default_port(url) == without_port


def test_tampered_param_fails() -> None:
    tampered = {**FAX_PARAMS, "FaxStatus": "failed"}
    assert not verify_signature(FAX_KEY, FAX_URL, tampered, FAX_SIG)


def test_added_param_fails() -> None:
    extra = {**FAX_PARAMS, "ErrorCode": "63019"}
    assert not verify_signature(FAX_KEY, FAX_URL, extra, FAX_SIG)


def test_tampered_url_fails() -> None:
    assert not verify_signature(FAX_KEY, FAX_URL.replace("job=42", "job=43"), FAX_PARAMS, FAX_SIG)
    assert not verify_signature(FAX_KEY, FAX_URL.replace("https", "http"), FAX_PARAMS, FAX_SIG)


def test_wrong_key_fails() -> None:
    assert not verify_signature("another-key", FAX_URL, FAX_PARAMS, FAX_SIG)
    assert not verify_signature("", FAX_URL, FAX_PARAMS, FAX_SIG)


@pytest.mark.parametrize("signature", [None, "", "not base64 at all", "ü-non-ascii"])
def test_missing_or_garbage_signature_fails(signature: str | None) -> None:
    assert not verify_signature(FAX_KEY, FAX_URL, FAX_PARAMS, signature)


def test_bare_url_signature_rejected_for_a_form() -> None:
    bare = compute_signature(FAX_KEY, FAX_URL, {})
    assert not verify_signature(FAX_KEY, FAX_URL, FAX_PARAMS, bare)
    assert verify_signature(FAX_KEY, FAX_URL, {}, bare)


_names = st.text(min_size=1, max_size=20)
_values = st.text(max_size=40)
_params = st.lists(st.tuples(_names, _values), max_size=12)


@settings(max_examples=200, deadline=None)
@given(key=st.text(min_size=1, max_size=40), path=st.text(max_size=30), params=_params)
def test_roundtrip_property(key: str, path: str, params: list[tuple[str, str]]) -> None:
    url = "https://gw.example/cb/" + path
    signature = compute_signature(key, url, params)
    assert verify_signature(key, url, params, signature)
    # Order of arrival is irrelevant, and the default port may be written or not.
    assert verify_signature(key, url, list(reversed(params)), signature)
    assert verify_signature(key, _with_default_port(url), params, signature)


@settings(max_examples=100, deadline=None)
@given(key=st.text(min_size=1, max_size=40), params=_params, extra=st.tuples(_names, _values))
def test_changed_value_fails_property(key: str, params: list[tuple[str, str]],
                                      extra: tuple[str, str]) -> None:
    url = "https://gw.example/cb"
    signature = compute_signature(key, url, params)
    name, value = extra
    changed = [*params, (name, value + "x")]
    assert not verify_signature(key, url, changed, signature)
