"""SENDER_VERIFY=dmarc: the From: domain must vouch for a sender that neither logged in nor is on
a trusted network. A real DNS server on loopback serves the SPF policies, DMARC records and DKIM
keys; mails are signed with dkimpy and a key made here; the gateway is reached over SMTP."""

from __future__ import annotations

import asyncio
import base64
import html
import inspect
import os
import re
import smtplib
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path

import aiohttp
import dkim
import pytest
import spf
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.config import ConfigError, settings_from
from gateway.smtp.verify import Lookups, SenderVerifier, evaluate
from gateway.users import User, hash_password, passwd_command, write_user

from .conftest import _send_blocking, base_env, job_ids, make_pdf, smtp_send
from .dns_server import DnsServer

RCPT = "15551234567@fax.local"


@pytest.fixture(scope="module")
def keys() -> dict[str, bytes]:
    """Two RSA keys: the one signed.example publishes, and a forger's."""
    made = {}
    for name in ("published", "forger"):
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        made[name] = key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.TraditionalOpenSSL,
                                       serialization.NoEncryption())
        made[name + ".pub"] = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return made


@pytest.fixture
def dns_server(keys: dict[str, bytes]) -> Iterator[DnsServer]:
    server = DnsServer()
    pub = base64.b64encode(keys["published.pub"]).decode()
    # signed.example: DKIM-signs its mail; its SPF does not list this client.
    server.add_txt("signed.example", "v=spf1 ip4:192.0.2.10 -all")
    server.add_txt("sel._domainkey.signed.example", f"v=DKIM1; k=rsa; p={pub}")
    server.add_txt("_dmarc.signed.example", "v=DMARC1; p=reject; adkim=r; aspf=r")
    # spf.example: sends from this client's address (SPF), signs nothing.
    server.add_txt("spf.example", "v=spf1 ip4:127.0.0.1 -all")
    server.add_txt("_dmarc.spf.example", "v=DMARC1; p=quarantine")
    # forged.example: neither lists this client nor signs with a key it published.
    server.add_txt("forged.example", "v=spf1 ip4:192.0.2.20 -all")
    server.add_txt("sel._domainkey.forged.example", f"v=DKIM1; k=rsa; p={pub}")
    server.add_txt("_dmarc.forged.example", "v=DMARC1; p=reject")
    server.start()
    yield server
    server.stop()


def mail(sender: str, *, key: bytes | None = None, domain: str | None = None) -> bytes:
    msg = EmailMessage()
    msg["From"] = f"Alice <{sender}>"
    msg["To"] = RCPT
    msg["Subject"] = "Invoice 42"
    msg["Message-ID"] = make_msgid(domain=sender.rpartition("@")[2])
    msg.set_content("Please fax the attached invoice.\n")
    msg.add_attachment(make_pdf(1), maintype="application", subtype="pdf",
                       filename="invoice.pdf")
    data = msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))
    if key is None:
        return data
    signature = dkim.sign(data, b"sel", (domain or sender.rpartition("@")[2]).encode(), key,
                          include_headers=[b"from", b"to", b"subject", b"message-id"])
    return signature + data


def verify_env(tmp_path: Path, dns_server: DnsServer, **extra: str) -> dict[str, str]:
    return base_env(tmp_path / "var", **{
        "SENDER_VERIFY": "dmarc", "DNS_NAMESERVERS": dns_server.address, "TRUSTED_NETWORKS": "",
        "ALLOWED_SENDERS": "signed.example,spf.example,forged.example", **extra})


def faxgw_job(env: dict[str, str], job_id: str) -> str:
    done = subprocess.run([sys.executable, "-m", "gateway", "job", job_id],
                          env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(params=["sqlite", "postgres"])
def store_env(request: pytest.FixtureRequest) -> dict[str, str]:
    """The store the message (and its Authentication-Results) is kept in."""
    if request.param == "sqlite":
        return {}
    seaweed = request.getfixturevalue("seaweed")
    monkeypatch = request.getfixturevalue("monkeypatch")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweed.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweed.secret_key)
    return {"DATABASE_URL": request.getfixturevalue("pg_url"), "MEDIA_STORE": "s3",
            "S3_BUCKET": "faxgw-test", "S3_PREFIX": f"verify-{request.node.name[-20:]}",
            "S3_ENDPOINT_URL": seaweed.endpoint_url, "S3_REGION": seaweed.region,
            "AWS_ACCESS_KEY_ID": seaweed.access_key,
            "AWS_SECRET_ACCESS_KEY": seaweed.secret_key}


async def test_dkim_pass_aligned_is_accepted_and_recorded(make_gateway, dns_server: DnsServer,
                                                          keys, store_env, tmp_path) -> None:
    users = tmp_path / "users"
    passwd_command(users, "ann", "ann-admin-pw", role="admin")  # for the dashboard
    env = verify_env(tmp_path, dns_server, USERS_FILE=str(users), **store_env)
    gw = await make_gateway(env)
    reply = await smtp_send(gw.smtp.port, mail("alice@signed.example", key=keys["published"]),
                            [RCPT], mail_from="alice@signed.example")
    assert reply.code == 250, reply.text
    [job_id] = job_ids(reply.text)
    job = await gw.store.run(gw.store.job, job_id)
    message = await gw.store.run(gw.store.message, job.message_id)
    results = message.auth_results
    assert results.startswith("faxgw.test; spf=fail")
    assert "dkim=pass header.d=signed.example header.s=sel" in results
    assert "dmarc=pass header.from=signed.example policy.dmarc=reject" in results
    assert ("sel._domainkey.signed.example", "TXT") in dns_server.queries
    shown = await asyncio.to_thread(faxgw_job, env, job_id)
    assert f"Authentication-Results: {results}" in shown
    base = f"http://127.0.0.1:{gw.dashboard.port}"
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        async with http.get(base + "/login") as r:
            token = re.search(r'name="login_token" value="([^"]+)"', await r.text())
        assert token
        async with http.post(base + "/login", allow_redirects=False, data={
                "login_token": token.group(1), "name": "ann", "password": "ann-admin-pw"}) as r:
            assert r.status == 303
        async with http.get(f"{base}/jobs/{job_id}") as r:
            assert r.status == 200
            page = html.unescape(await r.text())
    assert f"<dt>Authentication</dt><dd class=\"mono\">{results}</dd>" in page


async def test_spf_pass_aligned_is_accepted(make_gateway, dns_server: DnsServer,
                                            tmp_path) -> None:
    gw = await make_gateway(verify_env(tmp_path, dns_server))
    reply = await smtp_send(gw.smtp.port, mail("bob@spf.example"), [RCPT],
                            mail_from="bob@spf.example")
    assert reply.code == 250, reply.text
    [job_id] = job_ids(reply.text)
    job = await gw.store.run(gw.store.job, job_id)
    message = await gw.store.run(gw.store.message, job.message_id)
    assert ("spf=pass" in message.auth_results
            and "smtp.mailfrom=spf.example" in message.auth_results)
    assert "dkim=none" in message.auth_results and "dmarc=pass" in message.auth_results


async def test_spf_pass_for_another_domain_is_not_aligned(make_gateway, dns_server: DnsServer,
                                                          tmp_path) -> None:
    """The envelope is spf.example (SPF passes for it), the From: is forged.example: DMARC
    wants the domain that passes to be the From: domain."""
    gw = await make_gateway(verify_env(tmp_path, dns_server))
    reply = await smtp_send(gw.smtp.port, mail("ceo@forged.example"), [RCPT],
                            mail_from="bob@spf.example")
    assert reply.code == 550, reply.text
    assert reply.text.startswith("5.7.1 Sender not proven: the From: domain forged.example")
    assert "SPF pass for spf.example, which is not aligned with forged.example" in reply.text


async def test_both_fail_is_refused_naming_each_check_and_no_report(
        make_gateway, dns_server: DnsServer, keys, tmp_path) -> None:
    env = verify_env(tmp_path, dns_server, REPORT_REFUSALS="yes")
    gw = await make_gateway(env)
    forged = mail("ceo@forged.example", key=keys["forger"])  # signed with a key not published
    reply = await smtp_send(gw.smtp.port, forged, [RCPT], mail_from="ceo@forged.example")
    assert reply.code == 550, reply.text
    assert reply.text.startswith("5.7.1 Sender not proven: the From: domain forged.example "
                                 "does not vouch for this mail (SPF fail for forged.example; "
                                 "DKIM fail for forged.example")
    assert not gw.intake._tasks  # no refusal report on its way
    outbox = tmp_path / "var" / "outbox"
    assert not outbox.exists() or not list(outbox.iterdir())

    # The same mail with the check off goes through: the refusal above was the check's.
    await gw.stop(grace_s=5)
    gw = await make_gateway({**env, "SENDER_VERIFY": "off"})
    reply = await smtp_send(gw.smtp.port, forged, [RCPT], mail_from="ceo@forged.example")
    assert reply.code == 250, reply.text


async def test_dns_down_is_a_temporary_failure(make_gateway, dns_server: DnsServer, keys,
                                               tmp_path) -> None:
    gw = await make_gateway(verify_env(tmp_path, dns_server, DNS_TIMEOUT_SECONDS="1"))
    dns_server.silent = True  # takes the queries, never answers
    reply = await smtp_send(gw.smtp.port, mail("alice@signed.example", key=keys["published"]),
                            [RCPT], mail_from="alice@signed.example")
    assert reply.code == 451, reply.text
    assert reply.text.startswith("4.7.5 Temporary failure: the sender's domain could not be "
                                 "checked")
    # Nothing listens on the port any more: refused at once, the same answer.
    dns_server.stop()
    reply = await smtp_send(gw.smtp.port, mail("bob@spf.example"), [RCPT],
                            mail_from="bob@spf.example")
    assert reply.code == 451, reply.text
    assert "4.7.5" in reply.text


async def test_trusted_network_and_auth_are_not_looked_up(make_gateway, dns_server: DnsServer,
                                                          keys, tmp_path) -> None:
    users = tmp_path / "users"
    write_user(users, User("scanner", hash_password("s3cret pass")))
    env = verify_env(tmp_path, dns_server, TRUSTED_NETWORKS="127.0.0.0/8")
    gw = await make_gateway(env)
    forged = mail("ceo@forged.example", key=keys["forger"])
    reply = await smtp_send(gw.smtp.port, forged, [RCPT], mail_from="ceo@forged.example")
    assert reply.code == 250, reply.text
    [job_id] = job_ids(reply.text)
    job = await gw.store.run(gw.store.job, job_id)
    message = await gw.store.run(gw.store.message, job.message_id)
    assert message.auth_results == "faxgw.test; none (client 127.0.0.1 is on a trusted network)"
    await gw.stop(grace_s=5)

    gw = await make_gateway(verify_env(tmp_path, dns_server, USERS_FILE=str(users),
                                       SMTP_AUTH_PLAINTEXT="yes"))

    def send_logged_in() -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", gw.smtp.port, timeout=30) as client:
            client.ehlo("scanner.test")
            client.login("scanner", "s3cret pass")
            client.mail("ceo@forged.example")
            client.rcpt(RCPT)
            # a new mail: the same one again would be the earlier job (dedup)
            return client.data(mail("ceo@forged.example", key=keys["forger"]))

    code, text = await asyncio.to_thread(send_logged_in)
    assert code == 250, text
    [job_id] = job_ids(text.decode())
    job = await gw.store.run(gw.store.job, job_id)
    message = await gw.store.run(gw.store.message, job.message_id)
    assert message.auth_results == "faxgw.test; auth=pass smtp.auth=scanner"
    assert dns_server.queries == []  # neither was looked up


async def test_spf_lookups_are_bounded(make_gateway, dns_server: DnsServer, tmp_path) -> None:
    """An SPF policy that includes another, and that another, twelve deep: RFC 7208's limit
    of 10 lookups stops it (permerror), well before the gateway's own count."""
    for n in range(12):
        dns_server.add_txt(f"l{n}.loop.example", f"v=spf1 include:l{n + 1}.loop.example -all")
    dns_server.add_txt("loop.example", "v=spf1 include:l0.loop.example -all")
    gw = await make_gateway(verify_env(tmp_path, dns_server, ALLOWED_SENDERS="loop.example"))
    reply = await smtp_send(gw.smtp.port, mail("x@loop.example"), [RCPT],
                            mail_from="x@loop.example")
    assert reply.code == 550, reply.text
    assert "SPF permerror for loop.example" in reply.text
    spf_queries = [q for q in dns_server.queries if q[0].endswith("loop.example")
                   and q[1] == "TXT" and not q[0].startswith("_dmarc")]
    assert 10 <= len(spf_queries) <= 12


def test_settings_name_the_variable() -> None:
    with pytest.raises(ConfigError) as err:
        settings_from({"SENDER_VERIFY": "spf", "DNS_NAMESERVERS": "dns.example,10.0.0.1:99999",
                       "DNS_TIMEOUT_SECONDS": "0"})
    problems = "\n".join(err.value.problems)
    assert "SENDER_VERIFY: 'spf' is not one of off, dmarc" in problems
    assert "DNS_NAMESERVERS: 'dns.example' is not an IP address" in problems
    assert "DNS_NAMESERVERS: '10.0.0.1:99999' is not an IP address" in problems
    assert "DNS_TIMEOUT_SECONDS: 0.0 is outside" in problems
    s = settings_from({"DNS_NAMESERVERS": "127.0.0.1:5353, [::1]:53, 10.0.0.53"})
    assert [(h.host, h.port) for h in s.access.dns_nameservers] == [
        ("127.0.0.1", 5353), ("::1", 53), ("10.0.0.53", 53)]
    assert s.access.sender_verify == "off"


@pytest.mark.parametrize("raw", [
    b"", b"\xff\xfe\r\n\r\n", b"From: <@>\r\n\r\n", b"From: a@b.example, c@d.example\r\n\r\n",
    b"From: a@b.example\r\nFrom: a@b.example\r\n\r\n",
    b"From: a@b.example\r\nDKIM-Signature: v=1; a=rsa-sha256; d=; s=\r\n\r\nx",
    b"From: a@b.example\r\nDKIM-Signature: \x00\xff garbage\r\n\r\nbody",
    b"From: a@b.example\r\nDKIM-Signature: v=1; a=rsa-sha256; d=b.example; s=sel; h=from;"
    b" bh=!!!; b=???\r\n\r\nbody",
])
def test_hostile_mail_is_an_answer_not_an_exception(raw: bytes) -> None:
    """The check itself, without sockets: whatever the header block holds, a reply comes out
    (no resolver here: a 451 once the From: is usable, else the 550 for the From:)."""
    verdict = evaluate(raw, "127.0.0.1", "a@b.example", "client.test", Lookups(None, 1.0),
                       "faxgw.test")
    assert verdict.reply is not None
    assert str(verdict.reply)[:9] in ("550 5.7.1", "451 4.7.5")


def mail_with_from(from_value: str, key: bytes, domain: str) -> bytes:
    """A mail whose From: field is written exactly so (no library re-folds it), DKIM-signed
    for `domain`."""
    data = mail("placeholder@signed.example")
    data = data.replace(b"From: Alice <placeholder@signed.example>\r\n",
                        f"From: {from_value}\r\n".encode(), 1)
    assert f"From: {from_value}\r\n".encode() in data
    signature = dkim.sign(data, b"sel", domain.encode(), key,
                          include_headers=[b"from", b"to", b"subject", b"message-id"])
    return signature + data


async def test_a_from_that_parsers_read_differently_cannot_split_check_and_sender(
        make_gateway, dns_server: DnsServer, keys, tmp_path) -> None:
    """The From: '(a (b) alice@signed.example) attacker@evil.example' is attacker@evil.example
    (RFC 5322: comments nest). evil.example signs it and DMARC passes for evil.example; the
    envelope names an allowed sender. The address verified and the address the gateway uses
    (ALLOWED_SENDERS, the report) must be the same one: evil.example is not allowed, so no
    fax, and the mail's own From: address is named in the refusal."""
    pub = base64.b64encode(keys["forger.pub"]).decode()
    dns_server.add_txt("sel._domainkey.evil.example", f"v=DKIM1; k=rsa; p={pub}")
    dns_server.add_txt("_dmarc.evil.example", "v=DMARC1; p=reject")
    dns_server.add_txt("evil.example", "v=spf1 -all")
    env = verify_env(tmp_path, dns_server, ALLOWED_SENDERS="signed.example")
    gw = await make_gateway(env)
    nested = "(a (b) alice@signed.example) attacker@evil.example"
    reply = await smtp_send(gw.smtp.port, mail_with_from(nested, keys["forger"], "evil.example"),
                            [RCPT], mail_from="alice@signed.example")
    assert reply.code == 550, reply.text
    assert reply.text == ("5.7.1 Sender <attacker@evil.example> is not allowed to send faxes "
                          "through this gateway")
    assert job_ids(reply.text) == []

    # A From: that the two readings would see as different addresses is refused outright.
    for unclear in ("alice@signed.example (x) <attacker@evil.example>",
                    '"a" alice@signed.example <attacker@evil.example>'):
        reply = await smtp_send(gw.smtp.port,
                                mail_with_from(unclear, keys["forger"], "evil.example"),
                                [RCPT], mail_from="alice@signed.example")
        assert reply.code == 550, (unclear, reply.text)
        assert reply.text.startswith("5.7.1 Sender not proven: the From: header must name "
                                     "exactly one address"), reply.text
    await gw.stop(grace_s=5)

    # With evil.example allowed, the same mail is faxed and its report goes where the check
    # looked: attacker@evil.example, never alice@.
    gw = await make_gateway({**env, "ALLOWED_SENDERS": "signed.example,evil.example"})
    reply = await smtp_send(gw.smtp.port, mail_with_from(nested, keys["forger"], "evil.example"),
                            [RCPT], mail_from="alice@signed.example")
    assert reply.code == 250, reply.text
    [job_id] = job_ids(reply.text)
    job = await gw.store.run(gw.store.job, job_id)
    message = await gw.store.run(gw.store.message, job.message_id)
    assert message.report_to == "attacker@evil.example"
    assert "dmarc=pass header.from=evil.example" in message.auth_results


async def test_a_burst_waiting_for_the_check_threads_keeps_its_whole_dns_time(
        make_gateway, dns_server: DnsServer, tmp_path) -> None:
    """Six times as many mails at once as there are check threads, and a resolver that takes
    0.3 s an answer (each check: about 0.6 s of DNS, within DNS_TIMEOUT_SECONDS=1.5). The
    checks queued behind others must still have their 1.5 s once they run: every sender is
    proven, none is told 451 because it waited for a thread."""
    from gateway.constants import MAX_CONCURRENT_VERIFICATIONS

    gw = await make_gateway(verify_env(tmp_path, dns_server, DNS_TIMEOUT_SECONDS="1.5",
                                       SMTP_MAX_CONNECTIONS_PER_IP="100"))
    dns_server.delay_s = 0.3
    count = 6 * MAX_CONCURRENT_VERIFICATIONS
    loop = asyncio.get_running_loop()
    # The clients get threads of their own: the default executor is the gateway's (spool,
    # store), and two dozen blocking clients in it would starve the gateway they talk to.
    with ThreadPoolExecutor(count) as clients:
        replies = await asyncio.gather(*(
            loop.run_in_executor(clients, _send_blocking, gw.smtp.port, mail("bob@spf.example"),
                                 "bob@spf.example", [RCPT])
            for _ in range(count)))
    assert [r.code for r in replies] == [250] * count, [r.text for r in replies if r.code != 250]
    # The resolver was slow for all of them: each check asked it (SPF and DMARC at least).
    assert len([q for q in dns_server.queries if q == ("spf.example", "TXT")]) == count


def test_the_dkimpy_and_pyspf_internals_verify_uses_are_still_there(
        dns_server: DnsServer, keys) -> None:
    """verify.py leans on what dkimpy and pyspf do not document (named next to them in
    pyproject.toml): dkimpy's `DKIM.headers` (to count the signatures) and
    `DKIM.signature_fields` (the d= and s= of the one just verified), and pyspf's
    module-level `spf.DNSLookup(name, qtype, tcpfallback, timeout)`, which verify.py replaces
    so that SPF asks our resolver. An upgrade that changes any of them fails here, by name."""
    from gateway.smtp import verify

    verifier = SenderVerifier(settings_from({"SENDER_VERIFY": "dmarc",
                                             "DNS_NAMESERVERS": dns_server.address}))
    try:
        lookups = Lookups(verifier.resolver, 5.0)
        data = mail("alice@signed.example", key=keys["published"])
        checker = dkim.DKIM(data)
        headers = getattr(checker, "headers", None)
        assert isinstance(headers, list) and all(
            isinstance(name, bytes) and isinstance(value, bytes) for name, value in headers), \
            "dkimpy's DKIM.headers is no longer a list of (name, value) bytes pairs"
        assert [name.lower() for name, _ in headers].count(b"dkim-signature") == 1
        assert checker.verify(idx=0, dnsfunc=lookups.dkim_txt), \
            "dkimpy's DKIM.verify(idx=, dnsfunc=) no longer verifies with our lookups"
        fields = getattr(checker, "signature_fields", None)
        assert isinstance(fields, dict) and fields.get(b"d") == b"signed.example" \
            and fields.get(b"s") == b"sel", \
            "dkimpy's DKIM.signature_fields no longer holds the verified signature's tags"

        assert spf.DNSLookup is verify._spf_dns, "pyspf's spf.DNSLookup hook is gone"
        params = inspect.signature(verify._pyspf_lookup).parameters
        assert list(params)[:2] == ["name", "qtype"] and len(params) == 4, \
            f"pyspf's DNSLookup changed its signature: {list(params)}"
        found = verify._Found("spf.example")
        verify._check_spf("127.0.0.1", "bob@spf.example", "client.test", lookups, found)
        assert found.spf == "pass", (found.spf, found.spf_reason)
        # Only our hook could have asked the loopback server: pyspf's own asks the system's.
        assert ("spf.example", "TXT") in dns_server.queries, \
            "pyspf no longer looks names up through spf.DNSLookup"
    finally:
        verifier.close()
