"""Settings: one frozen dataclass built from the environment and an optional .env file.

Every problem is collected and reported at once, naming the variable, so an operator fixes a
config in one round trip; the daemon exits 78 (EX_CONFIG) on any of them.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import socket
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Mapping
from urllib.parse import urlsplit

from dotenv import dotenv_values

from gateway import constants, defaults
from gateway.rules.inbound_routes import (RouteError, Routes, combine, parse_routes,
                                     parse_routes_file)


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


@dataclass(frozen=True)
class Settings:
    fax_domain: str = defaults.FAX_DOMAIN
    default_region: str = defaults.FAX_DEFAULT_REGION
    from_number: str = defaults.SANDBOX_FROM_NUMBER
    quality: str = defaults.FAX_QUALITY
    ttl_minutes: int = defaults.FAX_TTL_MINUTES
    smtp_listen: HostPort = field(default_factory=lambda: _hostport(defaults.SMTP_LISTEN))
    smtp_hostname: str = field(default_factory=socket.getfqdn)
    smtp_max_message_bytes: int = defaults.SMTP_MAX_MESSAGE_BYTES
    smtp_max_recipients: int = defaults.SMTP_MAX_RECIPIENTS
    smtp_max_connections: int = defaults.SMTP_MAX_CONNECTIONS
    smtp_max_connections_per_ip: int = defaults.SMTP_MAX_CONNECTIONS_PER_IP
    smtp_data_timeout_s: float = defaults.SMTP_DATA_TIMEOUT_S
    smtp_idle_timeout_s: float = defaults.SMTP_IDLE_TIMEOUT_S
    max_pages: int = defaults.MAX_PAGES
    http_listen: HostPort = field(default_factory=lambda: _hostport(defaults.HTTP_LISTEN))
    public_base_url: str | None = None  # None: http:// + the bound HTTP address
    signalwire_space_url: str | None = None  # None: sandbox with the built-in simulator
    signalwire_project_id: str = defaults.SANDBOX_PROJECT_ID
    signalwire_api_token: str = field(default="", repr=False)
    signalwire_signing_key: str = field(default="", repr=False)
    media_store: str = defaults.MEDIA_STORE
    s3_bucket: str = ""
    s3_prefix: str = defaults.S3_PREFIX
    s3_endpoint_url: str | None = None
    s3_region: str = defaults.S3_REGION
    # Given to boto3 explicitly, so that keys in the .env file are used (None: boto3's chain).
    aws_access_key_id: str | None = None
    aws_secret_access_key: str | None = field(default=None, repr=False)
    aws_session_token: str | None = field(default=None, repr=False)
    aws_profile: str | None = None
    aws_ca_bundle: Path | None = None
    media_url_ttl_s: int = defaults.FAX_TTL_MINUTES * 60 + defaults.MEDIA_URL_SLACK_S
    media_signing_key: str = field(default="", repr=False)  # "": generated once into DATA_DIR
    notify_smtp_host: str | None = None  # None: reports go to DATA_DIR/outbox as .eml files
    notify_smtp_port: int = defaults.NOTIFY_SMTP_PORT
    notify_smtp_username: str | None = None
    notify_smtp_password: str | None = field(default=None, repr=False)
    notify_smtp_tls: str = defaults.NOTIFY_SMTP_TLS
    notify_from: str = field(default_factory=lambda: f"faxgw@{socket.gethostname()}")
    data_dir: Path = Path(defaults.DATA_DIR)
    min_free_disk_mb: int = defaults.MIN_FREE_DISK_MB
    status_poll_s: float = defaults.STATUS_POLL_S
    retry_base_s: float = defaults.RETRY_BASE_S
    retry_max_s: float = defaults.RETRY_MAX_S
    give_up_hours: float = defaults.GIVE_UP_HOURS
    worker_concurrency: int = defaults.WORKER_CONCURRENCY
    api_timeout_s: float = defaults.API_TIMEOUT_S
    fax_max_attempts: int = defaults.FAX_MAX_ATTEMPTS
    fax_retry_delay_s: float = defaults.FAX_RETRY_DELAY_S
    fax_kill_minutes: float = defaults.FAX_KILL_MINUTES
    document_retention_hours: float = defaults.DOCUMENT_RETENTION_HOURS
    job_retention_days: float = defaults.JOB_RETENTION_DAYS
    shutdown_grace_s: float = defaults.SHUTDOWN_GRACE_S
    paper: str = defaults.FAX_PAPER_IN_LETTER_REGIONS
    body_policy: str = defaults.FAX_BODY
    cover: bool = defaults.FAX_COVER
    doc_timeout_s: float = defaults.DOC_TIMEOUT_S
    doc_memory_mb: int = defaults.DOC_MEMORY_MB
    doc_workers: int = defaults.DOC_WORKERS
    partial_timeout_minutes: int = defaults.PARTIAL_TIMEOUT_MINUTES
    partial_max_sets_per_sender: int = defaults.PARTIAL_MAX_SETS_PER_SENDER
    report_thumbnail: bool = defaults.REPORT_THUMBNAIL
    report_attach_pdf: bool = defaults.REPORT_ATTACH_PDF
    report_accepted: bool = defaults.REPORT_ACCEPTED
    report_bcc: tuple[str, ...] = ()
    report_refusals: bool = defaults.REPORT_REFUSALS
    report_template_dir: Path | None = None
    smtps_listen: HostPort | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_min_version: str = "TLSv" + defaults.TLS_MIN_VERSION[4:]
    smtp_require_tls: bool = defaults.SMTP_REQUIRE_TLS
    smtp_auth_plaintext: bool = defaults.SMTP_AUTH_PLAINTEXT
    users_file: Path | None = None
    trusted_networks: tuple[str, ...] = defaults.TRUSTED_NETWORKS
    allowed_senders: tuple[str, ...] = ()
    sender_verify: str = defaults.SENDER_VERIFY
    dns_nameservers: tuple[HostPort, ...] = ()  # (): the system's resolver
    dns_timeout_s: float = defaults.DNS_TIMEOUT_S
    fax_allow_international: bool = defaults.FAX_ALLOW_INTERNATIONAL
    fax_allow_prefixes: tuple[str, ...] = ()
    fax_block_prefixes: tuple[str, ...] = ()
    rate_per_sender_hour: int = defaults.RATE_LIMIT_PER_SENDER
    rate_total_hour: int = defaults.RATE_LIMIT_TOTAL
    auth_max_failures: int = defaults.AUTH_MAX_FAILURES
    auth_lockout_minutes: float = defaults.AUTH_LOCKOUT_MINUTES
    log_level: str = defaults.FAXGW_LOG_LEVEL.upper()
    log_format: str = defaults.FAXGW_LOG_FORMAT
    metrics_token: str | None = field(default=None, repr=False)
    # Inbound faxes (gateway/inbound/): unset routes = inbound off, every call rejected.
    inbound_routes: Routes = Routes()
    inbound_blocked_callers: tuple[str, ...] = ()
    inbound_keep_media: bool = defaults.INBOUND_KEEP_MEDIA
    inbound_attach_document: bool = defaults.INBOUND_ATTACH_DOCUMENT
    inbound_admin_address: str | None = None
    inbound_page_size: str = "letter"
    inbound_reconcile_s: float = defaults.INBOUND_RECONCILE_S
    inbound_lookback_hours: float = defaults.INBOUND_LOOKBACK_HOURS
    admin_listen: HostPort | None = HostPort("127.0.0.1", 8026)  # None: no dashboard
    admin_trusted_proxies: tuple[str, ...] = defaults.ADMIN_TRUSTED_PROXIES
    admin_session_minutes: float = defaults.ADMIN_SESSION_MINUTES
    smtp_proxy_protocol: bool = defaults.SMTP_PROXY_PROTOCOL
    database_url: str | None = field(default=None, repr=False)  # None: SQLite in DATA_DIR
    database_prepared_statements: bool = defaults.DATABASE_PREPARED_STATEMENTS
    node_id: str = field(default_factory=lambda: default_node_id())
    lease_seconds: float = defaults.LEASE_SECONDS
    dedup_window_hours: float = defaults.DEDUP_WINDOW_HOURS
    send_rate_per_second: float = defaults.SEND_RATE_PER_SECOND

    @property
    def shared(self) -> bool:
        """Several gateways share one queue (DATABASE_URL is set)."""
        return self.database_url is not None

    @property
    def sandbox(self) -> bool:
        return self.signalwire_space_url is None

    def masked(self) -> dict[str, str]:
        """Settings as printable text under their variables' names, secrets replaced, for
        `faxgw run --check`."""
        out: dict[str, str] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in _SECRET_FIELDS and value:
                value = "********"
            elif f.name == "database_url" and value:
                value = mask_url(value)
            elif isinstance(value, bool):
                value = "yes" if value else "no"
            elif isinstance(value, tuple):
                value = ",".join(str(item) for item in value)  # HostPort prints host:port
            out[VARIABLES[f.name]] = "" if value is None else str(value)
        return out


_SECRET_FIELDS = {"signalwire_api_token", "signalwire_signing_key", "notify_smtp_password",
                  "media_signing_key", "metrics_token", "aws_secret_access_key",
                  "aws_session_token"}

# Each Settings field and the variable it is read from (a field read from two variables names
# the first): what `run --check` prints, and the names an unknown variable is compared with.
VARIABLES: dict[str, str] = {
    "fax_domain": "FAX_DOMAIN", "default_region": "FAX_DEFAULT_REGION",
    "from_number": "FAX_FROM_NUMBER", "quality": "FAX_QUALITY", "ttl_minutes": "FAX_TTL_MINUTES",
    "smtp_listen": "SMTP_LISTEN", "smtp_hostname": "SMTP_HOSTNAME",
    "smtp_max_message_bytes": "SMTP_MAX_MESSAGE_BYTES",
    "smtp_max_recipients": "SMTP_MAX_RECIPIENTS", "smtp_max_connections": "SMTP_MAX_CONNECTIONS",
    "smtp_max_connections_per_ip": "SMTP_MAX_CONNECTIONS_PER_IP",
    "smtp_data_timeout_s": "SMTP_DATA_TIMEOUT_SECONDS",
    "smtp_idle_timeout_s": "SMTP_IDLE_TIMEOUT_SECONDS", "max_pages": "FAX_MAX_PAGES",
    "http_listen": "HTTP_LISTEN", "public_base_url": "PUBLIC_BASE_URL",
    "signalwire_space_url": "SIGNALWIRE_SPACE_URL",
    "signalwire_project_id": "SIGNALWIRE_PROJECT_ID",
    "signalwire_api_token": "SIGNALWIRE_API_TOKEN",
    "signalwire_signing_key": "SIGNALWIRE_SIGNING_KEY", "media_store": "MEDIA_STORE",
    "s3_bucket": "S3_BUCKET", "s3_prefix": "S3_PREFIX", "s3_endpoint_url": "S3_ENDPOINT_URL",
    "s3_region": "S3_REGION", "aws_access_key_id": "AWS_ACCESS_KEY_ID",
    "aws_secret_access_key": "AWS_SECRET_ACCESS_KEY", "aws_session_token": "AWS_SESSION_TOKEN",
    "aws_profile": "AWS_PROFILE", "aws_ca_bundle": "AWS_CA_BUNDLE",
    "media_url_ttl_s": "MEDIA_URL_TTL_SECONDS", "media_signing_key": "MEDIA_SIGNING_KEY",
    "notify_smtp_host": "NOTIFY_SMTP_HOST", "notify_smtp_port": "NOTIFY_SMTP_PORT",
    "notify_smtp_username": "NOTIFY_SMTP_USERNAME",
    "notify_smtp_password": "NOTIFY_SMTP_PASSWORD", "notify_smtp_tls": "NOTIFY_SMTP_TLS",
    "notify_from": "NOTIFY_FROM", "data_dir": "DATA_DIR", "min_free_disk_mb": "MIN_FREE_DISK_MB",
    "status_poll_s": "STATUS_POLL_SECONDS", "retry_base_s": "RETRY_BASE_SECONDS",
    "retry_max_s": "RETRY_MAX_SECONDS", "give_up_hours": "GIVE_UP_HOURS",
    "worker_concurrency": "WORKER_CONCURRENCY", "api_timeout_s": "SIGNALWIRE_TIMEOUT_SECONDS",
    "fax_max_attempts": "FAX_MAX_ATTEMPTS", "fax_retry_delay_s": "FAX_RETRY_DELAY_SECONDS",
    "fax_kill_minutes": "FAX_KILL_MINUTES", "document_retention_hours": "DOCUMENT_RETENTION_HOURS",
    "job_retention_days": "JOB_RETENTION_DAYS", "shutdown_grace_s": "SHUTDOWN_GRACE_SECONDS",
    "paper": "FAX_PAPER", "body_policy": "FAX_BODY", "cover": "FAX_COVER",
    "doc_timeout_s": "DOC_TIMEOUT_SECONDS", "doc_memory_mb": "DOC_MEMORY_MB",
    "doc_workers": "DOC_WORKERS", "partial_timeout_minutes": "PARTIAL_TIMEOUT_MINUTES",
    "report_thumbnail": "REPORT_THUMBNAIL", "report_attach_pdf": "REPORT_ATTACH_PDF",
    "report_accepted": "REPORT_ACCEPTED", "report_bcc": "REPORT_BCC",
    "report_refusals": "REPORT_REFUSALS", "report_template_dir": "REPORT_TEMPLATE_DIR",
    "smtps_listen": "SMTPS_LISTEN", "tls_cert_file": "TLS_CERT_FILE",
    "tls_key_file": "TLS_KEY_FILE", "tls_min_version": "TLS_MIN_VERSION",
    "smtp_require_tls": "SMTP_REQUIRE_TLS", "smtp_auth_plaintext": "SMTP_AUTH_PLAINTEXT",
    "users_file": "USERS_FILE", "trusted_networks": "TRUSTED_NETWORKS",
    "allowed_senders": "ALLOWED_SENDERS", "fax_allow_international": "FAX_ALLOW_INTERNATIONAL",
    "fax_allow_prefixes": "FAX_ALLOW_PREFIXES", "fax_block_prefixes": "FAX_BLOCK_PREFIXES",
    "rate_per_sender_hour": "RATE_LIMIT_PER_SENDER", "rate_total_hour": "RATE_LIMIT_TOTAL",
    "auth_max_failures": "AUTH_MAX_FAILURES", "auth_lockout_minutes": "AUTH_LOCKOUT_MINUTES",
    "log_level": "FAXGW_LOG_LEVEL", "log_format": "FAXGW_LOG_FORMAT",
    "metrics_token": "METRICS_TOKEN", "inbound_routes": "INBOUND_ROUTES",
    "inbound_blocked_callers": "INBOUND_BLOCKED_CALLERS",
    "inbound_keep_media": "INBOUND_KEEP_MEDIA",
    "inbound_attach_document": "INBOUND_ATTACH_DOCUMENT",
    "inbound_admin_address": "INBOUND_ADMIN_ADDRESS", "inbound_page_size": "INBOUND_PAGE_SIZE",
    "inbound_reconcile_s": "INBOUND_RECONCILE_SECONDS",
    "inbound_lookback_hours": "INBOUND_LOOKBACK_HOURS", "admin_listen": "ADMIN_LISTEN",
    "admin_trusted_proxies": "ADMIN_TRUSTED_PROXIES",
    "admin_session_minutes": "ADMIN_SESSION_MINUTES",
    "smtp_proxy_protocol": "SMTP_PROXY_PROTOCOL", "database_url": "DATABASE_URL",
    "database_prepared_statements": "DATABASE_PREPARED_STATEMENTS", "node_id": "NODE_ID",
    "lease_seconds": "LEASE_SECONDS", "dedup_window_hours": "DEDUP_WINDOW_HOURS",
    "send_rate_per_second": "SEND_RATE_PER_SECOND",
    "partial_max_sets_per_sender": "PARTIAL_MAX_SETS_PER_SENDER",
    "sender_verify": "SENDER_VERIFY", "dns_nameservers": "DNS_NAMESERVERS",
    "dns_timeout_s": "DNS_TIMEOUT_SECONDS",
}
# Variables read besides those: the .env file's own, the second of a pair, a test hook.
OTHER_VARIABLES = frozenset({"FAXGW_ENV_FILE", "INBOUND_ROUTES_FILE", "FAXGW_CRASH_AT",
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

    def int(self, name: str, default: int, lo: int, hi: int) -> int:
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

    def float(self, name: str, default: float, lo: float, hi: float) -> float:
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

    def bool(self, name: str, default: bool) -> bool:
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

    def addresses(self, name: str) -> tuple[str, ...]:
        raw = self.str(name, "") or ""
        items = tuple(a.strip() for a in raw.split(",") if a.strip())
        for item in items:
            if "@" not in item or any(c in item for c in " <>\r\n"):
                self.problems.append(f"{name}: {item!r} is not a mail address")
        return items

    def items(self, name: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
        raw = self.env.get(name)
        if raw is None:
            return default
        return tuple(i.strip() for i in raw.replace("\n", ",").split(",") if i.strip())

    def file(self, name: str) -> Path | None:
        raw = self.str(name)
        if raw is None:
            return None
        if not Path(raw).is_file():
            self.problems.append(f"{name}: {raw} does not exist or is not a file")
        return Path(raw)

    def choice(self, name: str, default: str, allowed: tuple[str, ...]) -> str:
        raw = self.str(name, default)
        assert raw is not None
        raw = raw.lower()
        if raw not in allowed:
            self.problems.append(f"{name}: {raw!r} is not one of {', '.join(allowed)}")
            return default
        return raw

    def hostport(self, name: str, default: str) -> HostPort:
        raw = self.str(name, default)
        assert raw is not None
        host, sep, port_text = raw.rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
            self.problems.append(f"{name}: {raw!r} is not host:port (e.g. {default})")
            host, _, port_text = default.rpartition(":")
        return HostPort(host, int(port_text))

    def url(self, name: str) -> str | None:
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


def settings_from(env: Mapping[str, str]) -> Settings:
    r = _Reader(env)
    space = r.url("SIGNALWIRE_SPACE_URL")
    sandbox = space is None

    region = (r.str("FAX_DEFAULT_REGION", defaults.FAX_DEFAULT_REGION) or "").upper()
    import phonenumbers  # local: keeps `faxgw --help` fast

    if region not in phonenumbers.SUPPORTED_REGIONS:
        r.problems.append(f"FAX_DEFAULT_REGION: {region!r} is not an ISO country code "
                          "phonenumbers knows (e.g. US, GB, DE)")
    from_number = r.str("FAX_FROM_NUMBER", defaults.SANDBOX_FROM_NUMBER if sandbox else None)
    if from_number is None:
        r.problems.append("FAX_FROM_NUMBER: required when SIGNALWIRE_SPACE_URL is set "
                          "(a fax-enabled number of your SignalWire project, E.164)")
        from_number = ""
    elif not (from_number.startswith("+") and from_number[1:].isdigit()
              and 8 <= len(from_number) <= 16):
        r.problems.append(f"FAX_FROM_NUMBER: {from_number!r} is not in E.164 form "
                          "(+ and 7 to 15 digits)")

    ttl = r.int("FAX_TTL_MINUTES", defaults.FAX_TTL_MINUTES,
                constants.TTL_MIN_MINUTES, constants.TTL_MAX_MINUTES)
    media_ttl = r.int("MEDIA_URL_TTL_SECONDS", ttl * 60 + defaults.MEDIA_URL_SLACK_S,
                      60, 7 * 24 * 3600)
    if media_ttl < ttl * 60 + 300:
        r.problems.append(f"MEDIA_URL_TTL_SECONDS: {media_ttl} s does not cover FAX_TTL_MINUTES "
                          f"({ttl} min) plus 5 minutes of sending; use at least {ttl * 60 + 300}")

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
        project = project or defaults.SANDBOX_PROJECT_ID
        token = token or secrets.token_urlsafe(18)
        signing_key = signing_key or secrets.token_urlsafe(18)

    media_store = r.choice("MEDIA_STORE", defaults.MEDIA_STORE, ("local", "s3"))
    bucket = r.str("S3_BUCKET", "") or ""
    if media_store == "s3" and not bucket:
        r.problems.append("S3_BUCKET: required when MEDIA_STORE=s3")
    prefix = r.str("S3_PREFIX", defaults.S3_PREFIX) or ""
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    s3_endpoint = r.url("S3_ENDPOINT_URL")
    aws_key_id, aws_secret = r.str("AWS_ACCESS_KEY_ID"), r.str("AWS_SECRET_ACCESS_KEY")
    if bool(aws_key_id) != bool(aws_secret):
        r.problems.append("AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY: set both or neither")

    notify_host = r.str("NOTIFY_SMTP_HOST")
    notify_tls = r.choice("NOTIFY_SMTP_TLS", defaults.NOTIFY_SMTP_TLS, ("none", "starttls", "tls"))
    notify_user = r.str("NOTIFY_SMTP_USERNAME")
    notify_password = r.str("NOTIFY_SMTP_PASSWORD")
    if bool(notify_user) != bool(notify_password):
        r.problems.append("NOTIFY_SMTP_USERNAME / NOTIFY_SMTP_PASSWORD: set both or neither")
    notify_from = r.str("NOTIFY_FROM", f"faxgw@{socket.gethostname()}") or ""
    if "@" not in notify_from or any(c in notify_from for c in "\r\n<>"):
        r.problems.append(f"NOTIFY_FROM: {notify_from!r} is not a mail address")

    domain = (r.str("FAX_DOMAIN", defaults.FAX_DOMAIN) or "").lower().rstrip(".")
    if not domain or any(c in domain for c in " @<>\r\n"):
        r.problems.append(f"FAX_DOMAIN: {domain!r} is not a domain name")

    doc_hours = r.float("DOCUMENT_RETENTION_HOURS", defaults.DOCUMENT_RETENTION_HOURS, 0,
                        24 * 365)
    job_days = r.float("JOB_RETENTION_DAYS", defaults.JOB_RETENTION_DAYS, 1, 3650)
    if doc_hours > job_days * 24:
        r.problems.append("DOCUMENT_RETENTION_HOURS: must not exceed JOB_RETENTION_DAYS "
                          "(a document outliving its job could never be found again)")

    template_raw = r.str("REPORT_TEMPLATE_DIR")
    template_dir = Path(template_raw) if template_raw else None
    if template_dir is not None and not template_dir.is_dir():
        r.problems.append(f"REPORT_TEMPLATE_DIR: {template_raw} is not a folder")
    elif template_dir is not None:  # old $name templates, or ones jinja2 cannot parse
        from gateway.templating import template_problems  # local: keeps --help fast

        r.problems.extend(template_problems(template_dir))

    cert, key = r.file("TLS_CERT_FILE"), r.file("TLS_KEY_FILE")
    if bool(cert) != bool(key):
        r.problems.append("TLS_CERT_FILE / TLS_KEY_FILE: set both or neither")
    smtps_listen = (r.hostport("SMTPS_LISTEN", "0.0.0.0:465") if r.str("SMTPS_LISTEN")
                    else None)
    if smtps_listen is not None and not cert:
        r.problems.append("SMTPS_LISTEN: needs TLS_CERT_FILE and TLS_KEY_FILE")
    tls_min = r.choice("TLS_MIN_VERSION", defaults.TLS_MIN_VERSION, ("tlsv1", "tlsv1.1", "tlsv1.2", "tlsv1.3"))
    tls_min = "TLSv" + tls_min[4:]
    require_tls = r.bool("SMTP_REQUIRE_TLS", defaults.SMTP_REQUIRE_TLS)
    if require_tls and not cert:
        r.problems.append("SMTP_REQUIRE_TLS: needs TLS_CERT_FILE and TLS_KEY_FILE")
    users_file = r.file("USERS_FILE")
    from gateway.rules.policy import DestinationPolicy, SenderPolicy, TrustedNetworks

    trusted = r.items("TRUSTED_NETWORKS", defaults.TRUSTED_NETWORKS)
    senders = r.items("ALLOWED_SENDERS")
    allow_prefixes = r.items("FAX_ALLOW_PREFIXES")
    block_prefixes = r.items("FAX_BLOCK_PREFIXES")
    for name, check in (("TRUSTED_NETWORKS", lambda: TrustedNetworks(trusted)),
                        ("ALLOWED_SENDERS", lambda: SenderPolicy(senders)),
                        ("FAX_ALLOW_PREFIXES / FAX_BLOCK_PREFIXES",
                         lambda: DestinationPolicy(region, allow_prefixes, block_prefixes))):
        try:
            check()
        except ValueError as exc:
            r.problems.append(f"{name}: {exc}")
    r.problems.extend(f"ALLOWED_SENDERS: {p!r} lets anyone fax who writes any sender address "
                      "(sender addresses are forged at will); list your domains or addresses, "
                      "or use TRUSTED_NETWORKS or SMTP AUTH (USERS_FILE) for open access"
                      for p in senders if _matches_any_domain(p))

    nameservers = _nameservers(r)

    database_url = r.str("DATABASE_URL") or None
    if database_url is not None:
        scheme = urlsplit(database_url).scheme
        if scheme not in ("postgresql", "postgres"):
            r.problems.append(f"DATABASE_URL: {mask_url(database_url)!r} is not a "
                              "postgresql://user:password@host:port/dbname URL")
        if media_store == "local":
            r.problems.append("MEDIA_STORE=local with DATABASE_URL: several gateways share "
                              "one queue, so the documents must be in S3 (MEDIA_STORE=s3) "
                              "where every node can serve them")
    lease_s = r.float("LEASE_SECONDS", defaults.LEASE_SECONDS, 3, 3600)

    http_listen = r.hostport("HTTP_LISTEN", defaults.HTTP_LISTEN)
    # ADMIN_LISTEN set to nothing turns the dashboard off; unset means the loopback default.
    admin_raw = env.get("ADMIN_LISTEN")
    admin_listen = (None if admin_raw is not None and not admin_raw.strip()
                    else r.hostport("ADMIN_LISTEN", defaults.ADMIN_LISTEN))
    if admin_listen is not None and (admin_listen.host, admin_listen.port) == (
            http_listen.host, http_listen.port) and admin_listen.port != 0:
        r.problems.append("ADMIN_LISTEN: must differ from HTTP_LISTEN (the dashboard never "
                          "shares the listener SignalWire reaches)")
    admin_proxies = r.items("ADMIN_TRUSTED_PROXIES", defaults.ADMIN_TRUSTED_PROXIES)
    try:
        TrustedNetworks(admin_proxies)
    except ValueError as exc:
        r.problems.append(f"ADMIN_TRUSTED_PROXIES: {exc}")
    public = r.url("PUBLIC_BASE_URL")
    if public is None and space is not None and not is_loopback_url(space):
        # Otherwise http:// + HTTP_LISTEN: loopback, which SignalWire can never reach.
        r.problems.append("PUBLIC_BASE_URL: required when SIGNALWIRE_SPACE_URL is set (the "
                          "https:// address at which SignalWire reaches HTTP_LISTEN, for "
                          "status callbacks and media)")

    routes = Routes()
    try:
        routes = parse_routes(r.env.get("INBOUND_ROUTES"))
        routes_file = r.file("INBOUND_ROUTES_FILE")
        if routes_file is not None and routes_file.is_file():
            routes = combine(routes, parse_routes_file(routes_file))
    except RouteError as exc:
        r.problems.append(str(exc))
    for number, addresses in routes.table:
        for address in addresses:
            if address.rpartition("@")[2].lower().rstrip(".") == domain:
                r.problems.append(f"INBOUND_ROUTES: {number}={address} is in FAX_DOMAIN "
                                  f"({domain}): each fax received there would be faxed out "
                                  "again; route it to a mailbox")
    blocked = r.items("INBOUND_BLOCKED_CALLERS")
    for item in blocked:
        if item.lower() != "anonymous" and not (item.startswith("+") and item[1:].isdigit()):
            r.problems.append(f"INBOUND_BLOCKED_CALLERS: {item!r} is not an E.164 number or "
                              "prefix (+1900...) or 'anonymous'")
    inbound_admin = r.addresses("INBOUND_ADMIN_ADDRESS")
    if len(inbound_admin) > 1:
        r.problems.append("INBOUND_ADMIN_ADDRESS: one address only")
    r.problems.extend(f"INBOUND_ADMIN_ADDRESS: {a} is in FAX_DOMAIN ({domain}): its mail would "
                      "be faxed out; give a mailbox" for a in inbound_admin
                      if a.rpartition("@")[2].lower().rstrip(".") == domain)
    paper = r.choice("FAX_PAPER", defaults.FAX_PAPER_IN_LETTER_REGIONS
                     if region in defaults.LETTER_REGIONS else defaults.FAX_PAPER_OUTSIDE_LETTER_REGIONS,
                     ("letter", "a4"))

    settings = Settings(
        fax_domain=domain,
        default_region=region,
        from_number=from_number,
        quality=r.choice("FAX_QUALITY", defaults.FAX_QUALITY, constants.QUALITIES),
        ttl_minutes=ttl,
        smtp_listen=r.hostport("SMTP_LISTEN", defaults.SMTP_LISTEN),
        smtp_hostname=r.str("SMTP_HOSTNAME", socket.getfqdn()) or "localhost",
        smtp_max_message_bytes=r.int("SMTP_MAX_MESSAGE_BYTES", defaults.SMTP_MAX_MESSAGE_BYTES,
                                     64 * 1024, 200 * 1024 * 1024),
        smtp_max_recipients=r.int("SMTP_MAX_RECIPIENTS", defaults.SMTP_MAX_RECIPIENTS, 1, 1000),
        smtp_max_connections=r.int("SMTP_MAX_CONNECTIONS", defaults.SMTP_MAX_CONNECTIONS,
                                   1, 100_000),
        smtp_max_connections_per_ip=r.int("SMTP_MAX_CONNECTIONS_PER_IP",
                                          defaults.SMTP_MAX_CONNECTIONS_PER_IP, 1, 100_000),
        smtp_data_timeout_s=r.float("SMTP_DATA_TIMEOUT_SECONDS", defaults.SMTP_DATA_TIMEOUT_S,
                                    1, 86400),
        smtp_idle_timeout_s=r.float("SMTP_IDLE_TIMEOUT_SECONDS", defaults.SMTP_IDLE_TIMEOUT_S,
                                    1, 3600),
        max_pages=r.int("FAX_MAX_PAGES", defaults.MAX_PAGES, 1, 2000),
        http_listen=http_listen,
        public_base_url=public,
        signalwire_space_url=space,
        signalwire_project_id=project or "",
        signalwire_api_token=token or "",
        signalwire_signing_key=signing_key or "",
        media_store=media_store,
        s3_bucket=bucket,
        s3_prefix=prefix,
        s3_endpoint_url=s3_endpoint,
        s3_region=r.str("S3_REGION", defaults.S3_REGION) or defaults.S3_REGION,
        aws_access_key_id=aws_key_id,
        aws_secret_access_key=aws_secret,
        aws_session_token=r.str("AWS_SESSION_TOKEN"),
        aws_profile=r.str("AWS_PROFILE"),
        aws_ca_bundle=r.file("AWS_CA_BUNDLE"),
        media_url_ttl_s=media_ttl,
        media_signing_key=r.str("MEDIA_SIGNING_KEY", "") or "",
        notify_smtp_host=notify_host,
        notify_smtp_port=r.int("NOTIFY_SMTP_PORT",
                               defaults.NOTIFY_SMTPS_PORT if notify_tls == "tls"
                               else defaults.NOTIFY_SMTP_PORT, 1, 65535),
        notify_smtp_username=notify_user,
        notify_smtp_password=notify_password,
        notify_smtp_tls=notify_tls,
        notify_from=notify_from,
        data_dir=Path(r.str("DATA_DIR", defaults.DATA_DIR) or defaults.DATA_DIR),
        min_free_disk_mb=r.int("MIN_FREE_DISK_MB", defaults.MIN_FREE_DISK_MB, 0, 10**9),
        status_poll_s=r.float("STATUS_POLL_SECONDS", defaults.STATUS_POLL_S, 0.05, 86400),
        retry_base_s=r.float("RETRY_BASE_SECONDS", defaults.RETRY_BASE_S, 0.01, 3600),
        retry_max_s=r.float("RETRY_MAX_SECONDS", defaults.RETRY_MAX_S, 0.01, 86400),
        give_up_hours=r.float("GIVE_UP_HOURS", defaults.GIVE_UP_HOURS, 0.001, 24 * 30),
        worker_concurrency=r.int("WORKER_CONCURRENCY", defaults.WORKER_CONCURRENCY, 1, 256),
        api_timeout_s=r.float("SIGNALWIRE_TIMEOUT_SECONDS", defaults.API_TIMEOUT_S, 0.1, 300),
        fax_max_attempts=r.int("FAX_MAX_ATTEMPTS", defaults.FAX_MAX_ATTEMPTS, 1, 20),
        fax_retry_delay_s=r.float("FAX_RETRY_DELAY_SECONDS", defaults.FAX_RETRY_DELAY_S,
                                  0.01, 86400),
        fax_kill_minutes=r.float("FAX_KILL_MINUTES", defaults.FAX_KILL_MINUTES, 0.01,
                                 7 * 24 * 60),
        document_retention_hours=doc_hours,
        job_retention_days=job_days,
        shutdown_grace_s=r.float("SHUTDOWN_GRACE_SECONDS", defaults.SHUTDOWN_GRACE_S, 0, 600),
        paper=paper,
        body_policy=r.choice("FAX_BODY", defaults.FAX_BODY, ("auto", "always", "never")),
        cover=r.bool("FAX_COVER", defaults.FAX_COVER),
        doc_timeout_s=r.float("DOC_TIMEOUT_SECONDS", defaults.DOC_TIMEOUT_S, 1, 3600),
        doc_memory_mb=r.int("DOC_MEMORY_MB", defaults.DOC_MEMORY_MB, 128, 65536),
        doc_workers=r.int("DOC_WORKERS", defaults.DOC_WORKERS, 1, 64),
        partial_timeout_minutes=r.int("PARTIAL_TIMEOUT_MINUTES", defaults.PARTIAL_TIMEOUT_MINUTES,
                                      1, 7 * 24 * 60),
        partial_max_sets_per_sender=r.int("PARTIAL_MAX_SETS_PER_SENDER",
                                          defaults.PARTIAL_MAX_SETS_PER_SENDER, 1, 1000),
        report_thumbnail=r.bool("REPORT_THUMBNAIL", defaults.REPORT_THUMBNAIL),
        report_attach_pdf=r.bool("REPORT_ATTACH_PDF", defaults.REPORT_ATTACH_PDF),
        report_accepted=r.bool("REPORT_ACCEPTED", defaults.REPORT_ACCEPTED),
        report_bcc=r.addresses("REPORT_BCC"),
        report_refusals=r.bool("REPORT_REFUSALS", defaults.REPORT_REFUSALS),
        report_template_dir=template_dir,
        smtps_listen=smtps_listen,
        tls_cert_file=cert,
        tls_key_file=key,
        tls_min_version=tls_min,
        smtp_require_tls=require_tls,
        smtp_auth_plaintext=r.bool("SMTP_AUTH_PLAINTEXT", defaults.SMTP_AUTH_PLAINTEXT),
        users_file=users_file,
        trusted_networks=trusted,
        allowed_senders=senders,
        sender_verify=r.choice("SENDER_VERIFY", defaults.SENDER_VERIFY, ("off", "dmarc")),
        dns_nameservers=nameservers,
        dns_timeout_s=r.float("DNS_TIMEOUT_SECONDS", defaults.DNS_TIMEOUT_S, 0.1, 120),
        fax_allow_international=r.bool("FAX_ALLOW_INTERNATIONAL",
                                       defaults.FAX_ALLOW_INTERNATIONAL),
        fax_allow_prefixes=allow_prefixes,
        fax_block_prefixes=block_prefixes,
        rate_per_sender_hour=r.int("RATE_LIMIT_PER_SENDER", defaults.RATE_LIMIT_PER_SENDER, 1,
                                   1_000_000),
        rate_total_hour=r.int("RATE_LIMIT_TOTAL", defaults.RATE_LIMIT_TOTAL, 1, 10_000_000),
        auth_max_failures=r.int("AUTH_MAX_FAILURES", defaults.AUTH_MAX_FAILURES, 1, 1000),
        auth_lockout_minutes=r.float("AUTH_LOCKOUT_MINUTES", defaults.AUTH_LOCKOUT_MINUTES,
                                     0.01, 24 * 60),
        log_level=r.choice("FAXGW_LOG_LEVEL", defaults.FAXGW_LOG_LEVEL,
                           ("debug", "info", "warning", "error")).upper(),
        log_format=r.choice("FAXGW_LOG_FORMAT", defaults.FAXGW_LOG_FORMAT, ("text", "json")),
        metrics_token=r.str("METRICS_TOKEN"),
        inbound_routes=routes,
        inbound_blocked_callers=blocked,
        inbound_keep_media=r.bool("INBOUND_KEEP_MEDIA", defaults.INBOUND_KEEP_MEDIA),
        inbound_attach_document=r.bool("INBOUND_ATTACH_DOCUMENT", defaults.INBOUND_ATTACH_DOCUMENT),
        inbound_admin_address=inbound_admin[0] if inbound_admin else None,
        inbound_page_size=r.choice("INBOUND_PAGE_SIZE", paper, ("letter", "legal", "a4")),
        inbound_reconcile_s=r.float("INBOUND_RECONCILE_SECONDS", defaults.INBOUND_RECONCILE_S,
                                    0.05, 86400),
        inbound_lookback_hours=r.float("INBOUND_LOOKBACK_HOURS",
                                       defaults.INBOUND_LOOKBACK_HOURS, 0.01, 24 * 30),
        admin_listen=admin_listen,
        admin_trusted_proxies=admin_proxies,
        admin_session_minutes=r.float("ADMIN_SESSION_MINUTES", defaults.ADMIN_SESSION_MINUTES,
                                      1, 30 * 24 * 60),
        smtp_proxy_protocol=r.bool("SMTP_PROXY_PROTOCOL", defaults.SMTP_PROXY_PROTOCOL),
        database_url=database_url,
        database_prepared_statements=r.bool("DATABASE_PREPARED_STATEMENTS",
                                            defaults.DATABASE_PREPARED_STATEMENTS),
        node_id=r.str("NODE_ID") or default_node_id(),
        lease_seconds=lease_s,
        dedup_window_hours=r.float("DEDUP_WINDOW_HOURS", defaults.DEDUP_WINDOW_HOURS, 0,
                                   24 * 30),
        send_rate_per_second=r.float("SEND_RATE_PER_SECOND", defaults.SEND_RATE_PER_SECOND,
                                     0.01, 1000),
    )
    if settings.inbound_lookback_hours >= job_days * 24:
        r.problems.append("INBOUND_LOOKBACK_HOURS: must be shorter than JOB_RETENTION_DAYS "
                          "(a pruned fax found again by the reconciler would be mailed twice)")
    if r.problems:
        raise ConfigError(r.problems)
    return settings


def is_loopback_url(url: str) -> bool:
    """True for URLs a real SignalWire could never reach (worth a warning at start-up)."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
