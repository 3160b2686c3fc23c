"""postmaster@ the fax domain: accepted, as RFC 5321 4.5.1 requires, and forwarded to the
administrator (INBOUND_ADMIN_ADDRESS) instead of being refused as a bad fax number.

Mail to postmaster is a mail server's way of reaching the people who run this one (a remote
administrator about a problem, a bounce, a report). It is never faxed. It travels alone: a
transaction that names fax numbers as well gets `452 4.5.3` for the other kind of recipient,
and the sending server (every MTA does this) sends those in a transaction of their own.

The forward is handed to the report relay (or the outbox) before the 250, so nothing is lost:
when the relay cannot take it, the answer is 451 and the sending server tries again. It is
the original mail, attached whole (up to POSTMASTER_FORWARD_MAX_BYTES; beyond that its
header block), under a short note of who sent it from where. Per client address at most
POSTMASTER_PER_IP_HOUR are forwarded an hour.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from email import policy
from email.message import EmailMessage
from email.parser import BytesHeaderParser, BytesParser
from email.utils import format_datetime, make_msgid
from pathlib import Path

from gateway.config import Settings
from gateway.constants import SMTP_LINE_TIMEOUT_S
from gateway.documents.mime import header_block
from gateway.mail.sender import MAIL_POLICY, Notifier, NotifyError
from gateway.rules.policy import RateLimiter
from gateway.sanitise import one_line
from gateway.smtp.replies import Reply

log = logging.getLogger(__name__)

__all__ = ["Postmaster", "is_postmaster"]

POSTMASTER_FORWARD_MAX_BYTES = 10 * 1024 * 1024
POSTMASTER_PER_IP_HOUR = 30

SEPARATELY = Reply(452, "4.5.3", "Too many recipients: mail to postmaster travels alone; send "
                   "it to this recipient in a separate message", "too_many_recipients")


def is_postmaster(address: str, fax_domain: str) -> bool:
    """`postmaster@<fax domain>`, or `postmaster` alone (RFC 5321 4.5.1), in any case."""
    text = address.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1].strip()
    local, at, domain = text.rpartition("@")
    if not at:
        local, domain = text, fax_domain
    return local.lower() == "postmaster" and domain.rstrip(".").lower() == fax_domain.lower()


def forward_timeout_s(settings: Settings) -> float:
    """The forward is handed to the relay inside DATA: all of it (connect to the DATA reply)
    is bounded by half the time the SMTP session waits for the gateway's DATA reply (the
    timer server.py sets after the data: max(SMTP_LINE_TIMEOUT_S, 2 * DOC_TIMEOUT_SECONDS)).
    So the client hears 250 when the relay took the mail, or 451 when it did not answer, and
    never a 421 from that timer after the relay took it (then it would send it again and the
    administrator get it twice)."""
    return max(SMTP_LINE_TIMEOUT_S, 2 * settings.documents.timeout_s) / 2


class Postmaster:
    def __init__(self, settings: Settings, notifier: Notifier | None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.notifier = notifier
        self.clock = clock
        self.per_ip = RateLimiter(POSTMASTER_PER_IP_HOUR, 3600)
        self.forward_timeout_s = forward_timeout_s(settings)

    @property
    def address(self) -> str | None:
        return self.settings.inbound.admin_address

    def recipient(self, has_numbers: bool, already: bool) -> Reply:
        """RCPT TO:<postmaster@...>: accepted when there is somewhere to forward it."""
        domain = self.settings.fax.domain
        if self.address is None or self.notifier is None:
            return Reply(550, "5.1.1", f"postmaster@{domain} has no mailbox on this fax "
                         "gateway: its administrator has not set INBOUND_ADMIN_ADDRESS",
                         "bad_number")
        if has_numbers:
            return SEPARATELY
        if already:
            return Reply(250, "2.1.5", "Recipient OK (postmaster again; forwarded once)")
        return Reply(250, "2.1.5", f"Recipient OK, postmaster@{domain} (forwarded to the "
                     "administrator)")

    async def forward(self, path: Path, mail_from: str, peer: str, helo: str) -> Reply:
        """DATA for postmaster: handed to the relay (or the outbox), or a 4xx to try again."""
        assert self.address is not None and self.notifier is not None
        wait = self.per_ip.try_acquire(peer, 1, self.clock())
        if wait:
            log.warning("postmaster: more than %d mails an hour from %s; answered 451",
                        POSTMASTER_PER_IP_HOUR, peer)
            return Reply(451, "4.7.1", f"Too many mails to postmaster from {peer}; please try "
                         "again later", "rate_limited")
        try:
            forward = await asyncio.to_thread(self._build, path, mail_from, peer, helo)
        except OSError as exc:
            log.error("postmaster: cannot read the mail back: %s", exc)
            return Reply(451, "4.3.0", "Temporary failure: the gateway cannot read the mail "
                         "back; please try again later", "temp_failure")
        try:
            async with asyncio.timeout(self.forward_timeout_s):
                where = await self.notifier.send(forward,
                                                 f"postmaster-{int(time.time() * 1000)}")
        except (NotifyError, TimeoutError) as exc:
            if isinstance(exc, TimeoutError):
                exc = NotifyError(f"the relay took longer than {self.forward_timeout_s:g} s")
            self.per_ip.give_back(peer, 1, self.clock())
            log.warning("postmaster: mail from <%s> (peer %s) not forwarded to %s: %s",
                        one_line(mail_from, 200), peer, self.address, exc)
            return Reply(451, "4.4.0", "Temporary failure: the mail cannot be forwarded to the "
                         "administrator right now; please try again later", "temp_failure")
        log.info("postmaster: mail from <%s> (peer %s) forwarded to %s: %s",
                 one_line(mail_from, 200), peer, self.address, where)
        return Reply(250, "2.0.0", f"Forwarded to the administrator of "
                     f"{self.settings.fax.domain}")

    def _build(self, path: Path, mail_from: str, peer: str, helo: str) -> EmailMessage:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            raw = fh.read(POSTMASTER_FORWARD_MAX_BYTES + 1)
        whole = len(raw) <= POSTMASTER_FORWARD_MAX_BYTES
        headers = BytesHeaderParser(policy=policy.compat32).parsebytes(header_block(raw))
        subject = one_line(str(headers.get("Subject", "") or ""), 200)
        s = self.settings
        msg = EmailMessage(policy=MAIL_POLICY)
        msg["From"] = s.notify.sender
        msg["To"] = self.address
        msg["Subject"] = one_line(f"Mail to postmaster@{s.fax.domain} from "
                                  f"{mail_from or '<>'}: {subject or '(no subject)'}", 300)
        msg["Date"] = format_datetime(datetime.now(UTC))
        msg["Message-ID"] = make_msgid(domain=s.smtp.hostname)
        msg["Auto-Submitted"] = "auto-forwarded"
        msg.set_content(
            f"The fax gateway {s.smtp.hostname} received this mail for postmaster@"
            f"{s.fax.domain} and forwards it to you (INBOUND_ADMIN_ADDRESS).\n\n"
            f"Envelope sender: <{one_line(mail_from, 300)}>\n"
            f"Client: {peer} (HELO {one_line(helo or '-', 100)})\n"
            f"Size: {size} bytes\n"
            + ("" if whole else
               f"\nThe mail is larger than {POSTMASTER_FORWARD_MAX_BYTES // (1024 * 1024)} MiB: "
               "only its header is attached.\n"))
        if whole:
            msg.add_attachment(BytesParser(policy=policy.default).parsebytes(raw))
        else:
            msg.add_attachment(header_block(raw).decode("latin-1"), subtype="rfc822-headers",
                               filename="headers.txt")
        return msg
