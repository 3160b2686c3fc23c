"""Logging setup: text and JSON lines, library levels, and the secret-masking filter."""

from __future__ import annotations

import io
import json
import logging
import re
import secrets
from collections.abc import Iterator

import pytest

from gateway.runtime.logs import (
    TEXT_FORMAT,
    TextFormatter,
    redact,
    register_secret,
    setup_logging,
    unregister_secret,
)


def lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def test_text_lines() -> None:
    out = io.StringIO()
    setup_logging("info", "text", stream=out)
    log = logging.getLogger("gateway.outbound.job_runner")
    log.info("job %s: reported (%s)", "3f9c0a7e21b4d8c5", "delivered")
    log.debug("not shown")
    [line] = lines(out)
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO "
                        r"gateway\.outbound\.job_runner: "
                        r"job 3f9c0a7e21b4d8c5: reported \(delivered\)", line), line


def test_text_formatter_writes_what_the_stdlib_template_writes() -> None:
    """TextFormatter (the time's text kept for a second, the line written out directly) gives,
    record for record, what logging.Formatter(TEXT_FORMAT) gives: across second boundaries,
    with a traceback, with stack info, with a message ending in a newline."""
    ours, stdlib = TextFormatter(), logging.Formatter(TEXT_FORMAT)
    try:
        raise ValueError("boom")
    except ValueError:
        exc_info = __import__("sys").exc_info()
    base = 1_765_000_000.0
    cases = [(base + 0.001, "job %s: accepted", ("3f9c0a7e21b4d8c5",), None, None),
             (base + 0.999, "same second %d", (2,), None, None),
             (base + 1.0, "next second", (), None, None),
             (base + 1.5, "crashed", (), exc_info, None),
             (base + 1.6, "ends in a newline\n", (), exc_info, None),
             (base + 7.25, "with stack", (), None, "Stack (most recent call last):\n  here"),
             (base - 86_400.5, "a day before", (), None, None)]
    for created, msg, args, exc, stack in cases:
        made = []
        for _ in (ours, stdlib):
            record = logging.LogRecord("gateway.x", logging.WARNING, __file__, 1, msg, args, exc,
                                       sinfo=stack)
            record.created, record.msecs = created, int((created - int(created)) * 1000) + 0.0
            made.append(record)
        assert ours.format(made[0]) == stdlib.format(made[1]), msg


def test_no_caller_lookup_per_record() -> None:
    """setup_logging turns off the caller's file and line (a walk up the stack per record):
    neither format shows them."""
    out = io.StringIO()
    setup_logging("INFO", "text", stream=out)
    seen: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = seen.append  # type: ignore[method-assign]
    logging.getLogger().addHandler(handler)
    try:
        logging.getLogger("gateway.x").info("where from?")
    finally:
        logging.getLogger().removeHandler(handler)
    assert seen[0].lineno == 0 and seen[0].funcName == "(unknown function)"


def test_json_lines_with_job_id_and_exception() -> None:
    out = io.StringIO()
    setup_logging("DEBUG", "json", stream=out)
    log = logging.getLogger("gateway.outbound.job_runner")
    log.info("job %s: submitted", "3f9c0a7e21b4d8c5",
             extra={"job_id": "3f9c0a7e21b4d8c5", "attempt": 2})
    try:
        raise RuntimeError("GET https://b.s3.amazonaws.com/k.pdf?X-Amz-Signature=abcdef0123 "
                           "failed")
    except RuntimeError:
        log.exception("job %s: step crashed", "3f9c0a7e21b4d8c5")
    first, second = (json.loads(line) for line in lines(out))
    assert set(first) == {"time", "level", "logger", "message", "job_id", "attempt"}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["time"])
    assert (first["level"], first["logger"], first["message"], first["job_id"],
            first["attempt"]) == ("INFO", "gateway.outbound.job_runner",
                                  "job 3f9c0a7e21b4d8c5: submitted", "3f9c0a7e21b4d8c5", 2)
    assert second["level"] == "ERROR"
    assert second["job_id"] == "3f9c0a7e21b4d8c5"  # read from the "job <id>" line itself
    assert "Traceback" in second["exc"] and "RuntimeError" in second["exc"]
    assert "abcdef0123" not in second["exc"] and "k.pdf?***" in second["exc"]


def test_library_levels() -> None:
    setup_logging("DEBUG", "text", stream=io.StringIO())
    assert logging.getLogger("mail.log").level == logging.WARNING
    for name in ("botocore", "boto3", "s3transfer", "urllib3"):
        assert logging.getLogger(name).level == logging.INFO, name
    assert logging.getLogger().level == logging.DEBUG
    setup_logging("ERROR", "text", stream=io.StringIO())
    assert logging.getLogger("mail.log").level == logging.ERROR
    assert logging.getLogger("botocore").level == logging.ERROR


def test_setup_twice_replaces_its_own_handler_only() -> None:
    other = logging.StreamHandler(io.StringIO())
    logging.getLogger().addHandler(other)
    first, second = io.StringIO(), io.StringIO()
    setup_logging("INFO", "text", stream=first)
    setup_logging("INFO", "json", stream=second)
    logging.getLogger("x").warning("once")
    assert first.getvalue() == ""
    assert json.loads(second.getvalue()) == {**json.loads(second.getvalue()), "message": "once",
                                             "level": "WARNING", "logger": "x"}
    assert "job_id" not in json.loads(second.getvalue())
    assert other in logging.getLogger().handlers
    logging.getLogger().removeHandler(other)
    with pytest.raises(ValueError, match="text or json"):
        setup_logging("INFO", "xml")
    with pytest.raises(ValueError, match="unknown log level"):
        setup_logging("LOUD", "text")


@pytest.mark.parametrize("text, secret, kept", [
    ("media https://bkt.s3.us-east-1.amazonaws.com/faxgw/Ab.pdf?X-Amz-Algorithm=AWS4-HMAC-SHA256"
     "&X-Amz-Credential=AKIAEXAMPLE%2F20250101%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date=20250101"
     "T000000Z&X-Amz-Expires=7200&X-Amz-SignedHeaders=host&X-Amz-Signature=0123456789abcdef done",
     "AKIAEXAMPLE", "https://bkt.s3.us-east-1.amazonaws.com/faxgw/Ab.pdf?*** done"),
    ("url http://s3.test/k.pdf?AWSAccessKeyId=AKIAOLD&Expires=1700000000&Signature=c2lnbmF0dXJl",
     "c2lnbmF0dXJl", "http://s3.test/k.pdf?***"),
    ("headers Authorization: Basic cHJvamVjdDp0b2tlbg==", "cHJvamVjdDp0b2tlbg",
     "Authorization: Basic ***"),
    ("{'Authorization': 'Bearer eyJhbGciOiJIUzI1NiJ9.e30.sig', 'Accept': '*/*'}",
     "eyJhbGciOiJIUzI1NiJ9", "'Accept': '*/*'"),
    ("login token=AbCdEf123456 api_token=PTxyz987 password=hunter22 ok=1",
     "hunter22", "ok=1"),
    ('{"password": "hunter22", "user": "faxgw", "signing_key": "PSKabc123"}',
     "PSKabc123", '"user": "faxgw"'),
    ("callback POST http://gw.example/signalwire/status/q7Zt3k9Lm2Xv8Rb1Ny5Pc4Jd6Hs0Wa from x",
     "q7Zt3k9Lm2Xv8Rb1Ny5Pc4Jd6Hs0Wa", "/signalwire/status/*** from x"),
    ("fetch http://gw.example/media/eyJrIjoiYWJjLnBkZiIsImUiOjE3MDB9.c2lnbmF0dXJlc2lnbmF0dXJlc2ln",
     "c2lnbmF0dXJlc2lnbmF0dXJlc2ln", "http://gw.example/media/***"),
    ("mail.log: >> b'AUTH PLAIN AGZheGd3AHNlY3JldA=='", "AGZheGd3AHNlY3JldA", "AUTH PLAIN ***"),
])
def test_redaction_patterns(text: str, secret: str, kept: str) -> None:
    masked = redact(text)
    assert secret not in masked, masked
    assert kept in masked, masked


def test_ordinary_lines_are_left_alone() -> None:
    for text in ("job 3f9c0a7e21b4d8c5: callback status delivered -> final",
                 "job 3f9c0a7e21b4d8c5 attempt 2: sending to +15551234567",
                 "spool file /var/lib/faxgw/media/Qk3xZ2v9b8n7m6l5k4j3h2.pdf is missing",
                 "faxgw started in production mode: SMTP 0.0.0.0:25 for *@fax.example.com",
                 "key stored; tries=2 pages=3"):
        assert redact(text) == text


@pytest.fixture
def secret() -> Iterator[str]:
    """A registered secret, unregistered afterwards: later tests' lines are not masked by it."""
    value = "sw-" + secrets.token_urlsafe(12) + "/+="
    register_secret(value)
    yield value
    unregister_secret(value)


def test_registered_secrets_are_masked_everywhere(secret: str) -> None:
    value = secret
    register_secret("abc")  # too short to mask safely: ignored
    out = io.StringIO()
    setup_logging("INFO", "text", stream=out)
    log = logging.getLogger("gateway.mail.sender")
    log.warning("relay said %s", f"535 bad credentials {value}")
    log.warning("url-encoded in a query: u=%s", __import__("urllib.parse").parse.quote(value,
                                                                                       safe=""))
    try:
        raise ConnectionError(f"login with {value} refused")
    except ConnectionError:
        log.exception("relay failed")
    text = out.getvalue()
    assert value not in text and "***" in text
    assert __import__("urllib.parse").parse.quote(value, safe="") not in text
    assert "ConnectionError: login with *** refused" in text
    assert "abc" in redact("abc def")


def test_unregistered_secret_is_shown_again(secret: str) -> None:
    line = f"rotated: {secret} is no longer in use"
    assert redact(line) == "rotated: *** is no longer in use"
    unregister_secret(secret)
    assert redact(line) == line
    assert redact(f"{secret} {secret}") == f"{secret} {secret}"


def test_a_record_with_bad_arguments_still_logs() -> None:
    out = io.StringIO()
    handler = setup_logging("INFO", "text", stream=out)
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "two %s %s password=%s",
                               ("args?",), None)
    handler.handle(record)  # straight to ours: pytest's own handler would raise on it
    [line] = lines(out)
    # The format string and its arguments, as they came, and still masked.
    assert line.endswith("INFO x: 'two %s %s password=***' ('args?',)"), line
