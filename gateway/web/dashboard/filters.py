"""What a list page's query string asks for (the jobs' and received faxes' filters and page),
read bounded from the request, and where a login may send the browser next (`safe_next`)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote, urlencode

from aiohttp import web

from gateway.outbound.actions import AdminError

MAX_PAGE = 100_000  # the database pages (OFFSET): 2.5 million jobs deep at most
MAX_FILTER_CHARS = 200
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


def _query(values: dict[str, Any], change: dict[str, Any]) -> str:
    """A list page's query string: the filters as set, with `change` applied; empty values
    and page 1 left out."""
    values = {**values, **change}
    return urlencode({k: v for k, v in values.items() if v and not (k == "page" and v == 1)})


@dataclass(frozen=True)
class Filters:
    status: str = ""
    to: str = ""
    sender: str = ""
    date_from: str = ""
    date_until: str = ""
    q: str = ""
    page: int = 1

    def query(self, **change: Any) -> str:
        return _query({"status": self.status, "to": self.to, "sender": self.sender,
                       "from": self.date_from, "until": self.date_until, "q": self.q,
                       "page": self.page}, change)


@dataclass(frozen=True)
class ReceivedFilters:
    to: str = ""
    caller: str = ""
    date_from: str = ""
    date_until: str = ""
    page: int = 1

    def query(self, **change: Any) -> str:
        return _query({"to": self.to, "caller": self.caller, "from": self.date_from,
                       "until": self.date_until, "page": self.page}, change)


def page_number(request: web.Request) -> int:
    try:
        return min(MAX_PAGE, max(1, int(request.query.get("page", "1"))))
    except ValueError:
        return 1


def received_filters(request: web.Request) -> ReceivedFilters:
    q = request.query

    def text(name: str) -> str:
        return q.get(name, "").strip()[:MAX_FILTER_CHARS]

    return ReceivedFilters(to=text("to"), caller=text("caller"), date_from=text("from"),
                           date_until=text("until"), page=page_number(request))


def job_filters(request: web.Request) -> Filters:
    q = request.query

    def text(name: str) -> str:
        return q.get(name, "").strip()[:MAX_FILTER_CHARS]

    try:
        page = min(MAX_PAGE, max(1, int(q.get("page", "1"))))
    except ValueError:
        page = 1
    return Filters(status=text("status"), to=text("to"), sender=text("sender"),
                   date_from=text("from"), date_until=text("until"), q=text("q"), page=page)


_UNSAFE_IN_NEXT = re.compile(r"[\x00-\x1f\x7f\\]")


def safe_next(target: str | None) -> str:
    """Where to go after the login: a path on this dashboard, else the job list. Only '/'
    followed by something other than '/' or a backslash, with no control character (browsers
    drop a tab or a newline, so '/<tab>/host' is '//host', another site; a newline would split
    the Location header), checked as given and once percent-decoded."""
    if not target or len(target) > 500:
        return "/jobs"
    for text in (target, unquote(target)):
        if (not text.startswith("/") or text[1:2] in ("/", "\\")
                or _UNSAFE_IN_NEXT.search(text)):
            return "/jobs"
    return target


def parse_day(text: str, field: str) -> float | None:
    if not text:
        return None
    if not _DATE.fullmatch(text):
        raise AdminError(f"{field}: give a date as YYYY-MM-DD")
    try:
        day = datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=UTC)
    except ValueError:
        raise AdminError(f"{field}: {text} is not a date") from None
    return day.timestamp()


def day_range(date_from: str, date_until: str) -> tuple[float | None, float | None]:
    """The From and Until fields as a time range: from the start of the first day to the
    end of the last (None where a field is empty); AdminError for a field that is no date."""
    since = parse_day(date_from, "From")
    until = parse_day(date_until, "Until")
    return since, None if until is None else until + 86400  # the whole day
