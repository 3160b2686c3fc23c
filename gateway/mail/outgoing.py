"""The gateway's own mail (reports, receipts, received faxes, DSNs) as bytes for the wire: its
email policy and `render`. Apart from sender.py, which delivers them (aiosmtplib, the
settings), so the document workers that build these mails import neither (~70 ms of CPU and
~10 MB at a worker's first report)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from email import policy
from email.headerregistry import HeaderRegistry
from email.message import EmailMessage
from email.utils import getaddresses


@dataclass(frozen=True)
class Rendered:
    """A report ready for the wire: CRLF bytes and the envelope recipients."""

    data: bytes
    recipients: tuple[str, ...]


class _HeaderClasses(HeaderRegistry):
    """The stdlib's header registry makes a new class for every header it parses (one
    `type()` call each: a quarter of building a report mail). The class depends only on the
    header's name, so one per name is kept."""

    def __init__(self) -> None:
        super().__init__()
        self._made: dict[str, type] = {}

    def __getitem__(self, name: str) -> type:
        key = name.lower()
        made = self._made.get(key)
        if made is None:
            made = self._made[key] = super().__getitem__(name)
        return made


# The gateway's own mail (reports, receipts, received faxes): headers unfolded up to RFC 5322's
# hard limit (Python folds a long Subject before its first word, which clients show as a
# leading space), CRLF as on the wire.
MAIL_POLICY = policy.default.clone(max_line_length=998, header_factory=_HeaderClasses())


def render(report: EmailMessage, bcc: Sequence[str] = ()) -> Rendered:
    """Serialise with the report's own policy (unfolded headers), not aiosmtplib's. Bcc
    recipients are envelope-only: no header shows them to the sender."""
    data = report.as_bytes(policy=report.policy.clone(linesep="\r\n"))
    recipients = [a for _, a in getaddresses(report.get_all("To", []))] + list(bcc)
    return Rendered(data, tuple(recipients))
