"""How the dashboard's pages show values (jinja2 filters): moments as <time> elements,
numbers as people write them, ages in words."""

from __future__ import annotations

from datetime import UTC, datetime

from markupsafe import Markup

from gateway.phone import NumberError, format_number


def when(ts: float | None) -> Markup | str:
    """A moment as a <time> element: UTC as written (and on hover); dash.js shows it in the
    viewer's own time zone."""
    if ts is None:
        return "-"
    moment = datetime.fromtimestamp(ts, UTC)
    utc = moment.strftime("%Y-%m-%d %H:%M:%S")
    return Markup('<time datetime="{}" title="{} UTC">{} UTC</time>').format(
        moment.strftime("%Y-%m-%dT%H:%M:%SZ"), utc, utc)


def shown_number(e164: str | None) -> str:
    if not e164:
        return "-"
    try:
        return format_number(e164)
    except NumberError:
        return e164


def ago(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = max(0, int(seconds))
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    if s < 172800:
        return f"{s // 3600} h"
    return f"{s // 86400} days"
