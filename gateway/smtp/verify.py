"""Proven senders (SENDER_VERIFY=dmarc): the From: domain must vouch for the mail.

ALLOWED_SENDERS matches addresses that anyone can write. Mail from the internet, or from
Microsoft 365 and Google (whose servers every tenant shares, so an IP allow-list lets them
all in), is accepted only when SPF or DKIM passes for a domain aligned with the From: domain,
as DMARC (RFC 7489) defines it: the DMARC record's `aspf` / `adkim` modes, relaxed (same
organisational domain) when the domain publishes none. A client that logged in (SMTP AUTH)
or connects from TRUSTED_NETWORKS is proven already and is not looked up.

dkimpy checks the signatures and pyspf evaluates the SPF policy (mechanisms, macros, its own
limits of 10 lookups and 2 void lookups); both are handed our DNS lookups, which go to the
configured resolver (DNS_NAMESERVERS, else the system's), count against MAX_DNS_LOOKUPS and
share one deadline (DNS_TIMEOUT_SECONDS) per mail. They are blocking libraries, so a check
runs in a small thread pool of its own, never on the event loop, and never in the default
executor that the spool and the store use. The outcome is an RFC 8601
Authentication-Results value (built with authres), kept with the message.

A DNS failure where a pass could still have come is `451 4.7.5` (the sending server tries
again later); a mail proven by neither check is `550 5.7.1`, naming what each check found,
and no report is mailed (its From: cannot be trusted).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from email import policy
from email.parser import BytesHeaderParser
from email.utils import getaddresses
from pathlib import Path
from typing import Any

import authres
import dkim
import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver
import spf
from authres.dmarc import DMARCAuthenticationResult
from publicsuffixlist import PublicSuffixList

from gateway.config import Settings
from gateway.constants import MAX_CONCURRENT_VERIFICATIONS, MAX_DKIM_SIGNATURES, MAX_DNS_LOOKUPS
from gateway.documents.mime import header_address, header_block, raw_header
from gateway.sanitise import one_line
from gateway.smtp import replies
from gateway.smtp.access import Client
from gateway.smtp.replies import Reply

log = logging.getLogger(__name__)
# dkimpy logs every bad signature or missing key at ERROR: the sender's problem, not ours;
# the one line per mail below says what was found.
_DKIM_LOG = logging.getLogger(__name__ + ".dkimpy")
_DKIM_LOG.setLevel(logging.CRITICAL)

__all__ = ["SenderVerifier", "Verdict", "organisational_domain"]


@dataclass(frozen=True)
class Verdict:
    """`reply` None: the sender is proven (or need not be); `auth_results`: what to keep with
    the message (the value of an Authentication-Results header field), None when not checked."""

    reply: Reply | None
    auth_results: str | None


def sender_unproven(domain: str, found: str) -> Reply:
    domain = one_line(domain, 80, ascii_only=True)  # the whole reply stays under 512 octets
    return Reply(550, "5.7.1", f"Sender not proven: the From: domain {domain} does not vouch "
                 f"for this mail ({found}); DMARC needs SPF or DKIM to pass for {domain}",
                 "policy")


def verify_unavailable(why: str) -> Reply:
    return Reply(451, "4.7.5", f"Temporary failure: the sender's domain could not be checked "
                 f"({why}); please try again later", "temp_failure")


FROM_NOT_ONE = Reply(550, "5.7.1", "Sender not proven: the From: header must name exactly one "
                     "address, written plainly (Name <address>)", "policy")


# -- DNS --------------------------------------------------------------------------------------


class DnsTempError(Exception):
    """A lookup that did not get an answer (timeout, SERVFAIL, no resolver answered)."""


class DnsBudgetError(Exception):
    """MAX_DNS_LOOKUPS or the deadline was used up: a permanent error for this mail."""


_PSL: PublicSuffixList | None = None
_PSL_LOCK = threading.Lock()


def organisational_domain(domain: str) -> str:
    """RFC 7489 3.2: the registrable domain under the public suffix list (the domain itself
    when it has none, e.g. a private name)."""
    global _PSL
    with _PSL_LOCK:
        if _PSL is None:
            _PSL = PublicSuffixList()
        psl = _PSL
    return psl.privatesuffix(domain) or domain


def _aligned(a: str, b: str, mode: str) -> bool:
    a, b = a.lower().rstrip("."), b.lower().rstrip(".")
    if mode == "s":
        return a == b
    return organisational_domain(a) == organisational_domain(b)


class Lookups:
    """One mail's lookups: counted, under one deadline, through the shared resolver; the
    failures are remembered so the verdict can tell 'try later' from 'no'."""

    def __init__(self, resolver: dns.resolver.Resolver | None, timeout_s: float,
                 max_lookups: int = MAX_DNS_LOOKUPS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.resolver = resolver
        self.clock = clock
        self.deadline = clock() + timeout_s
        self.left = max_lookups
        self.failures: list[str] = []

    def query(self, name: str, rdtype: str) -> list[Any]:
        """The records of `name` (NXDOMAIN or no data: []); DnsTempError, DnsBudgetError."""
        if self.resolver is None:
            self.failures.append("no DNS resolver is configured")
            raise DnsTempError("no DNS resolver is configured")
        remaining = self.deadline - self.clock()
        if remaining <= 0:
            self.failures.append("DNS lookups took too long")
            raise DnsTempError("DNS lookups took too long")
        if self.left <= 0:
            raise DnsBudgetError(f"more than {MAX_DNS_LOOKUPS} DNS lookups")
        self.left -= 1
        try:
            answer = self.resolver.resolve(dns.name.from_text(name), rdtype, search=False,
                                           lifetime=remaining, raise_on_no_answer=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except dns.exception.Timeout:
            self.failures.append(f"no DNS answer for {one_line(name, 100, ascii_only=True)}")
            raise DnsTempError("timeout") from None
        except (dns.resolver.NoNameservers, dns.resolver.NoResolverConfiguration,
                dns.resolver.LifetimeTimeout, OSError) as exc:
            self.failures.append(f"DNS failed for {one_line(name, 100, ascii_only=True)}")
            raise DnsTempError(type(exc).__name__) from None
        except dns.exception.DNSException as exc:  # a name that cannot be asked (too long...)
            log.debug("DNS %s %s: %s", rdtype, name, exc)
            return []
        return list(answer.rrset or [])

    def txt(self, name: str) -> list[bytes]:
        return [b"".join(r.strings) for r in self.query(name, "TXT")]

    def dkim_txt(self, name: bytes | str, timeout: float = 5) -> bytes | None:
        """dkimpy's `dnsfunc`: the key record, or None when there is none."""
        text = name.decode("ascii", "replace") if isinstance(name, bytes) else name
        try:
            records = self.txt(text)
        except DnsTempError as exc:
            raise dkim.DnsTimeoutError(str(exc)) from None
        except DnsBudgetError:
            return None
        return records[0] if records else None

    def spf_lookup(self, name: str, qtype: str, strict: Any = True,
                   timeout: float = 30) -> list[tuple[tuple[str, str], Any]]:
        """pyspf's DNSLookup: ((name, type), value) pairs, TempError / PermError."""
        try:
            records = self.query(name, qtype)
        except DnsTempError as exc:
            raise spf.TempError(f"DNS {exc}") from None
        except DnsBudgetError as exc:
            raise spf.PermError(str(exc)) from None
        out: list[tuple[tuple[str, str], Any]] = []
        for r in records:
            if qtype in ("A", "AAAA"):
                out.append(((name, qtype), r.address))
            elif qtype == "MX":
                out.append(((name, qtype), (r.preference, r.exchange)))
            elif qtype == "PTR":
                out.append(((name, qtype), r.target.to_text(True)))
            elif qtype in ("TXT", "SPF"):
                out.append(((name, qtype), r.strings))
        return out


# pyspf looks names up through its module-level `DNSLookup` (the hook its own tests replace);
# while a check runs, the thread's Lookups answer instead, so SPF uses our resolver, deadline
# and count. Other callers of pyspf (none in the gateway) keep its own lookups.
_current = threading.local()
_pyspf_lookup = spf.DNSLookup


def _spf_dns(name: str, qtype: str, strict: Any = True, timeout: float = 30) -> Any:
    lookups: Lookups | None = getattr(_current, "lookups", None)
    if lookups is None:
        return _pyspf_lookup(name, qtype, strict, timeout)
    return lookups.spf_lookup(name, qtype, strict, timeout)


spf.DNSLookup = _spf_dns


# -- the checks -------------------------------------------------------------------------------


@dataclass
class _Found:
    from_domain: str
    spf: str = "none"
    spf_domain: str = ""
    spf_reason: str = ""
    dkim: list[tuple[str, str, str, str]] = field(default_factory=list)  # result, d, s, why
    dmarc_record: dict[str, str] | None = None
    dmarc_temp: bool = False


_MAX_HEADER_BYTES = 256 * 1024


def _one_from_domain(data: bytes) -> str | None:
    """The domain of the From: address the intake will use (mime.header_address over the
    same header block, read the way the intake reads it), or None: not exactly one From:
    field naming exactly one address, or one that the stdlib's reading (getaddresses) sees
    as another address. One reading decides both what is verified and where the fax's
    report goes, so a From: that parsers read differently cannot split them."""
    head = header_block(data)
    if len(head) > _MAX_HEADER_BYTES:
        return None
    headers = BytesHeaderParser(policy=policy.compat32).parsebytes(head)
    if sum(1 for key, _ in headers.raw_items() if key.lower() == "from") != 1:
        return None
    raw = raw_header(headers, "from") or ""
    used = header_address(raw)
    addresses = [a for _, a in getaddresses([raw]) if a]
    if used is None or len(addresses) != 1 or addresses[0].lower() != used.lower():
        return None
    domain = used.rpartition("@")[2].strip().rstrip(".>").lower()
    if not domain or any(c in domain for c in " <>\"\\") or not domain.isascii():
        return None
    return domain


def _dmarc_tags(record: bytes) -> dict[str, str]:
    tags: dict[str, str] = {}
    for item in record.decode("ascii", "replace").split(";"):
        key, sep, value = item.partition("=")
        if sep:
            tags[key.strip().lower()] = value.strip().lower()
    return tags


def _dmarc_record(lookups: Lookups, found: _Found) -> None:
    """The From: domain's DMARC record, else its organisational domain's (RFC 7489 6.6.3)."""
    names = [found.from_domain]
    org = organisational_domain(found.from_domain)
    if org != found.from_domain:
        names.append(org)
    for name in names:
        try:
            records = [r for r in lookups.txt(f"_dmarc.{name}")
                       if r[:8].lower() == b"v=dmarc1"]
        except DnsTempError:
            found.dmarc_temp = True
            return
        except DnsBudgetError:
            return
        if len(records) == 1:
            found.dmarc_record = _dmarc_tags(records[0])
            return


def _check_dkim(data: bytes, lookups: Lookups, found: _Found) -> None:
    try:
        checker = dkim.DKIM(data, logger=_DKIM_LOG)
    except Exception as exc:  # noqa: BLE001 - a header block dkimpy cannot split: no pass
        found.dkim.append(("permerror", "", "", f"unreadable header ({type(exc).__name__})"))
        return
    count = sum(1 for name, _ in checker.headers if name.lower() == b"dkim-signature")
    for idx in range(min(count, MAX_DKIM_SIGNATURES)):
        failures = len(lookups.failures)
        why = ""
        checker.signature_fields = {}  # not the previous signature's, if this one is unreadable
        try:
            ok = checker.verify(idx=idx, dnsfunc=lookups.dkim_txt)
        except dkim.DKIMException as exc:
            ok, why = False, str(exc)
        except Exception as exc:  # noqa: BLE001 - dkimpy on hostile input: a failed signature
            ok, why = False, f"unreadable signature ({type(exc).__name__})"
        fields = checker.signature_fields or {}
        d = fields.get(b"d", b"").decode("ascii", "replace").lower()
        s = fields.get(b"s", b"").decode("ascii", "replace")
        if ok:
            result = "pass"
        elif len(lookups.failures) > failures:
            result, why = "temperror", "the key could not be looked up"
        else:
            result, why = "fail", why or "signature or key did not verify"
        found.dkim.append((result, d, s, one_line(why, 120, ascii_only=True)))


def _check_spf(ip: str, mail_from: str, helo: str, lookups: Lookups, found: _Found) -> None:
    sender = mail_from or f"postmaster@{helo}"
    found.spf_domain = sender.rpartition("@")[2].lower().rstrip(".")
    try:
        address = ipaddress.ip_address(ip)
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            ip = str(address.ipv4_mapped)
    except ValueError:
        found.spf, found.spf_reason = "permerror", "client address unknown"
        return
    _current.lookups = lookups
    try:
        result, _, explanation = spf.query(i=ip, s=sender, h=helo or "unknown",
                                           timeout=max(0.1, lookups.deadline - lookups.clock()),
                                           querytime=0).check()
    except Exception as exc:  # noqa: BLE001 - pyspf on hostile records: no pass
        result, explanation = "permerror", f"{type(exc).__name__}"
    finally:
        _current.lookups = None
    found.spf = str(result or "none")
    found.spf_reason = one_line(str(explanation or ""), 120, ascii_only=True)


def evaluate(data: bytes, ip: str, mail_from: str, helo: str, lookups: Lookups,
             authserv_id: str) -> Verdict:
    """The whole check over one mail (blocking: DNS through `lookups`)."""
    from_domain = _one_from_domain(data)
    if from_domain is None:
        return Verdict(FROM_NOT_ONE, None)
    found = _Found(from_domain)
    _check_dkim(data, lookups, found)
    _check_spf(ip, mail_from, helo, lookups, found)
    _dmarc_record(lookups, found)
    tags = found.dmarc_record or {}
    aspf, adkim = tags.get("aspf", "r"), tags.get("adkim", "r")
    if aspf not in ("r", "s"):
        aspf = "r"
    if adkim not in ("r", "s"):
        adkim = "r"
    # Unknown modes (the record could not be read): only a strict match counts for sure.
    if found.dmarc_temp:
        aspf = adkim = "s"
    spf_ok = found.spf == "pass" and _aligned(found.spf_domain, from_domain, aspf)
    dkim_ok = [d for result, d, _, _ in found.dkim
               if result == "pass" and _aligned(d, from_domain, adkim)]
    proven = spf_ok or bool(dkim_ok)
    header = _auth_results(authserv_id, found, proven, mail_from)
    if proven:
        return Verdict(None, header)
    temporary = (found.spf == "temperror" or found.dmarc_temp
                 or any(r == "temperror" for r, _, _, _ in found.dkim))
    if temporary:
        why = lookups.failures[0] if lookups.failures else "DNS failed"
        return Verdict(verify_unavailable(why), header)
    return Verdict(sender_unproven(from_domain, _summary(found, aspf, adkim)), header)


def _summary(found: _Found, aspf: str, adkim: str) -> str:
    """What each check found, in words for the SMTP reply."""
    if found.spf == "pass":
        spf_text = (f"SPF pass for {found.spf_domain}, which is not aligned with "
                    f"{found.from_domain}")
    else:
        spf_text = f"SPF {found.spf} for {found.spf_domain or 'the envelope sender'}"
    if not found.dkim:
        dkim_text = "DKIM none (not signed)"
    else:
        parts = []
        for result, d, _, why in found.dkim[:3]:
            if result == "pass":
                parts.append(f"pass for {d}, which is not aligned")
            else:
                parts.append(f"{result} for {d or '?'}" + (f": {why}" if why else ""))
        dkim_text = "DKIM " + "; ".join(parts)
    text = f"{spf_text}; {dkim_text}"
    return one_line(text, 200, ascii_only=True)


def _auth_results(authserv_id: str, found: _Found, proven: bool, mail_from: str) -> str:
    results: list[authres.BaseAuthenticationResult] = [
        authres.SPFAuthenticationResult(
            result=found.spf, reason=found.spf_reason or None,
            smtp_mailfrom=found.spf_domain or None)]
    if found.dkim:
        results.extend(authres.DKIMAuthenticationResult(
            result=result, reason=why or None, header_d=d or None, header_s=s or None)
            for result, d, s, why in found.dkim)
    else:
        results.append(authres.DKIMAuthenticationResult(result="none"))
    if found.dmarc_record is not None:
        dmarc_result = "pass" if proven else "fail"
        policy_tag = found.dmarc_record.get("p", "none")
    else:
        dmarc_result = "temperror" if found.dmarc_temp else "none"
        policy_tag = None
    results.append(DMARCAuthenticationResult(result=dmarc_result, header_from=found.from_domain,
                                             policy=policy_tag))
    text = str(authres.AuthenticationResultsHeader(authserv_id=authserv_id, results=results))
    return one_line(text.partition(":")[2].strip(), 1000, ascii_only=True)


# -- the SMTP side ----------------------------------------------------------------------------


class SenderVerifier:
    """The SMTP edge's sender check at DATA (SENDER_VERIFY); one per daemon."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.enabled = settings.access.sender_verify == "dmarc"
        self.resolver: dns.resolver.Resolver | None = None
        self._pool: ThreadPoolExecutor | None = None
        if not self.enabled:
            return
        try:
            self.resolver = dns.resolver.Resolver(configure=not settings.access.dns_nameservers)
        except dns.resolver.NoResolverConfiguration as exc:
            log.error("SENDER_VERIFY=dmarc: no system DNS resolver (%s); set DNS_NAMESERVERS. "
                      "Unproven senders get 451 until then", exc)
        if self.resolver is not None:
            if settings.access.dns_nameservers:
                self.resolver.nameservers = [dns.nameserver.Do53Nameserver(h.host, h.port)
                                             for h in settings.access.dns_nameservers]
            self.resolver.timeout = settings.access.dns_timeout_s
            self.resolver.lifetime = settings.access.dns_timeout_s
        self._pool = ThreadPoolExecutor(MAX_CONCURRENT_VERIFICATIONS,
                                        thread_name_prefix="sender-verify")

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def proven_by_session(self, user: str | None, trusted: bool, ip: str) -> str | None:
        """The Authentication-Results value for a client proven by AUTH or its network."""
        host = self.settings.smtp.hostname
        if user is not None:
            return str(authres.AuthenticationResultsHeader(
                authserv_id=host, results=[authres.SMTPAUTHAuthenticationResult(
                    result="pass", smtp_auth=user)])).partition(":")[2].strip()
        if trusted:
            return f"{host}; none (client {ip} is on a trusted network)"
        return None

    async def check(self, path: Path, client: Client, helo: str) -> Verdict:
        if not self.enabled:
            return Verdict(None, None)
        ip, mail_from = client.ip, client.envelope_from or ""
        user = client.user.name if client.user is not None else None
        trusted = client.trusted
        if user is not None or trusted:
            return Verdict(None, self.proven_by_session(user, trusted, ip))
        if self._pool is None:  # the listeners are stopping
            return Verdict(replies.SHUTTING_DOWN, None)
        loop = asyncio.get_running_loop()
        verdict = await loop.run_in_executor(self._pool, _evaluate_file, path, ip, mail_from,
                                             helo, self.resolver,
                                             self.settings.access.dns_timeout_s,
                                             self.settings.smtp.hostname)
        if verdict.reply is not None:
            log.warning("sender <%s> from %s not proven: %s", one_line(mail_from, 200), ip,
                        verdict.reply)
        else:
            log.info("sender <%s> from %s proven: %s", one_line(mail_from, 200), ip,
                     verdict.auth_results)
        return verdict


def _evaluate_file(path: Path, ip: str, mail_from: str, helo: str,
                   resolver: dns.resolver.Resolver | None, timeout_s: float,
                   authserv_id: str) -> Verdict:
    """In a pool thread. The DNS deadline starts here, when the check has its thread: in a
    burst a check may wait for one, and that wait is not the DNS's time."""
    lookups = Lookups(resolver, timeout_s)
    return evaluate(path.read_bytes(), ip, mail_from, helo, lookups, authserv_id)
