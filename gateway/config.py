"""Settings: frozen dataclasses, one per concern, built from the environment and an optional .env.

Each setting is declared once, in its group below: its variable, its default, what it does (the
text of docs/configuration.md, rendered by `python -m gateway.config --reference`), whether it is
a secret and whether it is an advanced knob. The loader reads most settings straight from those
declarations; what depends on another setting is worked out by hand in `settings_from`.

Every problem is collected and reported at once, naming the variable, so an operator fixes a
config in one round trip; the daemon exits 78 (EX_CONFIG) on any of them.
"""

from __future__ import annotations

import builtins
import ipaddress
import os
import secrets
import socket
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import MISSING, Field, dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from dotenv import dotenv_values

from gateway import constants, defaults
from gateway.rules.inbound_routes import (
    RouteError,
    Routes,
    combine,
    parse_routes,
    parse_routes_file,
)


class ConfigError(Exception):
    """Raised with every problem found, one per line, each naming its variable."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems
        self.warnings: list[str] = []  # unknown variables: perhaps the cause of a problem


@dataclass(frozen=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def _hostport(text: str) -> HostPort:
    """A default "host:port" from defaults.py as a HostPort."""
    host, _, port = text.rpartition(":")
    return HostPort(host.strip("[]"), int(port))


def setting(variable: str, doc: str, default: Any = MISSING, *,
            factory: Callable[[], Any] | None = None, kind: str | None = None,
            lo: float | None = None, hi: float | None = None, choices: tuple[str, ...] = (),
            shown: str | None = None, advanced: bool = False, secret: bool = False) -> Any:
    """A setting's one declaration: read from `variable` as `kind` (within lo..hi, or one of
    `choices`); kind None: worked out in `settings_from`. `doc` and `shown` (the default as the
    reference prints it, when the value alone would not say it) are the reference's text."""
    meta = {"variable": variable, "doc": doc, "kind": kind, "lo": lo, "hi": hi,
            "choices": choices, "shown": shown, "advanced": advanced, "secret": secret}
    if factory is not None:
        return field(default_factory=factory, repr=not secret, metadata=meta)
    return field(default=default, repr=not secret, metadata=meta)


def group(title: str, factory: Callable[[], Any], intro: str = "") -> Any:
    """A group of settings inside `Settings`; its title heads its table in the reference."""
    return field(default_factory=factory, metadata={"title": title, "intro": intro})


@dataclass(frozen=True)
class FaxSettings:
    domain: str = setting(
        "FAX_DOMAIN", "domain whose recipients are fax numbers: mail to `<number>@FAX_DOMAIN` "
        "becomes a fax; mail for other domains is refused (`550 5.7.1`, no relaying)",
        defaults.FAX_DOMAIN, kind="str")
    default_region: str = setting(
        "FAX_DEFAULT_REGION", "ISO country for numbers written without a country code",
        defaults.FAX_DEFAULT_REGION, kind="str")
    from_number: str = setting(
        "FAX_FROM_NUMBER", "caller number in E.164, a fax-enabled number of your SignalWire "
        "project; required in production", defaults.SANDBOX_FROM_NUMBER,
        shown="sandbox: `+15550100000`")
    quality: str = setting(
        "FAX_QUALITY", "`standard` (204x98), `fine` (204x196) or `superfine` (204x392)",
        defaults.FAX_QUALITY, kind="choice", choices=constants.QUALITIES)
    ttl_minutes: int = setting(
        "FAX_TTL_MINUTES", "SignalWire `Ttl`: minutes SignalWire keeps trying to send, 5..300",
        defaults.FAX_TTL_MINUTES, kind="int", lo=constants.TTL_MIN_MINUTES,
        hi=constants.TTL_MAX_MINUTES)
    max_pages: int = setting(
        "FAX_MAX_PAGES", "most pages per fax; more is refused with `554 5.6.0`",
        defaults.MAX_PAGES, kind="int", lo=1, hi=2000)
    max_attempts: int = setting(
        "FAX_MAX_ATTEMPTS", "attempts per fax for busy, no-answer and line failures",
        defaults.FAX_MAX_ATTEMPTS, kind="int", lo=1, hi=20, advanced=True)
    retry_delay_s: float = setting(
        "FAX_RETRY_DELAY_SECONDS", "wait between those attempts (a resolution failure retries "
        "at `standard` after at most 60 s)", defaults.FAX_RETRY_DELAY_S, kind="float", lo=0.01,
        hi=86400, advanced=True)
    kill_minutes: float = setting(
        "FAX_KILL_MINUTES", "no new attempt starts later than this after the mail arrived",
        defaults.FAX_KILL_MINUTES, kind="float", lo=0.01, hi=7 * 24 * 60, advanced=True)


@dataclass(frozen=True)
class SmtpSettings:
    listen: HostPort = setting(
        "SMTP_LISTEN", "host:port of the SMTP listener", _hostport(defaults.SMTP_LISTEN),
        kind="hostport")
    hostname: str = setting(
        "SMTP_HOSTNAME", "name in the SMTP greeting and in receipt and report Message-IDs",
        factory=socket.getfqdn, kind="str", shown="this host's FQDN")
    max_message_bytes: int = setting(
        "SMTP_MAX_MESSAGE_BYTES", "largest message; advertised as SIZE and enforced while "
        "receiving (`552`)", defaults.SMTP_MAX_MESSAGE_BYTES, kind="int", lo=64 * 1024,
        hi=200 * 1024 * 1024, shown="`26214400` (25 MiB)")
    max_recipients: int = setting(
        "SMTP_MAX_RECIPIENTS", "most fax numbers per message (`452 4.5.3` beyond)",
        defaults.SMTP_MAX_RECIPIENTS, kind="int", lo=1, hi=1000)
    max_connections: int = setting(
        "SMTP_MAX_CONNECTIONS", "open SMTP connections in all, both listeners (`421 4.7.0` and "
        "closed beyond)", defaults.SMTP_MAX_CONNECTIONS, kind="int", lo=1, hi=100_000,
        advanced=True)
    max_connections_per_ip: int = setting(
        "SMTP_MAX_CONNECTIONS_PER_IP", "open SMTP connections per client address (`421 4.7.0` "
        "and closed beyond)", defaults.SMTP_MAX_CONNECTIONS_PER_IP, kind="int", lo=1,
        hi=100_000, advanced=True)
    data_timeout_s: float = setting(
        "SMTP_DATA_TIMEOUT_SECONDS", "time for the whole message after `354` (`421 4.4.2` and "
        "closed beyond: bounds trickling senders)", defaults.SMTP_DATA_TIMEOUT_S, kind="float",
        lo=1, hi=86400, advanced=True)
    idle_timeout_s: float = setting(
        "SMTP_IDLE_TIMEOUT_SECONDS", "time between commands (`421 4.4.2` and closed beyond); "
        "RFC 5321 suggests 300, scanners need far less", defaults.SMTP_IDLE_TIMEOUT_S,
        kind="float", lo=1, hi=3600, advanced=True)
    smtps_listen: HostPort | None = setting(
        "SMTPS_LISTEN", "host:port of an implicit-TLS listener (port 465 style); needs "
        "`TLS_CERT_FILE` and `TLS_KEY_FILE`", None)
    proxy_protocol: bool = setting(
        "SMTP_PROXY_PROTOCOL", "expect a PROXY protocol (v1/v2) header on every SMTP "
        "connection, from a TCP load balancer; the address in it is the client's for trusted "
        "networks, rate limits and logs", defaults.SMTP_PROXY_PROTOCOL, kind="bool",
        advanced=True)


@dataclass(frozen=True)
class HttpSettings:
    listen: HostPort = setting(
        "HTTP_LISTEN", "host:port of the HTTP listener (callbacks, local media, health)",
        _hostport(defaults.HTTP_LISTEN), kind="hostport")
    # None: http:// + the bound HTTP address.
    public_base_url: str | None = setting(
        "PUBLIC_BASE_URL", "base URL at which SignalWire reaches `HTTP_LISTEN`; required with "
        "`SIGNALWIRE_SPACE_URL` (exit 78 without it), unless that is a simulator on loopback",
        None, kind="url", shown="sandbox: `http://` + `HTTP_LISTEN`")
    metrics_token: str | None = setting(
        "METRICS_TOKEN", "when set, `/metrics` needs `Authorization: Bearer <token>`", None,
        kind="str", secret=True)


@dataclass(frozen=True)
class SignalWireSettings:
    # None: sandbox with the built-in simulator.
    space_url: str | None = setting(
        "SIGNALWIRE_SPACE_URL", "your space, e.g. `https://example.signalwire.com` (any base "
        "URL; http allowed for tests); unset: sandbox mode, the built-in simulator, no "
        "credentials", None, kind="url", shown="unset = sandbox")
    project_id: str = setting(
        "SIGNALWIRE_PROJECT_ID", "Project ID, the Basic auth user", defaults.SANDBOX_PROJECT_ID,
        shown="sandbox: `sandbox`")
    api_token: str = setting(
        "SIGNALWIRE_API_TOKEN", "API token, the Basic auth password", "",
        shown="sandbox: random", secret=True)
    signing_key: str = setting(
        "SIGNALWIRE_SIGNING_KEY", "the project's Signing Key (API credentials page, not the API "
        "token): checks the signature of callbacks; required with a space", "",
        shown="sandbox: random", secret=True)
    timeout_s: float = setting(
        "SIGNALWIRE_TIMEOUT_SECONDS", "timeout of each API call; a send with no answer is "
        "looked up, never blindly resent", defaults.API_TIMEOUT_S, kind="float", lo=0.1, hi=300,
        advanced=True)


@dataclass(frozen=True)
class MediaSettings:
    store: str = setting(
        "MEDIA_STORE", "`s3`: presigned S3 URLs; `local`: the gateway serves the PDF itself "
        "(GET and HEAD)", defaults.MEDIA_STORE, kind="choice", choices=("local", "s3"))
    url_ttl_s: int = setting(
        "MEDIA_URL_TTL_SECONDS", "lifetime of each media URL; must cover queueing + `Ttl` + "
        "sending (at least `Ttl` + 5 min)",
        defaults.FAX_TTL_MINUTES * 60 + defaults.MEDIA_URL_SLACK_S,
        shown="`FAX_TTL_MINUTES`×60 + 3600", advanced=True)
    signing_key: str = setting(
        "MEDIA_SIGNING_KEY", "HMAC key of local media URLs; set it when several instances "
        "serve media", "", kind="str", shown="generated into `DATA_DIR/media.key`",
        secret=True, advanced=True)


@dataclass(frozen=True)
class S3Settings:
    bucket: str = setting("S3_BUCKET", "bucket for the PDFs (required with `MEDIA_STORE=s3`)",
                          "", kind="str")
    prefix: str = setting("S3_PREFIX", "key prefix inside the bucket", defaults.S3_PREFIX,
                          kind="str")
    endpoint_url: str | None = setting(
        "S3_ENDPOINT_URL", "endpoint of an S3-compatible store (path-style addressing is used "
        "then)", None, kind="url", shown="AWS")
    region: str = setting("S3_REGION", "region for SigV4 signing", defaults.S3_REGION,
                          kind="str")
    # Given to boto3 explicitly, so that keys in the .env file are used (None: boto3's chain).
    access_key_id: str | None = setting(
        "AWS_ACCESS_KEY_ID", "S3 access key, read like every other setting (the `.env` file or "
        "the environment) and given to boto3; set it with `AWS_SECRET_ACCESS_KEY` or neither; "
        "unset: a profile or an instance role. With `MEDIA_STORE=s3` and no credentials at all, "
        "the start fails (exit 78)", None, kind="str", shown="unset = boto3's chain")
    secret_access_key: str | None = setting(
        "AWS_SECRET_ACCESS_KEY", "S3 secret key (with `AWS_ACCESS_KEY_ID`)", None,
        kind="str", shown="unset = boto3's chain", secret=True)
    session_token: str | None = setting(
        "AWS_SESSION_TOKEN", "S3 session token of temporary credentials", None, kind="str",
        secret=True, advanced=True)
    profile: str | None = setting(
        "AWS_PROFILE", "a profile in `~/.aws/credentials`", None, kind="str", advanced=True)
    ca_bundle: Path | None = setting(
        "AWS_CA_BUNDLE", "a private CA (PEM file) for the S3 endpoint. `HTTPS_PROXY`/`NO_PROXY` "
        "are taken from the process environment, as boto3 takes them", None, kind="file",
        advanced=True)


@dataclass(frozen=True)
class NotifySettings:
    # None: reports go to DATA_DIR/outbox as .eml files.
    host: str | None = setting(
        "NOTIFY_SMTP_HOST", "relay for report mail; unset writes reports to "
        "`DATA_DIR/outbox/<job>.eml` (a report sent again: `<job>-2.eml`, never an overwrite)",
        None, kind="str", shown="unset = outbox")
    port: int = setting("NOTIFY_SMTP_PORT", "relay port", defaults.NOTIFY_SMTP_PORT,
                        shown="`587` (`465` with `tls`)")
    username: str | None = setting(
        "NOTIFY_SMTP_USERNAME", "relay AUTH user (with `NOTIFY_SMTP_PASSWORD`, or neither)", None,
        kind="str")
    password: str | None = setting(
        "NOTIFY_SMTP_PASSWORD", "relay AUTH password", None, kind="str", secret=True)
    tls: str = setting(
        "NOTIFY_SMTP_TLS", "`none`, `starttls` or `tls` (implicit)", defaults.NOTIFY_SMTP_TLS,
        kind="choice", choices=("none", "starttls", "tls"))
    sender: str = setting(
        "NOTIFY_FROM", "From address (and envelope sender) of report mail; its domain is that "
        "of the reports' Message-IDs (set it alike on every node)",
        factory=lambda: f"faxgw@{socket.gethostname()}", kind="str", shown="`faxgw@<hostname>`")


@dataclass(frozen=True)
class QueueSettings:
    data_dir: Path = setting(
        "DATA_DIR", "SQLite database, spool, local media, outbox; one daemon per `DATA_DIR` "
        "(a second one is refused, exit 78)", Path(defaults.DATA_DIR), kind="path")
    min_free_disk_mb: int = setting(
        "MIN_FREE_DISK_MB", "below this much free space in `DATA_DIR`, mail is refused with "
        "`451 4.3.1` and `/readyz` is 503; 0 turns the check off", defaults.MIN_FREE_DISK_MB,
        kind="int", lo=0, hi=10**9, advanced=True)
    status_poll_s: float = setting(
        "STATUS_POLL_SECONDS", "fetch a submitted fax's status when no final callback came "
        "after this long (then with backoff)", defaults.STATUS_POLL_S, kind="float", lo=0.05,
        hi=86400, advanced=True)
    retry_base_s: float = setting(
        "RETRY_BASE_SECONDS", "first delay after an outage (S3, SignalWire, relay); doubles "
        "each time", defaults.RETRY_BASE_S, kind="float", lo=0.01, hi=3600, advanced=True)
    retry_max_s: float = setting(
        "RETRY_MAX_SECONDS", "longest delay between outage retries", defaults.RETRY_MAX_S,
        kind="float", lo=0.01, hi=86400, advanced=True)
    give_up_hours: float = setting(
        "GIVE_UP_HOURS", "an outage longer than this fails the job, and the sender is told",
        defaults.GIVE_UP_HOURS, kind="float", lo=0.001, hi=24 * 30)
    worker_concurrency: int = setting(
        "WORKER_CONCURRENCY", "jobs worked on at once (at most 2 while mail is being accepted: "
        "senders waiting for their `250` come first)", defaults.WORKER_CONCURRENCY, kind="int",
        lo=1, hi=256, advanced=True)
    document_retention_hours: float = setting(
        "DOCUMENT_RETENTION_HOURS", "keep the PDF (spool and media store) this long after the "
        "last report; 0 deletes it at once", defaults.DOCUMENT_RETENTION_HOURS, kind="float",
        lo=0, hi=24 * 365)
    job_retention_days: float = setting(
        "JOB_RETENTION_DAYS", "reported jobs and their history are deleted after this",
        defaults.JOB_RETENTION_DAYS, kind="float", lo=1, hi=3650)
    shutdown_grace_s: float = setting(
        "SHUTDOWN_GRACE_SECONDS", "on SIGTERM, how long open SMTP transactions and running "
        "steps may finish", defaults.SHUTDOWN_GRACE_S, kind="float", lo=0, hi=600,
        advanced=True)


@dataclass(frozen=True)
class LogSettings:
    level: str = setting(
        "FAXGW_LOG_LEVEL", "`debug`, `info`, `warning` or `error`",
        defaults.FAXGW_LOG_LEVEL.upper(), shown="`info`")
    format: str = setting(
        "FAXGW_LOG_FORMAT", "`text` (one line per event) or `json` (one object per line, for "
        "log shippers)", defaults.FAXGW_LOG_FORMAT, kind="choice", choices=("text", "json"))


@dataclass(frozen=True)
class AccessSettings:
    trusted_networks: tuple[str, ...] = setting(
        "TRUSTED_NETWORKS", "comma-separated CIDRs whose clients may send without AUTH "
        "(scanners that cannot log in); empty = none", defaults.TRUSTED_NETWORKS, kind="items")
    users_file: Path | None = setting(
        "USERS_FILE", "users for SMTP AUTH and the dashboard (`faxgw passwd` writes it; "
        "`--admin` / `--viewer` for the dashboard); unset: AUTH is not offered", None,
        kind="file", shown="unset = no AUTH")
    allowed_senders: tuple[str, ...] = setting(
        "ALLOWED_SENDERS", "sender addresses allowed without AUTH: `a@x.com`, `x.com` / `@x.com` "
        "/ `*@x.com` (that domain), `*.x.com` (subdomains), `scan-*@x.com`; checked on the "
        "envelope and the From: header. A pattern that matches every domain (`*`, `*@*`) is "
        "refused at start: anyone can write any sender address", (), kind="items")
    sender_verify: str = setting(
        "SENDER_VERIFY", "`dmarc`: a sender that neither logged in nor is on "
        "`TRUSTED_NETWORKS` is accepted only when SPF or DKIM passes aligned with the From: "
        "domain (DMARC; mail from the internet, Microsoft 365, Google); else `550 5.7.1` naming "
        "what SPF and DKIM found, no report; a DNS failure is `451 4.7.5`. The result is kept as "
        "an `Authentication-Results` line on the job. See [mail-servers.md](mail-servers.md)",
        defaults.SENDER_VERIFY, kind="choice", choices=("off", "dmarc"))
    dns_nameservers: tuple[HostPort, ...] = setting(
        "DNS_NAMESERVERS", "`ip[:port]`, comma-separated: the resolvers `SENDER_VERIFY` asks",
        (), shown="the system's resolver", advanced=True)
    dns_timeout_s: float = setting(
        "DNS_TIMEOUT_SECONDS", "how long all the lookups for one mail's sender check may take "
        "together (at most 40 lookups)", defaults.DNS_TIMEOUT_S, kind="float", lo=0.1, hi=120,
        advanced=True)
    auth_plaintext: bool = setting(
        "SMTP_AUTH_PLAINTEXT", "offer AUTH on an unencrypted connection (only for old devices "
        "on a trusted LAN)", defaults.SMTP_AUTH_PLAINTEXT, kind="bool")
    auth_max_failures: int = setting(
        "AUTH_MAX_FAILURES", "failed logins from one address (within 15 minutes) before it is "
        "locked out", defaults.AUTH_MAX_FAILURES, kind="int", lo=1, hi=1000, advanced=True)
    auth_lockout_minutes: float = setting(
        "AUTH_LOCKOUT_MINUTES", "how long such an address gets `454 4.7.0` for AUTH",
        defaults.AUTH_LOCKOUT_MINUTES, kind="float", lo=0.01, hi=24 * 60, advanced=True)


@dataclass(frozen=True)
class TlsSettings:
    cert_file: Path | None = setting(
        "TLS_CERT_FILE", "certificate (PEM); set with `TLS_KEY_FILE`: STARTTLS is offered on "
        "`SMTP_LISTEN` (and `SMTPS_LISTEN` may be used); reloaded on SIGHUP", None, kind="file")
    key_file: Path | None = setting(
        "TLS_KEY_FILE", "the certificate's private key (PEM); reloaded on SIGHUP", None,
        kind="file")
    min_version: str = setting(
        "TLS_MIN_VERSION", "`TLSv1.2` or `TLSv1.3`; `TLSv1` / `TLSv1.1` for old MFPs (also "
        "lowers OpenSSL's security level)", "TLSv" + defaults.TLS_MIN_VERSION[4:])
    required: bool = setting(
        "SMTP_REQUIRE_TLS", "refuse everything but EHLO/STARTTLS/QUIT before STARTTLS",
        defaults.SMTP_REQUIRE_TLS, kind="bool")


@dataclass(frozen=True)
class DestinationSettings:
    allow_international: bool = setting(
        "FAX_ALLOW_INTERNATIONAL", "allow numbers outside `FAX_DEFAULT_REGION` (its country "
        "code and domestic neighbours)", defaults.FAX_ALLOW_INTERNATIONAL, kind="bool")
    allow_prefixes: tuple[str, ...] = setting(
        "FAX_ALLOW_PREFIXES", "E.164 prefixes always allowed (e.g. `+44,+1900555`); beat the "
        "built-in blocks", (), kind="items")
    block_prefixes: tuple[str, ...] = setting(
        "FAX_BLOCK_PREFIXES", "E.164 prefixes always refused; beat everything", (), kind="items")
    rate_per_sender_hour: int = setting(
        "RATE_LIMIT_PER_SENDER", "faxes per hour per user / sender address (`450 4.7.1` beyond)",
        defaults.RATE_LIMIT_PER_SENDER, kind="int", lo=1, hi=1_000_000)
    rate_total_hour: int = setting(
        "RATE_LIMIT_TOTAL", "faxes per hour for the whole gateway", defaults.RATE_LIMIT_TOTAL,
        kind="int", lo=1, hi=10_000_000)


@dataclass(frozen=True)
class DocumentSettings:
    paper: str = setting(
        "FAX_PAPER", "`letter` or `a4`: the page size every page is fitted to",
        defaults.FAX_PAPER_IN_LETTER_REGIONS, shown="`letter` in US/CA/MX..., else `a4`")
    body_policy: str = setting(
        "FAX_BODY", "the mail text as a page: `auto` (when it has real text and nothing is "
        "attached), `always`, `never`", defaults.FAX_BODY, kind="choice",
        choices=("auto", "always", "never"))
    cover: bool = setting(
        "FAX_COVER", "put a cover page first (also per mail: `[cover]` / `[nocover]` in the "
        "subject)", defaults.FAX_COVER, kind="bool")
    timeout_s: float = setting(
        "DOC_TIMEOUT_SECONDS", "time limit for parsing and converting one mail's documents "
        "(counted from when a worker takes it)", defaults.DOC_TIMEOUT_S, kind="float", lo=1,
        hi=3600, advanced=True)
    memory_mb: int = setting(
        "DOC_MEMORY_MB", "memory (address space) limit of a document worker process",
        defaults.DOC_MEMORY_MB, kind="int", lo=128, hi=65536, advanced=True)
    workers: int = setting("DOC_WORKERS", "document worker processes", defaults.DOC_WORKERS,
                           kind="int", lo=1, hi=64, advanced=True)
    partial_timeout_minutes: int = setting(
        "PARTIAL_TIMEOUT_MINUTES", "how long the parts of a split mail (`message/partial`, "
        "\"divided sending\") wait for the rest; then the sender is told and the parts are "
        "deleted", defaults.PARTIAL_TIMEOUT_MINUTES, kind="int", lo=1, hi=7 * 24 * 60,
        advanced=True)
    partial_max_sets_per_sender: int = setting(
        "PARTIAL_MAX_SETS_PER_SENDER", "how many split mails one sender may have waiting for "
        "their other parts at once; a part that would open one more gets `451 4.7.0` (the "
        "others' parts are not held up)", defaults.PARTIAL_MAX_SETS_PER_SENDER, kind="int",
        lo=1, hi=1000, advanced=True)


@dataclass(frozen=True)
class ReportSettings:
    thumbnail: bool = setting("REPORT_THUMBNAIL", "a picture of the first page in the HTML "
                              "report", defaults.REPORT_THUMBNAIL, kind="bool")
    attach_pdf: bool = setting("REPORT_ATTACH_PDF", "attach the sent PDF to the report (proof "
                               "of transmission)", defaults.REPORT_ATTACH_PDF, kind="bool")
    accepted: bool = setting("REPORT_ACCEPTED", "also send an \"accepted\" receipt when the "
                             "mail is queued", defaults.REPORT_ACCEPTED, kind="bool")
    bcc: tuple[str, ...] = setting("REPORT_BCC", "addresses that get a blind copy of every "
                                   "report (needs `NOTIFY_SMTP_HOST`)", (), kind="addresses")
    refusals: bool = setting("REPORT_REFUSALS", "tell an authorised sender by mail why a mail "
                             "could not be faxed", defaults.REPORT_REFUSALS, kind="bool")
    template_dir: Path | None = setting(
        "REPORT_TEMPLATE_DIR", "folder with your own `report.txt`, `report.html`, "
        "`accepted.txt`, `refused.txt` (jinja2 templates, see "
        "[report-templates.md](report-templates.md); old `$name` templates are refused at "
        "start, exit 78)", None)


@dataclass(frozen=True)
class InboundSettings:
    # Unset routes = inbound off, every call rejected.
    routes: Routes = setting(
        "INBOUND_ROUTES", "`NUMBER=ADDRESS[,ADDRESS...]` entries separated by `;`; `*` is every "
        "other number; a bad entry, or an address in `FAX_DOMAIN` (which would fax each "
        "received fax out again), stops the start (exit 78); unset: every incoming fax gets "
        "`<Reject/>`. The number in SignalWire: \"Accept Incoming Calls As: Fax\", \"Handle "
        "Faxes Using: LaML Webhooks\", URL `${PUBLIC_BASE_URL}/signalwire/inbound`", Routes(),
        shown="unset = inbound off")
    routes_file: Path | None = setting(
        "INBOUND_ROUTES_FILE", "the same entries one per line (`#` comments), added to "
        "`INBOUND_ROUTES`; a number in both is an error", None)
    blocked_callers: tuple[str, ...] = setting(
        "INBOUND_BLOCKED_CALLERS", "caller numbers or prefixes (`+1900`) answered with "
        "`<Reject/>`; `anonymous` for calls without a number", (), kind="items")
    admin_address: str | None = setting(
        "INBOUND_ADMIN_ADDRESS", "also gets failed receptions, including voice calls on the fax "
        "line (which routed people never get), and a mail for each fax the gateway gave up "
        "delivering; never an address in `FAX_DOMAIN` (exit 78); and mail to "
        "`postmaster@FAX_DOMAIN`, forwarded (unset: postmaster gets `550 5.1.1`)", None)
    attach_document: bool = setting(
        "INBOUND_ATTACH_DOCUMENT", "`no`: the mail only says a fax arrived (no PDF, no picture), "
        "for sensitive documents", defaults.INBOUND_ATTACH_DOCUMENT, kind="bool")
    keep_media: bool = setting(
        "INBOUND_KEEP_MEDIA", "`yes`: keep the document at SignalWire instead of deleting it "
        "after every recipient's mail was accepted", defaults.INBOUND_KEEP_MEDIA, kind="bool")
    page_size: str = setting(
        "INBOUND_PAGE_SIZE", "`pageSize` asked of SignalWire: `letter`, `legal` or `a4`",
        "letter", shown="`FAX_PAPER`")
    reconcile_s: float = setting(
        "INBOUND_RECONCILE_SECONDS", "how often received faxes are listed at SignalWire to find "
        "any whose completion never arrived", defaults.INBOUND_RECONCILE_S, kind="float",
        lo=0.05, hi=86400, advanced=True)
    lookback_hours: float = setting(
        "INBOUND_LOOKBACK_HOURS", "how far back that listing goes (must be shorter than "
        "`JOB_RETENTION_DAYS`)", defaults.INBOUND_LOOKBACK_HOURS, kind="float", lo=0.01,
        hi=24 * 30, advanced=True)


@dataclass(frozen=True)
class AdminSettings:
    # None: no dashboard.
    listen: HostPort | None = setting(
        "ADMIN_LISTEN", "host:port of the web dashboard's own listener; empty turns it off; "
        "never the same as `HTTP_LISTEN`. Log in as a `USERS_FILE` user made with "
        "`faxgw passwd NAME --admin` (or `--viewer`: read-only)", _hostport(defaults.ADMIN_LISTEN))
    trusted_proxies: tuple[str, ...] = setting(
        "ADMIN_TRUSTED_PROXIES", "proxies whose `X-Forwarded-Proto` (Secure cookie) and "
        "`X-Forwarded-For` (lockout address) are believed", defaults.ADMIN_TRUSTED_PROXIES,
        kind="items", advanced=True)
    session_minutes: float = setting(
        "ADMIN_SESSION_MINUTES", "how long a dashboard login lasts (the cookie expires with it)",
        defaults.ADMIN_SESSION_MINUTES, kind="float", lo=1, hi=30 * 24 * 60)


@dataclass(frozen=True)
class ClusterSettings:
    # None: SQLite in DATA_DIR.
    database_url: str | None = setting(
        "DATABASE_URL", "`postgresql://user:password@host:port/dbname`: the job store is this "
        "PostgreSQL database, shared by every gateway pointing at it; unset: SQLite in "
        "`DATA_DIR`. Needs `MEDIA_STORE=s3` (exit 78 otherwise). The password is never printed "
        "or logged", None, secret=True)
    prepared_statements: bool = setting(
        "DATABASE_PREPARED_STATEMENTS", "with `DATABASE_URL`: queries the gateway runs often "
        "are prepared on the server, so PostgreSQL plans each once per connection rather than "
        "on every call (a third less database CPU per fax). Set `no` behind a PgBouncer in "
        "transaction mode that does not keep prepared statements (older than 1.21, or "
        "`max_prepared_statements = 0`); left at `yes` there, the gateway finds out at start "
        "(or at the first call that meets a lost statement), logs a warning and stops "
        "preparing", defaults.DATABASE_PREPARED_STATEMENTS, kind="bool", advanced=True)
    listen_url: str | None = setting(
        "DATABASE_LISTEN_URL", "with `DATABASE_URL`: the URL of the same database for each "
        "gateway's one connection that listens for the others' wake-ups (PostgreSQL "
        "LISTEN/NOTIFY: a mail accepted by one gateway is sent by whichever is free within "
        "milliseconds); unset: `DATABASE_URL`. Set it to a direct (or session-mode) URL when "
        "`DATABASE_URL` is a PgBouncer in transaction mode, where LISTEN cannot work: there the "
        "gateway finds the others' work by looking every 2 s, and logs a warning at start. "
        "The password is never printed or logged", None, secret=True, advanced=True)
    node_id: str = setting(
        "NODE_ID", "this gateway's name in job leases, logs and the `faxgw_node_info` metric",
        factory=lambda: default_node_id(), kind="str", shown="`hostname-pid-random`")
    lease_seconds: float = setting(
        "LEASE_SECONDS", "a job a node works is leased to it this long, renewed every third of "
        "it; a dead node's jobs are taken over once their leases run out",
        defaults.LEASE_SECONDS, kind="float", lo=3, hi=3600, advanced=True)
    dedup_window_hours: float = setting(
        "DEDUP_WINDOW_HOURS", "the same mail (Message-ID, recipients, document) received again "
        "within this window is not faxed again: `250` names its jobs; `0` turns it off. A mail "
        "with no Message-ID is never merged", defaults.DEDUP_WINDOW_HOURS, kind="float", lo=0,
        hi=24 * 30, advanced=True)
    send_rate_per_second: float = setting(
        "SEND_RATE_PER_SECOND", "faxes sent to SignalWire per second, all gateways together "
        "(SignalWire's default account limit)", defaults.SEND_RATE_PER_SECOND, kind="float",
        lo=0.01, hi=1000)


@dataclass(frozen=True)
class Settings:
    """Every setting, a group per concern, in the order of docs/configuration.md."""

    fax: FaxSettings = group("Fax", FaxSettings)
    smtp: SmtpSettings = group("SMTP listener", SmtpSettings)
    http: HttpSettings = group("HTTP listener", HttpSettings)
    signalwire: SignalWireSettings = group(
        "SignalWire", SignalWireSettings, "Leave `SIGNALWIRE_SPACE_URL` unset for sandbox mode.")
    media: MediaSettings = group("Media store", MediaSettings)
    s3: S3Settings = group("S3", S3Settings, "Used with `MEDIA_STORE=s3`.")
    notify: NotifySettings = group("Report mail relay", NotifySettings)
    queue: QueueSettings = group("Queue and state", QueueSettings)
    logs: LogSettings = group("Logs", LogSettings)
    access: AccessSettings = group("Who may send", AccessSettings)
    tls: TlsSettings = group("TLS", TlsSettings)
    destinations: DestinationSettings = group("Destinations and cost", DestinationSettings)
    documents: DocumentSettings = group("Documents", DocumentSettings)
    reports: ReportSettings = group("Reports", ReportSettings)
    inbound: InboundSettings = group("Receiving faxes", InboundSettings)
    admin: AdminSettings = group("Dashboard", AdminSettings)
    cluster: ClusterSettings = group(
        "Several gateways", ClusterSettings,
        "Several gateways sharing one queue in PostgreSQL (see the README).")

    @property
    def shared(self) -> bool:
        """Several gateways share one queue (DATABASE_URL is set)."""
        return self.cluster.database_url is not None

    @property
    def sandbox(self) -> bool:
        return self.signalwire.space_url is None

    def secret_values(self) -> list[str]:
        """The values of the secret settings (of DATABASE_URL, its password), so that no log
        line can carry them."""
        out: list[str] = []
        for grp, f in declared():
            value = getattr(getattr(self, grp.name), f.name)
            if f.metadata["secret"] and value:
                out.append(_url_password(value) if f.metadata["variable"] in _DATABASE_URLS
                           else value)
        return [v for v in out if v]

    def masked(self) -> dict[str, str]:
        """Settings as printable text under their variables' names, secrets replaced, for
        `faxgw run --check`."""
        out: dict[str, str] = {}
        for grp, f in declared():
            value = getattr(getattr(self, grp.name), f.name)
            out[f.metadata["variable"]] = _printable(value, f)
        return out


def declared() -> Iterator[tuple[Field[Any], Field[Any]]]:
    """(group, setting) for every setting, in the reference's order."""
    for grp in fields(Settings):
        for f in fields(grp.default_factory):  # type: ignore[arg-type]
            yield grp, f


def _url_password(url: str) -> str:
    try:
        password = urlsplit(url).password
    except ValueError:
        return ""
    return unquote(password) if password else ""


# Secret URLs of which only the password is secret (printed masked, not hidden).
_DATABASE_URLS = ("DATABASE_URL", "DATABASE_LISTEN_URL")


def _printable(value: Any, f: Field[Any]) -> str:
    if value and f.metadata["variable"] in _DATABASE_URLS:
        return mask_url(value)
    if value and f.metadata["secret"]:
        return "********"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, tuple):
        return ",".join(str(item) for item in value)  # HostPort prints host:port
    return "" if value is None else str(value)


# "group.name" of each setting and the variable it is read from: what `run --check` prints, and
# the names an unknown variable is compared with.
VARIABLES: dict[str, str] = {f"{g.name}.{f.name}": f.metadata["variable"]
                             for g, f in declared()}
# Variables whose values are never printed or logged (DATABASE_URL: its password).
SECRET_VARIABLES = frozenset(f.metadata["variable"] for _, f in declared()
                             if f.metadata["secret"])
# Variables read besides those: the .env file's own and test hooks.
OTHER_VARIABLES = frozenset({"FAXGW_ENV_FILE", "FAXGW_CRASH_AT", "FAXGW_PAUSE_AT",
                             "FAXGW_WORKER_PATH"})
KNOWN_VARIABLES = frozenset(VARIABLES.values()) | OTHER_VARIABLES
# A name from the .env file starting so is meant for us; from the environment only a near miss.
_OUR_PREFIXES = ("FAX_", "FAXGW_", "SMTP_", "SMTPS_", "HTTP_LISTEN", "ADMIN_", "SIGNALWIRE_",
                 "S3_", "MEDIA_", "NOTIFY_", "REPORT_", "TLS_", "INBOUND_", "DOC_", "DATABASE_",
                 "RATE_LIMIT_", "AUTH_", "RETRY_", "PUBLIC_BASE")


def default_node_id() -> str:
    """hostname-pid-random: unique even for two gateways started in one container image."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


def mask_url(url: str) -> str:
    """A database URL fit to print: the password replaced."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return parts._replace(netloc=f"{user}:********@{netloc}").geturl()


def read_env_file(env_file: str | None = None,
                  environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The .env file's variables (`env_file`, else $FAXGW_ENV_FILE, else ./.env if present).

    dotenv_values rather than load_dotenv: the process environment is not mutated.
    """
    environ = os.environ if environ is None else environ
    path = env_file or environ.get("FAXGW_ENV_FILE")
    if path:
        if not Path(path).is_file():
            raise ConfigError([f"FAXGW_ENV_FILE: {path} does not exist or is not a file"])
        return {k: v for k, v in dotenv_values(path).items() if v is not None}
    if Path(".env").is_file():
        return {k: v for k, v in dotenv_values(".env").items() if v is not None}
    return {}


def read_environment(env_file: str | None = None,
                     environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The merged variables: the .env file first, the process environment over it."""
    environ = os.environ if environ is None else environ
    return {**read_env_file(env_file, environ), **environ}


def load_settings(env_file: str | None = None,
                  environ: Mapping[str, str] | None = None) -> Settings:
    return settings_from(read_environment(env_file, environ))


def load_settings_warned(env_file: str | None = None, environ: Mapping[str, str] | None = None
                         ) -> tuple[Settings, list[str]]:
    """The settings, and a warning for each variable that looks meant for faxgw but is none
    of its names (a misspelt FAX_QUALTY would otherwise be ignored without a word)."""
    environ = os.environ if environ is None else environ
    from_file = read_env_file(env_file, environ)
    warnings = unknown_variables(from_file, environ)
    try:
        return settings_from({**from_file, **environ}), warnings
    except ConfigError as exc:
        exc.warnings = warnings
        raise


def unknown_variables(from_file: Mapping[str, str], environ: Mapping[str, str]) -> list[str]:
    """Warnings for unknown names: in the .env file, any with one of our prefixes or near one
    of our names; in the environment (which holds every other program's too), only near ones."""
    import difflib

    out: list[str] = []
    for source, names, prefixed in (("the configuration file", from_file, True),
                                    ("the environment", environ, False)):
        for name in sorted(names):
            if name in KNOWN_VARIABLES or (source == "the environment" and name in from_file):
                continue
            near = difflib.get_close_matches(name, KNOWN_VARIABLES, n=1, cutoff=0.85)
            if not near and not (prefixed and name.startswith(_OUR_PREFIXES)):
                continue
            hint = f" (did you mean {near[0]}?)" if near else ""
            out.append(f"{name} in {source} is not a faxgw setting and is ignored{hint}")
    return out


class _Reader:
    """Reads typed values from the variables, collecting problems instead of stopping at one."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.problems: list[str] = []

    def str(self, name: str, default: str | None = None) -> str | None:
        value = self.env.get(name)
        if value is None or value.strip() == "":
            return default
        return value.strip()

    def int(self, name: builtins.str, default: int, lo: int, hi: int) -> int:
        raw = self.str(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            self.problems.append(f"{name}: {raw!r} is not a whole number")
            return default
        if not lo <= value <= hi:
            self.problems.append(f"{name}: {value} is outside {lo}..{hi}")
        return value

    def float(self, name: builtins.str, default: float, lo: float, hi: float) -> float:
        raw = self.str(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            self.problems.append(f"{name}: {raw!r} is not a number")
            return default
        if not lo <= value <= hi:
            self.problems.append(f"{name}: {value} is outside {lo}..{hi}")
        return value

    def bool(self, name: builtins.str, default: bool) -> bool:
        raw = self.str(name)
        if raw is None:
            return default
        value = raw.lower()
        if value in ("1", "yes", "true", "on"):
            return True
        if value in ("0", "no", "false", "off"):
            return False
        self.problems.append(f"{name}: {raw!r} is not yes or no")
        return default

    def addresses(self, name: builtins.str) -> tuple[builtins.str, ...]:
        raw = self.str(name, "") or ""
        items = tuple(a.strip() for a in raw.split(",") if a.strip())
        for item in items:
            if "@" not in item or any(c in item for c in " <>\r\n"):
                self.problems.append(f"{name}: {item!r} is not a mail address")
        return items

    def items(self, name: builtins.str,
              default: tuple[builtins.str, ...] = ()) -> tuple[builtins.str, ...]:
        raw = self.env.get(name)
        if raw is None:
            return default
        return tuple(i.strip() for i in raw.replace("\n", ",").split(",") if i.strip())

    def file(self, name: builtins.str) -> Path | None:
        raw = self.str(name)
        if raw is None:
            return None
        if not Path(raw).is_file():
            self.problems.append(f"{name}: {raw} does not exist or is not a file")
        return Path(raw)

    def choice(self, name: builtins.str, default: builtins.str,
               allowed: tuple[builtins.str, ...]) -> builtins.str:
        raw = self.str(name, default)
        assert raw is not None
        raw = raw.lower()
        if raw not in allowed:
            self.problems.append(f"{name}: {raw!r} is not one of {', '.join(allowed)}")
            return default
        return raw

    def hostport(self, name: builtins.str, default: builtins.str) -> HostPort:
        raw = self.str(name, default)
        assert raw is not None
        host, sep, port_text = raw.rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
            self.problems.append(f"{name}: {raw!r} is not host:port (e.g. {default})")
            host, _, port_text = default.rpartition(":")
        return HostPort(host, int(port_text))

    def url(self, name: builtins.str) -> builtins.str | None:
        raw = self.str(name)
        if raw is None:
            return None
        parts = urlsplit(raw)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            self.problems.append(f"{name}: {raw!r} is not an http(s) URL")
        elif parts.username or parts.password or parts.fragment or parts.query:
            self.problems.append(f"{name}: must not carry credentials, a query or a #fragment")
        return raw.rstrip("/")


def _matches_any_domain(pattern: str) -> bool:
    """A sender pattern whose domain part is only wildcards ("*", "*@*", "*.*"): it allows
    every sender, which without a login is no check at all."""
    domain = pattern.strip().rpartition("@")[2]
    return bool(domain) and set(domain) <= set("*?.")


def _nameservers(r: _Reader) -> tuple[HostPort, ...]:
    """DNS_NAMESERVERS: "ip[:port]" items (IPv6 as [addr]:port); a resolver is named by its
    address, never by a name that would itself need DNS."""
    found: list[HostPort] = []
    for item in r.items("DNS_NAMESERVERS"):
        host, port = item, "53"
        if item.startswith("["):
            host, _, rest = item[1:].partition("]")
            port = rest[1:] if rest.startswith(":") else ("53" if not rest else "")
        elif item.count(":") == 1:
            host, _, port = item.partition(":")
        try:
            ipaddress.ip_address(host)
            if not port.isdigit() or not 0 < int(port) <= 65535:
                raise ValueError
        except ValueError:
            r.problems.append(f"DNS_NAMESERVERS: {item!r} is not an IP address with an "
                              "optional port (e.g. 127.0.0.1, 127.0.0.1:5353 or [::1]:53)")
            continue
        found.append(HostPort(host, int(port)))
    return tuple(found)


def _field(cls: type, name: str) -> Field[Any]:
    return next(f for f in fields(cls) if f.name == name)


def _default(f: Field[Any]) -> Any:
    if f.default_factory is not MISSING:
        return f.default_factory()
    return None if f.default is MISSING else f.default


def _read(r: _Reader, f: Field[Any]) -> Any:
    """One setting read as its declaration says (its variable, kind, bounds and default)."""
    m = f.metadata
    name, kind, default = m["variable"], m["kind"], _default(f)
    if kind == "int":
        return r.int(name, default, m["lo"], m["hi"])
    if kind == "float":
        return r.float(name, default, m["lo"], m["hi"])
    if kind == "bool":
        return r.bool(name, default)
    if kind == "choice":
        return r.choice(name, default, m["choices"])
    if kind == "str":
        return r.str(name, default)
    if kind == "path":
        return Path(r.str(name) or default)
    if kind == "hostport":
        return r.hostport(name, str(default))
    if kind == "items":
        return r.items(name, default)
    if kind == "addresses":
        return r.addresses(name)
    if kind == "file":
        return r.file(name)
    if kind == "url":
        return r.url(name)
    raise AssertionError(f"{name}: no kind, so settings_from must work it out")


def _build(r: _Reader, cls: type, **worked_out: Any) -> Any:
    """A group: the settings `settings_from` worked out by hand, the rest read as declared."""
    return cls(**{f.name: worked_out[f.name] if f.name in worked_out else _read(r, f)
                  for f in fields(cls)})


def _in_domain(address: str, domain: str) -> bool:
    return address.rpartition("@")[2].lower().rstrip(".") == domain


def settings_from(env: Mapping[str, str]) -> Settings:
    r = _Reader(env)
    space = r.url("SIGNALWIRE_SPACE_URL")
    sandbox = space is None

    region = (_read(r, _field(FaxSettings, "default_region")) or "").upper()
    import phonenumbers  # local: keeps `faxgw --help` fast

    if region not in phonenumbers.SUPPORTED_REGIONS:
        r.problems.append(f"FAX_DEFAULT_REGION: {region!r} is not an ISO country code "
                          "phonenumbers knows (e.g. US, GB, DE)")
    from_number = r.str("FAX_FROM_NUMBER",
                        _default(_field(FaxSettings, "from_number")) if sandbox else None)
    if from_number is None:
        r.problems.append("FAX_FROM_NUMBER: required when SIGNALWIRE_SPACE_URL is set "
                          "(a fax-enabled number of your SignalWire project, E.164)")
        from_number = ""
    elif not (from_number.startswith("+") and from_number[1:].isdigit()
              and 8 <= len(from_number) <= 16):
        r.problems.append(f"FAX_FROM_NUMBER: {from_number!r} is not in E.164 form "
                          "(+ and 7 to 15 digits)")
    domain = (_read(r, _field(FaxSettings, "domain")) or "").lower().rstrip(".")
    if not domain or any(c in domain for c in " @<>\r\n"):
        r.problems.append(f"FAX_DOMAIN: {domain!r} is not a domain name")
    fax = _build(r, FaxSettings, domain=domain, default_region=region, from_number=from_number)

    ttl = fax.ttl_minutes
    media_ttl = r.int("MEDIA_URL_TTL_SECONDS", ttl * 60 + defaults.MEDIA_URL_SLACK_S,
                      60, 7 * 24 * 3600)
    if media_ttl < ttl * 60 + 300:
        r.problems.append(f"MEDIA_URL_TTL_SECONDS: {media_ttl} s does not cover FAX_TTL_MINUTES "
                          f"({ttl} min) plus 5 minutes of sending; use at least {ttl * 60 + 300}")
    media = _build(r, MediaSettings, url_ttl_s=media_ttl)

    project = r.str("SIGNALWIRE_PROJECT_ID")
    token = r.str("SIGNALWIRE_API_TOKEN")
    signing_key = r.str("SIGNALWIRE_SIGNING_KEY")
    if not sandbox:
        for name, value in (("SIGNALWIRE_PROJECT_ID", project), ("SIGNALWIRE_API_TOKEN", token),
                            ("SIGNALWIRE_SIGNING_KEY", signing_key)):
            if not value:
                r.problems.append(f"{name}: required when SIGNALWIRE_SPACE_URL is set")
    else:
        # Sandbox: the built-in simulator gets throw-away credentials for this run.
        project = project or _default(_field(SignalWireSettings, "project_id"))
        token = token or secrets.token_urlsafe(18)
        signing_key = signing_key or secrets.token_urlsafe(18)
    signalwire = _build(r, SignalWireSettings, space_url=space, project_id=project or "",
                        api_token=token or "", signing_key=signing_key or "")

    s3 = _build(r, S3Settings)
    if media.store == "s3" and not s3.bucket:
        r.problems.append("S3_BUCKET: required when MEDIA_STORE=s3")
    if s3.prefix and not s3.prefix.endswith("/"):
        s3 = replace(s3, prefix=s3.prefix + "/")
    if bool(s3.access_key_id) != bool(s3.secret_access_key):
        r.problems.append("AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY: set both or neither")

    notify_tls = _read(r, _field(NotifySettings, "tls"))
    notify = _build(r, NotifySettings, tls=notify_tls, port=r.int(
        "NOTIFY_SMTP_PORT", defaults.NOTIFY_SMTPS_PORT if notify_tls == "tls"
        else _default(_field(NotifySettings, "port")), 1, 65535))
    if bool(notify.username) != bool(notify.password):
        r.problems.append("NOTIFY_SMTP_USERNAME / NOTIFY_SMTP_PASSWORD: set both or neither")
    if "@" not in notify.sender or any(c in notify.sender for c in "\r\n<>"):
        r.problems.append(f"NOTIFY_FROM: {notify.sender!r} is not a mail address")

    queue = _build(r, QueueSettings)
    if queue.document_retention_hours > queue.job_retention_days * 24:
        r.problems.append("DOCUMENT_RETENTION_HOURS: must not exceed JOB_RETENTION_DAYS "
                          "(a document outliving its job could never be found again)")

    template_raw = r.str("REPORT_TEMPLATE_DIR")
    template_dir = Path(template_raw) if template_raw else None
    if template_dir is not None and not template_dir.is_dir():
        r.problems.append(f"REPORT_TEMPLATE_DIR: {template_raw} is not a folder")
    elif template_dir is not None:  # old $name templates, or ones jinja2 cannot parse
        from gateway.templating import template_problems  # local: keeps --help fast

        r.problems.extend(template_problems(template_dir))
    reports = _build(r, ReportSettings, template_dir=template_dir)

    tls_min = r.choice("TLS_MIN_VERSION", _default(_field(TlsSettings, "min_version")).lower(),
                       ("tlsv1", "tlsv1.1", "tlsv1.2", "tlsv1.3"))
    tls = _build(r, TlsSettings, min_version="TLSv" + tls_min[4:])
    if bool(tls.cert_file) != bool(tls.key_file):
        r.problems.append("TLS_CERT_FILE / TLS_KEY_FILE: set both or neither")
    smtps_listen = (r.hostport("SMTPS_LISTEN", "0.0.0.0:465") if r.str("SMTPS_LISTEN")
                    else None)
    if smtps_listen is not None and not tls.cert_file:
        r.problems.append("SMTPS_LISTEN: needs TLS_CERT_FILE and TLS_KEY_FILE")
    if tls.required and not tls.cert_file:
        r.problems.append("SMTP_REQUIRE_TLS: needs TLS_CERT_FILE and TLS_KEY_FILE")
    smtp = _build(r, SmtpSettings, smtps_listen=smtps_listen,
                  hostname=_read(r, _field(SmtpSettings, "hostname")) or "localhost")

    from gateway.rules.policy import DestinationPolicy, SenderPolicy, TrustedNetworks

    access = _build(r, AccessSettings, dns_nameservers=_nameservers(r))
    destinations = _build(r, DestinationSettings)
    for name, check in (("TRUSTED_NETWORKS", lambda: TrustedNetworks(access.trusted_networks)),
                        ("ALLOWED_SENDERS", lambda: SenderPolicy(access.allowed_senders)),
                        ("FAX_ALLOW_PREFIXES / FAX_BLOCK_PREFIXES",
                         lambda: DestinationPolicy(region, destinations.allow_prefixes,
                                                   destinations.block_prefixes))):
        try:
            check()
        except ValueError as exc:
            r.problems.append(f"{name}: {exc}")
    r.problems.extend(f"ALLOWED_SENDERS: {p!r} lets anyone fax who writes any sender address "
                      "(sender addresses are forged at will); list your domains or addresses, "
                      "or use TRUSTED_NETWORKS or SMTP AUTH (USERS_FILE) for open access"
                      for p in access.allowed_senders if _matches_any_domain(p))

    cluster = _build(r, ClusterSettings, database_url=r.str("DATABASE_URL") or None,
                     listen_url=r.str("DATABASE_LISTEN_URL") or None)
    for name, url in (("DATABASE_URL", cluster.database_url),
                      ("DATABASE_LISTEN_URL", cluster.listen_url)):
        if url is not None and urlsplit(url).scheme not in ("postgresql", "postgres"):
            r.problems.append(f"{name}: {mask_url(url)!r} is not a "
                              "postgresql://user:password@host:port/dbname URL")
    if cluster.listen_url is not None and cluster.database_url is None:
        r.problems.append("DATABASE_LISTEN_URL without DATABASE_URL: it is where gateways "
                          "sharing a PostgreSQL queue listen for each other; a gateway on "
                          "SQLite has no other gateways")
    if cluster.database_url is not None:
        if media.store == "local":
            r.problems.append("MEDIA_STORE=local with DATABASE_URL: several gateways share "
                              "one queue, so the documents must be in S3 (MEDIA_STORE=s3) "
                              "where every node can serve them")

    http = _build(r, HttpSettings)
    # ADMIN_LISTEN set to nothing turns the dashboard off; unset means the loopback default.
    admin_raw = env.get("ADMIN_LISTEN")
    admin_listen = (None if admin_raw is not None and not admin_raw.strip()
                    else r.hostport("ADMIN_LISTEN", str(_default(_field(AdminSettings, "listen")))))
    if admin_listen is not None and (admin_listen.host, admin_listen.port) == (
            http.listen.host, http.listen.port) and admin_listen.port != 0:
        r.problems.append("ADMIN_LISTEN: must differ from HTTP_LISTEN (the dashboard never "
                          "shares the listener SignalWire reaches)")
    admin = _build(r, AdminSettings, listen=admin_listen)
    try:
        TrustedNetworks(admin.trusted_proxies)
    except ValueError as exc:
        r.problems.append(f"ADMIN_TRUSTED_PROXIES: {exc}")
    if http.public_base_url is None and space is not None and not is_loopback_url(space):
        # Otherwise http:// + HTTP_LISTEN: loopback, which SignalWire can never reach.
        r.problems.append("PUBLIC_BASE_URL: required when SIGNALWIRE_SPACE_URL is set (the "
                          "https:// address at which SignalWire reaches HTTP_LISTEN, for "
                          "status callbacks and media)")

    routes = Routes()
    routes_file = r.file("INBOUND_ROUTES_FILE")
    try:
        routes = parse_routes(r.env.get("INBOUND_ROUTES"))
        if routes_file is not None and routes_file.is_file():
            routes = combine(routes, parse_routes_file(routes_file))
    except RouteError as exc:
        r.problems.append(str(exc))
    for number, addresses in routes.table:
        for address in addresses:
            if _in_domain(address, domain):
                r.problems.append(f"INBOUND_ROUTES: {number}={address} is in FAX_DOMAIN "
                                  f"({domain}): each fax received there would be faxed out "
                                  "again; route it to a mailbox")
    inbound_admin = r.addresses("INBOUND_ADMIN_ADDRESS")
    if len(inbound_admin) > 1:
        r.problems.append("INBOUND_ADMIN_ADDRESS: one address only")
    r.problems.extend(f"INBOUND_ADMIN_ADDRESS: {a} is in FAX_DOMAIN ({domain}): its mail would "
                      "be faxed out; give a mailbox"
                      for a in inbound_admin if _in_domain(a, domain))
    paper = r.choice("FAX_PAPER", defaults.FAX_PAPER_IN_LETTER_REGIONS
                     if region in defaults.LETTER_REGIONS
                     else defaults.FAX_PAPER_OUTSIDE_LETTER_REGIONS, ("letter", "a4"))
    documents = _build(r, DocumentSettings, paper=paper)
    inbound = _build(r, InboundSettings, routes=routes, routes_file=routes_file,
                     admin_address=inbound_admin[0] if inbound_admin else None,
                     page_size=r.choice("INBOUND_PAGE_SIZE", paper, ("letter", "legal", "a4")))
    for item in inbound.blocked_callers:
        if item.lower() != "anonymous" and not (item.startswith("+") and item[1:].isdigit()):
            r.problems.append(f"INBOUND_BLOCKED_CALLERS: {item!r} is not an E.164 number or "
                              "prefix (+1900...) or 'anonymous'")
    if inbound.lookback_hours >= queue.job_retention_days * 24:
        r.problems.append("INBOUND_LOOKBACK_HOURS: must be shorter than JOB_RETENTION_DAYS "
                          "(a pruned fax found again by the reconciler would be mailed twice)")

    logs = _build(r, LogSettings, level=r.choice(
        "FAXGW_LOG_LEVEL", _default(_field(LogSettings, "level")).lower(),
        ("debug", "info", "warning", "error")).upper())
    if r.problems:
        raise ConfigError(r.problems)
    return Settings(fax=fax, smtp=smtp, http=http, signalwire=signalwire, media=media, s3=s3,
                    notify=notify, queue=queue, logs=logs, access=access, tls=tls,
                    destinations=destinations, documents=documents, reports=reports,
                    inbound=inbound, admin=admin, cluster=cluster)


def is_loopback_url(url: str) -> bool:
    """True for URLs a real SignalWire could never reach (worth a warning at start-up)."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


REFERENCE_COMMAND = "python -m gateway.config --reference > docs/configuration.md"


def _shown_default(f: Field[Any]) -> str:
    """A setting's default as the reference prints it."""
    if f.metadata["shown"] is not None:
        return f.metadata["shown"]
    value = f.default
    assert value is not MISSING, f"{f.metadata['variable']}: a computed default needs shown="
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "`yes`" if value else "`no`"
    if isinstance(value, tuple):
        return f"`{','.join(str(v) for v in value)}`" if value else "empty"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"`{value}`" if str(value) else ""


def reference() -> str:
    """docs/configuration.md: every setting's variable, default and description, grouped."""
    out = [
        "# Configuration reference",
        "",
        f"<!-- Generated from gateway/config.py by `{REFERENCE_COMMAND}`; edit the",
        "     descriptions there, not here (tests/test_config_reference.py checks they agree). -->",
        "",
        "Settings come from environment variables, or a `.env` file (`FAXGW_ENV_FILE`, or",
        "`faxgw run --config PATH`; otherwise `./.env` if present). The process environment wins",
        "over the file. `config/faxgw.env.example` lists them all with comments, and",
        "`faxgw run --check` validates a configuration and prints it with the secrets masked.",
        "Every problem is reported at once, naming its variable, and the daemon exits 78.",
        "",
        "Settings marked *advanced* are knobs most installations never touch: their defaults",
        "suit a gateway serving an office; change them to fix a measured problem.",
    ]
    for grp in fields(Settings):
        out += ["", f"## {grp.metadata['title']}", ""]
        if grp.metadata["intro"]:
            out += [grp.metadata["intro"], ""]
        out += ["| variable | default | what it does |", "|---|---|---|"]
        for f in fields(grp.default_factory):  # type: ignore[arg-type]
            name = f"`{f.metadata['variable']}`" + (" *advanced*" if f.metadata["advanced"]
                                                    else "")
            doc = f.metadata["doc"].replace("|", "\\|")
            out.append(f"| {name} | {_shown_default(f)} | {doc} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    if sys.argv[1:] != ["--reference"]:
        sys.exit(f"usage: {REFERENCE_COMMAND}")
    sys.stdout.write(reference())
