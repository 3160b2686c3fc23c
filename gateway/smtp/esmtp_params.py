"""The ESMTP parameters aiosmtpd does not know: RFC 3461 DSN (RET, ENVID on MAIL; NOTIFY,
ORCPT on RCPT) and RFC 4954's AUTH= on MAIL.

Pure functions over the parameter words as the client wrote them (case kept: ENVID, ORCPT and
AUTH values are the client's own text). Each returns the values or the exact SMTP refusal.
Relays put these on every mail (Exchange Online and Postfix add `AUTH=<>`, SAP's SMTP fax asks
for `NOTIFY=SUCCESS,FAILURE`), so they are accepted and kept with the job; the submitter named
by AUTH= is a record of what the client said, never proof of who sent the mail.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from gateway.mail.dsn_values import xtext_decode
from gateway.smtp import replies
from gateway.smtp.replies import Reply

# The parameters taken off MAIL and RCPT before aiosmtpd sees them.
MAIL_KEYWORDS = frozenset({"AUTH", "RET", "ENVID"})
RCPT_KEYWORDS = frozenset({"NOTIFY", "ORCPT"})
NOTIFY_VALUES = frozenset({"SUCCESS", "FAILURE", "DELAY"})

ENVID_MAX_CHARS = 100      # RFC 3461 4.4: an MTA must accept at least 100
ORCPT_MAX_CHARS = 500      # RFC 3461 4.2: the whole parameter within 500 characters
AUTH_MAX_CHARS = 500       # RFC 4954 5: AUTH= may add 500 characters to MAIL
# RFC 3461 5 and RFC 4954 5: how much longer MAIL and RCPT lines may be once these are offered.
MAIL_EXTRA_CHARS = 100 + 500
RCPT_EXTRA_CHARS = 500

@dataclass(frozen=True)
class MailParams:
    """What MAIL FROM said beyond aiosmtpd's SIZE, BODY and SMTPUTF8."""

    ret: str | None = None        # "FULL" or "HDRS"
    envid: str | None = None      # decoded xtext
    auth: str | None = None       # decoded xtext, or "<>"


@dataclass(frozen=True)
class RcptParams:
    notify: str | None = None     # "NEVER", or some of "SUCCESS,FAILURE,DELAY" in that order
    orcpt: str | None = None      # "rfc822;alice@example.com" (type; decoded address)


def split_params(words: list[str], keywords: frozenset[str]) -> tuple[list[str], list[str]]:
    """(ours, the rest) of the parameter words after an address, in their order."""
    ours: list[str] = []
    rest: list[str] = []
    for word in words:
        (ours if word.partition("=")[0].upper() in keywords else rest).append(word)
    return ours, rest


def _pairs(words: list[str]) -> dict[str, str] | Reply:
    found: dict[str, str] = {}
    for word in words:
        key, eq, value = word.partition("=")
        key = key.upper()
        if not eq or not value:
            return replies.bad_parameter(f"{key} needs a value ({key}=...)")
        if key in found:
            return replies.bad_parameter(f"{key} given twice")
        found[key] = value
    return found


def parse_mail(words: list[str], authenticated: bool) -> MailParams | Reply:
    """RET, ENVID and AUTH of a MAIL command. AUTH= from a client that has not logged in is
    taken as `AUTH=<>` (RFC 4954 5: the server must not trust it)."""
    pairs = _pairs(words)
    if isinstance(pairs, Reply):
        return pairs
    ret = pairs.get("RET")
    if ret is not None:
        ret = ret.upper()
        if ret not in ("FULL", "HDRS"):
            return replies.bad_parameter("RET must be FULL or HDRS")
    envid = pairs.get("ENVID")
    if envid is not None:
        envid = xtext_decode(envid)
        if envid is None:
            return replies.bad_parameter("ENVID is not valid xtext (RFC 3461)")
        if len(envid) > ENVID_MAX_CHARS:
            return replies.bad_parameter(f"ENVID longer than {ENVID_MAX_CHARS} characters")
    auth = pairs.get("AUTH")
    if auth is not None:
        if len(auth) > AUTH_MAX_CHARS:
            return replies.bad_parameter(f"AUTH= longer than {AUTH_MAX_CHARS} characters")
        if auth != "<>":
            decoded = xtext_decode(auth)
            if decoded is None:
                return replies.bad_parameter("AUTH= is not <> or valid xtext (RFC 4954)")
            auth = decoded if authenticated else "<>"
    return MailParams(ret=ret, envid=envid, auth=auth)


def parse_rcpt(words: list[str]) -> RcptParams | Reply:
    """NOTIFY and ORCPT of a RCPT command."""
    pairs = _pairs(words)
    if isinstance(pairs, Reply):
        return pairs
    notify = pairs.get("NOTIFY")
    if notify is not None:
        asked = [v.strip().upper() for v in notify.split(",")]
        if asked == ["NEVER"]:
            notify = "NEVER"
        elif not asked or any(v not in NOTIFY_VALUES for v in asked) or \
                len(set(asked)) != len(asked):
            return replies.bad_parameter("NOTIFY must be NEVER, or one or more of SUCCESS, "
                                         "FAILURE, DELAY separated by commas")
        else:
            notify = ",".join(v for v in ("SUCCESS", "FAILURE", "DELAY") if v in asked)
    orcpt = pairs.get("ORCPT")
    if orcpt is not None:
        if len(orcpt) > ORCPT_MAX_CHARS:
            return replies.bad_parameter(f"ORCPT longer than {ORCPT_MAX_CHARS} characters")
        addr_type, semi, raw = orcpt.partition(";")
        address = xtext_decode(raw) if semi else None
        if not addr_type or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9-]*", addr_type) \
                or not address:
            return replies.bad_parameter("ORCPT must be addr-type;xtext, e.g. "
                                         "ORCPT=rfc822;alice@example.com")
        orcpt = f"{addr_type.lower()};{address}"
    return RcptParams(notify=notify, orcpt=orcpt)


HEADERS_MAX_BYTES = 64 * 1024      # the header block a DSN returns (RET=HDRS), at most
FULL_MAX_BYTES = 1024 * 1024       # RET=FULL returns the whole mail only up to this size


def returned_content(path: Path, full: bool) -> tuple[str | None, str | None]:
    """(the mail's header block, the whole mail when `full` and it fits FULL_MAX_BYTES and is
    UTF-8 text without NUL) from the mail as received; blocking. The header block is cut at
    the last whole line within HEADERS_MAX_BYTES. Text, so a database TEXT column holds it."""
    with open(path, "rb") as fh:
        head = fh.read(HEADERS_MAX_BYTES + 4)
        fh.seek(0, 2)
        size = fh.tell()
        whole = None
        if full and size <= FULL_MAX_BYTES:
            fh.seek(0)
            whole = fh.read(FULL_MAX_BYTES + 1)
    end = min((i for i in (head.find(b"\r\n\r\n"), head.find(b"\n\n")) if i >= 0),
              default=-1)
    block = head[:end] if 0 <= end <= HEADERS_MAX_BYTES else \
        head[:HEADERS_MAX_BYTES].rpartition(b"\n")[0]
    headers = block.decode("utf-8", "replace").replace("\x00", "").rstrip("\r\n") + "\r\n"
    text = None
    if whole is not None and b"\x00" not in whole:
        try:
            text = whole.decode("utf-8")
        except UnicodeDecodeError:
            text = None
    return headers, text
