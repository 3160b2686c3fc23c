"""The flows of docs/mail-servers.md, each spoken as that server speaks it: Microsoft 365 (an
outbound connector to the fax domain), Google Workspace (a route for the fax domain) and a
Postfix relay (a transport map entry). Each connects over loopback to a real gateway set up as
the document says, STARTTLS with the certificate checked against a CA and the smart host's
name, the EHLO names, MAIL parameters and headers those servers send, the DKIM signatures
they add (made here with dkimpy), and a real DNS server for the SPF, DKIM and DMARC records."""

from __future__ import annotations

import asyncio
import base64
import datetime
import smtplib
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path

import dkim
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from .conftest import base_env, job_ids, make_pdf
from .corpus import winmail_dat
from .dns_server import DnsServer

SMART_HOST = "fax-gw.contoso.example"  # the name the connector / route / transport map uses
FAX_DOMAIN = "fax.contoso.example"
RCPT = f"15551234567@{FAX_DOMAIN}"


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


def _dkim_record(key: rsa.RSAPrivateKey) -> str:
    der = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"


@dataclass(frozen=True)
class Pki:
    ca: Path
    cert: Path
    key: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA and the gateway's certificate for SMART_HOST, as a public CA would issue it."""
    folder = tmp_path_factory.mktemp("pki")
    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = _key(), _key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test Root CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                       False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SMART_HOST)]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(SMART_HOST)]),
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = Pki(folder / "ca.pem", folder / "gw.pem", folder / "gw.key")
    paths.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths.cert.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    paths.key.write_bytes(_pem(key))
    return paths


@pytest.fixture(scope="module")
def dkim_keys() -> dict[str, rsa.RSAPrivateKey]:
    return {name: _key() for name in ("contoso", "contoso-tenant", "fabrikam-tenant",
                                      "google", "gapps")}


@pytest.fixture
def dns_server(dkim_keys: dict[str, rsa.RSAPrivateKey]) -> Iterator[DnsServer]:
    """contoso.example's records as its admin publishes them for Microsoft 365 or Google
    (SPF includes, DKIM selectors, DMARC), and the shared providers' own records. The
    providers' sending servers are 127.0.0.1 here, as they are shared by every tenant."""
    s = DnsServer()
    # Microsoft 365: SPF through the shared include; DKIM selector1 for the custom domain,
    # and the tenant's own onmicrosoft domain (what it signs with before DKIM is turned on).
    s.add_txt("contoso.example", "v=spf1 include:spf.protection.outlook.test -all")
    s.add_txt("spf.protection.outlook.test", "v=spf1 ip4:127.0.0.0/8 -all")
    s.add_txt("selector1._domainkey.contoso.example", _dkim_record(dkim_keys["contoso"]))
    s.add_txt("selector1-contoso-example._domainkey.contoso.onmicrosoft.test",
              _dkim_record(dkim_keys["contoso-tenant"]))
    s.add_txt("selector1-fabrikam-example._domainkey.fabrikam.onmicrosoft.test",
              _dkim_record(dkim_keys["fabrikam-tenant"]))
    s.add_txt("_dmarc.contoso.example", "v=DMARC1; p=reject; rua=mailto:dmarc@contoso.example")
    # Google Workspace: its SPF include; DKIM "google" selector for the custom domain, and the
    # gappssmtp.com-style signature Google adds for every Workspace domain.
    s.add_txt("gw.example", "v=spf1 include:_spf.google.test ~all")
    s.add_txt("_spf.google.test", "v=spf1 ip4:127.0.0.0/8 ~all")
    s.add_txt("google._domainkey.gw.example", _dkim_record(dkim_keys["google"]))
    s.add_txt("20230601._domainkey.gw-example.20230601.gappssmtp.test",
              _dkim_record(dkim_keys["gapps"]))
    s.add_txt("_dmarc.gw.example", "v=DMARC1; p=quarantine")
    s.start()
    yield s
    s.stop()


def flow_env(tmp_path: Path, pki: Pki, dns_server: DnsServer, **extra: str) -> dict[str, str]:
    """The gateway as docs/mail-servers.md sets it up for mail from the internet."""
    return base_env(tmp_path / "var", **{
        "FAX_DOMAIN": FAX_DOMAIN, "SMTP_HOSTNAME": SMART_HOST,
        "TLS_CERT_FILE": str(pki.cert), "TLS_KEY_FILE": str(pki.key), "SMTP_REQUIRE_TLS": "yes",
        "TRUSTED_NETWORKS": "", "ALLOWED_SENDERS": "contoso.example,gw.example",
        "SENDER_VERIFY": "dmarc", "DNS_NAMESERVERS": dns_server.address, **extra})


def sign(data: bytes, selector: str, domain: str, key: rsa.RSAPrivateKey,
         headers: list[bytes]) -> bytes:
    return dkim.sign(data, selector.encode(), domain.encode(), _pem(key),
                     include_headers=headers) + data


def wire(msg: EmailMessage) -> bytes:
    return msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))


class Peer:
    """An SMTP client that says what the named server says: its EHLO name, STARTTLS with
    the certificate checked (CA and the smart host's name), its MAIL parameters."""

    def __init__(self, port: int, ehlo: str, ca: Path | None) -> None:
        self.port, self.ehlo_name, self.ca = port, ehlo, ca
        self.replies: list[tuple[int, str]] = []

    def send(self, mail_from: str, mail_options: list[str], rcpts: list[str], data: bytes,
             login: tuple[str, str] | None = None) -> tuple[int, str]:
        with smtplib.SMTP("127.0.0.1", self.port, local_hostname=self.ehlo_name,
                          timeout=30) as client:
            client.ehlo()
            if self.ca is not None:
                context = ssl.create_default_context(cafile=str(self.ca))  # verify + hostname
                client._host = SMART_HOST  # the name the connector/route/transport map has
                client.starttls(context=context)
                client.ehlo()
                cert = client.sock.getpeercert()
                assert ("DNS", SMART_HOST) in cert["subjectAltName"]
            if login is not None:
                client.login(*login)
            code, text = client.mail(mail_from, mail_options)
            self.replies.append((code, text.decode()))
            if code != 250:
                return code, text.decode()
            for rcpt in rcpts:
                code, text = client.rcpt(rcpt)
                self.replies.append((code, text.decode()))
            try:
                code, text = client.data(data)
            except smtplib.SMTPDataError as exc:
                code, text = exc.smtp_code, exc.smtp_error
            return code, text.decode()


async def message_of(gw, reply_text: str):
    [job_id] = job_ids(reply_text)
    job = await gw.store.run(gw.store.job, job_id)
    return await gw.store.run(gw.store.message, job.message_id)


# -- Microsoft 365 ------------------------------------------------------------------------


def exchange_online_mail(sender: str, tenant: str, keys: dict[str, rsa.RSAPrivateKey],
                         custom_dkim: bool, rtf: bool = True) -> bytes:
    """A mail as Exchange Online sends it out: Outlook's Rich Text packs the PDF into
    winmail.dat; Exchange's headers; its DKIM signatures (the tenant's onmicrosoft domain,
    and the custom domain's selector1 once DKIM is turned on for it)."""
    msg = EmailMessage()
    msg["Received"] = (f"from PH0PR11MB4999.namprd11.prod.outlook.test (2603:10b6:510:37::12) "
                       f"by PH0PR11MB4999.namprd11.prod.outlook.test; "
                       f"{format_datetime(datetime.datetime.now(datetime.UTC))}")
    msg["From"] = f"Alice Example <{sender}>"
    msg["To"] = f'"Notary fax" <{RCPT}>'
    msg["Subject"] = "Contract for signature"
    msg["Thread-Topic"] = "Contract for signature"
    msg["Date"] = format_datetime(datetime.datetime.now(datetime.UTC))
    msg["Message-ID"] = make_msgid(domain="PH0PR11MB4999.namprd11.prod.outlook.test")
    msg["Accept-Language"] = "en-US"
    msg["Content-Language"] = "en-US"
    msg["X-MS-Has-Attach"] = "yes"
    msg["X-MS-TNEF-Correlator"] = "<PH0PR11MB4999ABCD@PH0PR11MB4999.namprd11.prod.outlook.test>"
    msg["X-MS-Exchange-CrossTenant-Id"] = "72f988bf-86f1-41af-91ab-2d7cd011db47"
    msg["X-MS-Exchange-Transport-CrossTenantHeadersStamped"] = "PH0PR11MB4999"
    body = "Hello,\n\nplease fax the attached contract to the notary.\n\nAlice\n"
    msg.set_content(body)
    pdf = make_pdf(2)
    if rtf:
        msg.add_attachment(winmail_dat([("Contract.pdf", pdf)], body=body),
                           maintype="application", subtype="ms-tnef", filename="winmail.dat")
    else:
        msg.add_attachment(pdf, maintype="application", subtype="pdf", filename="Contract.pdf")
    data = wire(msg)
    signed = [b"from", b"date", b"subject", b"message-id", b"content-type", b"mime-version"]
    data = sign(data, f"selector1-{tenant}-example", f"{tenant}.onmicrosoft.test",
                keys[f"{tenant}-tenant"], signed)
    if custom_dkim:
        data = sign(data, "selector1", sender.rpartition("@")[2], keys[tenant], signed)
    return data


async def test_microsoft_365_outbound_connector(make_gateway, pki: Pki, dns_server: DnsServer,
                                                dkim_keys, tmp_path: Path) -> None:
    gw = await make_gateway(flow_env(tmp_path, pki, dns_server))
    exo = Peer(gw.smtp.port, "NAM12-MW2-obe.outbound.protection.outlook.test", pki.ca)
    data = exchange_online_mail("alice@contoso.example", "contoso", dkim_keys, custom_dkim=True)
    code, text = await asyncio.to_thread(exo.send, "alice@contoso.example",
                                         [f"SIZE={len(data)}", "BODY=8BITMIME"], [RCPT], data)
    assert code == 250, text
    assert text.endswith("(2 pages)")  # the PDF inside winmail.dat
    message = await message_of(gw, text)
    assert message.filenames == "Contract.pdf"
    assert "dkim=pass header.d=contoso.example header.s=selector1" in message.auth_results
    assert "dkim=pass header.d=contoso.onmicrosoft.test" in message.auth_results
    assert "spf=pass" in message.auth_results and "dmarc=pass" in message.auth_results


async def test_microsoft_365_tells_tenants_apart(make_gateway, pki: Pki, dns_server: DnsServer,
                                                 dkim_keys, tmp_path: Path) -> None:
    """The gateway serves two tenants; fabrikam's users write contoso's address in From:.
    Both come from the same Microsoft servers (one IP allow-list would let both in), and
    SPF passes for fabrikam's own envelope; DMARC wants a pass for the From: domain, which
    only contoso's DKIM key (or its envelope) gives."""
    gw = await make_gateway(flow_env(
        tmp_path, pki, dns_server,
        ALLOWED_SENDERS="contoso.example,fabrikam.onmicrosoft.test"))
    dns_server.add_txt("fabrikam.onmicrosoft.test",
                       "v=spf1 include:spf.protection.outlook.test -all")
    exo = Peer(gw.smtp.port, "NAM12-MW2-obe.outbound.protection.outlook.test", pki.ca)
    forged = exchange_online_mail("alice@contoso.example", "fabrikam", dkim_keys,
                                  custom_dkim=False)
    code, text = await asyncio.to_thread(exo.send, "mallory@fabrikam.onmicrosoft.test", [],
                                         [RCPT], forged)
    assert code == 550, text
    assert text.startswith("5.7.1 Sender not proven: the From: domain contoso.example does "
                           "not vouch for this mail (SPF pass for fabrikam.onmicrosoft.test, "
                           "which is not aligned with contoso.example; DKIM pass for "
                           "fabrikam.onmicrosoft.test, which is not aligned)"), text


# -- Google Workspace -----------------------------------------------------------------------


def gmail_mail(sender: str, keys: dict[str, rsa.RSAPrivateKey], custom_dkim: bool) -> bytes:
    msg = EmailMessage()
    msg["MIME-Version"] = "1.0"
    msg["From"] = f"Bob Example <{sender}>"
    msg["Date"] = format_datetime(datetime.datetime.now(datetime.UTC))
    msg["Message-ID"] = make_msgid(idstring="CAGc3x=Ab-12", domain="mail.gmail.test")
    msg["Subject"] = "Invoice 42"
    msg["To"] = RCPT
    msg.set_content("Invoice attached.\n")
    msg.add_attachment(make_pdf(1), maintype="application", subtype="pdf",
                       filename="invoice.pdf")
    data = wire(msg)
    signed = [b"mime-version", b"from", b"date", b"message-id", b"subject", b"to"]
    data = sign(data, "20230601", "gw-example.20230601.gappssmtp.test", keys["gapps"], signed)
    if custom_dkim:
        data = sign(data, "google", "gw.example", keys["google"], signed)
    return data


async def test_google_workspace_route(make_gateway, pki: Pki, dns_server: DnsServer,
                                      dkim_keys, tmp_path: Path) -> None:
    gw = await make_gateway(flow_env(tmp_path, pki, dns_server))
    google = Peer(gw.smtp.port, "mail-sor-f41.google.test", pki.ca)
    data = gmail_mail("bob@gw.example", dkim_keys, custom_dkim=True)
    code, text = await asyncio.to_thread(google.send, "bob@gw.example",
                                         [f"SIZE={len(data)}", "BODY=8BITMIME"], [RCPT], data)
    assert code == 250, text
    message = await message_of(gw, text)
    assert "dkim=pass header.d=gw.example header.s=google" in message.auth_results
    # Without a DKIM key of its own, a Workspace domain is proven by SPF (Google's include)
    # alone, aligned because the envelope is the user's address.
    data = gmail_mail("bob@gw.example", dkim_keys, custom_dkim=False)
    code, text = await asyncio.to_thread(google.send, "bob@gw.example", [], [RCPT], data)
    assert code == 250, text
    message = await message_of(gw, text)
    assert "spf=pass" in message.auth_results and "smtp.mailfrom=gw.example" in \
        message.auth_results


# -- Postfix --------------------------------------------------------------------------------


def postfix_mail() -> bytes:
    msg = EmailMessage()
    msg["Received"] = ("by relay.contoso.example (Postfix, from userid 1000) id 4Q1x2y3z4; "
                       + format_datetime(datetime.datetime.now(datetime.UTC)))
    msg["From"] = "erp@contoso.example"
    msg["To"] = RCPT
    msg["Subject"] = "Order 4711"
    msg["Message-ID"] = "<20261207101500.4Q1x2y3z4@relay.contoso.example>"
    msg["Auto-Submitted"] = "auto-generated"  # an ERP's own mail: faxed
    msg.set_content("Order attached.\n")
    msg.add_attachment(make_pdf(1), maintype="application", subtype="pdf", filename="order.pdf")
    return wire(msg)


async def test_postfix_relay_on_a_trusted_network(make_gateway, pki: Pki, dns_server: DnsServer,
                                                  tmp_path: Path) -> None:
    """smtp_tls_security_level = verify (the CA, the name in the transport map); the relay's
    address in TRUSTED_NETWORKS, so its mail is not looked up in DNS."""
    gw = await make_gateway(flow_env(tmp_path, pki, dns_server, TRUSTED_NETWORKS="127.0.0.1/32"))
    postfix = Peer(gw.smtp.port, "relay.contoso.example", pki.ca)
    data = postfix_mail()
    code, text = await asyncio.to_thread(postfix.send, "erp@contoso.example",
                                         [f"SIZE={len(data)}", "BODY=8BITMIME"], [RCPT], data)
    assert code == 250, text
    message = await message_of(gw, text)
    assert message.auth_results == \
        f"{SMART_HOST}; none (client 127.0.0.1 is on a trusted network)"
    assert dns_server.queries == []


async def test_postfix_relay_with_sasl(make_gateway, pki: Pki, dns_server: DnsServer,
                                       tmp_path: Path) -> None:
    """smtp_sasl_auth_enable = yes: AUTH PLAIN after STARTTLS, as Postfix sends it."""
    from gateway.users import User, hash_password, write_user

    users = tmp_path / "users"
    write_user(users, User("relay", hash_password("relay pass"),
                           senders=("*@contoso.example",)))
    gw = await make_gateway(flow_env(tmp_path, pki, dns_server, USERS_FILE=str(users)))
    postfix = Peer(gw.smtp.port, "relay.contoso.example", pki.ca)
    data = postfix_mail()
    code, text = await asyncio.to_thread(postfix.send, "erp@contoso.example",
                                         [f"SIZE={len(data)}", "BODY=8BITMIME"], [RCPT], data,
                                         ("relay", "relay pass"))
    assert code == 250, text
    message = await message_of(gw, text)
    assert message.auth_results == f"{SMART_HOST}; auth=pass smtp.auth=relay"
