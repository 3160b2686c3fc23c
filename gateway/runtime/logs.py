"""Logging for journald and log shippers: one line per event, text or JSON, secrets redacted.

The code already avoids logging secrets; the `Redactor` filter on the handler is the second
line of defence, for what a library or an exception message lets through: presigned URL query
strings, `Authorization` values, `token=`/`key=`/`password=` pairs, the path secrets of
callback and media URLs, and the configured secret values themselves (`register_secret`).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
from datetime import UTC, datetime
from typing import IO, Any
from urllib.parse import quote

MASK = "***"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
MIN_SECRET_CHARS = 6        # shorter values would mask ordinary words
# Record attributes worth carrying into JSON when a call site passes them as `extra`.
JSON_EXTRAS = ("job_id", "message_id", "attempt", "fax_sid", "peer")
# Job lines start "job <id>" by convention: JSON gets the id without an `extra` at each call.
_JOB_IN_MESSAGE = re.compile(r"\bjob (?P<id>[0-9a-f]{16})\b")

# A URL whose query carries a signature: the whole query goes (credential, expiry, signature).
_SIGNED_QUERY = re.compile(
    r"(?P<keep>\?)(?P<query>[^\s\"'<>]*?(?:X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token"
    r"|Signature|AWSAccessKeyId|X-Goog-Signature|sig)=[^\s\"'<>]*)", re.IGNORECASE)
# Authorization values, as a header line or anywhere in a repr.
_AUTH_SCHEME = re.compile(r"(?P<keep>\b(?:Basic|Bearer|Digest)\s+)[A-Za-z0-9+/=._~-]{6,}",
                          re.IGNORECASE)
_AUTH_HEADER = re.compile(
    r"(?P<keep>\b(?:Proxy-)?Authorization['\"]?\s*[:=]\s*['\"]?)(?!(?:Basic|Bearer|Digest)\s)"
    r"[^\s'\",}]+", re.IGNORECASE)
# name=value and "name": "value" for names that smell of secrets.
_SECRET_NAME = (r"[A-Za-z0-9_.-]*(?:token|key|password|passwd|pwd|secret|signature|credential"
                r"|auth)[A-Za-z0-9_.-]*")
_PAIR = re.compile(rf"(?P<keep>\b{_SECRET_NAME}=)(?!\*\*\*)[^\s&;,'\"<>)\]}}]+",
                   re.IGNORECASE)
_QUOTED_PAIR = re.compile(
    rf"(?P<keep>(?P<q>['\"]){_SECRET_NAME}(?P=q)\s*:\s*(?P<v>['\"]))(?!\*\*\*)[^'\"]*",
    re.IGNORECASE)
# Secrets in paths: the per-job callback token, and the signed local media token (two long
# base64url parts; not a media file name, which is one part and ".pdf").
_PATH_SECRET = re.compile(r"(?P<keep>/signalwire/status/)[^\s/?#\"'<>]+"
                          r"|(?P<keep2>/media/)[A-Za-z0-9_-]{16,}\.[A-Za-z0-9_-]{16,}")
# SMTP AUTH arguments (aiosmtpd's "mail.log" at DEBUG/INFO would show them).
_SMTP_AUTH = re.compile(r"(?P<keep>\bAUTH\s+(?:PLAIN|LOGIN|XOAUTH2|CRAM-MD5)\s+)\S+",
                        re.IGNORECASE)


class Redactor(logging.Filter):
    """Masks secrets in a record's message, arguments and traceback, in place (so every
    handler and formatter downstream sees the masked text). Never drops a record."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._secrets: set[str] = set()
        self._known: re.Pattern[str] | None = None

    def register(self, value: str | None) -> None:
        if not value or len(value) < MIN_SECRET_CHARS:
            return
        with self._lock:
            self._secrets.update({value, quote(value, safe="")})
            self._compile()

    def unregister(self, value: str | None) -> None:
        if not value:
            return
        with self._lock:
            self._secrets.difference_update({value, quote(value, safe="")})
            self._compile()

    def registered(self) -> frozenset[str]:
        with self._lock:
            return frozenset(self._secrets)

    def _compile(self) -> None:
        ordered = sorted(self._secrets, key=len, reverse=True)
        self._known = (re.compile("|".join(re.escape(s) for s in ordered)) if ordered
                       else None)

    def redact(self, text: str) -> str:
        known = self._known
        if known is not None:
            text = known.sub(MASK, text)
        # Each pattern needs a literal most lines lack: looked for first, the seven regex
        # passes were over half of what a log line cost. A mask never makes a literal appear.
        low = text.lower()
        if "?" in text and "=" in text:
            text = _SIGNED_QUERY.sub(lambda m: m["keep"] + MASK, text)
        if "basic" in low or "bearer" in low or "digest" in low:
            text = _AUTH_SCHEME.sub(lambda m: m["keep"] + MASK, text)
        if "authorization" in low:
            text = _AUTH_HEADER.sub(lambda m: m["keep"] + MASK, text)
        if "'" in text or '"' in text:
            text = _QUOTED_PAIR.sub(lambda m: m["keep"] + MASK, text)
        if "=" in text:
            text = _PAIR.sub(lambda m: m["keep"] + MASK, text)
        if "/signalwire/status/" in text or "/media/" in text:
            text = _PATH_SECRET.sub(lambda m: (m["keep"] or m["keep2"]) + MASK, text)
        if "auth" in low:
            text = _SMTP_AUTH.sub(lambda m: m["keep"] + MASK, text)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: keep what there is, masked
            message = f"{record.msg!r} {record.args!r}"
        record.msg = self.redact(message)
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        return True


_redactor = Redactor()


def register_secret(value: str | None) -> None:
    """Mask this exact value (and its URL-encoded form) wherever it appears in a log line.
    Values shorter than 6 characters are ignored: they would mask ordinary words."""
    _redactor.register(value)


def unregister_secret(value: str | None) -> None:
    """Stop masking a value given to register_secret (a credential replaced on reload; a test
    that registered one must not leave it masking the lines of later tests)."""
    _redactor.unregister(value)


def registered_secrets() -> frozenset[str]:
    """The values masked now (each also in its URL-encoded form), so that a caller that adds
    some for a while (a test) can put the set back as it was."""
    return _redactor.registered()


def redact(text: str) -> str:
    return _redactor.redact(text)


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (UTC, ISO 8601), level, logger, message, and job_id and
    the like when a call site passed them as `extra` (job_id also read from a message that
    starts "job <id>"); a traceback as "exc"."""

    def format(self, record: logging.LogRecord) -> str:
        item: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in JSON_EXTRAS:
            value = record.__dict__.get(name)
            if value is not None:
                item[name] = value if isinstance(value, (int, float, bool)) else str(value)
        if "job_id" not in item and (found := _JOB_IN_MESSAGE.search(item["message"])):
            item["job_id"] = found["id"]
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            item["exc"] = record.exc_text
        if record.stack_info:
            item["stack"] = record.stack_info
        return json.dumps(item, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """TEXT_FORMAT (`time LEVEL logger: message`, the time as logging's default), written out
    directly, with the time's text made once a second: strftime of the local time and the
    %-style template were half of what formatting a line cost on the event loop."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)
        self._second: tuple[int, str] = (-1, "")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        cached = self._second  # one tuple: a thread that logs meanwhile sees a whole pair
        if cached[0] != second:
            cached = self._second = (second, time.strftime(
                self.default_time_format, self.converter(record.created)))
        return f"{cached[1]},{int(record.msecs):03d}"  # logging's default_msec_format

    def format(self, record: logging.LogRecord) -> str:
        record.message = record.getMessage()
        record.asctime = self.formatTime(record)
        text = f"{record.asctime} {record.levelname} {record.name}: {record.message}"
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            text = f"{text}\n{record.exc_text}" if text[-1:] != "\n" else text + record.exc_text
        if record.stack_info:
            stack = self.formatStack(record.stack_info)
            text = f"{text}\n{stack}" if text[-1:] != "\n" else text + stack
        return text


class _Handler(logging.StreamHandler):
    """Marks the handler setup_logging installed, so a second call replaces it."""


def setup_logging(level: str | int = "INFO", fmt: str = "text",
                  stream: IO[str] | None = None) -> logging.Handler:
    """Log to stderr (journald) from the root logger, one line per event, secrets masked.

    `fmt`: "text" (`time LEVEL logger: message`) or "json". Calling it again replaces the
    handler it installed before (tests, a reload), and leaves other handlers alone.
    """
    if fmt not in ("text", "json"):
        raise ValueError(f"log format must be text or json, not {fmt!r}")
    numeric = level if isinstance(level, int) else logging.getLevelName(str(level).upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    # Neither format shows the thread, the process or the caller's file and line: a record
    # need not look them up (the logging HOWTO's "Optimization": the thread and process were
    # ~10 of the ~30 us a line cost on a 2-core machine; the caller, a walk up the stack with
    # sys._getframe, a fifth of a line's cost on the daemon's event loop).
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
        old.close()
    handler = _Handler(sys.stderr if stream is None else stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(_redactor)
    root.addHandler(handler)
    root.setLevel(numeric)
    # aiosmtpd logs every command line at INFO on "mail.log", AUTH credentials included.
    logging.getLogger("mail.log").setLevel(max(logging.WARNING, numeric))
    # boto3/botocore debug lines carry presigned URLs and signed headers; urllib3's carry URLs.
    for noisy in ("botocore", "boto3", "s3transfer", "urllib3", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(max(logging.INFO, numeric))
    return handler
