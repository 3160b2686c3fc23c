"""SignalWire error codes: one table of what each code means and what the gateway does about it.

The client words its errors from it, the retry rule asks it whether another attempt can help,
the operator's cancel reads the "too late" code from it, and the sandbox simulator answers with
these codes (signalwire-fax-facts.md, "Errors").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True)
class ErrorCode:
    code: int
    words: str | None      # plain words for a sender or operator (None: SignalWire's text says it)
    never_retry: bool      # about the document or the numbers: another attempt cannot succeed


NOT_CANCELABLE: Final = 10000    # cancel asked once the fax has left "queued"
CONTENT_TYPE: Final = 12300
INVALID_PARAMETER: Final = 20001
AUTH: Final = 20003
IN_PROGRESS: Final = 20009
NOT_FOUND: Final = 20404
UNSUPPORTED_MEDIA_TYPE: Final = 20415
TOO_MANY_REQUESTS: Final = 20429
FROM_NOT_OWNED: Final = 21210
BAD_TO: Final = 21211
BAD_FROM: Final = 21212
BAD_TO_2: Final = 21217
FROM_CANNOT_FAX: Final = 21601
FROM_REQUIRED: Final = 21603
TO_REQUIRED: Final = 21604
BAD_CALLBACK_URL: Final = 21609
TOO_MANY_QUEUED: Final = 21611
BAD_MEDIA_URL: Final = 21620
OUT_OF_BALANCE: Final = 30002
T30: Final = 30003               # the simulator's code for T.30 failures (SignalWire lists none)
OUT_OF_BALANCE_2: Final = 4001
MEDIA_REDIRECT: Final = 53603
MEDIA_DOWNLOAD: Final = 63019

CODES: Final[dict[int, ErrorCode]] = {e.code: e for e in (
    ErrorCode(NOT_CANCELABLE, "the fax has left the queue and can no longer be canceled", False),
    ErrorCode(CONTENT_TYPE, "SignalWire could not read the document as a PDF", True),
    ErrorCode(INVALID_PARAMETER, None, False),
    ErrorCode(AUTH, "the gateway's SignalWire credentials were refused", False),
    ErrorCode(IN_PROGRESS, None, False),
    ErrorCode(NOT_FOUND, "SignalWire does not know this fax or project", False),
    ErrorCode(UNSUPPORTED_MEDIA_TYPE, None, False),
    ErrorCode(TOO_MANY_REQUESTS, "SignalWire is rate limiting the gateway", False),
    ErrorCode(FROM_NOT_OWNED,
              "the caller number is not a number of the gateway's SignalWire project", True),
    ErrorCode(BAD_TO, "the destination number is not valid", True),
    ErrorCode(BAD_FROM, "the caller number is not in international (E.164) form", True),
    ErrorCode(BAD_TO_2, "the destination number is not valid", True),
    ErrorCode(FROM_CANNOT_FAX, "the caller number cannot send faxes", True),
    ErrorCode(FROM_REQUIRED, None, False),
    ErrorCode(TO_REQUIRED, None, False),
    ErrorCode(BAD_CALLBACK_URL, None, False),
    ErrorCode(TOO_MANY_QUEUED, "too many faxes are queued for the caller number", False),
    ErrorCode(BAD_MEDIA_URL, "the document link given to SignalWire was not valid", True),
    ErrorCode(OUT_OF_BALANCE, "the SignalWire account is out of balance", False),
    ErrorCode(OUT_OF_BALANCE_2, "the SignalWire account is out of balance", False),
    ErrorCode(T30, None, False),
    ErrorCode(MEDIA_REDIRECT, "SignalWire could not fetch the document", True),
    ErrorCode(MEDIA_DOWNLOAD, "SignalWire could not download the document", True),
)}


def _code(code: int | str | None) -> int | None:
    try:
        return int(code) if code not in (None, "") else None
    except (TypeError, ValueError):
        return None


def words(code: int | str | None) -> str | None:
    """Plain words for a code, or None when SignalWire's own message says it best."""
    entry = CODES.get(_code(code) or -1)
    return entry.words if entry else None


def never_retry(code: int | str | None) -> bool:
    """True for errors about the document or the numbers: another attempt cannot succeed.
    Callbacks carry the code as text, API errors as a number: both are accepted."""
    entry = CODES.get(_code(code) or -1)
    return entry.never_retry if entry else False


# T.30 result texts (spandsp wording, as SignalWire passes them on in ErrorMessage of a "failed"
# fax; it publishes no codes for them). The retry rule, the report's advice and the simulator
# all read these, so a wording lives in one place.
T30_DROPPED: Final = "The call dropped prematurely"
T30_RESOLUTION: Final = "Far end cannot receive at the resolution of the image"
T30_NO_ANSWER: Final = "Timed out waiting for initial communication"

# Lower-case fragments of T.30 texts that describe the line or the far machine, not the
# document: worth another attempt.
LINE_TROUBLE: Final = ("dropped prematurely", "timed out", "disconnected", "no carrier",
                       "training", "line", "unexpected", "invalid response", "no response")
# The far machine cannot take the resolution: worth one more attempt at standard quality.
RESOLUTION_TROUBLE: Final = "cannot receive at the resolution"
DROPPED_TROUBLE: Final = "dropped prematurely"
NO_FAX_ANSWERED: Final = "timed out waiting for initial"
